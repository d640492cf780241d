"""The error and output contract of the `pladis` command and the library: one line for a user's mistake (exit 2),
a traceback and a hint for a bug, module loggers that the command shows and the Python API keeps quiet,
`--help` without torch, full disks, and the one precision table."""

import errno
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from pladis import cli, options, precision
from pladis.engine import BuildConfig
from pladis.export import ExportConfig, export

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def _one_line(capsys, *needles):
    err = capsys.readouterr().err
    lines = [x for x in err.replace("\r", "\n").splitlines() if x.strip() and "%|" not in x]  # not progress bars
    assert "Traceback" not in err and len(lines) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


# ---- --help: light, and saying what each switch does -------------------------------------------------------


def test_help_imports_no_torch():
    commands = list(cli.COMMANDS)
    code = (
        "import sys\nfrom pladis import cli\n"
        f"for c in {commands!r}:\n"
        "    try:\n        cli.main([c, '--help'])\n    except SystemExit:\n        pass\n"
        "heavy = [m for m in ('torch', 'onnx', 'onnxruntime', 'diffusers', 'transformers') if m in sys.modules]\n"
        "print('HEAVY', heavy, file=sys.stderr)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert out.returncode == 0 and "HEAVY []" in out.stderr, out.stderr[-2000:]


@pytest.mark.parametrize(
    "command,flag",
    [("export", "--no-function-body"), ("export", "--no-validate"), ("build", "--no-verify"),
     ("generate", "--no-verify")],
)  # fmt: skip
def test_off_switches_say_they_turn_something_off(command, flag):
    parser = cli.build_parser(command)
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    action = next(a for a in sub._actions if flag in a.option_strings)
    assert action.help.startswith("do not "), action.help  # the field's help says what the setting does when on


# ---- one line for a mistake, a traceback for a bug ---------------------------------------------------------


def test_bad_flag_values_are_one_line(tmp_path, capsys):
    assert cli.main(["export", "--model", "tiny-sd15", "--out", str(tmp_path / "x"), "--precision", "fp8"]) == 2
    _one_line(capsys, "pladis export: error: precision must be one of fp32, fp16, bf16")
    with pytest.raises(SystemExit) as exit_:  # argparse's own type check
        cli.main(["export", "--opset", "seventeen"])
    assert exit_.value.code == 2
    _one_line(capsys, "pladis export: error: argument --opset: invalid int value: 'seventeen'", "pladis export --help")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "argv,needle",
    [(["generate", "--stepz", "3"], "pladis generate: error: unrecognized arguments: --stepz 3"),
     (["-v", "cache", "list", "extra"], "pladis cache: error: unrecognized arguments: extra"),
     (["generate", "--steps"], "pladis generate: error: argument --steps: expected one argument"),
     (["frobnicate"], "pladis: error: argument COMMAND: invalid choice: 'frobnicate'")],
)  # fmt: skip
def test_argparse_mistakes_are_one_line_naming_the_command(argv, needle, capsys):
    # argparse's default printed its whole usage block above the error; a flag the command lacks was blamed on
    # `pladis` instead of the command whose --help lists the flags
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    _one_line(capsys, needle, "--help` lists the flags")


@pytest.mark.parametrize("lam", ["11", "-1"])
def test_export_refuses_a_lam_outside_the_range_it_records(tmp_path, capsys, monkeypatch, lam):
    from pladis import sources

    monkeypatch.setattr(sources, "load", lambda *a, **k: pytest.fail("loaded the model before checking lam"))
    assert cli.main(["export", "--model", "tiny-sd15", "--out", str(tmp_path / "x"), f"--lam={lam}"]) == 2
    _one_line(capsys, "lam must be a finite number in [0, 10]", f"got {float(lam)!r}")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("error", [ZeroDivisionError("division by zero"), ValueError("an internal bad value")])
def test_a_bug_keeps_its_traceback(tmp_path, capsys, monkeypatch, error):
    from pladis.export import exporter

    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(exporter, "_size", broken)  # inside the export, after the model is loaded
    status = cli.main(["export", "--model", "tiny-sd15", "--out", str(tmp_path / "x"), "--no-validate"])
    err = capsys.readouterr().err
    assert status == 1, err  # not 2: this is no user mistake
    assert "Traceback" in err and type(error).__name__ in err and "in broken" in err, err
    assert err.strip().splitlines()[-1] == f"pladis export: error: {cli.BUG_HINT}"
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".*"))


# ---- logging: the command shows it, the library keeps quiet --------------------------------------------------


def test_the_python_api_prints_nothing_at_the_default_level(tmp_path, capfd, caplog, unconfigured):
    caplog.set_level(logging.WARNING)  # the default of an application that configured nothing
    export(ExportConfig(model="tiny-sd15", out=str(tmp_path / "x"), components="unet"))  # validated: it logs
    out, err = capfd.readouterr()
    assert out == "", out
    assert "ONNX Runtime vs eager" not in err and "export tiny-sd15" not in err, err  # no log line, no progress bar
    assert not any(r.name.startswith("pladis") for r in caplog.records)
    caplog.set_level(logging.INFO, logger="pladis")  # ... and an application that asks gets the lines
    export(ExportConfig(model="tiny-sd15", out=str(tmp_path / "y"), components="unet"))
    assert any("ONNX Runtime vs eager" in r.getMessage() for r in caplog.records if r.name.startswith("pladis"))


def test_verbose_adds_pladis_debug_lines(tmp_path, capsys):
    argv = ["export", "--model", "tiny-sd15", "--components", "unet"]
    assert cli.main([*argv, "--out", str(tmp_path / "a")]) == 0
    plain = capsys.readouterr().out
    assert "  unet: ONNX Runtime vs eager" in plain and "debug " not in plain  # the default output, as before
    assert cli.main(["-v", *argv, "--out", str(tmp_path / "b")]) == 0
    assert "debug pladis.export.exporter: unet: traced to unet.onnx" in capsys.readouterr().out


def test_vv_shows_the_export_log_lines_and_the_default_hides_known_noise(tmp_path):
    def run(*flags, out):
        argv = [sys.executable, "-m", "pladis.cli", *flags, "export", "--model", "tiny-sd15", "--out", str(out)]
        return subprocess.run(argv, capture_output=True, text=True, env=ENV, timeout=600, cwd=tmp_path)

    loud = run("-vv", out=tmp_path / "a")
    assert loud.returncode == 0, loud.stderr[-3000:]
    for component in ("text_encoder", "unet", "vae_decoder"):
        assert f"debug pladis.export.exporter: {component}: traced to {component}.onnx" in loud.stdout
        assert f"  {component}: ONNX Runtime vs eager" in loud.stdout
    # -vv turns on the libraries' own debug logging. Which warnings they emit depends on what else is installed
    # (the torchvision notice is not printed everywhere), so the check is on a debug line transformers always logs.
    assert "Successfully imported torch version" in loud.stderr, loud.stderr[-3000:]
    quiet = run(out=tmp_path / "b")
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert "  unet: ONNX Runtime vs eager" in quiet.stdout and "debug " not in quiet.stdout
    noises = ("Successfully imported torch", "requires torchvision", "should be kept in float32: []", "FutureWarning")
    for noise in noises:
        assert noise not in quiet.stderr, quiet.stderr[-3000:]


# ---- a full disk -------------------------------------------------------------------------------------------


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_during_export_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    from pladis.export import exporter

    monkeypatch.setattr(exporter.onnx, "save_model", _enospc)
    out = tmp_path / "x"
    assert cli.main(["export", "--model", "tiny-sd15", "--out", str(out), "--no-validate"]) == 2
    _one_line(capsys, f"no space left on device in {tmp_path}")
    assert not out.exists() and not list(tmp_path.iterdir())  # nothing half-written, no temporary


# ---- the ground floor --------------------------------------------------------------------------------------


def test_the_precision_table_agrees_with_each_library():
    import onnxruntime  # noqa: F401  (ORT feeds are numpy arrays of these types)

    assert precision.PRECISIONS == ("fp32", "fp16", "bf16")
    for t in precision.TYPES:
        dt = getattr(torch, t.dtype)
        assert isinstance(dt, torch.dtype) and precision.torch_dtype(t.dtype) is dt
        assert onnx.helper.tensor_dtype_to_np_dtype(getattr(onnx.TensorProto, t.onnx)).itemsize == dt.itemsize
        if t.numpy:
            assert (
                np.dtype(precision.numpy_type(t.dtype)).str == t.typestr and np.dtype(t.numpy).itemsize == dt.itemsize
            )
        if t.precision:
            assert precision.torch_dtype(t.precision) is dt
    assert precision.BY_DTYPE["bfloat16"].onnx == "BFLOAT16"  # bfloat16 included (ORT on a GPU runs it)


def test_default_folders_are_the_options_and_the_makefile_agrees():
    assert ExportConfig().out == options.DEFAULT_EXPORT and BuildConfig().onnx == options.DEFAULT_EXPORT
    assert BuildConfig().out == options.DEFAULT_ENGINE
    plan = subprocess.run(["make", "-n", "-B", "engine"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    if plan.returncode != 0:
        pytest.skip(f"make -n failed here: {plan.stderr[-300:]}")
    text = plan.stdout.replace("\\\n", " ")
    build_line = next(line for line in text.splitlines() if " build " in line)
    assert f"--onnx {options.DEFAULT_EXPORT} " in build_line and f"--out {options.DEFAULT_ENGINE}" in build_line
    export_line = next(line for line in text.splitlines() if " export " in line)
    assert f"--out {options.DEFAULT_EXPORT} " in export_line


# Every user-facing failure is a PladisError: the CLI shows any other exception as a bug, with its traceback.
# pladis.manifest's one ValueError is internal (Manifest.from_dict's callers turn it into an EngineError).
SOURCES = sorted(  # each file once: pladis/export etc. are symlinks to the top-level folders
    {str(path.resolve().relative_to(ROOT)) for folder in ("pladis", "export", "engine", "runtime", "plugins_trt")
     for path in (ROOT / folder).rglob("*.py")}
)  # fmt: skip


@pytest.mark.parametrize("path", SOURCES)
def test_no_module_raises_a_bare_value_error_or_prints(path):
    code = [line for line in (ROOT / path).read_text().splitlines() if not line.lstrip().startswith("#")]
    assert not [line for line in code if "raise ValueError" in line] or path == "pladis/manifest.py", path
    # the CLI prints results; `pladis parity` prints its table before it writes files (a failed write loses nothing)
    printers = ("pladis/cli.py", "runtime/commands.py")
    assert not [line for line in code if line.lstrip().startswith("print(")] or path in printers, path
