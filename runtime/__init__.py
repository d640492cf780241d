"""pladis.runtime: engines in a diffusers scheduler loop, and step-by-step parity against eager PyTorch.

``Runtime(engine_dir, backend)`` loads an engine folder by its manifest (one backend per component: torch,
ort, aoti, trt, as named in ``pladis.backends``); ``Runtime.generate`` samples images for a ``Request``
(``request``: the one request type and its one check against the engine); ``parity.check``
compares an engine with eager PyTorch teacher-forced and free-running. ``commands`` holds the typed configs
of ``pladis generate`` and ``pladis parity``.
"""

from pladis.manifest import Engine, EngineError, open_engine
from pladis.runtime.pipeline import SCHEDULERS, Runtime
from pladis.runtime.request import Request

__all__ = ["SCHEDULERS", "Engine", "EngineError", "Request", "Runtime", "open_engine"]
