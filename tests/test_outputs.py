"""Nothing lost, nothing stale: the output rule (sentinel files survive), the verified immutable cache, and
folders that check themselves before any work (fault injection on every file kind)."""

import json
import os
import shutil

import pytest

from pladis import cli
from pladis.engine import BuildConfig, build, cache
from pladis.export import ExportConfig, export
from pladis.runtime import EngineError, Runtime

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


def test_bad_output_paths_are_refused_before_any_work(engine_dir, tmp_path, capsys):
    gen = ["generate", "--engine", str(engine_dir), "--steps", "1"]
    (tmp_path / "dir").mkdir()
    _fails(capsys, [*gen, "--out", str(tmp_path / "dir")], "is a folder")
    _fails(capsys, [*gen, "--out", str(tmp_path / "pic.gif")], ".png or .jpg")
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
    with pytest.raises(OSError):
        cli.main(["parity", "--engine", str(engine_dir), "--steps", "1", "--json", str(tmp_path / "p.json")])
    assert "| step |" in capsys.readouterr().out  # the result was shown before the write failed


# ---- the cache -----------------------------------------------------------------------------------


def test_a_corrupted_engine_folder_cannot_spread(export_dir, tmp_path, capsys):
    c = dict(onnx=str(export_dir), cache_dir=str(tmp_path / "cache"))
    build(BuildConfig(out=str(tmp_path / "a"), **c))
    build(BuildConfig(out=str(tmp_path / "b"), **c))
    assert "cache hit" in capsys.readouterr().out
    unet = json.loads((tmp_path / "a" / "engine.json").read_text())["components"]["unet"]["file"]
    assert os.stat(tmp_path / "a" / unet).st_ino != os.stat(tmp_path / "b" / unet).st_ino  # no shared inodes
    with open(tmp_path / "a" / unet, "r+b") as f:
        f.truncate(100)
    Runtime(tmp_path / "b")  # the other engine folder is intact
    with pytest.raises(EngineError, match="does not match engine.json's sha256"):
        Runtime(tmp_path / "a")
    build(BuildConfig(out=str(tmp_path / "a"), force=True, **c))  # not "up to date": repaired from the cache
    assert "cache hit" in capsys.readouterr().out
    Runtime(tmp_path / "a")


def test_a_damaged_entry_is_evicted_and_rebuilt(export_dir, tmp_path, capsys):
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
    assert "evicting it and rebuilding" in capsys.readouterr().out
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


def test_leftovers_of_killed_runs_are_cleaned(export_dir, tmp_path):
    dead = 2**22 + 12345  # above the default pid_max of 2^22: no such process
    (tmp_path / "cache").mkdir()
    stale = tmp_path / "cache" / f".abc.{dead}.0123abcd.tmp"
    stale.mkdir()
    (stale / "unet.onnx").write_bytes(b"half")
    (tmp_path / "cache" / "f00.lock").write_text("")
    build(BuildConfig(onnx=str(export_dir), out=str(tmp_path / "e"), cache_dir=str(tmp_path / "cache")))
    assert not stale.exists() and not (tmp_path / "cache" / "f00.lock").exists()
    stale_export = tmp_path / f".x.{dead}.0123abcd.tmp"
    stale_export.mkdir()
    export(ExportConfig(model="tiny-sd15", out=str(tmp_path / "x"), validate=False, components="unet"))
    assert not stale_export.exists()


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
    with pytest.raises(ValueError, match=f"height {dims['height'][2]} is outside the exported range"):
        rt.settings("a cube", height=dims["height"][2])
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
