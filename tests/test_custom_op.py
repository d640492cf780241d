"""The ``pladis::attention`` custom op: registration checks, one node under torch.export and torch.compile."""

import pytest
import tolerances
import torch

import pladis
from pladis import ops


def _args(lq=16, lk=77, dtype=torch.float32, mask=False, text=(0, False)):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, lq, 32, generator=g).to(dtype)
    k = torch.randn(2, 3, lk, 32, generator=g).to(dtype)
    v = torch.randn(2, 3, lk, 24, generator=g).to(dtype)
    m = (torch.rand(2, 1, 1, lk, generator=g) > 0.2) if mask else None
    lam = torch.tensor([2.0, 1.0])  # one strength per sample: a runtime input of the op
    return (q, k, v, m, lam, 1.5, 32**-0.5, *text)


@pytest.mark.parametrize(
    "args",
    [
        _args(),
        _args(mask=True),
        _args(dtype=torch.float16),
        _args(lq=20, lk=20, text=(7, True)),
        _args(lq=20, lk=20, text=(7, False)),
    ],
    ids=["cross", "masked", "fp16", "joint-text-first", "joint-text-last"],
)
def test_opcheck(args):
    # schema, fake tensor, AOT dispatch (static and dynamic shapes); no autograd: inference only.
    torch.library.opcheck(
        ops.attention_op,
        args,
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static", "test_aot_dispatch_dynamic"),
    )


class _Cross(torch.nn.Module):
    def forward(self, q, k, v):
        return pladis.attention(q, k, v, lam=2.0, alpha=1.5)


def _pladis_nodes(graph) -> list:
    return [n for n in graph.nodes if n.op == "call_function" and "pladis" in str(n.target)]


def test_torch_export_keeps_one_node_with_dynamic_shapes():
    q, k, v, *_ = _args()
    batch, lq = torch.export.Dim("batch", max=64), torch.export.Dim("lq", max=8192)
    ep = torch.export.export(_Cross(), (q, k, v), dynamic_shapes=({0: batch, 2: lq}, {0: batch}, {0: batch}))
    nodes = _pladis_nodes(ep.graph)
    assert [str(n.target) for n in nodes] == ["pladis.attention.default"]
    q2 = torch.randn(4, 3, 40, 32)
    k2, v2 = torch.randn(4, 3, 77, 32), torch.randn(4, 3, 77, 24)
    # The exported program runs the same op on new shapes: identical results.
    assert torch.equal(ep.module()(q2, k2, v2), pladis.attention(q2, k2, v2))


def test_torch_compile_fullgraph():
    q, k, v, *_ = _args()
    compiled = torch.compile(_Cross(), backend="aot_eager", fullgraph=True)
    # aot_eager runs the same eager kernels after tracing through the fake twin: identical results.
    assert torch.equal(compiled(q, k, v), pladis.attention(q, k, v))


def test_inductor_fusion_opt_in_fuses_under_compile_and_keeps_one_export_node(monkeypatch):
    q, k, v, m, lam, *_ = _args(mask=True)
    calls = []
    eager = ops.fast_attention
    monkeypatch.setattr(ops, "fast_attention", lambda *a: calls.append(1) or eager(*a))
    expected = pladis.attention(q.double(), k.double(), v.double(), attn_mask=m, lam=lam)
    ops.inductor_fusion(True)
    try:
        torch._dynamo.reset()
        fn = torch.compile(lambda q, k, v, m, lam: pladis.attention(q, k, v, attn_mask=m, lam=lam), fullgraph=True)
        out = fn(q, k, v, m, lam)
        assert calls == []  # Inductor ran the fused tensor code, not the op
        # float32 vs float64 on O(1) scores: as test_ops.TOL_FP32
        torch.testing.assert_close(out.double(), expected, rtol=tolerances.FP32, atol=tolerances.FP32)
        ep = torch.export.export(_Cross(), (q, k, v))
        assert [str(n.target) for n in _pladis_nodes(ep.graph)] == ["pladis.attention.default"]
    finally:
        ops.inductor_fusion(False)
        torch._dynamo.reset()


def test_inductor_fusion_keeps_the_op_where_the_fused_form_declines():
    # joint attention: fused_form returns NotImplemented, so the op stays in the graph and Inductor must call
    # it as a fallback (it used to assert "both a fallback and a decomp"; first seen on CUDA, where the kernel
    # makes fused_form decline for every call)
    q = torch.randn(1, 2, 24, 16)
    eager = pladis.joint_attention(q, q, q, text_len=8, text_first=True)
    ops.inductor_fusion(True)
    try:
        torch._dynamo.reset()
        fn = torch.compile(lambda q: pladis.joint_attention(q, q, q, text_len=8, text_first=True), fullgraph=True)
        assert torch.equal(fn(q), eager)  # the same op on the same inputs: identical
    finally:
        ops.inductor_fusion(False)
        torch._dynamo.reset()
