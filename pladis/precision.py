"""The one precision table: a precision's name (fp32, fp16, bf16) and the tensor types that spell it in each
library — torch dtype name, ONNX element type, numpy / ONNX Runtime type — plus the integer types graphs carry.

Light (imports nothing heavy): the torch and numpy types are looked up by name when asked for, so the CLI's
settings can name precisions without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TensorType:
    """One element type as each library names it. ``precision``: the pladis name (fp32 ...) or None for
    integers; ``dtype``: the torch (and manifest) name; ``onnx``: ``onnx.TensorProto`` member; ``numpy``:
    the numpy type name (None: numpy has no such type, e.g. bfloat16); ``typestr``: the array-interface code."""

    precision: str | None
    dtype: str
    onnx: str
    numpy: str | None
    typestr: str | None


TYPES = (
    TensorType("fp32", "float32", "FLOAT", "float32", "<f4"),
    TensorType("fp16", "float16", "FLOAT16", "float16", "<f2"),
    TensorType("bf16", "bfloat16", "BFLOAT16", None, None),
    TensorType(None, "int64", "INT64", "int64", "<i8"),
    TensorType(None, "int32", "INT32", "int32", "<i4"),
)
BY_DTYPE = {t.dtype: t for t in TYPES}
BY_PRECISION = {t.precision: t for t in TYPES if t.precision}
PRECISIONS = tuple(BY_PRECISION)  # ("fp32", "fp16", "bf16")
PRECISION_OF_DTYPE = {t.dtype: t.precision for t in TYPES if t.precision}


def torch_dtype(name: str):
    """The torch dtype of a precision (``fp16``) or a dtype name (``float16``)."""
    import torch

    return getattr(torch, BY_PRECISION[name].dtype if name in BY_PRECISION else BY_DTYPE[name].dtype)


def numpy_type(dtype: str):
    """The numpy type of a dtype name (``float16`` -> ``numpy.float16``); KeyError for bfloat16 (numpy has none)."""
    import numpy as np

    name = BY_DTYPE[dtype].numpy
    if name is None:
        raise KeyError(f"numpy has no {dtype}")
    return getattr(np, name)
