"""Tiny denoisers of every supported family, each with a CFG-shaped (batch 2) example forward call."""

import functools

import torch

from pladis import models

FAMILY_CASES = ["tiny-sd15", "tiny-sdxl", "tiny-pixart", "tiny-sd3", "tiny-flux", "tiny-flux2", "tiny-qwenimage"]


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _padding_mask(batch: int, length: int, real: list[int]) -> torch.Tensor:
    """(batch, length) 1/0 mask as diffusers pipelines pass T5 padding (batch i has real[i] tokens)."""
    return (torch.arange(length)[None, :] < torch.tensor(real)[:, None]).long()


@functools.cache
def denoiser_case(name: str):
    """(model, kwargs): a tiny denoiser (eval mode, float32) and a batch-2 (CFG-shaped) forward call."""
    b = 2
    pipe = models.load(name)
    if name in ("tiny-sd15", "tiny-sdxl"):
        unet = pipe.unet
        kwargs = dict(
            sample=_rand(b, 4, 16, 16, seed=1),
            timestep=torch.tensor(10),
            encoder_hidden_states=_rand(b, 77, unet.config.cross_attention_dim, seed=2),
        )
        if name == "tiny-sdxl":
            kwargs["added_cond_kwargs"] = dict(
                text_embeds=_rand(b, 32, seed=3), time_ids=_rand(b, 6, seed=4).abs() * 64
            )
        return unet, kwargs
    tr = pipe.transformer
    if name == "tiny-pixart":
        return tr, dict(
            hidden_states=_rand(b, 4, 8, 8, seed=1),
            encoder_hidden_states=_rand(b, 24, 32, seed=2),
            encoder_attention_mask=_padding_mask(b, 24, [5, 24]),
            timestep=torch.tensor([10, 10]),
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        )
    if name == "tiny-sd3":
        return tr, dict(
            hidden_states=_rand(b, 4, 8, 8, seed=1),
            encoder_hidden_states=_rand(b, 30, 32, seed=2),
            pooled_projections=_rand(b, 64, seed=3),
            timestep=torch.tensor([500.0, 500.0]),
        )
    if name == "tiny-flux":
        h = w = 6.0
        img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(h), torch.arange(w), indexing="ij"), -1)
        return tr, dict(
            hidden_states=_rand(b, 36, 4, seed=1),
            encoder_hidden_states=_rand(b, 12, 32, seed=2),
            pooled_projections=_rand(b, 32, seed=3),
            timestep=torch.tensor([0.5, 0.5]),
            img_ids=img_ids.reshape(-1, 3).float(),
            txt_ids=torch.zeros(12, 3),
            guidance=torch.tensor([3.5, 3.5]),
        )
    if name == "tiny-flux2":
        ids = torch.cartesian_prod(torch.arange(1), torch.arange(6), torch.arange(6), torch.arange(1)).float()
        return tr, dict(
            hidden_states=_rand(b, 36, 16, seed=1),
            encoder_hidden_states=_rand(b, 12, 48, seed=2),
            timestep=torch.tensor([0.5, 0.5]),
            img_ids=ids,
            txt_ids=torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(12)).float(),
        )
    if name == "tiny-qwenimage":  # a 6 x 6 patch grid; row 0's text has 4 padded tokens (the pipeline's mask)
        return tr, dict(
            hidden_states=_rand(b, 36, 16, seed=1),
            encoder_hidden_states=_rand(b, 12, 16, seed=2),
            encoder_hidden_states_mask=_padding_mask(b, 12, [8, 12]),
            timestep=torch.tensor([0.5, 0.5]),
            img_shapes=[[(1, 6, 6)]] * b,
        )
    raise KeyError(name)


def forward(model, kwargs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**kwargs, return_dict=False)[0]
    return out
