"""pladis.runtime: engines in a diffusers scheduler loop, and step-by-step parity against eager PyTorch.

``Runtime(engine_dir, backend)`` loads an engine folder by its manifest (one backend per component: torch,
ort, aoti, trt, as named in ``pladis.backends``); ``Runtime.generate`` samples images for a ``Request``
(``request``: the one request type and its one check against the engine); ``parity.check``
compares an engine with eager PyTorch teacher-forced and free-running. ``commands`` holds the typed configs
of ``pladis generate`` and ``pladis parity``. The pipeline (torch) is imported on first use of ``Runtime`` or
``SCHEDULERS``, so the configs load without it (``pladis generate --help``).
"""

from pladis.manifest import Engine, EngineError, open_engine
from pladis.runtime.request import SCHEDULERS, Request

__all__ = ["SCHEDULERS", "Engine", "EngineError", "Request", "Runtime", "open_engine"]


def __getattr__(name: str):
    if name == "Runtime":
        from pladis.runtime import pipeline

        return pipeline.Runtime
    raise AttributeError(f"module 'pladis.runtime' has no attribute {name!r}")
