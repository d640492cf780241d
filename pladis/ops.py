"""The PLADIS attention operator, in reading order.

1. ``entmax``: the exact alpha-entmax map (closed form for alpha = 1.5 and 2, bisection otherwise).
2. ``reference_attention``: the whole operator by the exact solver, float64-capable (the tests' oracle);
   ``fast_attention``: the sort-free path for fp16/bf16/fp32 and alpha 1.5 or 2; ``pytorch_attention``
   chooses between them and is the op's implementation on every device the kernel does not serve.
3. ``attention_op``: the ``torch.library`` custom op ``pladis::attention`` and its fake twin, so that
   ``torch.export``, ``torch.compile`` and the ONNX exporters see one node. The CUDA implementation
   (the fused Triton kernel in ``pladis/kernels/``) registers itself on it when Triton is installed;
   ``fused_form`` is what compilers trace into (the rule, and every private torch name pladis rests on,
   live in ``pladis.torch_internals``).
4. ``attention`` / ``joint_attention``: the public functions, which validate and call the op.

Numerical contract (docs/NUMERICS.md; constants in ``pladis.numerics``): with logits ``S = Q K^T * scale``,
``A = softmax(S) + lam * (entmax_alpha(S) - softmax(S))``, ``out = A V``. Logits and the threshold
solve are computed in float32 for fp16/bf16/fp32 inputs (float64 for float64); the mixed map is cast to
the value dtype only for the final ``A V``.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from pladis import kernels, torch_internals
from pladis.errors import SettingError
from pladis.numerics import (
    DEFAULT_ALPHA,
    DEFAULT_LAM,
    LAM_RANGE,  # noqa: F401 - the op's accepted lam range, read as ops.LAM_RANGE (export/manifest.py)
    MASKED,
    NEWTON_STEPS,
    constant,
    newton_steps,
)

# Every intermediate of one query chunk has at most this many elements (64 MiB in float32), so
# joint attention over thousands of tokens does not materialise a full (B, H, L, L) float32 map.
_CHUNK_ELEMENTS = 1 << 24


# --------------------------------------------------------------------------------------------------
# 1. alpha-entmax
# --------------------------------------------------------------------------------------------------


def entmax(s: Tensor, alpha: float = 1.5) -> Tensor:
    """alpha-entmax along the last axis: ``p_i = [(alpha-1) s_i - tau]_+ ^ (1/(alpha-1))``, ``sum p = 1``.

    s: (..., L) floating logits; ``-inf`` marks keys that take no part. Computed in float32 (float64 for
    float64 input) and returned in that compute dtype. A row whose entries are all ``-inf`` maps to zeros.
    alpha = 1.5 and alpha = 2 (sparsemax) are exact (sort, then the closed form on the support); other
    alpha in (1, 2) use bisection to the compute dtype's resolution.
    """
    s = s.to(_compute_dtype(s.dtype))
    valid = s > -math.inf
    smax = torch.where(valid.any(-1, keepdim=True), s.amax(-1, keepdim=True), torch.zeros_like(s[..., :1]))
    # tau >= max(z) - 1, so every z below max(z) - 1 is off the support; clamping those (and masked keys)
    # to max(z) - 2 leaves the solution unchanged and keeps -inf and huge magnitudes out of the sums.
    z = ((alpha - 1.0) * (s - smax)).clamp(min=-2.0)
    if alpha == 2.0:
        p = (z - _sparsemax_threshold(z)).clamp(min=0)
    elif alpha == 1.5:
        p = (z - _entmax15_threshold(z)).clamp(min=0).square()
    else:
        p = _entmax_bisect(z, alpha)
    return torch.where(valid, p, torch.zeros_like(p))


def _sparsemax_threshold(z: Tensor) -> Tensor:
    """tau for sparsemax: with z sorted descending, support size k = #{j : 1 + j z_j > sum_{i<=j} z_i}."""
    zs, _ = z.sort(dim=-1, descending=True)
    csum = zs.cumsum(-1)
    j = torch.arange(1, z.shape[-1] + 1, device=z.device, dtype=z.dtype)
    k = (1 + j * zs > csum).sum(-1, keepdim=True)
    return (csum.gather(-1, k - 1) - 1) / k.to(z.dtype)


def _entmax15_threshold(z: Tensor) -> Tensor:
    """tau for 1.5-entmax on z = s/2 (already shifted so max z = 0).

    For each prefix j of the descending sort, tau_j solves sum_{i<=j} (z_i - tau)^2 = 1:
    ``tau_j = mean_j - sqrt((1 - j (msq_j - mean_j^2)) / j)``; the support is the largest j with
    tau_j <= z_j, and tau is tau_k there (the closed form on the support).
    """
    zs, _ = z.sort(dim=-1, descending=True)
    j = torch.arange(1, z.shape[-1] + 1, device=z.device, dtype=z.dtype)
    mean = zs.cumsum(-1) / j
    msq = zs.square().cumsum(-1) / j
    tau = mean - ((1 - j * (msq - mean.square())) / j).clamp(min=0).sqrt()
    k = (tau <= zs).sum(-1, keepdim=True)
    return tau.gather(-1, k - 1)


def _entmax_bisect(z: Tensor, alpha: float) -> Tensor:
    """alpha-entmax for alpha in (1, 2) other than 1.5, by bisection on tau in its bracket, then renormalised."""
    inv = 1.0 / (alpha - 1.0)
    n = z.shape[-1]
    lo = z.amax(-1, keepdim=True) - 1.0
    hi = z.amax(-1, keepdim=True) - n ** (1.0 - alpha)
    steps = 60 if z.dtype == torch.float64 else 32  # halves the width-1 bracket to below the dtype's eps
    for _ in range(steps):
        mid = (lo + hi) / 2
        too_low = (z - mid).clamp(min=0).pow(inv).sum(-1, keepdim=True) >= 1  # f decreases in tau
        lo = torch.where(too_low, mid, lo)
        hi = torch.where(too_low, hi, mid)
    p = (z - lo).clamp(min=0).pow(inv)
    return p / p.sum(-1, keepdim=True)


# --------------------------------------------------------------------------------------------------
# 2. The reference implementation
# --------------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _masked_logits(q: Tensor, k: Tensor, attn_mask: Optional[Tensor], scale: float) -> Tensor:
    """(..., Lq, Lk) logits in the compute dtype, with ``-inf`` where the mask removes a key."""
    cdt = _compute_dtype(q.dtype)
    s = torch.matmul(q.to(cdt), k.to(cdt).transpose(-1, -2)) * scale
    if attn_mask is None:
        return s
    if attn_mask.dtype == torch.bool:
        return torch.where(attn_mask, s, torch.full_like(s, -math.inf))
    return s + attn_mask.to(cdt)


def _softmax(s: Tensor) -> Tensor:
    """softmax along the last axis that maps an all ``-inf`` row to zeros instead of NaN."""
    smax = s.amax(-1, keepdim=True)
    e = torch.exp(s - torch.where(smax > -math.inf, smax, torch.zeros_like(smax)))
    denom = e.sum(-1, keepdim=True)
    return e / torch.where(denom > 0, denom, torch.ones_like(denom))


def text_span(length: int, text_len: int, text_first: bool) -> tuple[int, int]:
    """[start, end) of the text tokens in a joint sequence of ``length`` tokens (FLUX: first, SD3: last)."""
    return (0, text_len) if text_first else (length - text_len, length)


def _lam_view(lam: float | Tensor, s: Tensor) -> float | Tensor:
    """lam as a number, or a (B,)/(1,) tensor viewed as (B, 1, ..., 1) against logits s: (B, ..., rows, Lk)."""
    if not isinstance(lam, Tensor):
        return lam
    return lam.to(s.dtype).reshape(-1, *[1] * (s.dim() - 1))


def _mixed_map(s: Tensor, lam: float | Tensor, alpha: float, text_len: int, text_first: bool, row0: int) -> Tensor:
    """The PLADIS attention map for logits s: (..., rows, Lk), whose first row is query index row0; lam a
    number or one value per batch sample (a (B,) or (1,) tensor)."""
    lam = _lam_view(lam, s)
    dense = _softmax(s)
    if text_len == 0:
        return dense + lam * (entmax(s, alpha) - dense)
    text_start, text_end = text_span(s.shape[-1], text_len, text_first)
    # Joint attention: only image-query rows x text-key columns change, and keep their dense mass.
    dense_t = dense[..., text_start:text_end]
    mass = dense_t.sum(-1, keepdim=True)
    block = dense_t + lam * (mass * entmax(s[..., text_start:text_end], alpha) - dense_t)
    rows = torch.arange(row0, row0 + s.shape[-2], device=s.device).unsqueeze(-1)
    is_image_row = (rows < text_start) | (rows >= text_end)
    return torch.cat(
        [dense[..., :text_start], torch.where(is_image_row, block, dense_t), dense[..., text_end:]], dim=-1
    )


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Optional[Tensor],
    lam: float | Tensor,
    alpha: float,
    scale: float,
    text_len: int = 0,
    text_first: bool = False,
) -> Tensor:
    """PLADIS attention in plain PyTorch (no validation; see ``attention`` for the contract).

    q: (..., Lq, D), k: (..., Lk, D), v: (..., Lk, Dv), leading dims broadcastable; attn_mask broadcastable
    to (..., Lq, Lk), bool (True = attend) or additive. text_len = 0: cross-attention; text_len > 0: joint
    attention whose text tokens are the first (text_first) or last text_len tokens. lam: a number, or a float
    tensor of shape (B,) (one value per sample of the leading batch dim) or (1,). Returns (..., Lq, Dv) in
    q's dtype. Queries are processed in chunks whose intermediates hold at most ``_CHUNK_ELEMENTS`` elements.
    """
    if not isinstance(lam, Tensor) and lam == 0.0:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    lq, lk = q.shape[-2], k.shape[-2]
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(1, math.prod(batch) * lk))
    low_precision = q.dtype not in (torch.float32, torch.float64)
    outs = []
    for r0 in range(0, lq, rows_per_chunk):
        r1 = min(lq, r0 + rows_per_chunk)
        mask = attn_mask
        if mask is not None and mask.dim() >= 2 and mask.shape[-2] != 1:
            mask = mask[..., r0:r1, :]
        p = _mixed_map(_masked_logits(q[..., r0:r1, :], k, mask, scale), lam, alpha, text_len, text_first, r0)
        outs.append(torch.matmul(p.to(v.dtype), v) if low_precision else torch.matmul(p, v.to(p.dtype)))
    return torch.cat(outs, dim=-2).to(q.dtype)


# --------------------------------------------------------------------------------------------------
# 2b. The sort-free fast path (float16 / bfloat16 / float32, alpha 1.5 and 2)
# --------------------------------------------------------------------------------------------------

_FAST_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Elements per query chunk of the fast path: small enough that a chunk's logits and their Newton
# temporaries stay in the CPU caches between passes (measured on the suite shapes), large enough that
# Python overhead per chunk is noise.
_FAST_CHUNK_ELEMENTS = 1 << 20
# On a GPU each pass is a kernel launch (~10 us) over memory at TB/s: few, large chunks (256 MB of
# float32 logits per chunk at most).
_FAST_CHUNK_ELEMENTS_GPU = 1 << 26


def _chunk_elements(device: torch.device) -> int:
    return _FAST_CHUNK_ELEMENTS if device.type == "cpu" else _FAST_CHUNK_ELEMENTS_GPU


def fast_path_applies(dtype: torch.dtype, alpha: float) -> bool:
    """Whether ``pladis::attention`` runs the sort-free path: fp16/bf16/fp32 inputs and alpha 1.5 or 2.
    float64 and other alpha run the exact sort / bisection solver (``reference_attention``)."""
    return dtype in _FAST_DTYPES and float(alpha) in NEWTON_STEPS


def entmax_newton(s: Tensor, alpha: float, steps: int, inplace: bool = True) -> tuple[Tensor, float]:
    """Sort-free alpha-entmax (alpha 1.5 or 2) along the last axis of finite float32 logits, as ``(u, c)``
    with ``entmax(s) = c * u`` (the caller folds c into its blend).

    s: (..., L) float32, masked keys already at ``MASKED``. The same algorithm as the ONNX function body
    (export/onnx_op.py ``_entmax``) and the Triton kernel, so ``NEWTON_STEPS`` holds for all three:
    alpha 1.5: Newton from ``t = max z - 2`` on ``||[z - t]_+|| / 2 - 1``, then the closed form on the
    support it found; ``u = [z - t]_+^2``, ``c = 1/4``. alpha 2: Michelot's iteration from ``max z - 1``
    (its last step is the closed form); ``u = [z - tau]_+``, ``c = 1``.
    Newton runs on ``z = s - max s`` (exact near the max), so the support's values keep full float32
    resolution whatever the logit magnitude. A row of only ``MASKED`` entries gives a uniform u (its
    callers weight or zero it). Error at float32 rounding of the threshold (against the float64 oracle).
    inplace=False: functional ops only (for tracing into a graph, ``fused_form``); same values.
    """

    def pos(x: Tensor) -> Tensor:  # [x]_+ of a fresh temporary
        return x.clamp_(min=0) if inplace else x.clamp(min=0)

    s = s - s.amax(-1, keepdim=True)
    if alpha == 2.0:
        tau = torch.full_like(s[..., :1], -1.0)
        for _ in range(steps):  # tau += (sum r - 1) / |support|
            r = pos(s - tau)
            count = r.sign().sum(-1, keepdim=True).clamp(min=1.0)  # |support| (r >= 0; sign is a fast pass)
            tau = tau + (r.sum(-1, keepdim=True) - 1.0) / count
        return pos(s - tau), 1.0
    t = torch.full_like(s[..., :1], -2.0)
    for _ in range(steps):  # t += (||r|| - 2) ||r|| / sum r
        r = pos(s - t)
        norm = torch.linalg.vector_norm(r, dim=-1, keepdim=True)
        t = t + (norm - 2.0) * norm / r.sum(-1, keepdim=True).clamp(min=1e-30)
    # closed form on K = {s > t}: sum_K (r - d)^2 = 4  ->  k d^2 - 2 s1 d + s2 - 4 = 0, smaller root
    r = pos(s - t)
    k = r.sign().sum(-1, keepdim=True)  # |support|
    s1, s2 = r.sum(-1, keepdim=True), torch.linalg.vecdot(r, r).unsqueeze(-1)
    disc = (s1 * s1 - k * (s2 - 4.0)).clamp(min=0)
    t = t + (s1 - disc.sqrt()) / k.clamp(min=1.0)
    r = pos(s - t)
    return (r.mul_(r) if inplace else r * r), 0.25


def _fast_logits(
    q: Tensor, k: Tensor, attn_mask: Optional[Tensor], scale: float, inplace: bool = True
) -> tuple[Tensor, bool]:
    """(..., Lq, Lk) float32 logits with masked keys at ``MASKED`` (finite: no inf - inf anywhere), and
    whether a mask was applied."""
    s = torch.matmul(q.float(), k.float().transpose(-1, -2))
    s = s.mul_(scale) if inplace else s * scale
    if attn_mask is None:
        return s, False
    if attn_mask.dtype == torch.bool:
        return (s.masked_fill_ if inplace else s.masked_fill)(~attn_mask, MASKED), True
    return (s + attn_mask.float()).clamp(min=MASKED), True


def _blend(dense: Tensor, u: Tensor, c: float, lam: float | Tensor) -> Tensor:
    """``(1 - lam) dense + lam c u`` in place in dense; lam a number or a (B, 1, ..., 1) view."""
    if isinstance(lam, Tensor):
        return dense.mul_(1.0 - lam).addcmul_(u, lam * c)
    return dense.mul_(1.0 - lam).add_(u, alpha=lam * c)


def _fast_map(
    s: Tensor, lam: float | Tensor, alpha: float, steps: int, masked: bool, text_len: int, text_first: bool, row0: int
) -> Tensor:
    """The PLADIS map (float32) for fast-path logits s: (..., rows, Lk) whose first row is query row0."""
    dense = torch.softmax(s, -1)
    if text_len == 0:
        u, c = entmax_newton(s, alpha, steps)
        p = _blend(dense, u, c, lam)
    else:
        text_start, text_end = text_span(s.shape[-1], text_len, text_first)
        dense_t = dense[..., text_start:text_end]
        u, c = entmax_newton(s[..., text_start:text_end].contiguous(), alpha, steps)
        block = _blend(dense_t.clone(), u.mul_(dense_t.sum(-1, keepdim=True)), c, lam)
        rows = torch.arange(row0, row0 + s.shape[-2], device=s.device).unsqueeze(-1)
        is_image_row = (rows < text_start) | (rows >= text_end)
        p = dense.clone()
        p[..., text_start:text_end] = torch.where(is_image_row, block, dense_t)
    if masked:  # a row with no key left gives zeros (its logits are all MASKED)
        p = p.mul_(s.amax(-1, keepdim=True) > MASKED / 10)
    return p


def fast_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Optional[Tensor],
    lam: float | Tensor,
    alpha: float,
    scale: float,
    text_len: int = 0,
    text_first: bool = False,
) -> Tensor:
    """PLADIS attention by the sort-free path; arguments and result as ``reference_attention``.

    For fp16/bf16/fp32 inputs and alpha 1.5 or 2 (``fast_path_applies``). Logits, softmax and threshold in
    float32; the map is cast to v's dtype for the final ``P V`` (fp16/bf16). Joint attention uses the dense
    kernel's log-sum-exp where one exists (``_joint_with_lse``): no (L x L) float32 map at all; elsewhere
    the query-chunked form below, whose chunks hold at most ``_FAST_CHUNK_ELEMENTS`` logits.
    """
    if not isinstance(lam, Tensor) and lam == 0.0:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    if text_len > 0:
        out = _joint_with_lse(q, k, v, attn_mask, lam, alpha, scale, text_len, text_first)
        if out is not None:
            return out
    lq, lk = q.shape[-2], k.shape[-2]
    steps = newton_steps(float(alpha), text_len or lk)
    if q.dim() != 4 or not (q.shape[:-2] == k.shape[:-2] == v.shape[:-2]):  # broadcast heads, rank 3
        batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
        q, k, v = q.expand(*batch, *q.shape[-2:]), k.expand(*batch, *k.shape[-2:]), v.expand(*batch, *v.shape[-2:])
        squeeze = q.dim() == 3
        if squeeze:
            q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
            attn_mask = None if attn_mask is None else attn_mask.unsqueeze(-3)
        out = fast_attention(q, k, v, attn_mask, lam, alpha, scale, text_len, text_first)
        return out.squeeze(1) if squeeze else out
    # Tiles of (one sample, a group of heads, a range of rows): each tile's output is a contiguous slice of
    # ``out`` that its P V writes directly, and its logits fit ``_FAST_CHUNK_ELEMENTS``.
    n_batch, n_heads = q.shape[:2]
    chunk = _chunk_elements(q.device)
    heads = max(1, min(n_heads, chunk // (lq * lk)))
    rows = lq if heads > 1 else max(1, min(lq, chunk // lk))
    mask4 = None if attn_mask is None else attn_mask.reshape((1,) * (4 - attn_mask.dim()) + attn_mask.shape)
    out = torch.empty((*q.shape[:-1], v.shape[-1]), dtype=q.dtype, device=q.device)
    for b in range(n_batch):
        for h0 in range(0, n_heads, heads):
            h1 = min(n_heads, h0 + heads)
            for r0 in range(0, lq, rows):
                r1 = min(lq, r0 + rows)
                tile = (slice(b, b + 1), slice(h0, h1), slice(r0, r1))
                mask = None if mask4 is None else mask4[_broadcast_index(tile, mask4.shape)]
                s, masked = _fast_logits(q[tile], k[b : b + 1, h0:h1], mask, scale)
                p = _fast_map(s, _lam_view(_sample(lam, b), s), alpha, steps, masked, text_len, text_first, r0)
                torch.matmul(p.to(v.dtype), v[b : b + 1, h0:h1], out=out[tile])
    return out


def _sample(lam: float | Tensor, b: int) -> float | Tensor:
    """lam of batch sample b: a (1,) slice of a per-sample tensor, else lam itself."""
    return lam[b : b + 1] if isinstance(lam, Tensor) and lam.shape[0] > 1 else lam


def _broadcast_index(index: tuple[slice, ...], shape: torch.Size) -> tuple[slice, ...]:
    """index into a tensor that broadcasts: a dim of size 1 is taken whole."""
    return tuple(ix if n > 1 else slice(None) for ix, n in zip(index, shape, strict=False))


def _joint_with_lse(q, k, v, attn_mask, lam, alpha, scale, text_len, text_first) -> Optional[Tensor]:
    """Joint PLADIS as dense attention plus a correction on the image-query x text-key block only:
    ``out = SDPA(q, k, v) + lam (m c u - P_t) V_t`` on image rows, with ``P_t = exp(S_t - lse)`` the dense
    weights of the text keys and ``m = sum P_t`` their mass. None where no lse-returning kernel applies."""
    got = torch_internals.sdpa_with_lse(q, k, v, attn_mask, scale)
    if got is None:
        return None
    out, lse = got
    length = q.shape[-2]
    t0, t1 = text_span(length, text_len, text_first)
    i0, i1 = (t1, length) if text_first else (0, t0)
    if attn_mask is not None:  # a query row with no key left gives zeros, whatever the kernel gives
        keep = attn_mask if attn_mask.dtype == torch.bool else attn_mask > MASKED / 10
        out = out.masked_fill(~keep.any(-1, keepdim=True), 0.0)
    if i1 <= i0:
        return out
    lse = torch.where(lse > -math.inf, lse, math.inf)  # exp(s - inf) = 0 for a row without keys
    k_t, v_t = k[..., t0:t1, :], v[..., t0:t1, :].float()
    steps = newton_steps(float(alpha), text_len)
    rows_per_chunk = max(1, _chunk_elements(q.device) // max(1, q.shape[0] * q.shape[1] * text_len))
    for r0 in range(i0, i1, rows_per_chunk):
        r1 = min(i1, r0 + rows_per_chunk)
        mask = attn_mask
        if mask is not None:
            mask = mask[..., r0:r1, :] if mask.shape[-2] != 1 else mask
            mask = mask[..., t0:t1] if mask.shape[-1] != 1 else mask
        s, _ = _fast_logits(q[..., r0:r1, :], k_t, mask, scale)
        p_t = torch.exp(s - lse[..., r0:r1, None])
        u, c = entmax_newton(s, alpha, steps)
        corr = u.mul_(p_t.sum(-1, keepdim=True) * c).sub_(p_t).mul_(_lam_view(lam, s))  # lam (m c u - P_t)
        out[..., r0:r1, :] = (out[..., r0:r1, :].float() + torch.matmul(corr, v_t)).to(out.dtype)
    return out


# --------------------------------------------------------------------------------------------------
# 3. The custom op and its fake twin
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("pladis::attention", mutates_args=())
def attention_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Optional[Tensor],
    lam: Tensor,
    alpha: float,
    scale: float,
    text_len: int,
    text_first: bool,
) -> Tensor:
    """``pladis::attention``: validated arguments only (call ``attention``/``joint_attention``).

    lam: float32 tensor (float64 for float64 q) of shape (B,) (one strength per sample of q's batch) or (1,)
    (all samples): a runtime input, so one traced or exported graph serves every lam. text_len = 0 is
    cross-attention; text_len > 0 is joint attention with that many text tokens, first or last. The text
    range is stored as a length, not as indices, so one exported graph serves every image size.
    """
    return pytorch_attention(q, k, v, attn_mask, lam, alpha, scale, text_len, text_first)


def pytorch_attention(q, k, v, attn_mask, lam, alpha, scale, text_len=0, text_first=False) -> Tensor:
    """The op in PyTorch on any device: the sort-free path where it applies, else the exact solver. Also
    the CUDA implementation's fallback for what the Triton kernel does not cover (joint attention, long keys)."""
    if fast_path_applies(q.dtype, alpha):
        return fast_attention(q, k, v, attn_mask, lam, alpha, scale, text_len, text_first)
    return reference_attention(q, k, v, attn_mask, lam, alpha, scale, text_len, text_first)


@attention_op.register_fake
def _attention_fake(q, k, v, attn_mask, lam, alpha, scale, text_len, text_first):
    batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    return q.new_empty((*batch, q.shape[-2], v.shape[-1]))


def fused_form(q, k, v, attn_mask, lam, alpha, scale, text_len, text_first):
    """``pladis::attention`` as plain tensor code for Inductor to fuse (torch.compile, AOTInductor), or
    ``NotImplemented`` where the op itself should run: float64 and other alpha (the exact solver), joint
    attention (whose op avoids the (L x L) map), CUDA tensors when the fused Triton kernel serves them.

    The math of ``fast_attention`` without its Python tiling (Inductor fuses the passes instead):
    q (B, H, Lq, D), k (B, H, Lk, D), v (B, H, Lk, Dv) -> (B, H, Lq, Dv) in q's dtype.
    """
    if text_len != 0 or not fast_path_applies(q.dtype, alpha) or (q.is_cuda and _CUDA_KERNEL):
        return NotImplemented
    s, masked = _fast_logits(q, k, attn_mask, scale, inplace=False)
    u, c = entmax_newton(s, alpha, newton_steps(float(alpha), k.shape[-2]), inplace=False)
    lam = _lam_view(lam, s)
    p = (1.0 - lam) * torch.softmax(s, -1) + (lam * c) * u
    if masked:
        p = p * (s.amax(-1, keepdim=True) > MASKED / 10)
    return torch.matmul(p.to(v.dtype), v)


# Compiled paths (torch.compile, AOTInductor) trace into the op for static shapes: the rule, and every
# private torch name it rests on, live in ``pladis.torch_internals``.
_FUSION = {"enabled": True, "symbolic": False}  # symbolic: trace in for symbolic sizes too (benchmarks only)


def inductor_fusion(enabled: bool = True) -> None:
    """Whether torch.compile and AOTInductor trace into ``pladis::attention`` for static shapes (the default:
    ``fused_form`` on a CPU, the Triton kernel on CUDA) or call the op as an opaque kernel
    (``enabled=False``). torch.export and the ONNX exporters see one node either way. A torch that lacks
    a name the tracing rule needs keeps the op opaque and says so (``torch_internals.missing``)."""
    _FUSION["enabled"] = bool(enabled)


_CUDA_KERNEL = kernels.register(attention_op, pytorch_attention)  # the Triton kernel, when Triton is installed
torch_internals.trace_into(attention_op, fused_form, kernels.traced_kernel if _CUDA_KERNEL else None, _FUSION)


# --------------------------------------------------------------------------------------------------
# 4. Public functions
# --------------------------------------------------------------------------------------------------


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    lam: float = DEFAULT_LAM,
    alpha: float = DEFAULT_ALPHA,
    attn_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
) -> Tensor:
    """PLADIS cross-attention: ``(softmax(S) + lam (entmax_alpha(S) - softmax(S))) V``, ``S = Q K^T scale``.

    q: (B, H, Lq, D), k: (B, H, Lk, D), v: (B, H, Lk, Dv) (rank 3 also accepted; batch/head dims broadcast
    as in ``torch.nn.functional.scaled_dot_product_attention``); float16, bfloat16, float32 or float64, all
    the same dtype. attn_mask: broadcastable to (B, H, Lq, Lk), bool (True = attend) or additive float.
    scale: defaults to D ** -0.5. lam: any finite value (0 = exactly SDPA, 1 = pure entmax, > 1
    extrapolates). alpha: in (1, 2]; exact for 1.5 and 2. Returns (B, H, Lq, Dv) in q's dtype; a fully
    masked query row gives a zero row.
    """
    scale = _check(q, k, v, lam, alpha, attn_mask, scale)
    if not isinstance(lam, Tensor) and lam == 0.0:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    return attention_op(q, k, v, attn_mask, _lam_tensor(lam, q), float(alpha), scale, 0, False)


def joint_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    text_len: int,
    text_first: bool,
    lam: float = DEFAULT_LAM,
    alpha: float = DEFAULT_ALPHA,
    attn_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
) -> Tensor:
    """PLADIS for joint (MMDiT) attention over one token sequence holding text and image tokens.

    q, k: (B, H, L, D), v: (B, H, L, Dv); the first (``text_first``, FLUX) or last (SD3) ``text_len``
    tokens are text. Only image-query rows x text-key columns change: with ``m`` the dense mass of those
    columns, ``A[text cols] = softmax + lam (m entmax(S_text) - softmax)``; other entries stay softmax and
    text-query rows are plain attention. Other arguments as in ``attention``.
    """
    scale = _check(q, k, v, lam, alpha, attn_mask, scale)
    _check_text(text_len, text_first, q.shape[-2], k.shape[-2])
    if not isinstance(lam, Tensor) and lam == 0.0:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    lam = _lam_tensor(lam, q)
    return attention_op(q, k, v, attn_mask, lam, float(alpha), scale, int(text_len), bool(text_first))


def _lam_tensor(lam: float | Tensor, q: Tensor) -> Tensor:
    """The op's lam argument: a float32 tensor on q's device (float64 for float64 q: the reference path
    keeps every lam exact), (1,) for a number (one cached tensor per value, device and dtype: no allocation
    and fill per layer call; never written to)."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if isinstance(lam, Tensor):
        return lam.to(device=q.device, dtype=dtype)
    return constant(float(lam), (1,), q.device, dtype)


def check_params(lam: float | Tensor, alpha: float) -> None:
    """Raise ValueError naming ``lam`` or ``alpha`` when they are outside what PLADIS supports. A lam tensor
    is checked for its shape and type here (its values are the caller's: no device sync per layer)."""
    if isinstance(lam, Tensor):
        if lam.dim() != 1 or not lam.dtype.is_floating_point:
            raise SettingError("lam", f"lam as a tensor must be 1-D floating, one value per batch sample (B,) or (1,); "
                             f"got shape {tuple(lam.shape)}, {lam.dtype}")  # fmt: skip
    elif isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam):
        raise SettingError("lam", f"lam must be a finite number (paper default 2.0, useful range 1-3); got {lam!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (1.0 < alpha <= 2.0):
        raise SettingError("alpha", f"alpha must be a number in (1, 2] (1.5 = entmax15, 2 = sparsemax); got {alpha!r}")


def _batch_dims(q: Tensor, k: Tensor, v: Tensor) -> torch.Size:
    """The broadcast batch/head dims of q, k, v; the common case (all equal) without torch.broadcast_shapes,
    which costs tens of microseconds per call: on a GPU that is more than the kernel it guards."""
    if q.shape[:-2] == k.shape[:-2] == v.shape[:-2]:
        return q.shape[:-2]
    return torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])


def _check(q, k, v, lam, alpha, attn_mask, scale) -> float:
    """Validate the arguments of ``attention``; return the resolved scale."""
    check_params(lam, alpha)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise SettingError(name, f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if t.dim() not in (3, 4):
            raise SettingError(name, f"{name} must have rank 4 (B, H, L, D) or 3 (B, L, D); got shape {tuple(t.shape)}")
        if not t.dtype.is_floating_point:
            raise SettingError(name, f"{name} must be a floating tensor (fp16, bf16, fp32, fp64); got {t.dtype}")
    if not (q.dim() == k.dim() == v.dim()):
        raise SettingError("q", f"q, k, v must have the same rank; got {q.dim()}, {k.dim()}, {v.dim()}")
    if not (q.dtype == k.dtype == v.dtype):
        raise SettingError("q", f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] != k.shape[-1]:
        raise SettingError("q", f"head dims differ: q has D={q.shape[-1]}, k has D={k.shape[-1]}")
    if k.shape[-2] != v.shape[-2]:
        raise SettingError("q", f"k and v must have the same key length; got {k.shape[-2]} and {v.shape[-2]}")
    if k.shape[-2] == 0:
        raise SettingError("q", "k has no keys (key length 0)")
    try:
        batch = _batch_dims(q, k, v)
    except RuntimeError:
        raise SettingError(
            "q", f"batch/head dims of q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not broadcast"
        ) from None
    if isinstance(lam, Tensor) and lam.shape[0] not in (1, batch[0]):
        raise SettingError(
            "lam", f"lam has {lam.shape[0]} values for a batch of {batch[0]}: give one per sample, or one"
        )
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor) or not (attn_mask.dtype == torch.bool or attn_mask.is_floating_point()):
            raise SettingError(
                "attn_mask", "attn_mask must be a bool tensor (True = attend) or an additive float tensor"
            )
        try:
            torch.broadcast_shapes(attn_mask.shape, (*batch, q.shape[-2], k.shape[-2]))
        except RuntimeError:
            raise SettingError(
                "attn_mask",
                f"attn_mask shape {tuple(attn_mask.shape)} does not broadcast to {(*batch, q.shape[-2], k.shape[-2])}",
            ) from None
    if scale is None:
        return q.shape[-1] ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise SettingError("scale", f"scale must be a positive finite number or None (= D**-0.5); got {scale!r}")
    return float(scale)


def _check_text(text_len, text_first, lq: int, lk: int) -> None:
    if lq != lk:
        raise SettingError("text_len", f"joint attention needs one token sequence: q has {lq} tokens, k has {lk}")
    if isinstance(text_len, bool) or not isinstance(text_len, int) or not 0 < text_len <= lk:
        raise SettingError(
            "text_len", f"text_len must be an int in [1, {lk}] (the number of text tokens); got {text_len!r}"
        )
    if not isinstance(text_first, bool):
        raise SettingError(
            "text_first", f"text_first must be a bool (True: FLUX order [text, image]); got {text_first!r}"
        )
