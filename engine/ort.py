"""ONNX Runtime engines: each component's graph optimised offline and saved, with its session settings.

The optimised model has the ``PladisAttention`` function bodies inlined (standard ops only), so it runs
without any plugin. On the CPU the saved graph is the one the CPU provider optimised (it is tied to that
provider). For CUDA, ONNX Runtime cannot save a graph with provider-compiled nodes (the TensorRT provider
compiles subgraphs into its own nodes), so the offline pass runs on the CPU provider at the basic level,
whose rewrites are provider-independent; at generate time the session on that graph runs with the
providers recorded in engine.json (TensorRT's, where present, then CUDA, then CPU) and applies their own
optimisations when it loads.
"""

from __future__ import annotations

from pathlib import Path

from pladis import ort

OFFLINE_CUDA_LEVEL = 1  # ORT_ENABLE_BASIC: constant folding and redundant-node removal, valid for every provider


def device_info(device: str, precision: str) -> dict:
    import platform

    return {"kind": device, "providers": ort.providers(device), "machine": platform.machine()}


def build_component(src, name: str, device: str, level: int, folder: Path) -> dict:
    """Optimise ``name`` of the export ``src`` into ``folder/<name>.ort.onnx``; returns its engine.json entry."""
    import onnxruntime

    out = folder / f"{name}.ort.onnx"
    source = src.folder / src.component(name).file
    if device == "cpu":
        ort.session(source, device, level, optimized_path=out)
        offline = level
    else:  # the offline pass on the CPU provider (nothing provider-compiled to save); see the module docstring
        offline = min(level, OFFLINE_CUDA_LEVEL)
        onnxruntime.InferenceSession(str(source), ort.session_options(offline, optimized_path=out),
                                     providers=["CPUExecutionProvider"])  # fmt: skip
    data = out.with_name(f"{out.name}.data")
    return {
        "file": out.name,
        "kind": "ort",
        "providers": ort.providers(device),  # what the runtime's session runs with, first available first
        "graph_optimization_level": ort.OPT_LEVELS[level],
        "offline_optimization_level": ort.OPT_LEVELS[min(max(offline, 0), 3)],
        "external_data": [data.name] if data.exists() else [],
        "io_binding": device != "cpu",
        "intra_op_num_threads": 0,  # ONNX Runtime's default: one per physical core
    }


def build(src, dims, precision, cfg, folder: Path) -> dict:
    return {name: build_component(src, name, cfg.device, cfg.opt_level, folder) for name in src.manifest.components}
