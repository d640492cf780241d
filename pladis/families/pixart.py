"""PixArt family: PixArt-alpha/sigma (dedicated cross-attention, T5 text, [noise, variance] output)."""

from __future__ import annotations

import torch

from pladis.contracts import Component, Port
from pladis.families.record import Denoising, Family, both, t5


def contract(name: str, tr) -> Component:
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


def encode(d: Denoising, prompts, negatives, height, width, guidance) -> dict:
    """T5 states and their padding mask (B, L) int64; PixArt-alpha 1024 also resolution and aspect ratio."""
    states, mask = both(lambda p: t5(d, "text_encoder", p), prompts, negatives)
    cond = {"encoder_hidden_states": states, "encoder_attention_mask": mask}
    if "resolution" in d.input_names:
        n = len(states)
        cond["resolution"] = torch.tensor([[height, width]], dtype=torch.float32).repeat(n, 1)
        cond["aspect_ratio"] = torch.tensor([[height / width]], dtype=torch.float32).repeat(n, 1)
    return cond


def noise(out: torch.Tensor, latent_channels: int) -> torch.Tensor:
    """PixArt predicts [noise, variance] along channels: keep the noise."""
    return out.chunk(2, dim=1)[0] if out.shape[1] == 2 * latent_channels else out


FAMILY = Family(
    name="pixart", class_name="PixArtTransformer2DModel", component="transformer", joint=False,
    contract=contract, text_length=120, t5_length=120, denoiser_multiple=lambda m: 2,  # 2x2 patches
    default_guidance=4.5, encode=encode, noise=noise,
)  # fmt: skip
