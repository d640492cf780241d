"""What is in a diffusers model folder: its weight and config files, their hashes, its components.

Shared by resolving a model (``pladis.sources``), single-file checkpoints (``pladis.single_file``) and the
record of where an export came from (``pladis.provenance``).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
from pathlib import Path

import torch

from pladis.files import sha256

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".onnx", ".gguf")

CONFIG_SUFFIXES = (".json", ".txt", ".model", ".yaml", ".yml")  # configs, vocabularies, merges, sentencepiece


def is_weight(path: Path) -> bool:
    return path.suffix in WEIGHT_SUFFIXES


def files(folder: Path) -> list[Path]:
    """Every regular file of a model folder, sorted, hidden files and folders (caches) left out."""
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )  # fmt: skip


def config_sha256(folder: Path) -> str:
    """One sha256 over a folder's config files (model_index.json, configs, tokenizers, scheduler), by path."""
    h = hashlib.sha256()
    for p in files(folder):
        if p.suffix in CONFIG_SUFFIXES:
            h.update(f"{p.relative_to(folder).as_posix()}\0{sha256(p)}\n".encode())
    return h.hexdigest()


def weight_files(folder: Path) -> list[dict]:
    return [{"file": p.relative_to(folder).as_posix(), "sha256": sha256(p), "bytes": p.stat().st_size}
            for p in files(folder) if is_weight(p)]  # fmt: skip


def pipeline_class(folder: Path) -> str:
    """The ``_class_name`` of a diffusers folder's model_index.json."""
    return json.loads((folder / "model_index.json").read_text())["_class_name"]


def component_config_file(class_name: str) -> str:
    if class_name.endswith("Scheduler"):
        return "scheduler_config.json"
    if "Tokenizer" in class_name:
        return "tokenizer_config.json"
    if class_name.endswith(("FeatureExtractor", "ImageProcessor")):
        return "preprocessor_config.json"
    return "config.json"


def model_components(folder: Path) -> list[str]:
    """The components of a diffusers folder that are models (they have weights)."""
    index = json.loads((folder / "model_index.json").read_text())
    return [
        name for name, spec in index.items()
        if not name.startswith("_") and isinstance(spec, list) and spec[0] in ("diffusers", "transformers")
        and component_config_file(spec[1]) == "config.json"
    ]  # fmt: skip


@contextlib.contextmanager
def quiet():
    """transformers' and diffusers' info and warnings off (loading notes that say nothing to a pladis user:
    "no LoRA keys for the text encoder", "modules kept in float32: []")."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    levels = tlog.get_verbosity(), dlog.get_verbosity()
    tlog.set_verbosity_error()
    dlog.set_verbosity_error()
    try:
        yield
    finally:
        tlog.set_verbosity(levels[0])
        dlog.set_verbosity(levels[1])


def meta_modules(folder: Path):
    """A getter: component name -> that component built on the meta device from ``folder``'s config."""
    index = json.loads((folder / "model_index.json").read_text())

    def get(name: str):
        spec = index.get(name)
        if not isinstance(spec, list) or spec[0] not in ("diffusers", "transformers"):
            return None
        cls = getattr(importlib.import_module(spec[0]), spec[1], None)
        if cls is None or not isinstance(cls, type) or not issubclass(cls, torch.nn.Module):
            return None
        with torch.device("meta"), quiet():
            if spec[0] == "diffusers":
                return cls.from_config(cls.load_config(folder / name))
            return cls._from_config(cls.config_class.from_pretrained(folder / name))

    return get


def dtype_kw() -> str:
    """The name diffusers' ``from_pretrained`` takes the dtype under (``dtype`` from 0.42, ``torch_dtype`` before)."""
    import diffusers
    from packaging.version import Version

    return "dtype" if Version(diffusers.__version__).release >= (0, 42) else "torch_dtype"
