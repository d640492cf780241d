"""The rooms of pladis and the imports allowed between them (README, "Layout and data path").

One direction: model -> patch -> export -> build -> run. The stages (export, engine, runtime) meet only at
the manifest (``pladis.manifest``) and the op (``pladis.ops`` and its ONNX form ``pladis.export.onnx_op``);
the numerics room (``numerics``, ``ops``, ``kernels``) imports no stage. The scan reads every ``import``
statement, at module level or inside functions (lazy imports count: they run too).
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# room -> the rooms (or exact modules, for a room's single public part) it may import
STAGE_SHARED = {"errors", "files", "options", "manifest", "backends", "ort", "precision", "defaults"}
ALLOWED = {
    "errors": set(),
    "options": set(),
    "defaults": set(),  # the values --help shows (lam, alpha, opsets): imports nothing
    "precision": set(),  # the one precision table
    "numerics": {"errors", "defaults"},
    "kernels": {"numerics"},
    "ops": {"numerics", "kernels"},
    "plugins_trt": {"errors", "kernels"},
    "files": {"errors"},
    "manifest": {"errors", "files", "precision"},
    "backends": {"manifest"},
    "ort": {"manifest"},
    "models": set(),
    "sources": {"files", "models"},
    # a family record carries its export contract hooks (imported lazily, when a contract is built)
    "families": {"export.contracts"},
    "patch": {"families", "models", "ops", "options"},
    "export": {"families", "models", "numerics", "ops", "patch", "sources", *STAGE_SHARED},
    # the eager reference of an export, shared by the torch runtime backend and the AOTInductor build
    "eager": {"export", "manifest", "patch", "sources", "precision"},
    # build: the manifest, the op's ONNX form (a TensorRT build strips its function body), the kernel
    "engine": {"eager", "kernels", "plugins_trt", "export.onnx_op", "export.contracts", *STAGE_SHARED},
    # the aoti backend registers pladis::attention (ops) before it loads a .pt2 that calls it
    "runtime": {"eager", "families", "ops", *STAGE_SHARED},
    "serve": {"runtime", *STAGE_SHARED},
}
# rooms that sit at the end of the path and may import anything: the CLI, the demo, the benchmarks
TOP = {"cli", "demo", "bench"}


def _module_of(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[1:] if rel.parts[0] == "pladis" else rel.parts
    return ".".join(("pladis", *parts)).removesuffix(".__init__")


def _sources() -> dict[str, Path]:
    files = [p for p in (ROOT / "pladis").rglob("*.py") if not any(part in ("export", "engine", "runtime",
             "plugins_trt", "bench") for part in p.relative_to(ROOT / "pladis").parts[:1])]  # fmt: skip
    for stage in ("export", "engine", "runtime", "plugins_trt", "bench"):
        files += (ROOT / stage).rglob("*.py")
    return {_module_of(p): p for p in files}


def _room(module: str) -> str:
    return module.split(".")[1]


def _imports(path: Path) -> set[str]:
    """Every pladis module the file imports (``from pladis.a import b`` counts as ``pladis.a.b``)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("pladis.")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "pladis" or node.module.startswith("pladis."):
                out |= {f"{node.module}.{a.name}" for a in node.names}  # a submodule, or a name in a module
    return out


def _allowed(room: str, target: str) -> bool:
    rules = ALLOWED[room]
    sub = ".".join(target.split(".")[1:3])  # e.g. export.onnx_op
    return _room(target) in rules or sub in rules


def violations(sources: dict[str, Path]) -> list[str]:
    bad = []
    for module, path in sorted(sources.items()):
        if module == "pladis" or _room(module) in TOP:
            continue
        room = _room(module)
        for target in sorted(_imports(path)):
            if target.split(".")[1][:1].isupper() or _room(target) == room:
                continue  # a public name of the package facade (pladis.Runtime...), or the same room
            if _room(target) in ALLOWED or _room(target) in TOP:
                if not _allowed(room, target):
                    bad.append(f"{path.relative_to(ROOT)}: {room} imports {target}")
    return bad


def test_every_room_is_in_the_table():
    rooms = {_room(m) for m in _sources() if m != "pladis"}
    assert rooms <= set(ALLOWED) | TOP, f"rooms without import rules: {sorted(rooms - set(ALLOWED) - TOP)}"


def test_imports_between_rooms_follow_the_one_way_path():
    assert violations(_sources()) == []


def test_the_scan_catches_a_forbidden_import(tmp_path):
    # a test that cannot fail is a defect: a runtime module importing the build stage must be reported
    fake = tmp_path / "runtime" / "sneaky.py"
    fake.parent.mkdir()
    fake.write_text("def f():\n    from pladis.engine import build\n    import pladis.export.exporter\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        found = violations({"pladis.runtime.sneaky": fake})
    finally:
        ROOT = saved
    assert found == ["runtime/sneaky.py: runtime imports pladis.engine.build",
                     "runtime/sneaky.py: runtime imports pladis.export.exporter"]  # fmt: skip


def test_readme_names_the_rule_and_this_test():
    readme = (ROOT / "README.md").read_text()
    assert "tests/test_architecture.py" in readme and "meet only at the manifest" in readme
