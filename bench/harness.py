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
import time
from collections.abc import Callable
from pathlib import Path

from pladis.files import write_text

RESULTS = Path(__file__).parent / "results"


def interleaved(variants: dict[str, Callable[[], object]], *, warmup: int = 1, repeats: int = 5,
                clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:  # fmt: skip
    """Seconds per call of each variant: ``warmup`` untimed rounds, then ``repeats`` timed rounds, each
    round calling every variant once in turn."""
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = clock()
            fn()
            samples[name].append(clock() - start)
    return samples


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
    return {"cpu": cpu, "cores": os.cpu_count(), "os": platform.platform(), "python": platform.python_version()}


def save(name: str, payload: dict, merge: bool = False) -> Path:
    """Write ``bench/results/<name>.json`` atomically, each case stamped with the date and the machine.

    merge: keep the cases of an earlier file that this run did not repeat (``payload["results"]``).
    """
    path = RESULTS / f"{name}.json"
    from pladis.export.manifest import versions

    stamp = {"date": datetime.date.today().isoformat(), "machine": machine(), "versions": versions()}
    results = {case: {**stamp, **value} for case, value in payload.get("results", {}).items()}
    if merge and path.exists():
        results = {**json.loads(path.read_text()).get("results", {}), **results}
    payload = {"benchmark": name, **payload, "results": results}
    return write_text(path, json.dumps(payload, indent=2) + "\n")


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
