"""The one base class of user-facing failures, and the optional extras a command may need.

A ``PladisError`` is a problem the user can fix (a bad value, a missing or changed file, a missing extra):
its message names the problem and the fix, and the ``pladis`` command prints it on one line and exits 2.
It subclasses ``ValueError`` so library callers that catch ``ValueError`` keep working. Any other exception
is a bug (in pladis or a library) and keeps its traceback.
"""

from __future__ import annotations

import importlib


def error_line(err: BaseException, limit: int = 200) -> str:
    """``err`` as one short line for a warning or a result file: its type and its message's first line."""
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:limit]}"


class PladisError(ValueError):
    """A user-facing failure; the message says what is wrong and how to fix it."""


class MissingExtra(PladisError):
    """An optional dependency of one command is not installed."""


class NoSpace(PladisError):
    """The disk (or the quota) ran full while writing into a folder; nothing half-written was left."""


class SettingError(PladisError):
    """One setting of a request or a command is invalid; ``field`` names it (``lam``, ``steps``, ``size`` ...),
    so the server can report it as OpenAI's ``param`` and the CLI as the flag."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


# Optional top-level modules -> the extra of pyproject.toml that installs them.
EXTRAS = {
    "fastapi": "serve", "uvicorn": "serve", "prometheus_client": "serve", "httpx": "serve",
    "ray": "ray", "onnxruntime": "cpu", "triton": "triton", "tensorrt": "gpu", "polygraphy": "gpu",
    "peft": "lora",
}  # fmt: skip


def missing_extra(module: str, needed_by: str = "") -> MissingExtra:
    """The error for a missing optional module: names the module, who needs it and the pip command."""
    top = module.split(".")[0]
    extra = EXTRAS.get(top)
    hint = f"pip install 'pladis[{extra}]'" if extra else f"pip install {top}"
    if top == "onnxruntime":
        hint = "pip install 'pladis[cpu]' (or 'pladis[gpu]' for onnxruntime-gpu; never both)"
    who = f"{needed_by} needs" if needed_by else "this needs"
    return MissingExtra(f"{who} the Python package {top!r}, which is not installed: {hint}")


def require(module: str, needed_by: str = ""):
    """Import and return ``module``, or raise ``MissingExtra`` with the install command."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name and err.name.split(".")[0] == module.split(".")[0]:
            raise missing_extra(module, needed_by) from None
        raise
