"""``pladis generate`` and ``pladis parity``: typed configs shared by the CLI and the Python API."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pladis import backends
from pladis.errors import SettingError
from pladis.files import atomic_path, check_output_file
from pladis.options import (
    CUDA_GRAPHS_HELP,
    DEFAULT_ENGINE,
    DEFAULT_GRAPH_CACHE_SIZE,
    DEFAULT_PROMPT,
    GRAPH_CACHE_HELP,
    option,
)
from pladis.runtime.request import DEFAULT_STEPS, PARITY_STEPS, request_of

IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}  # by file suffix
LAM_HELP = "PLADIS strength lambda, a runtime input (0 = stock model; default: the export's)"
ENGINE_HELP = "engine folder (pladis build) or export folder (pladis export)"
BACKEND_HELP = f"{' | '.join(backends.NAMES)} for every component; default: as built (ort for an export folder)"
SCHEDULER_HELP = "euler | euler_a | dpmpp_2m | ddim | lcm | flow_euler (SD3/FLUX); default: the engine's"
GUIDANCE_HELP = "CFG scale (FLUX: the embedded guidance); <= 1 turns CFG off; default: per family"


@dataclass
class GenerateConfig:
    """Settings of ``pladis generate``: the engine and output, and the fields of the ``Request`` it makes
    (``request_of``). None: the model's default (guidance per family, the engine's scheduler and size)."""

    engine: str = option(DEFAULT_ENGINE, ENGINE_HELP)
    prompt: str = option(DEFAULT_PROMPT, "text prompt")
    negative_prompt: str | None = option(None, "negative prompt (needs CFG: guidance > 1)")
    steps: int | None = option(None, f"denoising steps (default {DEFAULT_STEPS})")
    guidance: float | None = option(None, GUIDANCE_HELP)
    guidance_rescale: float = option(0.0, "CFG guidance rescale (0 = off)")
    scheduler: str | None = option(None, SCHEDULER_HELP)
    seed: int = option(0, "seed of the initial latents (image i of a batch uses seed + i)")
    batch: int = option(1, "images per prompt")
    lam: float | None = option(None, LAM_HELP)
    height: int | None = option(None, "image height in pixels (default: the engine's optimal size)")
    width: int | None = option(None, "image width in pixels (default: the engine's optimal size)")
    backend: str = option("", BACKEND_HELP)
    component_backends: str = option("", "per-component backends, e.g. vae_decoder=torch,text_encoder=torch")
    device: str = option("cpu", "cpu, or cuda (onnxruntime-gpu, TensorRT)")
    cuda_graphs: bool = option(False, CUDA_GRAPHS_HELP)
    graph_cache_size: int = option(DEFAULT_GRAPH_CACHE_SIZE, GRAPH_CACHE_HELP)
    verify: bool = option(True, "check the sha256 of the engine files before loading")
    out: str = option(
        "out/image.png", "image file to write: .png, .jpg or .webp (-<i> before the suffix when batch > 1)"
    )
    force: bool = option(False, "replace an existing image file")


def parse_component_backends(text: str) -> dict[str, str]:
    """'vae_decoder=torch,unet=ort' -> {'vae_decoder': 'torch', 'unet': 'ort'}."""
    out = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        name, sep, backend = item.partition("=")
        if not sep or not name or not backend:
            raise SettingError(
                "component_backends", f"component backend {item!r} must look like name=backend (e.g. vae_decoder=torch)"
            )
        out[name.strip()] = backend.strip()
    return out


def generate(cfg: GenerateConfig):
    """Generate images with an engine; writes ``cfg.out`` (``-<i>`` before the suffix when batch > 1)."""
    from pladis.runtime.pipeline import Runtime

    out = Path(cfg.out)
    paths = [out] if cfg.batch == 1 else [out.with_stem(f"{out.stem}-{i}") for i in range(cfg.batch)]
    for path in paths:  # before any work: a bad output path loses nothing
        check_output_file(path, tuple(IMAGE_FORMATS), cfg.force)
    rt = Runtime(cfg.engine, cfg.backend or None, parse_component_backends(cfg.component_backends), cfg.device,
                 cfg.verify, cuda_graphs=cfg.cuda_graphs, graph_cache_size=cfg.graph_cache_size)  # fmt: skip
    result = rt.generate(request_of(cfg))
    for image, path in zip(result.images, paths, strict=True):
        with atomic_path(path) as tmp:
            image.save(tmp, format=IMAGE_FORMATS[path.suffix.lower()])
    return result, paths


@dataclass
class ParityConfig:
    """Settings of ``pladis parity``: the engine, the outputs, and the fields of its ``Request``."""

    engine: str = option(DEFAULT_ENGINE, ENGINE_HELP)
    backend: str = option("", BACKEND_HELP)
    prompt: str = option(DEFAULT_PROMPT, "text prompt")
    steps: int = option(PARITY_STEPS, "denoising steps compared")
    lam: float | None = option(None, LAM_HELP + " (the eager reference runs at the same lam)")
    scheduler: str | None = option(None, SCHEDULER_HELP)
    guidance: float | None = option(None, GUIDANCE_HELP)
    seed: int = option(0, "seed of the initial latents")
    height: int | None = option(None, "image height in pixels (default: the engine's optimal size)")
    width: int | None = option(None, "image width in pixels (default: the engine's optimal size)")
    device: str = option("cpu", "cpu, or cuda (onnxruntime-gpu, TensorRT)")
    cuda_graphs: bool = option(False, CUDA_GRAPHS_HELP + " (the engine side; the eager reference never)")
    verify: bool = option(True, "check the sha256 of the engine files before loading")
    json: str = option("", "write the parity report as JSON to this file")
    plot: str = option("", "write a PNG plot of the error per step to this file")
    force: bool = option(False, "replace existing --json / --plot files")
    lora: tuple[str, ...] = option(
        (), "LoRA FILE[:SCALE] swapped onto the engine; the eager reference is rebuilt with the same adapters "
        "(default: those `pladis lora` attached)", repeat=True
    )  # fmt: skip


def parity(cfg: ParityConfig):
    """Run the parity harness; prints the table, then writes the JSON and plot when asked (so a failed write
    loses nothing). Returns the report."""
    from pladis.runtime import parity as harness

    for path, suffixes in ((cfg.json, (".json",)), (cfg.plot, (".png",))):
        if path:
            check_output_file(path, suffixes, cfg.force)
    report = harness.check(cfg.engine, cfg.backend or None, request_of(cfg), device=cfg.device, verify=cfg.verify,
                           loras=cfg.lora or None, cuda_graphs=cfg.cuda_graphs)  # fmt: skip
    print(report.table(), flush=True)
    harness.save(report, cfg.json or None, cfg.plot or None)
    written = [path for path in (cfg.json, cfg.plot) if path]
    if written:  # as generate and lora say what they wrote
        print(f"wrote {', '.join(written)}")
    return report


@dataclass
class LoraConfig:
    """Settings of ``pladis lora``: put LoRAs on a built engine (or export folder) without a re-export."""

    engine: str = option(DEFAULT_ENGINE, ENGINE_HELP)
    lora: tuple[str, ...] = option((), "LoRA FILE[:SCALE] to swap in (scale 1.0 by default); none: the base weights",
                                   repeat=True)  # fmt: skip
    out: str = option("", "engine folder to write: the engine's files (hard links where possible) + loras.json")
    backend: str = option("", "the backend the LoRAs are checked for; default: as built (ort for an export folder)")
    force: bool = option(False, "replace an existing engine/export folder written by pladis")
    verify: bool = option(True, "check the sha256 of the engine files first")


def lora(cfg: LoraConfig) -> dict:
    """Write ``cfg.out``: the engine folder ``cfg.engine`` with ``cfg.lora`` attached (``loras.json``; a
    ``Runtime`` on it swaps them in when it loads). Every check runs first (the output rule, the LoRA files and
    scales, their fit to the engine's model and weight map, the backend's ability to swap), so a refusal writes
    nothing; the folder is written beside ``out`` and renamed at the end. Returns the ``loras.json`` record."""
    import json
    import os
    import shutil

    from pladis.files import check_output_folder, folder_kind, replace_folder, temp_dir, write_text
    from pladis.manifest import open_engine
    from pladis.runtime import backends as runners
    from pladis.runtime import lora as swap

    if not cfg.out:
        raise SettingError("out", "pass --out DIR: the engine folder to write with the LoRAs attached")
    src = Path(cfg.engine)
    kind = folder_kind(src)
    if kind not in ("engine", "export"):
        raise SettingError("engine", f"{src} is not an engine or export folder written by pladis: pass --engine "
                                     "with a folder written by `pladis export` or `pladis build`")  # fmt: skip
    out = check_output_folder(cfg.out, kind, cfg.force, inputs=(src,))
    loras = swap.parse(cfg.lora)
    engine = open_engine(src, verify=cfg.verify)
    adapters = swap.Adapters(engine)
    adapters.check(loras)
    touched = {comp for lo in loras for comp, _ in adapters.layers(lo)}
    for comp in sorted(touched):
        artifact = engine.artifact(comp)
        runners.check_lora(engine, comp, cfg.backend or (artifact.kind if artifact else "ort"))
    tmp = temp_dir(out)
    try:

        def link(a, b):
            try:
                os.link(a, b)  # pladis never writes a file in place: sharing it is safe
            except OSError:
                shutil.copy2(a, b)

        shutil.copytree(src, tmp, copy_function=link, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(swap.LORA_FILE))  # fmt: skip
        record = swap.attached_record(loras)
        if loras:
            write_text(tmp / swap.LORA_FILE, json.dumps(record, indent=2) + "\n")
        replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {**record, "out": str(out)}
