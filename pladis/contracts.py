"""The export contract's vocabulary: a ``Component`` (one exported file) and its ``Port``s (graph inputs and outputs).

Ground floor: the family records write their denoiser's contract in these words and the export stage reads them
(``pladis.export.contracts`` derives dims, samples and dynamic axes from them). Imports no stage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

FLOAT = "float"  # the export precision's float type


@dataclass(frozen=True)
class Port:
    """One graph input or output (a port of a component; not a tensor). shape: ints are static, strings name a
    dim; dtype: FLOAT or a torch dtype."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str = FLOAT
    sample: str = "normal"  # how sample values are drawn: normal | ids | timestep | mask | positions | guidance


@dataclass
class Component:
    """One exported file: ``forward(module, **inputs)`` returns the outputs in ``outputs`` order."""

    name: str
    module: nn.Module
    inputs: list[Port]
    outputs: list[Port]
    forward: Callable[..., tuple]
    denoiser: bool = False
    extras: dict = field(default_factory=dict)  # per-input sampling parameters (vocab size, timestep scale)
