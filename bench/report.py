"""Generate ``docs/PERFORMANCE.md`` from benchmark JSON files (``make bench-report``: from ``bench/results/``).

Every measured row states its machine, versions, date and the command that reproduces it; reference
rows (figures given to the project with its brief, measured by others) and published figures of other
stacks are labelled as such, never mixed with ours.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pladis.bench.harness import markdown_table
from pladis.files import write_text

REFERENCE_ROWS = [  # given with the project's brief: NVIDIA H200, fp16, random weights, 2026-11-26 (not ours)
    ["SDXL cross-attention B=2 H=10 Lq=4096 Lk=77 D=64: torch SDPA (dense only)", "0.049 ms"],
    ["same, PLADIS as the public ports write it (SDPA + entmax15 on fp32 logits)", "2.30 ms"],
    ["same, that eager form under torch.compile", "0.595 ms"],
    ["same, a first straightforward fused Triton kernel (one pass, bisection)", "0.123 ms"],
    ["SDXL U-Net step 1024², batch 2: stock SDPA vs eager-port PLADIS (α=1.5)", "81.6 → 151.0 ms (+85%)"],
    ["same run, α = 2", "136.0 ms (+67%)"],
    ["SD 1.5 U-Net step 512², batch 2: stock vs eager-port PLADIS", "23.9 → 37.1 ms (+56%)"],
    ["SDXL U-Net step, another run: stock vs first fused kernel", "53.0 → 59.0 ms (+11%)"],
]
PUBLISHED_ROWS = [  # other stacks' own published figures, for orientation only
    ["NVIDIA TensorRT demo, SDXL 1024², 30 steps, H100, end to end", "≈ 1.47 s"],
    ["same, per U-Net step with CFG", "≈ 44 ms"],
]


def _stamp(case: dict) -> str:
    m, v = case["machine"], case.get("versions", {})
    libs = ", ".join(f"{k} {v[k]}" for k in ("torch", "onnxruntime", "onnx", "diffusers") if v.get(k))
    return f"{m['cpu']} ({m['cores']} cores), {libs}; {case['date']}"


def _export_section(data: dict) -> list[str]:
    out = ["## Export (`make bench-export`)", ""]
    den = data["results"].get("denoiser")
    if den:
        s = den["summary_s"]
        out += [
            f"Denoiser call, `{den['model']}` U-Net (SD 1.5 layout, 92 M parameters) at {den['image']}², batch "
            f"{den['cfg_batch']} (CFG), fp32, {den['threads']} threads. Variants interleaved in one process, "
            f"{s['ORT stock']['n']} rounds after warm-up. Machine: {_stamp(den)}.",
            "",
            _timing_table(s),
            "",
            markdown_table(["ratio (medians)", "value"], [[k, f"{v:.3f}"] for k, v in den["ratios"].items()]),
            "",
            *(
                [
                    "AOTInductor engine builds (`pladis build --backend aoti`, dynamic shapes): "
                    + ", ".join(f"{k} {v:.0f} s" for k, v in den["aoti_build_s"].items())
                    + ".",
                    "",
                ]
                if den.get("aoti_build_s")
                else []
            ),
            f"Target: {den['target']}. Reproduce: `make bench-export` (or "
            "`python -m pladis.bench.export_bench --cases denoiser`).",
            "",
        ]
    shapes = data["results"].get("aoti-shapes")
    if shapes:
        out += [
            f"AOTInductor, dynamic vs static shapes: `{shapes['model']}` U-Net at {shapes['image']}², batch "
            f'{shapes["cfg_batch"]}, fp32, {shapes["threads"]} threads, interleaved. "op call": the compiled '
            'model calls `pladis::attention` (its fast path); "fused": the compiler traced into the op '
            f"(`ops.fused_form`). Machine: {_stamp(shapes)}.",
            "",
            _timing_table(shapes["summary_s"]),
            "",
            markdown_table(["ratio (medians)", "value"], [[k, f"{v:.3f}"] for k, v in shapes["ratios"].items()]),
            "",
            "Builds: " + ", ".join(f"{k} {v:.0f} s" for k, v in shapes["build_s"].items()) + ". Hence the rule in "
            "`pladis/ops.py`: compilers trace into the op for static shapes only. Reproduce: "
            "`python -m pladis.bench.export_bench --cases aoti-shapes`.",
            "",
        ]
    sdxl = data["results"].get("sdxl-fp16")
    if sdxl:
        status = "ok" if sdxl["returncode"] == 0 else f"failed (exit {sdxl['returncode']})"
        gb = sum(sdxl.get("files_bytes", {}).values()) / 1e9
        out += [
            f"Full-size SDXL (random weights) exported in fp16, no validation: {status}, "
            f"{sdxl['seconds']:.0f} s wall, peak RSS {sdxl['peak_rss_gib']:.1f} GiB, {gb:.1f} GB of ONNX files. "
            f"Machine: {_stamp(sdxl)}. Command: `{sdxl['command']}`.",
            "",
        ]
    return out


_STAMP = ("date", "machine", "versions")


def _entries(case: dict) -> dict:
    """A case's measured entries, without the stamp ``harness.save`` adds beside them."""
    return {k: v for k, v in case.items() if k not in _STAMP}


def _timing_table(summary: dict) -> str:
    rows = [[k, f"{v['median'] * 1e3:.2f}", f"{v['min'] * 1e3:.2f}–{v['max'] * 1e3:.2f}"] for k, v in summary.items()]
    return markdown_table(["variant", "median ms", "min–max ms"], rows)


def _ratio_line(case: dict) -> list[str]:
    if "ratios" not in case:
        return []
    ratios = ", ".join(f"{k} = {v:.2f}" for k, v in case["ratios"].items())
    threads = f" ({case['threads']} threads" if "threads" in case else ""
    if threads:
        load = case.get("load_avg_1min")
        threads += f", 1-min load average {load} on the machine)" if load is not None else ")"
    return [f"Ratios (medians){threads}: {ratios}.", ""]


# Issue 15's targets for the PyTorch operator (medians, this CPU): (case, variant, bound on variant / SDPA).
OPERATOR_TARGETS = [("operator", "PLADIS op", 4.0), ("operator", "PLADIS op, torch.compile (fused)", 2.0),
                    ("joint", "PLADIS joint op", 3.0)]  # fmt: skip


def _targets(res: dict) -> list[str]:
    """One line per measured row against its target: met, or the measured gap."""
    lines = []
    for case, variant, bound in OPERATOR_TARGETS:
        for name, entry in _entries(res.get(case, {})).items():
            ratio = entry.get("ratios", {}).get(f"{variant} / SDPA")
            if ratio is not None:
                verdict = "met" if ratio <= bound else f"missed by {ratio / bound:.1f}x"
                lines.append(f"- `{name}`: {variant} / SDPA = {ratio:.2f} (target ≤ {bound:g}): {verdict}.")
    if not lines:
        return []
    return ["### Operator targets (issue 15)", "", *lines, "",
            "What limits the eager op: per tile it makes ~40 elementwise and row-reduction passes over the "
            "logits (softmax, 3-4 Newton steps, the closed form, the blend), each a short parallel region; "
            "SDPA is one fused kernel. On a quiet machine that costs 2.7-3.1x SDPA at one or two threads; on a "
            "loaded one other processes stall every region's barrier (an earlier run at 1-minute load 3.75 on "
            "these 2 cores measured 9-44x at two threads): compare the load average beside each row. Under "
            "torch.compile Inductor fuses the op's tensor code (`ops.fused_form`) into one kernel, but that "
            "kernel still loops over all rows once per pass (softmax, each Newton step, the closed form), "
            "reading the whole logits tensor from memory each time where the eager op's tiles stay in cache: "
            "1.8-2.6x SDPA, around the 2x target.", ""]  # fmt: skip


def _suite_section(data: dict) -> list[str]:
    res = data["results"]
    out = ["## Suite (`make bench`)", ""]
    if "operator" in res:
        out += ["### Operator", ""]
        for name, case in _entries(res["operator"]).items():
            shape = tuple(case["shape"])
            out += [f"`{name}`, (B, H, Lq, Lk, D) = {shape}, fp32, {data.get('device', 'cpu')}:", "",
                    _timing_table(case["summary_s"]), "", *_ratio_line(case)]  # fmt: skip
        out += [f"Machine: {_stamp(res['operator'])}.", ""]
    if "joint" in res:
        out += ["### Joint attention operator", ""]
        for name, case in _entries(res["joint"]).items():
            shape = tuple(case["shape"])
            out += [f"`{name}`, (B, H, text, image, D) = {shape}, text first, fp32, {data.get('device', 'cpu')}:",
                    "", _timing_table(case["summary_s"]), "", *_ratio_line(case)]  # fmt: skip
        out += [f"Machine: {_stamp(res['joint'])}.", ""]
    out += _targets(res)
    if "denoiser" in res:
        out += ["### Denoiser call (batch 2, CFG), fp32", ""]
        for name, case in _entries(res["denoiser"]).items():
            ratios = ", ".join(f"{k} = {v:.3f}" for k, v in case["ratios"].items())
            out += [f"`{name}` denoiser at {case['image']}²:", "",
                    _timing_table(case["summary_s"]), "", f"Ratios (medians): {ratios}.", ""]  # fmt: skip
        out += [f"Machine: {_stamp(res['denoiser'])}.", "",
                "Reading the rows: tiny models run in milliseconds, where the order of variants matters: ONNX "
                "Runtime's worker threads keep spinning for a while after a call and slow whatever runs next "
                "(each round runs torch stock, torch PLADIS, ORT stock, ORT PLADIS, so torch stock follows ORT "
                "PLADIS), so their torch ratios say little; the full-size `sd15` row (seconds per call) is the "
                "measurement. The ORT PLADIS / stock ratios of tiny-sd3 and tiny-flux are real: joint "
                "attention's ONNX function body adds ~30 standard ops per layer on the image-row x text-key "
                "block (dense attention plus a correction; before 2026-11-26 it blended whole (L x L) maps: "
                "4.1x and 3.4x), which weighs heavily in a denoiser this small.", ""]  # fmt: skip
    if "e2e" in res:
        out += ["### End to end (`generate`)", ""]
        for name, case in _entries(res["e2e"]).items():
            rows = [[b, *(f"{t[k]['median'] * 1000:.1f}" for k in ("encode", "per_step", "decode", "total"))]
                    for b, t in case.items()]  # fmt: skip
            out += [
                f"{name}:",
                "",
                markdown_table(["backend", "encode ms", "per step ms", "decode ms", "total ms"], rows),
                "",
            ]
        out += [f"Machine: {_stamp(res['e2e'])}.", ""]
    if "build" in res:
        out += ["### Build costs", ""]
        for name, case in _entries(res["build"]).items():
            e = case["export"]
            hit_ms = case["cache_hit_s"] * 1000
            out += [f"`{name}`: export {e['seconds']:.1f} s (peak RSS {e['peak_rss_gib']:.2f} GiB, child process), "
                    f"ORT engine build {case['ort_build_s']:.2f} s, cache hit {hit_ms:.0f} ms.", ""]  # fmt: skip
        out += [f"Machine: {_stamp(res['build'])}. Reproduce: `make bench`.", ""]
    if "serve" in res:
        out += ["### Serving (HTTP on 127.0.0.1)", ""]
        for name, c in _entries(res["serve"]).items():
            out += [f"{name}: {c['requests']} requests at concurrency {c['concurrency']} (queue {c['max_queue']}): "
                    f"{c['ok']} images, {c['429']} × 429, {c['other']} other; {c['images_per_s']:.1f} images/s, "
                    f"latency p50 {c['p50_s']:.2f} s, p95 {c['p95_s']:.2f} s.", ""]  # fmt: skip
        out += [f"Machine: {_stamp(res['serve'])}.", ""]
    return out


def _soak_section(data: dict) -> list[str]:
    c = data["results"]["soak"]
    rows = [[kind, ", ".join(f"{status} × {n}" for status, n in statuses.items())]
            for kind, statuses in c["by_kind"].items()]  # fmt: skip
    server = ", ".join(f"{s} × {n:g}" for s, n in c["server_counts"].items() if s.isdigit())
    rss = c["rss_mib"]
    return [
        "## Soak (`python -m pladis.bench.soak`)",
        "",
        f"{c['engine']}, {c['minutes']:g} minutes, {c['concurrency']} client threads on 127.0.0.1, server settings "
        f"{', '.join(f'{k}={v}' for k, v in c['settings'].items())}: {c['requests']} requests. Client-side "
        'statuses by kind ("gone": the client hung up first; "closed": the server hung up):',
        "",
        markdown_table(["kind", "statuses"], rows),
        "",
        f"Server's own counts (`pladis_requests_total`; 499: client went away): {server}. Unexplained 5xx "
        f"(anything but the deadline's 504): {c['unexplained_5xx']}; answers outside the documented ones: "
        f"{c['unexpected'] or 'none'}. Server RSS: {rss['after_warmup']:.0f} MiB after warm-up, "
        f"{rss['after_soak']:.0f} MiB after the soak, peak {rss['peak']:.0f} MiB (every 30 s: "
        f"{', '.join(f'{m:.0f}' for _, m in rss.get('every_30_s', [])) or 'not sampled'}). `/healthz` afterwards: "
        f"{'200' if c['healthy_after'] else 'not 200'}; SIGTERM to exit: {c['sigterm_exit_s']:.1f} s "
        f"(exit code {c['exit_code']}). Machine: {_stamp(c)}. Reproduce: `{data['command']}`.",
        "",
    ]


def _measured(res: dict, case: str) -> list[tuple[str, dict]]:
    """A case's measured entries (skipping a GPU-only case's "skipped" note and a failed case's error)."""
    return [(k, v) for k, v in _entries(res.get(case, {})).items() if isinstance(v, dict) and "summary_s" in v]


def _gpu_section(data: dict) -> list[str]:
    """``make gpu-check``'s benchmark (suite-cuda.json): the operators and the SDXL U-Net step on the GPU."""
    res = data["results"]
    any_case = next(iter(res.values()))
    m, v = any_case["machine"], any_case.get("versions", {})
    stamp = (f"{m.get('gpu', 'GPU')}, CUDA {m.get('cuda')}, torch {m.get('torch_build', v.get('torch'))}, "
             f"Triton {m.get('triton')}; host {m['cpu']} ({m['cores']} cores); {any_case['date']}")  # fmt: skip
    errors = [f"`{case}`: {r['error']}" for case, r in res.items() if "error" in r]
    out = ["## On a GPU (`make gpu-check`)", "", f"Machine: {stamp}. CUDA-event timings, medians; the `CUDA graph`"
           " rows replay a captured call (GPU time without Python launch overhead).", ""]  # fmt: skip
    if errors:
        out += [f"Cases that failed: {'; '.join(errors)}.", ""]
    for case, title in (("operator", "Cross-attention operator"), ("joint", "Joint attention operator")):
        for name, entry in _measured(res, case):
            out += [f"### {title}: `{name}`, shape {tuple(entry['shape'])}, {entry.get('dtype', 'float32')}", "",
                    _timing_table(entry["summary_s"]), "", *_ratio_line(entry)]  # fmt: skip
            if entry.get("failed"):
                out += ["Variants that did not run: " + "; ".join(f"{k}: {e}" for k, e in entry["failed"].items()), ""]
    for name, entry in _measured(res, "kernel_tiles"):
        errs = "; ".join(f"{k}: {v:.1e}" if isinstance(v, float) else f"{k}: {v}" for k, v in entry["rel_l2"].items())
        out += [f"### Kernel tiles: `{name}`, shape {tuple(entry['shape'])}, float16 (CUDA graph replay)", "",
                _timing_table(entry["summary_s"]), "", *_ratio_line(entry), f"rel-L2 vs float64: {errs}.",
                ""]  # fmt: skip
    for name, entry in _measured(res, "unet_step"):
        out += [f"### SDXL U-Net step: `{name}`", "", _timing_table(entry["summary_s"]), "", *_ratio_line(entry),
                f"Kernel vs PyTorch path, rel-L2 of the U-Net output: {entry['kernel vs PyTorch path rel-L2']:.2e}; "
                f"outputs finite: {entry['outputs_finite']}; peak memory {entry['memory_gb']} GiB.", ""]  # fmt: skip
        if entry.get("failed"):
            out += ["Variants that did not run: " + "; ".join(f"{k}: {e}" for k, e in entry["failed"].items()), ""]
        graphs = [entry["summary_s"].get(k) for k in ("stock (SDPA), CUDA graph", "PLADIS, fused kernel, CUDA graph")]
        if all(graphs):
            ratio = graphs[1]["median"] / graphs[0]["median"]
            verdict = "met" if ratio <= 1.03 else f"missed: +{(ratio - 1) * 100:.1f}% vs +3%"
            out += [f"PLADIS / stock with both U-Nets captured in CUDA graphs (GPU time): {ratio:.3f}; issue 15's "
                    f"goal, PLADIS within 3% of stock: {verdict}. Eager rows add Python launch overhead per "
                    "layer (about 0.2 ms per PLADIS call vs 0.05 ms for SDPA): CUDA graphs remove it (also "
                    "torch.compile's mode='reduce-overhead'); a TensorRT engine launches the plugin without "
                    "Python (not run here).", ""]  # fmt: skip
    return out


def _host_loop_section(data: dict) -> list[str]:
    """The runtime loop's host time per step with a denoiser that does nothing (``bench/host_loop.py``)."""
    res = data["results"]
    rows = []
    for name, r in res.items():
        h = r["host_ms_per_step"]
        verdict = "met" if h["median"] <= r["goal_ms"] else f"missed by {h['median'] / r['goal_ms']:.1f}x"
        rows.append([name, r["steps"], "yes" if r["cfg"] else "no", f"{h['median']:.3f}",
                     f"{h['min']:.3f}–{h['max']:.3f}", f"≤ {r['goal_ms']:g}", verdict,
                     r.get("load_avg_1min", "")])  # fmt: skip
    first = next(iter(res.values()))
    return ["## Host loop (`python -m pladis.bench.host_loop`)", "",
            "`Runtime.generate` on tiny export folders whose denoiser does nothing (returns a preallocated zero "
            "tensor): milliseconds per step spent outside the denoiser (CFG batch, input scaling, step inputs, "
            "the output copy (without CFG), guidance, the diffusers scheduler step), on the "
            f"{first.get('device', 'cpu')}, {first['threads']} threads, {first['repeats']} runs per case after a "
            "warm-up run. The latents are 4x4, so this is Python and dispatch overhead, the part of a step "
            "CUDA graphs do not remove. Goal (issue 28): ≤ 0.2 ms per step."
            + (" The row with the noise drawn ahead runs euler_a as it runs on CUDA (`Runtime.draw_ahead`): its "
               "step noise drawn before the loop, so no step waits for the GPU, for a torch function mode over "
               "each step's ops." if any(r.get("draw_ahead") for r in res.values()) else ""), "",
            markdown_table(["case", "steps", "CFG", "median ms/step", "min–max", "goal", "verdict",
                            "1-min load"], rows), "",
            f"Machine: {_stamp(first)}. Reproduce: `{data['command']}`.", ""]  # fmt: skip


def _latency_section(data: dict) -> list[str]:
    """``make gpu-check``'s end-to-end latency (``bench/latency_gpu.py``): SDXL and FLUX at 1024², stock vs
    PLADIS, eager vs CUDA graphs."""
    from pladis.bench.latency_gpu import table

    return ["## End-to-end latency on a GPU (`python -m pladis.bench.latency_gpu`)", "",
            "Random weights; per image = text encoding (each model's line names its encoders) + the "
            "denoising loop + VAE decode, host clock around a synchronised image (eager rows include Python launch "
            "overhead); the CUDA-graph rows replay the denoiser through the runtime's graph cache. The published "
            "TensorRT figure is NVIDIA's, on an H100.", "", table(data), f"Reproduce: `{data['command']}`.",
            ""]  # fmt: skip


def _aot_section(data: dict) -> list[str]:
    """The TensorRT plugin's PTX launched through the CUDA driver (tests/test_kernels.py, on a GPU)."""
    rows = [[r["case"], str(tuple(r["shape"])), r["dtype"], f"{r['aot_ms']:.3f}", f"{r['sdpa_ms']:.3f}",
             f"{r['aot_ms'] / r['sdpa_ms']:.1f}", f"{r['rel_l2']:.1e}", f"{r['block_m']}x{r['block_n']}"]
            for r in data["rows"]]  # fmt: skip
    return ["## The TensorRT plugin's kernel through the CUDA driver", "",
            f"{data['device']}, torch {data['torch']}, Triton {data['triton']}, PTX ISA {data['ptx_isa']}: the PTX "
            "that `aot_impl` returns, loaded and launched with the plugin's launch parameters and arguments (as "
            "TensorRT would; TensorRT itself not run). Per-call CUDA events around a Python launch, so small "
            "cases include launch overhead; rel-L2 vs the float64 operator.", "",
            markdown_table(["case", "(B, H, Lq, Lk, D)", "dtype", "kernel ms", "SDPA ms", "ratio", "rel-L2",
                            "tile"], rows), ""]  # fmt: skip


def _lora_section(data: dict) -> list[str]:
    """One LoRA swap on a built engine vs a re-export + build with it fused (``python -m pladis.bench.lora_swap``)."""
    from pladis.bench import lora_swap

    rows = [lora_swap.row(r) for r in data["results"].values()]
    first = next(iter(data["results"].values()))
    return ["## LoRA swap vs rebuild (`python -m pladis.bench.lora_swap`)", "",
            f"{_stamp(first)}. One run: a warm ORT engine takes a peft LoRA on every attention projection "
            "(adapter read, fused weights from the base initializers, session created), rescaled, removed; then "
            f"`pladis export --lora` + `pladis build --backend ort`. Goal: {first['goal']}.", "",
            markdown_table(lora_swap.HEADER, rows), ""]  # fmt: skip


def render(results: Path) -> str:
    """The markdown report from the JSON files in ``results``."""
    lines = [
        "# Performance",
        "",
        "Generated by `python -m pladis.bench.report` from `bench/results/*.json`; do not edit by hand.",
        "Ratios compare variants measured side by side in one process; absolute times hold for the stated",
        "machine only." + ("" if (results / "suite-cuda.json").exists() else " No GPU figure measured yet."),
        "",
    ]
    suite = results / "suite.json"
    if suite.exists():
        lines += _suite_section(json.loads(suite.read_text()))
    gpu = results / "suite-cuda.json"
    if gpu.exists():
        lines += _gpu_section(json.loads(gpu.read_text()))
    aot = results / "aot_kernel.json"
    if aot.exists():
        lines += _aot_section(json.loads(aot.read_text()))
    latency = results / "latency_gpu.json"
    if latency.exists():
        lines += _latency_section(json.loads(latency.read_text()))
    host_loop = results / "host_loop.json"
    if host_loop.exists():
        lines += _host_loop_section(json.loads(host_loop.read_text()))
    soak = results / "soak.json"
    if soak.exists():
        lines += _soak_section(json.loads(soak.read_text()))
    export = results / "export.json"
    if export.exists():
        lines += _export_section(json.loads(export.read_text()))
    swap = results / "lora_swap.json"
    if swap.exists():
        lines += _lora_section(json.loads(swap.read_text()))
    lines += [
        "## Reference figures (not measured here)",
        "",
        "Given to the project with its brief (measured by others): NVIDIA H200, fp16, random weights, 2026-11-26.",
        "",
        markdown_table(["what", "time"], REFERENCE_ROWS),
        "",
        "Published figures of other stacks, for orientation (their numbers, their machines):",
        "",
        markdown_table(["what", "time"], PUBLISHED_ROWS),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="docs/PERFORMANCE.md from benchmark JSON files")
    parser.add_argument("--results", default=".", help="folder of suite.json / export.json (default: here)")
    parser.add_argument("--doc", default="PERFORMANCE.md", help="markdown file to write (default: ./PERFORMANCE.md)")
    args = parser.parse_args(argv)
    write_text(args.doc, render(Path(args.results)))
    print(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
