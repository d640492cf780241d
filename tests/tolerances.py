"""Tolerances shared by more than one test file, each with its reason (docs/NUMERICS.md, "Precision").

Every bound compares an implementation with an independent float64 reference (the ``entmax`` package or the
exact float64 operator), never with the code's own output.
"""

import torch

# float64 in, float64 math: only summation order differs from the oracle.
FP64 = dict(rtol=1e-10, atol=1e-10)
# float64 at O(1) scores and values over <= 100 keys, lam up to 3: the rounding of the sums is ~100 * 2^-53 *
# (2 lam - 1) ~ 1e-13, so 1e-12 holds it and still catches any float32 rounding on the way (2^-24 ~ 6e-8).
FP64_EXACT = dict(rtol=1e-12, atol=1e-12)
# float32 logits and threshold (the contract) vs the float64 oracle on O(1) scores: a few float32 ulps,
# amplified by lam and by up to 1000-term sums.
FP32 = 2e-5
# float16/bfloat16 in: the map is rounded to the input dtype for the final P·V (the contract), so the error is
# that rounding (2^-11 resp. 2^-8 relative) times sum |P| |V| <= (2 lam - 1) max|V|.
HALF = {torch.float16: 4e-3, torch.bfloat16: 3e-2}
# The GPU kernel in float32: IEEE float32 products (DOT_PRECISION), so FP32 plus room for the reduction
# order of the GPU's dot.
GPU_FP32 = 1e-4
