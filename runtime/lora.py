"""LoRAs on a built engine, without a re-export: the fused weights ``W0 + Σ scale·B·A`` for each linear they touch.

``parse(loras)`` reads what a caller names (``"FILE[:SCALE]"``, ``(FILE, SCALE)`` or ``pladis.lora.Lora``) into
a tuple of ``Lora`` (scales finite, files there). ``Adapters(engine)`` holds one engine's LoRA side:

- ``check(loras)``: before any work, refuses (``LoraError``, one line) a family without a diffusers LoRA loader, a
  LoRA whose keys do not fit the model (``pladis.lora.check``, the export's own check), and a LoRA layer the
  engine's weight map (the manifest's ``weights``, written at export) does not hold, naming the first ones.
- ``fused(loras)``: {component: {module path: fused weight ``(out, in)``}}, in the component's dtype. ``W0`` is
  the engine's own base weight, read from the ONNX initializer the weight map names (never a weight that
  already carries a LoRA); each adapter's delta is peft's ``get_delta_weight`` for the adapter loaded by
  diffusers' own loader (every file format it reads, kohya included) into a weightless skeleton of the model
  (``pladis.provenance.skeleton``), added in the order given, in float32, as diffusers' ``fuse_lora`` does.

The backends take the fused weights (``set_lora_weights``): ONNX Runtime as initializers overridden at session
creation, torch as the module's parameters for each run, AOTInductor as the package's constants, TensorRT through
its refitter. An empty LoRA list hands them ``None``: the base weights, bitwise.

Loaded adapters are kept per file (path, size, mtime), so changing scales or sets costs no file read.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import torch

from pladis.errors import PladisError
from pladis.lora import Lora, LoraError, check_scale, parse_lora
from pladis.manifest import Engine

LORA_FILE = "loras.json"  # written by `pladis lora` beside an engine's files; applied when a Runtime opens it
LORA_FORMAT = "pladis-loras/1"


def parse(loras) -> tuple[Lora, ...]:
    """``loras`` (None, or items ``"FILE[:SCALE]"``, ``(FILE, SCALE)``, ``Lora``) -> checked ``Lora``s."""
    out = []
    for item in loras or ():
        if isinstance(item, Lora):
            item = (item.path, item.scale)
        if isinstance(item, tuple | list):
            path, scale = item
            try:
                scale = float(scale)
            except (TypeError, ValueError):
                raise LoraError(f"LoRA {path}: scale {scale!r} is not a number") from None
            check_scale(str(path), scale)
            lora = parse_lora(str(path))
            out.append(Lora(lora.path, scale))
        else:
            out.append(parse_lora(str(item)))
    return tuple(out)


def read_attached(folder: Path) -> tuple[Lora, ...]:
    """The LoRAs ``pladis lora`` attached to the engine folder ``folder`` (none without a ``loras.json``)."""
    path = Path(folder) / LORA_FILE
    if not path.is_file():
        return ()
    from pladis.files import sha256

    try:
        data = json.loads(path.read_text())
        items = [(x["path"], x["scale"], x["sha256"]) for x in data["loras"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise PladisError(f"{path} is not a pladis LoRA list ({type(err).__name__}: {err}); rewrite it with "
                          "pladis lora") from None  # fmt: skip
    loras = parse([(p, scale) for p, scale, _ in items])
    for lora, (_, _, digest) in zip(loras, items, strict=True):
        if sha256(lora.path) != digest:
            raise LoraError(f"LoRA {lora.path} changed since pladis lora attached it to {folder} (sha256 differs); "
                            "restore it, or run pladis lora again")  # fmt: skip
    return loras


def attached_record(loras: tuple[Lora, ...]) -> dict:
    """The ``loras.json`` of ``loras``: absolute paths, scales, each file's sha256 (to see it changed)."""
    from pladis.files import sha256

    return {"format": LORA_FORMAT, "loras": [{"path": str(x.path), "file": x.path.name, "scale": x.scale,
                                              "sha256": sha256(x.path)} for x in loras]}  # fmt: skip


def _file_key(lora: Lora) -> tuple:
    st = lora.path.stat()
    return (str(lora.path), st.st_size, st.st_mtime_ns)


class Adapters:
    """One engine's LoRAs: checks, the loaded adapters (per file), its base weights and the fused weights."""

    def __init__(self, engine: Engine):
        self.engine = engine
        data = engine.manifest.data["components"]
        self.maps = {n: dict(c.get("weights", {})) for n, c in data.items() if c.get("role") != "vae_decoder"}
        self.missing = {n: dict(c.get("weights_missing", {})) for n, c in data.items()}
        self.pipeline_class = engine.manifest.model.get("pipeline_class")
        self._pipe = None
        self._adapters: dict[tuple, tuple[str, dict]] = {}  # file key -> (adapter name, {(comp, path): layer})
        self._base: dict[str, dict[str, torch.Tensor]] = {}  # component -> module path -> W0 (out, in)
        self._lock = threading.RLock()  # the server checks requests while its worker swaps (peft scales are state)

    # -- checks ---------------------------------------------------------------------------------

    def check(self, loras: tuple[Lora, ...]) -> None:
        """Refuse, before any weight changes, what cannot be swapped in (see the module docstring)."""
        if not loras:
            return
        with self._lock:
            self._check(loras)

    def _check(self, loras: tuple[Lora, ...]) -> None:
        from pladis import lora as lora_unit

        if not lora_unit.has_loader(self.pipeline_class):
            with_lora = [n for n in lora_unit.PIPELINES if lora_unit.has_loader(n)]
            raise LoraError(f"{self.engine.manifest.model.get('source', '?')} is a {self.pipeline_class}, which has "
                            f"no LoRA loader in diffusers; LoRAs work with {', '.join(with_lora)}")  # fmt: skip
        pipe = self.skeleton()
        lora_unit.check(loras, self.engine.manifest.model.get("source", "?"), self.pipeline_class,
                        lambda n: getattr(pipe, n, None))  # fmt: skip
        for lora in loras:
            layers = self.layers(lora)
            bf16 = sorted({c for c, _ in layers if c in self.maps and self.engine.component(c).dtype == "bfloat16"})
            if bf16:
                raise LoraError(f"LoRA {lora.path.name}: {', '.join(bf16)} of this engine is bfloat16, which LoRA "
                                "swapping does not write (NumPy has no bfloat16); fuse it at export instead: pladis "
                                f"export --lora {lora.path}")  # fmt: skip
            unmatched = [(c, p) for c, p in layers if p not in self.maps.get(c, {})]
            if unmatched:
                c, p = unmatched[0]
                why = self.missing.get(c, {}).get(p) or (
                    f"the engine has no component {c}" if c not in self.maps else "it is not an nn.Linear"
                )
                first = ", ".join(f"{c}.{p}" for c, p in unmatched[:3])
                raise LoraError(f"LoRA {lora.path.name}: {len(unmatched)} of its layers are not in this engine's "
                                f"weight map (first: {first}; {c}.{p}: {why}); fuse it at export instead: pladis "
                                f"export --lora {lora.path}")  # fmt: skip

    # -- adapters and base weights ---------------------------------------------------------------

    def skeleton(self):
        if self._pipe is None:
            from pladis.provenance import skeleton

            self._pipe = skeleton(dict(self.engine.manifest.model))
        return self._pipe

    def layers(self, lora: Lora) -> dict:
        """{(component, module path): peft layer} of ``lora``, loaded once per file into the skeleton."""
        key = _file_key(lora)
        if key not in self._adapters:
            from pladis import lora as lora_unit

            name = f"pladis_swap_{len(self._adapters)}"
            self._adapters[key] = (name, lora_unit.load_adapter(self.skeleton(), lora, name))
        return self._adapters[key][1]

    def base(self, component: str, path: str) -> torch.Tensor:
        """``W0`` ``(out, in)`` of ``component``'s linear ``path``: the engine's own ONNX initializer, read once."""
        held = self._base.setdefault(component, {})
        if path not in held:
            entry = self.maps[component][path]
            array = base_initializers(self.engine, component, [entry["initializer"]])[entry["initializer"]]
            w = torch.from_numpy(array.copy())
            held[path] = (w.t() if entry["transposed"] else w).contiguous()
        return held[path]

    # -- fused weights ---------------------------------------------------------------------------

    def fused(self, loras: tuple[Lora, ...]) -> dict[str, dict[str, torch.Tensor]]:
        """{component: {module path: W0 + Σ scale·delta}} for every linear ``loras`` touch (``check`` first)."""
        with self._lock:
            return self._fused(loras)

    def _fused(self, loras: tuple[Lora, ...]) -> dict[str, dict[str, torch.Tensor]]:
        from pladis import lora as lora_unit

        self._check(loras)
        out: dict[str, dict[str, torch.Tensor]] = {}
        for lora in loras:
            name, layers = self._adapters[_file_key(lora)]
            for (comp, path), layer in layers.items():
                held = out.setdefault(comp, {})
                if path not in held:
                    held[path] = self.base(comp, path).to(torch.float32, copy=True)
                held[path] += lora_unit.delta(layer, name, lora.scale).to(torch.float32)
        for comp, held in out.items():
            dtype = getattr(torch, self.engine.component(comp).dtype)
            for path in held:
                held[path] = held[path].to(dtype)
        return out


def initializer_layout(fused: dict[str, torch.Tensor], weight_map: dict) -> dict[str, np.ndarray]:
    """{initializer name: array} of fused weights ``(out, in)`` by module path, in the layout each initializer
    stores (transposed where the map says so), contiguous; bfloat16 as its 16-bit pattern is not supported."""
    out = {}
    for path, w in fused.items():
        entry = weight_map[path]
        w = w.t() if entry["transposed"] else w
        out[entry["initializer"]] = np.ascontiguousarray(w.contiguous().numpy())
    return out


def base_file(engine: Engine, component: str) -> Path:
    """The ONNX file whose initializers hold ``component``'s base weights: the built ONNX Runtime graph, the
    export's file in an export folder, or (TensorRT / AOTInductor folders) the export folder the engine was
    built from (``engine.json``'s ``export_folder``)."""
    artifact = engine.artifact(component)
    if artifact is not None and artifact.kind == "ort":
        return engine.folder / artifact.file
    own = engine.folder / engine.component(component).file
    if own.is_file():
        return own
    recorded = engine.built.data.get("export_folder") if engine.built else None
    if recorded and (Path(recorded) / engine.component(component).file).is_file():
        return Path(recorded) / engine.component(component).file
    raise LoraError(f"{engine.folder} holds no ONNX file of {component} and records no export folder that does: "
                    "the base weights a LoRA is added to come from there; rebuild the engine with this pladis "
                    "(it records the export folder), or keep that folder in place")  # fmt: skip


def base_initializers(engine: Engine, component: str, names: list[str]) -> dict[str, np.ndarray]:
    """{name: array} of the named initializers of ``component``'s base ONNX file (external data read)."""
    import onnx
    from onnx import numpy_helper

    path = base_file(engine, component)
    model = onnx.load(str(path), load_external_data=False)
    wanted = set(names)
    found = {t.name: numpy_helper.to_array(t, base_dir=str(path.parent)) for t in model.graph.initializer
             if t.name in wanted}  # fmt: skip
    lost = sorted(wanted - set(found))
    if lost:
        raise LoraError(f"{path} has no initializer {', '.join(lost[:3])} (the weight map names it): the graph "
                        "was rewritten after the export (an optimised build folds weights); apply LoRAs on the "
                        "export folder or an engine built from it at a lower --opt-level")  # fmt: skip
    return found
