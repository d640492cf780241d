"""`pladis build --backend ort --device cuda` without a GPU: the offline pass and what it saves.

ONNX Runtime refuses to save a graph with provider-compiled nodes (its TensorRT provider compiles subgraphs), and
a graph the CPU provider optimised at the full level holds CPU-only layouts and fused kernels. The CUDA build
saves the basic-level graph of the CPU provider instead: standard ONNX ops only, loadable by every provider;
engine.json names the providers the runtime then runs it with. onnxruntime-gpu is not installed here, so the
provider list is simulated; the CUDA and TensorRT providers themselves never run."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import pladis
from pladis import models, patch
from pladis import ort as pladis_ort
from pladis.engine import ort as engine_ort
from pladis.export import ExportConfig, contracts, export
from pladis.manifest import open_engine

CUDA = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    out = tmp_path_factory.mktemp("ort") / "tiny-sd15"
    export(ExportConfig(model="tiny-sd15", out=str(out), components="unet", validate=False))
    return out


def _domains(path) -> set[str]:
    return {n.domain or "ai.onnx" for n in onnx.load(str(path), load_external_data=False).graph.node}


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_saved_graph_loads_and_matches_the_export(sd15, tmp_path, monkeypatch, device):
    real = pladis_ort.providers
    monkeypatch.setattr(pladis_ort, "providers", lambda d, cuda_graph=False: CUDA if d != "cpu" else real(d))
    entry = engine_ort.build_component(open_engine(sd15), "unet", device, 3, tmp_path)
    saved = tmp_path / entry["file"]
    assert entry["providers"] == (CUDA if device == "cuda" else ["CPUExecutionProvider"])
    if device == "cuda":  # provider-independent: standard ONNX ops only, no CPU layouts or contrib kernels
        assert entry["offline_optimization_level"] == "ORT_ENABLE_BASIC"
        assert _domains(saved) == {"ai.onnx"}, _domains(saved)
    else:  # the CPU build keeps the CPU provider's full optimisation (what it always did), CPU kernels included
        assert entry["offline_optimization_level"] == "ORT_ENABLE_ALL"
        assert _domains(saved) - {"ai.onnx"}, _domains(saved)
    pipe = models.load("tiny-sd15")
    pladis.apply(pipe)
    comp = next(c for c in contracts.components(pipe, patch.family_of(patch.denoiser_of(pipe)).name)
                if c.name == "unet")  # fmt: skip
    dims = {k: tuple(v) for k, v in open_engine(sd15).manifest.dims.items()}
    inputs = contracts.sample_inputs(comp, dims, torch.float32, 7)
    feeds = {i.name: t.numpy() for i, t in zip(comp.inputs, inputs, strict=True)}
    ref = ort.InferenceSession(str(sd15 / "unet.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = ort.InferenceSession(str(saved), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    # the same float32 graph after ONNX Runtime's rewrites: only fusion and summation order differ
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
