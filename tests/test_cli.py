"""The `pladis` command: the demo end to end, the layer listing, and errors that name the problem."""

from pladis import cli


def test_demo_writes_report_and_image(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--steps", "2", "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "3 layers" in report and "restored bit for bit: True" in report
    from PIL import Image

    assert Image.open(out / "comparison.png").size[0] > 3 * 32 * 8  # three zoomed panels side by side
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporaries
    assert "PLADIS demo" in capsys.readouterr().out


def test_layers_lists_sdxl(capsys):
    assert cli.main(["layers", "--model", "sdxl"]) == 0
    assert "60 layers" in capsys.readouterr().out


def test_bad_values_exit_2_with_a_message(tmp_path, capsys):
    assert cli.main(["demo", "--lam", "nan", "--out", str(tmp_path)]) == 2
    assert "lam must be a finite number" in capsys.readouterr().err
    assert cli.main(["demo", "--model", "nope", "--out", str(tmp_path)]) == 2
    assert "demo model must be a built-in" in capsys.readouterr().err
    assert not (tmp_path / "report.md").exists()
