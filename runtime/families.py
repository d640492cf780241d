"""What differs between model families in the sampling loop, as plain functions.

Each family turns prompts into the denoiser's constant inputs (``encode``), shapes the initial latents,
names the per-step inputs, and turns final latents into the VAE decoder's input. The formulas follow the
diffusers pipelines they mirror (StableDiffusion/XL, PixArt-alpha, StableDiffusion3, Flux).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def encode(rt, prompts: list[str], negatives: list[str] | None, height: int, width: int, guidance: float) -> dict:
    """The denoiser's inputs that stay constant over the steps (CFG-batched when ``negatives`` is given)."""
    family, b = rt.engine.family, len(prompts)
    if family == "unet" and "text_embeds" not in rt.input_names:  # SD 1.x/2.x
        return {"encoder_hidden_states": _both(lambda p: _clip(rt, "text_encoder", p)["last_hidden_state"],
                                               prompts, negatives)}  # fmt: skip
    if family == "unet":  # SDXL: penultimate states of both CLIPs, pooled from the second, size ids

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
    if family == "pixart":
        states, mask = _both(lambda p: _t5(rt, "text_encoder", p), prompts, negatives)
        cond = {"encoder_hidden_states": states, "encoder_attention_mask": mask}
        if "resolution" in rt.input_names:
            n = len(states)
            cond["resolution"] = torch.tensor([[height, width]], dtype=torch.float32).repeat(n, 1)
            cond["aspect_ratio"] = torch.tensor([[height / width]], dtype=torch.float32).repeat(n, 1)
        return cond
    if family == "sd3":

        def sd3(p):
            o1, o2 = _clip(rt, "text_encoder", p), _clip(rt, "text_encoder_2", p)
            t5, _ = _t5(rt, "text_encoder_3", p)
            clip = torch.cat([o1["penultimate_hidden_state"], o2["penultimate_hidden_state"]], -1)
            clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # as diffusers: pad (or cut) to T5's width
            return torch.cat([clip, t5], dim=-2), torch.cat([o1["text_embeds"], o2["text_embeds"]], -1)

        states, pooled = _both(sd3, prompts, negatives)
        return {"encoder_hidden_states": states, "pooled_projections": pooled}
    if family == "flux":  # guidance-distilled: one batch, guidance is an input of the model
        pooled = _clip(rt, "text_encoder", prompts)["pooler_output"]
        states, _ = _t5(rt, "text_encoder_2", prompts)
        lh, lw = _latent_hw(rt, height, width)
        cond = {"encoder_hidden_states": states, "pooled_projections": pooled,
                "txt_ids": torch.zeros(states.shape[1], 3), "img_ids": _flux_image_ids(lh // 2, lw // 2)}  # fmt: skip
        if "guidance" in rt.input_names:
            cond["guidance"] = torch.full((b,), float(guidance))
        return cond
    raise ValueError(f"no sampling loop for family {family!r}")


def uses_cfg(family: str) -> bool:
    """Whether ``guidance > 1`` means classifier-free guidance (FLUX embeds guidance instead)."""
    return family != "flux"


def _latent_hw(rt, height: int, width: int) -> tuple[int, int]:
    vae = rt.engine.manifest.vae.scale_factor
    return height // vae, width // vae


def latent_shape(rt, batch: int, height: int, width: int) -> tuple[int, ...]:
    """Shape of the initial noise, before FLUX's 2x2 packing."""
    lh, lw = _latent_hw(rt, height, width)
    return (batch, rt.engine.manifest.vae.latent_channels, lh, lw)


def pack(rt, latents: torch.Tensor) -> torch.Tensor:
    """FLUX: (B, C, H, W) -> (B, H/2 * W/2, 4C) tokens; other families unchanged."""
    if rt.engine.family != "flux":
        return latents
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(rt, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    if rt.engine.family != "flux":
        return latents
    lh, lw = _latent_hw(rt, height, width)
    b, _, d = latents.shape
    c = d // 4
    return latents.view(b, lh // 2, lw // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, lh, lw)


def _flux_image_ids(h: int, w: int) -> torch.Tensor:
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def step_inputs(rt, latents: torch.Tensor, t: torch.Tensor, cond: dict) -> dict[str, torch.Tensor]:
    """The denoiser's inputs for one step: latents (already CFG-doubled and scaled) and the timestep."""
    n = latents.shape[0]
    name = "sample" if rt.engine.family == "unet" else "hidden_states"
    scale = 1000.0 if rt.engine.family == "flux" else 1.0  # FLUX takes t / 1000 and multiplies inside
    return {name: latents, "timestep": (t.float() / scale).expand(n).clone(), **cond}


def noise_prediction(rt, out: torch.Tensor) -> torch.Tensor:
    """The denoiser output as the scheduler's model output (PixArt predicts [noise, variance]: keep noise)."""
    if rt.engine.family == "pixart" and out.shape[1] == 2 * rt.engine.manifest.vae.latent_channels:
        return out.chunk(2, dim=1)[0]
    return out


def vae_input(rt, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    vae = rt.engine.manifest.vae
    latents = unpack(rt, latents, height, width) / vae.scaling_factor
    return latents + vae.shift_factor if vae.shift_factor is not None else latents


def set_timesteps(rt, scheduler, steps: int, height: int, width: int) -> None:
    if rt.engine.family != "flux" or not getattr(scheduler.config, "use_dynamic_shifting", False):
        scheduler.set_timesteps(steps)
        return
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    lh, lw = _latent_hw(rt, height, width)
    c = scheduler.config
    mu = calculate_shift((lh // 2) * (lw // 2), c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    scheduler.set_timesteps(sigmas=[1.0 - i / steps for i in range(steps)], mu=mu)
