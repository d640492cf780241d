"""The operator against independent oracles: the `entmax` package and softmax, in float64."""

import math

import pytest
import tolerances
import torch
import torch.nn.functional as F
from entmax import entmax15, entmax_bisect, sparsemax
from hypothesis import given, settings
from hypothesis import strategies as st

import pladis
from pladis import ops, torch_internals

ORACLE = {1.5: entmax15, 2.0: sparsemax}

# Tolerances, each with its reason: tests/tolerances.py (shared with the kernel and export tests).
TOL_FP64 = tolerances.FP64
# (Large scores: see assert_fp32_within_baseline.)
TOL_FP32 = dict(rtol=tolerances.FP32, atol=tolerances.FP32)
TOL_HALF = {dtype: dict(rtol=tol, atol=tol) for dtype, tol in tolerances.HALF.items()}


def oracle(q, k, v, lam, alpha, mask=None, scale=None):
    """PLADIS attention from the formula in float64, with the entmax package as the sparse map."""
    q, k, v = q.double(), k.double(), v.double()
    s = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if mask is not None:
        s = s.masked_fill(~mask, -1e30) if mask.dtype == torch.bool else s + mask.double()
    dense = torch.softmax(s, -1)
    sparse = ORACLE[alpha](s, dim=-1) if alpha in ORACLE else entmax_bisect(s, alpha, dim=-1, n_iter=100)
    return (dense + lam * (sparse - dense)) @ v


def rand(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def qkv(b=2, h=3, lq=16, lk=77, d=32, dtype=torch.float32, seed=0, scale=1.0):
    return (
        rand(b, h, lq, d, dtype=dtype, seed=seed, scale=scale),
        rand(b, h, lk, d, dtype=dtype, seed=seed + 1, scale=scale),
        rand(b, h, lk, d, dtype=dtype, seed=seed + 2),
    )


def assert_close(actual, expected, **tol):
    diff = (actual.double() - expected.double()).abs()
    bound = tol["atol"] + tol["rtol"] * expected.double().abs()
    worst = (diff - bound).argmax()
    assert (diff <= bound).all(), (
        f"max |diff| {diff.max().item():.3g} at flat index {worst.item()} "
        f"(actual {actual.flatten()[worst].item():.6g}, expected {expected.flatten()[worst].item():.6g})"
    )


@pytest.mark.parametrize("alpha", [1.5, 2.0])
@pytest.mark.parametrize("lk", [1, 2, 77, 256, 512, 1000])
@pytest.mark.parametrize("score_scale", [0.3, 1.0, 4.0])
def test_fp64_and_fp32_match_oracle(alpha, lk, score_scale):
    q, k, v = qkv(lk=lk, dtype=torch.float64, scale=score_scale, seed=lk)
    expected = oracle(q, k, v, 2.0, alpha)
    assert_close(pladis.attention(q, k, v, alpha=alpha), expected, **TOL_FP64)
    out32 = pladis.attention(q.float(), k.float(), v.float(), alpha=alpha)
    assert out32.dtype == torch.float32
    assert_fp32_within_baseline(out32, q.float(), k.float(), v.float(), alpha)


def assert_fp32_within_baseline(out, q, k, v, alpha, lam=2.0):
    """flash-attention's rule: the float32 error against the float64 oracle is at most twice that of the
    formula written plainly in float32 PyTorch (softmax + the entmax package), plus 1e-6 for exact ties.
    Logit rounding grows with the score magnitude, so a fixed tolerance would be wrong for large scores."""
    exact = oracle(q, k, v, lam, alpha)
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    dense = torch.softmax(s, -1)
    plain = (dense + lam * (ORACLE[alpha](s, dim=-1) - dense)) @ v
    ours, base = (out.double() - exact).abs().max().item(), (plain.double() - exact).abs().max().item()
    assert ours <= 2 * base + 1e-6, f"float32 error {ours:.3g} vs plain-PyTorch float32 error {base:.3g}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("alpha", [1.5, 2.0])
@pytest.mark.parametrize("lk", [77, 512])
def test_half_precision_matches_oracle(dtype, alpha, lk):
    q, k, v = qkv(lk=lk, dtype=dtype, scale=2.0, seed=7)
    out = pladis.attention(q, k, v, alpha=alpha)
    assert out.dtype == dtype
    # The oracle sees the same (already rounded) inputs, so only the operator's own rounding is measured.
    assert_close(out, oracle(q, k, v, 2.0, alpha), **TOL_HALF[dtype])


@pytest.mark.parametrize("alpha", [1.25, 1.75])
def test_other_alpha_by_bisection_matches_entmax_bisect(alpha):
    q, k, v = qkv(lk=77, dtype=torch.float64, scale=2.0)
    # Bisection to float64 resolution on both sides; 60 halvings of a width-1 bracket leave ~1e-18.
    assert_close(pladis.attention(q, k, v, alpha=alpha), oracle(q, k, v, 2.0, alpha), rtol=1e-9, atol=1e-9)


def test_entmax_matches_package_on_extreme_scores():
    # Large-magnitude and tied logits: the shift-and-clamp must not change the solution.
    s = torch.cat([rand(4, 300, dtype=torch.float64, scale=200.0), torch.zeros(1, 300, dtype=torch.float64)])
    for alpha, fn in ORACLE.items():
        assert_close(pladis.entmax(s, alpha), fn(s, dim=-1), **TOL_FP64)


def test_lam_zero_is_exactly_sdpa():
    q, k, v = qkv()
    mask = rand(2, 1, 16, 77) > -1.0
    # atol=0: lam = 0 must be the stock attention path, bit for bit.
    assert torch.equal(
        pladis.attention(q, k, v, lam=0.0, attn_mask=mask), F.scaled_dot_product_attention(q, k, v, mask)
    )
    # The op with lam = 0 as a runtime tensor computes the dense map itself: equal to SDPA up to float32
    # rounding of the two softmax implementations (no bitwise shortcut on a value known only at run time).
    torch.testing.assert_close(
        ops.attention_op(q, k, v, mask, torch.zeros(1), 1.5, 32**-0.5, 0, False),
        F.scaled_dot_product_attention(q, k, v, mask), rtol=0, atol=1e-6,
    )  # fmt: skip


@pytest.mark.parametrize("alpha", [1.5, 2.0])
def test_lam_one_is_pure_entmax_attention(alpha):
    q, k, v = qkv(dtype=torch.float64)
    s = q @ k.transpose(-1, -2) * 32**-0.5
    assert_close(pladis.attention(q, k, v, lam=1.0, alpha=alpha), ORACLE[alpha](s, dim=-1) @ v, **TOL_FP64)


@pytest.mark.parametrize("alpha", [1.5, 2.0])
def test_masks_bool_and_additive(alpha):
    q, k, v = qkv(lk=120, dtype=torch.float64)
    keep = torch.ones(2, 1, 1, 120, dtype=torch.bool)
    keep[0, ..., 30:] = False  # T5-style padding: batch 0 has 30 real tokens
    keep[1, ..., 100:] = False
    expected = oracle(q, k, v, 2.0, alpha, mask=keep)
    assert_close(pladis.attention(q, k, v, alpha=alpha, attn_mask=keep), expected, **TOL_FP64)
    additive = torch.zeros(keep.shape, dtype=torch.float64).masked_fill(~keep, -math.inf)
    assert_close(pladis.attention(q, k, v, alpha=alpha, attn_mask=additive), expected, **TOL_FP64)
    # diffusers' own padding mask is additive -10000: identical weights within float64.
    additive = torch.zeros(keep.shape, dtype=torch.float64).masked_fill(~keep, -10000.0)
    assert_close(pladis.attention(q, k, v, alpha=alpha, attn_mask=additive), expected, **TOL_FP64)


def test_masked_keys_get_zero_weight_and_full_mask_gives_zeros():
    q, k, _ = qkv(lq=5, lk=9)
    eye = torch.eye(9).expand(2, 3, 9, 9)  # v = I, so the output is the attention map itself
    keep = torch.ones(2, 3, 5, 9, dtype=torch.bool)
    keep[..., 4:] = False
    keep[0, 0, 2] = False  # one query row sees no key at all
    a = pladis.attention(q, k, eye, attn_mask=keep)
    assert not a.isnan().any()
    assert (a[..., 4:] == 0).all()
    assert (a[0, 0, 2] == 0).all()


def test_broadcast_heads_and_rank3():
    q, k, v = qkv(h=4)
    k1, v1 = k[:, :1], v[:, :1]  # one KV head shared by all query heads
    assert_close(pladis.attention(q, k1, v1), oracle(q, k1.expand_as(k), v1.expand_as(v), 2.0, 1.5), **TOL_FP32)
    assert_close(pladis.attention(q[0], k[0], v[0]), oracle(q[0], k[0], v[0], 2.0, 1.5), **TOL_FP32)


def test_custom_scale_and_value_dim():
    q, k, _ = qkv()
    v = rand(2, 3, 77, 48, seed=9)
    out = pladis.attention(q, k, v, scale=0.5)
    assert out.shape == (2, 3, 16, 48)
    assert_close(out, oracle(q, k, v, 2.0, 1.5, scale=0.5), **TOL_FP32)


def test_query_chunking_is_invisible(monkeypatch):
    q, k, v = qkv(lq=64, dtype=torch.float64)
    mask = rand(2, 3, 64, 77) > -1.0
    whole = pladis.attention(q, k, v, attn_mask=mask)
    monkeypatch.setattr(ops, "_CHUNK_ELEMENTS", 2 * 3 * 77 * 5)  # 5 query rows per chunk, last chunk ragged
    # Rows are independent; only BLAS blocking (summation order) may differ with the matrix height.
    assert_close(pladis.attention(q, k, v, attn_mask=mask), whole, rtol=1e-13, atol=1e-13)


# --------------------------------------------------------------------------------------------------
# Joint attention
# --------------------------------------------------------------------------------------------------


def joint_oracle(q, k, v, lam, alpha, text):
    """Joint PLADIS from docs/NUMERICS.md §4, in float64 with explicit loops over the row kinds."""
    q, k, v = q.double(), k.double(), v.double()
    t0, t1 = text
    a = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, -1)
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    out = a.clone()
    for row in range(q.shape[-2]):
        if t0 <= row < t1:
            continue  # text-query rows: unchanged
        dense_t = a[..., row, t0:t1]
        mass = dense_t.sum(-1, keepdim=True)
        out[..., row, t0:t1] = dense_t + lam * (mass * ORACLE[alpha](s[..., row, t0:t1], dim=-1) - dense_t)
    return out @ v


@pytest.mark.parametrize("text_first, text", [(True, (0, 7)), (False, (13, 20))], ids=["flux", "sd3"])
@pytest.mark.parametrize("alpha", [1.5, 2.0])
def test_joint_attention_matches_formula(text_first, text, alpha):
    q, k, v = qkv(lq=20, lk=20, dtype=torch.float64, scale=2.0)
    out = pladis.joint_attention(q, k, v, text_len=7, text_first=text_first, alpha=alpha)
    assert_close(out, joint_oracle(q, k, v, 2.0, alpha, text), **TOL_FP64)


def test_joint_attention_leaves_text_rows_and_row_sums():
    q, k, _ = qkv(lq=20, lk=20)
    eye = torch.eye(20).expand(2, 3, 20, 20)
    a2 = pladis.joint_attention(q, k, eye, text_len=7, text_first=True, lam=2.0)
    a3 = pladis.joint_attention(q, k, eye, text_len=7, text_first=True, lam=3.0)
    # Text-query rows take the dense path whatever lam is: bitwise the same.
    assert torch.equal(a2[..., :7, :], a3[..., :7, :])
    assert_close(a2[..., :7, :], F.scaled_dot_product_attention(q, k, eye)[..., :7, :], **TOL_FP32)
    assert not torch.equal(a2[..., 7:, :7], a3[..., 7:, :7])
    # Image rows: only text columns change, and each row still sums to 1 (float32 sums of 20 terms).
    assert torch.equal(a2[..., 7:, 7:], a3[..., 7:, 7:])
    assert_close(a2.sum(-1), torch.ones(2, 3, 20), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    lq=st.integers(1, 6),
    lk=st.integers(1, 40),
    lam=st.floats(-1.0, 4.0),
    alpha=st.sampled_from([1.5, 2.0]),
    scale=st.floats(0.05, 20.0),
    seed=st.integers(0, 2**16),
)
def test_property_rows_sum_to_one(lq, lk, lam, alpha, scale, seed):
    q, k, _ = qkv(b=1, h=2, lq=lq, lk=lk, d=8, seed=seed, scale=scale)
    a = pladis.attention(
        q.double(), k.double(), torch.eye(lk, dtype=torch.float64).expand(1, 2, lk, lk), lam=lam, alpha=alpha
    )
    # Both maps are probability rows, so any affine mix sums to 1; float64 with |P| <= 2|lam|+1.
    assert_close(a.sum(-1), torch.ones(1, 2, lq, dtype=torch.float64), rtol=0, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(
    lk=st.integers(2, 30), n_masked=st.integers(0, 30), seed=st.integers(0, 2**16), alpha=st.sampled_from([1.5, 2.0])
)
def test_property_masked_keys_zero(lk, n_masked, seed, alpha):
    n_masked = min(n_masked, lk)
    q, k, _ = qkv(b=1, h=1, lq=3, lk=lk, d=8, seed=seed, scale=3.0)
    keep = torch.ones(lk, dtype=torch.bool)
    keep[torch.randperm(lk, generator=torch.Generator().manual_seed(seed))[:n_masked]] = False
    a = pladis.attention(q, k, torch.eye(lk).expand(1, 1, lk, lk), attn_mask=keep)
    assert not a.isnan().any()
    assert (a[..., ~keep] == 0).all()
    expected_sum = torch.full((1, 1, 3), 1.0 if keep.any() else 0.0)
    assert_close(a.sum(-1), expected_sum, rtol=0, atol=1e-5)  # float32 sums of <= 30 terms


@settings(max_examples=25, deadline=None)
@given(lk=st.integers(1, 50), seed=st.integers(0, 2**16), scale=st.floats(0.1, 10.0))
def test_property_lam_zero_equals_sdpa(lk, seed, scale):
    q, k, v = qkv(b=1, h=2, lq=4, lk=lk, d=8, seed=seed, scale=scale)
    assert torch.equal(pladis.attention(q, k, v, lam=0.0), F.scaled_dot_product_attention(q, k, v))


# --------------------------------------------------------------------------------------------------
# Bad input: ValueError naming the parameter, before any work
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, name",
    [
        (dict(q=torch.randn(16, 32)), "q must have rank"),
        (dict(k=torch.randn(1, 2, 3, 4, 77, 32)), "k must have rank"),
        (dict(k=torch.randn(2, 3, 77, 16)), "head dims differ"),
        (dict(v=torch.randn(2, 3, 76, 32)), "same key length"),
        (dict(v=torch.randn(2, 3, 77, 32, dtype=torch.float64)), "share one dtype"),
        (dict(q=torch.ones(2, 3, 16, 32, dtype=torch.int64)), "q must be a floating"),
        (dict(k=torch.randn(5, 3, 77, 32)), "do not broadcast"),
        (dict(alpha=1.0), "alpha"),
        (dict(alpha=2.5), "alpha"),
        (dict(lam=float("nan")), "lam"),
        (dict(lam=float("inf")), "lam"),
        (dict(scale=-1.0), "scale"),
        (dict(attn_mask=torch.ones(2, 3, 16, 5, dtype=torch.bool)), "attn_mask shape"),
        (dict(attn_mask=torch.ones(2, 3, 16, 77, dtype=torch.int32)), "attn_mask must be"),
    ],
)
def test_bad_input_names_the_parameter(change, name):
    q, k, v = qkv()
    args = dict(q=q, k=k, v=v) | change
    with pytest.raises(ValueError, match=name):
        pladis.attention(**args)


def test_negative_lam_is_allowed():
    q, k, v = qkv(dtype=torch.float64)
    assert_close(pladis.attention(q, k, v, lam=-0.5), oracle(q, k, v, -0.5, 1.5), **TOL_FP64)


def test_joint_bad_text_arguments():
    q, k, v = qkv(lq=20, lk=20)
    for bad in [0, -1, 21, 2.5, True]:
        with pytest.raises(ValueError, match="text_len"):
            pladis.joint_attention(q, k, v, text_len=bad, text_first=True)
    with pytest.raises(ValueError, match="text_first"):
        pladis.joint_attention(q, k, v, text_len=3, text_first=1)
    with pytest.raises(ValueError, match="one token sequence"):
        pladis.joint_attention(q, k[..., :10, :], v[..., :10, :], text_len=5, text_first=True)


@pytest.mark.parametrize("text", [None, (7, True), (7, False)])
def test_per_sample_lam_equals_each_sample_alone(text):
    # lam as a (B,) runtime tensor: sample b gets lam[b], exactly as a call with that number alone.
    g = torch.Generator().manual_seed(3)
    lq, lk = (20, 20) if text else (16, 77)
    q, k, v = (torch.randn(3, 2, n, 32, generator=g, dtype=torch.float64) for n in (lq, lk, lk))
    lam = torch.tensor([0.0, 1.0, 3.0])
    kw = dict(text_len=text[0], text_first=text[1]) if text else {}
    fn = pladis.joint_attention if text else pladis.attention
    together = fn(q, k, v, lam=lam, **kw)
    for b in range(3):
        alone = fn(q[b : b + 1], k[b : b + 1], v[b : b + 1], lam=float(lam[b]), **kw)
        # float64 both ways: only summation order may differ
        torch.testing.assert_close(together[b : b + 1], alone, rtol=0, atol=1e-12)


@pytest.mark.parametrize("alpha", [1.5, 2.0])
@pytest.mark.parametrize("lam", [0.7, 1 / 3, 2.9, "per-sample"])
@pytest.mark.parametrize("text", [None, (7, True)], ids=["cross", "joint"])
def test_float64_is_exact_for_any_lam(alpha, lam, text):
    # float64 is the reference path: lam must reach it unrounded. A float32 lam (0.7 -> 0.699999988) is off by
    # 1e-8 relative, which shows as ~1e-8 in the output, far above float64 rounding.
    if lam == "per-sample":
        lam = torch.tensor([0.7, 1 / 3], dtype=torch.float64)
    lq, lk = (20, 20) if text else (16, 77)
    q, k, v = qkv(lq=lq, lk=lk, dtype=torch.float64, scale=2.0, seed=11)
    per_sample = isinstance(lam, torch.Tensor)
    if text:  # joint_oracle weighs one (B, H, text) row at a time; oracle the (B, H, Lq, Lk) map
        out = pladis.joint_attention(q, k, v, text_len=text[0], text_first=text[1], lam=lam, alpha=alpha)
        expected = joint_oracle(q, k, v, lam.reshape(-1, 1, 1) if per_sample else lam, alpha, (0, text[0]))
    else:
        out = pladis.attention(q, k, v, lam=lam, alpha=alpha)
        expected = oracle(q, k, v, lam.reshape(-1, 1, 1, 1) if per_sample else lam, alpha)
    assert_close(out, expected, **tolerances.FP64_EXACT)


def test_lam_tensor_of_the_wrong_length_is_refused():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="lam has 3 values for a batch of 2"):
        pladis.attention(q, k, v, lam=torch.ones(3))


# --------------------------------------------------------------------------------------------------
# The sort-free fast path (fp16/bf16/fp32, alpha 1.5 and 2) against the exact float64 operator
# --------------------------------------------------------------------------------------------------


def test_fast_path_runs_where_documented():
    assert ops.fast_path_applies(torch.float32, 1.5) and ops.fast_path_applies(torch.bfloat16, 2.0)
    assert not ops.fast_path_applies(torch.float64, 1.5)  # float64: the exact sort solver (the oracle)
    assert not ops.fast_path_applies(torch.float32, 1.25)  # other alpha: bisection


@pytest.mark.parametrize("alpha", [1.5, 2.0])
@pytest.mark.parametrize("lk", [1, 77, 300, 301, 1000, 1001])  # both sides of each newton_steps boundary
def test_entmax_newton_matches_oracle(alpha, lk):
    # Logit scales 0.1-30 (the range NEWTON_STEPS was measured on), float32 in, float64 oracle on the same
    # (rounded) logits: error at float32 rounding of outputs <= 1 (a few ulps; 1000-term sums).
    s = torch.cat([rand(8, lk, scale=sc, seed=lk) for sc in (0.1, 1.0, 5.0, 30.0)])
    u, c = ops.entmax_newton(s, alpha, ops.newton_steps(alpha, lk))
    assert_close(c * u, ORACLE[alpha](s.double(), dim=-1), rtol=0, atol=2e-6)


def _joint_inputs(b, h, text, image, d, dtype, seed=0):
    n = text + image
    return tuple(rand(b, h, n, d, dtype=dtype, seed=seed + i, scale=1.5 if i < 2 else 1.0) for i in range(3))


def _joint_masks(b, n, text_first, text, kind):
    """Padding over keys: sample 0 pads half its text (at least one real token), sample 1's text block is
    fully masked when there is more than one sample; kind "bool" or "additive" (-inf)."""
    t0, t1 = ops.text_span(n, text, text_first)
    keep = torch.ones(b, 1, 1, n, dtype=torch.bool)
    keep[0, ..., t0 + max(1, text // 2) : t1] = False
    if b > 1:
        keep[1, ..., t0:t1] = False
    return keep if kind == "bool" else torch.zeros(keep.shape).masked_fill(~keep, -math.inf)


@pytest.mark.parametrize("path", ["lse", "chunked"])
@pytest.mark.parametrize("text_first", [True, False], ids=["flux", "sd3"])
@pytest.mark.parametrize("text, image", [(1, 37), (77, 203), (512, 131)])
@pytest.mark.parametrize("mask", [None, "bool", "additive"])
def test_joint_fast_path_matches_float64_operator(path, text_first, text, image, mask, monkeypatch):
    # "lse": SDPA with its log-sum-exp + the image x text correction; "chunked": the fallback where no
    # lse-returning kernel exists. Image lengths are odd so no chunk or block size divides them.
    if path == "chunked":
        monkeypatch.setattr(torch_internals, "sdpa_with_lse", lambda *a: None)
        monkeypatch.setattr(ops, "_FAST_CHUNK_ELEMENTS", 2 * 3 * (text + image) * 17)  # ragged row chunks
    q, k, v = _joint_inputs(2, 3, text, image, 16, torch.float32)
    m = None if mask is None else _joint_masks(2, text + image, text_first, text, mask)
    lam = torch.tensor([2.0, 1.5])  # one strength per sample
    kw = dict(text_len=text, text_first=text_first, lam=lam)
    out = pladis.joint_attention(q, k, v, attn_mask=m, **kw)
    m64 = m if m is None or m.dtype == torch.bool else m.double()
    expected = pladis.joint_attention(q.double(), k.double(), v.double(), attn_mask=m64, **kw)
    assert not out.isnan().any()
    # float32 logits/threshold on O(1) scores vs exact float64: a few float32 ulps, amplified by lam and by
    # sums over up to 643 keys (same bound as cross-attention's TOL_FP32).
    assert_close(out, expected, **TOL_FP32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("text_first", [True, False], ids=["flux", "sd3"])
def test_joint_fast_path_half_precision(dtype, text_first):
    q, k, v = _joint_inputs(2, 2, 77, 181, 32, dtype)
    m = _joint_masks(2, 258, text_first, 77, "bool")
    kw = dict(text_len=77, text_first=text_first, lam=torch.tensor([2.0, 3.0]), attn_mask=m)
    out = pladis.joint_attention(q, k, v, **kw)
    assert out.dtype == dtype
    # Same inputs in float64: only the operator's own rounding (dense output and correction rounded to the
    # input dtype), as TOL_HALF explains.
    assert_close(out, pladis.joint_attention(q.double(), k.double(), v.double(), **kw), **TOL_HALF[dtype])


def test_joint_fast_path_fully_masked_query_row_gives_zeros():
    q, k, v = _joint_inputs(1, 2, 7, 13, 8, torch.float32)
    keep = torch.ones(1, 2, 20, 20, dtype=torch.bool)
    keep[0, 1, 15] = False  # an image query row that sees no key
    keep[0, 0, 3] = False  # a text query row that sees no key
    out = pladis.joint_attention(q, k, v, text_len=7, text_first=True, attn_mask=keep)
    assert not out.isnan().any()
    assert (out[0, 1, 15] == 0).all() and (out[0, 0, 3] == 0).all()
    expected = pladis.joint_attention(q.double(), k.double(), v.double(), text_len=7, text_first=True,
                                      attn_mask=keep)  # fmt: skip
    assert_close(out, expected, **TOL_FP32)  # the other rows as in the test above


@pytest.mark.parametrize("alpha", [1.5, 2.0])
def test_cross_fast_path_masks_and_per_sample_lam(alpha):
    q, k, v = qkv(b=3, lk=120)
    keep = torch.ones(3, 1, 1, 120, dtype=torch.bool)
    keep[0, ..., 30:] = False
    keep[2] = False  # a sample whose keys are all masked: zero rows
    lam = torch.tensor([2.0, 0.0, 3.0])
    out = pladis.attention(q, k, v, alpha=alpha, attn_mask=keep, lam=lam)
    expected = pladis.attention(q.double(), k.double(), v.double(), alpha=alpha, attn_mask=keep, lam=lam)
    assert (out[2] == 0).all()
    assert_close(out, expected, **TOL_FP32)  # float32 vs float64 on O(1) scores, as TOL_FP32 says
