"""``make bench-export``: what export costs and what its function body costs in ONNX Runtime.

Cases (CPU; the machine is recorded with the results):
- ``denoiser``: the ``small-sd15`` U-Net (SD 1.5 layout, 92 M parameters) at 256², batch 2 (CFG), fp32:
  eager PyTorch, ONNX Runtime (CPU provider) and AOTInductor engines (``pladis build --backend aoti``),
  stock attention and PLADIS, interleaved. Targets (issue 15): PLADIS / stock at most 1.10 for torch and
  AOTI, 1.15 for ORT.
- ``aoti-shapes``: the same U-Net through AOTInductor with dynamic and with static shapes, stock and
  PLADIS (the op kept a call, or traced into), interleaved: why dynamic-shape builds keep the op a call.
- ``sdxl-fp16``: ``pladis export --model sdxl --precision fp16`` (no validation) in a child process:
  wall time and peak RSS, the check that full-size SDXL exports on a 24 GB machine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from pladis.bench import harness


def denoiser_case(repeats: int) -> dict:
    """The suite's denoiser comparison on ``small-sd15`` at 256², with the export contract's target."""
    from pladis.bench import suite

    out = suite._denoiser("small-sd15", 256, repeats, "cpu", aoti=True)
    return {
        "model": "small-sd15",
        "threads": torch.get_num_threads(),
        **out,
        "target": "PLADIS / stock <= 1.10 for torch and AOTI, <= 1.15 for ORT (issue 15)",
    }


def sdxl_fp16_case() -> dict:
    """Export full-size SDXL in fp16 in a child process: wall time and the child's peak RSS."""
    with tempfile.TemporaryDirectory() as tmp:
        out = harness.run_child(
            ["export", "--model", "sdxl", "--precision", "fp16", "--no-validate", "--out", f"{tmp}/sdxl"]
        )
        out["files_bytes"] = {p.name: p.stat().st_size for p in Path(tmp, "sdxl").glob("*.onnx*")}
    out["command"] = out["command"].replace(tmp, "OUT")
    return out


def aoti_shapes_case(repeats: int, name: str = "small-sd15", size: int = 256) -> dict:
    """The ``small-sd15`` U-Net (256², batch 2, fp32) compiled by AOTInductor with the dynamic shapes
    ``pladis build --backend aoti`` uses and with static ones: stock, PLADIS with the op kept a call, and
    PLADIS with the compiler tracing into the op (``ops.fused_form``), interleaved. The evidence for the
    rule in ``ops`` that symbolic sizes keep the op. About 25 minutes on 2 cores (five builds)."""
    import pladis
    from pladis import families, models, ops, patch
    from pladis.engine import aoti
    from pladis.export import contracts

    def component(patched: bool):
        pipe = models.load(name)
        if patched:
            pladis.apply(pipe)
        family = patch.family_of(patch.denoiser_of(pipe)).name
        dims = contracts.dims(pipe, family, height=size, width=size, batch=1, static=False)
        comp = next(c for c in contracts.components(pipe, family) if c.name == families.get(family).component)
        return comp, dims

    variants, build_s = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, patched, shapes, trace_in in (("stock, dynamic", False, "dynamic", False),
                                                 ("PLADIS op call, dynamic", True, "dynamic", False),
                                                 ("PLADIS fused, dynamic", True, "dynamic", True),
                                                 ("stock, static", False, "static", False),
                                                 ("PLADIS fused, static", True, "static", True)):  # fmt: skip
            comp, dims = component(patched)
            samples = tuple(contracts.sample_inputs(comp, dims, torch.float32))
            t0 = time.perf_counter()
            ops._FUSION["symbolic"] = trace_in
            try:  # what `pladis build --backend aoti` runs, here also with static shapes
                path = aoti.compile_package(comp, list(samples), dims if shapes == "dynamic" else None,
                                            Path(tmp, f"{len(variants)}.pt2"))  # fmt: skip
            finally:
                ops._FUSION["symbolic"] = False
            build_s[label] = round(time.perf_counter() - t0, 1)
            print(f"{label}: built in {build_s[label]:.0f} s", flush=True)
            model = torch._inductor.aoti_load_package(path)
            variants[label] = lambda model=model, samples=samples: model(*samples)
        with torch.no_grad():
            samples = harness.interleaved(variants, warmup=2, repeats=repeats)
    med = {k: harness.summary(v)["median"] for k, v in samples.items()}
    return {"model": name, "image": size, "cfg_batch": 2, "threads": torch.get_num_threads(),
            "build_s": build_s, "summary_s": {k: harness.summary(v) for k, v in samples.items()},
            "ratios": {f"{k} / stock, {k.rsplit(', ', 1)[1]}": med[k] / med[f"stock, {k.rsplit(', ', 1)[1]}"]
                       for k in med if k.startswith("PLADIS")}}  # fmt: skip


CASES = {"denoiser": denoiser_case, "sdxl-fp16": sdxl_fp16_case, "aoti-shapes": aoti_shapes_case}
TIMED_CASES = ("denoiser", "aoti-shapes")  # interleaved variants: take --repeats, print a timing table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)}")
    harness.add_out_argument(parser)
    args = parser.parse_args(argv)
    cases = harness.chosen_cases(parser, args.cases, CASES)
    results = {}
    for case in cases:  # cases run one after the other, never side by side: each gets the whole machine
        timed = case in TIMED_CASES
        results[case] = CASES[case](args.repeats) if timed else CASES[case]()
        if timed:
            rows = [[k, f"{v['median']:.3f}", f"{v['min']:.3f}", f"{v['max']:.3f}"]
                    for k, v in results[case]["summary_s"].items()]  # fmt: skip
            print(harness.markdown_table(["variant", "median s", "min s", "max s"], rows))  # seconds
            print({k: round(v, 3) for k, v in results[case]["ratios"].items()})
        else:
            print({k: v for k, v in results[case].items() if k != "stderr_tail"})
    path = harness.save("export", {"command": "make bench-export", "results": results}, args.out, merge=True)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
