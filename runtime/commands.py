"""``pladis generate`` and ``pladis parity``: typed configs shared by the CLI and the Python API."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pladis.files import atomic_path


@dataclass
class GenerateConfig:
    """Settings of ``pladis generate``. None: the model's default (steps 20, guidance per family, the
    engine's scheduler and image size)."""

    engine: str = "build/tiny-sdxl"
    prompt: str = "a photo of a red cube on a wooden table"
    negative_prompt: str | None = None
    steps: int | None = None
    guidance: float | None = None
    guidance_rescale: float = 0.0
    scheduler: str | None = None
    seed: int = 0
    batch: int = 1
    height: int | None = None
    width: int | None = None
    backend: str = ""  # "": each component as built (engine folder) or ort (export folder)
    component_backends: str = ""  # e.g. "vae_decoder=torch,text_encoder=torch"
    device: str = "cpu"
    verify: bool = True
    out: str = "out/image.png"


def parse_component_backends(text: str) -> dict[str, str]:
    """'vae_decoder=torch,unet=ort' -> {'vae_decoder': 'torch', 'unet': 'ort'}."""
    out = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        name, sep, backend = item.partition("=")
        if not sep or not name or not backend:
            raise ValueError(f"component backend {item!r} must look like name=backend (e.g. vae_decoder=torch)")
        out[name.strip()] = backend.strip()
    return out


def generate(cfg: GenerateConfig):
    """Generate images with an engine; writes ``cfg.out`` (``-<i>`` before the suffix when batch > 1)."""
    from pladis.runtime.pipeline import Runtime

    rt = Runtime(cfg.engine, cfg.backend or None, parse_component_backends(cfg.component_backends), cfg.device,
                 cfg.verify)  # fmt: skip
    result = rt.generate(cfg.prompt, negative_prompt=cfg.negative_prompt, steps=cfg.steps, guidance=cfg.guidance,
                         guidance_rescale=cfg.guidance_rescale, scheduler=cfg.scheduler, seed=cfg.seed,
                         batch=cfg.batch, height=cfg.height, width=cfg.width)  # fmt: skip
    out = Path(cfg.out)
    paths = [out] if len(result.images) == 1 else [out.with_stem(f"{out.stem}-{i}") for i in range(len(result.images))]
    for image, path in zip(result.images, paths, strict=True):
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG")
    return result, paths


@dataclass
class ParityConfig:
    """Settings of ``pladis parity``."""

    engine: str = "build/tiny-sdxl"
    backend: str = ""  # "": each component as built (engine folder) or ort (export folder)
    prompt: str = "a photo of a red cube on a wooden table"
    steps: int = 4
    scheduler: str | None = None
    guidance: float | None = None
    seed: int = 0
    height: int | None = None
    width: int | None = None
    device: str = "cpu"
    verify: bool = True
    json: str = ""
    plot: str = ""


def parity(cfg: ParityConfig):
    """Run the parity harness; writes the JSON and plot when asked. Returns the report."""
    from pladis.runtime import parity as harness

    report = harness.run(cfg.engine, cfg.backend or None, prompt=cfg.prompt, steps=cfg.steps, scheduler=cfg.scheduler,
                         guidance=cfg.guidance, seed=cfg.seed, height=cfg.height, width=cfg.width,
                         device=cfg.device, verify=cfg.verify)  # fmt: skip
    harness.save(report, cfg.json or None, cfg.plot or None)
    return report
