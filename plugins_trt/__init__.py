"""pladis.plugins_trt: the TensorRT plugin for the ``PladisAttention`` node.

Planned (issue 6). TensorRT is imported only inside this package, never by ``import pladis``.
"""
