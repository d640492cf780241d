"""The fused Triton kernel: in Triton's interpreter on a CPU (CI), compiled on a GPU (``make gpu-check``)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from pladis import ops

CASES = [  # (B, H, Lq, Lk, D), alpha, dtype, mask
    ((1, 2, 33, 77, 40), 1.5, "float32", None),
    ((2, 1, 16, 300, 64), 2.0, "float32", "padding"),
    ((1, 3, 20, 120, 72), 1.5, "float32", "padding"),
    ((2, 2, 17, 77, 64), 1.5, "float16", "padding"),
    ((1, 2, 8, 512, 16), 1.5, "float32", "row"),
    ((1, 1, 12, 1, 40), 2.0, "float32", None),
]
# float32 logits and threshold vs the float64 operator: float32 rounding of O(10) scores times lam; fp16
# inputs also round the mixed map to fp16 (2^-11 relative) before P·V, as the contract says.
TOL = {"float32": 2e-5, "float16": 4e-3}

_SCRIPT = """
import json, sys, torch
from pladis import ops
from pladis.kernels import attention as kernel
out = []
for shape, alpha, dtype, mask in json.loads(sys.argv[1]):
    b, h, lq, lk, d = shape
    g = torch.Generator().manual_seed(lk + lq)
    q, k = ((torch.randn(b, h, n, d, generator=g) * 2.5).to(getattr(torch, dtype)) for n in (lq, lk))
    v = torch.randn(b, h, lk, d, generator=g).to(getattr(torch, dtype))
    m = None
    if mask:
        m = torch.ones(b, 1, lq if mask == "row" else 1, lk, dtype=torch.bool)
        m[0, ..., lk - lk // 4:] = False
        if mask == "row":
            m[0, 0, 3] = False  # a query row that sees no key: zeros
    got = kernel.attention(q, k, v, m, 2.0, alpha, d ** -0.5)
    ref = ops.reference_attention(q.double(), k.double(), v.double(), m, 2.0, alpha, d ** -0.5)
    out.append({"err": (got.double() - ref).abs().max().item(), "nan": bool(got.isnan().any()),
                "dtype": str(got.dtype), "shape": list(got.shape)})
print(json.dumps(out))
"""


def test_kernel_in_triton_interpreter():
    pytest.importorskip("triton", reason="Triton is not installed (dev extra)")
    env = {**os.environ, "TRITON_INTERPRET": "1"}  # a child process: the interpreter is chosen at import
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(CASES)], capture_output=True, text=True,
                          env=env, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for (shape, alpha, dtype, mask), r in zip(CASES, results, strict=True):
        assert not r["nan"] and r["dtype"] == f"torch.{dtype}" and r["shape"] == [*shape[:3], shape[4]]
        assert r["err"] <= TOL[dtype], (shape, alpha, dtype, mask, r["err"])


def test_supported_covers_cross_attention_only():
    from pladis.kernels.attention import supported

    q, k = torch.zeros(1, 2, 8, 64), torch.zeros(1, 2, 77, 64)
    assert supported(q, k, k, None, 1.5, 0)
    assert not supported(q, k, k, None, 1.5, 7)  # joint attention: PyTorch operator
    assert not supported(q, k, k, None, 1.25, 0)  # bisection alphas: PyTorch operator
    long = torch.zeros(1, 2, 513, 64)
    assert not supported(q, long, long, None, 1.5, 0)  # more keys than one tile: PyTorch operator


def _cuda() -> str | None:
    return None if torch.cuda.is_available() else "no CUDA GPU"


@pytest.mark.gpu
@pytest.mark.skipif(_cuda() is not None, reason=str(_cuda()))
@pytest.mark.parametrize("dtype, tol", [(torch.float16, 4e-3), (torch.bfloat16, 3e-2), (torch.float32, 1e-4)])
@pytest.mark.parametrize("shape", [(2, 10, 4096, 77, 64), (2, 8, 4096, 77, 40), (2, 16, 1024, 300, 72)])
def test_kernel_on_gpu_matches_operator(shape, dtype, tol):
    b, h, lq, lk, d = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, device="cuda", generator=g).to(dtype) for n in (lq, lk, lk))
    got = ops.attention(q, k, v)  # the custom op's CUDA implementation: the kernel
    ref = ops.reference_attention(q.double(), k.double(), v.double(), None, 2.0, 1.5, d**-0.5)
    # fp32 products stay IEEE float32 (DOT_PRECISION), so the GPU bound is the interpreter's 2e-5 at worst
    # rounding-order differences: 1e-4 leaves room for the reduction order of the GPU's dot
    assert (got.double() - ref).abs().max().item() <= tol
