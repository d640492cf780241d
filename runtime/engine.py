"""Opening a folder the runtime can run, checked before any heavy work.

Two kinds: an export folder (``pladis export``: ONNX files + ``manifest.json``), which ONNX Runtime runs as
is and from which the torch backend rebuilds the eager model, and an engine folder (``pladis build``),
which adds the built artifacts and ``engine.json``. Every file either names is checked (present, sha256).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pladis.errors import PladisError
from pladis.export.manifest import FORMAT, SEAL, seal_ok, sha256


class EngineError(PladisError):
    """An engine folder that cannot be used: the message names the problem and the fix."""


@dataclass
class Engine:
    """A checked engine folder. ``manifest``: the export's ``manifest.json``; ``built``: the parsed
    ``engine.json`` of a ``pladis build`` folder (None for an export folder, which ONNX Runtime runs as is)."""

    folder: Path
    manifest: dict
    built: dict | None = None

    def artifact(self, name: str) -> dict | None:
        """The built artifact of a component (file, kind: ort | aoti | trt), or None for an export folder."""
        return self.built["components"][name] if self.built else None

    @property
    def family(self) -> str:
        return self.manifest["model"]["family"]

    def component(self, name: str) -> dict:
        return self.manifest["components"][name]

    def component_names(self, role: str | None = None) -> list[str]:
        return [n for n, c in self.manifest["components"].items() if role is None or c["role"] == role]

    @property
    def denoiser(self) -> str:
        return self.component_names("denoiser")[0]

    @property
    def precision(self) -> str:
        """The precision the denoiser runs in: as built, else as actually exported (a bf16 request that fell
        back to float32 is fp32 here, and is judged by the fp32 tolerance)."""
        if self.built and self.built.get("precision"):
            return self.built["precision"]
        dtype = self.component(self.denoiser)["dtype"]
        return {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(dtype, self.manifest["precision"])

    def dim(self, name: str) -> tuple[int, int, int]:
        """(min, opt, max) of a named dim: the engine's built range (``pladis build --dims``) inside the
        export's. Pixel sizes follow a narrowed latent range."""
        lo, opt, hi = self.manifest["dims"][name]
        if self.built and name in self.built.get("dims", {}):
            lo, opt, hi = self.built["dims"][name]
        if self.built and name in ("height", "width") and f"latent_{name}" in self.built.get("dims", {}):
            f = self.manifest["vae"]["scale_factor"]
            llo, _, lhi = self.built["dims"][f"latent_{name}"]
            lo, hi = max(lo, llo * f), min(hi, lhi * f)
        return lo, opt, hi

    def check_complete(self) -> None:
        """Refuse an export of some components only (``--components``): it cannot generate images."""
        if self.manifest.get("partial"):
            raise EngineError(f"{self.folder} holds only {', '.join(self.manifest['components'])} (exported with "
                              "--components, for benchmarks); re-export without --components to generate")  # fmt: skip


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise EngineError(f"{path} cannot be read ({err}); re-export (or rebuild) the folder") from None
    if not isinstance(data, dict):
        raise EngineError(f"{path} is not a JSON object; re-export (or rebuild) the folder")
    return data


def _check_file(folder: Path, rel: str, digest: str | None, what: str, verify: bool, record: str) -> None:
    p = folder / rel
    if not p.is_file():
        hint = "" if (folder / "engine.json").is_file() else " (if this was an engine folder, its engine.json is gone)"
        raise EngineError(f"{folder} is missing {rel} ({what}){hint}; re-run `pladis export` (or `pladis build`) "
                          "into a new folder")  # fmt: skip
    if verify and digest is not None and sha256(p) != digest:
        raise EngineError(
            f"{p} does not match {record} sha256 (changed after it was written); re-export or rebuild, or "
            "pass verify=False / --no-verify if you changed it on purpose"
        )


def open_engine(folder: str | Path, verify: bool = True) -> Engine:
    """Read and check an engine folder before any heavy work: manifest present, readable and of our format;
    every file it names (ONNX and external data, tokenizers, scheduler config) present and, with ``verify``,
    with the recorded sha256; for a built folder, its artifacts likewise and the manifest as the build saw it."""
    folder = Path(folder)
    path = folder / "manifest.json"
    if not folder.is_dir():
        raise EngineError(f"{folder} is not a folder: pass a folder written by `pladis export` or `pladis build`")
    if not path.is_file():
        raise EngineError(f"{folder} has no manifest.json: pass a folder written by `pladis export`")
    manifest = _read_json(path)
    if manifest.get("format") == "pladis-onnx/1":
        raise EngineError(f"{folder} was exported by an older pladis with lam baked into the graph; re-export it "
                          "with `pladis export` (lam is now a runtime input: one export serves every lam)")  # fmt: skip
    if manifest.get("format") != FORMAT:
        raise EngineError(f"{path} is not a {FORMAT} manifest (format={manifest.get('format')!r}); re-export it")
    if verify and not seal_ok(manifest):
        raise EngineError(f"{path} was edited after export (its {SEAL} does not match); re-export, or pass "
                          "--no-verify if you changed it on purpose")  # fmt: skip
    missing = [k for k in ("model", "components", "dims", "image", "pladis", "precision") if k not in manifest]
    if missing:
        raise EngineError(f"{path} is malformed (no {', '.join(missing)}); re-export the folder")
    built = None
    if (folder / "engine.json").is_file():  # a `pladis build` folder: its artifacts replace the ONNX files
        built = _read_json(folder / "engine.json")
        if not seal_ok(built):
            raise EngineError(f"{folder / 'engine.json'} was edited after the build (its {SEAL} does not match); "
                              "rebuild the engine with `pladis build --force`")  # fmt: skip
        if built.get("source_manifest_sha256") != sha256(path):
            raise EngineError(f"{path} is not the manifest this engine was built from (edited after the build); "
                              "rebuild the engine with `pladis build`")  # fmt: skip
    record = "engine.json's" if built else "the manifest's"
    try:
        for name, comp in (built or manifest)["components"].items():
            external = [{"file": x} for x in comp.get("external_data", []) if isinstance(x, str)]
            external += [x for x in comp.get("external_data", []) if isinstance(x, dict)]
            for f in [{"file": comp["file"], "sha256": comp["sha256"]}, *external]:
                _check_file(folder, f["file"], f.get("sha256"), name, verify, record)
    except (KeyError, TypeError, AttributeError) as err:
        raise EngineError(f"{folder}: the component list is malformed ({err!r}); re-export or rebuild") from None
    for rel, digest in manifest.get("files", {}).items():
        _check_file(folder, rel, digest, "tokenizer / scheduler file", verify, "the manifest's")
    return Engine(folder, manifest, built)
