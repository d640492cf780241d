"""The runtime loop's own host cost: milliseconds per step outside the denoiser (issue 28, goal ``GOAL_MS``).

``python -m pladis.bench.host_loop --out bench/results`` runs ``Runtime.generate`` (the one sampling loop: CFG,
input scaling, the family's step inputs, the output copy, guidance, the diffusers scheduler's step) on tiny
export folders whose denoiser is replaced by ``NullBackend``, a backend that does no work: it returns a zero
tensor allocated once per input shapes. The per-step time minus the time spent inside that backend is the
host time the loop costs per step. The latents are tiny (4x4 for a 32² image), so the tensor arithmetic is
negligible and what is measured is Python and dispatch overhead: on a GPU that is the time the host needs to
queue one step, which CUDA graphs cannot remove (they remove the denoiser's launches, not the loop's).

Writes ``<out>/host_loop.json`` (``harness.save``: date, machine, versions), which ``pladis.bench.report``
turns into a docs/PERFORMANCE.md section. Nothing here needs a GPU; ``--device cuda`` runs the same on one.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from pladis import backends as registry
from pladis.bench import harness

GOAL_MS = 0.2  # host milliseconds per step outside the denoiser (issue 28)
# name: (tiny model, scheduler, guidance (None: the family's default; SDXL: CFG), steps as deployed, draw_ahead
# (None: the device's default, Runtime.draw_ahead; True: ancestral step noise drawn before the loop, as on CUDA))
CASES = {
    "sdxl euler (CFG)": ("tiny-sdxl", "euler", None, 30, None),
    "sdxl dpmpp_2m (CFG)": ("tiny-sdxl", "dpmpp_2m", None, 30, None),
    "sdxl euler_a (CFG)": ("tiny-sdxl", "euler_a", None, 30, None),
    "sdxl euler_a (CFG; noise drawn ahead as on CUDA)": ("tiny-sdxl", "euler_a", None, 30, True),
    "flux flow_euler (guidance-distilled)": ("tiny-flux", "flow_euler", None, 28, None),
}


class NullBackend:
    """A denoiser that does nothing: returns a zero tensor shaped like the sample input, allocated once per
    input shapes and reused (``reuses_outputs``); ``seconds`` and ``calls`` count the time spent inside it."""

    name = "null"
    reuses_outputs = True
    cuda_graphs = None

    def __init__(self, engine, component: str, device: str = "cpu"):
        from pladis.families import get

        self.sample = get(engine.family).sample_input
        self.output = engine.component(component).output_names[0]
        self.device = device
        self.zeros: dict[tuple, torch.Tensor] = {}
        self.seconds, self.calls = 0.0, 0

    def load(self) -> None:
        pass

    def warm_up(self, inputs: dict[str, torch.Tensor]) -> None:
        self.run(inputs)

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        start = time.perf_counter()
        shape = tuple(inputs[self.sample].shape)
        out = self.zeros.get(shape)
        if out is None:
            out = self.zeros[shape] = torch.zeros(shape, device=self.device)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return {self.output: out}


@contextlib.contextmanager
def null_backend():
    """The registry with a ``null`` backend (``NullBackend``) for the duration."""
    record = registry.BackendRecord("null", f"{__name__}:NullBackend", builder=None, devices=("cpu", "cuda"),
                                    packages=())  # fmt: skip
    registry.REGISTRY["null"] = record
    try:
        yield record
    finally:
        registry.REGISTRY.pop("null", None)


def measure(engine: str | Path, scheduler: str, guidance, steps: int, repeats: int, device: str = "cpu",
            draw_ahead: bool | None = None) -> dict:  # fmt: skip
    """Host ms per step outside the denoiser over ``repeats`` runs of ``steps`` steps (after one warm-up run);
    ``draw_ahead``: ``Runtime.draw_ahead`` (None: the device's default)."""
    from pladis.manifest import open_engine
    from pladis.runtime import Runtime

    with null_backend():
        opened = open_engine(engine)
        rt = Runtime(opened, "torch", {opened.denoiser: "null"}, device=device)
        null = rt.backend(rt.engine.denoiser)
        rt.draw_ahead = rt.draw_ahead if draw_ahead is None else draw_ahead
        rt.generate("a cat", steps=steps, scheduler=scheduler, guidance=guidance, progress=False)  # warm-up
        host, total = [], []
        for _ in range(repeats):
            null.seconds, null.calls = 0.0, 0
            per_step = rt.generate("a cat", steps=steps, scheduler=scheduler, guidance=guidance,
                                   progress=False).timings["per_step"]  # fmt: skip
            inside = null.seconds / max(null.calls, 1)  # one denoiser call per step
            total.append(per_step * 1000)
            host.append((per_step - inside) * 1000)
    cfg = rt.settings("a cat", guidance=guidance).negatives is not None
    return {"scheduler": scheduler, "steps": steps, "cfg": cfg,
            "repeats": repeats, "host_ms_per_step": {"median": statistics.median(host), "min": min(host),
                                                     "max": max(host)},
            "step_ms_with_null_denoiser": statistics.median(total), "goal_ms": GOAL_MS,
            "threads": torch.get_num_threads(), "device": device, "draw_ahead": rt.draw_ahead,
            "load_avg_1min": round(os.getloadavg()[0], 2)}  # fmt: skip


def run(cases: list[str], repeats: int, device: str, steps: int | None = None, engines: Path | None = None) -> dict:
    """Every case in ``cases``; the tiny models are exported into ``engines`` (a temporary folder if None)."""
    from pladis.export import ExportConfig, export

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(engines or tmp)
        for name in cases:
            model, scheduler, guidance, default_steps, draw_ahead = CASES[name]
            folder = root / model
            if not (folder / "manifest.json").exists():
                export(ExportConfig(model=model, out=str(folder), validate=False))
            results[name] = {"model": model, **measure(folder, scheduler, guidance, steps or default_steps, repeats,
                                                       device, draw_ahead)}  # fmt: skip
    return results


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pladis.bench.host_loop", description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of: {', '.join(CASES)}")
    parser.add_argument("--repeats", type=int, default=10, help="timed generate calls per case (default 10)")
    parser.add_argument("--steps", type=int, default=None, help="steps per call (default: each case's own)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--engines", default=None, help="folder for the tiny exports (default: a temporary one)")
    harness.add_out_argument(parser)
    args = parser.parse_args(argv)
    args.cases = harness.chosen_cases(parser, args.cases, CASES)
    if args.repeats < 1 or (args.steps is not None and args.steps < 1):
        parser.error("--repeats and --steps must be at least 1")
    return args


def line(name: str, r: dict) -> str:
    """One result as a line of text: the median host ms per step against the goal."""
    h = r["host_ms_per_step"]
    verdict = "met" if h["median"] <= r["goal_ms"] else f"missed by {h['median'] / r['goal_ms']:.1f}x"
    return (f"{name}: {h['median']:.3f} ms host per step (min {h['min']:.3f}, max {h['max']:.3f}; "
            f"{r['steps']} steps x {r['repeats']}), goal <= {r['goal_ms']} ms: {verdict}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    results = run(args.cases, args.repeats, args.device, args.steps, Path(args.engines) if args.engines else None)
    for name, r in results.items():
        print(line(name, r))
    command = "python -m pladis.bench.host_loop " + " ".join(argv if argv is not None else sys.argv[1:])
    path = harness.save("host_loop", {"command": command.strip(), "results": results}, args.out, merge=True)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
