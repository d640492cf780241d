"""Writing ``manifest.json`` of an export folder: what each file is, how it was made, and how it was checked.

The format, its typed reading and its seal live in ``pladis.manifest`` (shared by every stage); this module
only fills it in from the export's objects.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from pathlib import Path

from pladis import families, ops
from pladis.export import contracts, onnx_op
from pladis.files import sha256
from pladis.manifest import FORMAT, Manifest, TensorSpec, sealed  # noqa: F401  (sealed: the exporter seals with it)


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


def _tensor(t: contracts.Port, dims: dict, float_dtype: str) -> dict:
    dtype = float_dtype if t.dtype == contracts.FLOAT else t.dtype
    return TensorSpec(
        t.name, dtype, tuple(t.shape), *(tuple(contracts.shape_of(t, dims, i)) for i in range(3))
    ).to_dict()


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
    record (``pladis.provenance.record``: kind, absolute path, weight hashes, config hash, LoRAs)."""
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
            # module path -> the initializer holding its nn.Linear weight (LoRA swapping on a built engine)
            "weights": f.get("weights", {}),
            "weights_missing": f.get("weights_missing", {}),
        }
    vae = pipe.vae.config
    manifest = {
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
            "scaling_factor": getattr(vae, "scaling_factor", 1.0),  # none: the family's decoder normalises
            "shift_factor": getattr(vae, "shift_factor", None),
            "scale_factor": families.get(family).vae_scale(vae),
            "latent_channels": families.get(family).vae_channels(vae),
        },
        "components": components,
        # an export of some components only (--components) is for benchmarks: the runtime refuses it
        "partial": bool(cfg["components"]),
        # tokenizers and scheduler config: what the runtime reads besides the ONNX files, hashed like them
        "files": pipeline_files(folder),
        "versions": versions(),
        "export_seconds": round(seconds, 3),
    }
    Manifest.from_dict(manifest)  # every field the build and runtime stages read is there and well-formed
    return manifest
