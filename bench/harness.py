"""Timing harness: warm-up, interleaved repeats of the variants of one comparison, medians and ranges.

Variants of one comparison run interleaved in one process on the same inputs, so their ratio is fair
even when the machine's speed drifts; absolute times are reported too, with the machine they ran on.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pladis.files import write_text


def wall_timer(clock: Callable[[], float] = time.perf_counter) -> Callable[[Callable[[], object]], float]:
    """Seconds of one call on the host clock (CPU work)."""

    def timer(fn):
        start = clock()
        fn()
        return clock() - start

    return timer


def cuda_timer(fn: Callable[[], object]) -> float:
    """Seconds of one call on the GPU, between two CUDA events (synchronised after the second)."""
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000


def interleaved(variants: dict[str, Callable[[], object]], *, warmup: int = 1, repeats: int = 5,
                timer: Callable[[Callable[[], object]], float] | None = None) -> dict[str, list[float]]:  # fmt: skip
    """Seconds per call of each variant: ``warmup`` untimed rounds, then ``repeats`` timed rounds, each
    round calling every variant once in turn. timer: ``wall_timer()`` (default) or ``cuda_timer``."""
    timer = timer or wall_timer()
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            samples[name].append(timer(fn))
    return samples


def run_child(pladis_args: list[str]) -> dict:
    """Run ``pladis <args>`` in a child process: its wall time, exit code and its own peak RSS."""
    import sys

    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pladis.bench.child", *pladis_args], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "{}"
    child = json.loads(last) if last.startswith("{") else {}
    return {"command": "pladis " + " ".join(pladis_args), "seconds": round(seconds, 2),
            "returncode": proc.returncode, "peak_rss_gib": child.get("peak_rss_gib"),
            "stderr_tail": proc.stderr[-1500:] if proc.returncode else ""}  # fmt: skip


def summary(samples: list[float]) -> dict[str, float]:
    """median, min and max of one variant's samples (seconds)."""
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples)}


def machine() -> dict[str, object]:
    """What ran the benchmark: CPU model and core count (GPU rows add the card), OS, Python."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "os": platform.platform(), "python": platform.python_version()}
    import torch

    if torch.cuda.is_available():
        import importlib.metadata

        try:
            triton = importlib.metadata.version("triton")
        except importlib.metadata.PackageNotFoundError:
            triton = None
        info.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda, triton=triton,
                    torch_build=torch.__version__)  # fmt: skip
    return info


def cuda_here(script: str) -> bool:
    """Whether a CUDA GPU is here; if not, ``script`` says so on stderr (the GPU scripts then exit 2)."""
    import torch

    if not torch.cuda.is_available():
        print(f"{script}: no CUDA GPU here; nothing measured", file=sys.stderr)
        return False
    return True


def finish(script: str, table: str, failed: list[str]) -> int:
    """A GPU script's end: its table on stdout, one ``FAILED`` line per failure on stderr; the exit status
    (1 when anything failed, else 0)."""
    print(table)
    for line in failed:
        print(f"{script}: FAILED {line}", file=sys.stderr)
    return 1 if failed else 0


def add_out_argument(parser) -> None:
    """``--out DIR``: where a benchmark writes its JSON (default: the working directory)."""
    parser.add_argument("--out", default=".", help="folder for the JSON results (default: the working directory; "
                        "`make bench` passes bench/results)")  # fmt: skip


def save(name: str, payload: dict, out: str | Path = ".", merge: bool = False) -> Path:
    """Write ``<out>/<name>.json`` atomically, each case stamped with the date and the machine.

    merge: keep the cases of an earlier file that this run did not repeat (``payload["results"]``).
    """
    path = Path(out) / f"{name}.json"
    from pladis.export.manifest import versions

    stamp = {"date": datetime.date.today().isoformat(), "machine": machine(), "versions": versions()}
    results = {case: {**stamp, **value} for case, value in payload.get("results", {}).items()}
    if merge and path.exists():
        results = {**json.loads(path.read_text()).get("results", {}), **results}
    payload = {"benchmark": name, **payload, "results": results}
    return write_text(path, json.dumps(payload, indent=2) + "\n")


def chosen_cases(parser, text: str, cases: dict) -> list[str]:
    """The comma-separated case names of ``--cases``, or a parser error naming the unknown ones."""
    chosen = text.split(",")
    unknown = set(chosen) - set(cases)
    if unknown:
        parser.error(f"unknown case(s) {', '.join(sorted(unknown))}; choose from {', '.join(cases)}")
    return chosen


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
