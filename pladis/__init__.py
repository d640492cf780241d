"""pladis: PLADIS-enhanced diffusion models, from eager PyTorch to deployed engines.

The core is four modules: ``pladis.ops`` (the operator and its custom op), ``pladis.families`` (one record
per supported model family, a module each), ``pladis.patch`` (diffusers processors, ``apply``/``remove``) and
``pladis.models`` (built-in random-weight models, ``load``).
``import pladis`` is cheap: torch loads on first use of a public name (``pladis.attention``, ...), diffusers,
ONNX and TensorRT when a stage needs them.
"""

import importlib

__version__ = "0.1.0"
_PUBLIC = {
    "attention": "pladis.ops", "entmax": "pladis.ops", "joint_attention": "pladis.ops",
    "PatchReport": "pladis.patch", "apply": "pladis.patch", "remove": "pladis.patch",
    "supported_models": "pladis.patch", "using_lam": "pladis.patch",
    "scale": "pladis.patch",  # deprecated alias of using_lam
}  # fmt: skip
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pladis' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_PUBLIC])
