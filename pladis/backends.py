"""The backend registry, shared by ``pladis build`` and the runtime: one record per backend name.

A record says what builds the backend's engines (``builder``: the name of a module of ``pladis.engine`` with
``device_info(device, precision)`` and ``build(src, dims, precision, cfg, folder)``; None: it runs an export
folder as is), what runs them (``runner``: the name of a class of ``pladis.runtime.backends`` taking
``(engine, component, device)`` with ``load`` / ``warm_up`` / ``run``), the device types it runs on, the
distributions it needs (their versions are part of a build's cache key) and the pip extra that installs them.
The registry sits below the stages: it names their parts and each stage resolves its own
(``pladis.engine.build.builder_module``, ``pladis.runtime.backends.runner_class``), so reading it needs neither
ONNX Runtime, TensorRT nor the runtime.
"""

from __future__ import annotations

from dataclasses import dataclass

from pladis.manifest import EngineError


@dataclass(frozen=True)
class BackendRecord:
    name: str
    runner: str  # the class of pladis.runtime.backends that runs it (or "module:Class", a backend plugged in)
    builder: str | None  # the module of pladis.engine that builds its engine folder; None: runs the export as is
    devices: tuple[str, ...]  # device types it runs on, preferred first
    packages: tuple[str, ...]  # distributions it needs
    extras: tuple[str, ...] = ()  # pip extras that install them (any one): pladis[<extra>]
    needs_artifact: bool = False  # runs only what `pladis build --backend <name>` made
    lowers_precision: bool = False  # its build can run an fp32 export in fp16/bf16 (others run the graph as exported)

    def run_device(self, device: str) -> str:
        """The device it runs on for a runtime on ``device``: that one when its type is supported, else its
        first supported type (TensorRT runs on CUDA only; the runtime then moves its outputs back)."""
        return device if device.split(":")[0] in self.devices else self.devices[0]


REGISTRY: dict[str, BackendRecord] = {
    b.name: b
    for b in (
        BackendRecord("torch", "TorchBackend", builder=None, devices=("cpu", "cuda"), packages=("torch",)),
        BackendRecord("ort", "OrtBackend", builder="ort", devices=("cpu", "cuda"),
                      packages=("onnxruntime", "onnxruntime-gpu"), extras=("cpu", "gpu")),
        BackendRecord("aoti", "AotiBackend", builder="aoti", devices=("cpu", "cuda"), packages=("torch",),
                      needs_artifact=True),
        BackendRecord("trt", "TrtBackend", builder="trt", devices=("cuda",), packages=("tensorrt",), extras=("gpu",),
                      needs_artifact=True),
    )
}  # fmt: skip
NAMES = tuple(REGISTRY)  # what the runtime runs: torch, ort, aoti, trt
BUILDABLE = tuple(n for n, b in REGISTRY.items() if b.builder)  # what `pladis build` makes: ort, aoti, trt


def get(name: str) -> BackendRecord:
    """The record of ``name``; EngineError listing the names otherwise."""
    if name not in REGISTRY:
        raise EngineError(f"unknown backend {name!r}; choose one of {', '.join(NAMES)}")
    return REGISTRY[name]
