"""The benchmark harness (statistics, interleaving, merge, report): fake clocks are fine here."""

import json

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
