"""The family registry: one record per family, consistent with its built-in model, and the only place that
names a family."""

import ast
from pathlib import Path

import pytest
import torch

import pladis
from pladis import families, models, patch
from pladis.export import contracts

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ["pladis", "export", "runtime", "engine", "plugins_trt", "bench"]  # pladis/* symlinks are deduplicated
# (file, literal): a string equal to a family name that means something else there
ALLOWED = {
    ("bench/suite.py", "unet"): "the U-Net component's exported file name, not the family",
}
BUILTIN_OF = {"unet": ["tiny-sd15", "tiny-sdxl"], "pixart": ["tiny-pixart"], "sd3": ["tiny-sd3"], "flux": ["tiny-flux"],
              "flux2": ["tiny-flux2"], "qwenimage": ["tiny-qwenimage"]}  # fmt: skip


def _family_literals(top: Path = ROOT) -> list[tuple[str, int, str]]:
    """(file, line, literal) of every string constant equal to a family name outside pladis/families/."""
    names, seen, hits = set(families.FAMILIES), set(), []
    for root in SCANNED:
        for path in sorted((top / root).rglob("*.py")):
            real = path.resolve()
            if real in seen or real.parent == Path(families.__file__).resolve().parent:  # the registry's package
                continue
            seen.add(real)
            rel = real.relative_to(top.resolve()).as_posix()
            for node in ast.walk(ast.parse(real.read_text(), rel)):
                if isinstance(node, ast.Constant) and node.value in names and (rel, node.value) not in ALLOWED:
                    hits.append((rel, node.lineno, node.value))
    return hits


def test_only_the_registry_names_families():
    hits = _family_literals()
    assert not hits, "family names outside pladis/families/ (look the record up instead): " + ", ".join(
        f"{f}:{line} {v!r}" for f, line, v in hits
    )


def test_the_scan_sees_a_family_switch(tmp_path):
    """The scan catches a switch like the ones the registry replaced."""
    (tmp_path / "runtime").mkdir()
    (tmp_path / "runtime" / "switch.py").write_text('def f(family):\n    return family == "flux"\n')
    assert _family_literals(tmp_path) == [("runtime/switch.py", 2, "flux")]


def test_every_family_has_a_tiny_builtin_and_a_consistent_contract():
    assert set(BUILTIN_OF) == set(families.FAMILIES)
    for name, builtins in BUILTIN_OF.items():
        fam = families.get(name)
        assert fam.name == name and families.FAMILIES[name] is fam
        for builtin in builtins:
            pipe = models.load(builtin, device="meta")  # structure only: contracts read configs
            assert families.of_model(patch.denoiser_of(pipe)) is fam
            denoiser = next(c for c in contracts.components(pipe, name) if c.denoiser)
            assert denoiser.name == fam.component and denoiser.inputs[0].name == fam.sample_input
            assert denoiser.extras["timestep_scale"] == fam.timestep_scale
            assert "text" in [x for t in denoiser.inputs for x in t.shape]


def test_unknown_and_unsupported_families_name_the_supported_ones():
    with pytest.raises(ValueError, match=r"unknown model family 'sana'; supported families: unet .*flux"):
        families.get("sana")
    with pytest.raises(ValueError, match=r"unknown model family"):
        contracts.text_lengths(None, "sana")


def test_sana_is_refused_with_the_reason_and_the_supported_families():
    from diffusers import SanaTransformer2DModel

    with torch.device("meta"):
        sana = SanaTransformer2DModel(
            patch_size=1, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=4, num_attention_heads=2,
            num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
            sample_size=8,
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"SanaTransformer2DModel \(SANA needs a Gemma.*supported families: unet"):
        pladis.apply(sana)


def test_vae_rule():
    latents = torch.full((1, 4, 2, 2), 3.0)
    assert torch.equal(families.vae_latents(latents, 1.5, None), latents / 1.5)
    assert torch.equal(families.vae_latents(latents, 1.5, 0.25), latents / 1.5 + 0.25)
    pipe = models.load("tiny-sd15", device="meta")
    assert families.vae_scale_factor(pipe.vae.config) == 2


def test_single_file_layouts_sit_beside_their_families():
    # the registry's layouts are the families' own, in registry order; each loads into its family's denoiser
    assert families.LAYOUTS == tuple(lay for f in families.FAMILIES.values() for lay in f.layouts)
    for fam in families.FAMILIES.values():
        assert all(lay.denoiser == fam.component for lay in fam.layouts), fam.name
    assert {f.name for f in families.FAMILIES.values() if f.layouts} == {"unet", "sd3", "flux", "flux2", "qwenimage"}


def test_flux_hooks_match_diffusers_own_packing():
    # the FLUX record's pack/unpack/position ids against FluxPipeline's static helpers (an independent reference)
    from diffusers import FluxPipeline

    fam = families.get("flux")
    latents = torch.randn(2, 4, 6, 8, generator=torch.Generator().manual_seed(0))
    packed = fam.pack(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 4, 6, 8))
    assert torch.equal(fam.unpack(packed, 6, 8), latents)  # pure index moves: bitwise
    # diffusers' unpack takes pixel sizes and the VAE factor
    assert torch.equal(FluxPipeline._unpack_latents(packed, 6 * 8, 8 * 8, 8), latents)
    ids = FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32)
    d = families.Denoising(text=None, input_names=frozenset(), vae_scale=8, latent_channels=4, scaling_factor=1.0)
    assert d.latent_hw(48, 64) == (6, 8)

    calls = []

    def text(encoder, prompts):  # a fake text side: the hooks see only this, never a runtime
        calls.append((encoder, list(prompts)))
        n = len(prompts)
        return {"pooler_output": torch.ones(n, 3), "last_hidden_state": torch.zeros(n, 5, 7),
                "attention_mask": torch.ones(n, 5, dtype=torch.int64)}  # fmt: skip

    d = families.Denoising(text, frozenset({"guidance"}), vae_scale=8, latent_channels=4, scaling_factor=1.0)
    cond = fam.encode(d, ["a", "b"], None, 48, 64, 3.5)
    assert calls == [("text_encoder", ["a", "b"]), ("text_encoder_2", ["a", "b"])]
    assert torch.equal(cond["img_ids"], ids) and cond["txt_ids"].shape == (5, 3)
    assert torch.equal(cond["guidance"], torch.full((2,), 3.5))


def test_cfg_hooks_encode_negatives_first():
    # classifier-free guidance batches [negatives, prompts] (diffusers' order); a guidance-distilled family has no CFG
    seen = []

    def text(encoder, prompts):
        seen.append(list(prompts))
        n = len(prompts)
        return {"last_hidden_state": torch.arange(n, dtype=torch.float32)[:, None, None].expand(n, 4, 6),
                "attention_mask": torch.ones(n, 4, dtype=torch.int64)}  # fmt: skip

    d = families.Denoising(text, frozenset(), vae_scale=8, latent_channels=4, scaling_factor=1.0)
    cond = families.get("pixart").encode(d, ["p"], ["n"], 64, 64, 4.5)
    assert seen == [["n", "p"]] and cond["encoder_hidden_states"][:, 0, 0].tolist() == [0.0, 1.0]
    assert families.get("unet").uses_cfg and not families.get("flux").uses_cfg
