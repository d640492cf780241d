"""FLUX family: FLUX.1 (MMDiT joint attention over [text, image], 2x2-packed latents, guidance-distilled)."""

from __future__ import annotations

import torch

from pladis.contracts import Component, Port
from pladis.families.record import LDM, Denoising, Family, Layout, clip, t5

COMPONENT = "transformer"


def contract(name: str, tr) -> Component:
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


def dims(d: dict) -> dict:
    """image_tokens: one token per 2x2 latent patch."""
    tokens = zip(d["latent_height"], d["latent_width"], strict=True)
    return {"image_tokens": tuple((h // 2) * (w // 2) for h, w in tokens)}


def image_ids(h: int, w: int) -> torch.Tensor:
    """(h*w, 3) float32 position ids of the packed image tokens: (0, row, column)."""
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def encode(d: Denoising, prompts, negatives, height, width, guidance) -> dict:
    """One batch (no CFG): CLIP pooled output, T5 states, position ids, and the guidance input (B,)."""
    pooled = clip(d, "text_encoder", prompts)["pooler_output"]
    states, _ = t5(d, "text_encoder_2", prompts)
    lh, lw = d.latent_hw(height, width)
    cond = {"encoder_hidden_states": states, "pooled_projections": pooled,
            "txt_ids": torch.zeros(states.shape[1], 3), "img_ids": image_ids(lh // 2, lw // 2)}  # fmt: skip
    if "guidance" in d.input_names:
        cond["guidance"] = torch.full((len(prompts),), float(guidance))
    return cond


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C) tokens."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(latents: torch.Tensor, lh: int, lw: int) -> torch.Tensor:
    """(B, lh/2 * lw/2, 4C) tokens -> (B, C, lh, lw)."""
    b, _, d = latents.shape
    c = d // 4
    return latents.view(b, lh // 2, lw // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, lh, lw)


def set_timesteps(scheduler, steps: int, lh: int, lw: int) -> None:
    """With dynamic shifting, the shift follows the image's token count (as FluxPipeline)."""
    if not getattr(scheduler.config, "use_dynamic_shifting", False):
        scheduler.set_timesteps(steps)
        return
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    c = scheduler.config
    mu = calculate_shift((lh // 2) * (lw // 2), c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    scheduler.set_timesteps(sigmas=[1.0 - i / steps for i in range(steps)], mu=mu)


LAYOUTS = (
    Layout("FLUX.1 (model.diffusion_model.double_blocks.*)",
           (LDM + "double_blocks.0.img_attn.norm.key_norm.scale",), None, COMPONENT),
    Layout("FLUX.1 (double_blocks.*)", ("double_blocks.0.img_attn.norm.key_norm.scale",), None, COMPONENT),
)  # fmt: skip

FAMILY = Family(
    name="flux", class_name="FluxTransformer2DModel", component=COMPONENT, joint=True, text_first=True,
    contract=contract, text_length=512, t5_length=512, denoiser_multiple=lambda m: 2,  # 2x2 packing
    extra_dims=dims, layouts=LAYOUTS, timestep_scale=1.0, guidance_distilled=True, flow_matching=True,
    default_guidance=3.5, encode=encode, pack=pack, unpack=unpack, set_timesteps=set_timesteps,
)  # fmt: skip
