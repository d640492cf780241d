"""The rooms of pladis, their floors and the imports allowed between them (README, "Layout and data path").

One direction: model -> patch -> export -> build -> run. The stages (export, engine, runtime) meet only at
the manifest (``pladis.manifest``) and the op (``pladis.ops`` and its ONNX form ``pladis.export.onnx_op``);
the numerics room (``numerics``, ``ops``, ``kernels``) imports no stage; the shared vocabulary (``contracts``,
``families``, ``manifest``, ``backends``) sits below every stage. The scan reads the package as Python imports
it (through the ``pladis/export -> ../export`` symlinks), and every import: statements at module level or inside
functions (lazy imports run too), and strings that name a pladis module (``"pladis.runtime.backends:Name"``,
``importlib.import_module("pladis.x")``). No module may reach one above its room's floor, none outside its
room's table, and no two modules may import each other, directly or around a circle.
"""

import ast
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# room -> its floor: a room imports only rooms on lower floors (its own modules aside)
FLOORS = {
    "errors": 0, "options": 1, "contracts": 0, "models": 1, "torch_internals": 0, "defaults": 0, "precision": 0,
    "numerics": 1, "files": 1, "families": 1, "lora": 1,
    "kernels": 2, "manifest": 2, "model_files": 2,
    "ops": 3, "plugins_trt": 3, "backends": 3, "ort": 3, "single_file": 3,
    "patch": 4, "sources": 4,
    "pladis": 5, "provenance": 5,  # "pladis": the package facade (pladis.apply, pladis.attention, ...)
    "export": 6,
    "eager": 7,
    "engine": 8, "runtime": 8,
    "serve": 9,
    "demo": 10, "cli": 11, "bench": 12,  # the demo runs the commands, the CLI runs the demo, benchmarks the CLI
}  # fmt: skip
# room -> the rooms (or exact modules, for a room's single public part) it may import
STAGE_SHARED = {"errors", "files", "options", "manifest", "backends", "ort", "precision", "defaults"}
ALLOWED = {
    "errors": set(),
    "options": {"defaults"},
    "contracts": set(),
    "models": {"errors"},
    "torch_internals": set(),
    "defaults": set(),  # the values --help shows (lam, alpha, opsets): imports nothing
    "precision": set(),  # the one precision table
    "numerics": {"errors", "defaults", "torch_internals"},
    "files": {"errors"},
    "families": {"contracts", "errors"},
    "lora": {"errors"},
    "kernels": {"errors", "numerics"},
    "manifest": {"errors", "files", "precision"},
    "model_files": {"files"},
    "ops": {"errors", "numerics", "kernels", "torch_internals"},
    "plugins_trt": {"errors", "kernels"},
    "backends": {"manifest"},
    "ort": {"manifest"},
    "single_file": {"errors", "families", "model_files", "models"},
    "patch": {"errors", "families", "models", "ops", "options"},
    "sources": {"errors", "families", "lora", "model_files", "models", "single_file"},
    "pladis": {"ops", "patch"},
    "provenance": {"errors", "families", "files", "lora", "model_files", "models", "single_file", "sources"},
    "export": {"contracts", "families", "models", "numerics", "ops", "patch", "provenance", "sources", *STAGE_SHARED},
    # the eager reference of an export, shared by the torch runtime backend and the AOTInductor build
    "eager": {"pladis", "export", "manifest", "patch", "precision", "provenance"},
    # build: the manifest, the op's ONNX form (a TensorRT build strips its function body), the kernel; the op's and
    # numerics' sources by name (their hash is part of an engine's cache key)
    "engine": {
        "pladis",
        "eager",
        "kernels",
        "numerics",
        "ops",
        "plugins_trt",
        "export.onnx_op",
        "export.contracts",
        *STAGE_SHARED,
    },
    # the aoti backend registers pladis::attention (ops) before it loads a .pt2 that calls it
    # LoRA swapping: pladis.lora's adapter loading, provenance's weightless skeleton, torch_internals' aoti check
    "runtime": {"eager", "families", "numerics", "ops", "lora", "provenance", "torch_internals", *STAGE_SHARED},
    "serve": {"runtime", "numerics", *STAGE_SHARED},
}
# rooms that sit at the end of the path and may import anything: the CLI, the demo, the benchmarks
TOP = {"cli", "demo", "bench"}
_MODULE_STRING = re.compile(r"pladis(\.[A-Za-z_]\w*)+(:[A-Za-z_]\w*)?")


def sources(package: Path | None = None) -> dict[str, Path]:
    """{module name: file} of the package as Python imports it: symlinked folders followed, each real file once."""
    package = package or ROOT / "pladis"
    out, seen = {}, set()
    for folder, dirs, files in os.walk(package, followlinks=True):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith("."))
        for name in sorted(f for f in files if f.endswith(".py")):
            path = Path(folder) / name
            real = path.resolve()
            if real in seen:
                continue
            seen.add(real)
            rel = path.relative_to(package).with_suffix("")
            out[".".join(("pladis", *rel.parts)).removesuffix(".__init__")] = real
    return out


def _resolve(name: str, modules) -> str | None:
    """The module ``name`` means (``pladis.a.b.Name`` -> ``pladis.a.b``), or None when it names none of ours."""
    parts = name.split(":")[0].split(".")
    while parts:
        if ".".join(parts) in modules:
            return ".".join(parts)
        parts.pop()
    return None


def imports(module: str, path: Path, modules) -> set[str]:
    """Every pladis module the file imports: import statements anywhere in it, relative ones resolved, and string
    constants that name a pladis module (the registry's and importlib's ways of importing by name)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    tree = ast.parse(path.read_text(), str(path))
    loggers = {id(a) for n in ast.walk(tree) if isinstance(n, ast.Call) and _called(n) == "getLogger" for a in n.args}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            names |= {f"{base}.{a.name}" for a in node.names}  # a submodule, or a name of the module base
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _MODULE_STRING.fullmatch(node.value):
            if id(node) not in loggers:  # a logger's name is not an import
                names.add(node.value)
    # "from pladis.a import b": pladis.a.b when that is a module, else pladis.a (parent packages are not counted:
    # Python imports them first either way, and a package's own submodules import through it)
    found = {m for n in names if n == "pladis" or n.startswith("pladis.") if (m := _resolve(n, modules))}
    return found - {module}


def _called(call: ast.Call) -> str:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""


def room(module: str) -> str:
    return module.split(".")[1] if "." in module else "pladis"


def graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    return {m: imports(m, p, modules) for m, p in modules.items()}


def _allowed(src: str, target: str) -> bool:
    rules = ALLOWED[src]
    return room(target) in rules or ".".join(target.split(".")[1:3]) in rules


def violations(g: dict[str, set[str]]) -> list[str]:
    """'a imports b (why not)' for every import outside the table or above the importer's floor."""
    bad = []
    for module, targets in sorted(g.items()):
        src = room(module)
        for target in sorted(targets):
            dst = room(target)
            if dst == src:
                continue
            if src not in FLOORS or dst not in FLOORS:
                bad.append(f"{module} imports {target}: room {src if src not in FLOORS else dst} has no floor")
            elif FLOORS[dst] >= FLOORS[src]:
                bad.append(f"{module} imports {target}: {dst} (floor {FLOORS[dst]}) is not below {src} "
                           f"(floor {FLOORS[src]})")  # fmt: skip
            elif src not in TOP and not _allowed(src, target):
                bad.append(f"{module} imports {target}: not in {src}'s table")
    return bad


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle between modules, each as a path [a, b, ..., a] (one per strongly connected group)."""
    index, low, stack, on, groups = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return [_circle(group, g) for group in groups]


def _circle(group: list[str], g: dict[str, set[str]]) -> list[str]:
    """One circle through the first module of a strongly connected group (breadth-first, shortest)."""
    start, members = group[0], set(group)
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(g[v] & members):
            if w == start:
                return [*paths[v], start]
            if w not in paths:
                paths[w] = [*paths[v], w]
                queue.append(w)
    return group


def test_every_room_has_a_floor_and_a_table():
    rooms = {room(m) for m in sources()}
    assert rooms <= set(FLOORS), f"rooms without a floor: {sorted(rooms - set(FLOORS))}"
    assert rooms - TOP <= set(ALLOWED), f"rooms without import rules: {sorted(rooms - TOP - set(ALLOWED))}"


def test_the_table_points_down():
    up = [(r, t) for r, rules in ALLOWED.items() for t in rules if FLOORS[t.split(".")[0]] >= FLOORS[r]]
    assert not up, f"rules that import sideways or up: {up}"


def test_the_scan_reads_the_symlinked_stages_and_string_imports():
    mods = sources()
    assert {"pladis.export.contracts", "pladis.engine.build", "pladis.runtime.pipeline", "pladis.plugins_trt",
            "pladis.bench.suite", "pladis.families.flux"} <= set(mods)  # fmt: skip
    g = graph(mods)
    assert "pladis.patch" in g["pladis"]  # the facade's lazy "pladis.patch" strings
    assert "pladis.plugins_trt" in g["pladis.engine.trt"] or "pladis.plugins_trt" in set().union(*g.values())


def test_imports_between_rooms_follow_the_one_way_path():
    assert violations(graph(sources())) == []


def test_no_import_circles():
    found = cycles(graph(sources()))
    assert found == [], "import circles: " + "; ".join(" -> ".join(c) for c in found)


def test_the_scan_catches_a_forbidden_import_a_string_import_and_a_circle(tmp_path):
    # a test that cannot fail is a defect: plant each fault in a small package and check it is reported
    pkg = tmp_path / "pladis"
    (pkg / "runtime").mkdir(parents=True)
    (tmp_path / "real_export").mkdir()
    (pkg / "export").symlink_to(tmp_path / "real_export", target_is_directory=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "files.py").write_text("")
    (pkg / "errors.py").write_text(
        'import logging\nlog = logging.getLogger("pladis.files")  # not an import\n\n\n'
        'def f():\n    import importlib\n    importlib.import_module("pladis.files")\n'
    )
    (pkg / "runtime" / "__init__.py").write_text("")
    (pkg / "runtime" / "sneaky.py").write_text("def f():\n    from pladis.export import exporter\n")
    (tmp_path / "real_export" / "__init__.py").write_text("")
    (tmp_path / "real_export" / "exporter.py").write_text('RUNNER = "pladis.runtime.sneaky:Thing"\n')
    g = graph(sources(pkg))
    assert g["pladis.runtime.sneaky"] == {"pladis.export.exporter"}  # a lazy import, through the symlink
    assert g["pladis.export.exporter"] == {"pladis.runtime.sneaky"}  # a string import
    assert cycles(g) == [["pladis.export.exporter", "pladis.runtime.sneaky", "pladis.export.exporter"]]
    found = violations(g)
    assert "pladis.errors imports pladis.files: files (floor 1) is not below errors (floor 0)" in found
    assert "pladis.runtime.sneaky imports pladis.export.exporter: not in runtime's table" in found
    assert any(v.startswith("pladis.export.exporter imports pladis.runtime.sneaky: runtime (floor 8)") for v in found)


def test_readme_names_the_rule_and_this_test():
    readme = (ROOT / "README.md").read_text()
    assert "tests/test_architecture.py" in readme and "meet only at the manifest" in readme
