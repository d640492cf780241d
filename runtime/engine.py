"""An engine folder: its manifest, checked before any heavy work.

For now an engine folder is what ``pladis export`` writes (ONNX files + ``manifest.json``): ONNX Runtime
runs it directly and the torch backend rebuilds the same patched model from the manifest. ``pladis
build`` (engine issue) adds engine files and an engine manifest next to it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pladis.export.manifest import FORMAT, sha256


class EngineError(ValueError):
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

    def dim(self, name: str) -> tuple[int, int, int]:
        """(min, opt, max) of a named dim."""
        return tuple(self.manifest["dims"][name])


def open_engine(folder: str | Path, verify: bool = True) -> Engine:
    """Read and check an engine folder: manifest present and of our format, every file present, and (with
    ``verify``) every file's sha256 as the manifest records it."""
    folder = Path(folder)
    path = folder / "manifest.json"
    if not path.is_file():
        raise EngineError(f"{folder} has no manifest.json: pass a folder written by `pladis export`")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise EngineError(f"{path} is not a {FORMAT} manifest (format={manifest.get('format')!r}); re-export it")
    built = None
    if (folder / "engine.json").is_file():  # a `pladis build` folder: its artifacts replace the ONNX files
        built = json.loads((folder / "engine.json").read_text())
    for name, comp in (built or manifest)["components"].items():
        external = [{"file": x} for x in comp.get("external_data", []) if isinstance(x, str)]
        external += [x for x in comp.get("external_data", []) if isinstance(x, dict)]
        files = [{"file": comp["file"], "sha256": comp["sha256"]}, *external]
        for f in files:
            p = folder / f["file"]
            if not p.is_file():
                raise EngineError(f"{folder} is missing {f['file']} ({name}); re-run `pladis export` into a new folder")
            if verify and "sha256" in f and sha256(p) != f["sha256"]:
                raise EngineError(
                    f"{p} does not match the manifest's sha256 (changed after export); re-export, or pass "
                    "verify=False / --no-verify if you changed it on purpose"
                )
    return Engine(folder, manifest, built)
