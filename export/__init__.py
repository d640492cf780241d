"""pladis.export: PLADIS-patched pipelines to ONNX, one ``PladisAttention`` node per patched layer.

``export(ExportConfig(...))`` writes ``<component>.onnx`` files (text encoders, denoiser, VAE decoder) and
``manifest.json``; ``config`` holds the settings (light: no torch); ``onnx_op`` the node's symbolic and function
body; ``contracts`` the per-family names, dynamic axes, shape ranges and sample inputs; ``validate`` the checks
against eager PyTorch. The exporter (torch, onnx) is imported on first use of ``export`` or ``check_config``.
"""

from pladis.export.config import ExportConfig

__all__ = ["ExportConfig", "check_config", "export"]


def __getattr__(name: str):
    if name in ("export", "check_config"):
        from pladis.export import exporter

        return getattr(exporter, name)
    raise AttributeError(f"module 'pladis.export' has no attribute {name!r}")
