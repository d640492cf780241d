"""The ``pladis::attention`` custom op: registration checks, one node under torch.export, fused tensor code
under torch.compile, and the private torch names the compiled paths rest on (``pladis.torch_internals``)."""

import logging
import re
import tomllib
from pathlib import Path

import pytest
import tolerances
import torch

import pladis
from pladis import ops, torch_internals


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


def test_torch_compile_fullgraph_without_fusion_calls_the_op():
    q, k, v, *_ = _args()
    ops.inductor_fusion(False)
    try:
        torch._dynamo.reset()
        compiled = torch.compile(_Cross(), backend="aot_eager", fullgraph=True)
        # aot_eager runs the same eager kernels after tracing through the fake twin: identical results.
        assert torch.equal(compiled(q, k, v), pladis.attention(q, k, v))
    finally:
        ops.inductor_fusion(True)
        torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_graphs_trace_into_the_op_and_export_keeps_one_node(eager_op_calls, backend):
    q, k, v, m, lam, *_ = _args(mask=True)
    expected = pladis.attention(q.double(), k.double(), v.double(), attn_mask=m, lam=lam)
    torch._dynamo.reset()
    try:
        fn = torch.compile(lambda q, k, v, m, lam: pladis.attention(q, k, v, attn_mask=m, lam=lam), backend=backend,
                           fullgraph=True)  # fmt: skip
        out = fn(q, k, v, m, lam)
    finally:
        torch._dynamo.reset()
    assert eager_op_calls == []  # the compiled graph holds the fused tensor code, not a call of the op
    # float32 vs float64 on O(1) scores: as test_ops.TOL_FP32
    torch.testing.assert_close(out.double(), expected, rtol=tolerances.FP32, atol=tolerances.FP32)
    ep = torch.export.export(_Cross(), (q, k, v))
    assert [str(n.target) for n in _pladis_nodes(ep.graph)] == ["pladis.attention.default"]
    ep = ep.run_decompositions()  # the core ATen decompositions too
    assert [str(n.target) for n in _pladis_nodes(ep.graph)] == ["pladis.attention.default"]


def test_compiled_graphs_keep_the_op_where_the_fused_form_declines():
    # joint attention: fused_form returns NotImplemented, so the op stays in the graph and Inductor must call
    # it as a fallback (it used to assert "both a fallback and a decomp"; first seen on CUDA, where the kernel
    # makes fused_form decline for every call)
    q = torch.randn(1, 2, 24, 16)
    eager = pladis.joint_attention(q, q, q, text_len=8, text_first=True)
    torch._dynamo.reset()
    try:
        fn = torch.compile(lambda q: pladis.joint_attention(q, q, q, text_len=8, text_first=True), fullgraph=True)
        assert torch.equal(fn(q), eager)  # the same op on the same inputs: identical
    finally:
        torch._dynamo.reset()


@pytest.mark.slow
def test_aoti_fuses_the_op_for_static_shapes_and_calls_it_for_symbolic_ones(eager_op_calls, tmp_path):
    q, k, v, m, lam, *_ = _args(mask=True)

    class Cross(torch.nn.Module):
        def forward(self, q, k, v, m, lam):
            return pladis.attention(q, k, v, attn_mask=m, lam=lam)

    expected = pladis.attention(q.double(), k.double(), v.double(), attn_mask=m, lam=lam)
    lq = torch.export.Dim("lq", min=2, max=4096)
    for name, dynamic in (("static", None), ("dynamic", ({2: lq}, None, None, None, None))):
        ep = torch.export.export(Cross(), (q, k, v, m, lam), dynamic_shapes=dynamic)
        assert [str(n.target) for n in _pladis_nodes(ep.graph)] == ["pladis.attention.default"]
        path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / f"{name}.pt2"))
        eager_op_calls.clear()
        out = torch._inductor.aoti_load_package(path)(q, k, v, m, lam)
        # static: compiled tensor code, no call of the op; symbolic sizes: the op (faster there, see ops)
        assert (eager_op_calls == []) == (name == "static"), name
        # float32 vs float64 on O(1) scores: as test_ops.TOL_FP32
        torch.testing.assert_close(out.double(), expected, rtol=tolerances.FP32, atol=tolerances.FP32)


# --------------------------------------------------------------------------------------------------
# The private torch names (pladis.torch_internals)
# --------------------------------------------------------------------------------------------------


def _supported_floor() -> tuple[int, int]:
    """The oldest torch pladis supports, from pyproject.toml's ``torch>=X.Y``."""
    deps = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    (spec,) = [d for d in deps["dependencies"] if re.match(r"torch\b", d)]
    major, minor = re.search(r">=\s*(\d+)\.(\d+)", spec).groups()
    return int(major), int(minor)


def test_a_supported_torch_has_every_private_name():
    # Not a skip, not a fallback: a torch release that drops or moves one of these names fails here, naming it.
    # PRIVATE states which release first has each name; all of them are at or below the supported floor,
    # so no supported torch may lack any (an older torch may lack exactly those whose release is newer).
    floor = _supported_floor()
    for name, (since, feature) in torch_internals.PRIVATE.items():
        assert since <= floor, f"{name} first ships in torch {since}, after the supported floor {floor}"
        assert feature
    assert torch_internals.torch_version() >= floor
    assert torch_internals.missing() == {}, f"torch {torch.__version__} lacks private names pladis needs"


def test_the_names_are_the_ones_the_code_uses():
    # each name resolves to the kind of object the rule calls (a config flag, a mode class, a kernel)
    look = torch_internals.lookup
    assert isinstance(look("torch._functorch.config.decompose_custom_triton_ops"), bool)
    assert issubclass(look("torch._subclasses.functional_tensor.FunctionalTensorMode"),
                      torch.utils._python_dispatch.TorchDispatchMode)  # fmt: skip
    assert issubclass(look("torch._subclasses.fake_tensor.FakeTensor"), torch.Tensor)
    assert issubclass(look("torch._subclasses.functional_tensor.FunctionalTensor"), torch.Tensor)
    assert callable(look("torch.library.wrap_triton"))
    assert look("torch.utils._python_dispatch._get_current_dispatch_mode")() is None  # no mode active here
    for kernel in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention"):
        assert isinstance(look(f"torch.ops.aten.{kernel}"), torch._ops.OpOverloadPacket)


def test_a_missing_name_is_reported_with_the_feature_it_turns_off(monkeypatch, caplog):
    # the check above must be able to fail: a torch without the decomposition switch is reported by name
    import torch._functorch.config as config

    monkeypatch.delattr(config, "decompose_custom_triton_ops", raising=False)
    monkeypatch.delattr(torch.library, "wrap_triton")
    gone = torch_internals.missing()
    assert set(gone) == {"torch._functorch.config.decompose_custom_triton_ops", "torch.library.wrap_triton"}
    assert "compilers tracing into pladis::attention" in gone["torch._functorch.config.decompose_custom_triton_ops"]
    with caplog.at_level(logging.WARNING, logger="pladis.torch_internals"):
        torch_internals._warn_missing()
    assert "decompose_custom_triton_ops" in caplog.text and "off: compilers tracing into" in caplog.text
    # and no rule is registered (an object without register_torch_dispatch would raise): the op stays one call
    assert torch_internals.trace_into(object(), lambda *a: NotImplemented, None, {"enabled": True}) is False


def test_the_tracing_rule_is_registered_on_this_torch():
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    assert FunctionalTensorMode in ops.attention_op._torch_dispatch_fns
