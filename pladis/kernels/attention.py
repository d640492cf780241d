"""The fused PLADIS cross-attention kernel (Triton), forward only.

One program per (batch x head, block of queries), the whole key row in one tile (Lk <= 512: CLIP 77, T5
120-512): ``S = Q K^T * scale`` with float32 accumulation, the additive mask, row max, softmax, the
alpha-entmax threshold in float32 registers (the same sort-free Newton + closed form as the ONNX body:
alpha = 1.5 by Newton on ``||[s - t]_+|| / 2 - 1``, alpha = 2 by Michelot's iteration, no pow or exp in the
solve), ``P = softmax + lam (entmax - softmax)``, one ``P V`` on tensor cores in the value dtype.

Written and checked in Triton's interpreter on a CPU (``TRITON_INTERPRET=1``, tests/test_kernels.py);
its speed and its compilation for a GPU are measured by ``make gpu-check`` on a GPU machine.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pladis.ops import MASKED, newton_steps

MAX_KEYS = 512  # one tile holds the whole key row; longer rows (joint attention) use the PyTorch operator
_MASKED = tl.constexpr(MASKED)  # a global used in a jit function must be constexpr


@triton.jit
def _pladis_fwd(
    Q, K, V, M, Out,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, smb, smh, smm, smn, sob, soh, som, sod,
    H, LQ, LK, scale, lam,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SPARSEMAX: tl.constexpr, HAS_MASK: tl.constexpr, STEPS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok, key_ok, d_ok = offs_m < LQ, offs_n < LK, offs_d < D
    # 64-bit offsets: batch x head strides of long sequences overflow int32
    q = tl.load(Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
    k = tl.load(K + b.to(tl.int64) * skb + h.to(tl.int64) * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
                mask=key_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
    s = tl.dot(q, tl.trans(k), out_dtype=tl.float32, input_precision=DOT_PRECISION) * scale  # (BM, BN) float32
    if HAS_MASK:
        s += tl.load(M + b.to(tl.int64) * smb + h.to(tl.int64) * smh + offs_m[:, None] * smm + offs_n[None, :] * smn,
                     mask=row_ok[:, None] & key_ok[None, :], other=0.0).to(tl.float32)  # fmt: skip
    s = tl.where(key_ok[None, :], tl.maximum(s, _MASKED), _MASKED)  # padding keys and -inf: finite, far below
    smax = tl.max(s, 1)
    e = tl.exp(s - smax[:, None])
    dense = e / tl.sum(e, 1)[:, None]
    if SPARSEMAX:  # tau += (sum r - 1) / |support|, from max - 1
        tau = smax - 1.0
        for _ in tl.static_range(STEPS):
            r = tl.maximum(s - tau[:, None], 0.0)
            count = tl.sum(tl.where(s > tau[:, None], 1.0, 0.0), 1)
            tau += (tl.sum(r, 1) - 1.0) / tl.maximum(count, 1.0)
        sparse = tl.maximum(s - tau[:, None], 0.0)
    else:  # entmax15 in units of s (t = 2 tau): Newton on ||r|| / 2 - 1 from max - 2, then the closed form
        t = smax - 2.0
        for _ in tl.static_range(STEPS):
            r = tl.maximum(s - t[:, None], 0.0)
            norm = tl.sqrt(tl.sum(r * r, 1))
            t += (norm - 2.0) * norm / tl.maximum(tl.sum(r, 1), 1e-30)
        r = tl.maximum(s - t[:, None], 0.0)
        k_sup = tl.maximum(tl.sum(tl.where(s > t[:, None], 1.0, 0.0), 1), 1.0)
        s1, s2 = tl.sum(r, 1), tl.sum(r * r, 1)
        t += (s1 - tl.sqrt(tl.maximum(s1 * s1 - k_sup * (s2 - 4.0), 0.0))) / k_sup
        r = tl.maximum(s - t[:, None], 0.0)
        sparse = r * r * 0.25
    p = dense + lam * (sparse - dense)
    p = tl.where((smax > _MASKED / 10)[:, None], p, 0.0)  # a row whose keys are all masked gives zeros
    v = tl.load(V + b.to(tl.int64) * svb + h.to(tl.int64) * svh + offs_n[:, None] * svn + offs_d[None, :] * svd,
                mask=key_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
    o = tl.dot(p.to(v.dtype), v, out_dtype=tl.float32, input_precision=DOT_PRECISION)
    tl.store(Out + b.to(tl.int64) * sob + h.to(tl.int64) * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
             o.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])  # fmt: skip


def supported(q, k, v, attn_mask, alpha: float, text_len: int) -> bool:
    """Whether the kernel covers this call (else the PyTorch operator runs)."""
    return (
        text_len == 0 and alpha in (1.5, 2.0) and q.dim() == 4 and k.shape[-2] <= MAX_KEYS
        and q.shape[-1] == v.shape[-1] <= 256 and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
    )  # fmt: skip


def attention(q, k, v, attn_mask, lam: float, alpha: float, scale: float) -> torch.Tensor:
    """Launch the kernel. q: (B, H, Lq, D), k/v: (B, H, Lk, D) (broadcastable batch/head dims, any strides);
    attn_mask: bool or additive, broadcastable to (B, H, Lq, Lk), or None. Returns (B, H, Lq, D) in q's dtype."""
    b, h = (max(x) for x in zip(q.shape[:2], k.shape[:2], v.shape[:2], strict=True))
    lq, lk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    q, k, v = (t.expand(b, h, *t.shape[2:]) for t in (q, k, v))  # stride 0 on broadcast dims: no copies
    out = torch.empty((b, h, lq, d), device=q.device, dtype=q.dtype)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros((), device=q.device).masked_fill(~attn_mask, float("-inf"))
        attn_mask = attn_mask.expand(b, h, lq, lk)
    mask = attn_mask if attn_mask is not None else out  # a placeholder pointer when there is no mask
    mstrides = attn_mask.stride() if attn_mask is not None else (0, 0, 0, 0)
    block_n = max(16, triton.next_power_of_2(lk))
    block_d = max(16, triton.next_power_of_2(d))
    block_m = 64 if block_n * block_d <= 128 * 128 else 32  # keep the tiles in registers
    grid = (triton.cdiv(lq, block_m), b * h)
    _pladis_fwd[grid](
        q, k, v, mask, out, *q.stride(), *k.stride(), *v.stride(), *mstrides, *out.stride(),
        h, lq, lk, float(scale), float(lam), D=d, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        SPARSEMAX=alpha == 2.0, HAS_MASK=attn_mask is not None, STEPS=newton_steps(alpha, lk),
        # float32 inputs keep float32 products (tensor cores would round them to tf32's 10-bit mantissa)
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )  # fmt: skip
    return out
