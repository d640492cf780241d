"""The weight map of an exported component: which ONNX initializer holds each ``nn.Linear`` weight a LoRA can touch.

The TorchScript exporter renames most weights (``onnx::MatMul_123``, stored transposed for a MatMul), so the map
is found by value: after the export, every initializer's bytes are hashed (one at a time, external data read from
disk), and each linear's weight ``W`` (``(out, in)``, in the exported dtype) is looked up as ``W`` and as
``W.T``. A weight found under no initializer (folded into a constant) or sharing one with another linear (the
exporter de-duplicates equal tensors: swapping one would change both) is a miss, recorded with its reason.

Map entry, per module path (``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``):
``{"initializer": name, "transposed": bool, "dtype": "float32", "shape": [out, in]}``; ``transposed``: the
initializer holds ``W.T`` (shape ``(in, out)``). The ONNX files are not changed: the map is manifest metadata.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import onnx
import torch


def targets(module: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """Every ``nn.Linear`` of ``module`` by its module path: the layers diffusers' LoRA loaders (peft
    ``target_modules``) can address (attention projections, feed-forward, embeddings' linears)."""
    return {name: m for name, m in module.named_modules() if isinstance(m, torch.nn.Linear)}


def _digest(t: torch.Tensor) -> str:
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()


def _initializer_bytes(tensor: onnx.TensorProto, folder: Path) -> bytes | None:
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    if uses_external_data(tensor):
        info = ExternalDataInfo(tensor)
        with open(folder / info.location, "rb") as f:
            f.seek(info.offset or 0)
            return f.read(info.length) if info.length else f.read()
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return None  # typed fields (float_data ...): the exporter writes raw_data for weights


def build(module: torch.nn.Module, path: Path) -> tuple[dict, dict]:
    """(map, misses) for the component ``module`` exported to ``path`` (its external data beside it).
    ``misses``: module path -> why its weight has no initializer of its own."""
    model = onnx.load(str(path), load_external_data=False)
    by_key: dict[tuple, list[str]] = {}
    for tensor in model.graph.initializer:
        if len(tensor.dims) != 2:
            continue
        payload = _initializer_bytes(tensor, path.parent)
        if payload is not None:
            by_key.setdefault((tuple(tensor.dims), hashlib.sha256(payload).hexdigest()), []).append(tensor.name)
    found: dict[str, dict] = {}
    misses: dict[str, str] = {}
    for name, layer in targets(module).items():
        w = layer.weight
        out_f, in_f = w.shape
        hits = [(n, False) for n in by_key.get(((out_f, in_f), _digest(w)), [])]
        hits += [(n, True) for n in by_key.get(((in_f, out_f), _digest(w.t())), [])]
        if not hits:
            misses[name] = "no initializer holds its weight (folded into another constant, or not in the graph)"
            continue
        init, transposed = hits[0]
        found[name] = {"initializer": init, "transposed": transposed, "dtype": str(w.dtype).removeprefix("torch."),
                       "shape": [out_f, in_f]}  # fmt: skip
    users: dict[str, list[str]] = {}
    for name, entry in found.items():
        users.setdefault(entry["initializer"], []).append(name)
    for init, names in users.items():
        if len(names) > 1:  # equal weights were de-duplicated into one initializer
            for name in names:
                del found[name]
                misses[name] = f"shares initializer {init} with {', '.join(n for n in names if n != name)}"
    return found, misses
