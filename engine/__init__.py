"""pladis.engine: engine builds (TensorRT, ONNX Runtime, AOTInductor) and their content-addressed cache.

Planned (issue 5). Nothing is built by this package yet.
"""
