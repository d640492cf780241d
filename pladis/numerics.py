"""The numeric constants of PLADIS attention, shared by every implementation of the op: the PyTorch
operator (``pladis.ops``), the Triton kernel (``pladis.kernels``) and the ONNX function body
(``pladis.export.onnx_op``). This module imports nothing of pladis but its error types and
``pladis.torch_internals`` (which imports none), so each of them can import it.
docs/NUMERICS.md states the contract these numbers serve.
"""

from __future__ import annotations

import functools
import math

import torch

# DEFAULT_LAM, DEFAULT_ALPHA and LAM_RANGE (what engines and the server accept as a runtime lam: 0, stock,
# up to well past the paper's useful 1-3) are written in pladis.defaults, which --help reads without torch.
from pladis.defaults import DEFAULT_ALPHA, DEFAULT_LAM, LAM_RANGE  # noqa: F401
from pladis.errors import SettingError
from pladis.torch_internals import dispatch_mode_active


def check_lam(value, lam_range: tuple[float, float] = LAM_RANGE, field: str = "lam") -> float:
    """``value`` as a float when it is a finite real number (not a bool) in ``lam_range``, else a
    ``SettingError`` naming ``field``. The one check of a user's lam, made at each public boundary."""
    lo, hi = lam_range
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype.is_floating_point:
        value = value.item()
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or not lo <= value <= hi:
        if lo == hi == 0:  # a stock export: the range says nothing a user can act on, the export does
            raise SettingError(field, f"{field} {value!r}: this engine was exported without PLADIS layers (--lam 0), "
                                      "so it runs only 0; re-export without --lam 0 for a PLADIS engine")  # fmt: skip
        raise SettingError(field, f"{field} must be a finite number in [{lo:g}, {hi:g}]; 0 = the stock "
                                  f"model, the paper's useful range is 1-3; got {value!r}")  # fmt: skip
    return float(value)


# Sort-free threshold (ONNX function body, Triton kernel): Newton steps by alpha, for key lengths up to
# 300 / up to 1000 (beyond: one more). Chosen from measurements against the float64 oracle at score scales
# 0.1-30 (alpha 1.5: Newton on ||r|| / 2 - 1 reaches float32 resolution in 3 steps up to 300 keys, 4 up to
# 1000; alpha 2: Michelot's iteration needs 8 resp. 10 at the smallest scales).
NEWTON_STEPS = {1.5: (3, 4), 2.0: (8, 10)}
# Masked logits become this large finite negative in the sort-free paths (no inf - inf = NaN anywhere).
MASKED = -1e30


def newton_steps(alpha: float, max_keys: int | None = None) -> int:
    """Newton steps of the sort-free threshold for keys up to ``max_keys`` (None: unknown, up to 1000)."""
    short, long = NEWTON_STEPS[alpha]
    if max_keys is not None and max_keys <= 300:
        return short
    return long if max_keys is None or max_keys <= 1000 else long + 1


def capturing(device: torch.device) -> bool:
    """Whether tensors made now must not be cached: the current CUDA stream is capturing a graph (they are
    filled on replay), or torch.compile, torch.export or AOTInductor is tracing (they become graph values:
    a dispatch mode such as FakeTensorMode or FunctionalTensorMode is active)."""
    if torch.compiler.is_compiling() or dispatch_mode_active():
        return True
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def constant(value: float, shape: tuple[int, ...], device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A tensor of ``shape`` and ``dtype`` filled with ``value`` on ``device``: one cached tensor per (value,
    shape, device, dtype), never written to, so a layer call allocates nothing; a fresh one while ``capturing``."""
    device = torch.device(device)
    if capturing(device):
        return torch.full(shape, float(value), dtype=dtype, device=device)
    return _cached_constant(float(value), tuple(shape), device, dtype)


@functools.lru_cache(maxsize=64)
def _cached_constant(value: float, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.full(shape, value, dtype=dtype, device=device)
