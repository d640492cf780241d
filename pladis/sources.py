"""Where a model comes from: a built-in, a diffusers folder, a single-file checkpoint or a hub id, with its LoRAs.

One module for the exporter and for the runtime's eager reference, so both build the same model:

- ``resolve(model, config, loras)`` checks a model reference without loading weights (bad paths, folders
  that are not pipelines, checkpoints of no known layout, configs that are missing a file, LoRAs that do
  not fit, scales that are not finite numbers) and returns a ``Source``. Every failure is a ``PladisError``
  that names the file and the fix.
- ``load(source, seed, dtype)`` builds the pipeline offline (``local_files_only=True`` for local paths)
  and fuses the LoRAs into its weights (``pladis.lora``), so what is exported is one plain model.

Single-file checkpoints are read by ``pladis.single_file``, LoRAs by ``pladis.lora``; the record of a source
in a manifest and its verification are ``pladis.provenance``.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from pladis import lora, models, single_file
from pladis.errors import PladisError
from pladis.families import Layout, denoiser_components
from pladis.lora import LORA_SUFFIXES, Lora
from pladis.model_files import dtype_kw, meta_modules, pipeline_class, quiet
from pladis.single_file import CHECKPOINT_SUFFIXES

HUB_ID = re.compile(r"[\w-][\w.-]*/[\w.-]+")


class SourceError(PladisError):
    """A model reference that names nothing usable; the message names the fix."""


@dataclass(frozen=True)
class Source:
    """A resolved model reference (nothing loaded). ``name``: built-in name, hub id or absolute path."""

    kind: str  # builtin | hub | folder | single_file
    name: str
    pipeline_class: str | None = None
    config: Path | None = None  # single files: the folder with the architecture configs
    config_origin: str = ""  # single files: "folder", "builtin:<name>" or "hf-cache:<repo>"
    layout: Layout | None = None
    loras: tuple[Lora, ...] = ()
    denoiser_only: bool = False  # single files: only the denoiser; every other component from the config folder
    vae_from_config: bool = False  # single files: text encoders and denoiser, no VAE (a "no-VAE" release)


def _looks_like_path(model: str) -> bool:
    """A name that can only mean a local path (a hub id is exactly ``org/name``)."""
    return (model.startswith((".", "/", "~")) or Path(model).suffix in CHECKPOINT_SUFFIXES + LORA_SUFFIXES
            or model.count("/") > 1 or "\\" in model)  # fmt: skip


def resolve(model: str, config: str = "", loras=()) -> Source:
    """Check ``model`` (and ``config``, ``loras``) and say what it is; loads no weights.

    ``model``: a built-in name, a diffusers folder (``model_index.json``), a single ``.safetensors`` /
    ``.ckpt`` checkpoint, or a hub id ``org/name``. ``config``: for a single file, a local diffusers folder
    with the architecture configs (``model_index.json``, each component's config, tokenizers, scheduler;
    weights not needed). ``loras``: ``FILE[:SCALE]`` strings.
    """
    loras = tuple(lora.parse_lora(x) for x in (loras or ()))
    if config and not (model.endswith(CHECKPOINT_SUFFIXES) or Path(model).is_file()):
        raise SourceError(f"--config is for single-file checkpoints (.safetensors, .ckpt); {model!r} brings its own "
                          "architecture config: drop --config")  # fmt: skip
    if model in models.BUILTINS:
        if not loras:
            return Source("builtin", model)
        pipe = models.load(model, device="meta")  # structure only, instant
        src = Source("builtin", model, type(pipe).__name__, loras=loras)
        _check_loras(src, lambda name: getattr(pipe, name, None))
        return src
    p = Path(model).expanduser()
    if p.is_dir():
        index = p / "model_index.json"
        if not index.is_file():
            raise SourceError(
                f"{model} is not a diffusers pipeline folder: {index} is missing. Save one with "
                "pipe.save_pretrained(folder), or pass a single .safetensors checkpoint with --config FOLDER"
            )
        folder = p.resolve()
        src = Source("folder", str(folder), pipeline_class(folder), loras=loras)
        _check_loras(src, meta_modules(folder))
        return src
    if p.is_file():
        path = p.resolve()
        found = single_file.inspect(path, config)
        src = Source("single_file", str(path), found.pipeline_class, found.config, found.config_origin, found.layout,
                     loras, found.denoiser_only, found.vae_from_config)  # fmt: skip
        _check_loras(src, meta_modules(found.config))
        return src
    if _looks_like_path(model):
        raise SourceError(f"model path {model} does not exist (looked in {Path.cwd()}); pass an existing diffusers "
                          "folder or .safetensors / .ckpt file")  # fmt: skip
    if not HUB_ID.fullmatch(model):
        raise SourceError(models.unknown(model))
    if loras and importlib.util.find_spec("peft") is None:
        raise lora.LoraError(lora.NO_PEFT)
    return Source("hub", model, None, loras=loras)  # LoRAs are checked once the model is loaded


def structure(src: Source):
    """A diffusers folder's denoiser and VAE built on the meta device from their configs (attributes named as
    the pipeline's), for checks on the structure before any weights are read; None for other sources, or
    when they cannot be built that way (the checks then run once the pipeline is loaded)."""
    from types import SimpleNamespace

    if src.kind != "folder":
        return None
    try:
        get = meta_modules(Path(src.name))
        parts = {name: get(name) for name in ("vae", *denoiser_components())}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ImportError):
        return None
    parts = {name: module for name, module in parts.items() if module is not None}
    return SimpleNamespace(**parts) if "vae" in parts and len(parts) > 1 else None


def load(src: Source, *, seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """The pipeline ``src`` describes, offline for local paths, with its LoRAs fused into the weights."""
    if src.kind in ("builtin", "hub"):
        pipe = models.load(src.name, seed=seed, dtype=dtype)
        if src.kind == "hub" and src.loras:
            _check_loras(src if src.pipeline_class else _with_class(src, pipe), lambda n: getattr(pipe, n, None))
    elif src.kind == "folder":
        import diffusers

        with quiet():
            pipe = diffusers.DiffusionPipeline.from_pretrained(src.name, local_files_only=True, **{dtype_kw(): dtype})
    elif src.kind == "single_file":
        pipe = single_file.load(src, dtype)
    else:
        raise SourceError(f"unknown model source kind {src.kind!r}")
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    if src.loras:
        with quiet():
            lora.fuse(pipe, src.loras)
    return pipe if device == "cpu" else pipe.to(device)


def _with_class(src: Source, pipe) -> Source:
    return Source(src.kind, src.name, type(pipe).__name__, loras=src.loras)


def _check_loras(src: Source, component) -> None:
    lora.check(src.loras, src.name, src.pipeline_class, component)
