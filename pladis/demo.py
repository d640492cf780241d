"""The demo (``make demo``): the whole path on a built-in model, offline, on a CPU.

export with PLADIS once → ONNX Runtime → one image at lam = 0 (the stock model) and one at ``lam`` from the
same engine and seed (lam is a runtime input) → parity of the engine against eager PyTorch. Writes into
``OUT``: ``engine/`` (the export), ``comparison.png`` (stock | PLADIS | their difference), ``parity.json``,
``parity.png``, ``report.md``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pladis.defaults import DEFAULT_ALPHA, DEFAULT_LAM
from pladis.errors import SettingError
from pladis.files import atomic_path, check_output_folder, write_text
from pladis.options import DEFAULT_PROMPT, option


@dataclass
class DemoConfig:
    """Settings of ``pladis demo``; the CLI flags are generated from these fields and defaults."""

    model: str = option("tiny-sdxl", "built-in model to run (tiny-sdxl, tiny-sd15, tiny-pixart, tiny-sd3, tiny-flux)")
    prompt: str = option(DEFAULT_PROMPT, "text prompt")
    steps: int = option(4, "denoising steps")
    lam: float = option(DEFAULT_LAM, "PLADIS strength lambda (0 = stock attention, useful range 1-3)")
    alpha: float = option(DEFAULT_ALPHA, "entmax alpha: 1.5 (entmax15) or 2 (sparsemax)")
    layers: str = option("default", "which cross-attention layers: default | all")
    seed: int = option(0, "random seed of the initial latents and the random weights")
    backend: str = option("ort", "engine backend for the run: ort | torch")
    out: str = option(
        "out/demo", "output folder: report.md, comparison.png, parity.json, parity.png and the export engine/"
    )


def demo(cfg: DemoConfig) -> tuple[str, bool]:
    """Run the demo; returns (markdown report, whether parity passed). The report is also written."""
    import numpy as np

    from pladis import models, numerics, ops
    from pladis.export import ExportConfig, export
    from pladis.runtime import Runtime, parity

    if cfg.model not in models.BUILTINS:
        raise SettingError("model", f"demo model must be a built-in ({', '.join(models.BUILTINS)}); got {cfg.model!r}")
    if cfg.steps < 1:
        raise SettingError("steps", f"steps must be at least 1; got {cfg.steps}")
    numerics.check_lam(cfg.lam)
    ops.check_params(cfg.lam, cfg.alpha)
    # the demo's own folder (demo.json marks it) is reused run after run; any other non-empty folder is refused
    out = check_output_folder(cfg.out, "demo", force=True)
    write_text(out / "demo.json", json.dumps({"format": "pladis-demo/1", "model": cfg.model}) + "\n")
    engine = out / "engine"
    export(ExportConfig(model=cfg.model, out=str(engine), lam=cfg.lam or ops.DEFAULT_LAM, alpha=cfg.alpha,
                        layers=cfg.layers, seed=cfg.seed, force=True))  # fmt: skip
    rt = Runtime(engine, cfg.backend)
    results = {label: rt.generate(cfg.prompt, steps=cfg.steps, seed=cfg.seed, lam=lam)
               for label, lam in (("stock (lam=0)", 0.0), (f"PLADIS (lam={cfg.lam:g})", cfg.lam))}  # fmt: skip
    stock, pladis_img = (np.asarray(r.images[0], np.float64) / 255 for r in results.values())
    diff = np.abs(stock - pladis_img)
    _save_side_by_side(out / "comparison.png", [stock, pladis_img, diff.mean(-1, keepdims=True).repeat(3, -1)
                                                / max(diff.max(), 1e-12)],
                       [*results, "|difference|, scaled"])  # fmt: skip
    report = parity.check(engine, cfg.backend, prompt=cfg.prompt, steps=cfg.steps, seed=cfg.seed, lam=cfg.lam)
    parity.save(report, out / "parity.json", out / "parity.png")
    text = "\n".join([
        f"# PLADIS demo: {cfg.model}, {cfg.steps} steps, seed {cfg.seed}, {cfg.backend} engine",
        "",
        f"Prompt: {cfg.prompt!r}. Random weights: the images show the mechanics, not quality.",
        "",
        f"One export, `{engine}` (alpha={cfg.alpha}); lam is a runtime input: both images come from it.",
        "",
        "| run | encode | steps | decode | total |", "| --- | --- | --- | --- | --- |",
        *[f"| {label} | {r.summary()} |" for label, r in results.items()],  # summary(): 4 cells, " | " between
        "",
        f"Image change from PLADIS (pixels in [0, 1]): mean {diff.mean():.4f}, max {diff.max():.4f}.",
        "",
        "![stock | PLADIS | difference, scaled to its max](comparison.png)",
        "",
        report.table(),
        "",
        "![error per step](parity.png)",
    ])  # fmt: skip
    write_text(out / "report.md", text + "\n")
    return text, report.ok


CAPTION = 16  # pixels of white band above the panels for their labels


def _save_side_by_side(path: Path, images: list, labels: list[str], zoom: int = 8) -> None:
    """Save HxWx3 float numpy images in [0, 1] next to each other, enlarged ``zoom`` times (nearest), each
    under its label (a white band of ``CAPTION`` pixels on top)."""
    import numpy as np
    from PIL import Image, ImageDraw

    tiles = [np.kron((img * 255).round().astype(np.uint8), np.ones((zoom, zoom, 1), np.uint8)) for img in images]
    gap = np.full((tiles[0].shape[0], 8, 3), 255, np.uint8)
    row = np.concatenate([t for tile in tiles for t in (tile, gap)][:-1], axis=1)
    canvas = Image.new("RGB", (row.shape[1], row.shape[0] + CAPTION), "white")
    canvas.paste(Image.fromarray(row), (0, CAPTION))
    draw = ImageDraw.Draw(canvas)
    for i, label in enumerate(labels):
        draw.text((i * (tiles[0].shape[1] + gap.shape[1]) + 2, 2), label, fill="black")
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
