"""The fused PLADIS cross-attention kernel (Triton), forward only: one source for every backend.

One program per (batch x head, block of queries), in one of two forms chosen by the ``KEY_TILED`` constexpr:

- single tile (the default of every call site, ``kernel_config``): the whole key row in one tile (Lk <= 512:
  CLIP 77, T5 120-512): ``S = Q K^T * scale`` with float32 accumulation (the head dim in chunks, so shared
  memory does not grow with it), the additive mask, row max, softmax, the alpha-entmax threshold in float32
  registers (the same sort-free Newton + closed form as the ONNX body), ``P = softmax + lam[b] (entmax -
  softmax)``, then ``P V`` in the value dtype (value columns in chunks);
- key-tiled (``kernel_config(..., tiled=True)``, ``tiled_config``): the key row in tiles of ``BLOCK_N`` keys,
  ``S`` recomputed tile by tile in each pass, so no register tile grows with the row: one pass for the row
  max; one per Newton step of the threshold, adding up the row sums the step needs (sum r, sum r^2, the
  support size; the first pass also the softmax denominator), entmax15's closed form one more; a last pass
  forms ``P`` tile by tile and accumulates ``P V`` in float32 from ``P`` in the value dtype. The threshold
  steps are the single tile's functions (``threshold_start``, ``newton_update``, ``closed_form``), so both
  forms compute the same formula and differ only in the order of float32 additions. Newton steps are chosen
  for the real key count (padding keys add nothing to the sums).

The argument order is the one TensorRT uses to launch an ahead-of-time compiled plugin kernel, so the
PyTorch launcher (``attention``) and the TensorRT plugin (``pladis.plugins_trt``) launch the same function:

    q, k, v, mask, lam                      input pointers (q, k, v, out contiguous (B, H, L, D), or q, k, v
                                            (B, L, H, D) with the BLHD constexpr; mask contiguous in its own
                                            broadcastable shape; lam float32 (B,) or (1,))
    B, H, LQ, LK, D, DV, MB, MH, MQ, MK, NL int32 sizes (``extra_args``): batch, heads, query and key lengths,
                                            head dims of q/k and v, the mask's four dims, lam's length
    out                                     output pointer
    SCALE, SPARSEMAX, STEPS, MASK_MODE,     tl.constexpr: logit scale, alpha (2: sparsemax), Newton steps,
    BLOCK_*, PV_COLUMNS, DOT_PRECISION,     mask specialisation, tiles, how P V is formed, float32 products,
    BLHD, KEY_TILED                         q/k/v memory layout (False for TensorRT: its tensors are linear),
                                            single tile or key-tiled

Strides are derived from the sizes (a mask dim of size 1 broadcasts), so no stride is an argument. The grid
(``launch``) is ``(cdiv(LQ, BLOCK_M), min(B*H, 65535), cdiv(B*H, 65535))``; programs past ``B*H`` do nothing.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl

from pladis.errors import PladisError, SettingError
from pladis.numerics import MASKED, constant, newton_steps

MAX_KEYS = 512  # one tile holds the whole key row; longer rows use the PyTorch operator (joint: kernels.joint)
MAX_HEAD_DIM = 256
GRID_YZ_MAX = 65535  # CUDA's limit on grid y and z
SHARED_MEMORY_LIMIT = 48 * 1024  # the default dynamic shared memory a launch may use without an opt-in
MASK_NONE, MASK_KEYS, MASK_FULL = 0, 1, 2  # constexpr MASK_MODE
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
EXTRA_ARGS = ("B", "H", "LQ", "LK", "D", "DV", "MB", "MH", "MQ", "MK", "NL")  # the int32 sizes, in kernel order
_MASKED = tl.constexpr(MASKED)  # a global used in a jit function must be constexpr
_GRID_YZ_MAX = tl.constexpr(GRID_YZ_MAX)


@triton.jit
def threshold_start(smax, SPARSEMAX: tl.constexpr):
    """The lower end of the threshold's bracket, from each row's maximum logit smax (BLOCK_M,), in units of s:
    max - 1 for sparsemax, max - 2 for entmax15 (t = 2 tau)."""
    if SPARSEMAX:
        t = smax - 1.0
    else:
        t = smax - 2.0
    return t


@triton.jit
def newton_update(t, s1, count, norm, SPARSEMAX: tl.constexpr):
    """One Newton step of the threshold t (BLOCK_M,) from the row sums at t: s1 = sum r, count = the support
    size (sparsemax), norm = sqrt(sum r^2) (entmax15). Sparsemax (Michelot): tau += (sum r - 1) / |support|;
    entmax15 in units of s: Newton on ||r|| / 2 - 1."""
    if SPARSEMAX:
        t += (s1 - 1.0) / tl.maximum(count, 1.0)
    else:
        t += (norm - 2.0) * norm / tl.maximum(s1, 1e-30)
    return t


@triton.jit
def closed_form(t, k_sup, s1, s2):
    """entmax15's exact threshold on the support Newton found, from the row sums at t: k_sup = the support
    size (at least 1), s1 = sum r, s2 = sum r^2."""
    return t + (s1 - tl.sqrt(tl.maximum(s1 * s1 - k_sup * (s2 - 4.0), 0.0))) / k_sup


@triton.jit
def entmax_threshold(s, smax, SPARSEMAX: tl.constexpr, STEPS: tl.constexpr):
    """The alpha-entmax threshold of each row of finite float32 logits s (BLOCK_M, BLOCK_N) whose row maxima
    are smax, in units of s: sparsemax's tau, or t = 2 tau for entmax15. The sort-free solve of every
    implementation (docs/NUMERICS.md §2): Newton from the lower end of the bracket, then (entmax15) the closed
    form. The key-tiled kernel takes the same steps (``threshold_start``, ``newton_update``, ``closed_form``)
    on row sums added up over its key tiles (``_tiled_sums``); here each sum is one reduction of the whole row."""
    t = threshold_start(smax, SPARSEMAX)
    for _ in range(STEPS):
        r = tl.maximum(s - t[:, None], 0.0)
        if SPARSEMAX:
            count = tl.sum(tl.where(s > t[:, None], 1.0, 0.0), 1)
            t = newton_update(t, tl.sum(r, 1), count, count, SPARSEMAX)
        else:
            norm = tl.sqrt(tl.sum(r * r, 1))
            t = newton_update(t, tl.sum(r, 1), norm, norm, SPARSEMAX)
    if not SPARSEMAX:
        r = tl.maximum(s - t[:, None], 0.0)
        k_sup = tl.maximum(tl.sum(tl.where(s > t[:, None], 1.0, 0.0), 1), 1.0)
        t = closed_form(t, k_sup, tl.sum(r, 1), tl.sum(r * r, 1))
    return t


@triton.jit
def entmax_map(s, t, SPARSEMAX: tl.constexpr):
    """alpha-entmax of logits s (BLOCK_M, BLOCK_N) given each row's threshold t (``entmax_threshold``); s may
    be any block of the row's keys."""
    r = tl.maximum(s - t[:, None], 0.0)
    if not SPARSEMAX:
        r = r * r * 0.25
    return r


@triton.jit
def _scores(q_ptr, k_ptr, M, b, h, MB, MH, MQ, MK, offs_m, offs_n, row_ok, key_ok, D, sqk, SCALE: tl.constexpr,
            MASK_MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
            DOT_PRECISION: tl.constexpr):  # fmt: skip
    """Masked float32 logits (BLOCK_M, BLOCK_N) of query rows offs_m against keys offs_n: ``Q K^T * scale``
    (the head dim in chunks of BLOCK_K: shared memory independent of D) plus the additive mask M of dims (MB,
    MH, MQ, MK) at sample b, head h; padding keys (not key_ok) and -inf at ``MASKED`` (finite, far below)."""
    s = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_K):
        offs_d = d0 + tl.arange(0, BLOCK_K)
        d_ok = offs_d < D
        q = tl.load(q_ptr + offs_m[:, None] * sqk + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        k = tl.load(k_ptr + offs_n[:, None] * sqk + offs_d[None, :], mask=key_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), s, input_precision=DOT_PRECISION)
    s = s * SCALE
    if MASK_MODE != 0:
        # a mask dim of size 1 broadcasts (stride 0); otherwise it equals the attention dim (contiguous)
        smk = tl.where(MK == 1, 0, 1).to(tl.int64)
        smq = tl.where(MQ == 1, 0, MK).to(tl.int64)
        smh = tl.where(MH == 1, 0, MQ * MK).to(tl.int64)
        smb = tl.where(MB == 1, 0, MH * MQ).to(tl.int64) * MK
        m_ptr = M + b.to(tl.int64) * smb + h.to(tl.int64) * smh
        if MASK_MODE == 1:  # one row of keys per sample (padding masks): loaded once, shared by the query rows
            s += tl.load(m_ptr + offs_n * smk, mask=key_ok, other=0.0).to(tl.float32)[None, :]
        else:
            s += tl.load(m_ptr + offs_m[:, None] * smq + offs_n[None, :] * smk,
                         mask=row_ok[:, None] & key_ok[None, :], other=0.0).to(tl.float32)  # fmt: skip
    return tl.where(key_ok[None, :], tl.maximum(s, _MASKED), _MASKED)


@triton.jit
def _tiled_sums(q_ptr, k_ptr, M, b, h, MB, MH, MQ, MK, offs_m, row_ok, n_keys, LK, D, sqk, t, smax,
                SCALE: tl.constexpr, MASK_MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, SPARSEMAX: tl.constexpr, CLOSED: tl.constexpr,
                EXP_SUM: tl.constexpr):  # fmt: skip
    """One pass over the key row in tiles of BLOCK_N: of r = max(s - t, 0) at thresholds t (BLOCK_M,), each
    row's sum r, sum r^2 (entmax15) and support size |{s > t}| (sparsemax, and the closed form: CLOSED) added
    up over the tiles, and (EXP_SUM) the softmax denominator sum exp(s - smax); float32 (BLOCK_M,) each (zeros
    for what the step does not need)."""
    s1 = tl.zeros((BLOCK_M,), tl.float32)
    s2 = tl.zeros((BLOCK_M,), tl.float32)
    count = tl.zeros((BLOCK_M,), tl.float32)
    esum = tl.zeros((BLOCK_M,), tl.float32)
    for n0 in range(0, LK, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        s = _scores(q_ptr, k_ptr, M, b, h, MB, MH, MQ, MK, offs_m, offs_n, row_ok, offs_n < n_keys, D, sqk,
                    SCALE, MASK_MODE, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)  # fmt: skip
        r = tl.maximum(s - t[:, None], 0.0)
        s1 += tl.sum(r, 1)
        if not SPARSEMAX:
            s2 += tl.sum(r * r, 1)
        if SPARSEMAX or CLOSED:
            count += tl.sum(tl.where(s > t[:, None], 1.0, 0.0), 1)
        if EXP_SUM:
            esum += tl.sum(tl.exp(s - smax[:, None]), 1)
    return s1, s2, count, esum


@triton.jit
def pladis_fwd(
    Q, K, V, M, LAM,
    B, H, LQ, LK, D, DV, MB, MH, MQ, MK, NL,
    OUT,
    SCALE: tl.constexpr, SPARSEMAX: tl.constexpr, STEPS: tl.constexpr,
    MASK_MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_DV: tl.constexpr, PV_COLUMNS: tl.constexpr, DOT_PRECISION: tl.constexpr, BLHD: tl.constexpr = False,
    KEY_TILED: tl.constexpr = False,
):  # fmt: skip
    pid_m = tl.program_id(0)
    bh = tl.program_id(2) * _GRID_YZ_MAX + tl.program_id(1)
    bh_ok = bh < B * H
    b, h = bh // H, bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    # programs past B*H read and write nothing (`< where(...)`, not `& bh_ok`: Triton's interpreter mistypes
    # tensor & scalar)
    row_ok = offs_m < tl.where(bh_ok, LQ, 0)
    n_keys = tl.where(bh_ok, LK, 0)
    # 64-bit offsets of one (b, h) slab: batch x head x length x dim overflows int32 for long sequences.
    # BLHD: q, k, v laid out (B, L, H, D) in memory, as diffusers' projections are (rows H*D apart); out is
    # always (B, H, Lq, Dv) contiguous (what the op's fake implementation promises torch.compile).
    if BLHD:
        q_ptr = Q + (b.to(tl.int64) * LQ * H + h) * D
        k_ptr = K + (b.to(tl.int64) * LK * H + h) * D
        v_ptr = V + (b.to(tl.int64) * LK * H + h) * DV
        sqk = H * D
        sv = H * DV
    else:
        q_ptr = Q + bh.to(tl.int64) * LQ * D
        k_ptr = K + bh.to(tl.int64) * LK * D
        v_ptr = V + bh.to(tl.int64) * LK * DV
        sqk = D
        sv = DV
    o_ptr = OUT + bh.to(tl.int64) * LQ * DV
    if KEY_TILED:
        # The key row in tiles of BLOCK_N, S recomputed in each pass: 1. the row max; 2. each Newton step of
        # the threshold is one pass adding up its row sums (the first also the softmax denominator); entmax15's
        # closed form one more; 3. P = softmax + lam (entmax - softmax) tile by tile, P V accumulated in float32
        # (value columns in chunks of BLOCK_DV, one chunk when BLOCK_DV >= DV).
        smax = tl.full((BLOCK_M,), _MASKED, tl.float32)
        for n0 in range(0, LK, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            s = _scores(q_ptr, k_ptr, M, b, h, MB, MH, MQ, MK, offs_m, offs_n, row_ok, offs_n < n_keys, D, sqk,
                        SCALE, MASK_MODE, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)  # fmt: skip
            smax = tl.maximum(smax, tl.max(s, 1))
        t = threshold_start(smax, SPARSEMAX)
        s1, s2, count, esum = _tiled_sums(q_ptr, k_ptr, M, b, h, MB, MH, MQ, MK, offs_m, row_ok, n_keys, LK, D,
                                          sqk, t, smax, SCALE, MASK_MODE, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION,
                                          SPARSEMAX, False, True)  # fmt: skip
        t = newton_update(t, s1, count, tl.sqrt(s2), SPARSEMAX)
        for _ in range(STEPS - 1):
            s1, s2, count, _e = _tiled_sums(q_ptr, k_ptr, M, b, h, MB, MH, MQ, MK, offs_m, row_ok, n_keys, LK, D,
                                            sqk, t, smax, SCALE, MASK_MODE, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION,
                                            SPARSEMAX, False, False)  # fmt: skip
            t = newton_update(t, s1, count, tl.sqrt(s2), SPARSEMAX)
        if not SPARSEMAX:
            s1, s2, count, _e = _tiled_sums(q_ptr, k_ptr, M, b, h, MB, MH, MQ, MK, offs_m, row_ok, n_keys, LK, D,
                                            sqk, t, smax, SCALE, MASK_MODE, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION,
                                            SPARSEMAX, True, False)  # fmt: skip
            t = closed_form(t, tl.maximum(count, 1.0), s1, s2)
        inv_sum = 1.0 / esum
        lam = tl.load(LAM + tl.minimum(b, NL - 1))  # lam (B,) one per sample, or (1,); in bounds for any program
        for j0 in range(0, DV, BLOCK_DV):
            offs_j = j0 + tl.arange(0, BLOCK_DV)
            j_ok = offs_j < DV
            acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
            for n0 in range(0, LK, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                key_ok = offs_n < n_keys
                s = _scores(q_ptr, k_ptr, M, b, h, MB, MH, MQ, MK, offs_m, offs_n, row_ok, key_ok, D, sqk, SCALE,
                            MASK_MODE, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)  # fmt: skip
                dense = tl.exp(s - smax[:, None]) * inv_sum[:, None]
                p = dense + lam * (entmax_map(s, t, SPARSEMAX) - dense)
                p = tl.where((smax > _MASKED / 10)[:, None], p, 0.0)  # a row whose keys are all masked: zeros
                p = p.to(V.dtype.element_ty)
                v = tl.load(v_ptr + offs_n[:, None] * sv + offs_j[None, :], mask=key_ok[:, None] & j_ok[None, :],
                            other=0.0)  # fmt: skip
                acc = tl.dot(p, v, acc, input_precision=DOT_PRECISION)
            tl.store(o_ptr + offs_m[:, None] * DV + offs_j[None, :], acc.to(OUT.dtype.element_ty),
                     mask=row_ok[:, None] & j_ok[None, :])  # fmt: skip
    else:
        # the whole key row in one tile (BLOCK_N >= LK)
        offs_n = tl.arange(0, BLOCK_N)
        key_ok = offs_n < n_keys
        s = _scores(q_ptr, k_ptr, M, b, h, MB, MH, MQ, MK, offs_m, offs_n, row_ok, key_ok, D, sqk, SCALE, MASK_MODE,
                    BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)  # fmt: skip
        smax = tl.max(s, 1)
        e = tl.exp(s - smax[:, None])
        dense = e / tl.sum(e, 1)[:, None]
        sparse = entmax_map(s, entmax_threshold(s, smax, SPARSEMAX, STEPS), SPARSEMAX)
        lam = tl.load(LAM + tl.minimum(b, NL - 1))  # lam (B,) one per sample, or (1,); in bounds for any program
        p = dense + lam * (sparse - dense)
        p = tl.where((smax > _MASKED / 10)[:, None], p, 0.0)  # a row whose keys are all masked gives zeros
        p = p.to(V.dtype.element_ty)
        if PV_COLUMNS:  # one value column at a time: nothing staged in shared memory (float32 at 512 keys)
            for j in range(0, DV):
                v = tl.load(v_ptr + offs_n * sv + j, mask=key_ok, other=0.0)
                o = tl.sum(p * v[None, :], 1)
                tl.store(o_ptr + offs_m * DV + j, o.to(OUT.dtype.element_ty), mask=row_ok)
        else:
            for j0 in range(0, DV, BLOCK_DV):  # value columns in chunks, each stored when done
                offs_j = j0 + tl.arange(0, BLOCK_DV)
                j_ok = offs_j < DV
                v = tl.load(v_ptr + offs_n[:, None] * sv + offs_j[None, :], mask=key_ok[:, None] & j_ok[None, :],
                            other=0.0)  # fmt: skip
                o = tl.dot(p, v, input_precision=DOT_PRECISION)
                tl.store(o_ptr + offs_m[:, None] * DV + offs_j[None, :], o.to(OUT.dtype.element_ty),
                         mask=row_ok[:, None] & j_ok[None, :])  # fmt: skip


# --------------------------------------------------------------------------------------------------
# What to compile and how to launch it: plain functions shared by the PyTorch launcher and the plugin
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Everything that makes one compiled kernel: pointer types, constexprs, warps. Head dims and lengths are
    run-time sizes, so one kernel serves every head dim and every key length up to ``block_n``.

    dtype: q/k/v/out type ("fp32", "fp16", "bf16"); mask_dtype: the additive mask's type; block_n: the key
    tile (``KEY_TILES``); steps: Newton steps for up to ``block_n`` keys.
    """

    dtype: str
    mask_dtype: str
    scale: float
    alpha: float
    mask_mode: int
    steps: int
    block_m: int
    block_n: int
    block_k: int
    block_dv: int
    pv_columns: bool
    num_warps: int
    blhd: bool = False  # q, k, v in (B, L, H, D) memory (the PyTorch launcher only; TensorRT: False)
    key_tiled: bool = False  # the key row in tiles of block_n, several passes (any key length); else one tile
    max_registers: int | None = None  # ptxas's cap on registers per thread (maxnreg); None: ptxas chooses

    def constexprs(self) -> dict:
        """The kernel's tl.constexpr arguments, by name."""
        return {
            "SCALE": self.scale, "SPARSEMAX": self.alpha == 2.0, "STEPS": self.steps, "MASK_MODE": self.mask_mode,
            "BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k, "BLOCK_DV": self.block_dv,
            "PV_COLUMNS": self.pv_columns, "BLHD": self.blhd, "KEY_TILED": self.key_tiled,
            # float32 inputs keep float32 products (tensor cores would round them to tf32's 10-bit mantissa)
            "DOT_PRECISION": "ieee" if self.dtype == "fp32" else "tf32",
        }  # fmt: skip


KEY_TILES = (128, 512)  # the key tile: the smallest that holds the call site's longest key row


@functools.lru_cache(maxsize=256)
def kernel_config(
    dtype: str,
    mask_dtype: str,
    head_dim: int,
    value_dim: int,
    max_keys: int,
    alpha: float,
    scale: float,
    mask_mode: int,
    blhd: bool = False,
    tiled: bool = False,
) -> KernelConfig:
    """Pick the kernel for one call site. max_keys: the longest key row it will see (a shape profile's max).
    tiled: the key-tiled variant (``tiled_config``) instead of the single-tile kernel every call site uses.

    fp32: the (BLOCK_M, BLOCK_N) float32 score tile holds 8192 elements, over 8 warps. fp16/bf16: the tiles
    and warps the H200 measured fastest (``make gpu-check``'s kernel_tiles case, 2026-11-26, fp16, CUDA graph
    replay, same error): 64 x 128 at 4 warps (SDXL, 77 keys: 0.040 ms vs 0.048 at 8 warps) and 32 x 512 at 8
    warps (PixArt, 300 padded keys: 0.66 ms vs 1.05 for 16 x 512). What a dot stages in shared memory
    (BLOCK_N x BLOCK_K of k, BLOCK_M x BLOCK_N of P, BLOCK_N x BLOCK_DV of v) stays within the 48 KiB default;
    float32 at 512 keys would not (P alone is 32 KiB), so it forms ``P V`` a column at a time without
    staging. tests/test_kernels.py compiles each of these kernels for sm_80-sm_90 and checks.
    """
    check_supported(dtype, head_dim, value_dim, max_keys, alpha, mask_mode)
    if mask_dtype not in DTYPES:
        raise KernelUnsupported(f"the mask must be fp32, fp16 or bf16; got {mask_dtype}")
    if tiled:
        return tiled_config(dtype, mask_dtype, head_dim, value_dim, max_keys, alpha, scale, mask_mode, blhd,
                            *TILED_TILES[dtype == "fp32"])  # fmt: skip
    block_n = next(n for n in KEY_TILES if max_keys <= n)
    chunk = 32 if dtype != "fp32" and block_n == 128 else 16  # head-dim / value-column chunk of the dots
    block_m, warps = QUERY_TILES[dtype == "fp32", block_n]
    return KernelConfig(
        dtype=dtype, mask_dtype=mask_dtype, scale=float(scale), alpha=float(alpha), mask_mode=mask_mode,
        steps=newton_steps(float(alpha), block_n), block_m=block_m, block_n=block_n, block_k=chunk,
        block_dv=chunk, pv_columns=dtype == "fp32" and block_n == 512, num_warps=warps, blhd=blhd,
    )  # fmt: skip


# (fp32?, key tile) -> (query tile BLOCK_M, warps); see kernel_config
QUERY_TILES = {(True, 128): (64, 8), (True, 512): (16, 8), (False, 128): (64, 4), (False, 512): (32, 8)}

# The key-tiled variant: fp32? -> (query tile BLOCK_M, key tile BLOCK_N, warps). Not yet measured on a GPU:
# 64 x 64 at 8 warps is the largest query tile whose sm_80 / sm_90 build (ptxas -v, num_stages 1) spills no
# register with the 128-column value chunk a head dim of 72-128 takes (64 x 64 at 4 warps spills on sm_90).
TILED_TILES = {False: (64, 64, 8), True: (64, 64, 8)}
# (BLOCK_M, BLOCK_N, warps, BLOCK_DV or None for tiled_config's rule, register cap or None) of the key-tiled
# variant that the GPU benchmarks time (``sweep_configs``). The value chunk sets the registers the P V pass needs
# (its v tile and accumulator), against one more pass per chunk past it; a register cap of 128 lets two programs
# of 8 warps share an SM, against some spilling (ptxas -v: a few hundred bytes).
TILED_SWEEP = (
    (32, 64, 4, None, None), (64, 64, 4, None, None), (32, 64, 8, None, None), (64, 64, 8, None, None),
    (128, 64, 8, None, None), (64, 128, 8, None, None), (64, 64, 4, 32, None), (64, 64, 8, 64, None),
    (64, 64, 8, None, 128), (32, 64, 4, None, 128),
)  # fmt: skip


def tiled_config(
    dtype: str, mask_dtype: str, head_dim: int, value_dim: int, max_keys: int, alpha: float, scale: float,
    mask_mode: int, blhd: bool, block_m: int, block_n: int, num_warps: int, block_dv: int | None = None,
    max_registers: int | None = None,
) -> KernelConfig:  # fmt: skip
    """The key-tiled kernel (``KEY_TILED``) with these tiles: the row in tiles of ``block_n`` recomputed in each
    pass, so nothing grows with the key row (the kernel takes any length; ``check_supported`` keeps the single
    tile's ``MAX_KEYS``, the coverage the rest of pladis states). Newton steps for the real ``max_keys`` (padding
    keys add nothing to the row sums: numerics.NEWTON_STEPS counts keys, not tiles). The head dim goes in chunks
    of 32 (16 when it is no multiple of 32, and for fp32); the value columns in one chunk up to 128 (64 for fp32;
    ``block_dv`` sets another chunk), so ``P V`` needs one final pass up to that value dim. ``max_registers``:
    ptxas's register cap, None to leave it to ptxas. What a dot stages in shared memory (BLOCK_N x BLOCK_K of k,
    BLOCK_M x BLOCK_N of P, BLOCK_N x BLOCK_DV of v) stays within the 48 KiB default for the default tiles
    (tests/test_kernels.py compiles them for sm_80-sm_90)."""
    check_supported(dtype, head_dim, value_dim, max_keys, alpha, mask_mode)
    if mask_dtype not in DTYPES:
        raise KernelUnsupported(f"the mask must be fp32, fp16 or bf16; got {mask_dtype}")
    fp32 = dtype == "fp32"
    block_k = 32 if not fp32 and head_dim % 32 == 0 else 16
    if block_dv is None:
        block_dv = max(16, min(64 if fp32 else 128, triton.next_power_of_2(value_dim)))
    return KernelConfig(
        dtype=dtype, mask_dtype=mask_dtype, scale=float(scale), alpha=float(alpha), mask_mode=mask_mode,
        steps=newton_steps(float(alpha), max_keys), block_m=block_m, block_n=block_n, block_k=block_k,
        block_dv=block_dv, pv_columns=False, num_warps=num_warps, blhd=blhd, key_tiled=True,
        max_registers=max_registers,
    )  # fmt: skip


def sweep_configs(
    dtype: str, mask_dtype: str, head_dim: int, value_dim: int, max_keys: int, alpha: float, scale: float,
    mask_mode: int,
) -> dict[str, KernelConfig]:  # fmt: skip
    """The kernels a GPU benchmark times for one call site, by name: the chosen single-tile kernel
    (``kernel_config``, "single tile ... (default)") and the key-tiled variant at each of ``TILED_SWEEP``
    (the one ``kernel_config(..., tiled=True)`` picks marked "(tiled default)"), each config once."""
    args = (dtype, mask_dtype, head_dim, value_dim, max_keys, alpha, scale, mask_mode)
    base = kernel_config(*args)
    tiled = kernel_config(*args, tiled=True)
    out = {f"single tile {base.block_m}x{base.block_n}, {base.num_warps} warps (default)": base}
    for block_m, block_n, warps, block_dv, regs in TILED_SWEEP:
        cfg = tiled_config(*args, False, block_m, block_n, warps, block_dv, regs)
        if cfg in out.values():  # an explicit value chunk that the rule gives anyway: timed once
            continue
        name = f"tiled {block_m}x{block_n}, {warps} warps" + (f", {block_dv} value columns" if block_dv else "")
        name += f", <= {regs} registers" if regs else ""
        out[name + (" (tiled default)" if cfg == tiled else "")] = cfg
    return out


class KernelUnsupported(PladisError):
    """The fused kernel does not cover these shapes or parameters (a build that needs it reports this)."""


def check_supported(dtype: str, head_dim: int, value_dim: int, max_keys: int, alpha: float, mask_mode: int) -> None:
    """Raise KernelUnsupported naming what the kernel cannot do (the PyTorch operator covers the rest)."""
    if dtype not in DTYPES:
        raise KernelUnsupported(f"the fused kernel takes fp32, fp16 or bf16 q/k/v; got {dtype}")
    if alpha not in (1.5, 2.0):
        raise KernelUnsupported(f"the fused kernel is exact for alpha 1.5 and 2 only; got alpha={alpha}")
    if not (1 <= max_keys <= MAX_KEYS):
        raise KernelUnsupported(
            f"the fused kernel holds at most {MAX_KEYS} keys in one tile; this call site has up to {max_keys} "
            "(export with a shorter text length, or use --backend ort/aoti)"
        )
    if not (1 <= head_dim <= MAX_HEAD_DIM and 1 <= value_dim <= MAX_HEAD_DIM):
        raise KernelUnsupported(f"the fused kernel takes head dims up to {MAX_HEAD_DIM}; got {head_dim}/{value_dim}")
    if mask_mode not in (MASK_NONE, MASK_KEYS, MASK_FULL):
        raise KernelUnsupported(f"unknown mask mode {mask_mode}")


def mask_mode(mask_shape) -> int:
    """The mask specialisation from the mask's 4 dims (an int, or None for a dim only known at run time).

    (1, 1, 1, 1): a constant shift of every logit, which neither softmax nor entmax sees (the exporter's
    "no mask" zero): not read. A query dim of 1 ((B, 1, 1, Lk) padding): one key row per program. Else full.
    """
    if len(mask_shape) != 4:
        raise KernelUnsupported(f"the mask must have rank 4 (broadcastable to (B, H, Lq, Lk)); got {len(mask_shape)}")
    if all(d == 1 for d in mask_shape):
        return MASK_NONE
    return MASK_KEYS if mask_shape[2] == 1 else MASK_FULL


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclasses.dataclass(frozen=True)
class Launch:
    """Grid (x, y, z), block (x, y, z) and dynamic shared memory of one launch (ints or TensorRT expressions)."""

    grid: tuple
    block: tuple
    shared_mem: object


def launch(batch, heads, q_len, *, block_m: int, num_warps: int, shared_mem: int, cdiv=_cdiv, minimum=min) -> Launch:
    """The launch of ``pladis_fwd`` for sizes that are ints (PyTorch) or TensorRT shape expressions (plugin:
    ``cdiv=trtp.cdiv, minimum=trtp.min``). Only ``*``, ``cdiv`` and ``minimum`` are applied to the sizes, so
    the same arithmetic is valid for both; no Python branch depends on a size."""
    bh = batch * heads
    return Launch(
        grid=(cdiv(q_len, block_m), minimum(bh, GRID_YZ_MAX), cdiv(bh, GRID_YZ_MAX)),
        block=(num_warps * 32, 1, 1),
        shared_mem=shared_mem,
    )


def extra_args(q_shape, k_shape, v_shape, mask_shape, lam_shape) -> list:
    """The int32 size arguments, in kernel order (``EXTRA_ARGS``), from the input shapes (ints or expressions)."""
    return [q_shape[0], q_shape[1], q_shape[2], k_shape[2], q_shape[3], v_shape[3], *mask_shape, lam_shape[0]]


# --------------------------------------------------------------------------------------------------
# The PyTorch launcher: the CUDA implementation of pladis::attention
# --------------------------------------------------------------------------------------------------

_TORCH_DTYPES = {v: k for k, v in DTYPES.items()}


def supported(q, k, v, attn_mask, alpha: float, text_len: int) -> bool:
    """Whether the kernel covers this call (else the PyTorch operator runs)."""
    if text_len != 0 or q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or q.dtype not in _TORCH_DTYPES:
        return False
    try:
        check_supported(_TORCH_DTYPES[q.dtype], q.shape[-1], v.shape[-1], k.shape[-2], alpha, MASK_NONE)
    except KernelUnsupported:
        return False
    return attn_mask is None or attn_mask.dim() <= 4


def _lam_tensor(lam, batch: int, device) -> torch.Tensor:
    """lam as the kernel reads it: float32 (B,) or (1,) on q's device, from a float or such a tensor."""
    if not isinstance(lam, torch.Tensor):
        return constant(float(lam), (1,), device)
    lam = lam.to(device=device, dtype=torch.float32).reshape(-1).contiguous()
    if lam.numel() not in (1, batch):
        raise SettingError(
            "lam", f"lam must hold 1 or B={batch} values (one per batch sample); got shape {tuple(lam.shape)}: pass "
            "one strength, or one per sample"
        )  # fmt: skip
    return lam


def _mask4(attn_mask, b: int, h: int, lq: int, lk: int, device) -> torch.Tensor:
    """The mask as the kernel reads it: additive, rank 4, each dim 1 or the full size, contiguous."""
    if attn_mask is None:
        return constant(0.0, (1, 1, 1, 1), device)
    if attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros((), device=device).masked_fill(~attn_mask, float("-inf"))
    m = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    full = (b, h, lq, lk)
    return m.expand(*(1 if m.shape[i] == 1 else full[i] for i in range(4))).contiguous()


def attention(q, k, v, attn_mask, lam, alpha: float, scale: float, wrap=None) -> torch.Tensor:
    """Launch the kernel. q: (B, H, Lq, D), k: (B, H, Lk, D), v: (B, H, Lk, Dv) (broadcastable batch/head dims,
    any strides: read in place when all three are (B, L, H, D) in memory, else made contiguous); attn_mask:
    bool or additive, broadcastable to (B, H, Lq, Lk), or None; lam: a float or a float32 tensor (B,) or (1,).
    Returns (B, H, Lq, Dv) contiguous, in q's dtype.

    wrap: None for a plain launch; a compiler's kernel wrapper (``torch.library.wrap_triton``) while a compiler
    traces into the op (``pladis.kernels.traced_kernel``)."""
    b, h = (max(x) for x in zip(q.shape[:2], k.shape[:2], v.shape[:2], strict=True))
    lq, lk, d, dv = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    # diffusers hands over (B, L, H, D) projections viewed as (B, H, L, D): read them in place (3 copies per
    # layer otherwise). The output stays contiguous (B, H, Lq, Dv), the layout the op's fake impl states.
    blhd = not all(t.is_contiguous() for t in (q, k, v)) and all(
        tuple(t.shape[:2]) == (b, h) and t.transpose(1, 2).is_contiguous() for t in (q, k, v)
    )
    if not blhd:
        q, k, v = (t.expand(b, h, *t.shape[2:]).contiguous() for t in (q, k, v))
    mask = _mask4(attn_mask, b, h, lq, lk, q.device)
    lam_t = _lam_tensor(lam, b, q.device)
    cfg = kernel_config(
        _TORCH_DTYPES[q.dtype],
        _TORCH_DTYPES.get(mask.dtype, "fp32"),
        d,
        dv,
        lk,
        alpha,
        scale,
        mask_mode(mask.shape),
        blhd,
    )
    if mask.dtype not in _TORCH_DTYPES:
        mask = mask.float()
    return launch_kernel(cfg, q, k, v, mask, lam_t, wrap)


def launch_kernel(cfg: KernelConfig, q, k, v, mask, lam, wrap=None) -> torch.Tensor:
    """Launch ``cfg``'s kernel on inputs as ``attention`` prepares them: q, k, v (B, H, L, D) contiguous (or
    (B, L, H, D) memory when ``cfg.blhd``), mask additive fp32/fp16/bf16 from ``_mask4``, lam float32 (B,) or
    (1,). Returns (B, H, Lq, Dv) contiguous in q's dtype. The benchmarks launch other configs through it."""
    b, h, lq = q.shape[:3]
    out = torch.empty((b, h, lq, v.shape[-1]), device=q.device, dtype=q.dtype)
    grid = launch(b, h, lq, block_m=cfg.block_m, num_warps=cfg.num_warps, shared_mem=0).grid
    sizes = extra_args(q.shape, k.shape, v.shape, mask.shape, lam.shape)
    kernel = pladis_fwd if wrap is None else wrap(pladis_fwd)
    cap = {} if cfg.max_registers is None else {"maxnreg": cfg.max_registers}
    kernel[grid](q, k, v, mask, lam, *sizes, out, **cfg.constexprs(), num_warps=cfg.num_warps, **cap)
    return out
