"""The TensorRT API surface, checked against the real bindings wheels of TensorRT 10.9, 10.16 and 11.4 (cu12, cu13).

These tests check names and signatures only: TensorRT itself never runs here. Each version's
``tensorrt-cu12-bindings`` wheel (its compiled module and its ``tensorrt.plugin`` sources, unchanged) is
imported over stand-ins for libnvinfer / libnvonnxparser / libnvinfer_plugin that are derived from the wheel
(one aborting function per symbol it imports) and do nothing else (tests/trt_surface.py). What is checked:
every attribute and call the project's TensorRT code reaches exists in that version with a fitting signature,
the build plan's flag names exist there, the plugin functions pass that version's own validators, its AOT
plugin class gets from aot_impl the PTX of the kernel for a joint (FLUX) and a cross (SDXL) node, and its
plugin creator parses the node's attributes under this NumPy exactly when ``check_version`` says it can.
The wheels are downloaded with pip (cached in $PLADIS_TRT_WHEELS or ~/.cache/pladis/tensorrt-bindings);
without PyPI these tests skip, except under CI=true, where they fail.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import trt_surface as ts

import pladis
from pladis.engine import trt as trt_engine

OLDEST, RECENT_10, CURRENT = "10.9.0.34", "10.16.1.11", "11.4.0.106"
# (version, distribution): CUDA 12 builds of each, and the CUDA 13 build of 11.4 (what `pip install tensorrt` picks)
VERSIONS = [(OLDEST, "tensorrt-cu12-bindings"), (RECENT_10, "tensorrt-cu12-bindings"),
            (CURRENT, "tensorrt-cu12-bindings"), (CURRENT, "tensorrt-cu13-bindings")]  # fmt: skip
FILES = ts.tensorrt_files(Path(pladis.__file__).parent)


@pytest.fixture(scope="module", params=VERSIONS, ids=lambda v: f"{v[1].split('-')[1]}-{v[0]}")
def wheel(request):
    try:
        return ts.Wheel(*request.param).prepare()
    except ts.Unavailable as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must check the TensorRT API surface: {e}")
        pytest.skip(str(e))


def _flag_uses(version: str) -> list[dict]:
    """The flag names the build plan asks TensorRT for, for every precision, with and without REFIT."""
    from test_trt_plan import manifest_of

    out = []
    for precision in ("fp32", "fp16", "bf16"):
        for refit in (False, True):
            plans = trt_engine.build_plan(manifest_of(precision), precision, version, refit=refit)
            for p in plans.values():
                out += ts.enum_uses("NetworkDefinitionCreationFlag", p.network_flags, f"plan:{precision}")
                out += ts.enum_uses("BuilderFlag", p.builder_flags, f"plan:{precision}")
    return out


def test_the_scan_sees_the_tensorrt_code():
    # the check below cannot pass by reading nothing: the build, the plugin and the runtime are all found
    names = {s[1] for c in ts.uses(FILES) for s in c["steps"] if s[0] == "attr"}
    assert {"trt.py", "plugin.py", "backends.py", "__init__.py"} <= {f.name for f in FILES}
    assert {"build_serialized_network", "parse", "set_shape", "builder_optimization_level", "create_timing_cache",
            "set_flag", "PLUGIN_V3", "KernelLaunchParams", "SymInt32", "execute_async_v3",
            "Refitter", "set_named_weights", "refit_cuda_engine"} <= names  # fmt: skip


def test_every_tensorrt_name_the_project_reaches_exists(wheel):
    chains = ts.uses(FILES) + _flag_uses(wheel.version)
    result = wheel.run("check", chains)
    assert result["version"] == wheel.version
    assert result["missing"] == [] and result["unresolved"] == [], result
    assert result["ok"] == len(chains)


def test_a_planted_use_of_a_removed_flag_fails(wheel):
    planted = ts.uses_in("import tensorrt as trt\nflag = trt.BuilderFlag.FP16\n", "planted.py")
    weak = ts.enum_uses("BuilderFlag", ("FP16", "OBEY_PRECISION_CONSTRAINTS"), "weakly typed plan")
    result = wheel.run("check", planted + weak)
    if wheel.major >= 11:  # TensorRT 11 removed weak typing
        assert len(result["missing"]) == 3 and "BuilderFlag has no 'FP16'" in result["missing"][0], result
    else:
        assert result["missing"] == [] and result["ok"] == 3, result


def test_a_planted_wrong_call_fails(wheel):
    src = "import tensorrt as trt\nb = trt.Builder(None)\nb.create_network(0, 1, 2)\n"
    src += "b.create_builder_config().nope = 1\n"
    result = wheel.run("check", ts.uses_in(src, "planted.py"))
    assert len(result["missing"]) == 2, result
    assert "create_network" in result["missing"][0] and "'nope'" in result["missing"][1]


def test_the_plugin_passes_the_wheels_own_validators(wheel):
    planted = "def bad(q: trtp.TensorDesc, sizes: list) -> trtp.TensorDesc:\n    return q\n"
    result = wheel.run("validators", {"planted": planted})
    assert result["version"] == wheel.version and result["registered"] is True
    # the validators really ran: a list attribute (which TensorRT does not serialise) is refused
    assert "not a supported serializable type" in result["planted"], result


def test_tensorrt_itself_never_runs_here(wheel):
    # the stand-ins abort on any call into TensorRT's libraries: nothing above can have run TensorRT
    code = "import sys, trt_surface as ts; trt = ts._load(ts.Path(sys.argv[1])); trt.Builder(trt.Logger())"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(wheel.dir / "site"), *sys.path])}
    proc = subprocess.run([sys.executable, "-c", code, str(wheel.dir)], capture_output=True, text=True, env=env,
                          timeout=120)  # fmt: skip
    assert proc.returncode != 0 and "TensorRT stand-in: createInferBuilder_INTERNAL was called" in proc.stderr


def test_the_numpy_rule_is_what_the_wheels_plugin_layer_does(wheel):
    # the wheel's own creator parses the node's attributes as the ONNX parser delivers them; with this NumPy,
    # check_version accepts exactly the versions whose creator succeeds (10.x fails under NumPy >= 2.4)
    import numpy

    from pladis.plugins_trt import PluginUnavailable, check_version

    result = wheel.run("create", {"alpha": 1.5, "scale": 0.125, "text_len": 0, "text_first": 0})
    try:
        check_version(wheel.version, numpy.__version__)
        accepted = True
    except PluginUnavailable:
        accepted = False
    assert result["numpy"] == numpy.__version__ and result["created"] is accepted, result
    if not accepted:
        assert "0-dimensional arrays" in result["error"]


def _node_tensors(dtype: str, d: int, max_len: int, max_keys: int) -> list[dict]:
    """q, k, v, mask (B, 1, 1, keys), lam (B,), out: B and the lengths dynamic (-1), up to the given maxima."""
    q = {"dtype": dtype, "dims": [-1, 24, -1, d], "max": [2, 24, max_len, d]}
    kv = {"dtype": dtype, "dims": [-1, 24, -1, d], "max": [2, 24, max_keys, d]}
    mask = {"dtype": "fp32", "dims": [-1, 1, 1, -1], "max": [2, 1, 1, max_keys]}
    return [q, kv, kv, mask, {"dtype": "fp32", "dims": [-1], "max": [2]}, q]


@pytest.mark.parametrize(
    "kind, attrs, tensors, entry",
    [
        ("joint (FLUX: text first)", {"alpha": 1.5, "scale": 128**-0.5, "text_len": 512, "text_first": 1},
         _node_tensors("bf16", 128, 4608, 4608), "pladis_joint_fwd"),
        ("cross (SDXL)", {"alpha": 2.0, "scale": 0.125, "text_len": 0, "text_first": 0},
         _node_tensors("fp16", 64, 4096, 77), "pladis_fwd"),
    ],
    ids=["joint", "cross"],
)  # fmt: skip
def test_aot_impl_returns_the_kernel_through_the_wheels_plugin_class(wheel, kind, attrs, tensors, entry):
    # TensorRT's own AOT plugin class calls aot_impl and checks its results (name and PTX as str/bytes,
    # KernelLaunchParams, SymIntExprs of SymInt32): the PTX it would embed is the kernel for this node, its
    # entry's parameters the launch contract with the 11 int32 extra arguments TensorRT passes
    pytest.importorskip("triton", reason="Triton is not installed (dev extra)")
    from pladis.kernels import aot

    result = wheel.run("aot", {"capability": 90, "attrs": attrs, "tensors": tensors})
    assert "error" not in result, result.get("error")
    assert result["version"] == wheel.version and result["name"].startswith(entry)
    assert aot.ptx_target(result["ptx"]) == "sm_90a"
    params = aot.ptx_entry_params(result["ptx"], result["name"])
    contract, hidden = aot.expected_params(params)
    assert params[: len(contract)] == contract and 0 <= hidden <= 2, params
    assert result["n_extra"] == 11 and result["extra"] == ["SymExprImpl"] * 11
    assert set(result["launch_fields"]) == {"grid_x", "grid_y", "grid_z", "block_x", "block_y", "block_z",
                                            "shared_mem"}  # fmt: skip


def test_aot_impl_refuses_an_uncovered_joint_node_by_name(wheel):
    # a head dim past the joint kernel's 128 (no attribute says it: the profile does): refused by name, the fix
    # named, through the wheel's plugin class (TensorRT reports it as the plugin's build error)
    pytest.importorskip("triton", reason="Triton is not installed (dev extra)")
    attrs = {"alpha": 1.5, "scale": 0.0625, "text_len": 512, "text_first": 1}
    result = wheel.run("aot", {"capability": 90, "attrs": attrs, "tensors": _node_tensors("fp16", 256, 4608, 4608)})
    assert result["error"].startswith("KernelUnsupported: TensorRT plugin: the joint kernel takes head dims up to 128")
    assert "--backend ort or --backend aoti" in result["error"]
