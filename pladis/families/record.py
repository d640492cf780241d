"""The family record, the narrow view its runtime hooks read, a single-file layout, and the shared helpers.

A ``Family`` says how to recognise a denoiser (its diffusers class), how ``pladis.patch`` patches it, the export
contract of its denoiser (in ``pladis.contracts``' words), its text lengths and size rule, its timestep scale,
the single-file checkpoint layouts it is released in, and the sampling loop's hooks. The runtime hooks read a
``Denoising`` (a text side that tokenizes and encodes, the engine's denoiser input names, the VAE's factors),
never the runtime itself; tensors are float32 on the CPU. Import cost: torch only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

CLIP_LENGTH = 77  # CLIP's absolute position embeddings: always padded to 77
SCHEDULER_TIMESTEPS = 1000.0  # diffusers schedulers' timesteps run over [0, 1000]
LDM = "model.diffusion_model."  # the denoiser's key prefix in original (LDM/SGM) checkpoints


# --------------------------------------------------------------------------------------------------
# What the runtime hooks read
# --------------------------------------------------------------------------------------------------

# (encoder, prompts, special_tokens=True) -> the encoder's outputs by name for the prompts tokenized to the
# engine's text length (``special_tokens`` False: the tokenizer adds none, as a chat template tokenized by
# ``apply_chat_template`` gets), plus the ``attention_mask`` it was given when it takes one (T5)
TextSide = Callable[..., dict[str, torch.Tensor]]
# (encoder, conversation, **template options) -> the conversation rendered by that encoder's tokenizer's own chat
# template (``apply_chat_template(..., tokenize=False)``)
ChatSide = Callable[..., str]


@dataclass(frozen=True)
class Denoising:
    """The part of an engine a family's runtime hooks may read."""

    text: TextSide
    input_names: frozenset[str]  # the denoiser's input names
    vae_scale: int  # pixels per latent unit a side
    latent_channels: int
    scaling_factor: float  # the VAE's latent scaling
    shift_factor: float | None = None
    pipeline: str = ""  # the diffusers pipeline class the engine was exported from
    chat: ChatSide | None = None

    def latent_hw(self, height: int, width: int) -> tuple[int, int]:
        """Latent height and width of an image of ``height`` x ``width`` pixels."""
        return height // self.vae_scale, width // self.vae_scale


# --------------------------------------------------------------------------------------------------
# Single-file checkpoint layouts
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """A single-file checkpoint layout: keys that identify it and the pipeline it belongs to."""

    name: str
    keys: tuple[str, ...]  # all of these must be present
    pipeline: str | None  # None: a denoiser-only file; the pipeline comes from the config folder
    denoiser: str  # the pipeline component the file's denoiser weights load into
    builtins: tuple[str, ...] = ()  # built-in configs to try when no --config is given
    any_prefix: str = ""  # and one key must start with this
    # diffusers' checkpoint types of this layout (infer_diffusers_model_type); the first is the default
    model_types: tuple[str, ...] = ()

    def matches(self, keys: set[str]) -> bool:
        ok = all(k in keys for k in self.keys)
        return ok and (not self.any_prefix or any(k.startswith(self.any_prefix) for k in keys))


# --------------------------------------------------------------------------------------------------
# Defaults of the record's hooks
# --------------------------------------------------------------------------------------------------


def _same(latents: torch.Tensor, *_) -> torch.Tensor:
    return latents


def _noise_as_is(out: torch.Tensor, latent_channels: int) -> torch.Tensor:
    return out


def _plain_timesteps(scheduler, steps: int, latent_h: int, latent_w: int) -> None:
    scheduler.set_timesteps(steps)


def _no_extra_dims(d: dict) -> dict:
    return {}


def _noise_shape(batch: int, channels: int, latent_h: int, latent_w: int) -> tuple[int, ...]:
    return (batch, channels, latent_h, latent_w)


def _plain_cfg(uncond: torch.Tensor, text: torch.Tensor, guidance: float) -> torch.Tensor:
    return uncond + guidance * (text - uncond)


def _latent_channels(vae_config) -> int:
    return vae_config.latent_channels


def vae_scale_factor(vae_config) -> int:
    """Pixels per latent unit a side of an ``AutoencoderKL`` config: 2 ** (down-sampling levels)."""
    return 2 ** (len(vae_config.block_out_channels) - 1)


def vae_latents(latents: torch.Tensor, scaling_factor: float, shift_factor: float | None) -> torch.Tensor:
    """Denoised latents (B, C, h, w) -> the VAE decoder's input: latents / scaling_factor (+ shift_factor)."""
    latents = latents / scaling_factor
    return latents + shift_factor if shift_factor is not None else latents


# --------------------------------------------------------------------------------------------------
# The record
# --------------------------------------------------------------------------------------------------


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
    # (x (B, L, H, D), freqs) -> x rotated, for joint attention that rotates its text and image streams apart
    # (freqs: an (image, text) pair) and masks text keys by the text padding mask: pladis.patch then uses its
    # StreamJointAttnProcessor (Qwen-Image); None: the shared joint processor's layout (one rotary, one sequence)
    stream_rotary: Callable | None = None
    # export
    contract: Callable  # (name, denoiser module) -> the denoiser's pladis.contracts.Component
    text_length: int  # the denoiser's text tokens; joint models keep it static (the node's text_len)
    t5_length: int | None = None  # T5 tokens (the pipeline's default max_sequence_length); None: no T5
    denoiser_multiple: Callable[[nn.Module], int]  # the denoiser's own size factor, in latent units
    extra_dims: Callable[[dict], dict] = _no_extra_dims  # named dims beyond the shared ones, from those
    # (pipeline) -> the text encoders' contracts; None: CLIP/T5 by their class (LLM encoders need their own)
    text_encoders: Callable | None = None
    vae_decoder: Callable | None = None  # (VAE) -> the decoder's contract; None: the plain ``decode``
    # single files
    layouts: tuple[Layout, ...] = ()  # the single-file checkpoint layouts it is released in, most specific first
    # sampling
    sample_input: str = "hidden_states"  # the denoiser input that takes the latents
    timestep_scale: float = 1000.0  # the denoiser's timestep runs over [0, timestep_scale] (schedulers: 1000)
    guidance_distilled: bool = False  # guidance is a model input: one batch, no classifier-free guidance
    flow_matching: bool = False  # takes the flow-matching schedulers only (else only the others)
    default_guidance: float
    # (Denoising, prompts, negatives, height, width, guidance) -> {input: tensor}, constant per step
    encode: Callable[..., dict[str, torch.Tensor]]
    pack: Callable[[torch.Tensor], torch.Tensor] = _same  # (B, C, h, w) latents -> the denoiser's layout
    unpack: Callable[[torch.Tensor, int, int], torch.Tensor] = _same  # (packed, h, w) -> (B, C, h, w)
    noise: Callable[[torch.Tensor, int], torch.Tensor] = _noise_as_is  # (output, latent channels) -> noise
    # (batch, latent channels, latent h, latent w) -> the initial noise's shape (FLUX.2 draws it patchified)
    noise_shape: Callable[[int, int, int, int], tuple[int, ...]] = _noise_shape
    set_timesteps: Callable[..., None] = _plain_timesteps  # (scheduler, steps, latent h, latent w)
    # (uncond, text, guidance) -> the guided prediction (Qwen-Image rescales it to the conditional norm)
    guide: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] = _plain_cfg
    # the VAE
    vae_scale: Callable[..., int] = vae_scale_factor  # (VAE config) -> pixels per latent unit a side
    vae_input: Callable = vae_latents  # (latents, scaling_factor, shift_factor) -> VAE decoder input
    vae_channels: Callable[..., int] = _latent_channels  # (VAE config) -> latent channels
    default_side: int | None = None  # default image side (pixels) of hub models; None: denoiser sample_size x VAE

    # -- the size rule ------------------------------------------------------------------------------

    def size_multiple(self, pipe) -> int:
        """Image sides must be multiples of this many pixels: the VAE factor times the denoiser's own factor."""
        return self.vae_scale(pipe.vae.config) * self.denoiser_multiple(getattr(pipe, self.component))

    # -- the sampling loop's steps, in the loop's order ---------------------------------------------

    @property
    def uses_cfg(self) -> bool:
        """Whether ``guidance > 1`` means classifier-free guidance (guidance-distilled models embed it instead)."""
        return not self.guidance_distilled

    def timesteps(self, d: Denoising, scheduler, steps: int, height: int, width: int) -> None:
        """Set ``steps`` timesteps on ``scheduler`` as the family's pipeline does (FLUX: shift by image size)."""
        self.set_timesteps(scheduler, steps, *d.latent_hw(height, width))

    def latent_shape(self, d: Denoising, batch: int, height: int, width: int) -> tuple[int, ...]:
        """Shape of the initial noise (B, C, h, w) by the family's rule, before any packing."""
        return self.noise_shape(batch, d.latent_channels, *d.latent_hw(height, width))

    def step_inputs(self, latents: torch.Tensor, t: torch.Tensor, cond: dict) -> dict[str, torch.Tensor]:
        """The denoiser's inputs for one step: latents (already CFG-doubled and scaled) and the timestep (n,)
        float32 on the denoiser's scale (FLUX takes t / 1000 and multiplies inside)."""
        timestep = t.float() / (SCHEDULER_TIMESTEPS / self.timestep_scale)
        return {self.sample_input: latents, "timestep": timestep.expand(latents.shape[0]).clone(), **cond}

    def noise_prediction(self, d: Denoising, out: torch.Tensor) -> torch.Tensor:
        """The denoiser output as the scheduler's model output (PixArt predicts [noise, variance]: keep noise)."""
        return self.noise(out, d.latent_channels)

    def decoder_input(self, d: Denoising, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Final (packed) latents -> the VAE decoder's input, by the family's VAE rule."""
        return self.vae_input(self.unpack(latents, *d.latent_hw(height, width)), d.scaling_factor, d.shift_factor)


# --------------------------------------------------------------------------------------------------
# Text helpers shared by the families' encode hooks
# --------------------------------------------------------------------------------------------------


def clip(d: Denoising, encoder: str, prompts: list[str]) -> dict[str, torch.Tensor]:
    """A CLIP text encoder's outputs (last and penultimate states, pooled) for ``prompts``."""
    return d.text(encoder, prompts)


def t5(d: Denoising, encoder: str, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """A T5 encoder's last states (B, L, D) and the padding mask (B, L) int64 it was given."""
    out = d.text(encoder, prompts)
    return out["last_hidden_state"], out["attention_mask"]


def both(fn, prompts: list[str], negatives: list[str] | None):
    """fn over [negatives, prompts] (CFG order: unconditional first), or over prompts alone."""
    return fn(prompts) if negatives is None else fn(negatives + prompts)
