"""Every private torch name pladis relies on, in one place: how compilers trace into ``pladis::attention``,
whether a tracer is active, and the dense kernels that return a log-sum-exp.

Private names change without notice between torch releases. ``PRIVATE`` lists each one, the first torch
release that has it and what is off without it; ``missing()`` says which of them this torch lacks, and
importing this module logs a warning naming each feature that is off (tests/test_custom_op.py fails
when a supported torch lacks one). Nothing here imports pladis, so ``pladis.numerics`` (and through it the
kernels and the ONNX body) can use it without a cycle; ``pladis.ops`` hands its op and functions to
``trace_into`` instead of being imported.

The compiled paths (docs/NUMERICS.md, "Which implementation runs where"): AOTDispatcher (torch.compile,
AOTInductor) traces under FunctionalTensorMode, where the rule ``trace_into`` registers replaces the op by
its tensor code (``ops.fused_form``) or by its Triton kernel launched through ``torch.library.wrap_triton``
(what ``torch.library.triton_op`` does). torch.export turns ``decompose_custom_triton_ops`` off while it
traces (the switch triton_op uses), so exported programs and the ONNX exporters keep one node.
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Callable
from typing import Optional

import torch
from torch import Tensor

log = logging.getLogger(__name__)

# dotted name -> (first torch (major, minor) that has it, what is off without it). Every entry is at or below
# the supported floor (pyproject.toml: torch>=2.6), so a supported torch lacks none of them.
PRIVATE: dict[str, tuple[tuple[int, int], str]] = {
    "torch._functorch.config.decompose_custom_triton_ops": (
        (2, 6),
        "compilers tracing into pladis::attention (torch.compile and AOTInductor call the op as one kernel)",
    ),
    "torch._subclasses.functional_tensor.FunctionalTensorMode": (
        (2, 1),
        "compilers tracing into pladis::attention (torch.compile and AOTInductor call the op as one kernel)",
    ),
    "torch._subclasses.functional_tensor.FunctionalTensor": (
        (2, 1),
        "compilers tracing into pladis::attention (torch.compile and AOTInductor call the op as one kernel)",
    ),
    "torch._subclasses.fake_tensor.FakeTensor": (
        (2, 0),
        "compilers tracing into pladis::attention (torch.compile and AOTInductor call the op as one kernel)",
    ),
    "torch.library.wrap_triton": (
        (2, 6),
        "the Triton kernel inside compiled CUDA graphs (they call the op, which launches it)",
    ),
    "torch.utils._python_dispatch._get_current_dispatch_mode": (
        (2, 0),
        "cached lam and mask constants (a fresh tensor per call instead)",
    ),
    "torch.ops.aten._scaled_dot_product_flash_attention_for_cpu": (
        (2, 3),  # 2.2 added it, 2.3 its attn_mask argument
        "joint attention from the CPU dense kernel's log-sum-exp (query chunks of the (L x L) map instead)",
    ),
    "torch.ops.aten._scaled_dot_product_efficient_attention": (
        (2, 1),  # its attn_bias argument
        "joint attention from the CUDA dense kernel's log-sum-exp (query chunks of the (L x L) map instead)",
    ),
}


def lookup(name: str):
    """The object a dotted ``name`` of ``PRIVATE`` names in this torch, or None where it is absent."""
    parts = name.split(".")
    obj = importlib.import_module(parts[0])
    for i in range(1, len(parts)):
        try:
            obj = getattr(obj, parts[i])
        except AttributeError:
            try:  # a submodule not imported yet
                obj = importlib.import_module(".".join(parts[: i + 1]))
            except ImportError:
                return None
    return obj


def torch_version() -> tuple[int, int]:
    """This torch's (major, minor)."""
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def missing() -> dict[str, str]:
    """The names of ``PRIVATE`` this torch lacks -> the feature that is off for each."""
    return {name: feature for name, (_, feature) in PRIVATE.items() if lookup(name) is None}


_DISPATCH_MODE = lookup("torch.utils._python_dispatch._get_current_dispatch_mode")
_CPU_FLASH = lookup("torch.ops.aten._scaled_dot_product_flash_attention_for_cpu")
_CUDA_EFFICIENT = lookup("torch.ops.aten._scaled_dot_product_efficient_attention")


def _warn_missing() -> None:
    for name, feature in missing().items():
        log.warning("torch %s has no %s: off: %s", torch.__version__, name, feature)


# --------------------------------------------------------------------------------------------------
# Whether a tracer is active (numerics.capturing)
# --------------------------------------------------------------------------------------------------


def dispatch_mode_active() -> bool:
    """Whether a dispatch mode (FakeTensorMode, FunctionalTensorMode: a tracer) is active, so tensors made now
    become graph values and must not be cached. True where torch lacks the query (nothing is cached then)."""
    return _DISPATCH_MODE is None or _DISPATCH_MODE() is not None


# --------------------------------------------------------------------------------------------------
# Dense attention with its log-sum-exp (the joint fast path)
# --------------------------------------------------------------------------------------------------


def sdpa_with_lse(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], scale: float):
    """Dense attention and its log-sum-exp (B, H, Lq) float32 from a kernel that returns both, or None
    where none applies (then the caller uses the chunked form). q, k, v: (B, H, L, D) of one dtype.
    CPU: the flash kernel for CPU; CUDA: the memory-efficient kernel (any float dtype), without a mask."""
    same = q.shape[:-2] == k.shape[:-2] == v.shape[:-2] and q.shape[-1] == v.shape[-1]  # the kernels' limits
    if q.device.type == "cuda" and attn_mask is None and q.dim() == 4 and same and _CUDA_EFFICIENT is not None:
        out, lse = _CUDA_EFFICIENT(q, k, v, None, True, scale=scale)[:2]
        return out, lse[..., : q.shape[-2]].float()  # some versions pad the lse's rows to a multiple of 32
    if q.device.type != "cpu" or q.dim() != 4 or not same or _CPU_FLASH is None:
        return None
    if attn_mask is not None:
        if attn_mask.dim() != 4:
            return None
        attn_mask = (
            torch.zeros(attn_mask.shape, dtype=q.dtype).masked_fill_(~attn_mask, -math.inf)
            if attn_mask.dtype == torch.bool
            else attn_mask.to(q.dtype)
        )
    return _CPU_FLASH(q, k, v, attn_mask=attn_mask, scale=scale)


# --------------------------------------------------------------------------------------------------
# Compilers tracing into the op
# --------------------------------------------------------------------------------------------------


def trace_into(op, fused_form: Callable, traced_kernel: Optional[Callable], settings: dict) -> bool:
    """Register ``op``'s FunctionalTensorMode rule: while AOTDispatcher traces for a compiler, ``fused_form``
    (the op's tensor code) or ``traced_kernel`` (its Triton kernel), for static shapes; the op itself under
    torch.export, for symbolic sizes, and where both return ``NotImplemented``. Returns whether it registered
    (False: this torch lacks a name the rule needs, and the op stays one call; see ``missing``).

    fused_form(*op_args) and traced_kernel(*op_args, wrap=torch.library.wrap_triton) take the op's arguments
    (q, k, v, attn_mask, lam, alpha, scale, text_len, text_first). traced_kernel None: no kernel (no Triton).
    settings: the op's switches, read on every trace: ``enabled`` (``ops.inductor_fusion``), ``symbolic``
    (trace in for symbolic sizes too: benchmarks only).

    Symbolic sizes keep the op because that measured faster (a dynamic-shape AOTInductor build of the
    small-sd15 U-Net, docs/PERFORMANCE.md, ``export_bench --cases aoti-shapes``); the Triton kernel's
    launch configuration needs numbers too."""
    config = lookup("torch._functorch.config")
    mode_class = lookup("torch._subclasses.functional_tensor.FunctionalTensorMode")
    functional = lookup("torch._subclasses.functional_tensor.FunctionalTensor")
    fake = lookup("torch._subclasses.fake_tensor.FakeTensor")
    flag = "decompose_custom_triton_ops"
    if None in (mode_class, functional, fake) or not hasattr(config, flag):
        return False
    wrap = lookup("torch.library.wrap_triton")
    if wrap is None:
        traced_kernel = None

    def rule(mode, op_overload, types, args, kwargs):
        plain = all(issubclass(t, fake) or t in (Tensor, functional) for t in types)
        q, k, v, attn_mask = args[:4]
        sizes = (*q.shape, *k.shape, *v.shape, *(() if attn_mask is None else attn_mask.shape))
        static = all(isinstance(n, int) for n in sizes) or settings["symbolic"]
        if settings["enabled"] and plain and static and getattr(config, flag):
            with mode:
                out = fused_form(*args, **kwargs)
                if out is NotImplemented and traced_kernel is not None:
                    out = traced_kernel(*args, **kwargs, wrap=wrap)
            if out is not NotImplemented:
                return out
        return mode.__torch_dispatch__(op_overload, types, args, kwargs)

    op.register_torch_dispatch(mode_class, rule)
    return True


_warn_missing()


def aoti_updates_constants() -> bool:
    """Whether this torch's loaded AOTInductor packages can take new constants (``AOTICompiledModel``'s
    ``load_constants`` / ``get_constant_fqns``, torch._inductor's package loader): LoRA swapping on
    ``--backend aoti``. An optional feature, so not in ``PRIVATE``: without it the swap is refused by name."""
    cls = lookup("torch._inductor.package.package.AOTICompiledModel")
    return cls is not None and hasattr(cls, "load_constants") and hasattr(cls, "get_constant_fqns")
