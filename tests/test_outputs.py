"""Nothing lost, nothing stale: the output rule (sentinel files survive), the verified immutable cache, and
folders that check themselves before any work (fault injection on every file kind)."""

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pladis import cli, files
from pladis.engine import BuildConfig, build, cache
from pladis.export import ExportConfig, export
from pladis.manifest import open_engine
from pladis.runtime import EngineError, Runtime

ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

SENTINEL = "user data, not pladis's"


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("x") / "export"
    export(ExportConfig(model="tiny-sd15", out=str(out), validate=False))
    return out


@pytest.fixture(scope="module")
def engine_dir(export_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("e")
    build(BuildConfig(onnx=str(export_dir), out=str(root / "engine"), cache_dir=str(root / "cache")))
    return root / "engine"


def _user_folder(tmp_path, name="userdata"):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "thesis.txt").write_text(SENTINEL)
    return folder


def _fails(capsys, argv, *needles):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


# ---- the output rule ------------------------------------------------------------------------------


def test_build_never_replaces_what_pladis_did_not_write(export_dir, tmp_path, capsys):
    user = _user_folder(tmp_path)
    notes = tmp_path / "notes.txt"
    notes.write_text(SENTINEL)
    common = ["build", "--onnx", str(export_dir), "--cache-dir", str(tmp_path / "cache")]
    for force in ([], ["--force"]):
        _fails(capsys, [*common, "--out", str(user), *force], "a folder pladis did not write")
        _fails(capsys, [*common, "--out", str(notes), *force], "not a folder")
        _fails(capsys, [*common, "--out", str(export_dir), *force], "is (or contains) the input")
        _fails(capsys, [*common, "--out", str(export_dir.parent), *force], "is (or contains) the input")
        # inside the export: an `export --force` on it would delete the engine with it
        _fails(capsys, [*common, "--out", str(export_dir / "engine"), *force], "is inside the input")
    assert not (export_dir / "engine").exists()
    assert (user / "thesis.txt").read_text() == SENTINEL and notes.read_text() == SENTINEL
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("cache")) == ["notes.txt", "userdata"]
    assert (export_dir / "manifest.json").is_file()


def test_export_never_replaces_what_pladis_did_not_write(tmp_path, capsys):
    user = _user_folder(tmp_path, "mydata")
    notes = tmp_path / "notes.txt"
    notes.write_text(SENTINEL)
    for force in ([], ["--force"]):
        _fails(capsys, ["export", "--model", "tiny-sd15", "--out", str(notes), *force], "not a folder")
        _fails(capsys, ["export", "--model", "tiny-sd15", "--out", str(user), *force], "did not write")
        # the model source itself (a local folder) as the output
        _fails(capsys, ["export", "--model", str(user), "--out", str(user), *force], "is (or contains) the input")
    assert (user / "thesis.txt").read_text() == SENTINEL and notes.read_text() == SENTINEL


def test_engine_replaced_only_with_force(export_dir, tmp_path, capsys):
    args = ["build", "--onnx", str(export_dir), "--out", str(tmp_path / "eng"), "--cache-dir", str(tmp_path / "c")]
    assert cli.main(args) == 0
    assert cli.main([*args, "--opt-level", "1"]) == 2  # another engine in an existing engine folder
    assert "pass --force" in capsys.readouterr().err
    assert cli.main([*args, "--opt-level", "1", "--force"]) == 0
    assert json.loads((tmp_path / "eng" / "engine.json").read_text())["flags"]["opt_level"] == 1


def test_force_replaces_a_pladis_folder_only_while_it_holds_nothing_else(export_dir, tmp_path, capsys):
    from pladis.files import INVENTORY

    eng = tmp_path / "eng"
    args = ["build", "--onnx", str(export_dir), "--out", str(eng), "--cache-dir", str(tmp_path / "c")]
    assert cli.main(args) == 0
    # the inventory lists exactly the files the build left (an independent walk of the folder)
    walked = sorted(p.relative_to(eng).as_posix() for p in eng.rglob("*") if p.is_file() and p.name != INVENTORY)
    assert (eng / INVENTORY).read_text().splitlines() == walked and "engine.json" in walked
    (eng / "my-notes.txt").write_text(SENTINEL)
    (eng / "scheduler" / "keep.txt").write_text(SENTINEL)
    _fails(capsys, [*args, "--opt-level", "1", "--force"], "did not write (my-notes.txt, scheduler/keep.txt)",
           "move them out")  # fmt: skip
    assert (eng / "my-notes.txt").read_text() == SENTINEL and (eng / "scheduler" / "keep.txt").read_text() == SENTINEL
    assert json.loads((eng / "engine.json").read_text())["flags"]["opt_level"] != 1  # the old engine, untouched
    (eng / "my-notes.txt").unlink()
    (eng / "scheduler" / "keep.txt").unlink()
    assert cli.main([*args, "--opt-level", "1", "--force"]) == 0  # nothing of the user's left in it: replaced
    assert json.loads((eng / "engine.json").read_text())["flags"]["opt_level"] == 1


def test_bad_output_paths_are_refused_before_any_work(engine_dir, tmp_path, capsys):
    gen = ["generate", "--engine", str(engine_dir), "--steps", "1"]
    (tmp_path / "dir").mkdir()
    _fails(capsys, [*gen, "--out", str(tmp_path / "dir")], "is a folder")
    _fails(capsys, [*gen, "--out", str(tmp_path / "pic.gif")], "must end in one of .png, .jpg, .jpeg, .webp")
    (tmp_path / "file").write_text(SENTINEL)
    _fails(capsys, [*gen, "--out", str(tmp_path / "file" / "x.png")], "cannot write in")
    (tmp_path / "old.png").write_text(SENTINEL)
    _fails(capsys, [*gen, "--out", str(tmp_path / "old.png")], "exists; pass --force")
    assert (tmp_path / "old.png").read_text() == SENTINEL
    _fails(capsys, ["parity", "--engine", str(engine_dir), "--json", str(tmp_path / "file" / "p.json")],
           "cannot write in")  # fmt: skip
    _fails(capsys, [*gen, "--prompt", "  ", "--out", str(tmp_path / "a.png")], "prompt is empty")
    _fails(capsys, [*gen, "--component-backends", "unet=tensorflow", "--out", str(tmp_path / "a.png")],
           "unknown backend 'tensorflow'")  # fmt: skip
    assert not (tmp_path / "a.png").exists()


def test_image_format_follows_the_suffix(engine_dir, tmp_path):
    from PIL import Image

    assert cli.main(["generate", "--engine", str(engine_dir), "--steps", "1", "--out", str(tmp_path / "p.jpg")]) == 0
    assert Image.open(tmp_path / "p.jpg").format == "JPEG"


def test_parity_prints_before_it_writes(engine_dir, tmp_path, capsys, monkeypatch):
    from pladis.runtime import parity

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(parity, "write_text", disk_full)
    assert cli.main(["parity", "--engine", str(engine_dir), "--steps", "1", "--json", str(tmp_path / "p.json")]) == 2
    printed = capsys.readouterr()
    assert "| step |" in printed.out  # the result was shown before the write failed
    assert printed.err.strip().splitlines()[-1].startswith("pladis parity: error: no space left on device")


# ---- the cache -----------------------------------------------------------------------------------


def _logged(caplog) -> str:
    text = caplog.text
    caplog.clear()
    return text


def test_a_corrupted_engine_folder_cannot_spread(export_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pladis")
    c = dict(onnx=str(export_dir), cache_dir=str(tmp_path / "cache"))
    build(BuildConfig(out=str(tmp_path / "a"), **c))
    build(BuildConfig(out=str(tmp_path / "b"), **c))
    assert "cache hit" in _logged(caplog)
    unet = json.loads((tmp_path / "a" / "engine.json").read_text())["components"]["unet"]["file"]
    assert os.stat(tmp_path / "a" / unet).st_ino != os.stat(tmp_path / "b" / unet).st_ino  # no shared inodes
    with open(tmp_path / "a" / unet, "r+b") as f:
        f.truncate(100)
    Runtime(tmp_path / "b")  # the other engine folder is intact
    with pytest.raises(EngineError, match="does not match engine.json's sha256"):
        Runtime(tmp_path / "a")
    build(BuildConfig(out=str(tmp_path / "a"), force=True, **c))  # not "up to date": repaired from the cache
    assert "cache hit" in _logged(caplog)
    Runtime(tmp_path / "a")


def test_a_damaged_entry_is_evicted_and_rebuilt(export_dir, tmp_path, capsys, caplog):
    c = dict(onnx=str(export_dir), cache_dir=str(tmp_path / "cache"))
    meta = build(BuildConfig(out=str(tmp_path / "a"), **c))
    entry = tmp_path / "cache" / meta["key"]
    victim = entry / meta["components"]["unet"]["file"]
    assert not os.access(victim, os.W_OK) or os.geteuid() == 0  # read-only (root writes anyway)
    assert oct(victim.stat().st_mode & 0o222) == "0o0"
    victim.chmod(0o644)
    victim.write_bytes(b"broken")
    assert cli.main(["cache", "verify", "--cache-dir", str(tmp_path / "cache")]) == 1
    assert "DAMAGED" in capsys.readouterr().out
    build(BuildConfig(out=str(tmp_path / "b"), **c))
    assert "evicting it and rebuilding" in caplog.text  # a warning: shown even to a caller who set up nothing
    Runtime(tmp_path / "b")
    assert cli.main(["cache", "verify", "--cache-dir", str(tmp_path / "cache")]) == 0


def test_key_covers_every_file_the_engine_receives(export_dir, tmp_path):
    from pladis.engine import check, key_parts

    copy = tmp_path / "export"
    shutil.copytree(export_dir, copy)
    cfg = BuildConfig(onnx=str(copy), verify=False)
    before = cache.key(key_parts(cfg, *check(cfg), {"kind": "cpu"}))
    sched = copy / "scheduler" / "scheduler_config.json"
    sched.write_text(sched.read_text().replace('"steps_offset": 1', '"steps_offset": 0'))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["scheduler/scheduler_config.json"] = cache.sha256(sched)  # a consistent edit
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert cache.key(key_parts(cfg, *check(cfg), {"kind": "cpu"})) != before


KEY = "ab" * 32  # a key-shaped name: what the cache itself writes


def _killed_build(cache_dir):
    """A process that takes a build's lock and temporary in ``cache_dir``, killed with SIGKILL mid-build."""
    code = (
        "import time\nfrom pathlib import Path\nfrom pladis.engine import cache\nfrom pladis.files import temp_dir\n"
        f"c = Path({str(cache_dir)!r})\n"
        f"with cache.locked(c, {KEY!r}):\n"
        f"    (temp_dir(c / {KEY!r}) / 'unet.onnx').write_bytes(b'half')\n"
        "    print('holding', flush=True)\n    time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout.readline().strip() == "holding"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    temps = list(cache_dir.glob(f".{KEY}.*.tmp"))
    assert len(temps) == 1 and (cache_dir / f"{KEY}.lock").exists()
    return temps[0]


def test_leftovers_of_killed_runs_are_shown_and_cleaned(export_dir, tmp_path, capsys):
    cache_dir = tmp_path / "cache"
    stale = _killed_build(cache_dir)
    for action in ("list", "verify"):
        assert cli.main(["cache", action, "--cache-dir", str(cache_dir)]) == 0
        out = capsys.readouterr().out
        assert f"| {stale.name} |" in out and "temporary of a killed build" in out, out
        assert f"| {KEY}.lock |" in out and "lock of a killed build" in out, out
    build(BuildConfig(onnx=str(export_dir), out=str(tmp_path / "e"), cache_dir=str(cache_dir)))
    assert not stale.exists() and not (cache_dir / f"{KEY}.lock").exists()
    assert not list(cache_dir.glob("*.lock"))  # the build removed its own lock too
    _killed_build(cache_dir)
    assert cli.main(["cache", "clean", "--cache-dir", str(cache_dir)]) == 0
    assert "removed 2" in capsys.readouterr().out
    assert sorted(p.name for p in cache_dir.iterdir()) == sorted(
        [cache.MARKER, *(e.name for e in cache.entries(cache_dir))]
    )
    dead = 2**22 + 12345  # above the default pid_max of 2^22: no such process
    stale_export = tmp_path / f".x.{dead}.0123abcd.tmp"
    stale_export.mkdir()
    export(ExportConfig(model="tiny-sd15", out=str(tmp_path / "x"), validate=False, components="unet"))
    assert not stale_export.exists()


def _plant_user_data(folder):
    """What a user keeps in a folder mistaken for the cache: an export, an engine folder, a sentinel, a lock."""
    folder.mkdir(parents=True, exist_ok=True)
    _user_folder(folder, "notes")
    (folder / "mine.lock").write_text(SENTINEL)
    (folder / ".hidden.123.abcd.tmp").write_text(SENTINEL)
    return {p.name: p for p in folder.iterdir()}


def test_cache_commands_refuse_a_folder_that_is_not_the_cache(export_dir, engine_dir, tmp_path, capsys):
    user = tmp_path / "build"
    shutil.copytree(export_dir, user / "export")
    shutil.copytree(engine_dir, user / "engine")
    planted = _plant_user_data(user)
    for action in ("clean", "list", "verify"):
        _fails(capsys, ["cache", action, "--cache-dir", str(user)], "is not a pladis engine cache")
    _fails(capsys, ["build", "--onnx", str(export_dir), "--out", str(tmp_path / "e"), "--cache-dir", str(user)],
           "is not a pladis engine cache")  # fmt: skip
    assert all(p.exists() for p in planted.values()) and (user / "notes" / "thesis.txt").read_text() == SENTINEL
    assert open_engine(user / "export") and open_engine(user / "engine")  # both still whole


def test_cache_clean_touches_only_what_the_cache_wrote(export_dir, tmp_path, capsys):
    cache_dir = tmp_path / "cache"
    meta = build(BuildConfig(onnx=str(export_dir), out=str(tmp_path / "e"), cache_dir=str(cache_dir)))
    planted = _plant_user_data(cache_dir)  # a user's files inside the real cache (PLADIS_CACHE=shared folder)
    assert cli.main(["cache", "list", "--cache-dir", str(cache_dir)]) == 0
    listed = capsys.readouterr().out
    assert meta["key"][:12] in listed and not any(name in listed for name in planted), listed
    assert cli.main(["cache", "verify", "--cache-dir", str(cache_dir)]) == 0
    assert cli.main(["cache", "clean", "--cache-dir", str(cache_dir)]) == 0
    assert "removed 0" in capsys.readouterr().out
    assert all(p.exists() for p in planted.values()) and (cache_dir / meta["key"]).is_dir()


# ---- a full disk, a truncated file, a plugin-only export --------------------------------------------------


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["entry", "engine folder", "ort writer"])
def test_a_full_disk_during_build_is_one_line_and_leaves_nothing(export_dir, tmp_path, capsys, monkeypatch, where):
    import importlib

    from pladis.engine import ort

    build_module = importlib.import_module("pladis.engine.build")  # (pladis.engine.build is the function)

    cache_dir, out = tmp_path / "cache", tmp_path / "engine"
    if where == "entry":
        monkeypatch.setattr(build_module, "_copy_pipeline_files", _enospc)
    elif where == "engine folder":
        monkeypatch.setattr(cache, "_reflink_or_copy", _enospc)
    else:  # ONNX Runtime writes the optimised graph in C++ and reports a full disk as a damaged protobuf

        def full(*args, **kwargs):
            raise RuntimeError("[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : Load model failed")

        monkeypatch.setattr(ort, "build", full)
        monkeypatch.setattr(files.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 0))
    folder = out.parent if where == "engine folder" else cache_dir
    _fails(capsys, ["build", "--onnx", str(export_dir), "--out", str(out), "--cache-dir", str(cache_dir)],
           f"no space left on device in {folder}")  # fmt: skip
    assert not out.exists() and not list(tmp_path.glob(".*"))  # no half-written engine folder
    entries = cache.entries(cache_dir)  # a whole entry (the copy out of it failed) is kept, a partial one never
    assert not any(cache.problems(e) for e in entries) and len(entries) == (where == "engine folder")
    assert sorted(p.name for p in cache_dir.iterdir()) == sorted([cache.MARKER, *(e.name for e in entries)])


def test_a_truncated_file_without_verification_is_one_line(export_dir, tmp_path, capsys):
    copy = tmp_path / "export"
    shutil.copytree(export_dir, copy)
    unet = copy / "unet.onnx"
    unet.write_bytes(unet.read_bytes()[: unet.stat().st_size // 2])
    _fails(capsys, ["generate", "--engine", str(copy), "--no-verify", "--steps", "1", "--out", str(tmp_path / "a.png")],
           "unet.onnx cannot be read by ONNX Runtime", "damaged or truncated")  # fmt: skip


def test_a_plugin_only_export_is_refused_where_it_cannot_run(tmp_path, capsys):
    plugin_only = tmp_path / "plugin-only"
    export(ExportConfig(model="tiny-sd15", out=str(plugin_only), validate=False, function_body=False))
    capsys.readouterr()
    fix = "re-export without --no-function-body"
    _fails(capsys, ["build", "--onnx", str(plugin_only), "--backend", "ort", "--out", str(tmp_path / "e"),
                    "--cache-dir", str(tmp_path / "c")], "plugin-only export", "TensorRT builds only", fix)  # fmt: skip
    _fails(capsys, ["generate", "--engine", str(plugin_only), "--steps", "1", "--out", str(tmp_path / "a.png")],
           "plugin-only export", fix)  # fmt: skip
    _fails(capsys, ["parity", "--engine", str(plugin_only), "--steps", "1"], "plugin-only export", fix)
    assert not (tmp_path / "e").exists() and not (tmp_path / "a.png").exists()


# ---- folders that check themselves -----------------------------------------------------------------


def _damage(path, how):
    if how == "missing":
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])
    elif how == "edited":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    elif how == "directory":
        path.unlink()
        path.mkdir()


FILES = {  # file kind -> (folder fixture, relative path)
    "onnx": ("export_dir", "unet.onnx"),
    "tokenizer": ("export_dir", "tokenizer/tokenizer.json"),
    "scheduler": ("export_dir", "scheduler/scheduler_config.json"),
    "manifest": ("export_dir", "manifest.json"),
    "engine artifact": ("engine_dir", "unet.ort.onnx"),
    "engine.json": ("engine_dir", "engine.json"),
    "engine manifest": ("engine_dir", "manifest.json"),
}


@pytest.mark.parametrize("how", ["missing", "truncated", "edited", "directory"])
@pytest.mark.parametrize("kind", list(FILES))
def test_a_damaged_file_is_refused_before_any_work(request, tmp_path, kind, how):
    fixture, rel = FILES[kind]
    folder = tmp_path / "copy"
    shutil.copytree(request.getfixturevalue(fixture), folder)
    if not (folder / rel).exists():
        pytest.skip(f"{rel} is not in this folder layout")
    _damage(folder / rel, how)
    with pytest.raises(EngineError) as err:
        Runtime(folder)
    assert rel.split("/")[-1] in str(err.value), str(err.value)


def test_edited_engine_manifest_and_narrowed_dims(export_dir, tmp_path):
    eng = tmp_path / "e"
    dims = json.loads((export_dir / "manifest.json").read_text())["dims"]
    lo, opt, _ = dims["latent_height"]
    build(BuildConfig(onnx=str(export_dir), out=str(eng), cache_dir=str(tmp_path / "c"),
                      dims=f"latent_height={lo}:{opt}:{opt}"))  # fmt: skip
    rt = Runtime(eng)
    allowed = rt.engine.dim("height")
    assert allowed[2] == dims["height"][1] < dims["height"][2]  # the build's narrower range, in pixels
    with pytest.raises(
        ValueError,
        match=f"height {dims['height'][2]} is outside this build's range.*rebuild the "
        "engine with a wider --dims latent_height",
    ):  # (said "exported range", re-export)
        rt.settings("a cube", height=dims["height"][2])
    narrow = tmp_path / "narrow-batch"  # the CFG-doubled batch past a narrowed cfg_batch: rebuild, not re-export
    build(BuildConfig(onnx=str(export_dir), out=str(narrow), cache_dir=str(tmp_path / "c"), dims="cfg_batch=1:2:4"))
    with pytest.raises(ValueError, match="CFG doubles the batch to 6, over the engine's maximum 4; use fewer prompts "
                                         "or rebuild the engine with a wider --dims cfg_batch"):  # fmt: skip
        Runtime(narrow).settings("a cube", batch=3)
    manifest = json.loads((eng / "manifest.json").read_text())
    manifest["dims"]["height"] = [16, 64, 4096]
    (eng / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match="manifest.json was edited after export"):
        Runtime(eng)


def test_partial_export_is_refused(tmp_path, capsys):
    export(ExportConfig(model="tiny-sd15", out=str(tmp_path / "u"), validate=False, components="unet"))
    capsys.readouterr()  # the export's progress bar
    _fails(capsys, ["generate", "--engine", str(tmp_path / "u"), "--out", str(tmp_path / "a.png")],
           "holds only unet", "--components")  # fmt: skip


def test_moved_export_still_runs(export_dir, tmp_path):
    moved = tmp_path / "elsewhere" / "moved"
    shutil.copytree(export_dir, moved)
    assert Runtime(moved).generate("a cube", steps=1, progress=False).images


def test_precision_is_what_was_exported(export_dir):
    from pladis.manifest import Engine

    manifest = json.loads((export_dir / "manifest.json").read_text())
    manifest["precision"] = "bf16"  # requested bf16, every component fell back to float32
    assert Engine(export_dir, manifest).precision == "fp32"


def test_a_refused_command_leaves_no_folders_its_output_check_made(tmp_path, capsys):
    # the writability probe created --out's missing parents, and a command refused after it (here: no engine,
    # an unknown model) left them behind, empty
    image = tmp_path / "a" / "b" / "x.png"
    assert cli.main(["generate", "--engine", str(tmp_path / "nowhere"), "--out", str(image)]) == 2
    assert cli.main(["export", "--model", "nope", "--out", str(tmp_path / "c" / "d" / "export")]) == 2
    capsys.readouterr()
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    files.check_writable(tmp_path / "e" / "f")  # the default keeps what it made: the cache folder's own use
    assert (tmp_path / "e" / "f").is_dir()
