"""TensorRT engines, written against TensorRT's own Python API (10.9 to 11.x; no Polygraphy in the build).

Not run in this project's CI (no TensorRT libraries, no GPU): tests/test_trt_api.py checks every TensorRT name
this module and the plugin reach against the compiled bindings and the ``tensorrt.plugin`` sources of TensorRT
10.9, 10.16 and 11.4 (the API surface only; TensorRT itself never runs there).

Every build is strongly typed (the only kind TensorRT 11 has): each engine runs in the precision its graph was
exported in, so an fp16/bf16 engine comes from an fp16/bf16 export (``pladis export --precision fp16``, which
keeps the PLADIS threshold math in float32). ``build_plan`` says, as a function of the manifest, the requested
precision and the TensorRT version, what each component becomes; ``build`` carries it out: the plugin-only
graph (function bodies stripped, in memory, so the parser maps ``PladisAttention`` to the plugin; external
weights resolve from the export folder, which is only read), the PLADIS plugin (``pladis.plugins_trt``)
registered before parsing and checked after it (each node a ``PLUGIN_V3`` layer), one optimisation profile from
the build's shape ranges, the builder optimisation level, an optional timing cache and REFIT. Any TensorRT
failure becomes one ``TrtBuildError`` line naming the component and the fix.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import onnx

from pladis.errors import PladisError
from pladis.export import contracts, onnx_op

if TYPE_CHECKING:  # annotations only: TensorRT is imported inside the functions that need it
    import tensorrt as trt

log = logging.getLogger(__name__)

INSTALL = ("TensorRT is not installed: pip install 'pladis[gpu]' ({supported}; its libraries come from NVIDIA's "
           "package index, or use NVIDIA's containers){otherwise}")  # fmt: skip
OTHERWISE = "; meanwhile an export with function bodies builds with --backend ort or --backend aoti"
PLUGIN_ONLY = ("; this folder is a plugin-only export (--no-function-body), which only TensorRT builds: "
               "re-export without --no-function-body to build it with --backend ort or --backend aoti")  # fmt: skip
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class TrtBuildError(PladisError):
    """A TensorRT build that cannot be done or failed: names the component and the fix."""


@dataclass(frozen=True)
class ComponentPlan:
    """What one component's engine is: the float type it runs in (its graph's: float32 | float16 | bfloat16),
    strongly typed, with these ``NetworkDefinitionCreationFlag`` and ``BuilderFlag`` names; ``note``: why it
    differs from the requested precision (text encoders and force_upcast VAEs stay float32)."""

    dtype: str
    strongly_typed: bool
    network_flags: tuple[str, ...]
    builder_flags: tuple[str, ...]
    note: str = ""


def _major(version: str | None) -> int | None:
    return int(version.split(".")[0]) if version else None


def build_plan(manifest, precision: str, version: str | None, refit: bool = False) -> dict[str, ComponentPlan]:
    """Per component: the engine TensorRT ``version`` builds from this export for ``precision`` (None: the
    refusals only, e.g. before TensorRT is probed). TrtBuildError naming the command that works when the request
    cannot be met: another precision than the export's, or a denoiser the export could not write in it."""
    from pladis.plugins_trt import SUPPORTED_TEXT, check_version

    if version is not None:
        try:
            check_version(version, None)  # the range; NumPy is the environment's, checked by device_info
        except PladisError as e:
            raise TrtBuildError(str(e)) from None
    if precision != manifest.precision:
        raise TrtBuildError(
            f"this folder was exported in {manifest.precision} and TensorRT builds each graph in the precision it "
            f"was exported in (strongly typed: the only kind TensorRT 11 builds); run `pladis export --precision "
            f"{precision}` (the PLADIS threshold math stays float32) and build that folder with --precision {precision}"
        )
    major = _major(version)
    # 10.x: strong typing is a creation flag; 11.x: every network is strongly typed (the flag is ignored)
    network_flags = ("STRONGLY_TYPED",) if major == 10 else ()
    builder_flags = ("REFIT",) if refit else ()
    denoiser = _denoiser(manifest)
    plans = {}
    for name, spec in manifest.components.items():
        note = ""
        if spec.dtype != DTYPES[precision]:
            reason = (manifest.data.get("components", {}).get(name, {}).get("note")
                      or "the exporter keeps it in float32")  # fmt: skip
            if name == denoiser:
                raise TrtBuildError(
                    f"{name}: the {precision} export holds it in {spec.dtype} ({reason}); ONNX opsets <= 20 have no "
                    f"bfloat16 Conv, so no {precision} graph of it exists and TensorRT ({SUPPORTED_TEXT}, strongly "
                    "typed) builds the precision a graph has: build fp16 instead, `pladis export --precision fp16` "
                    "then `pladis build --backend trt --precision fp16`"
                )
            note = f"{spec.dtype}: {reason}"
        plans[name] = ComponentPlan(spec.dtype, True, network_flags, builder_flags, note)
    return plans


def _denoiser(manifest) -> str | None:
    names = [n for n, c in manifest.components.items() if c.role == "denoiser"]
    return names[0] if names else None


def installed_version() -> str | None:
    """The installed TensorRT's version string, None when it does not import."""
    try:
        import tensorrt
    except ImportError:
        return None
    return tensorrt.__version__


def preflight(src, precision: str, refit: bool = False) -> dict[str, ComponentPlan]:
    """The checks a trt build makes before anything heavy, on any machine: the build plan's refusals, the
    plugin's refusals of the export's PladisAttention nodes (``check_export``), then TensorRT present and in
    range (a plugin-only export is not sent to another backend). Returns the plan."""
    from pladis.plugins_trt import SUPPORTED_TEXT

    build_plan(src.manifest, precision, None, refit)
    check_export(src)
    version = installed_version()
    if version is None:
        plugin_only = src.manifest.data.get("pladis", {}).get("function_body") is False
        raise TrtBuildError(
            INSTALL.format(supported=SUPPORTED_TEXT, otherwise=PLUGIN_ONLY if plugin_only else OTHERWISE)
        )
    return build_plan(src.manifest, precision, version, refit)


def device_info(device: str, precision: str) -> dict:
    """TensorRT version, GPU name and compute capability; refuses what this GPU cannot build."""
    from pladis.plugins_trt import SUPPORTED_TEXT, check_version

    version = installed_version()
    if version is None:
        raise TrtBuildError(INSTALL.format(supported=SUPPORTED_TEXT, otherwise=OTHERWISE))
    import numpy

    try:
        check_version(version, numpy.__version__)
    except PladisError as e:
        raise TrtBuildError(str(e)) from None
    import torch

    if not torch.cuda.is_available():
        raise TrtBuildError("TensorRT engines are built on the GPU they run on, and no CUDA GPU is visible here")
    cc = torch.cuda.get_device_capability()
    if precision == "bf16" and cc < (8, 0):
        raise TrtBuildError(f"bf16 needs compute capability 8.0 (Ampere) or newer; this GPU has {cc[0]}.{cc[1]}; "
                            "build with --precision fp16")  # fmt: skip
    return {
        "kind": "cuda",
        "tensorrt": version,
        "name": torch.cuda.get_device_name(),
        "capability": list(cc),
        "plugin": plugin_info(),
    }


def plugin_info() -> dict:
    """What the PladisAttention plugin's engines depend on besides TensorRT and the GPU: the kernel's sources,
    the PTX ISA it is written in (hence the driver it needs) and the Triton that compiles it."""
    from pladis import kernels

    return {
        "kernel_sha256": kernels.source_hash(),
        "ptx_isa": f"{kernels.PTX_VERSION // 10}.{kernels.PTX_VERSION % 10}",
        "min_driver": dict(kernels.MIN_DRIVER),
        "triton": kernels.triton_release(),
    }


def check_plugin_nodes(model: onnx.ModelProto, component: str) -> int:
    """How many PladisAttention nodes ``model`` has; TrtBuildError naming the component and the node when one of
    them is something the plugin's kernels do not implement (alpha other than 1.5/2, joint attention past
    ``plugin.MAX_TEXT`` text tokens) or an export older than the plugin (lam as an attribute instead of the fifth
    input, missing attributes). Cross (``text_len == 0``) and joint (SD3, FLUX: ``text_len > 0``) nodes pass.
    Head dims and key lengths are the profile's, checked when the plugin compiles its kernel."""
    from pladis.plugins_trt import plugin

    nodes = onnx_op.pladis_nodes(model)
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        missing = [a for a in plugin.ATTRIBUTES if a not in attrs]
        if missing:
            raise TrtBuildError(f"{component}: PladisAttention node {node.name!r} lacks the attributes {missing} the "
                                "TensorRT plugin reads; re-export with this version of pladis")  # fmt: skip
        try:
            plugin.check_attributes(float(attrs["alpha"]), int(attrs["text_len"]), int(attrs["text_first"]))
        except PladisError as e:
            raise TrtBuildError(f"{component}: PladisAttention node {node.name!r}: {e}") from None
        if len(node.input) != len(plugin.INPUTS):
            raise TrtBuildError(f"{component}: PladisAttention node {node.name!r} has {len(node.input)} inputs; the "
                                f"TensorRT plugin takes {len(plugin.INPUTS)} ({', '.join(plugin.INPUTS)}: lam became "
                                "a tensor input); re-export with this version of pladis")  # fmt: skip
    return len(nodes)


def check_export(src) -> dict[str, int]:
    """Component -> its PladisAttention node count, after ``check_plugin_nodes`` on every component's graph
    (read without its weights): the plugin's refusals, by component and node, before anything is built."""
    return {
        name: check_plugin_nodes(onnx.load(str(src.folder / spec.file), load_external_data=False), name)
        for name, spec in src.manifest.components.items()
    }


def _check_plugin_layers(network: trt.INetworkDefinition, expected: int, component: str) -> None:
    """After parsing: each PladisAttention node must be a plugin layer (TensorRT may inline a local function
    of the same name instead, e.g. when the plugin was not registered first)."""
    import tensorrt as trt

    found = sum(network.get_layer(i).type == trt.LayerType.PLUGIN_V3 for i in range(network.num_layers))
    if found < expected:
        raise TrtBuildError(
            f"{component}: TensorRT's parser made {found} plugin layers for {expected} PladisAttention nodes; the "
            "others were inlined as ONNX functions or dropped, so the engine would not run the PLADIS kernel "
            "(the plugin must be registered before parsing and the graph must carry no function body)"
        )


def plugin_only_graph(path: Path) -> bytes:
    """The serialized graph at ``path`` without PladisAttention function bodies (the parser could prefer a local
    function over the plugin), its weights left where they are; nothing is written (the export may be read-only)."""
    model = onnx.load(str(path), load_external_data=False)
    onnx_op.attach_function(model, with_body=False)
    return model.SerializeToString()


def profile_shapes(spec, dims: dict) -> dict[str, tuple[tuple, tuple, tuple]]:
    """Input name -> (min, opt, max) shapes from the build's (possibly narrowed) ranges."""
    out = {}
    for inp in spec.inputs:
        t = contracts.Port(inp.name, inp.shape)
        out[inp.name] = tuple(tuple(contracts.shape_of(t, dims, i)) for i in range(3))
    return out


def _logger():
    """A TensorRT logger into this module's logger that keeps the last error (for the one-line message)."""
    import tensorrt as trt

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.last_error = ""

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.last_error = msg
                log.error("TensorRT: %s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                log.warning("TensorRT: %s", msg)
            else:
                log.debug("TensorRT: %s", msg)

    return Logger()


def build(src, dims, precision, cfg, folder: Path) -> dict:
    """Build every component of the export ``src`` into ``folder/<name>.plan``; returns the engine.json entries."""
    import tensorrt as trt

    plans = build_plan(src.manifest, precision, trt.__version__, cfg.refit)
    components = src.manifest.components
    nodes = check_export(src)  # every component is checked before the first one is built
    if any(nodes.values()):
        from pladis import plugins_trt

        try:
            plugins_trt.register()  # raises with the reason when the plugin is not available
        except PladisError:
            raise
        except Exception as e:  # TensorRT's validators or registry
            raise TrtBuildError(
                f"the PladisAttention plugin did not register with TensorRT {trt.__version__}: {_line(e)}; "
                "pladis's plugin is checked against TensorRT 10.9, 10.16 and 11.4: use one of those"
            ) from None
    logger = _logger()
    out = {}
    for name, spec in components.items():
        plan = plans[name]
        try:
            data = _build_component(logger, src.folder / spec.file, profile_shapes(spec, dims), plan,
                                    nodes[name], name, cfg)  # fmt: skip
        except PladisError:
            raise
        except Exception as e:  # pybind11's RuntimeError / TypeError / ValueError from TensorRT
            raise TrtBuildError(f"{name}: TensorRT {trt.__version__} failed: {_line(e)}; {_FIX}") from None
        (folder / f"{name}.plan").write_bytes(data)  # folder is the build's temporary folder
        out[name] = {"file": f"{name}.plan", "kind": "trt", "precision": precision, "dtype": plan.dtype,
                     "strongly_typed": plan.strongly_typed, "builder_flags": list(plan.builder_flags),
                     "pladis_plugin_layers": nodes[name]}  # fmt: skip
    return out


_FIX = "run with -v for TensorRT's log; narrower --dims or --opt-level 3 can help, or rebuild after `pladis export`"


def _line(e: BaseException | str) -> str:
    """``e``'s text on one line (at most 300 characters); an exception without text: its type's name."""
    text = " ".join(str(e).split())
    return (text or ("" if isinstance(e, str) else type(e).__name__))[:300]


def _build_component(logger, path: Path, shapes: dict, plan: ComponentPlan, plugin_layers: int, name: str,
                     cfg) -> bytes:  # fmt: skip
    """One component's serialized engine (TensorRT's Python API; names checked by tests/test_trt_api.py)."""
    import tensorrt as trt

    builder = trt.Builder(logger)
    flags = 0
    for flag in plan.network_flags:
        flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, flag))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # the graph from memory; ``path`` tells the parser where external weights are (read, never written)
    if not parser.parse(plugin_only_graph(path), path=str(path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TrtBuildError(f"{name}: TensorRT's ONNX parser refused {path.name}: {_line(errors)}; re-export it "
                            "with this version of pladis (`pladis export`)")  # fmt: skip
    _check_plugin_layers(network, plugin_layers, name)
    config = builder.create_builder_config()
    for flag in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    config.builder_optimization_level = cfg.opt_level
    profile = builder.create_optimization_profile()
    for inp, (lo, opt, hi) in shapes.items():
        profile.set_shape(inp, lo, opt, hi)
    config.add_optimization_profile(profile)
    timing = Path(cfg.timing_cache) if cfg.timing_cache else None
    if timing is not None:
        cache = config.create_timing_cache(timing.read_bytes() if timing.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    data = builder.build_serialized_network(network, config)
    if data is None:
        raise TrtBuildError(f"{name}: TensorRT built no engine ({_line(logger.last_error) or 'see its log'}); {_FIX}")
    if timing is not None:
        tmp = timing.with_name(f".{timing.name}.{os.getpid()}.tmp")
        tmp.write_bytes(memoryview(config.get_timing_cache().serialize()))
        os.replace(tmp, timing)
    return bytes(memoryview(data))
