"""The precision path of a TensorRT build, proven on the CPU (TensorRT itself never runs here).

TensorRT builds are strongly typed, so an fp16 engine is built from an fp16 export. This checks that graph as
the build receives it: the fp16 tiny-sd15 U-Net and tiny-pixart transformer (exported with
``--precision fp16``), whose plugin-only form is what TensorRT parses and whose function-body form ONNX Runtime
runs, vs the eager PLADIS-patched PyTorch denoiser in float32 on the same inputs; the PLADIS node's threshold
math stays float32; the build plan makes each an fp16 engine on 10.x and 11.x. bf16: both denoisers have a Conv,
which opsets <= 20 lack in bfloat16, so their bf16 exports are float32 and the bf16 build is refused with the
reason and the fp16 commands (bf16 values cannot be checked on a CPU either: ONNX Runtime's CPU provider has no
bfloat16 kernels)."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import pladis
from pladis import models, patch
from pladis.engine import trt as trt_engine
from pladis.export import ExportConfig, contracts, export, onnx_op
from pladis.manifest import Manifest

# The exporter's documented fp16 bound (export/validate.py REL_L2_TOL, README "Validation"): fp16 storage and
# fp16 matmuls/convs round each layer's output to 2^-11 relative; a tiny denoiser's stack of them stays
# within 1e-2 rel-L2 of the float32 eager model.
FP16_REL_L2 = 1e-2


@pytest.mark.parametrize("name, component", [("tiny-sd15", "unet"), ("tiny-pixart", "transformer")])
def test_fp16_denoiser_as_tensorrt_receives_it_matches_eager(tmp_path, name, component):
    out = tmp_path / name
    manifest = export(ExportConfig(model=name, out=str(out), precision="fp16", components=component,
                                   validate=False))  # fmt: skip
    spec = manifest["components"][component]
    assert spec["dtype"] == "float16"
    path = out / spec["file"]
    model = onnx.load(str(path))

    # what `pladis build --backend trt` parses: the same graph, PladisAttention nodes without their bodies
    stripped = onnx.load_from_string(trt_engine.plugin_only_graph(path))
    assert [n.op_type for n in stripped.graph.node] == [n.op_type for n in model.graph.node]
    assert not stripped.functions and onnx_op.pladis_nodes(stripped)
    # the node's threshold math is float32 inside the fp16 graph: q and k are cast to FLOAT first
    body = next(f for f in model.functions if f.name == onnx_op.OP_TYPE)
    casts = {(n.input[0], a.i) for n in body.node if n.op_type == "Cast" for a in n.attribute if a.name == "to"}
    assert {("q", onnx.TensorProto.FLOAT), ("k", onnx.TensorProto.FLOAT)} <= casts
    for version in ("10.9.0.34", "11.4.0.106"):
        plan = trt_engine.build_plan(Manifest.from_dict(manifest), "fp16", version)[component]
        assert plan.dtype == "float16" and plan.strongly_typed and "FP16" not in plan.builder_flags

    # ONNX Runtime (CPU) on the fp16 graph vs the eager float32 PLADIS denoiser, same inputs
    # the export's weights (built-ins draw them in the export's dtype), upcast exactly to float32
    pipe = models.load(name, dtype=torch.float16)
    pladis.apply(pipe)
    comp = next(c for c in contracts.components(pipe, patch.family_of(patch.denoiser_of(pipe)).name)
                if c.name == component)  # fmt: skip
    comp.module.float()
    dims = {k: tuple(v) for k, v in manifest["dims"].items()}
    dtypes = {i["name"]: i["dtype"] for i in spec["inputs"]}
    # both sides get the values the fp16 graph receives (a float timestep rounded to fp16 is another timestep)
    feeds = {
        i.name: t.numpy().astype(dtypes[i.name])
        for i, t in zip(comp.inputs, contracts.sample_inputs(comp, dims, torch.float32, seed=5), strict=True)
    }
    inputs = [torch.from_numpy(feeds[i.name]).to(torch.float32 if feeds[i.name].dtype.kind == "f" else None)
              for i in comp.inputs]  # fmt: skip
    with torch.no_grad():
        expected = contracts.Traced(comp)(*inputs)[0].double().numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, feeds)[0].astype(np.float64)
    assert got.shape == expected.shape and np.isfinite(got).all()
    rel = np.linalg.norm(got - expected) / np.linalg.norm(expected)
    assert rel <= FP16_REL_L2, f"{name} {component}: fp16 graph vs eager float32, rel-L2 {rel:.3g}"


@pytest.mark.parametrize("name, component", [("tiny-sd15", "unet"), ("tiny-pixart", "transformer")])
def test_a_bf16_denoiser_with_conv_is_refused_naming_the_reason_and_the_fp16_path(tmp_path, name, component):
    # opsets <= 20 have no bfloat16 Conv: the exporter writes these denoisers in float32, and a strongly typed
    # TensorRT build cannot make a bf16 engine of a float32 graph
    manifest = export(ExportConfig(model=name, out=str(tmp_path / name), precision="bf16", components=component,
                                   validate=False))  # fmt: skip
    assert manifest["components"][component]["dtype"] == "float32"
    assert "Conv" in manifest["components"][component]["note"]
    for version in ("10.9.0.34", "11.4.0.106"):
        with pytest.raises(trt_engine.TrtBuildError) as e:
            trt_engine.build_plan(Manifest.from_dict(manifest), "bf16", version)
        msg = str(e.value)
        assert msg.startswith(f"{component}: the bf16 export holds it in float32 (requested bf16, exported float32:")
        assert "no bfloat16 Conv" in msg and "`pladis export --precision fp16`" in msg and "\n" not in msg
