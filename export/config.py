"""The settings of ``pladis export`` (``ExportConfig``): light, so ``pladis export --help`` needs no torch."""

from __future__ import annotations

from dataclasses import dataclass

from pladis.defaults import DEFAULT_ALPHA, DEFAULT_LAM, DEFAULT_OPSET, MAX_OPSET, MIN_OPSET
from pladis.options import DEFAULT_EXPORT, option


@dataclass
class ExportConfig:
    """Settings of ``pladis export``; the CLI flags are generated from these fields and defaults."""

    model: str = option(
        "tiny-sdxl", "built-in name, local diffusers folder, single-file checkpoint (.safetensors / .ckpt) or hub id"
    )
    out: str = option(DEFAULT_EXPORT, "output folder (written into a temporary sibling, renamed at the end)")
    precision: str = option("fp32", "fp32 | fp16 | bf16 (text encoders always fp32)")
    lam: float = option(DEFAULT_LAM, "PLADIS strength lambda (0 exports the stock model)")
    alpha: float = option(DEFAULT_ALPHA, "entmax alpha: 1.5 (entmax15) or 2 (sparsemax)")
    layers: str = option("default", "which cross-attention layers: default | all")
    height: int = option(0, "image height in pixels at the optimal shape (0: the model's default)")
    width: int = option(0, "image width in pixels at the optimal shape (0: the model's default)")
    batch: int = option(1, "prompts per call at the optimal shape (the denoiser sees twice as many with CFG)")
    static: bool = option(False, "fix every dim at its optimal size instead of exporting dynamic axes")
    opset: int = option(DEFAULT_OPSET, f"ONNX opset ({MIN_OPSET}-{MAX_OPSET})")
    function_body: bool = option(
        True,
        "attach the PladisAttention function bodies ONNX Runtime runs (without them the export is plugin-only: "
        "for TensorRT builds only)",
    )
    validate: bool = option(True, "check the graphs and compare ONNX Runtime with eager PyTorch")
    force: bool = option(False, "replace an existing export folder written by pladis")
    seed: int = option(0, "seed of the random weights of built-in models")
    components: str = option("", "export only these components (comma list, e.g. unet); default: all")
    config: str = option(
        "",
        "single-file checkpoints: a local diffusers folder with the architecture configs "
        "(model_index.json, component configs, tokenizers, scheduler)",
    )
    lora: tuple[str, ...] = option(
        (), "LoRA FILE[:SCALE] fused into the weights before export (scale 1.0 by default)", repeat=True
    )
