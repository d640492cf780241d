"""The record of where an export's model came from, and the check that it is still there and unchanged.

``record(source)`` is the manifest's ``model`` entry: absolute paths, sha256 of every weight file, a hash of the
configs, each LoRA's file name, sha256 and scale. ``verify(entry)`` checks that nothing moved or changed
(``SourceChanged`` otherwise) and ``load_recorded(entry, seed, dtype)`` rebuilds that model for the eager
reference; it never falls back to the model hub.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pladis import models
from pladis.errors import PladisError
from pladis.families import LAYOUTS
from pladis.files import sha256
from pladis.lora import Lora
from pladis.model_files import config_sha256, pipeline_class, weight_files
from pladis.single_file import builtin_config_folder
from pladis.sources import HUB_ID, Source, load


class SourceChanged(PladisError):
    """The model (or a LoRA) an export was made from has moved or changed since."""


def record(src: Source) -> dict:
    """The manifest's ``model`` entries for ``src``: kind, absolute path, weight hashes, config hash, LoRAs."""
    out: dict = {"source": src.name, "kind": src.kind}
    if src.kind == "folder":
        folder = Path(src.name)
        out |= {"files": weight_files(folder), "config_sha256": config_sha256(folder)}
    elif src.kind == "single_file":
        p = Path(src.name)
        out |= {
            "files": [{"file": p.name, "sha256": sha256(p), "bytes": p.stat().st_size}],
            "layout": src.layout.name,
            "config": {
                "origin": src.config_origin,
                "path": None if src.config_origin.startswith("builtin:") else str(src.config),  # built-in: rebuilt
                "config_sha256": config_sha256(src.config),
            },
        }
        if src.denoiser_only or src.vae_from_config:  # components whose weights come from the config folder
            out["config"] |= {"denoiser_only": src.denoiser_only, "vae_from_config": src.vae_from_config,
                              "files": weight_files(src.config)}  # fmt: skip
    out["loras"] = [{"file": x.path.name, "path": str(x.path), "sha256": sha256(x.path), "scale": x.scale}
                    for x in src.loras]  # fmt: skip
    return out


def _check_files(folder: Path, recorded: list[dict], what: str) -> None:
    for f in recorded:
        p = folder / f["file"] if folder.is_dir() else folder
        if not p.is_file():
            raise SourceChanged(f"{what}: {p} is gone since the export; restore it, or re-export "
                                "(pladis export) from the model as it is now")  # fmt: skip
        digest = sha256(p)
        if digest != f["sha256"]:
            raise SourceChanged(
                f"{what}: {p} changed since the export: its sha256 is {digest[:16]}…, the manifest records "
                f"{f['sha256'][:16]}…; the eager reference would not be the exported model. Restore the file, or "
                "re-export (pladis export) and compare against the new export"
            )


def verify(entry: dict) -> Source:
    """Check that the recorded source is where it was and unchanged; return it as a ``Source``.

    Raises ``SourceChanged`` (a PladisError) naming what moved or changed and what to do.
    """
    kind, name = entry.get("kind"), entry["source"]
    loras = tuple(Lora(Path(x["path"]), float(x["scale"])) for x in entry.get("loras", []))
    for x, rec in zip(loras, entry.get("loras", []), strict=True):
        if not x.path.is_file():
            raise SourceChanged(f"LoRA {rec['file']} of this export is no longer at {x.path}; put it back, or "
                                "re-export with --lora pointing at its new place")  # fmt: skip
        _check_files(x.path, [rec], f"LoRA {rec['file']}")
    if kind is None:  # manifests from before sources were recorded: the model name as typed
        if name in models.BUILTINS or (HUB_ID.fullmatch(name) and not Path(name).exists()):
            return Source("builtin" if name in models.BUILTINS else "hub", name)
        p = Path(name)
        if not p.is_absolute():
            raise SourceChanged(f"this export records its model as the relative path {name!r} (an export made before "
                                "absolute paths were recorded); re-export it with pladis export")  # fmt: skip
        if not (p / "model_index.json").is_file():  # before single files were supported: it was a folder
            raise SourceChanged(
                f"the model this export was made from is no longer a diffusers folder at {p}; move it back, or "
                "re-export from its new place (pladis export --model NEW_PATH)"
            )
        return Source("folder", name, pipeline_class(p), loras=loras)  # no hashes recorded: nothing to compare
    if kind in ("builtin", "hub"):
        return Source(kind, name, loras=loras)
    p = Path(name)
    what = f"the model this export was made from ({kind.replace('_', ' ')})"
    if not p.exists():
        raise SourceChanged(
            f"{what} is no longer at {p}: it was moved or deleted. Move it back, or re-export from its new place "
            "(pladis export --model NEW_PATH); the eager reference never falls back to the model hub for a local model"
        )
    if kind == "folder":
        _check_files(p, entry.get("files", []), what)
        if "config_sha256" in entry and config_sha256(p) != entry["config_sha256"]:
            raise SourceChanged(f"{what}: the configs in {p} (model_index.json, */config.json, tokenizers, "
                                "scheduler) changed since the export; restore them or re-export")  # fmt: skip
        return Source("folder", str(p), pipeline_class(p), loras=loras)
    _check_files(p, entry.get("files", []), what)
    cfg = entry["config"]
    origin = cfg["origin"]
    builtin = origin.removeprefix("builtin:") if origin.startswith("builtin:") else ""
    config = builtin_config_folder(builtin) if builtin else Path(cfg["path"])
    if not (config / "model_index.json").is_file():
        raise SourceChanged(f"the config folder of this export's checkpoint is no longer at {config}; put it back, or "
                            "re-export with --config pointing at its new place")  # fmt: skip
    if config_sha256(config) != cfg["config_sha256"]:
        where = (f"the built-in {builtin}'s config (pladis or diffusers was changed)" if builtin
                 else f"the config folder {config}")  # fmt: skip
        raise SourceChanged(f"{where} of this export's checkpoint differs from the export's (config hash); restore "
                            "it or re-export")  # fmt: skip
    if cfg.get("files"):
        _check_files(config, cfg["files"], f"the config folder {config}")
    layout = next(lay for lay in LAYOUTS if lay.name == entry["layout"])
    return Source("single_file", str(p), pipeline_class(config), config, origin, layout, loras,
                  cfg.get("denoiser_only", False), cfg.get("vae_from_config", False))  # fmt: skip


def load_recorded(entry: dict, *, seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Rebuild the pipeline a manifest's ``model`` entry describes (checked first with ``verify``)."""
    return load(verify(entry), seed=seed, dtype=dtype, device=device)


def skeleton(entry: dict):
    """The pipeline a manifest's ``model`` entry describes, built without weights: the structure on the meta
    device, its LoRA-loadable components (denoiser, text encoders) moved to uninitialised CPU storage, so
    diffusers' LoRA loader can put adapters on it (``pladis.lora.load_adapter``). Reads configs only, no weight
    file; memory is reserved, never written. The recorded LoRAs (fused at export) are not applied: a skeleton
    has no weights to fuse them into."""
    import diffusers

    from pladis.model_files import meta_modules, quiet

    kind, name = entry.get("kind"), entry["source"]
    if kind in (None, "builtin") and name in models.BUILTINS:
        pipe = models.load(name, device="meta")
    else:
        src = verify({**entry, "loras": []})
        folder = src.config if src.kind == "single_file" else Path(src.name) if src.kind == "folder" else None
        if folder is None:
            raise SourceChanged(f"the model of this export ({name}) is a hub id: LoRA swapping reads its "
                                "configs from a local folder; save it with pipe.save_pretrained(FOLDER) and "
                                "re-export")  # fmt: skip
        cls = getattr(diffusers, src.pipeline_class or "")
        get = meta_modules(folder)
        with quiet():
            pipe = cls(**{n: get(n) for n in cls._get_signature_keys(cls)[0]})
    for comp in getattr(pipe, "_lora_loadable_modules", []):
        module = getattr(pipe, comp, None)
        if isinstance(module, torch.nn.Module):
            module.to_empty(device="cpu")
    return pipe
