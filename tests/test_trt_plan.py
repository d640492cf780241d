"""The TensorRT build plan as a plain function of the manifest, the requested precision and the TensorRT version
(no TensorRT here): strongly typed on every version, each engine in its graph's precision, the flags each major
version gets, the refusals (one line naming the command that works), the supported range, and a build that
never writes into the export folder. The names in these plans are checked against the real 10.9, 10.16 and
11.4 bindings in tests/test_trt_api.py."""

import re
import stat
from pathlib import Path
from types import MappingProxyType, SimpleNamespace

import onnx
import pytest
from onnx import helper

from pladis.engine import trt as trt_engine
from pladis.export import onnx_op
from pladis.plugins_trt import SUPPORTED_TEXT, PluginUnavailable, check_version

VERSIONS = ("10.9.0.34", "10.16.1.11", "11.4.0.106")
WEAK = {"FP16", "BF16", "INT8", "FP8", "FP4", "INT4", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS"}
README = Path(__file__).resolve().parents[1] / "README.md"


def manifest_of(precision: str, denoiser_conv: bool = False, function_body: bool = True):
    """A manifest as `pladis export --precision <precision>` writes it for a pipeline of a text encoder, a
    denoiser and a VAE decoder (contracts.component_dtype): text encoders float32, the rest in the precision;
    bf16 graphs with Conv (U-Net, VAE) fall back to float32 with a note, as the exporter does."""
    half = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[precision]
    conv_note = "requested bf16, exported float32: Conv has no bfloat16 at opset 17"
    comps = {"text_encoder": ("text_encoder", "float32", None),
             "denoiser": ("denoiser", "float32" if precision == "bf16" and denoiser_conv else half,
                          conv_note if precision == "bf16" and denoiser_conv else None),
             "vae_decoder": ("vae", "float32" if precision == "bf16" else half,
                             conv_note if precision == "bf16" else None)}  # fmt: skip
    components = {n: SimpleNamespace(role=r, dtype=d, file=f"{n}.onnx") for n, (r, d, _) in comps.items()}
    data = {"components": {n: ({"note": note} if note else {}) for n, (_, _, note) in comps.items()},
            "pladis": {"function_body": function_body}}  # fmt: skip
    return SimpleNamespace(precision=precision, components=MappingProxyType(components), data=data)


def _readme_plan_rows() -> dict[str, list[str]]:
    """The README's build-plan table: TensorRT range -> its cells."""
    text = README.read_text()
    section = text[text.index("<!-- trt-plan -->") : text.index("<!-- /trt-plan -->")]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in section.splitlines()
            if line.strip().startswith("|") and not set(line.strip()) <= set("|-: ")]  # fmt: skip
    return {r[0]: r[1:] for r in rows[1:]}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("refit", [False, True])
def test_every_build_is_strongly_typed_in_its_graphs_precision(precision, version, refit):
    m = manifest_of(precision)
    plans = trt_engine.build_plan(m, precision, version, refit=refit)
    assert set(plans) == set(m.components)
    major = int(version.split(".")[0])
    rows = _readme_plan_rows()
    row = rows["10.9 – 10.x" if major == 10 else "11.x"]
    for name, plan in plans.items():
        assert plan.strongly_typed and plan.dtype == m.components[name].dtype  # the graph's precision, nothing else
        assert not (set(plan.builder_flags) | set(plan.network_flags)) & WEAK  # no precision flags on any version
        assert plan.network_flags == (("STRONGLY_TYPED",) if major == 10 else ())
        assert plan.builder_flags == (("REFIT",) if refit else ())
        # what the README's table says for this major version
        assert row[0] == (", ".join(plan.network_flags) or "none")
        assert row[1] == "REFIT with --refit" and row[2] == "strongly typed: each graph's own"
        if plan.dtype == "float32" and precision != "fp32":
            assert plan.note  # why it stays float32 (engine.json and the log say it)


def test_another_precision_than_the_exports_is_refused_naming_the_export_command():
    with pytest.raises(trt_engine.TrtBuildError) as e:
        trt_engine.build_plan(manifest_of("fp32"), "fp16", "11.4.0.106")
    msg = str(e.value)
    assert "\n" not in msg and "`pladis export --precision fp16`" in msg and "strongly typed" in msg


def test_a_bf16_unet_is_refused_with_the_reason_and_the_fp16_command():
    with pytest.raises(trt_engine.TrtBuildError) as e:
        trt_engine.build_plan(manifest_of("bf16", denoiser_conv=True), "bf16", "10.16.1.11")
    msg = str(e.value)
    assert msg.startswith("denoiser: the bf16 export holds it in float32") and "no bfloat16 Conv" in msg
    assert "`pladis export --precision fp16`" in msg and "\n" not in msg
    # the same refusal before TensorRT is probed (version None), so a machine without TensorRT hears it too
    with pytest.raises(trt_engine.TrtBuildError, match="no bfloat16 Conv"):
        trt_engine.build_plan(manifest_of("bf16", denoiser_conv=True), "bf16", None)


@pytest.mark.parametrize("version", ["10.8.0.43", "10.6.0", "12.0.0.1", "9.3.0"])
def test_a_tensorrt_outside_the_range_is_refused_naming_the_range(version):
    with pytest.raises(PluginUnavailable, match=re.escape(f"outside the supported range, {SUPPORTED_TEXT}")):
        check_version(version, "2.3.0")
    with pytest.raises(trt_engine.TrtBuildError, match=re.escape(SUPPORTED_TEXT)):
        trt_engine.build_plan(manifest_of("fp16"), "fp16", version)


def test_numpy_2_4_is_refused_with_the_tensorrt_whose_plugin_layer_needs_older():
    for version in ("10.9.0.34", "10.16.1.11", "11.1.0.106"):  # float() on one-element arrays until 11.2
        with pytest.raises(PluginUnavailable, match=r"pip install 'numpy<2.4', or TensorRT >= 11.2"):
            check_version(version, "2.4.0")
        check_version(version, "2.3.5")
    for version in ("11.2.1.2", "11.4.0.106"):
        check_version(version, "2.4.6")


def test_without_tensorrt_a_plugin_only_export_is_not_sent_to_onnx_runtime(monkeypatch):
    monkeypatch.setattr(trt_engine, "installed_version", lambda: None)
    monkeypatch.setattr(trt_engine, "check_export", lambda src: {})  # no graphs here (tests/test_plugins_trt.py)
    src = SimpleNamespace(manifest=manifest_of("fp16", function_body=False))
    with pytest.raises(trt_engine.TrtBuildError) as e:
        trt_engine.preflight(src, "fp16")
    msg = str(e.value)
    assert "plugin-only export" in msg and "re-export without --no-function-body" in msg
    assert "meanwhile" not in msg  # the generic advice (ort / aoti) is for exports with function bodies
    src = SimpleNamespace(manifest=manifest_of("fp16"))
    with pytest.raises(trt_engine.TrtBuildError, match=re.escape(trt_engine.OTHERWISE)):
        trt_engine.preflight(src, "fp16")


def test_the_plugin_only_graph_is_made_in_memory_from_a_read_only_export(tmp_path):
    attrs = dict(alpha=1.5, scale=0.125, text_len=0, text_first=0, plugin_version="1", plugin_namespace="pladis")
    node = helper.make_node("PladisAttention", ["q", "k", "v", "mask", "lam"], ["out"], domain="pladis", **attrs)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("pladis", 1)]
    model = helper.make_model(helper.make_graph([node], "g", [], []), opset_imports=opsets)
    onnx_op.attach_function(model, with_body=True)
    assert len(model.functions) == 1
    folder = tmp_path / "export"
    folder.mkdir()
    onnx.save_model(model, str(folder / "unet.onnx"))
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        data = trt_engine.plugin_only_graph(folder / "unet.onnx")
        assert sorted(p.name for p in folder.iterdir()) == ["unet.onnx"]  # nothing written beside it
    finally:
        folder.chmod(stat.S_IRWXU)
    stripped = onnx.load_from_string(data)
    assert len(stripped.functions) == 0 and len(onnx_op.pladis_nodes(stripped)) == 1
