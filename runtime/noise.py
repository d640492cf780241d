"""Ancestral samplers' step noise drawn once per request, not once per step (no host wait inside the loop).

diffusers' ancestral schedulers (``DRAWS_PER_STEP``) draw their noise inside ``step`` with
``diffusers.utils.torch_utils.randn_tensor``. Given the runtime's list of CPU generators (one per image), that is
one ``torch.randn((1, *shape[1:]), generator=g_i, device="cpu", dtype=model_output.dtype)`` per image, in image
order, then ``torch.cat(...).to(device)``. On a CUDA device that last copy is a blocking host-to-device copy (torch
synchronises the stream after it): the host waits for the GPU every step, so it cannot queue the next step while
the GPU runs this one.

``StepNoise`` makes those same calls (the same generators, the same per-image shape and dtype, in the same order,
so the same numbers bitwise) for every step before the loop, moves them to the device in one copy, and ``with
noise.step(): sched.step(...)`` runs a step under a ``torch.overrides.TorchFunctionMode`` that answers exactly
those ``torch.randn`` calls (one of its generators, the shape and dtype it drew) with the next pre-drawn tensor,
already on the device; every other call in the step passes through untouched. The runtime's generators are fresh
per request, so a draw made and not used (LCM draws on every step but the last) changes nothing. A draw it did not
plan (another shape or dtype, more draws than steps) raises PladisError rather than give other images: the
generators are already past those draws.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

from pladis.errors import PladisError

# the diffusers schedulers that draw one randn of the sample's shape per image in every step (LCM: not in the last)
DRAWS_PER_STEP = frozenset({"EulerAncestralDiscreteScheduler", "LCMScheduler"})


class StepNoise:
    """Each generator's draws for ``steps`` steps: ``table`` (steps, B, *shape) ``dtype`` on ``device``, draw k of
    image i at ``table[k, i]``, made as ``torch.randn((1, *shape), generator=generators[i], dtype=dtype)``."""

    def __init__(self, generators: list[torch.Generator], shape: tuple, steps: int, dtype: torch.dtype,
                 device: str | torch.device):  # fmt: skip
        self.shape, self.dtype = (1, *shape), dtype
        self.index = {id(g): i for i, g in enumerate(generators)}
        draws = [torch.cat([torch.randn(self.shape, generator=g, dtype=dtype) for g in generators])
                 for _ in range(steps)]  # fmt: skip
        self.table = torch.stack(draws).to(device)  # one copy per request
        self.taken = [0] * len(generators)  # draws handed out so far, per image

    def step(self) -> contextlib.AbstractContextManager:
        """A context in which the scheduler's draws from these generators come from the table."""
        return _Answer(self)

    def take(self, generator: torch.Generator, size: tuple, dtype) -> torch.Tensor:
        """The next draw of ``generator``'s image, (1, *shape) on the device; PladisError if it is not the draw
        that was made for it."""
        i = self.index[id(generator)]
        k = self.taken[i]
        if tuple(size) != self.shape or dtype not in (None, self.dtype) or k >= len(self.table):
            raise PladisError(f"the scheduler drew noise of shape {tuple(size)} {dtype} (draw {k + 1} of image "
                              f"{i + 1}); pladis drew {len(self.table)} of {self.shape} {self.dtype} per image "
                              "before the loop. This diffusers draws its step noise otherwise: run with another "
                              "scheduler, or a diffusers version pladis supports")  # fmt: skip
        self.taken[i] = k + 1
        return self.table[k, i : i + 1]


class _Answer(TorchFunctionMode):
    """``torch.randn(size, generator=g, ...)`` for one of ``noise``'s generators: its next pre-drawn tensor."""

    def __init__(self, noise: StepNoise):
        super().__init__()
        self.noise = noise

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.randn and id(kwargs.get("generator")) in self.noise.index:
            size = args[0] if len(args) == 1 and isinstance(args[0], tuple | list | torch.Size) else args
            return self.noise.take(kwargs["generator"], size, kwargs.get("dtype"))
        return func(*args, **kwargs)


def for_loop(sched, generators: list[torch.Generator], latents: torch.Tensor, device) -> StepNoise | None:
    """The request's step noise drawn ahead when ``sched`` is one of ``DRAWS_PER_STEP`` (one draw per image per
    timestep, of the latents' per-image shape, float32 like the runtime's noise predictions), else None."""
    if type(sched).__name__ not in DRAWS_PER_STEP:
        return None
    return StepNoise(generators, tuple(latents.shape[1:]), len(sched.timesteps), torch.float32, device)
