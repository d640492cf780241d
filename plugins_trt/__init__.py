"""pladis.plugins_trt: the TensorRT plugin for the ``PladisAttention`` node.

An ahead-of-time plugin of TensorRT's Python plugin API (``tensorrt.plugin``, TensorRT >= 10.9): the node's
kernel is ``pladis_fwd`` (pladis/kernels/attention.py), compiled to PTX for the build GPU by ``aot_impl`` and
embedded in the engine, so running the engine needs neither Python nor this package. The functions live
undecorated in ``plugins_trt/plugin.py``; ``register()`` is what the engine builder calls before parsing a
graph with PladisAttention nodes. TensorRT is imported only inside ``register()``, never by ``import pladis``.
"""

from __future__ import annotations

import types
import typing

from pladis.errors import PladisError

MIN_TENSORRT = (10, 9)  # trtp.aot_impl, KernelLaunchParams, SymInt32
_registered = False


class PluginUnavailable(PladisError):
    """The PladisAttention TensorRT plugin cannot be registered here."""


def _version(text: str) -> tuple[int, int]:
    major, minor = text.split(".")[:2]
    return int(major), int(minor)


def check_environment() -> None:
    """Raise PluginUnavailable saying exactly what is missing: TensorRT, a new enough TensorRT, Triton, a GPU."""
    try:
        import tensorrt
    except ImportError:
        raise PluginUnavailable(
            "TensorRT is not installed: the PladisAttention plugin needs TensorRT >= 10.9 with its Python "
            "bindings (NVIDIA's package index or containers); meanwhile build with --backend ort or --backend aoti"
        ) from None
    if _version(tensorrt.__version__) < MIN_TENSORRT:
        raise PluginUnavailable(
            f"TensorRT {tensorrt.__version__} is too old for the PladisAttention plugin: ahead-of-time Python "
            "plugins (tensorrt.plugin.aot_impl) need TensorRT >= 10.9; upgrade TensorRT"
        )
    try:
        import tensorrt.plugin as trtp
    except ImportError as e:
        raise PluginUnavailable(f"tensorrt.plugin does not import ({e}); reinstall TensorRT >= 10.9") from None
    if not hasattr(trtp, "aot_impl"):
        raise PluginUnavailable(
            f"this TensorRT ({tensorrt.__version__}) has no tensorrt.plugin.aot_impl; the plugin needs >= 10.9"
        )
    from pladis import kernels

    try:
        kernels.check_triton()
    except ValueError as e:
        raise PluginUnavailable(str(e)) from None
    import torch

    if not torch.cuda.is_available():
        raise PluginUnavailable(
            "no CUDA GPU is visible: the PladisAttention plugin compiles its kernel for the GPU the engine is "
            "built on (TensorRT engines are built on the GPU they run on)"
        )


def register() -> None:
    """Register the PladisAttention plugin with TensorRT (call before parsing the ONNX graph); idempotent."""
    global _registered
    if _registered:
        return
    check_environment()
    import tensorrt.plugin as trtp

    from pladis.plugins_trt import plugin

    # already defined in this process (e.g. this package imported under a second name): TensorRT refuses twice
    if hasattr(getattr(trtp.op, plugin.NAMESPACE, None), plugin.NAME):
        _registered = True
        return
    trtp.register(plugin.PLUGIN_ID)(_typed(plugin.register_fn, trtp))
    trtp.autotune(plugin.PLUGIN_ID)(_typed(plugin.autotune_fn, trtp))
    trtp.aot_impl(plugin.PLUGIN_ID)(_typed(plugin.aot_impl_fn, trtp))
    _registered = True


def _typed(fn, trtp) -> types.FunctionType:
    """A copy of ``fn`` whose annotations are evaluated with ``trtp`` = ``tensorrt.plugin``: TensorRT checks the
    annotation objects, and plugin.py keeps them as deferred text so that it imports without TensorRT."""
    hints = typing.get_type_hints(fn, globalns={**fn.__globals__, "trtp": trtp})
    copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__annotations__ = hints
    copy.__doc__, copy.__qualname__, copy.__module__ = fn.__doc__, fn.__qualname__, fn.__module__
    return copy
