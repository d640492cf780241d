"""pladis.kernels: the fused Triton kernel, registered as the CUDA implementation of ``pladis::attention``.

``register()`` runs when ``pladis.ops`` is imported and Triton is installed: it only tells the custom op
which function serves CUDA tensors (no GPU query, no Triton import until a CUDA tensor arrives). That
function runs the kernel where ``attention.supported`` says it applies (cross-attention, alpha 1.5 or 2,
up to 512 keys) and the PyTorch operator otherwise, so CUDA calls are always served.
"""

from __future__ import annotations

import importlib.util


def _cuda_impl(q, k, v, attn_mask, lam, alpha, scale, text_len, text_first):
    from pladis import ops
    from pladis.kernels import attention as kernel

    if lam != 0.0 and kernel.supported(q, k, v, attn_mask, alpha, text_len):
        return kernel.attention(q, k, v, attn_mask, lam, alpha, scale)
    return ops.reference_attention(q, k, v, attn_mask, lam, alpha, scale, text_len, text_first)


def register() -> bool:
    """Register the CUDA implementation when Triton is installed; returns whether it did."""
    if importlib.util.find_spec("triton") is None:
        return False
    from pladis import ops

    ops.attention_op.register_kernel("cuda")(_cuda_impl)
    return True
