"""The package as users install it: the wheel's contents, the installed source hash, the command's start-up
(no torch for --help, a missing extra named with its pip command), error exits and file modes."""

import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from pladis import cli

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel `pip wheel .` builds from a copy of the tracked files (as a user's pip does)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout")
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "HEAD"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    for rel in subprocess.run(["git", "-C", str(ROOT), "ls-files", "-m", "-o", "--exclude-standard"],
                              capture_output=True, text=True, check=True).stdout.split():  # fmt: skip
        if (ROOT / rel).is_file() and not (ROOT / rel).is_symlink():  # uncommitted work counts too
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(src)], check=True)  # fmt: skip
    return next(out.glob("pladis-*.whl"))


def test_wheel_holds_every_module_of_the_tree(wheel):
    inside = {n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".py")}
    tree = {f"pladis/{p.relative_to(ROOT / 'pladis').as_posix()}" for p in (ROOT / "pladis").rglob("*.py")}
    for d in ("export", "engine", "plugins_trt", "runtime", "bench"):  # the design card's top-level folders
        tree |= {f"pladis/{d}/{p.relative_to(ROOT / d).as_posix()}" for p in (ROOT / d).rglob("*.py")}
    assert tree and tree - inside == set(), f"modules missing from the wheel: {sorted(tree - inside)}"


def test_installed_source_hash_follows_the_operator(wheel, tmp_path):
    # A non-editable install: the cache key's source hash reads the installed files, and a changed ops.py
    # changes it (a missing module file would raise, never be skipped).
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True)  # fmt: skip
    code = ("from pladis.engine.build import source_files; from pladis.engine.cache import source_hash; "
            f"files = source_files(); assert all(str(f).startswith({str(target)!r}) for f in files), files; "
            "print(source_hash(files))")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(target)}
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    with open(target / "pladis" / "ops.py", "a") as f:
        f.write("\n# changed\n")
    second = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert second.returncode == 0 and second.stdout != first.stdout
    (target / "pladis" / "ops.py").unlink()
    gone = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert gone.returncode != 0 and "pladis.ops is missing" in gone.stderr


def test_help_answers_without_torch():
    code = "import sys; from pladis import cli\ntry:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n" \
           "print('torch' in sys.modules)"  # fmt: skip
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "export" in run.stdout and run.stdout.strip().endswith("False")


def test_every_flag_has_help(capsys):
    for name in cli.COMMANDS:
        with pytest.raises(SystemExit):
            cli.main([name, "--help"])
        text = capsys.readouterr().out
        assert "(default: None)" not in text, name
        parser = cli.build_parser(name)
        sub = next(a for a in parser._actions if a.dest == "command").choices[name]
        undocumented = [a.dest for a in sub._actions if a.dest != "help" and not a.help]
        assert not undocumented, f"pladis {name}: flags without help: {undocumented}"


def test_missing_extra_names_the_pip_command():
    # fastapi hidden: `pladis serve` says which extra to install, exit 2, no traceback
    code = ("import sys; sys.modules['fastapi'] = None; sys.modules['uvicorn'] = None\n"
            "from pladis import cli; sys.exit(cli.main(['serve', '--engine', 'nowhere']))")  # fmt: skip
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 2, run.stderr
    assert "pip install 'pladis[serve]'" in run.stderr and "Traceback" not in run.stderr


def test_failed_validation_exits_2_with_the_message(tmp_path, monkeypatch, capsys):
    from pladis.export import validate

    def fails(*args, **kwargs):
        raise validate.ValidationError("unet: out_sample rel-L2 0.5 > 1e-4 (max-abs 3 at [0, 1, 2, 3])")

    monkeypatch.setattr(validate, "component", fails)
    assert cli.main(["export", "--model", "tiny-sd15", "--out", str(tmp_path / "x"), "--components", "unet"]) == 2
    err = capsys.readouterr().err
    assert "rel-L2 0.5 > 1e-4" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_written_files_and_folders_follow_the_umask(tmp_path):
    from pladis.files import temp_dir, write_text

    old = os.umask(0o022)
    try:
        write_text(tmp_path / "a.json", "{}")
        folder = temp_dir(tmp_path / "f")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755


def test_export_folder_is_readable_by_others(tmp_path):
    from pladis.export import ExportConfig, export

    old = os.umask(0o022)
    try:
        export(ExportConfig(model="tiny-sd15", out=str(tmp_path / "e"), validate=False, components="unet"))
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "e").rglob("*")}
    assert stat.S_IMODE((tmp_path / "e").stat().st_mode) == 0o755
    assert all(m in (0o644, 0o755) for m in modes.values()), modes


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    from pladis import patch

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(patch, "layers", interrupted)
    assert cli.main(["layers", "--model", "tiny-sd15"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "pladis layers: error: interrupted" and "Traceback" not in err
