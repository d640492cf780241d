"""ONNX Runtime engines: each component's graph optimised offline and saved, with its session settings.

The optimised model has the ``PladisAttention`` function bodies inlined (standard ops only), so it runs
without any plugin; it is tied to the execution provider it was optimised for, which is part of the key.
"""

from __future__ import annotations

from pathlib import Path

from pladis import ort


def device_info(device: str, precision: str) -> dict:
    import platform

    return {"kind": device, "providers": ort.providers(device), "machine": platform.machine()}


def build_component(src, name: str, device: str, level: int, folder: Path) -> dict:
    """Optimise ``name`` of the export ``src`` into ``folder/<name>.ort.onnx``; returns its engine.json entry."""
    out = folder / f"{name}.ort.onnx"
    ort.session(src.folder / src.component(name).file, device, level, optimized_path=out)
    data = out.with_name(f"{out.name}.data")
    return {
        "file": out.name,
        "kind": "ort",
        "providers": ort.providers(device),
        "graph_optimization_level": ort.OPT_LEVELS[level],
        "external_data": [data.name] if data.exists() else [],
        "io_binding": device != "cpu",
        "intra_op_num_threads": 0,  # ONNX Runtime's default: one per physical core
    }


def build(src, dims, precision, cfg, folder: Path) -> dict:
    return {name: build_component(src, name, cfg.device, cfg.opt_level, folder) for name in src.manifest.components}
