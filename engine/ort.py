"""ONNX Runtime engines: each component's graph optimised offline and saved, with its session settings.

The optimised model has the ``PladisAttention`` function bodies inlined (standard ops only), so it runs
without any plugin; it is tied to the execution provider it was optimised for, which is part of the key.
"""

from __future__ import annotations

from pathlib import Path

from pladis.runtime.backends import ort_providers

OPT_LEVELS = {0: "ORT_DISABLE_ALL", 1: "ORT_ENABLE_BASIC", 2: "ORT_ENABLE_EXTENDED", 3: "ORT_ENABLE_ALL"}


def device_info(device: str, precision: str) -> dict:
    import platform

    providers = ort_providers(device)
    return {"kind": device, "providers": providers, "machine": platform.machine()}


def session_options(level: int, optimized_path: Path | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPT_LEVELS[min(max(level, 0), 3)])
    opts.log_severity_level = 3
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
        # weights of large models go to one file beside the optimised graph (protobuf's 2 GB limit)
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                      f"{optimized_path.name}.data")  # fmt: skip
        opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1048576")
    return opts


def build_component(src, name: str, device: str, level: int, folder: Path) -> dict:
    """Optimise ``name`` of the export ``src`` into ``folder/<name>.ort.onnx``; returns its engine.json entry."""
    import onnxruntime as ort

    out = folder / f"{name}.ort.onnx"
    providers = ort_providers(device)
    ort.InferenceSession(
        str(src.folder / src.component(name)["file"]), session_options(level, out), providers=providers
    )
    data = out.with_name(f"{out.name}.data")
    return {
        "file": out.name,
        "kind": "ort",
        "providers": providers,
        "graph_optimization_level": OPT_LEVELS[level],
        "external_data": [data.name] if data.exists() else [],
        "io_binding": device != "cpu",
        "intra_op_num_threads": 0,  # ONNX Runtime's default: one per physical core
    }


def build(src, dims, precision, cfg, folder: Path) -> dict:
    return {name: build_component(src, name, cfg.device, cfg.opt_level, folder) for name in src.manifest["components"]}
