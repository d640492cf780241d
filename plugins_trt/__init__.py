"""pladis.plugins_trt: the TensorRT plugin for the ``PladisAttention`` node.

An ahead-of-time plugin of TensorRT's Python plugin API (``tensorrt.plugin``, TensorRT 10.9 to 11.x): the node's
kernel is ``pladis_fwd`` (pladis/kernels/attention.py), compiled to PTX for the build GPU by ``aot_impl`` and
embedded in the engine, so running the engine needs neither Python nor this package. The functions live
undecorated in ``plugins_trt/plugin.py``; ``register()`` is what the engine builder calls before parsing a
graph with PladisAttention nodes. TensorRT is imported only inside ``register()``, never by ``import pladis``.
"""

from __future__ import annotations

import types
import typing

from pladis.errors import PladisError

# The supported TensorRT range, [SUPPORTED[0], SUPPORTED[1]): 10.9 brought trtp.aot_impl, KernelLaunchParams and
# SymInt32; 12 does not exist yet. pyproject's `gpu` extra and the README state the same range.
SUPPORTED = ((10, 9), (12, 0))
SUPPORTED_TEXT = "TensorRT 10.9 to 11.x"
MIN_TENSORRT = SUPPORTED[0]
# TensorRT's plugin layer before 11.2 converts each ONNX-parsed scalar attribute with float()/int() on a
# one-element NumPy array, which NumPy >= 2.4 refuses (TypeError while the graph is parsed); 11.2 fixed it.
NUMPY_SCALAR_FIX = (11, 2)
NUMPY_REFUSES = (2, 4)
_registered = False


class PluginUnavailable(PladisError):
    """The PladisAttention TensorRT plugin cannot be registered here."""


def _version(text: str) -> tuple[int, int]:
    major, minor = text.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def check_version(tensorrt_version: str, numpy_version: str | None) -> None:
    """Refuse a TensorRT outside ``SUPPORTED`` (naming the range) and the NumPy that TensorRT's plugin layer
    cannot read attributes with (None: not checked); both from version strings only."""
    v = _version(tensorrt_version)
    if not SUPPORTED[0] <= v < SUPPORTED[1]:
        why = "ahead-of-time Python plugins (tensorrt.plugin.aot_impl) need 10.9" if v < SUPPORTED[0] else "not tested"
        raise PluginUnavailable(
            f"TensorRT {tensorrt_version} is outside the supported range, {SUPPORTED_TEXT} ({why}); "
            "install one in range: pip install 'pladis[gpu]' (Jetson: JetPack's TensorRT 10.x)"
        )
    if numpy_version and v < NUMPY_SCALAR_FIX and _version(numpy_version) >= NUMPY_REFUSES:
        raise PluginUnavailable(
            f"TensorRT {tensorrt_version}'s plugin layer reads ONNX attributes in a way NumPy {numpy_version} "
            "refuses (fixed in TensorRT 11.2): pip install 'numpy<2.4', or TensorRT >= 11.2"
        )


def check_environment() -> None:
    """Raise PluginUnavailable saying exactly what is missing: TensorRT, a TensorRT in range, Triton, a GPU."""
    try:
        import tensorrt
    except ImportError:
        raise PluginUnavailable(
            f"TensorRT is not installed: the PladisAttention plugin needs {SUPPORTED_TEXT} with its Python "
            "bindings (pip install 'pladis[gpu]', NVIDIA's package index, or NVIDIA's containers)"
        ) from None
    import numpy

    check_version(tensorrt.__version__, numpy.__version__)
    try:
        import tensorrt.plugin as trtp
    except ImportError as e:
        raise PluginUnavailable(f"tensorrt.plugin does not import ({e}); reinstall {SUPPORTED_TEXT}") from None
    if not hasattr(trtp, "aot_impl"):
        raise PluginUnavailable(
            f"this TensorRT ({tensorrt.__version__}) has no tensorrt.plugin.aot_impl; the plugin needs {SUPPORTED_TEXT}"
        )
    from pladis import kernels

    try:
        kernels.check_triton()
    except PladisError as e:
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
    decorate(trtp)
    _registered = True


def decorate(trtp, lazy: bool = False) -> None:
    """Apply ``trtp.register`` / ``trtp.autotune`` / ``trtp.aot_impl`` (TensorRT's validators run here) to the
    plugin functions; ``lazy``: defer the creator's registration with TensorRT's plugin registry until first use
    (``trtp.register``'s ``lazy_register``)."""
    from pladis.plugins_trt import plugin

    trtp.register(plugin.PLUGIN_ID, lazy_register=lazy)(_typed(plugin.register_fn, trtp))
    trtp.autotune(plugin.PLUGIN_ID)(_typed(plugin.autotune_fn, trtp))
    trtp.aot_impl(plugin.PLUGIN_ID)(_typed(plugin.aot_impl_fn, trtp))


def _typed(fn, trtp) -> types.FunctionType:
    """A copy of ``fn`` whose annotations are evaluated with ``trtp`` = ``tensorrt.plugin``: TensorRT checks the
    annotation objects, and plugin.py keeps them as deferred text so that it imports without TensorRT."""
    hints = typing.get_type_hints(fn, globalns={**fn.__globals__, "trtp": trtp})
    copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__annotations__ = hints
    copy.__doc__, copy.__qualname__, copy.__module__ = fn.__doc__, fn.__qualname__, fn.__module__
    return copy
