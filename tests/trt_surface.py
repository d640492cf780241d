"""The TensorRT API surface this project reaches, checked against TensorRT's own bindings wheels (no TensorRT runs).

What this checks, and what it does not: the ``tensorrt-cu12-bindings`` wheel of a TensorRT version holds the
compiled Python module (``tensorrt.so``, the names, enums and pybind11 signatures of that version) and the pure
Python ``tensorrt.plugin`` (its validators). Neither libnvinfer nor a GPU is here, so:

- ``uses(files)`` reads the project's TensorRT code (every module that imports ``tensorrt``) and lists each chain
  of attributes and calls it makes from ``tensorrt`` / ``tensorrt.plugin`` (through variables, annotated
  parameters and ``self`` attributes), with the keyword arguments of each call. A value it cannot trace to
  those roots (an unannotated parameter, a helper's return value) is not followed: the TensorRT code
  annotates such parameters with TensorRT's classes, and names it looks up by string are checked from the
  build plan (``enum_uses``).
- ``Wheel(version)`` downloads that version's bindings wheel (``pip download --no-deps``, cached) and writes
  stand-ins for the three libraries the compiled module links against (libnvinfer, libnvonnxparser,
  libnvinfer_plugin). The stand-ins are derived mechanically from the wheel: one function per symbol the module
  imports from them (read with ``nm -D``), each of which only prints that TensorRT is not here and aborts. They
  carry no behaviour: loading the module runs pybind11's registration of names (which needs none of them);
  anything that would run TensorRT aborts the checking subprocess.
- ``check(wheel, chains)`` resolves every chain in a subprocess with that module imported: each attribute must
  exist (on the module, a class, or an instance of the class the previous step returned, the return types read
  from the pybind11 signatures or the Python annotations), and each call's keywords and positional count must fit
  one of the signatures. ``validators(wheel)`` applies the wheel's unchanged ``tensorrt.plugin`` decorators
  (register, autotune, aot_impl; lazy registration, so TensorRT's registry is not touched) to the plugin functions.

``aot`` runs aot_impl for a node through the wheel's own AOT plugin class (its checks of the results included),
with the C++ side replaced by fake expressions and recording sinks (``_main_aot``).

``create(wheel)`` has the wheel's plugin creator parse the node's attributes as the ONNX parser delivers them
(one-element NumPy arrays), which is where TensorRT 10.9 … 11.1 fail with NumPy >= 2.4.

Run as a script it is the checking subprocess: ``python trt_surface.py <wheel dir> check|validators|create|aot``.
"""

from __future__ import annotations

import ast
import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOTS = {"tensorrt", "tensorrt.plugin"}
LIBS = ("libnvinfer.so.{m}", "libnvonnxparser.so.{m}", "libnvinfer_plugin.so.{m}")
CACHE = Path(os.environ.get("PLADIS_TRT_WHEELS", Path.home() / ".cache" / "pladis" / "tensorrt-bindings"))


# --------------------------------------------------------------------------------------------------
# The project's uses of TensorRT, read from its sources (no TensorRT needed)
# --------------------------------------------------------------------------------------------------


def tensorrt_files(package_dir: Path) -> list[Path]:
    """Every module of the package that imports tensorrt (symlinked folders resolved, each file once)."""
    seen, out = set(), []
    found = [Path(d) / f for d, _, fs in os.walk(package_dir, followlinks=True) for f in fs if f.endswith(".py")]
    for p in sorted(found):
        real = p.resolve()
        if real in seen or "__pycache__" in p.parts:
            continue
        seen.add(real)
        if re.search(r"^\s*(import tensorrt|from tensorrt)", real.read_text(), re.M):
            out.append(real)
    return out


class _Scanner(ast.NodeVisitor):
    """Chains from ``tensorrt`` roots: [{"root", "steps", "where"}]; a step is ["attr", name] or
    ["call", n_positional | None (starred), [keywords]] or ["instance"] (an annotated value of that class)."""

    def __init__(self, where: str):
        self.where = where
        self.chains: list[dict] = []
        self.env: dict[str, tuple] = {}  # name -> (root, steps)
        self.self_env: dict[str, tuple] = {}  # "self.x" -> (root, steps), per class

    # a path is (root, steps) or None
    def path(self, node) -> tuple | None:
        if isinstance(node, ast.Name):
            return self.env.get(node.id)
        if isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id == "self":
                return self.self_env.get(f"self.{node.attr}")
            base = self.path(node.value)
            return None if base is None else (base[0], [*base[1], ["attr", node.attr]])
        if isinstance(node, ast.Call):
            base = self.path(node.func)
            if base is None:
                return None
            starred = any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords)
            step = ["call", None if starred else len(node.args), [k.arg for k in node.keywords if k.arg]]
            return base[0], [*base[1], step]
        if isinstance(node, ast.Constant) and isinstance(node.value, str):  # a deferred annotation
            try:
                return self.path(ast.parse(node.value, mode="eval").body)
            except SyntaxError:
                return None
        return None

    def record(self, node) -> None:
        p = self.path(node)
        if p is not None and p[1]:
            self.chains.append({"root": p[0], "steps": p[1], "where": f"{self.where}:{node.lineno}"})

    def bind_import(self, node) -> None:
        for a in node.names:
            if isinstance(node, ast.Import) and a.name in ROOTS:
                if a.asname:
                    self.env[a.asname] = (a.name, [])
                else:
                    self.env[a.name.split(".")[0]] = ("tensorrt", [])
            elif isinstance(node, ast.ImportFrom) and node.module in ROOTS:
                self.env[a.asname or a.name] = (node.module, [["attr", a.name]])

    visit_Import = visit_ImportFrom = bind_import

    def visit_FunctionDef(self, node) -> None:
        saved = dict(self.env)
        for arg in [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]:
            p = self.path(arg.annotation) if arg.annotation is not None else None
            if p is not None:
                self.record(arg.annotation)
                self.env[arg.arg] = (p[0], [*p[1], ["instance"]])
            else:
                self.env.pop(arg.arg, None)
        if node.returns is not None:
            self.record(node.returns)
        for stmt in node.body:
            self.visit(stmt)
        self.env = saved

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node) -> None:
        for b in node.bases:
            self.visit(b)
        saved = self.self_env
        self.self_env = {}
        for stmt in node.body:
            self.visit(stmt)
        self.self_env = saved

    def visit_Assign(self, node) -> None:
        self.visit(node.value)
        p = self.path(node.value)
        for t in node.targets:
            self._assign(t, p)

    def visit_AnnAssign(self, node) -> None:
        if node.value is not None:
            self.visit(node.value)
        p = self.path(node.value) if node.value is not None else None
        self._assign(
            node.target, p or ((lambda a: (a[0], [*a[1], ["instance"]]) if a else None)(self.path(node.annotation)))
        )

    def _assign(self, target, p) -> None:
        if isinstance(target, ast.Name):
            if p is not None:
                self.env[target.id] = p
            else:
                self.env.pop(target.id, None)
        elif isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self":
            if p is not None:
                self.self_env[f"self.{target.attr}"] = p
        elif isinstance(target, ast.Attribute):
            self.record(target)  # a store into a TensorRT object: the attribute must exist
            self.visit(target.value)
        elif isinstance(target, ast.Tuple | ast.List):
            for elt in target.elts:
                self._assign(elt, None)
        else:
            self.visit(target)

    def visit_Attribute(self, node) -> None:
        self.record(node)
        self.generic_visit(node)

    def visit_Call(self, node) -> None:
        self.record(node)
        self.generic_visit(node)


def _maximal(chains: list[dict]) -> list[dict]:
    """Drop chains that are a prefix of another one from the same place (each reached path once)."""
    keys = {(c["root"], json.dumps(c["steps"])) for c in chains}
    out, seen = [], set()
    for c in chains:
        k = (c["root"], json.dumps(c["steps"]))
        longer = any(
            r == c["root"] and s.startswith(k[1][:-1]) and s != k[1] and json.loads(s)[: len(c["steps"])] == c["steps"]
            for r, s in keys
        )
        if not longer and (k, c["where"]) not in seen:
            seen.add((k, c["where"]))
            out.append(c)
    return out


def uses_in(source: str, where: str = "<source>") -> list[dict]:
    scanner = _Scanner(where)
    scanner.visit(ast.parse(source))
    return _maximal(scanner.chains)


def uses(files: list[Path]) -> list[dict]:
    """Every TensorRT chain the files reach (see _Scanner)."""
    return [c for f in files for c in uses_in(f.read_text(), f.name)]


def enum_uses(kind: str, names, where: str) -> list[dict]:
    """Chains for names the code looks up by string (``getattr(trt.BuilderFlag, name)``)."""
    return [{"root": "tensorrt", "steps": [["attr", kind], ["attr", n]], "where": where} for n in names]


# --------------------------------------------------------------------------------------------------
# One TensorRT version's bindings wheel, with stand-ins for the libraries it links against
# --------------------------------------------------------------------------------------------------


class Unavailable(Exception):
    """The wheel or the tools to prepare it are not available here (the test skips, or fails under CI)."""


class Wheel:
    def __init__(self, version: str, distribution: str = "tensorrt-cu12-bindings"):
        self.version, self.distribution = version, distribution
        self.dir = CACHE / f"{distribution}-{version}-py{sys.version_info.major}{sys.version_info.minor}"
        self.major = int(version.split(".")[0])

    def prepare(self) -> Wheel:
        if (self.dir / "ready").is_file():
            return self
        tmp = self.dir.with_name(f".{self.dir.name}.{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            got = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                                  "-d", str(tmp / "whl"), f"{self.distribution}=={self.version}"],
                                 capture_output=True, text=True, timeout=300)  # fmt: skip
            wheels = list((tmp / "whl").glob("*.whl"))
            if got.returncode or not wheels:
                raise Unavailable(f"pip download {self.distribution}=={self.version} failed: {got.stderr[-500:]}")
            with zipfile.ZipFile(wheels[0]) as z:
                for info in z.infolist():
                    if info.filename.startswith("tensorrt_bindings/"):  # installed as the tensorrt package
                        target = tmp / "site" / "tensorrt" / info.filename.removeprefix("tensorrt_bindings/")
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(z.read(info))
            self._stand_ins(tmp)
            (tmp / "ready").write_text(self.version + "\n")
            shutil.rmtree(self.dir, ignore_errors=True)
            os.replace(tmp, self.dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return self

    def _stand_ins(self, tmp: Path) -> None:
        so = tmp / "site" / "tensorrt" / "tensorrt.so"
        cc = shutil.which("cc") or shutil.which("gcc")
        nm = shutil.which("nm")
        if not (cc and nm):
            raise Unavailable("a C compiler (cc) and nm are needed to write the library stand-ins")
        out = subprocess.run([nm, "-D", "--undefined-only", str(so)], capture_output=True, text=True, check=True)
        here = ctypes.CDLL(None)  # libc, libm, libpython: what the process already provides
        symbols = sorted(
            line.split()[-1] for line in out.stdout.splitlines()
            if line.split()[0] == "U" and "@" not in line and not hasattr(here, line.split()[-1])
        )  # fmt: skip
        if not symbols or not all(re.fullmatch(r"\w+", s) for s in symbols):
            raise Unavailable(f"unexpected imported symbols in {so.name}: {symbols}")
        body = "".join(
            f'void {s}(void) {{ fputs("TensorRT stand-in: {s} was called; TensorRT is not here\\n", stderr); '
            "abort(); }\n"
            for s in symbols
        )
        (tmp / "stand_in.c").write_text("#include <stdio.h>\n#include <stdlib.h>\n" + body)
        (tmp / "symbols.txt").write_text("\n".join(symbols) + "\n")
        (tmp / "lib").mkdir()
        for lib in LIBS:
            name = lib.format(m=self.major)
            subprocess.run([cc, "-shared", "-fPIC", f"-Wl,-soname,{name}", str(tmp / "stand_in.c"), "-o",
                            str(tmp / "lib" / name)], check=True, capture_output=True)  # fmt: skip

    def run(self, mode: str, payload) -> dict:
        """Run this file as the checking subprocess for ``mode`` on ``payload``; its JSON answer."""
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(self.dir / "site"), *sys.path])}
        proc = subprocess.run([sys.executable, __file__, str(self.dir), mode], input=json.dumps(payload),
                              capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
        if proc.returncode:
            raise RuntimeError(f"checking subprocess failed ({proc.returncode}): {proc.stderr[-3000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------
# The checking subprocess: the wheel's module imported over the stand-ins
# --------------------------------------------------------------------------------------------------


def _load(wheel_dir: Path):
    major = int((wheel_dir / "ready").read_text().split(".")[0])
    for lib in LIBS:
        ctypes.CDLL(str(wheel_dir / "lib" / lib.format(m=major)), mode=ctypes.RTLD_GLOBAL)
    import tensorrt

    return tensorrt


_SIG = re.compile(r"^\s*(?:\d+\.\s*)?(\w+)\((.*)\)\s*->\s*(.+?)\s*$")


def _signatures(obj) -> list[tuple[list[tuple[str, bool]], str]]:
    """pybind11 signatures from a docstring: [(params [(name, has_default)] without self, return type)]."""
    out = []
    for line in (getattr(obj, "__doc__", None) or "").splitlines():
        m = _SIG.match(line)
        if not m:
            continue
        params, depth, cur = [], 0, ""
        for ch in m.group(2) + ",":
            if ch in "([{":
                depth += 1
            elif ch in ")]}":
                depth -= 1
            if ch == "," and depth == 0:
                if cur.strip():
                    name = cur.split(":")[0].strip().lstrip("*")
                    params.append((name, "=" in cur))
                cur = ""
            else:
                cur += ch
        if params and params[0][0] == "self":
            params = params[1:]
        out.append((params, m.group(3)))
    return out


def _fits(params, npos, kws) -> bool:
    names = [n for n, _ in params]
    if npos is None:
        return True
    if npos > len(params) or any(k not in names[npos:] for k in kws):
        return False
    return all(d or i < npos or n in kws for i, (n, d) in enumerate(params))


def _class_named(trt, text: str):
    text = text.strip().strip("'\"")
    for prefix in ("tensorrt.tensorrt.", "tensorrt."):
        if text.startswith(prefix):
            obj = trt
            for part in text[len(prefix) :].split("."):
                obj = getattr(obj, part, None)
            return obj if isinstance(obj, type) else None
    return None


def _returns(trt, fn):
    """The class a callable returns, from its pybind11 signature or its annotations; None if unknown."""
    import inspect
    import typing

    sigs = _signatures(fn)
    if sigs:
        return _class_named(trt, sigs[0][1])
    try:
        ret = typing.get_type_hints(fn).get("return")
    except Exception:
        ret = inspect.signature(fn).return_annotation if callable(fn) else None
    return ret if isinstance(ret, type) else None


def _instance_has(cls, name: str) -> bool:
    import inspect

    if hasattr(cls, name):
        return True
    for klass in cls.__mro__:  # attributes a Python class sets in __init__
        init = klass.__dict__.get("__init__")
        try:
            if init and re.search(rf"self\.{re.escape(name)}\s*=", inspect.getsource(init)):
                return True
        except (OSError, TypeError):
            pass
    return False


def _check_call(trt, target, step, is_class) -> str | None:
    import inspect

    _, npos, kws = step
    fn = target.__init__ if is_class and _signatures(target.__init__) else target
    sigs = _signatures(fn)
    if sigs:
        if not any(_fits(p, npos, kws) for p, _ in sigs):
            return f"no signature of {getattr(target, '__qualname__', target)} takes {npos} positional and {kws}"
        return None
    if npos is None:
        return None
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return None
    try:
        sig.bind(*([None] * npos), **dict.fromkeys(kws))
    except TypeError as e:
        return f"{getattr(target, '__qualname__', target)}{sig}: {e}"
    return None


def resolve(trt, chain: dict) -> tuple[str, str | None]:
    """("ok" | "missing" | "unresolved", detail) for one chain."""
    import importlib
    import inspect

    obj, inst, shown = importlib.import_module(chain["root"]), None, chain["root"]
    unbound = False  # a method taken from its class: the call passes self explicitly
    for i, step in enumerate(chain["steps"]):
        rest = i + 1 < len(chain["steps"])
        if step[0] == "attr":
            name = step[1]
            shown += f".{name}"
            if inst is not None:
                if not _instance_has(inst, name):
                    return "missing", f"{inst.__qualname__} instances have no attribute {name!r} ({shown})"
                member = inspect.getattr_static(inst, name, None)
                if isinstance(member, property) or type(member).__name__ == "property":
                    inst, obj = _returns(trt, member.fget), None
                    if inst is None and rest:
                        return "unresolved", f"{shown}: the property's type is unknown"
                    continue
                if member is None:  # set in __init__: type unknown
                    if rest:
                        return "unresolved", f"{shown}: an instance attribute of unknown type"
                    continue
                obj, inst = getattr(inst, name), None
                continue
            if obj is None:
                return "unresolved", shown
            if not hasattr(obj, name):
                return (
                    "missing",
                    f"{getattr(obj, '__qualname__', getattr(obj, '__name__', obj))} has no {name!r} ({shown})",
                )
            value = getattr(obj, name)
            unbound = isinstance(obj, type) and type(inspect.getattr_static(obj, name)).__name__ in (
                "function",
                "instancemethod",
                "wrapper_descriptor",
            )
            obj, inst = (value, None) if callable(value) or inspect.ismodule(value) else (None, type(value))
            if obj is not None and not isinstance(obj, type) and not callable(obj):
                obj, inst = None, type(value)
        elif step[0] == "instance":
            if not isinstance(obj, type):
                return "unresolved", f"{shown} is not a class"
            obj, inst = None, obj
        elif step[0] == "call":
            shown += "()"
            if obj is None:
                return ("unresolved", f"{shown}: calling an instance") if rest else ("ok", None)
            if unbound and step[1]:
                step = ["call", step[1] - 1, step[2]]
            if (why := _check_call(trt, obj, step, isinstance(obj, type))) is not None:
                return "missing", f"{shown}: {why}"
            inst = obj if isinstance(obj, type) else _returns(trt, obj)
            obj = None
            if inst is None and rest:
                return "unresolved", f"{shown}: return type unknown"
    return "ok", None


def _main_check(trt, chains) -> dict:
    out = {"version": trt.__version__, "ok": 0, "missing": [], "unresolved": []}
    for c in chains:
        status, detail = resolve(trt, c)
        if status == "ok":
            out["ok"] += 1
        else:
            out[status].append(f"{c['where']}: {detail}")
    return out


def _main_validators(trt, payload) -> dict:
    import tensorrt.plugin as trtp

    from pladis import plugins_trt
    from pladis.plugins_trt import plugin

    plugins_trt.decorate(trtp, lazy=True)  # the wheel's own validators run on the plugin functions
    ns = getattr(trtp.op, plugin.NAMESPACE)
    out = {"version": trt.__version__, "registered": hasattr(ns, plugin.NAME)}
    # a planted violation, to show the validators run: an attribute TensorRT does not support (a list)
    import types

    src = payload.get("planted", "")
    if src:
        scope: dict = {}
        exec(compile(src, "<planted>", "exec", dont_inherit=True), {"trtp": trtp}, scope)  # the test's snippet
        fn = next(v for v in scope.values() if isinstance(v, types.FunctionType))
        try:
            trtp.register("pladis_planted::Bad", lazy_register=True)(fn)
            out["planted"] = "accepted"
        except Exception as e:
            out["planted"] = f"{type(e).__name__}: {e}"
    return out


def _main_create(trt, payload) -> dict:
    """The wheel's plugin creator parses the attributes as the ONNX parser hands them over (one-element arrays:
    FLOAT32 for float, INT32 for int); TensorRT's registry and libraries are not involved."""
    import numpy as np
    import tensorrt.plugin as trtp
    from tensorrt.plugin import _lib

    from pladis import plugins_trt
    from pladis.plugins_trt import plugin

    plugins_trt.decorate(trtp, lazy=True)
    desc = _lib.QDP_REGISTRY[plugin.PLUGIN_ID]
    creator = _lib._TemplatePluginCreator(
        plugin.NAME, plugin.NAMESPACE, {k: (True, t) for k, t in desc.input_attrs.items()}
    )
    kinds = {float: (np.float32, trt.PluginFieldType.FLOAT32), int: (np.int32, trt.PluginFieldType.INT32)}
    fields = [trt.PluginField(name, np.array([payload[name]], kinds[t][0]), kinds[t][1])
              for name, t in plugin.ATTRIBUTES.items()]  # fmt: skip
    out = {"version": trt.__version__, "numpy": np.__version__}
    try:
        creator.create_plugin(plugin.NAME, plugin.NAMESPACE, trt.PluginFieldCollection(fields), trt.TensorRTPhase.BUILD)
        out["created"] = True
    except Exception as e:
        out["created"], out["error"] = False, f"{type(e).__name__}: {e}"
    return out


class _LaunchParamsSink:
    """Where TensorRT's ``get_launch_params`` stores the launch (a C++ struct in TensorRT): records which fields
    were set, to what kind of value."""

    def __init__(self):
        self.__dict__["fields"] = {}

    def __setattr__(self, name, value):
        self.fields[name] = type(value).__name__


class _SymExprSink:
    """Where TensorRT's ``get_launch_params`` stores the extra arguments (a C++ setter in TensorRT)."""

    def __init__(self):
        self.nbSymExprs, self.items = None, {}

    def __setitem__(self, i, value):
        self.items[i] = type(value).__name__


def _main_aot(trt, payload) -> dict:
    """The wheel's own AOT plugin class (``_TemplateAOTPlugin``) runs the decorated plugin functions for one node
    as a build does: ``get_output_data_types`` (register) then ``get_launch_params`` (aot_impl, with the wheel's
    checks of its results) and ``get_kernel``. What TensorRT's C++ side would supply is replaced: the shape
    expressions are the wheel's fake ones (no expression builder: that is libnvinfer), the launch struct and the
    extra-argument setter are sinks that record what was stored, and the build GPU's capability is the payload's
    (no GPU here). The PTX itself is Triton's, compiled on this CPU."""
    import tensorrt.plugin as trtp
    from tensorrt.plugin import _lib, _plugin_class
    from tensorrt.plugin._tensor import ShapeExprs, TensorDesc

    from pladis import plugins_trt
    from pladis.plugins_trt import plugin

    plugin.gpu_capability = lambda: int(payload["capability"])  # the build GPU's, as torch would report it
    plugins_trt.decorate(trtp, lazy=True)
    desc = _lib.QDP_REGISTRY[plugin.PLUGIN_ID]
    plg = _plugin_class._TemplateAOTPlugin(plugin.NAME, plugin.NAMESPACE, desc.num_outputs)
    attrs = {name: typ(payload["attrs"][name]) for name, typ in plugin.ATTRIBUTES.items()}
    plg.init(desc.register_func, attrs, desc.aot_impl_attr_names, desc.aot_impl_func, desc.autotune_attr_names,
             desc.autotune_func)  # fmt: skip
    types = {"fp32": trt.float32, "fp16": trt.float16, "bf16": trt.bfloat16}
    in_out = []
    for t in payload["tensors"]:  # q, k, v, mask, lam, out: {"dtype", "dims" (-1: dynamic), "max"}
        d = trt.DynamicPluginTensorDesc()
        d.desc.dims = trt.Dims(t["dims"])
        d.desc.type = types[t["dtype"]]
        d.desc.format = trt.TensorFormat.LINEAR
        d.min = trt.Dims([1 if x < 0 else x for x in t["dims"]])
        d.max = d.opt = trt.Dims(t["max"])
        in_out.append(d)
    n_in = len(plugin.INPUTS)
    out_types = plg.get_output_data_types([d.desc.type for d in in_out[:n_in]], [len(d.desc.dims) for d in in_out])
    # the descriptors get_output_shapes would make (it needs TensorRT's expression builder): fake expressions
    plg.input_descs = [TensorDesc(ShapeExprs(len(d.desc.dims), _is_dummy=True), d.desc.type) for d in in_out[:n_in]]
    plg.output_descs = (TensorDesc(ShapeExprs(len(in_out[n_in].desc.dims), _is_dummy=True), out_types[0]),)
    plg.set_tactic(0)
    launch, sym = _LaunchParamsSink(), _SymExprSink()
    out = {"version": trt.__version__, "output_type": str(out_types[0])}
    try:
        plg.get_launch_params(None, in_out, n_in, launch, sym, None)
    except Exception as e:
        return {**out, "error": f"{type(e).__name__}: {e}"}
    name, ptx = plg.get_kernel([d.desc for d in in_out[:n_in]], [d.desc for d in in_out[n_in:]])
    extra = [sym.items[i] for i in sorted(sym.items)]
    return {**out, "name": name.decode() if isinstance(name, bytes) else name, "ptx": ptx.decode(),
            "launch_fields": launch.fields, "n_extra": sym.nbSymExprs, "extra": extra}  # fmt: skip


MODES = {"check": _main_check, "validators": _main_validators, "create": _main_create, "aot": _main_aot}

if __name__ == "__main__":
    wheel_dir, mode = Path(sys.argv[1]), sys.argv[2]
    payload = json.loads(sys.stdin.read() or "null")
    trt_module = _load(wheel_dir)
    result = MODES[mode](trt_module, payload if mode == "check" else payload or {})
    print(json.dumps(result))
