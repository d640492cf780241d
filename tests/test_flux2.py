"""FLUX.2 ([klein] layout ``tiny-flux2``, [dev] layout ``tiny-flux2-dev``): its record against the pipelines' own
code, patching against the stock processors, export against eager, and the runtime through parity."""

import family_checks
import pytest
import torch

import pladis
from pladis import families, models

NAME = "tiny-flux2"
DEV = "tiny-flux2-dev"


# Patched vs stock (lam = 0 and remove bitwise; lam = 2 against diffusers' own Flux2AttnProcessor with its SDPA
# call answered by the float64 formula; text-query rows untouched) run in tests/test_patch.py: tiny-flux2 is
# one of tiny_cases.FAMILY_CASES.


def test_double_stream_blocks_are_patched_and_single_stream_ones_are_not():
    pipe = models.load(NAME, device="meta")
    names = pladis.apply(pipe, layers="all").layers
    assert names == ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]
    assert len(pipe.transformer.single_transformer_blocks) == 1  # there, and left stock


# --------------------------------------------------------------------------------------------------
# The record's hooks against Flux2Pipeline's own static helpers (an independent reference)
# --------------------------------------------------------------------------------------------------


def test_hooks_match_the_pipeline_helpers():
    from diffusers import Flux2KleinPipeline as P

    fam = families.get("flux2")
    noise = torch.randn(fam.noise_shape(2, 4, 12, 16), generator=torch.Generator().manual_seed(0))
    assert noise.shape == (2, 16, 6, 8)  # drawn patchified, as prepare_latents
    packed = fam.pack(noise)
    assert torch.equal(packed, P._pack_latents(noise))  # pure index moves: bitwise
    assert torch.equal(fam.unpack(packed, 12, 16), noise)
    assert torch.equal(fam.unpack(packed, 12, 16), P._unpack_latents_with_ids(packed, P._prepare_latent_ids(noise)))
    assert torch.equal(flux2_module().unpatchify(noise), P._unpatchify_latents(noise))
    assert torch.equal(flux2_module().image_ids(6, 8), P._prepare_latent_ids(noise)[0].float())
    assert torch.equal(flux2_module().text_ids(5), P._prepare_text_ids(torch.zeros(1, 5, 3))[0].float())


def flux2_module():
    from pladis.families import flux2

    return flux2


def test_timesteps_follow_the_pipeline():
    # the pipeline's own schedule: sigmas linspace(1, 1/n) with the empirical mu of (tokens, steps)
    import numpy as np
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    pipe = models.load(NAME)
    ours = pipe.scheduler.from_config(pipe.scheduler.config)
    families.get("flux2").set_timesteps(ours, 3, 16, 16)
    ref = pipe.scheduler.from_config(pipe.scheduler.config)
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / 3, 3), mu=compute_empirical_mu(64, 3))
    assert torch.equal(ours.timesteps, ref.timesteps) and torch.equal(ours.sigmas, ref.sigmas)


# --------------------------------------------------------------------------------------------------
# Export and runtime, from one export
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from pladis.export import ExportConfig, export

    out = tmp_path_factory.mktemp("flux2") / "out"
    return export(ExportConfig(model=NAME, out=str(out))), out


def test_every_component_matches_eager_at_another_size(exported):
    run_at = dict(batch=3, cfg_batch=3, latent_height=24, latent_width=16)  # export: batch 1, 16 x 16 latents
    run_at.update(patch_height=12, patch_width=8, image_tokens=12 * 8, height=48, width=32)
    family_checks.components_match_eager(*exported, NAME, "flux2", run_at)


@pytest.fixture(scope="module")
def exported_dev(tmp_path_factory):
    from pladis.export import ExportConfig, export

    out = tmp_path_factory.mktemp("flux2dev") / "out"
    return export(ExportConfig(model=DEV, out=str(out))), out


def _prompt_states(out, prompts):
    from pladis.runtime import Runtime

    rt = Runtime(out, "ort")
    return rt.family.encode(rt.denoising, prompts, None, 32, 32, 4.0)["encoder_hidden_states"]


@pytest.mark.parametrize("which", ["klein", "dev"])
def test_prompt_states_match_the_pipelines_own_encoding(exported, exported_dev, which):
    # the engine's text side (the tokenizer's own chat template, special tokens as the pipeline adds them, the
    # hidden layers it reads) against the pipeline's encode function on the eager model: an independent reference
    from diffusers import Flux2KleinPipeline, Flux2Pipeline

    name, (_, out) = (NAME, exported) if which == "klein" else (DEV, exported_dev)
    pipe = models.load(name)
    prompts = ["a red cube", "two cats on a mat"]
    with torch.no_grad():
        if which == "klein":
            want = Flux2KleinPipeline._get_qwen3_prompt_embeds(pipe.text_encoder, pipe.tokenizer, prompts)
        else:
            want = Flux2Pipeline._get_mistral_3_small_prompt_embeds(pipe.text_encoder, pipe.tokenizer, prompts)
    got = _prompt_states(out, prompts)
    assert got.shape == want.shape == (2, 512, 48)
    rel = (torch.linalg.norm(got - want) / torch.linalg.norm(want)).item()
    assert rel <= 1e-4, rel  # ORT fp32 vs eager fp32: the export contract; a wrong template or token is O(1)


@pytest.mark.parametrize("lam", [0.0, 3.0])
def test_dev_parity_through_the_loop(exported_dev, lam):
    # [dev] is guidance-distilled: the guidance input, no CFG batch
    from pladis.runtime import parity

    manifest, out = exported_dev
    assert "guidance" in {i["name"] for i in manifest["components"]["transformer"]["inputs"]}
    assert manifest["components"]["text_encoder"]["class"] == "Mistral3ForConditionalGeneration"
    report = parity.check(out, "ort", steps=3, lam=lam)
    assert report.ok, report.table()  # fp32: rel-L2 <= 1e-4 per teacher-forced step (parity.TOLERANCE)
    assert report.image_psnr_db > 40


@pytest.mark.parametrize("lam", [0.0, 3.0])
def test_parity_through_the_loop(exported, lam):
    family_checks.parity_through_the_loop(exported[1], lam)  # guidance 4 (the family's default): CFG, as klein


def test_one_export_serves_a_lam_per_sample(exported):
    family_checks.lam_per_sample(exported[1], [0.0, 1.0, 2.0, 3.0], ["a red cube", "a ball", "a cone", "a cup"])


def test_generate_and_parity_commands(exported, tmp_path, capsys):
    family_checks.generate_and_parity_commands(exported[1], tmp_path, capsys)


def test_layers_command_lists_the_double_stream_blocks(capsys):
    from pladis import cli

    assert cli.main(["layers", "--model", NAME]) == 0
    printed = capsys.readouterr().out
    assert "(flux2)" in printed and "2 layers" in printed and "transformer_blocks.1.attn" in printed
    assert "single_transformer_blocks" not in printed


def test_a_flux2_single_file_takes_the_flux2_layout_not_flux1s(tmp_path):
    # BFL's FLUX.2 files also carry FLUX.1's double_blocks key: the FLUX.2 layout must win
    from safetensors.torch import save_file

    from pladis import single_file

    keys = ["double_blocks.0.img_attn.norm.key_norm.scale", "single_stream_modulation.lin.weight"]
    for prefix in ("", "model.diffusion_model."):
        path = tmp_path / f"flux2{len(prefix)}.safetensors"
        save_file({prefix + k: torch.zeros(2) for k in keys}, str(path))
        shapes = set(single_file.checkpoint_shapes(path))
        layout = next(lay for lay in families.LAYOUTS if lay.matches(shapes))
        assert layout.name.startswith("FLUX.2") and layout in families.get("flux2").layouts
        with pytest.raises(single_file.CheckpointError, match="holds only a denoiser.*--config"):
            single_file.inspect(path)


def test_an_unknown_text_encoder_is_refused_by_name():
    from types import SimpleNamespace

    from pladis.errors import PladisError

    other = SimpleNamespace(text_encoder=torch.nn.Linear(1, 1))
    with pytest.raises(PladisError, match=r"FLUX.2 with a Linear text encoder.*Qwen3ForCausalLM and Mistral3"):
        families.get("flux2").text_encoders(other)


def test_a_transformer_lora_is_fused_as_peft_runs_it(tmp_path):
    family_checks.transformer_lora_fused_as_peft(NAME, tmp_path)  # through diffusers' Flux2KleinPipeline loader
