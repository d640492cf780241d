"""``make bench``: the benchmark suite (CPU here; GPU rows where a GPU is present). Results in
``bench/results/suite.json``; ``docs/PERFORMANCE.md`` is regenerated from it.

Cases, each comparing its variants interleaved in one process on the same inputs:
- ``operator``: PLADIS op (the sort-free fast path here; the fused kernel on a GPU), the same under
  torch.compile with Inductor fusing it, the exact sort solver, SDPA, and the eager form of the public
  ports (softmax + the ``entmax`` package on fp32 logits).
- ``joint``: joint (MMDiT) attention at a FLUX-like shape: the PLADIS joint op vs SDPA vs the exact
  sort solver.
- ``unet_step`` (GPU only): one full-size SDXL U-Net call at 1024², fp16: stock, PLADIS with the kernel, PLADIS
  through the PyTorch path; eager and captured in CUDA graphs.
- ``kernel_tiles`` (GPU only): the kernel's GPU time per query tile and warp count, and its error.
- ``denoiser``: one denoiser call, eager PyTorch and ONNX Runtime, stock attention and PLADIS, for
  ``tiny-sdxl`` and the full-size random-weight ``sd15`` (at 256² on a CPU), batch 2 (CFG).
- ``e2e``: ``generate`` for 4 steps with each backend, split into encode / per step / decode.
- ``build``: export time and peak RSS (child process), ONNX Runtime engine build time, cache-hit time.
- ``serve``: the HTTP server on 127.0.0.1, 200 requests at concurrency 16: images/s, p50/p95, 429s.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time

import torch

from pladis.bench import harness
from pladis.errors import error_line

OPERATOR_SHAPES = {  # (B, H, Lq, Lk, D): SD 1.5 and SDXL at 512²/1024² latents' top level, PixArt T5 keys
    "sd15 64x64 Lk77": (2, 8, 4096, 77, 40),
    "sdxl 64x64 Lk77": (2, 10, 4096, 77, 64),
    "pixart 32x32 Lk120": (2, 16, 1024, 120, 72),
}


def _thread_counts(device: str) -> list[int]:
    """CPU: 1 thread and all of them. The eager op runs ~40 short parallel regions per tile, which another
    process on a shared machine stalls far more than SDPA's one: both rows are recorded, side by side."""
    return sorted({1, torch.get_num_threads()}) if device == "cpu" else [torch.get_num_threads()]


def _per_thread_count(measure, shapes: dict, repeats: int, device: str) -> dict:
    out, default = {}, torch.get_num_threads()
    try:
        for n in _thread_counts(device):
            torch.set_num_threads(n)
            for name, shape in shapes.items():
                out[f"{name}, {n} thread{'s' if n > 1 else ''}"] = measure(shape, repeats, device)
    finally:
        torch.set_num_threads(default)
    return out


def operator_case(repeats: int, device: str) -> dict:
    return _per_thread_count(_operator, OPERATOR_SHAPES, repeats, device)


def _compiled_fused(fn):
    """``fn`` under torch.compile, where Inductor fuses the op's tensor code (``ops.fused_form``), compiled on
    first use (Inductor fixes the thread count of its kernels when it compiles them)."""
    return torch.compile(fn, fullgraph=True)


def _load() -> dict:
    """Threads used and the machine's 1-minute load average right after the measurement: on a shared CPU,
    other processes stall the many short parallel regions of the eager op far more than SDPA's one."""
    return {"threads": torch.get_num_threads(), "load_avg_1min": round(os.getloadavg()[0], 2)}


def _ratios(summary: dict, base: str = "SDPA") -> dict:
    return {f"{k} / {base}": v["median"] / summary[base]["median"] for k, v in summary.items() if k != base}


def _operator(shape: tuple[int, ...], repeats: int, device: str) -> dict:
    import torch.nn.functional as F
    from entmax import entmax15

    import pladis
    from pladis import ops

    b, h, lq, lk, d = shape
    dtype = torch.float32 if device == "cpu" else torch.float16  # what each device's deployments run
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, generator=g, device=device).to(dtype) for n in (lq, lk, lk))
    lam = torch.full((1,), 2.0, device=device)

    def eager_port():  # SDPA's dense map + entmax15 on fp32 logits, blended: the public ports' form
        s = (q.float() @ k.float().transpose(-1, -2)) * d**-0.5
        dense = torch.softmax(s, -1)
        return ((dense + 2.0 * (entmax15(s, dim=-1) - dense)).to(v.dtype)) @ v

    variants = {"SDPA": lambda: F.scaled_dot_product_attention(q, k, v),
                "PLADIS op": lambda: pladis.attention(q, k, v),
                "PLADIS op, torch.compile (fused)": _compiled_fused(lambda: pladis.attention(q, k, v)),
                "exact sort solver (float64 path, here fp32)": lambda: ops.reference_attention(
                    q, k, v, None, lam, 1.5, d**-0.5),
                "eager port": eager_port}  # fmt: skip
    if device != "cpu":  # there the op is the Triton kernel; the PyTorch path is its fallback
        variants["PLADIS PyTorch path (no kernel)"] = lambda: ops.pytorch_attention(q, k, v, None, lam, 1.5, d**-0.5)
        # GPU time alone, launch overhead removed (CUDA graph replay): what a captured or CPU-ahead loop sees
        variants["SDPA, CUDA graph"] = _graphed(lambda: F.scaled_dot_product_attention(q, k, v))
        variants["PLADIS op, CUDA graph"] = _graphed(lambda: pladis.attention(q, k, v, lam=lam))
    variants, failed = _runnable(variants)
    samples = harness.interleaved(variants, warmup=1, repeats=repeats, timer=_timer(device))
    summary = {name: harness.summary(x) for name, x in samples.items()}
    return {"shape": list(shape), "dtype": str(dtype).removeprefix("torch."), **_load(), "summary_s": summary,
            "ratios": _ratios(summary), **({"failed": failed} if failed else {})}  # fmt: skip


def _graphed(fn):
    """``fn`` captured once in a CUDA graph; the returned function replays it. Capture happens on first
    call (``_runnable`` makes that call), so a capture failure costs only this variant."""
    graph = []

    def replay():
        if not graph:
            fn()  # warm-up outside capture: Triton compiles, allocators settle
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            graph.append(g)
        graph[0].replay()

    return replay


def _runnable(variants: dict) -> tuple[dict, dict]:
    """The variants whose first call succeeds, and {name: error} for the others (a compiler that fails on
    one device should cost its row, not the whole suite)."""
    ok, failed = {}, {}
    for name, fn in variants.items():
        try:
            fn()
            ok[name] = fn
        except Exception as e:  # noqa: BLE001 - recorded in the results
            failed[name] = error_line(e, 300)
    return ok, failed


JOINT_SHAPES = {  # (B, H, text, image, D): FLUX-like double-stream block at 512² (1024 image tokens), T5 512
    "flux-like 512 text + 1024 image": (1, 24, 512, 1024, 128),
}


def joint_case(repeats: int, device: str) -> dict:
    return _per_thread_count(_joint, JOINT_SHAPES, repeats, device)


def _joint(shape: tuple[int, ...], repeats: int, device: str) -> dict:
    import torch.nn.functional as F

    import pladis
    from pladis import ops

    b, h, text, image, d = shape
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(b, h, text + image, d, generator=g, device=device) for _ in range(3))
    lam = torch.full((1,), 2.0, device=device)
    variants = {"SDPA": lambda: F.scaled_dot_product_attention(q, k, v),
                "PLADIS joint op": lambda: pladis.joint_attention(q, k, v, text_len=text, text_first=True),
                "exact sort solver (float64 path, here fp32)": lambda: ops.reference_attention(
                    q, k, v, None, lam, 1.5, d**-0.5, text, True)}  # fmt: skip
    samples = harness.interleaved(variants, warmup=1, repeats=repeats, timer=_timer(device))
    summary = {name: harness.summary(x) for name, x in samples.items()}
    return {"shape": list(shape), **_load(), "summary_s": summary, "ratios": _ratios(summary)}


UNET_STEP = {"sdxl 1024x1024, batch 2 (CFG), fp16": (2, 128, 77)}  # (cfg batch, latent size, text tokens)


def unet_step_case(repeats: int, device: str) -> dict:
    """GPU only: one full-size SDXL U-Net call (random weights, built on the GPU in fp16): stock SDPA
    attention, PLADIS with the fused kernel, and PLADIS through the PyTorch path (kernel disabled)."""
    if device == "cpu":
        return {"skipped": "GPU only (the full-size SDXL U-Net at 1024² takes minutes per call on a CPU)"}
    return {name: _unet_step(shape, repeats, device) for name, shape in UNET_STEP.items()}


def _unet_step(shape: tuple[int, int, int], repeats: int, device: str) -> dict:
    from unittest import mock

    from diffusers import UNet2DConditionModel

    import pladis
    from pladis import models
    from pladis.kernels import attention as kernel

    batch, size, tokens = shape
    dtype = torch.float16
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        prev = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            unet = UNet2DConditionModel(**models.sdxl_unet_config()).eval()
        finally:
            torch.set_default_dtype(prev)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, 4, size, size, generator=g, device=device, dtype=dtype)
    ctx = torch.randn(batch, tokens, 2048, generator=g, device=device, dtype=dtype)
    time_ids = [[1024.0, 1024, 0, 0, 1024, 1024]] * batch  # SDXL's size conditioning: original, crop, target
    added = {"text_embeds": torch.randn(batch, 1280, generator=g, device=device, dtype=dtype),
             "time_ids": torch.tensor(time_ids, device=device, dtype=dtype)}  # fmt: skip
    t = torch.tensor(500, device=device)
    stock = dict(unet.attn_processors)
    pladis.apply(unet)
    patched = dict(unet.attn_processors)

    def forward(no_kernel: bool = False):
        with (
            torch.no_grad(),
            mock.patch.object(kernel, "supported", lambda *a: False) if no_kernel else contextlib.nullcontext(),
        ):
            return unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample

    # name: (processors to set before the call or None, the call returning the output)
    variants = {"stock (SDPA)": (stock, forward), "PLADIS, fused kernel": (patched, forward),
                "PLADIS, PyTorch path (no kernel)": (patched, lambda: forward(no_kernel=True))}  # fmt: skip
    failed = {}
    for name, procs in (("stock (SDPA), CUDA graph", stock), ("PLADIS, fused kernel, CUDA graph", patched)):
        try:  # the whole U-Net captured once and replayed: GPU time without Python launch overhead
            unet.set_attn_processor(dict(procs))
            forward()
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = forward()
            variants[name] = (None, lambda graph=graph, out=static_out: graph.replay() or out)
        except Exception as e:  # noqa: BLE001 - recorded in the results
            failed[name] = error_line(e, 300)
    samples: dict[str, list[float]] = {name: [] for name in variants}
    outs = {}
    for round_ in range(2 + max(5, repeats // 2)):  # 2 warm-up rounds, then timed rounds, variants interleaved
        for name, (procs, fn) in variants.items():
            if procs is not None:
                unet.set_attn_processor(dict(procs))  # a copy: diffusers pops from it. Untimed: ~140 modules
            torch.cuda.synchronize()
            dt = harness.cuda_timer(lambda name=name, fn=fn: outs.__setitem__(name, fn()))
            if round_ >= 2:
                samples[name].append(dt)
    summary = {name: harness.summary(v) for name, v in samples.items()}
    ref = outs["PLADIS, PyTorch path (no kernel)"].float()
    kernel_vs_path = ((outs["PLADIS, fused kernel"].float() - ref).norm() / ref.norm()).item()
    return {"shape": list(shape), "summary_s": summary, "ratios": _ratios(summary, "stock (SDPA)"),
            "outputs_finite": all(bool(torch.isfinite(v).all()) for v in outs.values()),
            "kernel vs PyTorch path rel-L2": kernel_vs_path, **({"failed": failed} if failed else {}),
            "memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1)}  # fmt: skip


TILE_SHAPES = {  # (B, H, Lq, Lk, D, padding mask): the kernel's two key tiles at their deployment shapes
    "sdxl 128x128 Lk77": (2, 10, 4096, 77, 64, False),
    "pixart 64x64 Lk300 (T5, padding)": (2, 16, 4096, 300, 72, True),
}


def kernel_tiles_case(repeats: int, device: str) -> dict:
    """GPU only: the fused kernel's GPU time (CUDA graph replay) per query tile and warp count, against
    SDPA, with each variant's error vs the float64 operator: the data for choosing ``kernel_config``."""
    if device == "cpu":
        return {"skipped": "GPU only"}
    return {name: _kernel_tiles(shape, device) for name, shape in TILE_SHAPES.items()}


def _kernel_tiles(shape, device: str) -> dict:
    import dataclasses

    import torch.nn.functional as F

    from pladis import ops
    from pladis.kernels import attention as K

    b, h, lq, lk, d, padding = shape
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, generator=g, device=device, dtype=torch.float16) for n in (lq, lk, lk))
    mask = torch.zeros(b, 1, 1, lk, device=device, dtype=torch.float16) if padding else None
    if padding:
        mask[0, ..., lk - lk // 4 :] = float("-inf")
    lam = torch.full((1,), 2.0, device=device)
    ref = ops.reference_attention(q.double(), k.double(), v.double(), None if mask is None else mask.double(), 2.0,
                                  1.5, d**-0.5)  # fmt: skip
    mask4 = K._mask4(mask, b, h, lq, lk, q.device)
    base = K.kernel_config("fp16", "fp16" if padding else "fp32", d, d, lk, 1.5, d**-0.5, K.mask_mode(mask4.shape))
    sizes = K.extra_args(q.shape, k.shape, v.shape, mask4.shape, lam.shape)
    rows = {"SDPA": _graphed(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=d**-0.5))}
    errors = {}
    for block_m in (16, 32, 64, 128):
        for warps in (4, 8):
            if block_m * base.block_n > 16384:
                continue
            cfg = dataclasses.replace(base, block_m=block_m, num_warps=warps)
            out = torch.empty(b, h, lq, d, device=device, dtype=q.dtype)
            grid = K.launch(b, h, lq, block_m=block_m, num_warps=warps, shared_mem=0).grid

            def call(cfg=cfg, out=out, grid=grid):
                K.pladis_fwd[grid](q, k, v, mask4, lam, *sizes, out, **cfg.constexprs(), num_warps=cfg.num_warps)

            name = f"kernel {block_m}x{base.block_n}, {warps} warps" + (" (chosen)" if cfg == base else "")
            try:
                call()
                errors[name] = ((out.double() - ref).norm() / ref.norm()).item()
                rows[name] = _graphed(call)
            except Exception as e:  # noqa: BLE001 - a tile that does not compile or fit is a result too
                errors[name] = error_line(e)
    rows, failed = _runnable(rows)
    samples = harness.interleaved(rows, warmup=2, repeats=20, timer=_timer(device))
    summary = {name: harness.summary(x) for name, x in samples.items()}
    return {"shape": [b, h, lq, lk, d], "dtype": "float16", "summary_s": summary, "ratios": _ratios(summary),
            "rel_l2": errors, **({"failed": failed} if failed else {})}  # fmt: skip


def _timer(device: str):
    return harness.cuda_timer if device != "cpu" else harness.wall_timer()


DENOISER_MODELS = {"tiny-sdxl": 32, "tiny-sd3": 32, "tiny-flux": 32, "sd15": 256}  # model -> image size here


def denoiser_case(repeats: int, device: str) -> dict:
    return {name: _denoiser(name, size, repeats, device) for name, size in DENOISER_MODELS.items()}


def _denoiser(name: str, size: int, repeats: int, device: str, aoti: bool = False) -> dict:
    """One denoiser call (batch 2, CFG, fp32), stock vs PLADIS: eager torch and ORT engines, and with ``aoti``
    also AOTInductor engines made by ``pladis build --backend aoti`` (about 2 minutes each for small-sd15 on
    2 cores), all interleaved."""
    import pladis
    from pladis import families, models, patch
    from pladis.export import ExportConfig, contracts, export
    from pladis.manifest import open_engine, read_manifest
    from pladis.runtime.backends import OrtBackend

    meta = models.load(name, device="meta")
    component = next(a for a in families.denoiser_components() if hasattr(meta, a))  # "unet" or "transformer"
    with tempfile.TemporaryDirectory() as tmp:
        for lam in (0.0, 2.0):
            export(ExportConfig(model=name, out=f"{tmp}/{lam}", lam=lam, height=size, width=size,
                                components=component, validate=False))  # fmt: skip
        manifest = read_manifest(f"{tmp}/0.0")
        family = manifest.family
        stock, patched = (patch.denoiser_of(models.load(name)) for _ in range(2))
        pladis.apply(patched)
        comp = next(c for c in contracts.components(meta, family) if c.name == component)  # stock contract
        pladis.apply(meta)
        comp_p = next(c for c in contracts.components(meta, family) if c.name == component)  # + pladis_scale
        dims = dict(manifest.dims)
        tensors = contracts.sample_inputs(comp, dims, torch.float32)
        inputs = dict(zip([i.name for i in comp.inputs], tensors, strict=True))
        # lam is a runtime input of the PLADIS graph: the default strength for every sample
        inputs_p = {**inputs, "pladis_scale": torch.full((dims["cfg_batch"][1],), 2.0)}
        ort, compiled, build_s = {}, {}, {}
        for lam in (0.0, 2.0):
            ort[lam] = OrtBackend(open_engine(f"{tmp}/{lam}"), component, device)
            ort[lam].load()
            if aoti:
                from pladis.engine import BuildConfig, build
                from pladis.runtime.backends import AotiBackend

                meta = build(BuildConfig(onnx=f"{tmp}/{lam}", out=f"{tmp}/{lam}-aoti", backend="aoti",
                                         device=device, cache_dir=f"{tmp}/cache"))  # fmt: skip
                build_s["PLADIS" if lam else "stock"] = meta["build_seconds"]
                compiled[lam] = AotiBackend(open_engine(f"{tmp}/{lam}-aoti"), component, device)
                compiled[lam].load()

        def eager(model, c, x):
            def run():
                with torch.no_grad():
                    c.forward(model, **x)

            return run

        variants = {"torch stock": eager(stock, comp, inputs), "torch PLADIS": eager(patched, comp_p, inputs_p),
                    "ORT stock": lambda: ort[0.0].run(inputs),
                    "ORT PLADIS": lambda: ort[2.0].run(inputs_p)}  # fmt: skip
        if aoti:
            variants |= {"AOTI stock": lambda: compiled[0.0].run(inputs),
                         "AOTI PLADIS": lambda: compiled[2.0].run(inputs_p)}  # fmt: skip
        # tiny models run in milliseconds, where scheduling noise dominates: more rounds for them
        rounds = repeats if size >= 256 else max(repeats, 30)
        samples = harness.interleaved(variants, warmup=3, repeats=rounds, timer=_timer(device))
    med = {k: harness.summary(v)["median"] for k, v in samples.items()}
    pairs = [("torch PLADIS", "torch stock"), ("ORT PLADIS", "ORT stock"), ("AOTI PLADIS", "AOTI stock"),
             ("ORT stock", "torch stock"), ("ORT PLADIS", "torch PLADIS"), ("AOTI stock", "torch stock")]  # fmt: skip
    return {"image": size, "cfg_batch": dims["cfg_batch"][1], **({"aoti_build_s": build_s} if aoti else {}),
            "summary_s": {k: harness.summary(v) for k, v in samples.items()},
            "ratios": {f"{a} / {b}": med[a] / med[b] for a, b in pairs if a in med and b in med}}  # fmt: skip


def e2e_case(repeats: int, device: str) -> dict:
    from pladis.export import ExportConfig, export
    from pladis.runtime import Runtime

    with tempfile.TemporaryDirectory() as tmp:
        export(ExportConfig(model="tiny-sdxl", out=f"{tmp}/e", validate=False))
        out = {}
        for backend in ("torch", "ort"):
            rt = Runtime(f"{tmp}/e", backend, device=device)
            rt.generate("a red cube", steps=4, seed=0, progress=False)  # warm-up
            runs = [rt.generate("a red cube", steps=4, seed=0, progress=False).timings for _ in range(repeats)]
            out[backend] = {k: harness.summary([r[k] for r in runs]) for k in ("encode", "per_step", "decode", "total")}
    return {"tiny-sdxl, 4 steps, CFG": out}


def build_case(repeats: int, device: str) -> dict:
    from pladis.engine import BuildConfig, build

    with tempfile.TemporaryDirectory() as tmp:
        exp = harness.run_child(["export", "--model", "tiny-sdxl", "--out", f"{tmp}/onnx", "--no-validate"])
        exp["command"] = exp["command"].replace(tmp, "OUT")
        cfg = BuildConfig(onnx=f"{tmp}/onnx", out=f"{tmp}/engine", cache_dir=f"{tmp}/cache", device=device)
        t0 = time.perf_counter()
        build(cfg)
        t1 = time.perf_counter()
        build(BuildConfig(**{**cfg.__dict__, "out": f"{tmp}/engine2"}))  # a cache hit into a new folder
        t2 = time.perf_counter()
    return {"tiny-sdxl": {"export": exp, "ort_build_s": round(t1 - t0, 3), "cache_hit_s": round(t2 - t1, 3)}}


def serve_case(repeats: int, device: str, requests: int = 200, concurrency: int = 16) -> dict:
    """The HTTP server on 127.0.0.1 under a bounded load: throughput, p50/p95 latency, 429s (not asserted)."""
    import concurrent.futures

    import httpx
    import numpy as np

    from pladis.export import ExportConfig, export
    from pladis.serve import ServeConfig, run_in_thread

    with tempfile.TemporaryDirectory() as tmp:
        export(ExportConfig(model="tiny-sdxl", out=f"{tmp}/e", validate=False))
        cfg = ServeConfig(engine=f"{tmp}/e", port=0, max_queue=32, device=device)
        url, stop = run_in_thread(cfg)

        def one(i):
            t0 = time.monotonic()
            r = httpx.post(f"{url}/v1/images/generations", json={"prompt": "a red cube", "steps": 4, "seed": i},
                           timeout=120)  # fmt: skip
            return r.status_code, time.monotonic() - t0

        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            answers = list(pool.map(one, range(requests)))
        elapsed = time.monotonic() - t0
        stop()
    ok = [lat for code, lat in answers if code == 200]
    return {"tiny-sdxl, 4 steps, CFG": {
        "requests": requests, "concurrency": concurrency, "max_queue": cfg.max_queue, "ok": len(ok),
        "429": sum(code == 429 for code, _ in answers), "other": sum(code not in (200, 429) for code, _ in answers),
        "images_per_s": len(ok) / elapsed, "p50_s": float(np.percentile(ok, 50)), "p95_s": float(np.percentile(ok, 95)),
    }}  # fmt: skip


CASES = {"operator": operator_case, "joint": joint_case, "unet_step": unet_step_case, "kernel_tiles": kernel_tiles_case,
         "denoiser": denoiser_case, "e2e": e2e_case, "build": build_case, "serve": serve_case}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    harness.add_out_argument(parser)
    args = parser.parse_args(argv)
    cases = harness.chosen_cases(parser, args.cases, CASES)
    results = {}
    for case in cases:
        t0 = time.perf_counter()
        try:
            results[case] = CASES[case](args.repeats, args.device)
        except Exception as e:  # one broken case must not lose the others' results
            results[case] = {"error": f"{type(e).__name__}: {e}"[:500]}
            print(f"{case}: failed: {results[case]['error']}", file=sys.stderr)
        print(f"{case}: {time.perf_counter() - t0:.0f} s")
    # GPU results go to their own file (suite-cuda.json): CPU and GPU rows of one case never overwrite each other
    name, command = ("suite", "make bench") if args.device == "cpu" else (f"suite-{args.device}", "make gpu-check")
    path = harness.save(name, {"command": command, "device": args.device, "results": results}, args.out, merge=True)
    print(f"wrote {path}")
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
