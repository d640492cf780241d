"""The benchmark harness (statistics, interleaving, merge, report): fake clocks are fine here."""

import json
from pathlib import Path

from pladis.bench import harness, report


def test_interleaved_runs_variants_in_turn_after_warmup():
    calls, ticks = [], iter(range(100))
    variants = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    samples = harness.interleaved(variants, warmup=1, repeats=3, timer=harness.wall_timer(lambda: float(next(ticks))))
    assert calls == ["a", "b"] * 4  # one warm-up round, then three timed rounds, interleaved
    assert samples == {"a": [1.0, 1.0, 1.0], "b": [1.0, 1.0, 1.0]}


def test_summary_and_table():
    assert harness.summary([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    table = harness.markdown_table(["a", "b"], [[1, "x"]])
    assert table.splitlines() == ["| a | b |", "| --- | --- |", "| 1 | x |"]


def test_save_merges_cases_and_report_renders(tmp_path):
    den = {"model": "small-sd15", "image": 256, "cfg_batch": 2, "threads": 2,
           "summary_s": {k: {"median": m, "min": m, "max": m, "n": 3} for k, m in
                         [("torch stock", 0.3), ("torch PLADIS", 0.4), ("ORT stock", 0.2), ("ORT PLADIS", 0.24)]},
           "ratios": {"ORT PLADIS / ORT stock": 1.2}, "target": "ORT PLADIS / ORT stock <= 1.25"}  # fmt: skip
    harness.save("export", {"results": {"denoiser": den}}, tmp_path, merge=True)
    sdxl = {"command": "x", "returncode": 0, "seconds": 100.0, "peak_rss_gib": 9.5, "files_bytes": {"unet.onnx": 5e9}}
    harness.save("export", {"results": {"sdxl-fp16": sdxl}}, tmp_path, merge=True)
    saved = json.loads((tmp_path / "export.json").read_text())
    assert set(saved["results"]) == {"denoiser", "sdxl-fp16"}  # the second run kept the first case
    assert saved["results"]["denoiser"]["machine"]["cores"] > 0 and saved["results"]["denoiser"]["date"]
    text = report.render(tmp_path)
    assert "| ORT PLADIS / ORT stock | 1.200 |" in text and "peak RSS 9.5 GiB" in text
    assert "Reference figures (not measured here)" in text and "0.049 ms" in text


def test_smallest_suite_cases_run_end_to_end(tmp_path, monkeypatch):
    # One repeat of the cheap cases (the suite's own code path); no speed is asserted.
    from pladis.bench import suite

    monkeypatch.chdir(tmp_path)  # results go to the working directory by default, never into the package
    monkeypatch.setattr(suite, "OPERATOR_SHAPES", {"small": (1, 2, 64, 77, 16)})
    monkeypatch.setattr(suite, "JOINT_SHAPES", {"small": (1, 2, 7, 45, 16)})
    assert suite.main(["--cases", "operator,joint,e2e", "--repeats", "1", "--device", "cpu"]) == 0
    saved = json.loads((tmp_path / "suite.json").read_text())["results"]
    assert saved["operator"]["small, 1 thread"]["summary_s"]["PLADIS op"]["n"] == 1
    assert "PLADIS op, torch.compile (fused) / SDPA" in saved["operator"]["small, 1 thread"]["ratios"]
    assert saved["joint"]["small, 1 thread"]["summary_s"]["PLADIS joint op"]["n"] == 1
    assert set(saved["e2e"]["tiny-sdxl, 4 steps, CFG"]) == {"torch", "ort"}
    assert report.main(["--results", str(tmp_path), "--doc", str(tmp_path / "perf.md")]) == 0
    doc = (tmp_path / "perf.md").read_text()
    assert "### Operator" in doc and "### Joint attention operator" in doc and "### End to end" in doc


def test_host_loop_arguments_line_and_report_section(tmp_path):
    import pytest

    from pladis.bench import host_loop

    args = host_loop.parse(["--cases", "sdxl euler (CFG)", "--repeats", "2", "--steps", "3", "--out", str(tmp_path)])
    assert args.cases == ["sdxl euler (CFG)"] and args.repeats == 2 and args.steps == 3 and args.device == "cpu"
    for bad in (["--cases", "nope"], ["--repeats", "0"]):
        with pytest.raises(SystemExit):
            host_loop.parse(bad)
    # a recorded result's shape (made-up numbers: not a measurement)
    r = {"model": "tiny-sdxl", "scheduler": "euler", "steps": 30, "cfg": True, "repeats": 2, "goal_ms": 0.2,
         "host_ms_per_step": {"median": 0.5, "min": 0.25, "max": 0.75}, "step_ms_with_null_denoiser": 0.6,
         "threads": 2, "device": "cpu", "load_avg_1min": 1.5}  # fmt: skip
    assert host_loop.line("x", r) == ("x: 0.500 ms host per step (min 0.250, max 0.750; 30 steps x 2), goal <= 0.2 "
                                      "ms: missed by 2.5x")  # fmt: skip
    harness.save("host_loop", {"command": "python -m pladis.bench.host_loop", "results": {"sdxl euler (CFG)": r}},
                 tmp_path)  # fmt: skip
    text = report.render(tmp_path)
    assert "## Host loop (`python -m pladis.bench.host_loop`)" in text
    assert "| sdxl euler (CFG) | 30 | yes | 0.500 | 0.250–0.750 | ≤ 0.2 | missed by 2.5x | 1.5 |" in text


# --------------------------------------------------------------------------------------------------
# The end-to-end GPU latency script (bench/latency_gpu.py, run by make gpu-check): its CPU-side parts
# --------------------------------------------------------------------------------------------------

SAMPLE = Path(__file__).parent / "samples" / "latency_gpu.sample.json"  # made-up numbers: not a measurement


def test_latency_gpu_arguments_and_the_issue_settings():
    import pytest

    from pladis.bench import latency_gpu as L

    args = L.parse([])
    assert (args.models, args.steps_sdxl, args.steps_dit, args.images) == (["sdxl", "dit"], 30, 28, 2)
    assert L.SIZE == 1024 and L.FLUX_CONFIG["num_layers"] == 19 and L.FLUX_CONFIG["num_single_layers"] == 38
    assert L.TARGETS == {"pladis_over_stock_image": 1.03, "flux_step": 1.05, "sdxl_vs_published": 1.2}
    args = L.parse(["--models", "dit", "--steps-dit", "4", "--images", "1", "--budget-s", "60"])
    assert (args.models, args.steps_dit, args.images, args.budget_s) == (["dit"], 4, 1, 60.0)
    for bad in (["--models", "sd3"], ["--images", "0"], ["--budget-s", "0"], ["--models", ","]):
        with pytest.raises(SystemExit):
            L.parse(bad)


def test_latency_gpu_measures_nothing_without_a_gpu(tmp_path):
    import pytest
    import torch

    from pladis.bench import latency_gpu as L

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: make gpu-check runs the script")
    assert L.main(["--out", str(tmp_path / "never")]) == 2 and not (tmp_path / "never").exists()


def test_latency_gpu_report_from_the_recorded_sample_says_it_is_a_sample(tmp_path):
    from pladis.bench import latency_gpu as L

    data = json.loads(SAMPLE.read_text())
    assert "nothing here was measured" in data["sample"]
    (tmp_path / "latency_gpu.json").write_text(SAMPLE.read_text())
    text = report.render(tmp_path)
    assert "## End-to-end latency on a GPU (`python -m pladis.bench.latency_gpu`)" in text
    assert "**SAMPLE, not a measurement:**" in text
    assert "| PLADIS, CUDA graph | 1.400 | 10.0 | 43.00 | 100.0 | 12.5 | 2 | yes |" in text
    assert "- sdxl: PLADIS / stock per image, CUDA graphs: 1.022 (target ≤ 1.03): met" in text
    assert "- dit: not measured (OutOfMemoryError" in text
    assert L.failures(data) == ["dit: " + data["models"]["dit"]["error"]]
    # the verdicts are recomputed from the rows, not copied: a slower PLADIS graph misses the 3%
    data["models"]["sdxl"]["variants"]["PLADIS, CUDA graph"]["image_s"] = 1.5
    missed = L.verdicts("sdxl", data["models"]["sdxl"])[0]
    assert not missed["met"] and abs(missed["value"] - 1.5 / 1.37) < 1e-9


def test_latency_gpu_loop_runs_on_a_cpu_with_tiny_models_and_the_graphs_falling_back(monkeypatch, tmp_path):
    # The script's own loop and measurement on tiny random models (CPU): every variant runs; the CUDA-graph
    # variants fall back to eager (cuda_capture refuses without a GPU) and the result says so. No speed asserted.
    import time

    import torch

    from pladis.bench import latency_gpu as L

    if torch.cuda.is_available():
        import pytest

        pytest.skip("a GPU is here: the graphs would be captured")
    monkeypatch.setattr(L, "DEVICE", "cpu")
    tiny = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
                guidance_embeds=True)  # fmt: skip
    text = {"clip": dict(hidden=32, layers=1, heads=2, inter=37, proj=32, vocab=1000, act="quick_gelu"),
            "t5": dict(vocab_size=256, d_model=32, d_kv=16, d_ff=37, num_layers=1, num_heads=2,
                       feed_forward_proj="gated-gelu")}  # fmt: skip
    model = L.Flux(tiny, size=32, vae_channels=(8, 8, 8, 8), text_tokens=8, text=text)
    cond = model.encode()  # the text encoders' outputs in the transformer's conditioning, as FluxPipeline's
    with torch.no_grad():
        ids = model.t5_tokenizer([L.PROMPT], padding="max_length", max_length=8, truncation=True,
                                 return_tensors="pt").input_ids  # fmt: skip
        assert torch.equal(cond["encoder_hidden_states"], model.t5(ids)[0].to(torch.bfloat16))
    assert cond["encoder_hidden_states"].shape == (1, 8, 32) and cond["pooled_projections"].shape == (1, 32)
    flux = L.measure(model, 1, 1, time.monotonic() + 60)
    assert set(flux["variants"]) == set(L.VARIANTS) and flux["graphs_captured"] == 0 and flux["layers"] == 1
    assert "T5 encoder (1 layers, d_model 32, 8 tokens)" in flux["text_encoders"]
    assert all(v["encode_s"] > 0 for v in flux["variants"].values())  # the text encoders run inside each image
    assert set(flux["graph_failures"]) == {"dit stock, CUDA graph", "dit PLADIS, CUDA graph"}
    assert all(v["n"] == 1 and v["finite"] and v["image_s"] >= v["steps_s"] > 0 for v in flux["variants"].values())
    flux.update(peak_gib=0.0, targets=L.verdicts("dit", flux))
    assert [t["target"] for t in flux["targets"]] == ["dit: PLADIS / stock per image, CUDA graphs",
                                                      "dit: PLADIS / stock per step, CUDA graphs"]  # fmt: skip
    result = {**json.loads(SAMPLE.read_text()), "models": {"dit": flux}}
    assert "Graph captures that failed (ran eagerly): dit stock, CUDA graph:" in L.table(result)
    assert "text encoding: CLIP text model (1 layers, hidden 32)" in L.table(result)
