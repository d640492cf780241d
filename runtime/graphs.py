"""CUDA-graph replay of a component's call: a bounded cache of captured graphs, one per (component, inputs).

``GraphCache.run(component, fn, inputs)`` calls ``fn(inputs) -> {name: tensor}`` eagerly for the first
``warmup`` calls on inputs of one key (the component, and each input's name, shape, dtype and device), then
captures it once: the inputs are copied into static buffers owned by the cache, ``capture(call)`` records
``call`` (``fn`` on those buffers) and returns ``(replay, outputs)``; every later call on that key copies the
new inputs into the static buffers, calls ``replay()`` and returns the static output tensors (overwritten by
the next replay of that key: copy what you keep). Any value that reaches the component as a tensor input (the
timestep, PLADIS's lam) is part of the copied inputs, so one graph serves every timestep and every lam.

A new shape, dtype or device is a new key (a new capture; nothing already captured is invalidated). At most
``size`` graphs are held; capturing one more drops the least recently used (its memory pool goes with it).
A capture that raises is logged once as a warning, its key remembered, and that key runs eagerly from then on
(never retried every step, never a wrong result: the outputs then are ``fn``'s own).

``cuda_capture`` is the capture function of a CUDA device (``torch.cuda.CUDAGraph`` on a side stream, the
way PyTorch documents it). The capture is injectable so the cache's own logic (keys, bounds, eviction,
fallback) runs without CUDA: on a machine without a GPU ``cuda_capture`` itself raises, which is the fallback
path; tests also pass a capture function that records its calls and returns a replay that simply calls the
eager function again on the static buffers (that is not a CUDA graph, and the tests say so).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pladis.errors import SettingError, error_line
from pladis.options import DEFAULT_GRAPH_CACHE_SIZE

log = logging.getLogger(__name__)

Tensors = dict[str, torch.Tensor]
Call = Callable[[], Tensors]  # the component called on the static input buffers
Capture = Callable[[Call], tuple[Callable[[], object], Tensors]]  # call -> (replay, static outputs)
DEFAULT_SIZE = DEFAULT_GRAPH_CACHE_SIZE  # graphs held: one per image size and batch in use, each with its memory pool
DEFAULT_WARMUP = 1  # eager calls per key before the capture (first-call compilation, allocator warm-up)


def cuda_capture(call: Call) -> tuple[Callable[[], object], Tensors]:
    """``call`` captured in a ``torch.cuda.CUDAGraph``: (``graph.replay``, the outputs the capture allocated).

    The work already queued is finished first (``torch.cuda.synchronize``) and the capture runs on a side
    stream (``torch.cuda.graph``'s own). Raises whatever CUDA or the call raises during capture (a host sync
    inside the call, a CPU tensor, no GPU at all), which ``GraphCache`` turns into the eager fallback."""
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        outputs = call()
    return graph.replay, outputs


def key_of(component: str, inputs: Tensors) -> tuple:
    """(component, ((name, shape, dtype, device), ...) sorted by name): what one graph is captured for."""
    return (component, tuple((n, tuple(t.shape), str(t.dtype), str(t.device)) for n, t in sorted(inputs.items())))


@dataclass
class Graph:
    """One captured call: the static input buffers it reads, its replay, the static outputs it writes."""

    inputs: Tensors
    replay: Callable[[], object]
    outputs: Tensors


class GraphCache:
    """Captured calls per (component, input shapes/dtypes/devices), at most ``size``, least recently used
    dropped first; see the module docstring. ``captures`` counts captures that succeeded, ``failed`` holds
    the keys whose capture raised (with the one-line reason), which run eagerly."""

    def __init__(self, capture: Capture = cuda_capture, size: int = DEFAULT_SIZE, warmup: int = DEFAULT_WARMUP):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise SettingError("graph_cache_size", f"graph_cache_size must be a whole number >= 1 (graphs held); "
                                                   f"got {size!r}")  # fmt: skip
        if warmup < 0:
            raise SettingError("graph_warmup", f"graph_warmup must be 0 or more eager calls; got {warmup!r}")
        self.capture, self.size, self.warmup = capture, size, warmup
        self.graphs: OrderedDict[tuple, Graph] = OrderedDict()
        self.failed: dict[tuple, str] = {}
        self.captures = 0
        self._eager_calls: dict[tuple, int] = {}  # key -> eager calls so far (warm-up), until captured

    def __contains__(self, key: tuple) -> bool:
        return key in self.graphs

    def drop(self, component: str) -> None:
        """Forget every graph of ``component`` (its weights changed: a graph replays the memory it captured)."""
        for key in [k for k in self.graphs if k[0] == component]:
            del self.graphs[key]
        self._eager_calls = {k: n for k, n in self._eager_calls.items() if k[0] != component}

    def settled(self, component: str, inputs: Tensors) -> bool:
        """Whether calls on these inputs replay a graph or run eagerly for good (a capture failed)."""
        key = key_of(component, inputs)
        return key in self.graphs or key in self.failed

    def run(self, component: str, fn: Callable[[Tensors], Tensors], inputs: Tensors) -> Tensors:
        """``fn(inputs)``: eagerly while warming up or after a failed capture, else the graph's replay (the
        returned tensors are then the graph's static outputs)."""
        key = key_of(component, inputs)
        graph = self.graphs.get(key)
        if graph is None:
            if key in self.failed:
                return fn(inputs)
            done = self._eager_calls.get(key, 0)
            if done < self.warmup:
                self._eager_calls[key] = done + 1
                return fn(inputs)
            graph = self._capture(key, fn, inputs)
            if graph is None:
                return fn(inputs)
        else:
            self.graphs.move_to_end(key)
        for name, buffer in graph.inputs.items():
            buffer.copy_(inputs[name])
        graph.replay()
        return graph.outputs

    def _capture(self, key: tuple, fn, inputs: Tensors) -> Graph | None:
        self._eager_calls.pop(key, None)
        static = {n: t.detach().clone() for n, t in inputs.items()}
        try:
            replay, outputs = self.capture(lambda: fn(static))
        except Exception as err:  # noqa: BLE001 - any capture failure means: run this key eagerly
            reason = error_line(err)
            self.failed[key] = reason
            log.warning("CUDA graph capture of %s failed (%s); running it eagerly", key[0], reason)
            return None
        graph = Graph(static, replay, dict(outputs))
        self.graphs[key] = graph
        self.captures += 1
        while len(self.graphs) > self.size:
            dropped, _ = self.graphs.popitem(last=False)
            log.debug("CUDA graph cache full (%d): dropped %s", self.size, dropped)
        return graph
