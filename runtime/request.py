"""One request's sampling settings, and their one check against an engine.

``Request`` is what a caller asks for (the CLI's ``GenerateConfig`` / ``ParityConfig``, the server's HTTP
body, the Python API's keywords all become one); ``check(request, engine)`` fills the engine's defaults and
checks every field against the engine before any work, raising ``SettingError(field, message)``; the
``Settings`` it returns are trusted by the sampling loop below it. This module imports only the standard
library and ``pladis.errors`` at import time (the CLI reads the defaults before torch is loaded).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

from pladis.errors import SettingError

DEFAULT_STEPS = 20  # the default guidance is per family: its record's ``default_guidance``
PARITY_STEPS = 4  # `pladis parity` compares a few steps: enough for an error to show and compound
SCHEDULERS = {  # name -> diffusers class; flow-matching families take only flow schedulers
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "ddim": "DDIMScheduler",
    "lcm": "LCMScheduler",
    "flow_euler": "FlowMatchEulerDiscreteScheduler",
}


@dataclass(frozen=True)
class Request:
    """What to sample. None: the engine's default (steps ``DEFAULT_STEPS``, guidance per family, the engine's
    scheduler and image size, the export's lam).

    prompt: a string (``batch`` images of it) or a list of strings, one image each (then ``batch`` must be 1).
    negative_prompt: a string for every image or one per prompt; needs classifier-free guidance.
    seed: an int (image i gets seed + i) or one per image. lam: the PLADIS strength, a number (a 0-dim or
    one-element float tensor too) or one per image; any value in the engine's range runs on the same engine.
    """

    prompt: str | Sequence[str]
    negative_prompt: str | Sequence[str] | None = None
    steps: int | None = None
    guidance: float | None = None
    guidance_rescale: float = 0.0
    scheduler: str | None = None
    seed: int | Sequence[int] = 0
    batch: int = 1
    height: int | None = None
    width: int | None = None
    lam: object = None  # float | Sequence[float] | torch.Tensor | None


def request_of(config) -> Request:
    """The ``Request`` of a command's config: its fields of the same names (the others keep their defaults)."""
    names = [f.name for f in dataclasses.fields(Request)]
    return Request(**{n: getattr(config, n) for n in names if hasattr(config, n)})


@dataclass(frozen=True)
class Settings:
    """A checked request, one entry per image: what the sampling loop runs."""

    prompts: tuple[str, ...]
    negatives: tuple[str, ...] | None  # None: no classifier-free guidance
    steps: int
    guidance: float
    guidance_rescale: float
    scheduler: str | None  # None: the engine's own scheduler class
    seeds: tuple[int, ...]  # one per image: images do not depend on what else shares their batch
    height: int
    width: int
    lam: tuple[float, ...] | None = None  # per image (None: the engine has no PLADIS layers)


def scheduler_names(family: str) -> list[str]:
    """The schedulers a family takes: flow-matching ones for flow-matching families, the others otherwise."""
    from pladis.families import get

    flow = get(family).flow_matching
    return [n for n, cls in SCHEDULERS.items() if cls.startswith("FlowMatch") == flow]


def check(request: Request, engine) -> Settings:
    """``request`` checked against ``engine`` (a ``pladis.manifest.Engine``) with its defaults filled in."""
    from pladis.families import get

    record = get(engine.family)
    prompts = _prompts(request, engine)
    height, width = _size(request, engine)
    names = scheduler_names(engine.family)
    if request.scheduler is not None and request.scheduler not in names:
        raise SettingError("scheduler", f"unknown scheduler {_short(request.scheduler)} for a {engine.family} model; "
                                        f"choose one of {', '.join(names)}")  # fmt: skip
    steps = DEFAULT_STEPS if request.steps is None else _integer(request.steps, "steps")
    if steps < 1:
        raise SettingError("steps", f"steps must be at least 1; got {steps}")
    guidance = record.default_guidance if request.guidance is None else _real(request.guidance, "guidance")
    rescale = _real(request.guidance_rescale, "guidance_rescale")
    embedded = "guidance" in {i.name for i in engine.component(engine.denoiser).inputs}  # a guidance-distilled model
    use_cfg = not record.guidance_distilled and not embedded and guidance > 1.0
    negatives = _negatives(request.negative_prompt, prompts, use_cfg, engine)
    seeds = _seeds(request.seed, len(prompts))
    lam = _lam(request.lam, len(prompts), engine)
    return Settings(prompts, negatives, steps, guidance, rescale, request.scheduler, seeds, height, width, lam)


def _prompts(request: Request, engine) -> tuple[str, ...]:
    batch = request.batch
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise SettingError("batch", f"batch must be a whole number of images, at least 1; got {batch!r}")
    prompt = request.prompt
    if isinstance(prompt, str):
        count = batch
    elif isinstance(prompt, Sequence) and all(isinstance(p, str) for p in prompt):
        if batch != 1:
            raise SettingError("batch", f"batch={batch} repeats one prompt string; with a list of prompts give one "
                                        "entry per image (batch=1)")  # fmt: skip
        count = len(prompt)
    else:
        raise SettingError("prompt", f"prompt must be a string or a list of strings; got {type(prompt).__name__}")
    max_batch = engine.dim("batch")[2]
    if count > max_batch:  # before the prompts are repeated: a batch of 10**12 is refused, never allocated
        raise SettingError("batch", f"batch of {count} prompts is over this engine's maximum of {max_batch}; "
                                    f"split the prompts or {_widen(engine, 'batch', '--batch')}")  # fmt: skip
    prompts = (prompt,) * batch if isinstance(prompt, str) else tuple(prompt)
    if not prompts or any(not p.strip() for p in prompts):
        raise SettingError("prompt", "prompt is empty: pass a non-empty prompt string or a list of them")
    return prompts


def _size(request: Request, engine) -> tuple[int, int]:
    image = engine.manifest.image
    height = image.height if request.height is None else _integer(request.height, "height")
    width = image.width if request.width is None else _integer(request.width, "width")
    for name, size in (("height", height), ("width", width)):
        lo, _, hi = engine.dim(name)
        if not lo <= size <= hi:
            where = "this build's range" if _narrowed(engine, name) else "the exported range"
            raise SettingError(name, f"{name} {size} is outside {where} [{lo}, {hi}]; pick a size inside it or "
                                     f"{_widen(engine, name, f'--{name}')}")  # fmt: skip
        if size % image.multiple:
            raise SettingError(name, f"{name} {size} is not a multiple of {image.multiple}, which this model needs")
    return height, width


def _narrowed(engine, name: str) -> bool:
    """Whether the engine's build (``pladis build --dims``) narrowed dim ``name`` inside the export's range."""
    lo, _, hi = engine.dim(name)
    export_lo, _, export_hi = engine.manifest.dims[name]
    return (lo, hi) != (export_lo, export_hi)


def _widen(engine, name: str, export_flag: str) -> str:
    """The fix for a value past dim ``name``'s limit: rebuild wider when the build narrowed it, else re-export."""
    if _narrowed(engine, name):
        dim = f"latent_{name}" if name in ("height", "width") else name
        return f"rebuild the engine with a wider --dims {dim}=MIN:OPT:MAX (within the export's range)"
    return f"re-export with another {export_flag}"


def _negatives(negative, prompts: tuple[str, ...], use_cfg: bool, engine) -> tuple[str, ...] | None:
    if negative is not None and not isinstance(negative, str):
        if not isinstance(negative, Sequence) or not all(isinstance(p, str) for p in negative):
            raise SettingError("negative_prompt", "negative_prompt must be a string or a list of strings; got "
                                                  f"{type(negative).__name__}")  # fmt: skip
    if not use_cfg:
        if negative:
            raise SettingError("negative_prompt", "negative_prompt needs classifier-free guidance (guidance > 1, "
                                                  "not FLUX)")  # fmt: skip
        return None
    cfg_max = engine.dim("cfg_batch")[2]
    if cfg_max < 2 * len(prompts):
        fix = _widen(engine, "cfg_batch", "--batch")
        raise SettingError("batch", f"CFG doubles the batch to {2 * len(prompts)}, over the engine's maximum "
                                    f"{cfg_max}; use fewer prompts or {fix}")  # fmt: skip
    negatives = (negative or "",) * len(prompts) if isinstance(negative, str | None) else tuple(negative)
    if len(negatives) != len(prompts):
        raise SettingError("negative_prompt", f"{len(negatives)} negative prompts for {len(prompts)} prompts; give "
                                              "one or as many")  # fmt: skip
    return negatives


def _seeds(seed, n: int) -> tuple[int, ...]:
    if isinstance(seed, Sequence) and not isinstance(seed, str):
        seeds = tuple(_integer(s, "seed") for s in seed)
    else:
        first = _integer(seed, "seed")
        seeds = tuple(first + i for i in range(n))
    if len(seeds) != n:
        raise SettingError("seed", f"{len(seeds)} seeds for {n} prompts; give one seed or one per prompt")
    for i, x in enumerate(seeds):  # torch's generators take 64-bit seeds, and the step noise's is seed + 1
        if not -(2**63) <= x < 2**63:
            whose = f" (image {i}'s: seed + {i})" if i and not isinstance(seed, Sequence) else ""
            raise SettingError("seed", f"seed {x}{whose} is outside [-2**63, 2**63 - 1]; pick one inside it")
    return seeds


def _lam(lam, n: int, engine) -> tuple[float, ...] | None:
    """lam (None, a number, a float tensor or one value per image) as n checked values; None for an engine
    without PLADIS layers, which runs lam = 0 only."""
    from pladis.numerics import check_lam

    pl = engine.manifest.pladis
    if getattr(lam, "ndim", 0) == 1 and len(lam) != 1:  # a tensor of one value per image
        lam = list(lam)
    if lam is None:
        values = [pl.lam] * n
    elif isinstance(lam, Sequence) and not isinstance(lam, str):
        values = list(lam)
        if len(values) != n:
            raise SettingError("lam", f"lam: {len(values)} values for {n} prompts; give one number or one per prompt")
    else:
        values = [lam] * n
    lam_range = pl.lam_range if pl.lam_input else (0.0, 0.0)
    checked = tuple(check_lam(v, lam_range, "lam") for v in values)
    return checked if pl.lam_input else None


def _integer(value, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise SettingError(field, f"{field} must be a whole number; got {_short(value)}")
    return int(value)


def _real(value, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise SettingError(field, f"{field} must be a finite number; got {_short(value)}")
    return float(value)


def _short(value, limit: int = 40) -> str:
    """``value`` quoted for a message, cut to ``limit`` characters."""
    text = repr(value)
    return text[:limit] + ("..." if len(text) > limit else "")
