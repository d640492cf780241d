"""pladis.plugins_trt: the TensorRT plugin for the ``PladisAttention`` node.

The plugin (``tensorrt.plugin`` register / autotune / aot_impl / impl on the fused Triton kernel) is the
kernel/plugin issue's work and does not exist yet. ``register()`` is what the engine builder calls before
parsing a graph with PladisAttention nodes; until the plugin exists it says so instead of letting the
parser fail on an unknown op. TensorRT is imported only inside this package, never by ``import pladis``.
"""

from pladis.errors import PladisError


class PluginUnavailable(PladisError):
    """The PladisAttention TensorRT plugin cannot be registered here."""


def register() -> None:
    """Register the PladisAttention plugin with TensorRT (call before parsing the ONNX graph)."""
    raise PluginUnavailable(
        "the PladisAttention TensorRT plugin is not implemented yet (kernel/plugin issue): components with "
        "PLADIS layers cannot be built with --backend trt; build them with --backend ort or --backend aoti"
    )
