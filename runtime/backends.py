"""Backends: one small interface, ``run(inputs) -> outputs`` over named CPU/GPU torch tensors.

- ``torch``: eager PyTorch, the reference. It rebuilds the pipeline the manifest describes (same source,
  seed and dtype), patches it with the same PLADIS settings and runs each component through the export
  contract's own forward, so both sides of a parity check call the same function.
- ``ort``: ONNX Runtime on the exported file. CPU provider by default; with ``onnxruntime-gpu`` the CUDA
  (or TensorRT) execution provider with I/O binding, so tensors stay on the device.
- ``aoti``: a ``.pt2`` package from ``pladis build --backend aoti``.
- ``trt``: TensorRT engines from ``pladis build --backend trt`` (TensorRT 10 tensor API on CUDA tensors;
  written against TensorRT's documented API, not run in CI).
"""

from __future__ import annotations

import functools
from typing import Protocol

import numpy as np
import torch

from pladis.runtime.engine import Engine, EngineError

BACKENDS = ("torch", "ort", "aoti", "trt")
_NP = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}


class Backend(Protocol):
    """Runs one exported component: named input tensors in, named output tensors out."""

    name: str

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...


def load(engine: Engine, component: str, backend: str, device: str = "cpu") -> Backend:
    """The backend ``backend`` for ``component`` of ``engine``."""
    if backend == "torch":
        return TorchBackend(engine, component, device)
    if backend == "ort":
        return OrtBackend(engine, component, device)
    artifact = engine.artifact(component)
    if backend in ("aoti", "trt") and (artifact is None or artifact["kind"] != backend):
        raise EngineError(
            f"the {backend} backend needs an engine folder built by `pladis build --backend {backend}` "
            f"(this folder has {artifact['kind'] if artifact else 'ONNX files only'} for {component}); "
            "use --backend ort (ONNX Runtime) or --backend torch"
        )
    if backend == "aoti":
        return AotiBackend(engine, component, device)
    if backend == "trt":
        return TrtBackend(engine, component, device)
    raise EngineError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


# --------------------------------------------------------------------------------------------------
# torch
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def eager_components(folder: str, device: str) -> dict:
    """The patched eager pipeline an engine folder was exported from, as export contract components."""
    import pladis
    from pladis import patch, sources
    from pladis.export import PRECISIONS, contracts
    from pladis.runtime.engine import open_engine

    m = open_engine(folder, verify=False).manifest
    # the same source, checked unchanged, with the same LoRAs fused (SourceChanged if moved or changed)
    pipe = sources.load_recorded(m["model"], seed=m["model"]["seed"], dtype=PRECISIONS[m["precision"]])
    if m["pladis"]["patched"]:
        pladis.apply(pipe, lam=m["pladis"]["lam"], alpha=m["pladis"]["alpha"], layers=m["pladis"]["layer_selection"])
    comps = {c.name: c for c in contracts.components(pipe, patch.family_of(patch.denoiser_of(pipe)).name)}
    for name, comp in comps.items():  # each component in the dtype it was exported in
        comp.module.to(device=device, dtype=getattr(torch, m["components"][name]["dtype"]))
    return comps


class TorchBackend:
    name = "torch"

    def __init__(self, engine: Engine, component: str, device: str = "cpu"):
        self.component = eager_components(str(engine.folder.resolve()), device)[component]
        self.dtypes = {i["name"]: i["dtype"] for i in engine.component(component)["inputs"]}
        self.device = device

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        args = {n: t.to(self.device, getattr(torch, self.dtypes[n])) for n, t in inputs.items()}
        with torch.no_grad():
            outs = self.component.forward(self.component.module, **args)
        return {o.name: t for o, t in zip(self.component.outputs, outs, strict=True)}


# --------------------------------------------------------------------------------------------------
# ONNX Runtime
# --------------------------------------------------------------------------------------------------


def ort_providers(device: str) -> list[str]:
    """Execution providers for ``device``: CPU, or CUDA (TensorRT first when that provider is present)."""
    import onnxruntime as ort

    if device == "cpu":
        return ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise EngineError(
            f"device {device!r} needs onnxruntime-gpu (providers here: {', '.join(available)}); install the `gpu` "
            "extra instead of `cpu` (never both), or run on device cpu"
        )
    wanted = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    return [p for p in wanted if p in available]


class OrtBackend:
    name = "ort"

    def __init__(self, engine: Engine, component: str, device: str = "cpu"):
        import onnxruntime as ort

        spec = engine.component(component)
        artifact = engine.artifact(component)
        path = engine.folder / (artifact["file"] if artifact and artifact["kind"] == "ort" else spec["file"])
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        opts.intra_op_num_threads = artifact.get("intra_op_num_threads", 0) if artifact else 0  # as built
        self.session = ort.InferenceSession(str(path), opts, providers=ort_providers(device))
        self.inputs = {i["name"]: i["dtype"] for i in spec["inputs"]}
        self.outputs = [o["name"] for o in spec["outputs"]]
        self.device = device

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.device != "cpu":
            return self._run_bound(inputs)
        feeds = {n: t.detach().cpu().numpy().astype(_NP[self.inputs[n]], copy=False) for n, t in inputs.items()}
        outs = self.session.run(self.outputs, feeds)
        return {n: torch.from_numpy(np.ascontiguousarray(o)) for n, o in zip(self.outputs, outs, strict=True)}

    def _run_bound(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """I/O binding on the GPU: inputs are bound in place, outputs stay on the device (ORT allocates)."""
        binding = self.session.io_binding()
        kept = []  # keep the contiguous, converted inputs alive until the run is over
        for name, t in inputs.items():
            t = t.to(self.device, getattr(torch, self.inputs[name])).contiguous()
            kept.append(t)
            binding.bind_input(name, "cuda", t.device.index or 0, _NP[self.inputs[name]], tuple(t.shape), t.data_ptr())
        for name in self.outputs:
            binding.bind_output(name, "cuda")
        self.session.run_with_iobinding(binding)
        outs = binding.get_outputs()
        return {n: torch.from_dlpack(o.to_dlpack()) if hasattr(o, "to_dlpack") else torch.from_numpy(o.numpy())
                for n, o in zip(self.outputs, outs, strict=True)}  # fmt: skip


# --------------------------------------------------------------------------------------------------
# AOTInductor and TensorRT
# --------------------------------------------------------------------------------------------------


class AotiBackend:
    """A ``.pt2`` package from ``pladis build --backend aoti``, called with the contract's positional inputs."""

    name = "aoti"

    def __init__(self, engine: Engine, component: str, device: str = "cpu"):
        spec = engine.component(component)
        self.model = torch._inductor.aoti_load_package(str(engine.folder / engine.artifact(component)["file"]))
        self.inputs = [(i["name"], i["dtype"]) for i in spec["inputs"]]
        self.outputs = [o["name"] for o in spec["outputs"]]
        self.device = device

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        args = [inputs[n].to(self.device, getattr(torch, d)).contiguous() for n, d in self.inputs]
        with torch.no_grad():
            outs = self.model(*args)
        outs = outs if isinstance(outs, list | tuple) else [outs]
        return dict(zip(self.outputs, outs, strict=True))


class TrtBackend:
    """A serialized TensorRT engine (``.plan``), run with the TensorRT 10 name-based tensor API on torch
    CUDA tensors. Not exercised in CI (no TensorRT there)."""

    name = "trt"

    def __init__(self, engine: Engine, component: str, device: str = "cuda"):
        try:
            import tensorrt as trt
        except ImportError:
            raise EngineError("the trt backend needs TensorRT installed (NVIDIA's package index, not PyPI)") from None
        spec = engine.component(component)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine((engine.folder / engine.artifact(component)["file"]).read_bytes())
        self.context = self.engine.create_execution_context()
        self.inputs = {i["name"]: i["dtype"] for i in spec["inputs"]}
        self.outputs = [o["name"] for o in spec["outputs"]]
        self.device = "cuda" if device == "cpu" else device

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        stream = torch.cuda.current_stream(self.device)
        kept = []
        for name, t in inputs.items():
            t = t.to(self.device, getattr(torch, self.inputs[name])).contiguous()
            kept.append(t)
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        outs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = {"DataType.FLOAT": torch.float32, "DataType.HALF": torch.float16,
                     "DataType.BF16": torch.bfloat16}[str(self.engine.get_tensor_dtype(name))]  # fmt: skip
            outs[name] = torch.empty(shape, dtype=dtype, device=self.device)
            self.context.set_tensor_address(name, outs[name].data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        return outs
