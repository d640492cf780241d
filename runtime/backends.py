"""Runtime backends: ``load()``, ``warm_up(inputs)`` and ``run(inputs) -> outputs`` over named torch tensors.

Which class runs which backend name is in the registry (``pladis.backends``); ``create`` makes one for a
component (nothing heavy yet), ``load`` creates its session or engine, ``warm_up`` runs it once on inputs of
the shapes about to be used (first-run allocations, per-shape output buffers), so the runtime can do both
before it starts its clocks. Inputs may be on any device and in any dtype: a backend moves and casts them to
its device and the manifest's input dtypes. Outputs are on the backend's device in the exported dtype; a
backend with ``reuses_outputs`` returns its own buffers, overwritten by its next run (copy what you keep).

- ``torch``: eager PyTorch, the reference (``pladis.eager``): the pipeline the manifest describes, patched
  the same way, run through the export contract's own forward, so both sides of a parity check call the
  same function.
- ``ort``: ONNX Runtime on the exported (or built) file. On CPU, numpy in and out. On CUDA (onnxruntime-gpu)
  with I/O binding: inputs bound in place, outputs written into buffers allocated once per input shapes.
- ``aoti``: a ``.pt2`` package from ``pladis build --backend aoti``.
- ``trt``: TensorRT engines from ``pladis build --backend trt`` (TensorRT 10 tensor API on CUDA tensors,
  output buffers allocated once per input shapes; written against TensorRT's documented API, not run in CI).

LoRAs (``pladis.runtime.lora``): ``set_lora_weights(fused, weight_map)`` hands a backend the fused weights of
its linears (module path -> ``(out, in)`` tensor, the manifest's weight map beside them), or None for the base
weights: ``ort`` overrides those initializers when it creates its next session (no re-export), ``torch`` puts them
in the module's parameters for each run (the base tensors themselves are put back after it), ``aoti`` loads them
as the package's constants (the base constants, from the export, on removal), ``trt`` refits the engine (built
with ``--refit``; never run here).

CUDA graphs (``Runtime(..., cuda_graphs=True)``): ``cuda_graphs`` says how a backend replays them. "capture":
the runtime captures the backend's ``run`` (``pladis.runtime.graphs``), which therefore queues its work on
torch's current stream without waiting for it (torch, aoti, and trt's ``execute_async_v3``, one graph per
profile point the engine runs at). "session": ONNX Runtime replays its own graphs (CUDA execution provider
option ``enable_cuda_graph``, inputs and outputs bound once per input shapes, one graph id each). Neither is
run in CI (no GPU there): there only the cache's logic and its eager fallback are tested.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from pladis import backends as registry
from pladis.eager import eager_components  # noqa: F401  (the torch backend's model; tests clear its cache)
from pladis.errors import error_line
from pladis.manifest import Engine, EngineError, check_function_body
from pladis.precision import BY_DTYPE, numpy_type

log = logging.getLogger(__name__)
BACKENDS = registry.NAMES
_NP = {name: numpy_type(name) for name, t in BY_DTYPE.items() if t.numpy}  # numpy has no bfloat16


class Backend(Protocol):
    """Runs one exported component: named input tensors in, named output tensors out."""

    name: str
    device: str
    reuses_outputs: bool
    cuda_graphs: str  # "capture" | "session" (see the module docstring)

    def load(self) -> None: ...

    def warm_up(self, inputs: dict[str, torch.Tensor]) -> None: ...

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def set_lora_weights(self, fused: dict[str, torch.Tensor] | None, weight_map: dict) -> None: ...


def check(engine: Engine, component: str, backend: str) -> registry.BackendRecord:
    """The registry record of ``backend``, refused (EngineError) when this folder cannot run it for
    ``component`` (an unknown name, aoti/trt without the artifact ``pladis build`` makes for them, or ort on the
    denoiser of a plugin-only export)."""
    spec = registry.get(backend)
    artifact = engine.artifact(component)
    if backend == "ort" and component == engine.denoiser and (artifact is None or artifact.kind != "ort"):
        check_function_body(engine.manifest, engine.folder, "ONNX Runtime (--backend ort)")
    if spec.needs_artifact and (artifact is None or artifact.kind != backend):
        raise EngineError(
            f"the {backend} backend needs an engine folder built by `pladis build --backend {backend}` "
            f"(this folder has {artifact.kind if artifact else 'ONNX files only'} for {component}); "
            "use --backend ort (ONNX Runtime) or --backend torch"
        )
    return spec


def create(engine: Engine, component: str, backend: str, device: str = "cpu") -> Backend:
    """The backend ``backend`` for ``component`` of ``engine``, not loaded yet, on the device the registry
    gives it for ``device``."""
    spec = check(engine, component, backend)
    return runner_class(spec)(engine, component, spec.run_device(device))


def check_lora(engine: Engine, component: str, backend: str) -> None:
    """Refuse (EngineError) a backend that cannot take swapped weights for ``component``: a TensorRT engine not
    built refittable, an AOTInductor package on a torch without constant updates, a backend with no swap."""
    artifact = engine.artifact(component)
    if backend == "trt":
        refit = bool((engine.built.data.get("flags") or {}).get("refit")) if engine.built else False
        if not refit:
            raise EngineError(f"the TensorRT engine of {component} was not built refittable: rebuild it with pladis "
                              "build --backend trt --refit to swap LoRAs, or fuse them at export (pladis export "
                              "--lora)")  # fmt: skip
    elif backend == "aoti" and artifact is not None and artifact.kind == "aoti":
        from pladis.torch_internals import aoti_updates_constants

        if not aoti_updates_constants():
            raise EngineError(f"this torch ({torch.__version__}) cannot update an AOTInductor package's constants "
                              "(no AOTICompiledModel.load_constants): LoRAs cannot be swapped on --backend aoti; use "
                              "--backend ort or torch, or fuse them at export (pladis export --lora)")  # fmt: skip
    cls = runner_class(check(engine, component, backend))
    if not hasattr(cls, "set_lora_weights"):
        raise EngineError(f"the {backend} backend cannot swap LoRA weights; use --backend ort or torch")


def runner_class(spec):
    """The class that runs the registry record ``spec``'s backend: one of this module's, or ``module:Class`` (a
    backend plugged in from outside)."""
    module, _, name = spec.runner.rpartition(":")
    return getattr(importlib.import_module(module), name) if module else globals()[name]


_TYPESTR = {name: t.typestr for name, t in BY_DTYPE.items() if t.typestr}


class _Memory:
    """A buffer by address, shape and dtype, for ``torch.as_tensor`` / ``numpy.asarray`` (the CUDA and NumPy
    array interface protocols), so a tensor can view memory ONNX Runtime allocated without copying it."""

    def __init__(self, attribute: str, interface: dict):
        setattr(self, attribute, interface)


def _view(value, dtype: str, device: torch.device) -> torch.Tensor:
    """A torch tensor over the memory of the OrtValue ``value`` (on ``device``, of ``dtype``), sharing it."""
    interface = {"shape": tuple(value.shape()), "typestr": _TYPESTR[dtype], "data": (value.data_ptr(), False),
                 "strides": None}  # fmt: skip
    if device.type == "cuda":
        return torch.as_tensor(_Memory("__cuda_array_interface__", {**interface, "version": 2}), device=device)
    return torch.from_numpy(np.asarray(_Memory("__array_interface__", {**interface, "version": 3})))


def _shapes(inputs: dict[str, torch.Tensor]) -> tuple:
    return tuple((n, tuple(t.shape)) for n, t in sorted(inputs.items()))


# --------------------------------------------------------------------------------------------------
# torch
# --------------------------------------------------------------------------------------------------


class TorchBackend:
    name = "torch"
    reuses_outputs = False
    cuda_graphs = "capture"

    def __init__(self, engine: Engine, component: str, device: str = "cpu"):
        self.folder, self.component_name = str(engine.folder.resolve()), component
        self.spec = engine.component(component)
        self.device = device
        self.component = None
        self.lora: dict[str, torch.Tensor] = {}  # module path -> fused weight, swapped in for each run
        self.layers: dict[str, torch.nn.Module] = {}  # module path -> the linear whose weight it replaces
        self.eager_loras: tuple = ()  # (path, scale, sha256): LoRAs diffusers fuses into the rebuilt model

    def load(self) -> None:
        if self.component is None:
            self.component = eager_components(self.folder, self.device, self.eager_loras)[self.component_name]

    def set_lora_weights(self, fused: dict[str, torch.Tensor] | None, weight_map: dict) -> None:
        """The module is shared (``eager_components`` caches it): the fused weights replace the parameters'
        tensors only for the duration of each run, and the base tensors themselves are put back after it."""
        self.load()
        dtype = next(self.component.module.parameters()).dtype
        self.lora = {p: w.to(self.device, dtype) for p, w in (fused or {}).items()}
        self.layers = {p: self.component.module.get_submodule(p) for p in self.lora}  # looked up once, not per run

    def warm_up(self, inputs: dict[str, torch.Tensor]) -> None:
        self.run(inputs)

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.load()
        dtypes = self.spec.input_dtypes
        args = {n: t.to(self.device, getattr(torch, dtypes[n])) for n, t in inputs.items()}
        module, layers = self.component.module, self.layers
        base = {p: layer.weight.data for p, layer in layers.items()}
        try:
            for p, layer in layers.items():
                layer.weight.data = self.lora[p]
            with torch.no_grad():
                outs = self.component.forward(module, **args)
        finally:
            for p, layer in layers.items():
                layer.weight.data = base[p]
        return {o.name: t for o, t in zip(self.component.outputs, outs, strict=True)}


# --------------------------------------------------------------------------------------------------
# ONNX Runtime
# --------------------------------------------------------------------------------------------------


class OrtBackend:
    name = "ort"
    cuda_graphs = "session"

    @property
    def reuses_outputs(self) -> bool:  # bound outputs are the per-shape buffers
        return self.bound

    def __init__(self, engine: Engine, component: str, device: str = "cpu"):
        self.spec = engine.component(component)
        artifact = engine.artifact(component)
        built = artifact is not None and artifact.kind == "ort"
        self.path = engine.folder / (artifact.file if built else self.spec.file)
        self.threads = artifact.settings.get("intra_op_num_threads", 0) if built else 0  # as built
        self.inputs = self.spec.input_dtypes
        self.outputs = self.spec.output_names
        self.device = device
        self.output_dtypes = {t.name: t.dtype for t in self.spec.outputs}
        self.bound = device != "cpu"  # I/O binding; on the CPU only when asked (numpy in and out needs none)
        self.session = None
        self._outputs: dict[tuple, tuple] = {}  # input shapes -> (OrtValues, torch views of them)
        self.initializers: dict[str, np.ndarray] = {}  # LoRA-fused initializers, by name
        self.graph_limit = 0  # > 0: ONNX Runtime's own CUDA graphs, at most this many input shapes
        self._graphs: dict[tuple, _OrtGraph] = {}
        self._plain = None  # run options of a plain run: with a CUDA-graph session, gpu_graph_id -1

    def use_cuda_graphs(self, limit: int) -> None:
        """Replay ONNX Runtime's CUDA graphs for up to ``limit`` input shapes (call before ``load``; CUDA only).
        Never run in CI (no onnxruntime-gpu there)."""
        if self.device != "cpu":
            self.graph_limit = limit

    def load(self) -> None:
        if self.session is None:
            from pladis import ort

            if self.graph_limit:
                try:
                    self.session = ort.session(self.path, self.device, threads=self.threads,
                                               initializers=self.initializers, cuda_graph=True)  # fmt: skip
                    self._plain = _run_options(-1)
                    return
                except Exception as err:  # noqa: BLE001 - e.g. a node ONNX Runtime places on the CPU: run eagerly
                    log.warning("ONNX Runtime refused CUDA graphs for %s (%s); running it eagerly", self.path.name,
                                error_line(err))  # fmt: skip
                    self.graph_limit = 0
            self.session = ort.session(self.path, self.device, threads=self.threads,
                                       initializers=self.initializers)  # fmt: skip

    def set_lora_weights(self, fused: dict[str, torch.Tensor] | None, weight_map: dict) -> None:
        """The fused weights as initializer overrides (``SessionOptions.add_initializer``) of the next session,
        created now; the graph file is not touched, and None is the file's own initializers again."""
        from pladis.runtime.lora import initializer_layout

        self.initializers = initializer_layout(fused, weight_map) if fused else {}
        self.session = None
        self._outputs = {}
        self._graphs = {}  # captured on the old session
        self.load()

    def warm_graph(self, inputs: dict[str, torch.Tensor]) -> None:
        """Run until ONNX Runtime has captured its graph for these shapes (one plain run that allocates the
        outputs, one regular run, the capture): no capture inside the timed steps."""
        for _ in range(3 if self.graph_limit else 0):
            self.run(inputs)

    def warm_up(self, inputs: dict[str, torch.Tensor]) -> None:
        self.run(inputs)

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.load()
        if self.bound:
            return self._run_bound(inputs)
        feeds = {n: t.detach().cpu().numpy().astype(_NP[self.inputs[n]], copy=False) for n, t in inputs.items()}
        outs = self.session.run(self.outputs, feeds)
        return {n: torch.from_numpy(np.ascontiguousarray(o)) for n, o in zip(self.outputs, outs, strict=True)}

    def _run_graph(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """ONNX Runtime's CUDA graph for these input shapes: the inputs copied into buffers bound once, the
        outputs read from buffers bound once, run under its own graph id; None when these shapes have no graph
        (the first run of new shapes, shapes past ``graph_limit``, outputs numpy cannot type)."""
        key = _shapes(inputs)
        graph = self._graphs.get(key)
        if graph is None:
            return None
        for name, buffer in graph.inputs.items():
            buffer.copy_(inputs[name])
        torch.cuda.current_stream(buffer.device).synchronize()  # ONNX Runtime runs on its own stream
        try:
            self.session.run_with_iobinding(graph.binding, graph.options)
        except Exception as err:  # noqa: BLE001 - a capture ONNX Runtime cannot make: plain runs from now on
            log.warning("ONNX Runtime's CUDA graph of %s failed (%s); running it eagerly", self.path.name,
                        error_line(err))  # fmt: skip
            self.graph_limit = 0
            self._graphs.clear()
            return None
        return dict(graph.views)

    def _bind_graph(self, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        """Static buffers for these shapes (from a plain run's ``outputs``) bound once, with a new graph id."""
        import onnxruntime as ort

        if len(self._graphs) >= self.graph_limit or any(self.output_dtypes[n] not in _NP for n in outputs):
            return
        device = torch.device(self.device)
        index = device.index if device.index is not None else torch.cuda.current_device()
        binding = self.session.io_binding()
        static = {n: torch.empty(tuple(t.shape), dtype=getattr(torch, self.inputs[n]), device=device)
                  for n, t in inputs.items()}  # fmt: skip
        for name, t in static.items():
            binding.bind_input(name, "cuda", index, _NP[self.inputs[name]], tuple(t.shape), t.data_ptr())
        values, views = [], {}
        for name, out in outputs.items():
            value = ort.OrtValue.ortvalue_from_shape_and_type(tuple(out.shape), _NP[self.output_dtypes[name]],
                                                              "cuda", index)  # fmt: skip
            binding.bind_ortvalue_output(name, value)
            values.append(value)
            views[name] = _view(value, self.output_dtypes[name], device)
        graph_id = len(self._graphs)
        self._graphs[_shapes(inputs)] = _OrtGraph(binding, static, values, views, _run_options(graph_id))

    def _run_bound(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """I/O binding: inputs bound in place; outputs written into buffers kept per input shapes (the first run
        of new shapes lets ONNX Runtime allocate them; later runs bind those same buffers again). The returned
        tensors are views of those buffers, on the backend's device: no copy, no ``.numpy()``."""
        device = torch.device(self.device)
        index = 0 if device.type == "cpu" else device.index if device.index is not None else torch.cuda.current_device()
        if self.graph_limit:
            replayed = self._run_graph(inputs)
            if replayed is not None:
                return replayed
        binding = self.session.io_binding()
        kept = []  # the contiguous, converted inputs stay alive until the run is over
        for name, t in inputs.items():
            t = t.to(device, getattr(torch, self.inputs[name])).contiguous()
            kept.append(t)
            binding.bind_input(name, device.type, index, _NP[self.inputs[name]], tuple(t.shape), t.data_ptr())
        key = _shapes(inputs)
        held = self._outputs.get(key)  # (OrtValues, torch views of them)
        for name, value in zip(self.outputs, held[0] if held else [None] * len(self.outputs), strict=True):
            if value is None:
                binding.bind_output(name, device.type, index)
            else:
                binding.bind_ortvalue_output(name, value)
        if device.type == "cuda":  # ONNX Runtime reads the inputs on its own stream: torch's work must be done
            torch.cuda.current_stream(device).synchronize()
        self.session.run_with_iobinding(binding, self._plain)
        if held is None:
            values = binding.get_outputs()
            views = {n: _view(v, self.output_dtypes[n], device) for n, v in zip(self.outputs, values, strict=True)}
            held = self._outputs[key] = (values, views)
            if self.graph_limit:
                self._bind_graph(inputs, held[1])
        return dict(held[1])


@dataclass
class _OrtGraph:
    """ONNX Runtime's CUDA graph of one input shapes: its binding, static inputs, output values, views, id."""

    binding: object
    inputs: dict[str, torch.Tensor]
    values: list  # the bound OrtValues (kept alive: the views point into them)
    views: dict[str, torch.Tensor]
    options: object  # onnxruntime.RunOptions with its gpu_graph_id


def _run_options(graph_id: int):
    """``onnxruntime.RunOptions`` naming the CUDA graph a run captures or replays (-1: none, a plain run)."""
    import onnxruntime as ort

    options = ort.RunOptions()
    options.add_run_config_entry("gpu_graph_id", str(graph_id))
    return options


# --------------------------------------------------------------------------------------------------
# AOTInductor and TensorRT
# --------------------------------------------------------------------------------------------------


class AotiBackend:
    """A ``.pt2`` package from ``pladis build --backend aoti``, called with the contract's positional inputs."""

    name = "aoti"
    reuses_outputs = False
    cuda_graphs = "capture"

    def __init__(self, engine: Engine, component: str, device: str = "cpu"):
        spec = engine.component(component)
        self.path = engine.folder / engine.artifact(component).file
        self.inputs = [(i.name, i.dtype) for i in spec.inputs]
        self.outputs = spec.output_names
        self.device = device
        self.model = None
        self.engine, self.component_name = engine, component
        self.lora_paths: set[str] = set()  # module paths whose constants hold fused weights now

    def set_lora_weights(self, fused: dict[str, torch.Tensor] | None, weight_map: dict) -> None:
        """The fused weights as the package's constants (``load_constants``, the constant FQN ``module.<path>
        .weight`` of the traced wrapper); the linears no longer fused get their base weights back, read from the
        export's initializers. Refused by name when this torch's package has no constant update."""
        self.load()
        from pladis.torch_internals import aoti_updates_constants

        if not aoti_updates_constants():
            raise EngineError(f"this torch ({torch.__version__}) cannot update an AOTInductor package's constants "
                              "(no load_constants): LoRAs cannot be swapped on --backend aoti; use --backend ort "
                              "or torch, or fuse them at export (pladis export --lora)")  # fmt: skip
        from pladis.runtime.lora import base_initializers

        fused = dict(fused or {})
        restore = sorted(self.lora_paths - set(fused))
        if restore:
            names = [weight_map[p]["initializer"] for p in restore]
            arrays = base_initializers(self.engine, self.component_name, names)
            for p in restore:
                w = torch.from_numpy(arrays[weight_map[p]["initializer"]].copy())
                fused[p] = w.t() if weight_map[p]["transposed"] else w
        fqns = set(self.model.get_constant_fqns())
        constants = {f"module.{p}.weight": w.contiguous().to(self.device) for p, w in fused.items()}
        lost = sorted(set(constants) - fqns)
        if lost:
            raise EngineError(f"{self.path} has no constant {', '.join(lost[:3])} (AOTInductor folded it into "
                              "another constant): LoRAs cannot be swapped on this package; use --backend ort or "
                              "torch")  # fmt: skip
        if constants:
            self.model.load_constants(constants, check_full_update=False)
        self.lora_paths = set(fused) - set(restore)

    def load(self) -> None:
        if self.model is None:
            import pladis.ops  # noqa: F401  (registers pladis::attention, which the package calls)

            try:
                self.model = torch._inductor.aoti_load_package(str(self.path))
            except (RuntimeError, OSError, ValueError) as err:  # a damaged or truncated package
                first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
                raise EngineError(f"{self.path} cannot be loaded as an AOTInductor package ({first}): the file is "
                                  "damaged or truncated; rebuild the engine (without --no-verify, pladis checks "
                                  "every file's sha256 first)") from None  # fmt: skip

    def warm_up(self, inputs: dict[str, torch.Tensor]) -> None:
        self.run(inputs)

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.load()
        args = [inputs[n].to(self.device, getattr(torch, d)).contiguous() for n, d in self.inputs]
        with torch.no_grad():
            outs = self.model(*args)
        outs = outs if isinstance(outs, list | tuple) else [outs]
        return dict(zip(self.outputs, outs, strict=True))


class TrtBackend:
    """A serialized TensorRT engine (``.plan``), run with the TensorRT 10 name-based tensor API on torch CUDA
    tensors on the current stream; output buffers are allocated once per input shapes and reused. Not
    exercised in CI (no TensorRT there).

    CUDA graphs: the runtime captures ``run`` (``execute_async_v3`` on the capture stream, the context's input
    shapes and tensor addresses set to the graph's static buffers during the capture), one graph per profile
    point the engine runs at, after an eager run at those shapes (TensorRT wants one enqueue before a capture).
    A graph replays with the context state of its capture; TensorRT documents re-capturing when shapes change,
    which a new key does. Never run (no TensorRT here)."""

    name = "trt"
    reuses_outputs = True
    cuda_graphs = "capture"

    def __init__(self, engine: Engine, component: str, device: str = "cuda"):
        spec = engine.component(component)
        self.path = engine.folder / engine.artifact(component).file
        self.inputs = spec.input_dtypes
        self.outputs = spec.output_names
        self.device = device
        self.engine = self.context = None
        self._buffers: dict[tuple, dict[str, torch.Tensor]] = {}  # input shapes -> output tensors
        self._shapes = None  # the input shapes the context is set to
        self.folder_engine, self.component_name = engine, component
        self.refittable = bool((engine.built.data.get("flags") or {}).get("refit")) if engine.built else False
        self.lora_names: set[str] = set()  # initializer names refitted with fused weights now

    def set_lora_weights(self, fused: dict[str, torch.Tensor] | None, weight_map: dict) -> None:
        """Refit the engine (``trt.Refitter``, ``set_named_weights`` by ONNX initializer name, which is how the
        ONNX parser names refittable weights) with the fused weights, and the base weights (read from the
        export's initializers) for linears no longer fused. Needs an engine built with ``--refit``. Written
        against TensorRT 10.x and 11.x; never run here."""
        if not self.refittable:
            raise EngineError(f"{self.path.name} was not built refittable: build it with pladis build --backend trt "
                              "--refit to swap LoRAs, or fuse them at export (pladis export --lora)")  # fmt: skip
        self.load()
        import tensorrt as trt

        from pladis.runtime.lora import base_initializers, initializer_layout

        arrays = initializer_layout(fused, weight_map) if fused else {}
        restore = sorted(self.lora_names - set(arrays))
        if restore:
            arrays.update(base_initializers(self.folder_engine, self.component_name, restore))
        refitter = trt.Refitter(self.engine, trt.Logger(trt.Logger.WARNING))
        kept = []  # trt.Weights point into these arrays until the refit is done
        for name, array in arrays.items():
            array = np.ascontiguousarray(array)
            kept.append(array)
            if not refitter.set_named_weights(name, trt.Weights(array)):
                raise EngineError(f"TensorRT refused the weights {name} for {self.path.name} (not a refittable "
                                  "weight of this engine, or of another shape)")  # fmt: skip
        missing = refitter.get_missing_weights()
        if missing:
            raise EngineError(f"TensorRT's refit of {self.path.name} still misses {', '.join(missing[:3])}")
        if not refitter.refit_cuda_engine():
            raise EngineError(f"TensorRT could not refit {self.path.name}")
        self.lora_names = set(arrays) - set(restore)

    def load(self) -> None:
        if self.engine is not None:
            return
        try:
            import tensorrt as trt
        except ImportError:
            raise EngineError("the trt backend needs TensorRT installed (NVIDIA's package index, not PyPI)") from None
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
        self.context = self.engine.create_execution_context()
        self._dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
                        trt.DataType.BF16: torch.bfloat16, trt.DataType.INT32: torch.int32,
                        trt.DataType.INT64: torch.int64}  # fmt: skip

    def warm_up(self, inputs: dict[str, torch.Tensor]) -> None:
        self.run(inputs)

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.load()
        stream = torch.cuda.current_stream(self.device)
        key = _shapes(inputs)
        kept = []  # the contiguous, converted inputs stay alive until the run is over
        for name, t in inputs.items():
            t = t.to(self.device, getattr(torch, self.inputs[name])).contiguous()
            kept.append(t)
            if self._shapes != key:
                self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        self._shapes = key
        buffers = self._buffers.get(key)
        if buffers is None:  # first run of these shapes: the output shapes follow from the input shapes
            buffers = {n: torch.empty(tuple(self.context.get_tensor_shape(n)),
                                      dtype=self._dtypes[self.engine.get_tensor_dtype(n)], device=self.device)
                       for n in self.outputs}  # fmt: skip
            self._buffers[key] = buffers
        for name, buf in buffers.items():
            self.context.set_tensor_address(name, buf.data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        # no stream.synchronize(): the work is on torch's current stream, so whatever reads the outputs (or
        # reuses the inputs' memory, freed to torch's allocator on this same stream) runs after it; a sync
        # here would cost a host wait per step and cannot be captured in a CUDA graph
        return dict(buffers)
