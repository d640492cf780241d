"""pladis.export: PLADIS-patched pipelines to ONNX, one ``PladisAttention`` node per patched layer.

Planned (issue 3): export contracts per model family, the ``PladisAttention`` symbolic with its ONNX
function body, ``manifest.json``, validation. Nothing is exported by this package yet.
"""
