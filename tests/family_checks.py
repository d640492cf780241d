"""Checks every exported DiT family passes, shared by the family test modules (test_flux2, test_qwenimage):
components against eager at a size other than the export's, parity through the loop, λ per sample, the
generate/parity commands, and a transformer LoRA fused by the family's diffusers loader."""

import numpy as np
import pytest
import torch

import pladis
from pladis import models


def components_match_eager(manifest: dict, out, name: str, family: str, run_at: dict) -> None:
    """Each exported component (ONNX Runtime, CPU) equals the eager patched one on fresh random inputs at the
    dims ``run_at`` (dim name -> size; the others at their export size), batch 3 (the export's is 1)."""
    import onnxruntime as ort

    from pladis import patch
    from pladis.export import contracts

    dims = {k: tuple(v) for k, v in manifest["dims"].items()}
    d = {k: (v[0], run_at.get(k, v[1]), v[2]) for k, v in dims.items()}
    pipe = models.load(name)
    pladis.apply(pipe)
    comps = contracts.components(pipe, family)
    assert [c.name for c in comps] == ["text_encoder", "transformer", "vae_decoder"] == list(manifest["components"])
    for comp in comps:
        inputs = contracts.sample_inputs(comp, d, torch.float32, seed=3)
        with torch.no_grad():
            expected = contracts.Traced(comp)(*inputs)[0].numpy()
        sess = ort.InferenceSession(str(out / manifest["components"][comp.name]["file"]),
                                    providers=["CPUExecutionProvider"])  # fmt: skip
        got = sess.run(None, {i.name: t.numpy() for i, t in zip(comp.inputs, inputs, strict=True)})[0]
        assert got.shape == expected.shape and got.shape[0] == 3
        rel = np.linalg.norm(got - expected) / np.linalg.norm(expected)
        assert rel <= 1e-4, f"{comp.name}: rel-L2 {rel:.3g}"  # the fp32 export contract
    assert manifest["components"]["transformer"]["pladis_nodes"] == len(manifest["pladis"]["layers"]) == 2
    assert manifest["components"]["text_encoder"]["pladis_nodes"] == 0
    patch.remove(pipe)


def parity_through_the_loop(out, lam: float) -> None:
    """The ORT engine against eager diffusers through 3 steps of the loop at the family's default guidance."""
    from pladis.runtime import parity

    report = parity.check(out, "ort", steps=3, lam=lam)
    assert report.ok, report.table()  # fp32: rel-L2 <= 1e-4 per teacher-forced step (parity.TOLERANCE)
    assert len(report.teacher_forced) == len(report.free_running) == 3
    for row in report.free_running:
        assert row["latent"]["rel_l2"] < 1e-3, report.table()
    assert report.image_psnr_db > 40


def lam_per_sample(out, lams: list[float], prompts: list[str]) -> None:
    """One export serves a λ per prompt in one batch (the λ input routes per sample, both CFG halves alike)."""
    from pladis.runtime import parity

    report = parity.check(out, "ort", steps=2, lam=lams, prompt=prompts)
    assert report.lam == lams
    assert report.ok, report.table()  # fp32: rel-L2 <= 1e-4 per teacher-forced step (parity.TOLERANCE)


def generate_and_parity_commands(out, tmp_path, capsys) -> None:
    """``pladis generate`` writes a 32x32 image that λ changes, and ``pladis parity`` passes, at λ 0 and 3."""
    from PIL import Image

    from pladis import cli

    images = {}
    for lam in ("0", "3"):
        path = tmp_path / f"img{lam}.png"
        args = ["generate", "--engine", str(out), "--prompt", "a cat", "--steps", "3", "--lam", lam]
        assert cli.main([*args, "--out", str(path)]) == 0
        images[lam] = np.asarray(Image.open(path), dtype=float)
        assert cli.main(["parity", "--engine", str(out), "--steps", "3", "--lam", lam]) == 0
        assert "PASS" in capsys.readouterr().out
    assert images["0"].shape == (32, 32, 3)
    assert np.abs(images["3"] - images["0"]).max() > 0, "lam did not change the image: the test would prove nothing"


def transformer_lora_fused_as_peft(name: str, tmp_path) -> None:
    """``--lora`` goes through the family pipeline's diffusers loader; the reference is peft's unfused adapter."""
    pytest.importorskip("peft")
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from tiny_cases import denoiser_case, forward

    from pladis import sources

    _, kwargs = denoiser_case(name)
    pipe = models.load(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
        pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False))
    reference = forward(pipe.transformer, kwargs)
    path = tmp_path / "lora.safetensors"
    type(pipe).save_lora_weights(str(tmp_path), transformer_lora_layers=get_peft_model_state_dict(pipe.transformer),
                                 weight_name=path.name)  # fmt: skip
    fused = sources.load(sources.resolve(name, "", [str(path)])).transformer
    got = forward(fused, kwargs)
    torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-5)  # fused W + BA vs W x + B(A x): fp32 rounding
    assert (got - forward(models.load(name).transformer, kwargs)).abs().max() > 1e-3  # the LoRA does something
