"""The ``pladis`` command: each subcommand fills a typed config and calls the Python function of its name.

Only the invoked subcommand's config module is imported, and config modules are light, so ``pladis --help``
and ``pladis <command> --help`` answer without loading torch; a command whose optional extra is missing (``serve``
without fastapi) says which ``pip install`` fixes it. User-facing failures (``PladisError``) print one line and
exit 2; Ctrl-C exits 130; anything else (a ValueError inside torch or onnx included) is a bug and keeps its
traceback, with a line saying so (exit 1).

Output: the library logs through module loggers and sets no handler; the command shows the ``pladis`` loggers'
INFO lines as plain text on stdout (what a command reports as it goes), ``-v`` adds pladis's DEBUG lines,
``-vv`` every library's. Warnings that heavy libraries print on every run and that mean nothing for pladis
(``_QUIET``) are silenced.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import importlib
import logging
import os
import re
import sys
import traceback
import types
import typing
import warnings
from pathlib import Path

from pladis import backends
from pladis.errors import EXTRAS, MissingExtra, PladisError, missing_extra

DESCRIPTION = "PLADIS for diffusers models: export, build engines, generate, prove parity, serve."

# name: (help, "module:ConfigClass", "module:function" taking the config, how to print its result)
COMMANDS = {
    "demo": ("the whole path on a built-in model: export -> engine -> generate -> parity",
             "pladis.demo:DemoConfig", "pladis.demo:demo", "check"),
    "layers": ("list the attention layers PLADIS patches in a model",
               "pladis.options:LayersConfig", "pladis.patch:layers", "print"),
    "export": ("export a PLADIS-patched pipeline to ONNX (+ manifest.json)",
               "pladis.export.config:ExportConfig", "pladis.export:export", "export"),
    "build": (f"build an engine folder ({' | '.join(backends.BUILDABLE)}) from an export folder, cached",
              "pladis.engine:BuildConfig", "pladis.engine:build", "build"),
    "generate": ("generate images with an engine folder",
                 "pladis.runtime.commands:GenerateConfig", "pladis.runtime.commands:generate", "generate"),
    "parity": ("compare an engine with eager PyTorch, step by step (exit 1 on failure)",
               "pladis.runtime.commands:ParityConfig", "pladis.runtime.commands:parity", "parity"),
    "lora": ("swap LoRAs onto an engine folder without a re-export (writes a new engine folder)",
             "pladis.runtime.commands:LoraConfig", "pladis.runtime.commands:lora", "lora"),
    "cache": ("list, verify or clean the engine cache", "pladis.engine.cache:CacheConfig",
              "pladis.engine.cache:run_cache", "check"),
    "serve": ("serve an engine over HTTP (OpenAI images API shape); --ray for Ray Serve",
              "pladis.serve.config:ServeConfig", "pladis.serve:serve", "none"),
}  # fmt: skip


def _resolve(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _flag_type(f: dataclasses.Field):
    """The argparse type of a field: its default's type, or the non-None member of ``X | None``."""
    hint = f.type if not isinstance(f.type, str) else f.type.split("|")[0].strip()
    if isinstance(hint, str):
        hint = {"int": int, "float": float, "str": str, "bool": bool}.get(hint.split("[")[0], str)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint if hint in (int, float, str) else str


def _add_config(parser: argparse.ArgumentParser, config_cls) -> None:
    """One ``--flag`` per dataclass field, typed, defaulted and documented by the field.

    Booleans become switches: ``--name`` for a field that defaults to False, ``--no-name`` for True; a field's
    help says what the setting does when on, so ``--no-name`` is documented as not doing it. Fields marked
    ``repeat`` take the flag several times.
    """
    for f in dataclasses.fields(config_cls):
        flag, text = f.name.replace("_", "-"), f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(default, bool):
            action = "store_false" if default else "store_true"
            flag, text = (f"no-{flag}", f"do not {text} (done by default)") if default else (flag, text)
            parser.add_argument(f"--{flag}", dest=f.name, action=action, default=default, help=text)
        elif f.metadata.get("positional"):
            parser.add_argument(f.name, nargs="?", default=default, help=f"{text} (default: {default})")
        elif f.metadata.get("repeat"):
            parser.add_argument(f"--{flag}", dest=f.name, action="append", default=None, help=f"{text} (repeatable)")
        else:
            shown = f" (default: {default})" if default not in (None, "") else ""
            kind = type(default) if default not in (None, "") else _flag_type(f)
            parser.add_argument(f"--{flag}", dest=f.name, type=kind, default=default, help=f"{text}{shown}")


def _config(config_cls, args: argparse.Namespace):
    values = {}
    for f in dataclasses.fields(config_cls):
        value = getattr(args, f.name)
        values[f.name] = tuple(value or ()) if f.metadata.get("repeat") else value
    return config_cls(**values)


def _print_result(kind: str, result) -> int:
    """Print what a command returned; the exit status (1 when a check failed)."""
    if kind == "check":  # (text, ok)
        text, ok = result
        print(text)
        return 0 if ok else 1
    if kind == "build":
        print(f"{result['backend']} engine, key {result['key'][:12]}: "
              + ", ".join(f"{n}={c['kind']}:{c['file']}" for n, c in result["components"].items()))  # fmt: skip
    elif kind == "export":
        rows = [f"| {name} | {c['file']} | {c['dtype']} | {c['bytes'] / 1e6:.1f} | {c['pladis_nodes']} |"
                for name, c in result["components"].items()]  # fmt: skip
        head = f"exported {result['model']['source']} in {result['export_seconds']:.1f} s"
        table = ["| component | file | dtype | MB | PladisAttention nodes |", "| --- | --- | --- | --- | --- |"]
        print("\n".join([head, *table, *rows]))
    elif kind == "generate":
        run, paths = result
        print(f"wrote {', '.join(map(str, paths))} | {run.summary()}")
    elif kind == "parity":  # the table is printed before the files are written
        return 0 if result.ok else 1
    elif kind == "lora":
        names = ", ".join(f"{x['file']}:{x['scale']:g}" for x in result["loras"]) or "none (the base weights)"
        print(f"wrote {result['out']} | LoRAs: {names}")
    elif kind == "print":
        print(result)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with the command's error contract: a bad flag is one line, ``<prog>: error: <what>``, naming
    where the flags are listed, and exit 2 (argparse's default prints the whole usage block above it)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; `{self.prog} --help` lists the flags\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; only ``command``'s flags are added (its config module is imported)."""
    parser = _Parser(prog="pladis", description=DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output: -v adds pladis's debug lines, -vv every library's")  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.commands = {}  # name -> its parser (errors about its flags are its own)
    for name, (text, config_path, _, _) in COMMANDS.items():
        p = parser.commands[name] = sub.add_parser(name, help=text, description=text)
        if name == command:
            _add_config(p, _resolve(config_path))
    return parser


def parse(argv: list[str], command: str | None) -> argparse.Namespace:
    """``argv`` parsed; a flag ``command`` does not have is that command's one-line error (exit 2)."""
    parser = build_parser(command)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def _error(command: str, message: str, status: int = 2) -> int:
    print(f"pladis {command}: error: {message}", file=sys.stderr)
    return status


BUG_HINT = "this is a bug in pladis or a library: please report it with the traceback above"

# Known-harmless noise of heavy commands: (category, message regex) for warnings.filterwarnings, and library
# loggers whose WARNING lines say nothing to a pladis user (shown again at -vv).
_QUIET = [
    (UserWarning, r".*requires? (the )?torchvision.*"),
    (FutureWarning, r".*isinstance\(treespec, LeafSpec\)` is deprecated"),  # torch.export's own pytree use
]
_QUIET_LOG = {
    "diffusers.models.modeling_utils": r".*should be kept in float32: \[\]",  # no such modules: nothing to say
    "transformers.utils.import_utils": r".*requires torchvision \(not installed\); falling back",
}


class _Stream(logging.StreamHandler):
    """A handler writing to the current ``sys.stdout`` / ``sys.stderr`` (looked up per record, so output that
    is redirected or captured after the handler was made still arrives)."""

    def __init__(self, name: str):
        super().__init__()
        self.name_of_stream = name
        self._pladis = True

    @property
    def stream(self):
        return getattr(sys, self.name_of_stream)

    @stream.setter
    def stream(self, _):
        pass


class _Plain(logging.Formatter):
    """INFO lines as the plain message; other levels with their level and logger."""

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno == logging.INFO:
            return record.getMessage()
        return f"{record.levelname.lower()} {record.name}: {record.getMessage()}"


class _Drop(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern, re.S)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


def configure_logging(verbose: int) -> None:
    """The command's output: pladis INFO (-v: DEBUG) on stdout; other libraries' warnings on stderr (-vv: all
    DEBUG). Replaces what an earlier call set, so ``main`` can run several times in one process."""
    pladis_log, root = logging.getLogger("pladis"), logging.getLogger()
    for logger in (pladis_log, root):
        for h in [h for h in logger.handlers if getattr(h, "_pladis", False)]:
            logger.removeHandler(h)
    out = _Stream("stdout")
    out.setFormatter(_Plain())
    pladis_log.addHandler(out)
    pladis_log.setLevel(logging.DEBUG if verbose else logging.INFO)
    err = _Stream("stderr")
    err.addFilter(lambda record: not record.name.startswith("pladis"))  # shown on stdout already
    err.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(err)
    root.setLevel(logging.DEBUG if verbose >= 2 else logging.WARNING)
    if verbose >= 2:  # their own logger trees (not propagated to the root) read these when first imported
        for library in ("TRANSFORMERS", "DIFFUSERS"):
            os.environ.setdefault(f"{library}_VERBOSITY", "debug")
    for name, pattern in _QUIET_LOG.items():
        logger = logging.getLogger(name)
        for f in [f for f in logger.filters if isinstance(f, _Drop)]:
            logger.removeFilter(f)
        if verbose < 2:
            logger.addFilter(_Drop(pattern))
    if verbose < 2:
        for category, pattern in _QUIET:
            warnings.filterwarnings("ignore", message=pattern, category=category)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if a in COMMANDS), None)
    try:
        args = parse(argv, command)
    except ModuleNotFoundError as err:  # the command's own module needs a missing extra (e.g. serve)
        if (err.name or "").split(".")[0] not in EXTRAS:
            raise
        return _error(command or "", str(missing_extra(err.name, f"pladis {command}")))
    configure_logging(args.verbose)
    _, config_path, func_path, kind = COMMANDS[args.command]
    try:
        result = _resolve(func_path)(_config(_resolve(config_path), args))
        return _print_result(kind, result)
    except (PladisError, MissingExtra) as err:  # user-facing: one line, the fix in the message
        return _error(args.command, str(err))
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] not in EXTRAS:
            return _bug(args.command)
        return _error(args.command, str(missing_extra(err.name, f"pladis {args.command}")))
    except KeyboardInterrupt:
        return _error(args.command, "interrupted", 130)
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            return _bug(args.command)
        where = f" in {Path(err.filename).parent}" if err.filename else ""  # commands name the folder (NoSpace)
        return _error(args.command, f"no space left on device{where}: free some space or choose another location")
    except Exception:  # noqa: BLE001 - not a user's mistake: show where, and say so
        return _bug(args.command)


def _bug(command: str) -> int:
    traceback.print_exc()
    return _error(command, BUG_HINT, 1)


if __name__ == "__main__":
    sys.exit(main())
