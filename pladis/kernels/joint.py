"""The fused PLADIS joint-attention kernel (Triton), forward only: MMDiT attention (SD3, FLUX) over one
``[text, image]`` (``TEXT_FIRST``) or ``[image, text]`` token sequence.

Exactly the operator's joint contract (docs/NUMERICS.md §4): image-query rows get
``softmax + lam (m entmax(S_text) - softmax)`` on their text-key block, with ``m`` the block's dense mass;
text-query rows and image-key columns are plain softmax attention. One program per (batch x head, block of
queries), in two parts:

1. dense attention by the online softmax over key blocks of ``BLOCK_N`` (flash attention): ``P V``
   accumulated in float32 from ``P`` in the value dtype, and each row's log-sum-exp;
2. on image-query rows, the correction ``lam (m u - P_t) V_t`` over the text keys, held in one tile of
   ``BLOCK_T >= TL`` keys: ``S_t`` again, ``u = entmax(S_t)`` by the cross kernel's threshold solve
   (``attention._entmax_map``: the same Newton steps and closed form), ``P_t = exp(S_t - lse)``,
   ``m = sum P_t``. No (L x L) map anywhere.

The argument order follows the cross kernel's rules (``pladis/kernels/attention.py``): input pointers, int32
sizes, output pointer, then constexprs:

    q, k, v, mask, lam                   q, k, v, out contiguous (B, H, L, D); mask contiguous in its own
                                         broadcastable rank-4 shape (additive); lam float32 (B,) or (1,)
    B, H, L, TL, D, DV, MB, MH, MQ, MK, NL  int32 sizes (``JOINT_EXTRA_ARGS``): batch, heads, tokens, text
                                         tokens, head dims of q/k and v, the mask's four dims, lam's length
    out                                  output pointer
    SCALE, SPARSEMAX, STEPS, MASK_MODE, TEXT_FIRST, BLOCK_M, BLOCK_N, BLOCK_T, BLOCK_D, BLOCK_DV,
    DOT_PRECISION                        tl.constexpr

The grid is the cross kernel's (``attention.launch``): ``(cdiv(L, BLOCK_M), min(B*H, 65535), cdiv(B*H, 65535))``.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl

from pladis.kernels.attention import (
    _GRID_YZ_MAX,
    _MASKED,
    _TORCH_DTYPES,
    DTYPES,
    MASK_FULL,
    MASK_KEYS,
    MASK_NONE,
    QUERY_TILES,
    KernelUnsupported,
    _lam_tensor,
    _mask4,
    entmax_map,
    entmax_threshold,
    launch,
    mask_mode,
)
from pladis.numerics import newton_steps

MAX_TEXT = 512  # the text keys of one row sit in one tile (FLUX's T5: 512)
MAX_HEAD_DIM = 128  # q and the output row block stay in registers (SD3, FLUX: 64, 128)
TEXT_TILES = (128, 512)  # the text tile: the smallest that holds the call site's text length
JOINT_EXTRA_ARGS = ("B", "H", "L", "TL", "D", "DV", "MB", "MH", "MQ", "MK", "NL")


@triton.jit
def _logits(q, k_ptr, m_ptr, offs_m, offs_n, row_ok, key_ok, offs_d, d_ok, sqk, smq, smk, SCALE: tl.constexpr,
            MASK_MODE: tl.constexpr, DOT_PRECISION: tl.constexpr):  # fmt: skip
    """Masked float32 logits (BLOCK_M, BLOCK_N) of the query block q (BLOCK_M, BLOCK_D) against keys offs_n;
    padding and masked keys at ``MASKED`` (finite)."""
    k = tl.load(k_ptr + offs_n[:, None] * sqk + offs_d[None, :], mask=key_ok[:, None] & d_ok[None, :], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * SCALE
    if MASK_MODE == 1:  # one row of keys per sample (padding masks)
        s += tl.load(m_ptr + offs_n * smk, mask=key_ok, other=0.0).to(tl.float32)[None, :]
    elif MASK_MODE == 2:
        s += tl.load(m_ptr + offs_m[:, None] * smq + offs_n[None, :] * smk,
                     mask=row_ok[:, None] & key_ok[None, :], other=0.0).to(tl.float32)  # fmt: skip
    return tl.where(key_ok[None, :], tl.maximum(s, _MASKED), _MASKED)


@triton.jit
def pladis_joint_fwd(
    Q, K, V, M, LAM,
    B, H, L, TL, D, DV, MB, MH, MQ, MK, NL,
    OUT,
    SCALE: tl.constexpr, SPARSEMAX: tl.constexpr, STEPS: tl.constexpr, MASK_MODE: tl.constexpr,
    TEXT_FIRST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    bh = tl.program_id(2) * _GRID_YZ_MAX + tl.program_id(1)
    bh_ok = bh < B * H
    b, h = bh // H, bh % H
    n_keys = tl.where(bh_ok, L, 0)  # programs past B*H read and write nothing
    n_text = tl.where(bh_ok, TL, 0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_j = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < n_keys
    d_ok = offs_d < D
    j_ok = offs_j < DV
    q_ptr = Q + bh.to(tl.int64) * L * D  # 64-bit offsets of one (b, h) slab
    k_ptr = K + bh.to(tl.int64) * L * D
    v_ptr = V + bh.to(tl.int64) * L * DV
    o_ptr = OUT + bh.to(tl.int64) * L * DV
    # a mask dim of size 1 broadcasts (stride 0); otherwise it equals the attention dim (contiguous)
    smk = tl.where(MK == 1, 0, 1).to(tl.int64)
    smq = tl.where(MQ == 1, 0, MK).to(tl.int64)
    smh = tl.where(MH == 1, 0, MQ * MK).to(tl.int64)
    smb = tl.where(MB == 1, 0, MH * MQ).to(tl.int64) * MK
    m_ptr = M + b.to(tl.int64) * smb + h.to(tl.int64) * smh
    if TEXT_FIRST:  # FLUX, Qwen-Image: [text, image]
        t0 = 0
    else:  # SD3: [image, text]
        t0 = L - TL
    q = tl.load(q_ptr + offs_m[:, None] * D + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    # 1. dense attention over all keys, online softmax (flash attention): P V and each row's log-sum-exp
    row_max = tl.full((BLOCK_M,), _MASKED, tl.float32)
    row_sum = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
    for n0 in range(0, L, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        key_ok = offs_n < n_keys
        s = _logits(q, k_ptr, m_ptr, offs_m, offs_n, row_ok, key_ok, offs_d, d_ok, D, smq, smk, SCALE, MASK_MODE,
                    DOT_PRECISION)  # fmt: skip
        new_max = tl.maximum(row_max, tl.max(s, 1))
        rescale = tl.exp(row_max - new_max)
        p = tl.exp(s - new_max[:, None])
        row_sum = row_sum * rescale + tl.sum(p, 1)
        v = tl.load(v_ptr + offs_n[:, None] * DV + offs_j[None, :], mask=key_ok[:, None] & j_ok[None, :], other=0.0)
        acc = acc * rescale[:, None] + tl.dot(p.to(V.dtype.element_ty), v, input_precision=DOT_PRECISION)
        row_max = new_max
    lse = row_max + tl.log(row_sum)

    # 2. the text block of each row in one tile (head dim in chunks: shared memory independent of D): the
    # entmax threshold of S_t and the block's dense mass m = sum exp(S_t - lse)
    offs_t = t0 + tl.arange(0, BLOCK_T)
    text_ok = tl.arange(0, BLOCK_T) < n_text
    st = tl.zeros((BLOCK_M, BLOCK_T), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_K):
        offs_c = d0 + tl.arange(0, BLOCK_K)
        c_ok = offs_c < D
        qc = tl.load(q_ptr + offs_m[:, None] * D + offs_c[None, :], mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        kc = tl.load(k_ptr + offs_t[:, None] * D + offs_c[None, :], mask=text_ok[:, None] & c_ok[None, :],
                     other=0.0)  # fmt: skip
        st = tl.dot(qc, tl.trans(kc), st, input_precision=DOT_PRECISION)
    st = st * SCALE
    if MASK_MODE == 1:
        st += tl.load(m_ptr + offs_t * smk, mask=text_ok, other=0.0).to(tl.float32)[None, :]
    elif MASK_MODE == 2:
        st += tl.load(m_ptr + offs_m[:, None] * smq + offs_t[None, :] * smk,
                      mask=row_ok[:, None] & text_ok[None, :], other=0.0).to(tl.float32)  # fmt: skip
    st = tl.where(text_ok[None, :], tl.maximum(st, _MASKED), _MASKED)
    t = entmax_threshold(st, tl.max(st, 1), SPARSEMAX, STEPS)
    mass = tl.sum(tl.exp(st - lse[:, None]), 1)

    # 3. image-query rows: + lam (m entmax(S_t) - P_t) V_t, text keys BLOCK_N at a time (a text-only query
    # block skips it)
    lam = tl.load(LAM + tl.minimum(b, NL - 1))  # lam (B,) one per sample, or (1,); in bounds for any program
    is_image = (offs_m < t0) | (offs_m >= t0 + TL)
    weight = tl.where(is_image & row_ok, lam, 0.0)
    out = acc / row_sum[:, None]
    if tl.max(tl.abs(weight), 0) > 0:
        corr = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
        for n0 in range(0, TL, BLOCK_N):
            offs_n = t0 + n0 + tl.arange(0, BLOCK_N)
            key_ok = (n0 + tl.arange(0, BLOCK_N)) < n_text
            s = _logits(q, k_ptr, m_ptr, offs_m, offs_n, row_ok, key_ok, offs_d, d_ok, D, smq, smk, SCALE,
                        MASK_MODE, DOT_PRECISION)  # fmt: skip
            p_t = tl.exp(s - lse[:, None])
            c = weight[:, None] * (mass[:, None] * entmax_map(s, t, SPARSEMAX) - p_t)
            v = tl.load(v_ptr + offs_n[:, None] * DV + offs_j[None, :], mask=key_ok[:, None] & j_ok[None, :],
                        other=0.0)  # fmt: skip
            corr += tl.dot(c.to(V.dtype.element_ty), v, input_precision=DOT_PRECISION)
        out += corr
    out = tl.where((row_max > _MASKED / 10)[:, None], out, 0.0)  # a row whose keys are all masked gives zeros
    tl.store(o_ptr + offs_m[:, None] * DV + offs_j[None, :], out.to(OUT.dtype.element_ty),
             mask=row_ok[:, None] & j_ok[None, :])  # fmt: skip


@dataclasses.dataclass(frozen=True)
class JointConfig:
    """Everything that makes one compiled joint kernel. Lengths are run-time sizes: one kernel serves every
    image length and every text length up to ``block_t``; head dims up to ``block_d`` / ``block_dv``."""

    dtype: str
    mask_dtype: str
    scale: float
    alpha: float
    mask_mode: int
    text_first: bool
    steps: int
    block_m: int
    block_n: int
    block_t: int
    block_k: int
    block_d: int
    block_dv: int
    num_warps: int

    def constexprs(self) -> dict:
        """The kernel's tl.constexpr arguments, by name."""
        return {
            "SCALE": self.scale, "SPARSEMAX": self.alpha == 2.0, "STEPS": self.steps, "MASK_MODE": self.mask_mode,
            "TEXT_FIRST": self.text_first, "BLOCK_M": self.block_m, "BLOCK_N": self.block_n,
            "BLOCK_T": self.block_t, "BLOCK_K": self.block_k, "BLOCK_D": self.block_d, "BLOCK_DV": self.block_dv,
            "DOT_PRECISION": "ieee" if self.dtype == "fp32" else "tf32",
        }  # fmt: skip


def check_joint_supported(dtype: str, head_dim: int, value_dim: int, text_len: int, alpha: float, mask: int) -> None:
    """Raise KernelUnsupported naming what the joint kernel cannot do (the PyTorch operator covers the rest)."""
    if dtype not in DTYPES:
        raise KernelUnsupported(f"the joint kernel takes fp32, fp16 or bf16 q/k/v; got {dtype}")
    if alpha not in (1.5, 2.0):
        raise KernelUnsupported(f"the joint kernel is exact for alpha 1.5 and 2 only; got alpha={alpha}")
    if not 1 <= text_len <= MAX_TEXT:
        raise KernelUnsupported(f"the joint kernel holds at most {MAX_TEXT} text tokens in one tile; got {text_len}")
    if not (1 <= head_dim <= MAX_HEAD_DIM and 1 <= value_dim <= MAX_HEAD_DIM):
        raise KernelUnsupported(f"the joint kernel takes head dims up to {MAX_HEAD_DIM}; got {head_dim}/{value_dim}")
    if mask not in (MASK_NONE, MASK_KEYS, MASK_FULL):
        raise KernelUnsupported(f"unknown mask mode {mask}")


@functools.lru_cache(maxsize=256)
def joint_config(
    dtype: str, mask_dtype: str, head_dim: int, value_dim: int, text_len: int, alpha: float, scale: float,
    mask: int, text_first: bool,
) -> JointConfig:  # fmt: skip
    """Pick the joint kernel for one call site. text_len: the longest text it will see.

    The query tile, warps and head-dim chunk are the cross kernel's for the same key tile (``QUERY_TILES``):
    the text tile's threshold solve is the cross kernel's whole-row solve; the dense pass and the correction
    walk the keys 32 at a time with the whole head dim (``block_d``) of the query block in registers.
    Not yet measured on a GPU."""
    check_joint_supported(dtype, head_dim, value_dim, text_len, alpha, mask)
    if mask_dtype not in DTYPES:
        raise KernelUnsupported(f"the mask must be fp32, fp16 or bf16; got {mask_dtype}")
    block_t = next(n for n in TEXT_TILES if text_len <= n)
    block_m, warps = QUERY_TILES[dtype == "fp32", block_t]
    if dtype == "fp32" and max(head_dim, value_dim) > 64:  # the float32 query block and its row of k stay within 48 KiB
        block_m = min(block_m, 32)
    return JointConfig(
        dtype=dtype, mask_dtype=mask_dtype, scale=float(scale), alpha=float(alpha), mask_mode=mask,
        text_first=bool(text_first), steps=newton_steps(float(alpha), block_t), block_m=block_m, block_n=32,
        block_t=block_t, block_k=32 if dtype != "fp32" and block_t == 128 else 16,
        block_d=max(16, triton.next_power_of_2(head_dim)), block_dv=max(16, triton.next_power_of_2(value_dim)),
        num_warps=warps,
    )  # fmt: skip


def joint_extra_args(q_shape, v_shape, text_len, mask_shape, lam_shape) -> list:
    """The int32 size arguments, in kernel order (``JOINT_EXTRA_ARGS``)."""
    return [q_shape[0], q_shape[1], q_shape[2], text_len, q_shape[3], v_shape[3], *mask_shape, lam_shape[0]]


def joint_supported(q, k, v, attn_mask, alpha: float, text_len: int) -> bool:
    """Whether the joint kernel covers this call (else the PyTorch operator runs)."""
    if text_len == 0 or q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or q.dtype not in _TORCH_DTYPES:
        return False
    if not (q.shape[-2] == k.shape[-2] == v.shape[-2]):
        return False
    try:
        check_joint_supported(_TORCH_DTYPES[q.dtype], q.shape[-1], v.shape[-1], text_len, alpha, MASK_NONE)
    except KernelUnsupported:
        return False
    return attn_mask is None or attn_mask.dim() <= 4


def joint_attention(q, k, v, attn_mask, lam, alpha: float, scale: float, text_len: int, text_first: bool, wrap=None):
    """Launch the joint kernel. q, k: (B, H, L, D), v: (B, H, L, Dv) (broadcastable batch/head dims, any
    strides: made contiguous); the first (text_first) or last ``text_len`` tokens are text; attn_mask: bool or
    additive, broadcastable to (B, H, L, L), or None; lam: a float or a float32 tensor (B,) or (1,).
    Returns (B, H, L, Dv) contiguous, in q's dtype. wrap: as in ``attention.attention``."""
    b, h = (max(x) for x in zip(q.shape[:2], k.shape[:2], v.shape[:2], strict=True))
    length, d, dv = q.shape[-2], q.shape[-1], v.shape[-1]
    q, k, v = (t.expand(b, h, *t.shape[2:]).contiguous() for t in (q, k, v))
    mask = _mask4(attn_mask, b, h, length, length, q.device)
    lam = _lam_tensor(lam, b, q.device)
    cfg = joint_config(_TORCH_DTYPES[q.dtype], _TORCH_DTYPES.get(mask.dtype, "fp32"), d, dv, text_len, alpha,
                       scale, mask_mode(mask.shape), text_first)  # fmt: skip
    if mask.dtype not in _TORCH_DTYPES:
        mask = mask.float()
    out = torch.empty((b, h, length, dv), device=q.device, dtype=q.dtype)
    grid = launch(b, h, length, block_m=cfg.block_m, num_warps=cfg.num_warps, shared_mem=0).grid
    sizes = joint_extra_args(q.shape, v.shape, text_len, mask.shape, lam.shape)
    kernel = pladis_joint_fwd if wrap is None else wrap(pladis_joint_fwd)
    kernel[grid](q, k, v, mask, lam, *sizes, out, **cfg.constexprs(), num_warps=cfg.num_warps)
    return out
