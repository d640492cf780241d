"""pladis.kernels: the fused Triton kernels, registered as the CUDA implementation of ``pladis::attention``.

``register(op, fallback)`` runs when ``pladis.ops`` is imported and Triton is installed: it only tells the op
which function serves CUDA tensors (no GPU query, no Triton import until a CUDA tensor arrives). That
function runs the cross-attention kernel (``attention``: alpha 1.5 or 2, up to 512 keys) or the joint one
(``joint``: MMDiT, up to 512 text tokens, head dims up to 128) where they apply and the PyTorch operator
otherwise, so CUDA calls are always served. The TensorRT plugin
(``pladis.plugins_trt``) compiles the same two kernels ahead of time (``aot.compile_kernel``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
from pathlib import Path

from pladis.errors import MissingExtra, PladisError

# The PTX ISA the ahead-of-time kernel is written in (aot.py): 8.0 = CUDA 12.0, which every driver of the
# CUDA 12 line loads (Linux >= 525.60.13, Windows >= 527.41), the floor TensorRT 10's CUDA 12 builds have too.
# Left to itself Triton would write its bundled ptxas's version (8.8 for ptxas 12.9: driver >= 575).
PTX_VERSION = 80
MIN_DRIVER = {"cuda": "12.0", "linux": "525.60.13", "windows": "527.41"}
MIN_TRITON = (3, 5)  # for the AOT compile: the first Triton whose metadata reports both hidden scratch buffers


def triton_release() -> str | None:
    """The installed Triton's version string, read without importing it (None when absent)."""
    for dist in ("triton", "pytorch-triton"):  # the release, or the build PyTorch's nightlies ship
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def triton_version() -> tuple[int, int]:
    """The installed Triton's (major, minor); ImportError when it is absent."""
    text = triton_release()
    if text is None:
        raise ImportError("triton is not installed")
    major, minor = text.split(".")[:2]
    return int(major), int(minor)


def check_triton() -> None:
    """Raise a PladisError (``MissingExtra`` when it is absent) when Triton cannot compile the TensorRT plugin's
    kernels ahead of time."""
    need = f"{MIN_TRITON[0]}.{MIN_TRITON[1]}"
    try:
        version = triton_version()
    except ImportError:
        raise MissingExtra(
            f"Triton is not installed: the TensorRT plugin compiles its kernel with it at build time "
            f"(pip install 'triton>={need}')"
        ) from None
    if version < MIN_TRITON:
        raise PladisError(
            f"Triton {version[0]}.{version[1]} is too old for the TensorRT plugin: it needs >= {need} "
            "(ASTSource with constexprs=, and both scratch sizes in the metadata, which must be 0 because "
            "TensorRT passes null scratch pointers); upgrade triton"
        )


def source_hash() -> str:
    """sha256 of the kernel's sources (the jit kernel, its tiles, the AOT compile step), read as files so that
    no Triton import is needed."""
    h = hashlib.sha256()
    for p in sorted(Path(__file__).parent.glob("*.py")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def cuda_implementation(fallback):
    """The CUDA implementation of ``pladis::attention``: the cross kernel or the joint kernel where
    ``attention.supported`` / ``joint.joint_supported`` say they apply, else ``fallback`` (the PyTorch
    operator, same signature). lam: a float32 tensor (B,) or (1,) on q's device (the op's argument)."""

    def impl(q, k, v, attn_mask, lam, alpha, scale, text_len, text_first):
        out = _launch(q, k, v, attn_mask, lam, alpha, scale, text_len, text_first, None)
        if out is NotImplemented:
            return fallback(q, k, v, attn_mask, lam, alpha, scale, text_len, text_first)
        return out

    return impl


def _launch(q, k, v, attn_mask, lam, alpha, scale, text_len, text_first, wrap):
    """The kernel that serves this call of the op, launched (through ``wrap`` unless None), or
    ``NotImplemented``."""
    from pladis.kernels import attention, joint

    if attention.supported(q, k, v, attn_mask, alpha, text_len):
        return attention.attention(q, k, v, attn_mask, lam, alpha, scale, wrap=wrap)
    if joint.joint_supported(q, k, v, attn_mask, alpha, text_len):
        return joint.joint_attention(q, k, v, attn_mask, lam, alpha, scale, text_len, text_first, wrap=wrap)
    return NotImplemented


def traced_kernel(q, k, v, attn_mask, lam, alpha, scale, text_len, text_first, *, wrap):
    """The kernel for a compiler tracing into ``pladis::attention`` (``pladis.torch_internals.trace_into``):
    launched through ``wrap`` (``torch.library.wrap_triton``), so the graph holds the Triton kernel itself,
    which Inductor compiles into its output code (AOTInductor into the ``.pt2``), as for a triton_op.
    ``NotImplemented`` where no kernel serves the call (the op stays a call: CPU tensors, keys past 512,
    text past 512, other alpha). Arguments: the op's."""
    if not q.is_cuda:
        return NotImplemented
    return _launch(q, k, v, attn_mask, lam, alpha, scale, text_len, text_first, wrap)


def register(op, fallback) -> bool:
    """Register the kernel as ``op``'s CUDA implementation when Triton is installed; returns whether it did.
    ``pladis.ops`` calls this with its op and operator, so this package never imports ``pladis.ops``."""
    if importlib.util.find_spec("triton") is None:
        return False
    op.register_kernel("cuda")(cuda_implementation(fallback))
    return True
