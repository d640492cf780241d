"""TensorRT engines, written against the public TensorRT 10 / Polygraphy Python APIs.

Not run in this project's CI (TensorRT's libraries are not on PyPI and CI has no GPU): every entry
point first checks that ``tensorrt`` imports and a GPU is present, and says what is missing otherwise.
Before anything is built, every component's PladisAttention nodes are checked against what the plugin
implements (cross-attention, alpha 1.5 or 2: joint attention is refused by name). Per component: the
plugin-only graph (function bodies stripped, so the parser maps ``PladisAttention`` to the plugin), the
PLADIS plugin (``pladis.plugins_trt``, TensorRT >= 10.9, an AOT-compiled Triton kernel) registered before
parsing and checked after it (each node must have become a plugin layer, not an inlined function), one
optimisation profile from the manifest's shape ranges, strongly typed for fp16/bf16 exports or precision
flags for an fp32 export, the builder optimisation level, an optional timing cache and refit flag; the
engine is serialised to ``<name>.plan``. The TensorRT version, the GPU's compute capability and the
kernel's source hash are part of ``device_info``, hence of the cache key and engine.json.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from pladis.export import contracts, onnx_op

INSTALL = ("TensorRT is not installed: its libraries come from NVIDIA's package index, not PyPI "
           "(pip install tensorrt polygraphy with NVIDIA's index reachable, or NVIDIA's containers); "
           "meanwhile --backend ort builds an ONNX Runtime engine")  # fmt: skip


def device_info(device: str, precision: str) -> dict:
    """TensorRT version, GPU name and compute capability; refuses what this GPU cannot build."""
    try:
        import tensorrt
    except ImportError:
        raise ValueError(INSTALL) from None
    import torch

    if not torch.cuda.is_available():
        raise ValueError("TensorRT engines are built on the GPU they run on, and no CUDA GPU is visible here")
    cc = torch.cuda.get_device_capability()
    if precision == "bf16" and cc < (8, 0):
        raise ValueError(f"bf16 needs compute capability 8.0 (Ampere) or newer; this GPU has {cc[0]}.{cc[1]}; "
                         "build with --precision fp16")  # fmt: skip
    return {
        "kind": "cuda",
        "tensorrt": tensorrt.__version__,
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
    """How many PladisAttention nodes ``model`` has; ValueError naming the component when one of them is
    something the plugin does not implement (joint attention, alpha other than 1.5/2) or an export older than
    the plugin (lam as an attribute instead of the fifth input, missing attributes)."""
    from pladis.plugins_trt import plugin

    nodes = onnx_op.pladis_nodes(model)
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        missing = [a for a in plugin.ATTRIBUTES if a not in attrs]
        if missing:
            raise ValueError(f"{component}: PladisAttention node {node.name!r} lacks the attributes {missing} the "
                             "TensorRT plugin reads; re-export with this version of pladis")  # fmt: skip
        try:
            plugin.check_attributes(float(attrs["alpha"]), int(attrs["text_len"]))
        except ValueError as e:
            raise ValueError(f"{component}: {e}") from None
        if len(node.input) != len(plugin.INPUTS):
            raise ValueError(f"{component}: PladisAttention node {node.name!r} has {len(node.input)} inputs; the "
                             f"TensorRT plugin takes {len(plugin.INPUTS)} ({', '.join(plugin.INPUTS)}: lam became a "
                             "tensor input); re-export with this version of pladis")  # fmt: skip
    return len(nodes)


def _check_plugin_layers(network, expected: int, component: str) -> None:
    """After parsing: each PladisAttention node must be a plugin layer (TensorRT may inline a local function
    of the same name instead, e.g. when the plugin was not registered first)."""
    import tensorrt as trt

    found = sum(network.get_layer(i).type == trt.LayerType.PLUGIN_V3 for i in range(network.num_layers))
    if found < expected:
        raise ValueError(
            f"{component}: TensorRT's parser made {found} plugin layers for {expected} PladisAttention nodes; the "
            "others were inlined as ONNX functions or dropped, so the engine would not run the PLADIS kernel "
            "(the plugin must be registered before parsing and the graph must carry no function body)"
        )


def _plugin_only(src_path: Path, out_path: Path) -> bool:
    """Write the graph without PladisAttention function bodies (the parser could prefer a local function
    over the plugin); returns whether it has PladisAttention nodes."""
    model = onnx.load(str(src_path), load_external_data=False)
    has_nodes = bool(onnx_op.pladis_nodes(model))
    onnx_op.attach_function(model, with_body=False)
    onnx.save_model(model, str(out_path))
    return has_nodes


def build(src, dims, precision, cfg, folder: Path) -> dict:
    from polygraphy.backend.trt import (
        CreateConfig,
        Profile,
        engine_from_network,
        network_from_onnx_path,
        save_engine,
    )

    out = {}
    components = src.manifest.components
    # every component is checked before the first one is built: a refusal costs no build time
    nodes = {
        name: check_plugin_nodes(onnx.load(str(src.folder / spec.file), load_external_data=False), name)
        for name, spec in components.items()
    }
    if any(nodes.values()):
        from pladis import plugins_trt

        plugins_trt.register()  # raises with the reason when the plugin is not available
    for name, spec in components.items():
        # the plugin-only graph next to the original, so external weights resolve by their relative path
        plugin_graph = src.folder / f".{name}.plugin-only.onnx"
        _plugin_only(src.folder / spec.file, plugin_graph)
        try:
            # a typed graph (fp16/bf16 export, or fp32 kept fp32) builds strongly typed; an fp32 graph built in
            # fp16/bf16 is weakly typed and lowered by the precision flags
            typed = spec.dtype != "float32" or precision == "fp32"
            network = network_from_onnx_path(str(plugin_graph), strongly_typed=typed)  # (builder, network, parser)
            _check_plugin_layers(network[1], nodes[name], name)
            profile = Profile()
            for inp in spec.inputs:  # the build's (possibly narrowed) ranges, not the export's min/opt/max
                t = contracts.Port(inp.name, inp.shape)
                lo, opt, hi = (contracts.shape_of(t, dims, i) for i in range(3))
                profile.add(inp.name, min=lo, opt=opt, max=hi)
            config = CreateConfig(
                fp16=precision == "fp16" and not typed, bf16=precision == "bf16" and not typed, profiles=[profile],
                builder_optimization_level=cfg.opt_level, refittable=cfg.refit,
                load_timing_cache=cfg.timing_cache or None,
            )  # fmt: skip
            engine = engine_from_network(network, config=config, save_timing_cache=cfg.timing_cache or None)
            save_engine(engine, str(folder / f"{name}.plan"))
        finally:
            plugin_graph.unlink(missing_ok=True)
        out[name] = {"file": f"{name}.plan", "kind": "trt", "precision": precision, "strongly_typed": typed,
                     "pladis_plugin_layers": nodes[name]}  # fmt: skip
    return out


def compare_with_ort(src, engine_folder: Path, component: str, feeds: dict, rtol: float = 1e-2, atol: float = 1e-2):
    """Polygraphy's comparator: one component as a TensorRT engine vs the exported ONNX in ONNX Runtime, on
    the same inputs (``feeds``: name -> numpy array). Returns Polygraphy's accuracy result (truthy = match)."""
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner
    from polygraphy.comparator import Comparator, CompareFunc

    onnx_path = str(src.folder / src.component(component).file)
    plan = engine_folder / f"{component}.plan"
    runners = [OnnxrtRunner(SessionFromOnnx(onnx_path)), TrtRunner(EngineFromBytes(BytesFromPath(str(plan))))]
    results = Comparator.run(runners, data_loader=[feeds])
    return Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(rtol=rtol, atol=atol))
