"""Typed command settings: one dataclass per command, each field with its default and help in one place.

The CLI builds every ``--flag`` from these fields (``pladis/cli.py``) and the Python API takes the same
dataclasses, so a default or a help text is written once. This module imports nothing heavy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pladis.defaults import DEFAULT_ALPHA, DEFAULT_LAM


def option(default, help: str, *, repeat: bool = False, positional: bool = False):
    """A dataclass field with CLI help text; ``repeat``: the flag may be given several times (a tuple);
    ``positional``: an optional positional argument instead of a flag."""
    if repeat:
        return dataclasses.field(default_factory=lambda: tuple(default), metadata={"help": help, "repeat": True})
    return dataclasses.field(default=default, metadata={"help": help, "positional": positional})


CUDA_GRAPHS_HELP = (
    "replay the denoiser from CUDA graphs, captured once per input shapes after warm-up (device cuda; "
    "torch, aoti, trt, ort); a capture that fails runs eagerly with a warning"
)
GRAPH_CACHE_HELP = "CUDA graphs held at most (one per image size and batch in use), least recently used dropped"
DEFAULT_GRAPH_CACHE_SIZE = 4  # pladis.runtime.graphs.DEFAULT_SIZE reads it

DEFAULT_PROMPT = "a photo of a red cube on a wooden table"
# The default folders, one each for every command and the Makefile (`make engine` with its defaults writes
# DEFAULT_ENGINE from DEFAULT_EXPORT): `pladis export` writes an export, `pladis build` an engine from it, and
# `generate`, `parity` and `serve` read the engine.
DEFAULT_EXPORT = "build/tiny-sdxl-onnx-fp32"
DEFAULT_ENGINE = "build/tiny-sdxl-ort-fp32"


@dataclass
class LayersConfig:
    """Settings of ``pladis layers``."""

    model: str = option("sdxl", "built-in name, diffusers folder or hub id")
    layers: str = option("default", "default (the official choice: U-Net down + up blocks) | all")
    lam: float = option(DEFAULT_LAM, "PLADIS strength lambda (0 = stock attention)")
    alpha: float = option(DEFAULT_ALPHA, "entmax alpha in (1, 2] (1.5 = entmax15, 2 = sparsemax)")
