"""One record per model family: everything that differs between the denoisers PLADIS supports.

A ``Family`` says how to recognise the denoiser (its diffusers class), how ``pladis.patch`` patches it
(joint or cross-attention, the layers ``layers="default"`` leaves out), the export contract of its denoiser,
its text lengths and image size multiple, its timestep scale, whether it is guidance-distilled and
flow-matching, the VAE rule from final latents to the decoder's input, and the sampling loop's hooks. The
other modules look a family up (``get(name)``, ``of_model(model)``) and read the record; none of them names
a family (tests/test_families.py scans the source for that).

Adding a family: write its hooks here (at least ``contract`` and ``encode``; the defaults cover the rest),
add one ``Family`` to ``FAMILIES``, a tiny built-in model to ``pladis.models.BUILTINS`` and its cases to the
tests (tests/tiny_cases.py and the export, runtime and lam tests' model lists). Nothing else changes.

Runtime hooks take the runtime ``rt`` (``pladis.runtime.pipeline.Runtime``: ``rt.run``, ``rt.tokenizer``,
``rt.engine``, ``rt.input_names``); tensors are float32 on the CPU. Import cost: torch only; diffusers and
the export contract types are imported where used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------------------------------
# The record
# --------------------------------------------------------------------------------------------------


def _same(latents: torch.Tensor, *_) -> torch.Tensor:
    return latents


def _noise_as_is(out: torch.Tensor, latent_channels: int) -> torch.Tensor:
    return out


def _plain_timesteps(scheduler, steps: int, latent_h: int, latent_w: int) -> None:
    scheduler.set_timesteps(steps)


def _no_extra_dims(d: dict) -> dict:
    return {}


def vae_scale_factor(vae_config) -> int:
    """Pixels per latent unit a side of an ``AutoencoderKL`` config: 2 ** (down-sampling levels)."""
    return 2 ** (len(vae_config.block_out_channels) - 1)


def vae_latents(latents: torch.Tensor, scaling_factor: float, shift_factor: float | None) -> torch.Tensor:
    """Denoised latents (B, C, h, w) -> the VAE decoder's input: latents / scaling_factor (+ shift_factor)."""
    latents = latents / scaling_factor
    return latents + shift_factor if shift_factor is not None else latents


@dataclass(frozen=True, kw_only=True)
class Family:
    """How PLADIS, the export and the runtime handle one diffusers denoiser class."""

    name: str  # written to manifest.json ("model.family") and patch reports
    class_name: str  # diffusers class, looked up by name so missing ones (older diffusers) are skipped
    component: str  # the pipeline attribute holding the denoiser; also its exported file's name
    # patching
    joint: bool  # MMDiT joint attention over [text, image] (else dedicated cross-attention)
    text_first: bool = False  # joint sequence order: [text, image] (FLUX) or [image, text] (SD3)
    default_excludes: str | None = None  # regex on qualified names that layers="default" leaves out
    # export
    contract: Callable  # (name, denoiser module) -> the denoiser's pladis.export.contracts.Component
    text_length: int  # the denoiser's text tokens; joint models keep it static (the node's text_len)
    t5_length: int | None = None  # T5 tokens (the pipeline's default max_sequence_length); None: no T5
    denoiser_multiple: Callable[[nn.Module], int]  # the denoiser's own size factor, in latent units
    extra_dims: Callable[[dict], dict] = _no_extra_dims  # named dims beyond the shared ones, from those
    # sampling
    sample_input: str = "hidden_states"  # the denoiser input that takes the latents
    timestep_scale: float = 1000.0  # the denoiser's timestep runs over [0, timestep_scale] (schedulers: 1000)
    guidance_distilled: bool = False  # guidance is a model input: one batch, no classifier-free guidance
    flow_matching: bool = False  # takes the flow-matching schedulers only (else only the others)
    default_guidance: float
    encode: Callable  # (rt, prompts, negatives, height, width, guidance) -> {input: tensor}, constant per step
    pack: Callable[[torch.Tensor], torch.Tensor] = _same  # (B, C, h, w) latents -> the denoiser's layout
    unpack: Callable[[torch.Tensor, int, int], torch.Tensor] = _same  # (packed, h, w) -> (B, C, h, w)
    noise: Callable[[torch.Tensor, int], torch.Tensor] = _noise_as_is  # (output, latent channels) -> noise
    set_timesteps: Callable[..., None] = _plain_timesteps  # (scheduler, steps, latent h, latent w)
    # the VAE
    vae_scale: Callable[..., int] = vae_scale_factor  # (VAE config) -> pixels per latent unit a side
    vae_input: Callable = vae_latents  # (latents, scaling_factor, shift_factor) -> VAE decoder input


# --------------------------------------------------------------------------------------------------
# Shared runtime helpers
# --------------------------------------------------------------------------------------------------


def latent_hw(rt, height: int, width: int) -> tuple[int, int]:
    """Latent height and width of an image of ``height`` x ``width`` pixels."""
    vae = rt.engine.manifest.vae.scale_factor
    return height // vae, width // vae


def _clip(rt, encoder: str, prompts: list[str]) -> dict[str, torch.Tensor]:
    tok = rt.tokenizer(encoder)
    ids = tok(prompts, padding="max_length", max_length=rt.engine.dim("clip_text")[1], truncation=True,
              return_tensors="pt").input_ids  # fmt: skip
    return rt.run(encoder, {"input_ids": ids})


def _t5(rt, encoder: str, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    tok = rt.tokenizer(encoder)
    enc = tok(prompts, padding="max_length", max_length=rt.engine.dim("t5_text")[1], truncation=True,
              return_tensors="pt")  # fmt: skip
    return rt.run(encoder, {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask})[
        "last_hidden_state"
    ], enc.attention_mask


def _both(fn, prompts: list[str], negatives: list[str] | None):
    """fn over [negatives, prompts] (CFG order: unconditional first), or over prompts alone."""
    return fn(prompts) if negatives is None else fn(negatives + prompts)


# --------------------------------------------------------------------------------------------------
# U-Net (SD 1.x/2.x, SDXL and its distilled variants)
# --------------------------------------------------------------------------------------------------


def _unet_contract(name: str, unet):
    from pladis.export.contracts import Component, Port

    cfg = unet.config
    inputs = [
        Port("sample", ("cfg_batch", cfg.in_channels, "latent_height", "latent_width")),
        Port("timestep", ("cfg_batch",), "float32", "timestep"),
        Port("encoder_hidden_states", ("cfg_batch", "text", cfg.cross_attention_dim)),
    ]
    sdxl = cfg.addition_embed_type == "text_time"
    if sdxl:
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        inputs += [
            Port("text_embeds", ("cfg_batch", pooled)),
            Port("time_ids", ("cfg_batch", 6), sample="positions"),
        ]

    def fwd(m, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
        added = {"text_embeds": text_embeds, "time_ids": time_ids} if sdxl else None
        return (m(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0],)

    out = Port("out_sample", ("cfg_batch", cfg.out_channels, "latent_height", "latent_width"))
    return Component(name, unet, inputs, [out], fwd, denoiser=True)


def _unet_encode(rt, prompts, negatives, height, width, guidance) -> dict:
    """SD 1.x/2.x: the CLIP's last states. SDXL: both CLIPs' penultimate states, the second's pooled
    embedding and the size ids (B, 6)."""
    if "text_embeds" not in rt.input_names:  # SD 1.x/2.x
        return {"encoder_hidden_states": _both(lambda p: _clip(rt, "text_encoder", p)["last_hidden_state"],
                                               prompts, negatives)}  # fmt: skip

    def sdxl(p):
        o1, o2 = _clip(rt, "text_encoder", p), _clip(rt, "text_encoder_2", p)
        return torch.cat([o1["penultimate_hidden_state"], o2["penultimate_hidden_state"]], -1), o2["text_embeds"]

    states, pooled = sdxl(prompts)
    if negatives is not None:
        if all(not n for n in negatives):  # SDXL's force_zeros_for_empty_prompt
            neg_states, neg_pooled = torch.zeros_like(states), torch.zeros_like(pooled)
        else:
            neg_states, neg_pooled = sdxl(negatives)
        states, pooled = torch.cat([neg_states, states]), torch.cat([neg_pooled, pooled])
    ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).repeat(len(states), 1)
    return {"encoder_hidden_states": states, "text_embeds": pooled, "time_ids": ids}


# --------------------------------------------------------------------------------------------------
# PixArt
# --------------------------------------------------------------------------------------------------


def _pixart_contract(name: str, tr):
    from pladis.export.contracts import Component, Port

    cfg = tr.config
    inputs = [
        Port("hidden_states", ("cfg_batch", cfg.in_channels, "latent_height", "latent_width")),
        Port("encoder_hidden_states", ("cfg_batch", "text", cfg.caption_channels)),
        Port("encoder_attention_mask", ("cfg_batch", "text"), "int64", "mask"),
        Port("timestep", ("cfg_batch",), "float32", "timestep"),
    ]
    extra = cfg.sample_size == 128  # PixArt-alpha 1024 conditions on resolution and aspect ratio
    if extra:
        inputs += [Port("resolution", ("cfg_batch", 2), sample="positions"),
                   Port("aspect_ratio", ("cfg_batch", 1), sample="positions")]  # fmt: skip

    def fwd(
        m, hidden_states, encoder_hidden_states, encoder_attention_mask, timestep, resolution=None, aspect_ratio=None
    ):
        added = {"resolution": resolution, "aspect_ratio": aspect_ratio}
        return (m(hidden_states, encoder_hidden_states, timestep=timestep, added_cond_kwargs=added,
                  encoder_attention_mask=encoder_attention_mask, return_dict=False)[0],)  # fmt: skip

    out = Port("out_hidden_states", ("cfg_batch", cfg.out_channels, "latent_height", "latent_width"))
    return Component(name, tr, inputs, [out], fwd, denoiser=True)


def _pixart_encode(rt, prompts, negatives, height, width, guidance) -> dict:
    """T5 states and their padding mask (B, L) int64; PixArt-alpha 1024 also resolution and aspect ratio."""
    states, mask = _both(lambda p: _t5(rt, "text_encoder", p), prompts, negatives)
    cond = {"encoder_hidden_states": states, "encoder_attention_mask": mask}
    if "resolution" in rt.input_names:
        n = len(states)
        cond["resolution"] = torch.tensor([[height, width]], dtype=torch.float32).repeat(n, 1)
        cond["aspect_ratio"] = torch.tensor([[height / width]], dtype=torch.float32).repeat(n, 1)
    return cond


def _pixart_noise(out: torch.Tensor, latent_channels: int) -> torch.Tensor:
    """PixArt predicts [noise, variance] along channels: keep the noise."""
    return out.chunk(2, dim=1)[0] if out.shape[1] == 2 * latent_channels else out


# --------------------------------------------------------------------------------------------------
# SD3 (MMDiT, [image, text])
# --------------------------------------------------------------------------------------------------


def _sd3_contract(name: str, tr):
    from pladis.export.contracts import Component, Port

    cfg = tr.config
    inputs = [
        Port("hidden_states", ("cfg_batch", cfg.in_channels, "latent_height", "latent_width")),
        Port("encoder_hidden_states", ("cfg_batch", "text", cfg.joint_attention_dim)),
        Port("pooled_projections", ("cfg_batch", cfg.pooled_projection_dim)),
        Port("timestep", ("cfg_batch",), "float32", "timestep"),
    ]

    def fwd(m, hidden_states, encoder_hidden_states, pooled_projections, timestep):
        return (m(hidden_states, encoder_hidden_states, pooled_projections, timestep, return_dict=False)[0],)

    out = Port("out_hidden_states", ("cfg_batch", cfg.out_channels, "latent_height", "latent_width"))
    return Component(name, tr, inputs, [out], fwd, denoiser=True)


def _sd3_encode(rt, prompts, negatives, height, width, guidance) -> dict:
    """Both CLIPs' penultimate states padded to T5's width, then T5's states along the sequence; the
    pooled embeddings of both CLIPs concatenated."""

    def sd3(p):
        o1, o2 = _clip(rt, "text_encoder", p), _clip(rt, "text_encoder_2", p)
        t5, _ = _t5(rt, "text_encoder_3", p)
        clip = torch.cat([o1["penultimate_hidden_state"], o2["penultimate_hidden_state"]], -1)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # as diffusers: pad (or cut) to T5's width
        return torch.cat([clip, t5], dim=-2), torch.cat([o1["text_embeds"], o2["text_embeds"]], -1)

    states, pooled = _both(sd3, prompts, negatives)
    return {"encoder_hidden_states": states, "pooled_projections": pooled}


# --------------------------------------------------------------------------------------------------
# FLUX (MMDiT, [text, image], 2x2-packed latents, guidance-distilled)
# --------------------------------------------------------------------------------------------------


def _flux_contract(name: str, tr):
    from pladis.export.contracts import Component, Port

    cfg = tr.config
    inputs = [
        Port("hidden_states", ("cfg_batch", "image_tokens", cfg.in_channels)),
        Port("encoder_hidden_states", ("cfg_batch", "text", cfg.joint_attention_dim)),
        Port("pooled_projections", ("cfg_batch", cfg.pooled_projection_dim)),
        Port("timestep", ("cfg_batch",), "float32", "timestep"),
        Port("img_ids", ("image_tokens", 3), "float32", "positions"),
        Port("txt_ids", ("text", 3), "float32", "positions"),
    ]
    if cfg.guidance_embeds:
        inputs.append(Port("guidance", ("cfg_batch",), "float32", "guidance"))

    def fwd(m, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance=None):
        return (m(hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance,
                  return_dict=False)[0],)  # fmt: skip

    out = Port("out_hidden_states", ("cfg_batch", "image_tokens", cfg.in_channels))
    return Component(name, tr, inputs, [out], fwd, denoiser=True)


def _flux_dims(d: dict) -> dict:
    """image_tokens: one token per 2x2 latent patch."""
    tokens = zip(d["latent_height"], d["latent_width"], strict=True)
    return {"image_tokens": tuple((h // 2) * (w // 2) for h, w in tokens)}


def _flux_image_ids(h: int, w: int) -> torch.Tensor:
    """(h*w, 3) float32 position ids of the packed image tokens: (0, row, column)."""
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def _flux_encode(rt, prompts, negatives, height, width, guidance) -> dict:
    """One batch (no CFG): CLIP pooled output, T5 states, position ids, and the guidance input (B,)."""
    pooled = _clip(rt, "text_encoder", prompts)["pooler_output"]
    states, _ = _t5(rt, "text_encoder_2", prompts)
    lh, lw = latent_hw(rt, height, width)
    cond = {"encoder_hidden_states": states, "pooled_projections": pooled,
            "txt_ids": torch.zeros(states.shape[1], 3), "img_ids": _flux_image_ids(lh // 2, lw // 2)}  # fmt: skip
    if "guidance" in rt.input_names:
        cond["guidance"] = torch.full((len(prompts),), float(guidance))
    return cond


def _flux_pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C) tokens."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def _flux_unpack(latents: torch.Tensor, lh: int, lw: int) -> torch.Tensor:
    """(B, lh/2 * lw/2, 4C) tokens -> (B, C, lh, lw)."""
    b, _, d = latents.shape
    c = d // 4
    return latents.view(b, lh // 2, lw // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, lh, lw)


def _flux_timesteps(scheduler, steps: int, lh: int, lw: int) -> None:
    """With dynamic shifting, the shift follows the image's token count (as FluxPipeline)."""
    if not getattr(scheduler.config, "use_dynamic_shifting", False):
        scheduler.set_timesteps(steps)
        return
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    c = scheduler.config
    mu = calculate_shift((lh // 2) * (lw // 2), c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    scheduler.set_timesteps(sigmas=[1.0 - i / steps for i in range(steps)], mu=mu)


# --------------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------------

CLIP_LENGTH = 77  # CLIP's absolute position embeddings: always padded to 77

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            name="unet", class_name="UNet2DConditionModel", component="unet", joint=False,
            default_excludes=r"^mid_block\.", contract=_unet_contract, text_length=CLIP_LENGTH,
            denoiser_multiple=lambda m: 2 ** (len(m.config.block_out_channels) - 1), sample_input="sample",
            default_guidance=7.5, encode=_unet_encode,
        ),
        Family(
            name="pixart", class_name="PixArtTransformer2DModel", component="transformer", joint=False,
            contract=_pixart_contract, text_length=120, t5_length=120, denoiser_multiple=lambda m: 2,  # 2x2 patches
            default_guidance=4.5, encode=_pixart_encode, noise=_pixart_noise,
        ),
        Family(
            name="sd3", class_name="SD3Transformer2DModel", component="transformer", joint=True, text_first=False,
            contract=_sd3_contract, text_length=CLIP_LENGTH + 256, t5_length=256, denoiser_multiple=lambda m: 1,
            flow_matching=True, default_guidance=7.0, encode=_sd3_encode,
        ),
        Family(
            name="flux", class_name="FluxTransformer2DModel", component="transformer", joint=True, text_first=True,
            contract=_flux_contract, text_length=512, t5_length=512, denoiser_multiple=lambda m: 2,  # 2x2 packing
            extra_dims=_flux_dims, timestep_scale=1.0, guidance_distilled=True, flow_matching=True,
            default_guidance=3.5, encode=_flux_encode, pack=_flux_pack, unpack=_flux_unpack,
            set_timesteps=_flux_timesteps,
        ),
    )
}  # fmt: skip

# Denoisers diffusers has that PLADIS deliberately does not take, with the reason given to the user.
UNSUPPORTED = {
    "SanaTransformer2DModel": "SANA needs a Gemma text encoder and a DC-AE VAE, which have no export contract "
    "or sampling loop here",
}


def supported() -> str:
    """'name (DiffusersClass), ...' of every family, for error messages."""
    return ", ".join(f"{f.name} ({f.class_name})" for f in FAMILIES.values())


def supported_models() -> list[str]:
    """Names of the diffusers model classes PLADIS patches."""
    return [f.class_name for f in FAMILIES.values()]


def get(name: str) -> Family:
    """The family called ``name`` (as written in a manifest), or a ValueError naming the supported ones."""
    try:
        return FAMILIES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model family {name!r}; supported families: {supported()}") from None


def of_model(model: nn.Module) -> Family:
    """The family of a diffusers denoiser, or a ValueError naming its class and the supported families."""
    import diffusers

    for fam in FAMILIES.values():
        cls = getattr(diffusers, fam.class_name, None)
        if cls is not None and isinstance(model, cls):
            return fam
    name = type(model).__name__
    why = f" ({UNSUPPORTED[name]})" if name in UNSUPPORTED else ""
    raise ValueError(f"PLADIS does not support {name}{why}; supported families: {supported()}")


def denoiser_components() -> tuple[str, ...]:
    """The pipeline attributes a denoiser may sit in, in registry order without repeats."""
    return tuple(dict.fromkeys(f.component for f in FAMILIES.values()))
