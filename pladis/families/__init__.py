"""One record per model family: everything that differs between the denoisers PLADIS supports.

``record`` defines the ``Family`` record, the ``Denoising`` view its runtime hooks read and the single-file
``Layout``; one module per family (``unet``, ``pixart``, ``sd3``, ``flux2``, ``flux``, ``qwenimage``) holds its
export contract, its encode/pack/unpack/timestep hooks, its single-file layouts and its size rule. This module
is the registry: the other modules look a family up (``get(name)``, ``of_model(model)``) and read the record;
none of them names a family (tests/test_families.py scans the source for that).

Adding a family: a module here with its contract and ``encode`` hook (the record's defaults cover the rest)
and one ``FAMILY``, its entry in ``FAMILIES`` below, a tiny built-in model in ``pladis.models.BUILTINS`` and
its cases in the tests (tests/tiny_cases.py and the export, runtime and lam tests' model lists). Nothing else
changes. Import cost: torch only; diffusers where a model's class is checked.
"""

from __future__ import annotations

from torch import nn

from pladis.errors import PladisError
from pladis.families import flux, flux2, pixart, qwenimage, sd3, unet
from pladis.families.record import (
    CLIP_LENGTH,
    Denoising,
    Family,
    Layout,
    TextSide,
    vae_latents,
    vae_scale_factor,
)

__all__ = ["CLIP_LENGTH", "FAMILIES", "LAYOUTS", "Denoising", "Family", "Layout", "TextSide", "UnsupportedModel",
           "denoiser_components", "get", "of_model", "supported", "supported_models", "vae_latents",
           "vae_scale_factor"]  # fmt: skip

# FLUX.2 before FLUX.1: its single files also hold FLUX.1's layout key, so its own layouts must be tried first
FAMILIES: dict[str, Family] = {m.FAMILY.name: m.FAMILY for m in (unet, pixart, sd3, flux2, flux, qwenimage)}

# every family's single-file layouts, most specific first (the first that matches a checkpoint's keys wins)
LAYOUTS: tuple[Layout, ...] = tuple(lay for fam in FAMILIES.values() for lay in fam.layouts)

# Denoisers diffusers has that PLADIS deliberately does not take, with the reason given to the user.
UNSUPPORTED = {
    "SanaTransformer2DModel": "SANA needs a Gemma text encoder and a DC-AE VAE, which have no export contract "
    "or sampling loop here",
}


class UnsupportedModel(PladisError):
    """A model family (or denoiser class) PLADIS does not take; the message names the supported ones."""


def supported() -> str:
    """'name (DiffusersClass), ...' of every family, for error messages."""
    return ", ".join(f"{f.name} ({f.class_name})" for f in FAMILIES.values())


def supported_models() -> list[str]:
    """Names of the diffusers model classes PLADIS patches."""
    return [f.class_name for f in FAMILIES.values()]


def get(name: str) -> Family:
    """The family called ``name`` (as written in a manifest), or an error naming the supported ones."""
    try:
        return FAMILIES[name]
    except (KeyError, TypeError):
        raise UnsupportedModel(f"unknown model family {name!r}; supported families: {supported()}") from None


def of_model(model: nn.Module) -> Family:
    """The family of a diffusers denoiser, or an error naming its class and the supported families."""
    import diffusers

    for fam in FAMILIES.values():
        cls = getattr(diffusers, fam.class_name, None)
        if cls is not None and isinstance(model, cls):
            return fam
    name = type(model).__name__
    why = f" ({UNSUPPORTED[name]})" if name in UNSUPPORTED else ""
    raise UnsupportedModel(f"PLADIS does not support {name}{why}; supported families: {supported()}")


def denoiser_components() -> tuple[str, ...]:
    """The pipeline attributes a denoiser may sit in, in registry order without repeats."""
    return tuple(dict.fromkeys(f.component for f in FAMILIES.values()))
