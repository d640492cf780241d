"""The `pladis` command: the demo end to end (its report well-formed), the layer listing, and errors that name the
problem (the error and output contract in general: test_errors.py)."""

import numpy as np

from pladis import cli, demo


def test_demo_runs_the_whole_path(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--steps", "2", "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "Parity: ort engine vs eager PyTorch" in report and "PASS" in report
    assert (out / "engine" / "manifest.json").exists()  # one export serves both lam = 0 and lam
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| run |"))
    table = lines[start : lines.index("", start)]
    assert len(table) == 4, table  # header, rule, the stock run, the PLADIS run
    assert len({line.count(" | ") for line in table}) == 1, table  # every row has the header's columns
    from PIL import Image

    comparison = np.asarray(Image.open(out / "comparison.png").convert("L"))
    assert comparison.shape[1] > 3 * 32 * 8  # three zoomed panels side by side
    panel = (comparison.shape[1] - 2 * 8) // 3
    for i in range(3):  # each panel under a label: dark text in the white band above it
        band = comparison[: demo.CAPTION, i * (panel + 8) : i * (panel + 8) + panel]
        assert (band < 128).any() and (band > 250).mean() > 0.5, i
    assert Image.open(out / "parity.png").size[0] > 400
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporaries
    assert "PLADIS demo" in capsys.readouterr().out


def test_layers_lists_sdxl(capsys):
    assert cli.main(["layers", "--model", "sdxl"]) == 0
    assert "60 layers" in capsys.readouterr().out


def test_bad_values_exit_2_with_a_message(tmp_path, capsys):
    assert cli.main(["demo", "--lam", "nan", "--out", str(tmp_path)]) == 2
    assert "lam must be a finite number" in capsys.readouterr().err
    assert cli.main(["demo", "--lam", "11", "--out", str(tmp_path)]) == 2
    assert "lam must be a finite number in [0, 10]" in capsys.readouterr().err
    assert cli.main(["demo", "--model", "nope", "--out", str(tmp_path)]) == 2
    assert "demo model must be a built-in" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # refused before any work


def test_export_command(tmp_path, capsys):
    out = tmp_path / "tiny"
    assert cli.main(["export", "--model", "tiny-sd15", "--out", str(out), "--no-validate", "--static"]) == 0
    printed = capsys.readouterr().out
    assert "| unet | unet.onnx | float32 |" in printed and (out / "manifest.json").exists()
    assert cli.main(["export", "--model", "tiny-sd15", "--out", str(out)]) == 2  # not empty, no --force
    assert "holds an earlier export; pass --force" in capsys.readouterr().err
    assert cli.main(["export", "--model", "tiny-sd15", "--out", str(tmp_path / "x"), "--precision", "fp8"]) == 2
    assert "precision must be one of" in capsys.readouterr().err


def test_lora_on_a_folder_pladis_did_not_write_says_what_to_pass(tmp_path, capsys):
    assert cli.main(["lora", "--engine", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "is not an engine or export folder written by pladis: pass --engine with a folder written by" in err
    assert not (tmp_path / "out").exists()
