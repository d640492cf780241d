"""The sampling loop's family-dependent steps, each answered by the engine's family record.

The records (``pladis.families``) hold the hooks: ``encode`` turns prompts into the denoiser's constant
inputs, ``pack``/``unpack`` move latents between (B, C, h, w) and the denoiser's layout, ``noise`` picks the
noise prediction out of the output, ``set_timesteps`` sets the scheduler up. The formulas follow the
diffusers pipelines they mirror (StableDiffusion/XL, PixArt-alpha, StableDiffusion3, Flux).
"""

from __future__ import annotations

import torch

from pladis import families
from pladis.families import latent_hw as _latent_hw

SCHEDULER_TIMESTEPS = 1000.0  # diffusers schedulers' timesteps run over [0, 1000]


def family(rt) -> families.Family:
    """The record of the engine's family."""
    return families.get(rt.engine.family)


def encode(rt, prompts: list[str], negatives: list[str] | None, height: int, width: int, guidance: float) -> dict:
    """The denoiser's inputs that stay constant over the steps (CFG-batched when ``negatives`` is given)."""
    return family(rt).encode(rt, prompts, negatives, height, width, guidance)


def uses_cfg(family: str) -> bool:
    """Whether ``guidance > 1`` means classifier-free guidance (guidance-distilled models embed it instead)."""
    return not families.get(family).guidance_distilled


def latent_shape(rt, batch: int, height: int, width: int) -> tuple[int, ...]:
    """Shape of the initial noise (B, C, h, w), before any packing."""
    lh, lw = _latent_hw(rt, height, width)
    return (batch, rt.engine.manifest.vae.latent_channels, lh, lw)


def pack(rt, latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> the denoiser's latent layout (FLUX: 2x2-packed tokens; others unchanged)."""
    return family(rt).pack(latents)


def unpack(rt, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The denoiser's latent layout -> (B, C, h, w)."""
    return family(rt).unpack(latents, *_latent_hw(rt, height, width))


def step_inputs(rt, latents: torch.Tensor, t: torch.Tensor, cond: dict) -> dict[str, torch.Tensor]:
    """The denoiser's inputs for one step: latents (already CFG-doubled and scaled) and the timestep (n,)
    float32 on the denoiser's scale (FLUX takes t / 1000 and multiplies inside)."""
    fam, n = family(rt), latents.shape[0]
    timestep = t.float() / (SCHEDULER_TIMESTEPS / fam.timestep_scale)
    return {fam.sample_input: latents, "timestep": timestep.expand(n).clone(), **cond}


def noise_prediction(rt, out: torch.Tensor) -> torch.Tensor:
    """The denoiser output as the scheduler's model output (PixArt predicts [noise, variance]: keep noise)."""
    return family(rt).noise(out, rt.engine.manifest.vae.latent_channels)


def vae_input(rt, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Final latents -> the VAE decoder's input, by the family's VAE rule and the manifest's factors."""
    vae = rt.engine.manifest.vae
    return family(rt).vae_input(unpack(rt, latents, height, width), vae.scaling_factor, vae.shift_factor)


def set_timesteps(rt, scheduler, steps: int, height: int, width: int) -> None:
    """Set ``steps`` timesteps on ``scheduler`` as the family's pipeline does (FLUX: shift by image size)."""
    family(rt).set_timesteps(scheduler, steps, *_latent_hw(rt, height, width))
