"""pladis.export: PLADIS-patched pipelines to ONNX, one ``PladisAttention`` node per patched layer.

``export(ExportConfig(...))`` writes ``<component>.onnx`` files (text encoders, denoiser, VAE decoder) and
``manifest.json``; ``onnx_op`` holds the node's symbolic and function body; ``contracts`` the per-family
names, dynamic axes, shape ranges and sample inputs; ``validate`` the checks against eager PyTorch.
"""

from pladis.export.exporter import PRECISIONS, ExportConfig, check_config, export

__all__ = ["PRECISIONS", "ExportConfig", "check_config", "export"]
