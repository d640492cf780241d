"""pladis.engine: engine builds (ONNX Runtime, AOTInductor, TensorRT) and their content-addressed cache.

``build(BuildConfig(onnx=..., backend=..., out=...))`` turns an export folder into an engine folder the
runtime opens; one module per backend (``ort``, ``aoti``, ``trt``) and ``cache``.
"""

from pladis.engine.build import BACKENDS, BuildConfig, build, check, key_parts

__all__ = ["BACKENDS", "BuildConfig", "build", "check", "key_parts"]
