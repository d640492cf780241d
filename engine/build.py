"""``pladis build``: an ONNX export folder → an engine folder for one backend, through the cache.

The engine folder holds the backend's artifacts, ``engine.json`` (backend, versions, device, precision,
profiles, the export manifest's hash, build time, per-artifact sha256) and the export's
``manifest.json``, tokenizers and scheduler config, so the runtime opens it like an export folder.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from pladis import backends
from pladis.engine import cache
from pladis.errors import PladisError, SettingError
from pladis.files import check_output_folder, check_writable, folder_kind, no_space, sha256, temp_dir, write_text
from pladis.manifest import (
    ENGINE_FORMAT,
    MANIFEST_FILE,
    EngineError,
    Manifest,
    check_function_body,
    open_engine,
    sealed,
)
from pladis.options import DEFAULT_ENGINE, DEFAULT_EXPORT, option
from pladis.precision import PRECISIONS

log = logging.getLogger(__name__)

BACKENDS = backends.BUILDABLE
FORMAT = ENGINE_FORMAT
# What PLADIS numerics come from (modules, or packages: every .py file in them), hashed into the cache key.
_SOURCES = ["pladis.numerics", "pladis.ops", "pladis.export.onnx_op", "pladis.kernels", "pladis.plugins_trt"]


@dataclass
class BuildConfig:
    """Settings of ``pladis build``; the CLI flags are generated from these fields and defaults."""

    onnx: str = option(DEFAULT_EXPORT, "export folder (written by `pladis export`)")
    backend: str = option("ort", " | ".join(BACKENDS))
    out: str = option(DEFAULT_ENGINE, "engine folder to write")
    precision: str = option("", "fp32 | fp16 | bf16: the export's (default); no backend changes a graph's precision")
    dims: str = option("", "narrow shape ranges, e.g. cfg_batch=1:2:4,latent_height=16:16:32 (min:opt:max)")
    device: str = option("cpu", "cpu or cuda (trt always builds for the current GPU)")
    cache_dir: str = option("", "engine cache; default: $PLADIS_CACHE or ~/.cache/pladis/engines")
    timing_cache: str = option("", "trt: timing cache file (loaded and saved)")
    opt_level: int = option(3, "trt builder optimisation level 0-5; ort graph optimisation level 0-3")
    refit: bool = option(False, "trt: build a refittable engine")
    verify: bool = option(True, "check the sha256 of the export's files before building")
    force: bool = option(False, "replace an existing engine folder written by pladis")


def parse_dims(text: str) -> dict[str, tuple[int, int, int]]:
    """'cfg_batch=1:2:4,latent_height=64:128:128' -> {'cfg_batch': (1, 2, 4), ...}."""
    out = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        name, _, spec = item.partition("=")
        try:
            lo, opt, hi = (int(x) for x in spec.split(":"))
        except ValueError:
            raise SettingError("dims", f"dim {item!r} must look like name=min:opt:max (e.g. cfg_batch=1:2:4)") from None
        out[name.strip()] = (lo, opt, hi)
    return out


def _versions(backend: str) -> dict[str, str | None]:
    out = {"pladis": None}
    for n in ["pladis", *backends.get(backend).packages]:
        try:
            out[n] = importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            out[n] = None
    return out


def source_files(modules: list[str] = _SOURCES) -> list[Path]:
    """The files the named modules are loaded from, wherever pladis is installed (found without importing
    them, so Triton or TensorRT need not be present). A module without its file is an error, never skipped."""
    import pladis

    home = Path(pladis.__file__).parent  # the installed package: a module found elsewhere is not ours
    files = []
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin or not Path(spec.origin).is_file() or home not in Path(spec.origin).parents:
            raise PladisError(f"the source of {name} is missing from this pladis installation; reinstall pladis")
        if spec.submodule_search_locations:  # a package: all its modules
            files += [p for d in spec.submodule_search_locations for p in sorted(Path(d).rglob("*.py"))]
        else:
            files.append(Path(spec.origin))
    return files


def check(cfg: BuildConfig):
    """Validate settings against the export folder before any build; returns (engine, dims, precision)."""
    if cfg.backend not in BACKENDS:
        raise SettingError("backend", f"backend must be one of {', '.join(BACKENDS)}; got {cfg.backend!r}")
    if cfg.device != "cpu" and not (cfg.device == "cuda" or cfg.device.startswith("cuda:")):
        raise SettingError("device", f"device must be cpu or cuda; got {cfg.device!r}")
    if not Path(cfg.onnx).is_dir():
        raise EngineError(f"{cfg.onnx} is not a folder: pass --onnx with a folder written by `pladis export`")
    if not (Path(cfg.onnx) / MANIFEST_FILE).is_file():
        raise EngineError(f"{cfg.onnx} has no manifest.json: build from a folder written by `pladis export`")
    src = open_engine(cfg.onnx, verify=cfg.verify)
    if src.built:
        raise EngineError(f"{cfg.onnx} is already an engine folder; build from the ONNX export folder")
    if cfg.backend == "ort":  # aoti runs the denoiser from its eager model, trt through the plugin
        check_function_body(src.manifest, cfg.onnx, "`pladis build --backend ort`")
    dims = dict(src.manifest.dims)
    for name, (lo, opt, hi) in parse_dims(cfg.dims).items():
        if name not in dims:
            raise SettingError("dims", f"unknown dim {name!r}; this export has {', '.join(dims)}")
        old = dims[name]
        if not (lo <= opt <= hi):
            raise SettingError(
                "dims", f"dim {name}: the range {lo}:{opt}:{hi} does not contain its opt shape (min <= opt <= max)"
            )
        if not (old[0] <= lo and hi <= old[2]):
            raise SettingError(
                "dims", f"dim {name}: {lo}..{hi} is outside the exported range {old[0]}..{old[2]}; re-export"
            )
        dims[name] = (lo, opt, hi)
    precision = cfg.precision or src.manifest.precision
    if precision not in PRECISIONS:
        raise SettingError("precision", f"precision must be {', '.join(PRECISIONS)}; got {precision!r}")
    if precision != src.manifest.precision and not backends.get(cfg.backend).lowers_precision:
        lowering = " or ".join(f"--backend {n}" for n in BACKENDS if backends.get(n).lowers_precision)
        raise SettingError(
            "precision",
            f"this folder was exported in {src.manifest.precision}; the {cfg.backend} backend runs the graph as "
            f"exported, so re-export with `pladis export --precision {precision}` (the exporter keeps the PLADIS "
            f"threshold math in float32)"
            + (f", or build with {lowering}, which can lower an fp32 graph" if lowering else ""),
        )
    return src, dims, precision


def key_parts(cfg: BuildConfig, src, dims: dict, precision: str, device: dict) -> dict:
    """Everything that changes a build's result: backend and versions, device, precision, shape profiles,
    builder flags, the ONNX files' hashes and the hash of the PLADIS operator/kernel/plugin sources."""
    return {
        "format": FORMAT, "backend": cfg.backend, "versions": _versions(cfg.backend), "device": device,
        "precision": precision, "dims": {k: list(v) for k, v in dims.items()},
        "flags": {"opt_level": cfg.opt_level, "refit": cfg.refit},
        "onnx": {n: c.sha256 for n, c in src.manifest.components.items()},
        # every other file the engine folder receives: a changed tokenizer or scheduler is another engine
        "files": {MANIFEST_FILE: sha256(src.folder / MANIFEST_FILE), **src.manifest.files},
        "sources": cache.source_hash(source_files()),
    }  # fmt: skip


def builder_module(spec):
    """The module of this package that builds the registry record ``spec``'s engines."""
    if spec.builder is None:
        raise EngineError(f"the {spec.name} backend runs export folders as they are; nothing to build")
    return importlib.import_module(f"{__package__}.{spec.builder}")


def build(cfg: BuildConfig) -> dict:
    """Build (or reuse from the cache) the engine folder ``cfg.out``; returns its engine.json. A full disk is a
    ``NoSpace`` error naming the folder; nothing half-written and no lock is left."""
    src, dims, precision = check(cfg)
    backend = builder_module(backends.get(cfg.backend))
    if hasattr(backend, "preflight"):  # a backend's own refusals, before it probes the device
        backend.preflight(src, precision, cfg.refit)
    device = backend.device_info(cfg.device, precision)  # raises when the backend or the GPU cannot do it
    parts = key_parts(cfg, src, dims, precision, device)
    k = cache.key(parts)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else cache.default_dir()
    cache.check_cache(cache_dir)  # a folder that is not pladis's cache is refused before any work
    out = Path(cfg.out)
    t0 = time.perf_counter()
    if folder_kind(out) == "engine" and _key_of(out) == k and not cache.problems(out):
        log.info(f"engine {out} is up to date (cache key {k[:12]}); nothing to do")
        return json.loads((out / cache.ENGINE_FILE).read_text())
    check_output_folder(out, "engine", cfg.force, inputs=(cfg.onnx,))
    check_writable(cache_dir)
    cache.clean_leftovers(cache_dir)
    with no_space(cache_dir), cache.locked(cache_dir, k):
        entry = cache.lookup(cache_dir, k)
        if entry is None:
            built = temp_dir(cache_dir / k)
            try:
                components = backend.build(src, dims, precision, cfg, built)
                _copy_pipeline_files(src.folder, built)
                hashed = {n: {**c, "sha256": sha256(built / c["file"])} for n, c in components.items()}
                meta = {**parts, "key": k, "build_seconds": round(time.perf_counter() - t0, 3),
                        "source_manifest_sha256": sha256(src.folder / MANIFEST_FILE),
                        # where the base weights of a LoRA swap come from (trt / aoti hold no ONNX initializers)
                        "export_folder": str(src.folder.resolve()),
                        "components": hashed, "files": dict(src.manifest.files),
                        "lam": _lam_info(src.manifest)}  # fmt: skip
                meta = sealed(meta)
                write_text(built / cache.ENGINE_FILE, json.dumps(meta, indent=2) + "\n")
                entry = cache.commit(cache_dir, k, built)
            finally:
                shutil.rmtree(built, ignore_errors=True)
            log.info(f"built {cfg.backend} engine in {time.perf_counter() - t0:.1f} s (cache key {k[:12]})")
        else:
            log.info(f"cache hit: reusing {cfg.backend} engine {k[:12]} from {cache_dir}")
    with no_space(out.parent):
        cache.materialize(entry, out)
    log.info(f"engine folder {out} ready in {time.perf_counter() - t0:.2f} s")
    return json.loads((out / cache.ENGINE_FILE).read_text())


def _lam_info(manifest: Manifest) -> dict | None:
    """How the engine takes lam: a runtime input (the graph holds no lam; the key does not depend on it)."""
    pl = manifest.pladis
    return {"runtime_input": pl.lam_input, "default": pl.lam, "range": list(pl.lam_range)} \
        if pl.lam_input else None  # fmt: skip


def _key_of(folder: Path) -> str | None:
    try:
        return json.loads((folder / cache.ENGINE_FILE).read_text()).get("key")
    except (OSError, ValueError, AttributeError):
        return None


def _copy_pipeline_files(src: Path, dst: Path) -> None:
    """What the runtime needs besides the artifacts: the export manifest, tokenizers, scheduler config."""
    shutil.copy2(src / MANIFEST_FILE, dst / MANIFEST_FILE)
    for p in src.iterdir():
        if p.is_dir() and (p.name.startswith("tokenizer") or p.name == "scheduler"):
            shutil.copytree(p, dst / p.name)
