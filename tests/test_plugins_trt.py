"""The PladisAttention TensorRT plugin and the TensorRT build, as far as a machine without TensorRT proves them:
the plugin functions follow TensorRT's rules (checked on the undecorated functions), the node's attributes
are the ones the plugin registers, ``register()`` and ``pladis build --backend trt`` say what is missing or
out of range. The TensorRT API surface of 10.9, 10.16 and 11.4 is tests/test_trt_api.py; the build plan
tests/test_trt_plan.py. The build and the engine under TensorRT on a GPU are the ``gpu`` tests at the end
(skipped here)."""

import ast
import inspect
import subprocess
import sys

import onnx
import pytest
from onnx import helper

from pladis.engine import trt as trt_engine
from pladis.errors import PladisError
from pladis.export import ExportConfig, export, onnx_op
from pladis.plugins_trt import plugin

TRTP_NAMES = {"TensorDesc", "AutoTuneCombination", "KernelLaunchParams", "SymIntExprs"}  # in tensorrt.plugin


@pytest.fixture(scope="module")
def sd15_onnx(tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "tiny-sd15"
    export(ExportConfig(model="tiny-sd15", out=str(out), validate=False))
    return out


def _tensorrt_missing() -> str | None:
    try:
        import tensorrt
    except ImportError:
        return "TensorRT is not installed (its libraries are not on PyPI)"
    if tuple(int(x) for x in tensorrt.__version__.split(".")[:2]) < (10, 9):
        return f"TensorRT {tensorrt.__version__} < 10.9 (no AOT plugins)"
    import torch

    return None if torch.cuda.is_available() else "no CUDA GPU"


# --------------------------------------------------------------------------------------------------
# 4. The plugin functions follow TensorRT's rules
# --------------------------------------------------------------------------------------------------


def _params(fn):
    return list(inspect.signature(fn).parameters.values())


def _check_annotation(text: str) -> None:
    """A deferred annotation register() can evaluate: Python syntax naming builtins and tensorrt.plugin only."""
    tree = ast.parse(text, mode="eval")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            assert isinstance(node.value, ast.Name) and node.value.id == "trtp" and node.attr in TRTP_NAMES, text
        elif isinstance(node, ast.Name):
            assert node.id in {"trtp", "tuple", "list", "str", "bytes", "int", "float"}, text


def test_plugin_module_does_not_import_tensorrt():
    code = "import sys, pladis.plugins_trt, pladis.plugins_trt.plugin; print('tensorrt' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]


@pytest.mark.parametrize("kind", ["register", "autotune", "aot_impl"])
def test_plugin_functions_follow_tensorrt_rules(kind):
    fn = plugin.FUNCTIONS[kind]
    params = _params(fn)
    tail = {"register": [], "autotune": ["outputs"], "aot_impl": ["outputs", "tactic"]}[kind]
    # tensor descriptors first, then every attribute in register order (TensorRT passes all of them to
    # aot_impl by position), then the reserved trailing arguments
    assert [p.name for p in params] == [*plugin.INPUTS, *plugin.ATTRIBUTES, *tail]
    for p in params:
        assert p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and p.default is inspect.Parameter.empty, p
        assert isinstance(p.annotation, str), f"{p.name} is not annotated"
        _check_annotation(p.annotation)
    for p in params[: len(plugin.INPUTS)]:
        assert p.annotation == "trtp.TensorDesc"
    attrs = params[len(plugin.INPUTS) : len(plugin.INPUTS) + len(plugin.ATTRIBUTES)]
    assert [p.annotation for p in attrs] == [t.__name__ for t in plugin.ATTRIBUTES.values()]
    assert not set(plugin.ATTRIBUTES) & set(plugin.RESERVED)
    if tail:
        assert params[len(plugin.INPUTS) + len(plugin.ATTRIBUTES)].annotation == "tuple[trtp.TensorDesc]"
    if kind == "aot_impl":
        assert params[-1].annotation == "int"
    ret = inspect.signature(fn).return_annotation
    _check_annotation(ret)
    assert (
        ret
        == {
            "register": "trtp.TensorDesc",
            "autotune": "list[trtp.AutoTuneCombination]",
            "aot_impl": "tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]",
        }[kind]
    )


def test_plugin_id_is_what_the_onnx_parser_looks_up():
    # op_type = plugin name, plugin_namespace attribute (and, from TensorRT 10.10, the domain) = namespace
    assert plugin.PLUGIN_ID == f"{onnx_op.DOMAIN}::{onnx_op.OP_TYPE}" and onnx_op.PLUGIN_VERSION == "1"
    assert "." not in plugin.NAMESPACE and plugin.NAMESPACE not in {"", "trt", "tensorrt", "std"}


def test_exported_nodes_carry_every_registered_attribute_with_its_type(sd15_onnx):
    model = onnx.load(str(sd15_onnx / "unet.onnx"), load_external_data=False)
    nodes = onnx_op.pladis_nodes(model)
    kinds = {float: onnx.AttributeProto.FLOAT, int: onnx.AttributeProto.INT}
    assert nodes
    for node in nodes:
        attrs = {a.name: a.type for a in node.attribute}
        for name, typ in plugin.ATTRIBUTES.items():
            assert attrs.get(name) == kinds[typ], (node.name, name)
        assert {attrs.get("plugin_version"), attrs.get("plugin_namespace")} == {onnx.AttributeProto.STRING}
    if all(len(n.input) == len(plugin.INPUTS) for n in nodes):
        assert trt_engine.check_plugin_nodes(model, "unet") == len(nodes)
    else:  # an exporter from before lam became the fifth input: the trt build asks for a re-export
        with pytest.raises(trt_engine.TrtBuildError, match="lam became a tensor input.*re-export"):
            trt_engine.check_plugin_nodes(model, "unet")


def test_autotune_types_keep_q_k_v_out_alike_and_lam_float32():
    types = [t.strip() for t in plugin.io_types(bf16=True).split(",")]
    assert len(types) == len(plugin.INPUTS) + 1  # inputs, then the one output
    assert types[0] == types[1] == types[2] == types[5] == "FP32|FP16|BF16"  # dependent: one type for all four
    assert types[3] == "FP32*FP16*BF16" and types[4] == "FP32"  # the mask's type is free; lam is float32
    assert "BF16" not in plugin.io_types(bf16=False)


def _node(**attrs):
    node = helper.make_node("PladisAttention", ["q", "k", "v", "mask", "lam"], ["out"], domain="pladis", name="n0",
                            **{"plugin_version": "1", "plugin_namespace": "pladis", **attrs})  # fmt: skip
    graph = helper.make_graph([node], "g", [], [])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("pladis", 1)])


def test_the_trt_build_refuses_what_the_plugin_does_not_implement():
    from pladis.errors import PladisError, SettingError

    ok = dict(alpha=1.5, scale=0.125, text_len=0, text_first=0)
    assert trt_engine.check_plugin_nodes(_node(**ok), "unet") == 1
    # joint attention (SD3: text last, FLUX: text first) up to the joint kernel's 512 text tokens is accepted
    for text_len, text_first in ((77, 0), (333, 0), (512, 1)):
        assert trt_engine.check_plugin_nodes(_node(**{**ok, "text_len": text_len, "text_first": text_first}), "t") == 1
    with pytest.raises(
        trt_engine.TrtBuildError, match="transformer: .*'n0'.*text_len=513.*at most 512 text .*--backend ort"
    ):
        trt_engine.check_plugin_nodes(_node(**{**ok, "text_len": 513, "text_first": 1}), "transformer")
    with pytest.raises(trt_engine.TrtBuildError, match="alpha 1.5 and 2 only.*--backend ort or --backend aoti"):
        trt_engine.check_plugin_nodes(_node(**{**ok, "alpha": 1.25}), "unet")
    with pytest.raises(trt_engine.TrtBuildError, match=r"lacks the attributes \['scale'\]"):
        trt_engine.check_plugin_nodes(_node(alpha=1.5, text_len=0, text_first=0), "unet")
    four = _node(**ok)
    del four.graph.node[0].input[4]
    with pytest.raises(trt_engine.TrtBuildError, match="has 4 inputs.*takes 5 .*re-export"):
        trt_engine.check_plugin_nodes(four, "unet")
    # the plugin's own refusals are SettingErrors naming the attribute (TensorRT calls these functions too)
    with pytest.raises(SettingError, match="text_len=600") as e:
        plugin.check_attributes(1.5, 600, 1)
    assert e.value.field == "text_len" and isinstance(e.value, PladisError)
    with pytest.raises(SettingError) as e:
        plugin.check_attributes(1.25, 0)
    assert e.value.field == "alpha"


def test_plan_picks_the_kernel_from_the_profile_and_the_mask_shape():
    pytest.importorskip("triton", reason="Triton is not installed (dev extra)")
    from pladis.kernels import aot

    def info(static, upper, dtype="fp16"):
        return plugin.TensorInfo(dtype, static, upper)

    q = info((None, 16, None, 72), (8, 16, 4096, 72))
    k = info((None, 16, None, 72), (8, 16, 300, 72))
    cfg, ck = plugin.plan(q, k, k, info((None, 1, 1, None), (8, 1, 1, 300)), 1.5, 72**-0.5, 90)
    assert cfg.block_n == 512 and cfg.mask_mode == 1 and ck.capability == 90 and ck.shared_mem <= 48 * 1024
    assert not aot.is_joint(cfg) and ck.name.startswith("pladis_fwd")
    long = info((None, 16, None, 72), (8, 16, 600, 72))
    with pytest.raises(PladisError, match="at most 512 keys.*--backend ort or --backend aoti"):
        plugin.plan(q, long, long, info((1, 1, 1, 1), (1, 1, 1, 1), "fp32"), 1.5, 0.1, 90)


def test_plan_of_a_joint_node_is_the_joint_kernel():
    # text_len > 0: the joint kernel, the text tile from the node's text_len, text_first from the node
    pytest.importorskip("triton", reason="Triton is not installed (dev extra)")
    from pladis.kernels import aot

    def info(static, upper, dtype="bf16"):
        return plugin.TensorInfo(dtype, static, upper)

    qkv = info((None, 24, None, 128), (1, 24, 512 + 4096, 128))  # FLUX 1024²: 512 text + 4096 image tokens
    mask = info((None, 1, 1, None), (1, 1, 1, 512 + 4096), "fp32")
    cfg, ck = plugin.plan(qkv, qkv, qkv, mask, 1.5, 128**-0.5, 90, 512, 1)
    assert aot.is_joint(cfg) and cfg.block_t == 512 and cfg.text_first and cfg.mask_mode == 1
    assert ck.name.startswith("pladis_joint_fwd") and ck.shared_mem <= 48 * 1024
    sd3, _ = plugin.plan(qkv, qkv, qkv, mask, 2.0, 0.125, 90, 77, 0)
    assert sd3.block_t == 128 and not sd3.text_first and sd3.alpha == 2.0
    wide = info((None, 24, None, 256), (1, 24, 4608, 256))
    with pytest.raises(PladisError, match="TensorRT plugin: .*head dims up to 128.*--backend ort or --backend aoti"):
        plugin.plan(wide, wide, wide, mask, 1.5, 0.0625, 90, 512, 1)


def test_engine_metadata_names_the_kernel_and_the_driver_it_needs():
    # part of device_info, hence of the cache key and engine.json of every trt build
    from pladis import kernels

    info = trt_engine.plugin_info()
    assert info["kernel_sha256"] == kernels.source_hash() and len(info["kernel_sha256"]) == 64
    assert info["ptx_isa"] == "8.0" and info["min_driver"]["cuda"] == "12.0" and info["triton"]


# --------------------------------------------------------------------------------------------------
# 5. register() and `pladis build --backend trt` say what is missing, without a traceback
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mmdit_onnx(tmp_path_factory):
    """Tiny SD3 (text last, 333 tokens), FLUX, FLUX.2 and Qwen-Image (text first, 512 tokens; Qwen-Image's nodes
    with a text padding mask) exports."""
    root = tmp_path_factory.mktemp("mmdit")
    for name in ("tiny-sd3", "tiny-flux", "tiny-flux2", "tiny-qwenimage"):
        export(ExportConfig(model=name, out=str(root / name), validate=False))
    return root


JOINT_EXPORTS = [("tiny-sd3", 333, 0), ("tiny-flux", 512, 1), ("tiny-flux2", 512, 1), ("tiny-qwenimage", 512, 1)]


@pytest.mark.parametrize("name, text_len, text_first", JOINT_EXPORTS)
def test_joint_exports_pass_every_pre_build_check_of_the_trt_backend(mmdit_onnx, tmp_path, name, text_len,
                                                                     text_first):  # fmt: skip
    # Every check `pladis build --backend trt` makes before TensorRT is needed: the build's own (settings, the
    # export folder), the trt build plan, the plugin's check of every PladisAttention node (joint nodes: the
    # joint kernel). What stops the build here is only that TensorRT is not installed.
    from pladis.engine import BuildConfig, build
    from pladis.manifest import open_engine

    src = open_engine(mmdit_onnx / name)
    nodes = trt_engine.check_export(src)
    assert nodes["transformer"] > 0 and sum(nodes.values()) == nodes["transformer"]
    model = onnx.load(str(mmdit_onnx / name / src.manifest.components["transformer"].file), load_external_data=False)
    for node in onnx_op.pladis_nodes(model):  # joint nodes, with the layout the plugin reads from them
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert (attrs["text_len"], attrs["text_first"]) == (text_len, text_first)
    assert set(trt_engine.build_plan(src.manifest, src.manifest.precision, "11.4.0.106")) == set(nodes)
    if _tensorrt_missing() is None:
        pytest.skip("TensorRT and a GPU are present: the gpu build test covers the rest")
    cfg = BuildConfig(onnx=str(mmdit_onnx / name), backend="trt", out=str(tmp_path / "e"),
                      cache_dir=str(tmp_path / "c"))  # fmt: skip
    with pytest.raises(trt_engine.TrtBuildError, match="TensorRT is not installed") as e:
        build(cfg)
    assert "joint" not in str(e.value) and "PladisAttention" not in str(e.value)
    assert not (tmp_path / "e").exists()


def test_preflight_refuses_an_uncovered_joint_node_by_name_before_tensorrt(mmdit_onnx, tmp_path):
    # the same FLUX graph with text_len past the joint kernel's tile: refused by component and node, before the
    # TensorRT check (which would otherwise be what fails on this machine)
    import shutil
    from types import SimpleNamespace

    from pladis.manifest import open_engine

    folder = tmp_path / "flux"
    shutil.copytree(mmdit_onnx / "tiny-flux", folder)
    src = open_engine(folder)
    path = folder / src.manifest.components["transformer"].file
    model = onnx.load(str(path), load_external_data=False)
    node = onnx_op.pladis_nodes(model)[0]
    next(a for a in node.attribute if a.name == "text_len").i = 600
    onnx.save(model, str(path))
    edited = SimpleNamespace(folder=folder, manifest=src.manifest)
    with pytest.raises(
        trt_engine.TrtBuildError, match=f"transformer: PladisAttention node '{node.name}'.*text_len=600"
    ):
        trt_engine.preflight(edited, src.manifest.precision)


@pytest.mark.skipif(_tensorrt_missing() is None, reason="TensorRT >= 10.9 and a GPU are present")
def test_register_says_what_is_missing():
    from pladis import plugins_trt

    with pytest.raises(plugins_trt.PluginUnavailable, match="TensorRT|10.9|GPU|Triton"):
        plugins_trt.register()


@pytest.mark.skipif(_tensorrt_missing() is None, reason="TensorRT >= 10.9 and a GPU are present")
def test_pladis_build_trt_stops_at_the_tensorrt_check_with_exit_2(sd15_onnx, tmp_path):
    cmd = ["build", "--onnx", str(sd15_onnx), "--backend", "trt", "--out", str(tmp_path / "e"),
           "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    code = f"import sys; from pladis import cli; sys.exit(cli.main({cmd!r}))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "pladis build: error:" in proc.stderr and ("TensorRT" in proc.stderr or "GPU" in proc.stderr)
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("version", ["10.8.0.43", "12.0.0.1"])
def test_pladis_build_trt_names_the_supported_range_for_another_version(sd15_onnx, tmp_path, version):
    # only the version string is simulated (a module named tensorrt with that __version__): no TensorRT runs
    from pladis.plugins_trt import SUPPORTED_TEXT

    cmd = ["build", "--onnx", str(sd15_onnx), "--backend", "trt", "--out", str(tmp_path / "e"),
           "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    code = ("import sys, types; fake = types.ModuleType('tensorrt'); fake.__version__ = sys.argv[1]; "
            f"sys.modules['tensorrt'] = fake; from pladis import cli; sys.exit(cli.main({cmd!r}))")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code, version], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert f"TensorRT {version} is outside the supported range, {SUPPORTED_TEXT}" in proc.stderr
    assert not (tmp_path / "e").exists()


def test_a_tensorrt_exception_during_the_build_is_one_line_naming_the_component(sd15_onnx, tmp_path, monkeypatch):
    # a module named tensorrt whose Builder raises as pybind11 does (a multi-line RuntimeError): not TensorRT
    import types
    from types import SimpleNamespace

    from pladis import plugins_trt
    from pladis.engine import BuildConfig
    from pladis.manifest import open_engine

    fake = types.ModuleType("tensorrt")
    fake.__version__ = "11.4.0.106"
    severity = SimpleNamespace(ERROR=4, INTERNAL_ERROR=5, WARNING=3)
    fake.ILogger = type("ILogger", (), {"__init__": lambda self: None, "Severity": severity})

    def builder(logger):
        raise RuntimeError("[TRT] [E] IBuilder::createNetworkV2: Error Code 3\nAPI Usage Error (more lines)")

    fake.Builder = builder
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(plugins_trt, "register", lambda: None)
    src = open_engine(sd15_onnx)
    cfg = BuildConfig(onnx=str(sd15_onnx), backend="trt", out=str(tmp_path / "e"))
    with pytest.raises(trt_engine.TrtBuildError) as e:
        trt_engine.build(src, dict(src.manifest.dims), "fp32", cfg, tmp_path)
    msg = str(e.value)
    first = next(iter(src.manifest.components))
    assert "\n" not in msg and msg.startswith(f"{first}: TensorRT 11.4.0.106 failed: [TRT] [E] IBuilder")
    assert "run with -v" in msg and not list(tmp_path.glob("*.plan"))


# --------------------------------------------------------------------------------------------------
# With TensorRT >= 10.9 and a GPU (make gpu-check on such a machine): the real build and the engine
# --------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(_tensorrt_missing() is not None, reason=str(_tensorrt_missing()))
def test_trt_build_of_a_pladis_export_runs_the_plugin(sd15_onnx, tmp_path):
    import json

    from pladis.engine import BuildConfig, build
    from pladis.runtime import parity

    out = tmp_path / "engine"
    meta = build(BuildConfig(onnx=str(sd15_onnx), backend="trt", out=str(out), cache_dir=str(tmp_path / "c"),
                             device="cuda"))  # fmt: skip
    assert meta["device"]["plugin"]["ptx_isa"] and meta["device"]["capability"]
    assert meta["components"]["unet"]["pladis_plugin_layers"] > 0
    assert json.loads((out / "engine.json").read_text())["key"] == meta["key"]
    report = parity.check(out, "trt", steps=2)  # the engine in the scheduler loop vs eager PyTorch
    assert report.ok, report.table()
