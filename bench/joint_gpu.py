"""The GPU checks of the joint-attention kernel and the plugin (issue 25), one script for ``make gpu-check``.

``python -m pladis.bench.joint_gpu --out DIR [--only tiles] [--budget-s S]`` writes ``DIR/joint_gpu.json`` and prints
its table (rows not started within ``--budget-s`` are recorded as skipped):

- ``accuracy``: the joint kernel (``pladis.kernels.joint``) against the float64 operator at FLUX 1024² (512 T5
  tokens first, 4096 image tokens, 24 heads, D 128) and SD3 1024² (333 text tokens last, D 64), fp16 and bf16,
  with padded text keys and lam 2; rel-L2 over the first ``REF_HEADS`` heads (the float64 map of all 24
  would be 24 x 4608² doubles), bound ``BOUNDS`` (the map rounded to the input dtype before P·V);
- ``timing``: the PLADIS joint op (the kernel) and SDPA in CUDA-graph replay at those shapes, goal
  ``GOALS["joint"]`` x SDPA; the cross kernel at PixArt's 300 padded T5 keys, goal ``GOALS["long"]`` x SDPA;
- ``tiles``: the cross kernel's single-tile default and each key-tiled variant (``attention.sweep_configs``)
  at PixArt's 300 keys and SDXL's 77 (``TILE_CASES``), fp16, each in CUDA-graph replay beside SDPA, with its
  rel-L2 vs the float64 operator (launched by Triton, and the two defaults also as their AOT PTX through the
  CUDA driver, as TensorRT runs them); ``verdict`` says which variant meets ``GOALS["long"]`` and whether the
  tiled one keeps the short row's speed (the data for switching ``kernel_config``'s default);
- ``aot``: the PTX the TensorRT plugin's ``aot_impl`` would embed for the FLUX joint node (``plugin.plan`` for
  this GPU), launched through the CUDA driver with the plugin's launch parameters and int32 extra arguments
  and null scratch pointers, as TensorRT launches it, against the float64 operator.

The exit status is 1 when an accuracy, aot or tiles row is over its error bound or a row raised (timing goals
are reported, not enforced),
2 without a CUDA GPU. Nothing is measured on a CPU; ``table`` and ``failures`` read a result file anywhere.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

from pladis.bench import harness
from pladis.files import write_text

# name: (B, H, text tokens, image tokens, head dim, text first)
SHAPES = {
    "flux 1024²": (1, 24, 512, 4096, 128, True),
    "sd3 1024²": (1, 24, 333, 4096, 64, False),
}
PIXART = (2, 16, 4096, 300, 72)  # (B, H, Lq, Lk, D): PixArt-α 1024², T5's 300 padded keys
# name: (B, H, Lq, Lk, D, key padding): the cross kernel's long row (PixArt) and short row (SDXL 1024²'s top level)
TILE_CASES = {
    "pixart 1024² cross, 300 keys": (*PIXART, True),
    "sdxl 1024² cross, 77 keys": (2, 10, 4096, 77, 64, False),
}
DTYPES = ("float16", "bfloat16")
# rel-L2 vs float64: the map is rounded to the input dtype before P·V (2^-11 / 2^-8 relative), times
# sum |P||V| <= (2 lam - 1) max|V| (tests/tolerances.HALF)
BOUNDS = {"float16": 4e-3, "bfloat16": 3e-2}
GOALS = {"joint": 1.5, "long": 2.0}  # kernel time / SDPA time in CUDA-graph replay (the goals)
REF_HEADS = 4
LAM = 2.0


def _inputs(shape, dtype, device="cuda"):
    """q, k, v (B, H, L, D) in ``dtype`` and a bool padding mask (B, 1, 1, L) hiding the last quarter of the
    text tokens."""
    import torch

    b, h, text, image, d, text_first = shape
    length = text + image
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(b, h, length, d, device=device, generator=g).to(getattr(torch, dtype)) for _ in range(3))
    mask = torch.ones(b, 1, 1, length, dtype=torch.bool, device=device)
    t0 = 0 if text_first else image
    mask[..., t0 + text - text // 4 : t0 + text] = False
    return q, k, v, mask


def rel_l2(got, ref) -> float:
    """||got - ref|| / ||ref|| in float64."""
    return ((got.double() - ref).norm() / ref.norm()).item()


def _reference(q, k, v, mask, shape):
    """The float64 operator on the first ``REF_HEADS`` heads."""
    from pladis import ops

    b, h, text, image, d, text_first = shape
    q, k, v = (t[:, :REF_HEADS].double() for t in (q, k, v))
    return ops.reference_attention(q, k, v, mask, LAM, 1.5, d**-0.5, text, text_first)


def accuracy_row(name: str, shape, dtype: str) -> dict:
    import torch

    from pladis.kernels import joint as J

    b, h, text, image, d, text_first = shape
    q, k, v, mask = _inputs(shape, dtype)
    lam = torch.full((b,), LAM, device="cuda")
    got = J.joint_attention(q, k, v, mask, lam, 1.5, d**-0.5, text, text_first)
    err = rel_l2(got[:, :REF_HEADS], _reference(q, k, v, mask, shape))
    return {"check": "accuracy", "case": name, "dtype": dtype, "rel_l2": err, "bound": BOUNDS[dtype],
            "nan": bool(got.isnan().any()), "ok": err <= BOUNDS[dtype] and not got.isnan().any()}  # fmt: skip


def _graph_ms(variants: dict, repeats: int) -> dict:
    """Median milliseconds of each variant in CUDA-graph replay, interleaved."""
    from pladis.bench.suite import _graphed

    graphed = {name: _graphed(fn) for name, fn in variants.items()}
    for fn in graphed.values():
        fn()  # capture
    samples = harness.interleaved(graphed, warmup=2, repeats=repeats, timer=harness.cuda_timer)
    return {name: harness.summary(x)["median"] * 1000 for name, x in samples.items()}


def timing_row(name: str, shape, dtype: str, repeats: int) -> dict:
    import torch
    import torch.nn.functional as F

    import pladis

    b, h, text, image, d, text_first = shape
    q, k, v, mask = _inputs(shape, dtype)
    lam = torch.full((b,), LAM, device="cuda")
    ms = _graph_ms({
        "kernel": lambda: pladis.joint_attention(q, k, v, attn_mask=mask, lam=lam, text_len=text,
                                                 text_first=text_first),
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=d**-0.5),
    }, repeats)  # fmt: skip
    ratio = ms["kernel"] / ms["sdpa"]
    return {"check": "timing", "case": name, "dtype": dtype, "kernel_ms": ms["kernel"], "sdpa_ms": ms["sdpa"],
            "ratio": ratio, "goal": GOALS["joint"], "ok": ratio <= GOALS["joint"]}  # fmt: skip


def pixart_row(repeats: int) -> dict:
    import torch
    import torch.nn.functional as F

    import pladis

    b, h, lq, lk, d = PIXART
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, device="cuda", generator=g, dtype=torch.float16) for n in (lq, lk, lk))
    mask = torch.ones(b, 1, 1, lk, dtype=torch.bool, device="cuda")
    mask[0, ..., lk - lk // 4 :] = False
    lam = torch.full((b,), LAM, device="cuda")
    ms = _graph_ms({"kernel": lambda: pladis.attention(q, k, v, attn_mask=mask, lam=lam),
                    "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)}, repeats)  # fmt: skip
    ratio = ms["kernel"] / ms["sdpa"]
    return {"check": "timing", "case": "pixart 1024² cross, 300 keys", "dtype": "float16", "kernel_ms": ms["kernel"],
            "sdpa_ms": ms["sdpa"], "ratio": ratio, "goal": GOALS["long"], "ok": ratio <= GOALS["long"]}  # fmt: skip


def tiles_rows(name: str, shape, repeats: int) -> list[dict]:
    """One row per kernel of ``attention.sweep_configs`` at a cross-attention shape (fp16, lam 2, alpha 1.5):
    its CUDA-graph replay time beside SDPA's (all variants interleaved), ratio vs ``GOALS["long"]``, rel-L2 vs
    the float64 operator on the first ``REF_HEADS`` heads; the single-tile and the key-tiled defaults also as their
    AOT PTX (``_aot_launcher``). A variant that fails to build is a row with its error."""
    import torch
    import torch.nn.functional as F

    from pladis import ops
    from pladis.kernels import attention as K

    b, h, lq, lk, d, padding = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, device="cuda", generator=g, dtype=torch.float16) for n in (lq, lk, lk))
    keep = torch.ones(b, 1, 1, lk, dtype=torch.bool, device="cuda")
    if padding:
        keep[0, ..., lk - lk // 4 :] = False
    additive = torch.zeros(keep.shape, device="cuda", dtype=q.dtype).masked_fill(~keep, float("-inf"))
    mask4 = K._mask4(additive if padding else None, b, h, lq, lk, q.device)
    lam = torch.full((b,), LAM, device="cuda")
    ref = ops.reference_attention(*(t[:, :REF_HEADS].double() for t in (q, k, v)), keep if padding else None, LAM,
                                  1.5, d**-0.5)  # fmt: skip
    configs = K.sweep_configs("fp16", K._TORCH_DTYPES[mask4.dtype], d, d, lk, 1.5, d**-0.5, K.mask_mode(mask4.shape))
    variants, rows = {}, {}
    for vname, cfg in configs.items():
        try:
            got = K.launch_kernel(cfg, q, k, v, mask4, lam)
            err = rel_l2(got[:, :REF_HEADS], ref)
            rows[vname] = {"check": "tiles", "case": f"{name} / {vname}", "dtype": "float16", "variant": vname,
                           "tiled": cfg.key_tiled, "rel_l2": err, "bound": BOUNDS["float16"],
                           "nan": bool(got.isnan().any())}  # fmt: skip
            variants[vname] = lambda cfg=cfg: K.launch_kernel(cfg, q, k, v, mask4, lam)
        except Exception as e:  # noqa: BLE001 - a variant that does not build is a result, not the end
            rows[vname] = {"check": "tiles", "case": f"{name} / {vname}", "variant": vname, "ok": False,
                           "error": f"{type(e).__name__}: {str(e).strip()[:300]}"}  # fmt: skip
    for vname, cfg in configs.items():  # the two defaults again, as TensorRT runs them: the AOT PTX (num_stages 1)
        if vname.endswith("default)"):
            aname = f"{vname}, AOT PTX"
            try:
                run_aot, out = _aot_launcher(cfg, q, k, v, mask4, lam)
                run_aot()
                torch.cuda.synchronize()
                rows[aname] = {"check": "tiles", "case": f"{name} / {aname}", "dtype": "float16", "variant": aname,
                               "tiled": cfg.key_tiled, "rel_l2": rel_l2(out[:, :REF_HEADS], ref),
                               "bound": BOUNDS["float16"], "nan": bool(out.isnan().any())}  # fmt: skip
                variants[aname] = run_aot
            except Exception as e:  # noqa: BLE001 - as above
                rows[aname] = {"check": "tiles", "case": f"{name} / {aname}", "variant": aname, "ok": False,
                               "error": f"{type(e).__name__}: {str(e).strip()[:300]}"}  # fmt: skip
    variants["sdpa"] = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=keep if padding else None,
                                                               scale=d**-0.5)  # fmt: skip
    ms = _graph_ms(variants, repeats)
    for vname, row in rows.items():
        if "error" in row:
            continue
        ratio = ms[vname] / ms["sdpa"]
        row.update(kernel_ms=ms[vname], sdpa_ms=ms["sdpa"], ratio=ratio, goal=GOALS["long"],
                   ok=ratio <= GOALS["long"] and row["rel_l2"] <= row["bound"] and not row["nan"])  # fmt: skip
    return list(rows.values())


def _aot_launcher(cfg, q, k, v, mask, lam):
    """A function launching ``cfg``'s AOT-compiled PTX for this GPU through the CUDA driver on the current stream
    (TensorRT's launch: the plugin's grid, block and shared memory, null scratch pointers), and its output."""
    import torch

    from pladis.kernels import aot
    from pladis.kernels import attention as K
    from pladis.kernels.driver import Driver
    from pladis.plugins_trt import plugin

    ck = aot.compile_kernel(cfg, plugin.gpu_capability())
    drv = Driver()
    fn = drv.load(ck.ptx, ck.name)
    out = torch.empty(*q.shape[:3], v.shape[-1], device=q.device, dtype=q.dtype)
    launch, extra = plugin.launch_and_args(cfg, ck, q.shape, k.shape, v.shape, mask.shape, lam.shape)
    hidden = aot.expected_params(aot.ptx_entry_params(ck.ptx, ck.name), K.EXTRA_ARGS)[1]
    params = [("ptr", t.data_ptr()) for t in (q, k, v, mask, lam)] + [("i32", int(e)) for e in extra]
    params += [("ptr", out.data_ptr())] + [("ptr", 0)] * hidden  # TensorRT passes null scratch pointers

    def run():
        stream = torch.cuda.current_stream().cuda_stream
        drv.launch(fn, launch.grid, launch.block, launch.shared_mem, stream, params)

    return run, out


def verdict(result: dict) -> list[str]:
    """What the ``tiles`` rows say, one line per case: the fastest accurate variant, whether it meets
    ``GOALS["long"]``, and the best key-tiled variant against the single-tile default."""
    lines = []
    cases = dict.fromkeys(r["case"].split(" / ")[0] for r in result["rows"] if r["check"] == "tiles")
    for case in cases:
        rows = [r for r in result["rows"] if r["check"] == "tiles" and r["case"].startswith(case + " / ")]
        good = [
            r for r in rows if "error" not in r and "skipped" not in r and r["rel_l2"] <= r["bound"] and not r["nan"]
        ]
        if not good:
            lines.append(f"{case}: no variant ran within its error bound")
            continue
        best = min(good, key=lambda r: r["kernel_ms"])
        met = "meets" if best["ratio"] <= GOALS["long"] else "misses"
        line = f"{case}: fastest {best['variant']} at {best['ratio']:.2f}x SDPA ({met} <= {GOALS['long']}x)"
        default = [r for r in good if not r["tiled"]]
        tiled = [r for r in good if r["tiled"]]
        if default and tiled:
            t = min(tiled, key=lambda r: r["kernel_ms"])
            line += (f"; best key-tiled: {t['variant']} {t['kernel_ms']:.3f} ms vs single tile "
                     f"{default[0]['kernel_ms']:.3f} ms ({t['kernel_ms'] / default[0]['kernel_ms']:.2f}x)")  # fmt: skip
        lines.append(line)
    return lines


def aot_row(name: str, shape, dtype: str) -> dict:
    """The plugin's PTX for this joint node through the CUDA driver (pladis.kernels.driver), as TensorRT runs it."""
    import torch

    from pladis.kernels import aot
    from pladis.kernels.driver import Driver
    from pladis.plugins_trt import plugin

    b, h, text, image, d, text_first = shape
    q, k, v, mask = _inputs(shape, dtype)
    additive = torch.zeros(mask.shape, device="cuda", dtype=q.dtype).masked_fill(~mask, float("-inf"))
    lam = torch.full((b,), LAM, device="cuda")
    out = torch.empty_like(q)
    names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}

    def info(t):
        return plugin.TensorInfo(names[t.dtype], tuple(t.shape), tuple(t.shape))

    cfg, ck = plugin.plan(info(q), info(k), info(v), info(additive), 1.5, d**-0.5, plugin.gpu_capability(), text,
                          int(text_first))  # fmt: skip
    launch, extra = plugin.launch_and_args(cfg, ck, q.shape, k.shape, v.shape, additive.shape, lam.shape,
                                           text_len=text)  # fmt: skip
    drv = Driver()
    fn = drv.load(ck.ptx, ck.name)
    hidden = aot.expected_params(aot.ptx_entry_params(ck.ptx, ck.name))[1]
    params = [("ptr", t.data_ptr()) for t in (q, k, v, additive, lam)] + [("i32", int(e)) for e in extra]
    params += [("ptr", out.data_ptr())] + [("ptr", 0)] * hidden  # TensorRT passes null scratch pointers
    drv.launch(fn, launch.grid, launch.block, launch.shared_mem, torch.cuda.current_stream().cuda_stream, params)
    torch.cuda.synchronize()
    err = rel_l2(out[:, :REF_HEADS], _reference(q, k, v, mask, shape))
    return {"check": "aot", "case": name, "dtype": dtype, "rel_l2": err, "bound": BOUNDS[dtype],
            "kernel": ck.name, "shared_mem": ck.shared_mem, "ptx_isa": ".".join(map(str, ck.ptx_version)),
            "ok": err <= BOUNDS[dtype]}  # fmt: skip


def run(repeats: int = 20, only: str = "all", budget_s: float | None = None, checkpoint=None) -> dict:
    """Every row (``only="tiles"``: the ``tiles`` rows alone), on the current CUDA device; a row that raises
    is recorded as failed, the others still run. ``budget_s``: once that many seconds have passed, the rows
    not yet started are recorded as skipped (``"skipped"``: why), not run. ``checkpoint(result)``: called with
    the result so far after each job (``main`` writes it, so a run stopped from outside keeps its rows)."""
    import time

    import torch
    import triton

    cc = torch.cuda.get_device_capability()
    result = {"device": torch.cuda.get_device_name(), "capability": f"{cc[0]}.{cc[1]}", "torch": torch.__version__,
              "triton": triton.__version__, "date": datetime.date.today().isoformat(), "complete": False,
              "rows": []}  # fmt: skip
    rows = result["rows"]
    jobs = []
    if only == "all":
        jobs += [(accuracy_row, (n, s, dt)) for n, s in SHAPES.items() for dt in DTYPES]
        jobs += [(timing_row, (n, s, dt, repeats)) for n, s in SHAPES.items() for dt in DTYPES]
        jobs += [(pixart_row, (repeats,))]
    jobs += [(tiles_rows, (n, s, repeats)) for n, s in TILE_CASES.items()]
    if only == "all":
        jobs += [(aot_row, ("flux 1024²", SHAPES["flux 1024²"], "bfloat16"))]
    deadline = None if budget_s is None else time.monotonic() + budget_s
    for fn, args in jobs:
        if deadline is not None and time.monotonic() > deadline:
            rows.append({"check": fn.__name__.removesuffix("_row"), "case": str(args[0]), "ok": True,
                         "skipped": f"budget: {budget_s:.0f} s spent before it started"})  # fmt: skip
            continue
        try:
            got = fn(*args)
            rows.extend(got if isinstance(got, list) else [got])
        except Exception as e:  # noqa: BLE001 - one failing row is a result, not the end of the script
            rows.append({"check": fn.__name__.removesuffix("_row"), "case": str(args[0]), "ok": False,
                         "error": f"{type(e).__name__}: {str(e).strip()[:300]}"})  # fmt: skip
        torch.cuda.empty_cache()
        if checkpoint is not None:
            checkpoint(result)
    result["complete"] = True  # every job ran or was skipped: a file without it was stopped from outside
    if checkpoint is not None:
        checkpoint(result)
    return result


def failures(result: dict) -> list[str]:
    """One line per accuracy / aot / tiles row over its error bound, and per row that raised (a timing or
    tiles row that misses its time goal is reported by ``table``, not a failure)."""
    out = []
    for r in result["rows"]:
        if "skipped" in r or "error" not in r and (r["ok"] or r["check"] == "timing"):
            continue
        if "error" not in r and r["check"] == "tiles" and r["rel_l2"] <= r["bound"] and not r["nan"]:
            continue  # a tiles row over its time goal only: reported by table and verdict
        why = r.get("error") or f"rel-L2 {r['rel_l2']:.2e} > {r['bound']:.0e}"
        out.append(f"{r['check']} {r['case']} {r.get('dtype', '')}: {why}")
    return out


def table(result: dict) -> str:
    """A markdown table of the rows, headed by the card and the versions."""
    head = f"{result['device']} (sm {result['capability']}), torch {result['torch']}, triton {result['triton']}"
    stopped = "" if result.get("complete", True) else " (stopped before its last rows: these are the rows it finished)"
    lines = [f"{head}, {result['date']}{stopped}", "", "| check | case | dtype | result | bound / goal | ok |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in result["rows"]:
        if "skipped" in r:
            value, limit = f"skipped ({r['skipped']})", ""
        elif "error" in r:
            value, limit = r["error"], ""
        elif r["check"] == "timing":
            value = f"{r['kernel_ms']:.3f} ms vs SDPA {r['sdpa_ms']:.3f} ms = {r['ratio']:.2f}x"
            limit = f"<= {r['goal']}x"
        elif r["check"] == "tiles":
            value = f"{r['kernel_ms']:.3f} ms vs SDPA {r['sdpa_ms']:.3f} ms = {r['ratio']:.2f}x"
            value += f", rel-L2 {r['rel_l2']:.2e}"
            limit = f"<= {r['goal']}x, <= {r['bound']:.0e}"
        else:
            value, limit = f"rel-L2 {r['rel_l2']:.2e}", f"<= {r['bound']:.0e}"
        lines.append(f"| {r['check']} | {r['case']} | {r.get('dtype', '')} | {value} | {limit} | "
                     f"{'yes' if r['ok'] else 'no'} |")  # fmt: skip
    notes = verdict(result)
    return "\n".join(lines + ([""] + notes if notes else []))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pladis.bench.joint_gpu", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench/results", help="folder for joint_gpu.json")
    parser.add_argument("--repeats", type=int, default=20, help="timed CUDA-graph replays per variant")
    parser.add_argument("--only", choices=("all", "tiles"), default="all",
                        help="tiles: only the cross kernel's tile sweep (single tile vs key-tiled)")  # fmt: skip
    parser.add_argument("--budget-s", type=float, default=None,
                        help="seconds after which rows not yet started are skipped (default: no limit)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.budget_s is not None and not args.budget_s > 0:
        parser.error(f"--budget-s must be positive seconds; got {args.budget_s}")
    if not harness.cuda_here("joint_gpu"):
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save(result: dict) -> None:  # after every job: a run stopped by gpu-check's timeout keeps its rows
        write_text(out / "joint_gpu.json", json.dumps(result, indent=2) + "\n")  # each write renamed into place whole

    result = run(args.repeats, args.only, args.budget_s, save)  # its last save is the complete result
    return harness.finish("joint_gpu", table(result), failures(result))


if __name__ == "__main__":
    sys.exit(main())
