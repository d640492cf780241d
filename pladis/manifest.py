"""The folder records every stage shares: ``manifest.json`` (written by ``pladis export``) and ``engine.json``
(written by ``pladis build``), as typed, read-only views, plus their sealing and the opening of a folder.

Export writes the JSON (``pladis.export.manifest.build_manifest``), build and the runtime read it through
``Manifest`` / ``EngineRecord`` here, so no stage imports another to learn what a folder holds. Each view
keeps the parsed JSON it came from (``data``): the files on disk are the format, byte for byte, and the
views never rewrite them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from pladis.errors import PladisError
from pladis.files import sha256
from pladis.precision import PRECISION_OF_DTYPE

FORMAT = "pladis-onnx/2"  # 2: lam is the runtime input pladis_scale (1: lam was a node attribute)
ENGINE_FORMAT = "pladis-engine/1"
MANIFEST_FILE = "manifest.json"
ENGINE_FILE = "engine.json"
SEAL = "self_sha256"  # a JSON record's hash of itself (without this key): an edit by hand is detected


class EngineError(PladisError):
    """An engine or export folder that cannot be used: the message names the problem and the fix."""


# --------------------------------------------------------------------------------------------------
# sealing
# --------------------------------------------------------------------------------------------------


def sealed(record: dict) -> dict:
    """``record`` with its own sha256 (over its canonical JSON without the seal) added."""
    body = {k: v for k, v in record.items() if k != SEAL}
    return {**body, SEAL: hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()}


def seal_ok(record: dict) -> bool:
    """Whether ``record`` carries a seal that matches its content (records without one: False)."""
    return SEAL in record and sealed(record)[SEAL] == record[SEAL]


# --------------------------------------------------------------------------------------------------
# manifest.json
# --------------------------------------------------------------------------------------------------

Dims = tuple[int, int, int]  # (min, opt, max) of a named dimension


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of an exported graph. ``shape``: per axis an int or the name of a dim of the
    manifest's ``dims``; ``min`` / ``opt`` / ``max``: the concrete shapes at the ends and middle of the range.
    ``dtype``: a torch/numpy dtype name (float32, float16, bfloat16, int64, int32)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    @classmethod
    def from_dict(cls, d: Mapping) -> TensorSpec:
        return cls(d["name"], d["dtype"], tuple(d["shape"]), tuple(d["min"]), tuple(d["opt"]), tuple(d["max"]))

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "min": list(self.min),
                "opt": list(self.opt), "max": list(self.max)}  # fmt: skip


@dataclass(frozen=True)
class FileRef:
    """A file of a folder, by relative path, with its recorded sha256 (None: not recorded)."""

    file: str
    sha256: str | None = None


def _file_refs(items) -> tuple[FileRef, ...]:
    """External-data entries: ``{"file", "sha256"}`` records (manifest) or bare names (engine.json)."""
    return tuple(FileRef(x) if isinstance(x, str) else FileRef(x["file"], x.get("sha256")) for x in items or ())


@dataclass(frozen=True)
class Component:
    """One exported graph: its ONNX file (+ external weight files), role, dtype and I/O contract."""

    name: str
    file: str
    sha256: str
    role: str  # text_encoder | denoiser | vae_decoder
    dtype: str  # the dtype its float tensors were exported in (float32, float16, bfloat16)
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    external_data: tuple[FileRef, ...] = ()

    @classmethod
    def from_dict(cls, name: str, d: Mapping) -> Component:
        inputs, outputs = (tuple(TensorSpec.from_dict(t) for t in d[k]) for k in ("inputs", "outputs"))
        return cls(name, d["file"], d["sha256"], d["role"], d["dtype"], inputs, outputs,
                   _file_refs(d.get("external_data")))  # fmt: skip

    @property
    def files(self) -> tuple[FileRef, ...]:
        """Every file the component is made of: the graph first, then its external data."""
        return (FileRef(self.file, self.sha256), *self.external_data)

    @property
    def input_dtypes(self) -> dict[str, str]:
        return {t.name: t.dtype for t in self.inputs}

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


@dataclass(frozen=True)
class Pladis:
    """How the denoiser was patched. ``lam_input``: the name of the runtime strength input (None: no PLADIS
    layers, the engine runs lam = 0 only); any lam in ``lam_range`` runs on the same graph. ``function_body``:
    False for a plugin-only export (``--no-function-body``): its PladisAttention nodes run in TensorRT only."""

    patched: bool
    lam: float
    lam_range: tuple[float, float]
    lam_input: str | None
    alpha: float
    layer_selection: object  # the --layers value the export was given
    function_body: bool = True

    @classmethod
    def from_dict(cls, d: Mapping) -> Pladis:
        return cls(bool(d["patched"]), d["lam"], tuple(d["lam_range"]), d.get("lam_input"), d["alpha"],
                   d.get("layer_selection"), bool(d.get("function_body", True)))  # fmt: skip


@dataclass(frozen=True)
class ImageSize:
    """The export's default image size in pixels, and the multiple every size must be."""

    height: int
    width: int
    multiple: int


@dataclass(frozen=True)
class Vae:
    """The VAE's latent convention: latents = (encode(x) - shift_factor) * scaling_factor, at 1/scale_factor
    of the pixel size with ``latent_channels`` channels."""

    scaling_factor: float
    shift_factor: float | None
    scale_factor: int
    latent_channels: int


@dataclass(frozen=True)
class Manifest:
    """A ``pladis-onnx/2`` manifest. ``data``: the parsed JSON, read-only, for what has no typed field here
    (versions, per-layer lists, validation reports) and for hashing."""

    family: str
    precision: str  # requested: fp32 | fp16 | bf16 (a component may have fallen back: see Component.dtype)
    model: Mapping  # the source record (pladis.provenance.record) + seed, pipeline_class, family
    pladis: Pladis
    dims: Mapping[str, Dims]
    image: ImageSize
    vae: Vae
    components: Mapping[str, Component]
    files: Mapping[str, str]  # tokenizer / scheduler files: relative path -> sha256
    partial: bool  # an export of some components only (--components): for benchmarks, not for generating
    data: Mapping = field(repr=False, compare=False, default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping) -> Manifest:
        """The typed view of a manifest dict; KeyError / TypeError / ValueError when a field is malformed."""
        dims = {k: tuple(int(x) for x in v) for k, v in data["dims"].items()}
        if any(len(v) != 3 for v in dims.values()):
            raise ValueError("every dim must be [min, opt, max]")
        return cls(
            family=data["model"]["family"],
            precision=data["precision"],
            model=MappingProxyType(dict(data["model"])),
            pladis=Pladis.from_dict(data["pladis"]),
            dims=MappingProxyType(dims),
            image=ImageSize(**{k: data["image"][k] for k in ("height", "width", "multiple")}),
            vae=Vae(
                **{k: data["vae"].get(k) for k in ("scaling_factor", "shift_factor", "scale_factor", "latent_channels")}
            ),  # fmt: skip
            components=MappingProxyType({n: Component.from_dict(n, c) for n, c in data["components"].items()}),
            files=MappingProxyType(dict(data.get("files", {}))),
            partial=bool(data.get("partial")),
            data=MappingProxyType(data),
        )

    @property
    def seed(self) -> int:
        return self.model["seed"]

    def component_names(self, role: str | None = None) -> list[str]:
        """Component names in export order (text encoders, denoiser, VAE decoder), optionally of one role."""
        return [n for n, c in self.components.items() if role is None or c.role == role]

    @property
    def denoiser(self) -> str:
        return self.component_names("denoiser")[0]


# --------------------------------------------------------------------------------------------------
# engine.json
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Artifact:
    """A built component: its file (+ external data), which backend made it (``kind``: ort | aoti | trt) and
    that backend's own settings (``settings``: e.g. ONNX Runtime's intra_op_num_threads), as built."""

    name: str
    file: str
    kind: str
    sha256: str | None
    external_data: tuple[FileRef, ...] = ()
    settings: Mapping = field(default_factory=dict, compare=False)

    @classmethod
    def from_dict(cls, name: str, d: Mapping) -> Artifact:
        rest = {k: v for k, v in d.items() if k not in ("file", "kind", "sha256", "external_data")}
        return cls(name, d["file"], d["kind"], d.get("sha256"), _file_refs(d.get("external_data")),
                   MappingProxyType(rest))  # fmt: skip

    @property
    def files(self) -> tuple[FileRef, ...]:
        return (FileRef(self.file, self.sha256), *self.external_data)


@dataclass(frozen=True)
class EngineRecord:
    """A ``pladis-engine/1`` engine.json: the backend, its build settings, and one artifact per component.
    ``dims``: the narrowed shape ranges the engine was built for (a subset of the manifest's)."""

    backend: str
    precision: str | None
    dims: Mapping[str, Dims]
    components: Mapping[str, Artifact]
    source_manifest_sha256: str | None
    key: str | None
    data: Mapping = field(repr=False, compare=False, default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping) -> EngineRecord:
        return cls(
            backend=data.get("backend", "?"),
            precision=data.get("precision"),
            dims=MappingProxyType({k: tuple(int(x) for x in v) for k, v in data.get("dims", {}).items()}),
            components=MappingProxyType({n: Artifact.from_dict(n, c) for n, c in data["components"].items()}),
            source_manifest_sha256=data.get("source_manifest_sha256"),
            key=data.get("key"),
            data=MappingProxyType(data),
        )


# --------------------------------------------------------------------------------------------------
# a checked folder
# --------------------------------------------------------------------------------------------------


@dataclass
class Engine:
    """A checked export or engine folder. ``manifest``: its ``manifest.json``; ``built``: its ``engine.json``
    (None for an export folder, which ONNX Runtime runs as is). A manifest dict is accepted and typed."""

    folder: Path
    manifest: Manifest
    built: EngineRecord | None = None

    def __post_init__(self):
        self.folder = Path(self.folder)
        if not isinstance(self.manifest, Manifest):
            self.manifest = Manifest.from_dict(self.manifest)
        if self.built is not None and not isinstance(self.built, EngineRecord):
            self.built = EngineRecord.from_dict(self.built)

    def artifact(self, name: str) -> Artifact | None:
        """The built artifact of a component, or None for an export folder."""
        return self.built.components[name] if self.built else None

    @property
    def family(self) -> str:
        return self.manifest.family

    def component(self, name: str) -> Component:
        return self.manifest.components[name]

    def component_names(self, role: str | None = None) -> list[str]:
        return self.manifest.component_names(role)

    @property
    def denoiser(self) -> str:
        return self.manifest.denoiser

    @property
    def precision(self) -> str:
        """The precision the denoiser runs in: as built, else as actually exported (a bf16 request that fell
        back to float32 is fp32 here, and is judged by the fp32 tolerance)."""
        if self.built and self.built.precision:
            return self.built.precision
        return PRECISION_OF_DTYPE.get(self.component(self.denoiser).dtype, self.manifest.precision)

    def dim(self, name: str) -> Dims:
        """(min, opt, max) of a named dim: the engine's built range (``pladis build --dims``) inside the
        export's. Pixel sizes follow a narrowed latent range."""
        lo, opt, hi = self.manifest.dims[name]
        built = self.built.dims if self.built else {}
        if name in built:
            lo, opt, hi = built[name]
        if name in ("height", "width") and f"latent_{name}" in built:
            f = self.manifest.vae.scale_factor
            llo, _, lhi = built[f"latent_{name}"]
            lo, hi = max(lo, llo * f), min(hi, lhi * f)
        return lo, opt, hi

    def check_complete(self) -> None:
        """Refuse an export of some components only (``--components``): it cannot generate images."""
        if self.manifest.partial:
            raise EngineError(f"{self.folder} holds only {', '.join(self.manifest.components)} (exported with "
                              "--components, for benchmarks); re-export without --components to generate")  # fmt: skip


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise EngineError(f"{path} cannot be read ({err}); re-export (or rebuild) the folder") from None
    if not isinstance(data, dict):
        raise EngineError(f"{path} is not a JSON object; re-export (or rebuild) the folder")
    return data


def _check_file(folder: Path, ref: FileRef, what: str, verify: bool, record: str) -> None:
    p = folder / ref.file
    if not p.is_file():
        hint = "" if (folder / ENGINE_FILE).is_file() else " (if this was an engine folder, its engine.json is gone)"
        raise EngineError(f"{folder} is missing {ref.file} ({what}){hint}; re-run `pladis export` (or `pladis build`) "
                          "into a new folder")  # fmt: skip
    if verify and ref.sha256 is not None and sha256(p) != ref.sha256:
        raise EngineError(
            f"{p} does not match {record} sha256 (changed after it was written); re-export or rebuild, or "
            "pass verify=False / --no-verify if you changed it on purpose"
        )


def read_manifest(folder: str | Path, verify: bool = True) -> Manifest:
    """The typed manifest of an export (or engine) folder: present, readable, of our format, with ``verify``
    sealed as written; EngineError naming the fix otherwise. Checks no other file (see ``open_engine``)."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not folder.is_dir():
        raise EngineError(f"{folder} is not a folder: pass a folder written by `pladis export` or `pladis build`")
    if not path.is_file():
        raise EngineError(f"{folder} has no manifest.json: pass a folder written by `pladis export` or `pladis build`")
    data = _read_json(path)
    if data.get("format") == "pladis-onnx/1":
        raise EngineError(f"{folder} was exported by an older pladis with lam baked into the graph; re-export it "
                          "with `pladis export` (lam is now a runtime input: one export serves every lam)")  # fmt: skip
    if data.get("format") != FORMAT:
        raise EngineError(f"{path} is not a {FORMAT} manifest (format={data.get('format')!r}); re-export it")
    if verify and not seal_ok(data):
        raise EngineError(f"{path} was edited after export (its {SEAL} does not match); re-export, or pass "
                          "--no-verify if you changed it on purpose")  # fmt: skip
    missing = [k for k in ("model", "components", "dims", "image", "pladis", "precision") if k not in data]
    if missing:
        raise EngineError(f"{path} is malformed (no {', '.join(missing)}); re-export the folder")
    try:
        return Manifest.from_dict(data)
    except (KeyError, TypeError, AttributeError, ValueError) as err:
        raise EngineError(f"{path} is malformed ({err!r}); re-export the folder") from None


def check_function_body(manifest: Manifest, folder, what: str) -> None:
    """Refuse (EngineError) to run a plugin-only export's PLADIS graph with ``what`` (ONNX Runtime ...): its
    PladisAttention nodes carry no function body, so only a TensorRT build can run them."""
    if manifest.pladis.patched and not manifest.pladis.function_body:
        raise EngineError(f"{folder} is a plugin-only export (--no-function-body), for TensorRT builds only "
                          f"(`pladis build --backend trt`); {what} cannot run it: re-export without "
                          "--no-function-body")  # fmt: skip


def open_engine(folder: str | Path, verify: bool = True) -> Engine:
    """Read and check an engine folder before any heavy work: manifest present, readable and of our format;
    every file it names (ONNX and external data, tokenizers, scheduler config) present and, with ``verify``,
    with the recorded sha256; for a built folder, its artifacts likewise and the manifest as the build saw it."""
    folder = Path(folder)
    manifest = read_manifest(folder, verify)
    path = folder / MANIFEST_FILE
    built = None
    if (folder / ENGINE_FILE).is_file():  # a `pladis build` folder: its artifacts replace the ONNX files
        data = _read_json(folder / ENGINE_FILE)
        if not seal_ok(data):
            raise EngineError(f"{folder / ENGINE_FILE} was edited after the build (its {SEAL} does not match); "
                              "rebuild the engine with `pladis build --force`")  # fmt: skip
        if data.get("source_manifest_sha256") != sha256(path):
            raise EngineError(f"{path} is not the manifest this engine was built from (edited after the build); "
                              "rebuild the engine with `pladis build`")  # fmt: skip
        try:
            built = EngineRecord.from_dict(data)
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise EngineError(f"{folder}: the component list is malformed ({err!r}); re-export or rebuild") from None
    record = "engine.json's" if built else "the manifest's"
    for name, comp in (built or manifest).components.items():
        for ref in comp.files:
            _check_file(folder, ref, name, verify, record)
    for rel, digest in manifest.files.items():
        _check_file(folder, FileRef(rel, digest), "tokenizer / scheduler file", verify, "the manifest's")
    return Engine(folder, manifest, built)
