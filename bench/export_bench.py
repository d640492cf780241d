"""``make bench-export``: what export costs and what its function body costs in ONNX Runtime.

Cases (CPU; the machine is recorded with the results):
- ``denoiser``: the ``small-sd15`` U-Net (SD 1.5 layout, 92 M parameters) at 256², batch 2 (CFG), fp32:
  eager PyTorch and ONNX Runtime (CPU provider), stock attention and PLADIS, interleaved. The export
  contract's target: ORT with PLADIS function bodies at most 1.25x ORT stock.
- ``sdxl-fp16``: ``pladis export --model sdxl --precision fp16`` (no validation) in a child process:
  wall time and peak RSS, the check that full-size SDXL exports on a 24 GB machine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from pladis.bench import harness


def denoiser_case(repeats: int) -> dict:
    """The suite's denoiser comparison on ``small-sd15`` at 256², with the export contract's target."""
    from pladis.bench import suite

    out = suite._denoiser("small-sd15", 256, repeats, "cpu")
    return {
        "model": "small-sd15",
        "threads": torch.get_num_threads(),
        **out,
        "target": "ORT PLADIS / ORT stock <= 1.25",
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


CASES = {"denoiser": denoiser_case, "sdxl-fp16": sdxl_fp16_case}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)}")
    harness.add_out_argument(parser)
    args = parser.parse_args(argv)
    cases = harness.chosen_cases(parser, args.cases, CASES)
    results = {}
    for case in cases:  # cases run one after the other, never side by side: each gets the whole machine
        results[case] = CASES[case](args.repeats) if case == "denoiser" else CASES[case]()
        if case == "denoiser":
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
