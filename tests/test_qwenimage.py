"""Qwen-Image (``tiny-qwenimage``): its record against QwenImagePipeline's own code, the exported denoiser's
rotary-from-position-ids against the model's own rotary, export against eager, and the runtime through parity
and against the diffusers pipeline itself."""

import family_checks
import pytest
import torch

import pladis
from pladis import families, models

NAME = "tiny-qwenimage"


def qwen():
    from pladis.families import qwenimage

    return qwenimage


# Patched vs stock (lam = 0 and remove bitwise; lam = 2 against diffusers' own QwenDoubleStreamAttnProcessor2_0
# with its SDPA call answered by the float64 formula, text mask and rotary included; text-query rows untouched)
# run in tests/test_patch.py: tiny-qwenimage is one of tiny_cases.FAMILY_CASES.


def test_every_block_is_patched(capsys):
    from pladis import cli

    assert cli.main(["layers", "--model", NAME]) == 0
    printed = capsys.readouterr().out
    assert "(qwenimage)" in printed and "2 layers" in printed
    assert "transformer_blocks.0.attn" in printed and "transformer_blocks.1.attn" in printed


# --------------------------------------------------------------------------------------------------
# The record's hooks against QwenImagePipeline's own code (an independent reference)
# --------------------------------------------------------------------------------------------------


def test_hooks_match_the_pipeline_helpers():
    from diffusers import QwenImagePipeline as P

    pipe = models.load(NAME, device="meta")
    assert qwen().TEMPLATE == pipe.prompt_template_encode
    assert qwen().TEMPLATE_DROP == pipe.prompt_template_encode_start_idx
    assert qwen().vae_scale(pipe.vae.config) == pipe.vae_scale_factor
    fam = families.get("qwenimage")
    noise = torch.randn(fam.noise_shape(2, 4, 12, 16), generator=torch.Generator().manual_seed(0))
    packed = fam.pack(noise)
    assert torch.equal(packed, P._pack_latents(noise, 2, 4, 12, 16))  # pure index moves: bitwise
    assert torch.equal(fam.unpack(packed, 12, 16), P._unpack_latents(packed, 12 * 2, 16 * 2, 2)[:, :, 0])


@pytest.mark.parametrize("h, w", [(6, 8), (5, 3)])
def test_position_ids_give_the_models_own_rotary(h, w):
    # QwenEmbedRope builds complex tables from the patch grid and the text length; the export's ids give the
    # same angles: cos/sin of the same float32 products (torch.polar vs cos/sin: one float32 rounding)
    tr = models.load(NAME).transformer
    img, txt = tr.pos_embed([(1, h, w)], max_txt_seq_len=7, device=torch.device("cpu"))
    axes = tuple(tr.config.axes_dims_rope)
    for freqs, ids in ((img, qwen().image_ids(h, w)), (txt, qwen().text_ids(7, h, w))):
        cos, sin = qwen().rotary(ids, axes)
        torch.testing.assert_close(cos, freqs.real, rtol=0, atol=1e-7)
        torch.testing.assert_close(sin, freqs.imag, rtol=0, atol=1e-7)


@pytest.mark.parametrize("lam", [0.0, 2.0])
def test_the_exported_forward_is_the_models_own(lam):
    # the contract's forward (position ids in, real-number rotary, Processor on every layer) against the stock
    # model's own forward (img_shapes in, complex rotary; at lam 2 the PLADIS processors' complex branch)
    from tiny_cases import denoiser_case, forward

    tr, kwargs = denoiser_case(NAME)
    pladis.apply(tr, lam=lam)
    try:
        expected = forward(tr, kwargs)
        comp = qwen().contract("transformer", tr)
        with torch.no_grad():
            got = comp.forward(tr, hidden_states=kwargs["hidden_states"],
                               encoder_hidden_states=kwargs["encoder_hidden_states"],
                               encoder_hidden_states_mask=kwargs["encoder_hidden_states_mask"],
                               timestep=kwargs["timestep"], img_ids=qwen().image_ids(6, 6),
                               txt_ids=qwen().text_ids(12, 6, 6))[0]  # fmt: skip
    finally:
        pladis.remove(tr)
    # cos/sin vs polar (1e-7) and real vs complex multiplication order: float32 rounding through two blocks
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert all(type(m.processor).__name__ == "QwenDoubleStreamAttnProcessor2_0" for m in tr.modules()
               if hasattr(m, "set_processor"))  # fmt: skip


def test_prompt_embeds_are_the_pipelines():
    pipe = models.load(NAME)
    prompts = ["a red cube on a table", "x"]
    ref, ref_mask = pipe._get_qwen_prompt_embeds(prompts, device="cpu")  # padded to the longest, not the engine's
    tok = pipe.tokenizer([qwen().TEMPLATE.format(p) for p in prompts], padding="max_length", truncation=True,
                         max_length=qwen().TEXT_LENGTH + qwen().TEMPLATE_DROP, return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        comp = qwen().text_encoders(pipe)[0]
        hidden = comp.forward(comp.module, tok.input_ids, tok.attention_mask)[0]
    emb, mask = qwen().prompt_embeds(hidden, tok.attention_mask)
    n = ref.shape[1]
    assert torch.equal(mask[:, :n], ref_mask) and not mask[:, n:].any()
    # real tokens: the same causal LM on the same tokens, its padding (after them) masked: float32 rounding
    torch.testing.assert_close(emb[:, :n], ref, rtol=1e-5, atol=1e-6)
    assert not emb[:, n:].any()


def test_timesteps_follow_the_pipeline():
    import numpy as np
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift, retrieve_timesteps

    pipe = models.load(NAME)
    ours = pipe.scheduler.from_config(pipe.scheduler.config)
    families.get("qwenimage").set_timesteps(ours, 3, 16, 16)
    ref = pipe.scheduler.from_config(pipe.scheduler.config)
    c = ref.config
    mu = calculate_shift(64, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    retrieve_timesteps(ref, 3, "cpu", sigmas=np.linspace(1.0, 1 / 3, 3), mu=mu)
    assert torch.equal(ours.timesteps, ref.timesteps) and torch.equal(ours.sigmas, ref.sigmas)


def test_the_single_head_vae_attention_is_the_stock_one():
    pipe = models.load(NAME)
    z = torch.randn(2, 4, 1, 6, 10, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        stock = pipe.vae.decode(z).sample
        with qwen().exportable_vae(pipe.vae):
            ours = pipe.vae.decode(z).sample
    assert torch.equal(ours, stock)  # the same ops on the same tensor: bitwise


def test_edit_variants_are_refused_by_name():
    from types import SimpleNamespace

    from pladis.errors import PladisError

    tr = SimpleNamespace(config=SimpleNamespace(zero_cond_t=True, axes_dims_rope=(4, 6, 6)))
    with pytest.raises(PladisError, match=r"zero_cond_t=True \(an edit or layered variant\)"):
        qwen().contract("transformer", tr)


# --------------------------------------------------------------------------------------------------
# Export and runtime, from one export
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from pladis.export import ExportConfig, export

    out = tmp_path_factory.mktemp("qwenimage") / "out"
    return export(ExportConfig(model=NAME, out=str(out))), out


def test_every_component_matches_eager_at_another_size(exported):
    run_at = dict(batch=3, cfg_batch=3, latent_height=24, latent_width=16)  # export: batch 1, 16 x 16 latents
    run_at.update(image_tokens=12 * 8, height=48, width=32)
    family_checks.components_match_eager(*exported, NAME, "qwenimage", run_at)
    assert exported[0]["vae"]["latent_channels"] == 4 and exported[0]["vae"]["scale_factor"] == 2


@pytest.mark.parametrize("lam", [0.0, 3.0])
def test_parity_through_the_loop(exported, lam):
    family_checks.parity_through_the_loop(exported[1], lam)  # guidance 4 (the family's default): true CFG


def test_the_engine_runs_the_diffusers_pipeline(exported):
    # the whole loop (template, masks, rotary ids, shifted sigmas, true CFG with its norm rule, packing, VAE
    # normalisation) against QwenImagePipeline itself, both PLADIS-patched at lam 2, same seed
    import numpy as np

    from pladis.runtime import Runtime

    _, out = exported
    got = Runtime(out).generate("a red cube", negative_prompt="", steps=3, lam=2.0, guidance=4.0, seed=5)
    pipe = models.load(NAME)
    pladis.apply(pipe, lam=2.0)
    kw = dict(prompt="a red cube", negative_prompt="", true_cfg_scale=4.0, num_inference_steps=3, height=32,
              width=32)  # fmt: skip
    with torch.no_grad():
        latents = pipe(**kw, generator=torch.Generator().manual_seed(5), output_type="latent").images
        image = pipe(**kw, generator=torch.Generator().manual_seed(5), output_type="np").images[0]
    rel = (got.latents - latents).norm() / latents.norm()
    # one CFG batch padded to 512 masked text tokens vs two unpadded calls, and ORT vs eager: float32 rounding
    assert rel < 1e-4, f"rel-L2 {rel:.3g}"
    ours = np.asarray(got.images[0], dtype=np.float64) / 255
    assert np.abs(ours - image).max() <= 1 / 255 + 1e-3  # uint8 rounding of the same image
    stock = Runtime(out).generate("a red cube", negative_prompt="", steps=3, lam=0.0, guidance=4.0, seed=5)
    assert (stock.latents - latents).norm() / latents.norm() > 1e-3  # the comparison sees PLADIS at all


def test_one_export_serves_a_lam_per_sample(exported):
    family_checks.lam_per_sample(exported[1], [0.0, 1.0, 3.0], ["a red cube", "a ball", "a cone"])


def test_generate_and_parity_commands(exported, tmp_path, capsys):
    family_checks.generate_and_parity_commands(exported[1], tmp_path, capsys)


def test_one_step_is_refused_naming_steps_not_a_traceback(exported, tmp_path, capsys):
    # Qwen-Image's scheduler config stretches sigmas to shift_terminal 0.02: at one step that is 0/0, and the
    # NaN timestep ended in an IndexError inside diffusers' scheduler (a "bug in pladis" traceback)
    from pladis import cli

    for argv in (["generate", "--out", str(tmp_path / "one.png")], ["parity", "--json", str(tmp_path / "p.json")]):
        assert cli.main([*argv, "--engine", str(exported[1]), "--steps", "1"]) == 2
        err = capsys.readouterr().err.strip()
        assert "Traceback" not in err and "\n" not in err, err
        assert "step(s) give this engine's FlowMatchEulerDiscreteScheduler no valid timesteps" in err
        assert "shift_terminal" in err and "use more steps" in err
    assert not list(tmp_path.iterdir())  # refused before anything is written
    from pladis.errors import SettingError
    from pladis.runtime import Runtime

    with pytest.raises(SettingError, match="no valid timesteps") as err:  # what the server answers with a 400
        Runtime(exported[1]).settings("a cat", steps=1)
    assert err.value.field == "steps"


# --------------------------------------------------------------------------------------------------
# Single files and LoRAs, through diffusers' own loaders
# --------------------------------------------------------------------------------------------------


def test_a_transformer_single_file_loads_with_its_config_folder(tmp_path):
    from safetensors.torch import save_file

    from pladis import single_file, sources

    pipe = models.load(NAME)
    pipe.save_pretrained(tmp_path / "base")
    path = tmp_path / "qwen_image.safetensors"
    save_file(pipe.transformer.state_dict(), str(path))
    with pytest.raises(single_file.CheckpointError, match="holds only a denoiser.*--config"):
        single_file.inspect(path)
    src = sources.resolve(str(path), str(tmp_path / "base"))
    assert src.layout in families.get("qwenimage").layouts and src.denoiser_only
    got = sources.load(src)
    assert type(got).__name__ == "QwenImagePipeline"
    a, b = got.transformer.state_dict(), pipe.transformer.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)  # copies: bitwise


def test_a_transformer_lora_is_fused_as_peft_runs_it(tmp_path):
    family_checks.transformer_lora_fused_as_peft(NAME, tmp_path)  # through diffusers' QwenImagePipeline loader


def test_another_prompt_template_is_refused_by_name():
    # QwenImageEditPipeline (and the like) template their prompts otherwise: the t2i contract would misread them
    from types import SimpleNamespace

    from pladis.errors import PladisError

    edit = SimpleNamespace(prompt_template_encode="{}", prompt_template_encode_start_idx=64, text_encoder=None)
    with pytest.raises(PladisError, match=r"another template \(it drops 64 tokens\).*export a QwenImagePipeline"):
        qwen().text_encoders(edit)
