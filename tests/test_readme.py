"""The README holds as written: its Python and shell blocks run as copied, in order, in a fresh folder.

A block preceded by ``<!-- readme-test: skip (reason) -->`` is skipped (Makefile targets, synopses,
benchmarks, servers, TensorRT); any other block must run. Blocks share the folder, so a later block may use
what an earlier one wrote (``build/tiny-sdxl``), as a reader following the README would.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
FENCE = re.compile(r"^( *)```(\w+)\n(.*?)^\1```", re.S | re.M)


def blocks() -> list[tuple[str, str, str | None, int]]:
    """(language, code, skip reason or None, line) of every python/bash block."""
    text = README.read_text()
    out = []
    for m in FENCE.finditer(text):
        lang, indent = m.group(2), m.group(1)
        if lang not in ("python", "bash"):
            continue
        before = text[: m.start()].rstrip().splitlines()[-1].strip() if text[: m.start()].strip() else ""
        skip = re.match(r"<!-- readme-test: skip \((.*)\) -->", before)
        code = "\n".join(line[len(indent) :] for line in m.group(3).splitlines())
        out.append((lang, code, skip.group(1) if skip else None, text[: m.start()].count("\n") + 1))
    return out


def test_every_block_is_runnable_or_says_why_not():
    found = blocks()
    assert sum(1 for *_, skip, _ in found if skip is None) >= 5
    for _lang, code, skip, line in found:
        if skip is None:
            assert not re.search(r"^\s*make\b|\[--", code, re.M), f"README line {line}: mark it or make it runnable"


@pytest.mark.slow
def test_readme_blocks_run_as_copied(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PLADIS_CACHE": str(tmp_path / "cache"), "MPLBACKEND": "Agg"}  # fmt: skip
    work = tmp_path / "work"
    work.mkdir()
    for lang, code, skip, line in blocks():
        if skip is not None:
            continue
        cmd = [sys.executable, "-c", code] if lang == "python" else ["bash", "-euo", "pipefail", "-c", code]
        run = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, f"README block at line {line} failed:\n{code}\n---\n{run.stderr[-3000:]}"
