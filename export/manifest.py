"""``manifest.json`` of an export folder: what each file is, how it was made, and how it was checked."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from pathlib import Path

from pladis import families, ops
from pladis.export import contracts, onnx_op
from pladis.files import sha256  # noqa: F401  (re-exported: the export, engine and runtime stages hash with it)

FORMAT = "pladis-onnx/2"  # 2: lam is the runtime input pladis_scale (1: lam was a node attribute)


SEAL = "self_sha256"  # a JSON record's hash of itself (without this key): an edit by hand is detected


def sealed(record: dict) -> dict:
    """``record`` with its own sha256 (over its canonical JSON without the seal) added."""
    body = {k: v for k, v in record.items() if k != SEAL}
    return {**body, SEAL: hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()}


def seal_ok(record: dict) -> bool:
    """Whether ``record`` carries a seal that matches its content (records without one: False)."""
    return SEAL in record and sealed(record)[SEAL] == record[SEAL]


def config_hash(module) -> str:
    """sha256 of a component's architecture config (diffusers or transformers), independent of weights."""
    cfg = module.config
    data = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    data = {k: v for k, v in data.items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def versions() -> dict[str, str | None]:
    out = {}
    for dist in ("pladis", "torch", "diffusers", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _tensor(t: contracts.Tensor, dims: dict, float_dtype: str) -> dict:
    return {
        "name": t.name,
        "dtype": float_dtype if t.dtype == contracts.FLOAT else t.dtype,
        "shape": list(t.shape),
        "min": list(contracts.shape_of(t, dims, 0)),
        "opt": list(contracts.shape_of(t, dims, 1)),
        "max": list(contracts.shape_of(t, dims, 2)),
    }


PIPELINE_DIRS = ("tokenizer", "scheduler")  # folder name prefixes of the files the runtime reads


def pipeline_files(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of the tokenizer and scheduler files in ``folder``."""
    return {
        p.relative_to(folder).as_posix(): sha256(p)
        for d in sorted(folder.iterdir()) if d.is_dir() and d.name.startswith(PIPELINE_DIRS)
        for p in sorted(d.rglob("*")) if p.is_file()
    }  # fmt: skip


def build_manifest(*, cfg, pipe, family, report, dims, comps, files, folder, validation, config_hashes, height,
                   width, multiple, seconds, source: dict | None = None) -> dict:  # fmt: skip
    """The manifest dict; file hashes are computed from the files in ``folder``. ``source``: the model's
    record (``pladis.sources.record``: kind, absolute path, weight hashes, config hash, LoRAs)."""
    components = {}
    for comp in comps:
        f = files[comp.name]
        components[comp.name] = {
            "file": f["file"],
            "sha256": sha256(folder / f["file"]),
            "bytes": (folder / f["file"]).stat().st_size,
            "external_data": [{"file": x, "sha256": sha256(folder / x)} for x in f["external_data"]],
            "role": "denoiser" if comp.denoiser else ("vae_decoder" if comp.name == "vae_decoder" else "text_encoder"),
            "class": type(comp.module).__name__,
            "dtype": f["dtype"],
            "note": f.get("note"),
            "config_sha256": config_hashes[comp.name],
            "inputs": [_tensor(t, dims, f["dtype"]) for t in comp.inputs],
            "outputs": [_tensor(t, dims, f["dtype"]) for t in comp.outputs],
            "pladis_nodes": f["pladis_nodes"],
            "export_seconds": f["export_seconds"],
            "validation": validation.get(comp.name, "not run (--no-validate)"),
        }
    vae = pipe.vae.config
    return {
        "format": FORMAT,
        "model": {
            "source": cfg["model"],
            **(source or {}),
            "seed": cfg["seed"],
            "pipeline_class": type(pipe).__name__,
            "family": family,
        },
        "precision": cfg["precision"],
        "opset": cfg["opset"],
        "static": cfg["static"],
        "pladis": {
            "patched": bool(report.layers),
            "lam": report.lam,  # the default strength; any lam in lam_range runs on the same graph
            "lam_range": list(ops.LAM_RANGE) if report.layers else [0.0, 0.0],
            "lam_input": contracts.LAM_INPUT if report.layers else None,
            "alpha": report.alpha,
            "layer_selection": cfg["layers"],
            "layers": report.layers,
            "op": {"domain": onnx_op.DOMAIN, "type": onnx_op.OP_TYPE, "plugin_version": onnx_op.PLUGIN_VERSION},
            "function_body": cfg["function_body"],
            "newton_steps": onnx_op.newton_steps(report.alpha, dims["text"][2]) if report.layers else None,
        },
        "dims": {k: list(v) for k, v in dims.items()},
        "image": {"height": height, "width": width, "multiple": multiple},
        "vae": {
            "scaling_factor": vae.scaling_factor,
            "shift_factor": getattr(vae, "shift_factor", None),
            "scale_factor": families.get(family).vae_scale(vae),
            "latent_channels": vae.latent_channels,
        },
        "components": components,
        # an export of some components only (--components) is for benchmarks: the runtime refuses it
        "partial": bool(cfg["components"]),
        # tokenizers and scheduler config: what the runtime reads besides the ONNX files, hashed like them
        "files": pipeline_files(folder),
        "versions": versions(),
        "export_seconds": round(seconds, 3),
    }
