"""lam as a runtime input: one export serves every PLADIS strength, per call and per sample."""

import json
import shutil

import numpy as np
import pytest
import torch

from pladis import cli
from pladis.errors import SettingError
from pladis.export import ExportConfig, export
from pladis.runtime import EngineError, Runtime, parity

FAMILIES = ["tiny-sd15", "tiny-sdxl", "tiny-pixart", "tiny-sd3", "tiny-flux"]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("lam")
    cache = {}

    def get(name, lam=2.0):
        key = (name, lam)
        if key not in cache:
            cache[key] = root / f"{name}-{lam:g}"
            export(ExportConfig(model=name, out=str(cache[key]), lam=lam, validate=False))
        return cache[key]

    return get


@pytest.mark.parametrize("name", FAMILIES)
def test_one_export_matches_eager_at_every_lam(exports, name):
    # Exported once with the default lam = 2; one batch of four prompts at lam 0, 1, 2, 3 (one per sample,
    # CFG halves included) against eager PyTorch patched and run at the same per-sample lam: the torch backend
    # feeds pladis_scale through the same contract forward. Per-sample routing itself is checked against
    # solo runs below.
    lams = [0.0, 1.0, 2.0, 3.0]
    report = parity.check(exports(name), "ort", steps=2, lam=lams, prompt=["a red cube", "a ball", "a cone", "a cup"])
    assert report.lam == lams
    assert report.ok, report.table()  # fp32: rel-L2 <= 1e-4 per teacher-forced step (parity.TOLERANCE)


def test_lam_changes_the_output(exports):
    rt = Runtime(exports("tiny-sdxl"), "ort")
    a, b = (rt.generate("a cube", steps=2, seed=0, lam=lam, progress=False).latents for lam in (0.0, 3.0))
    assert float((a - b).abs().max()) > 1e-3  # the input reaches the PLADIS layers


def test_per_sample_lam_equals_each_sample_alone(exports):
    rt = Runtime(exports("tiny-sdxl"), "ort")
    prompts, lams = ["a cube", "a ball", "a cone"], [0.0, 1.5, 3.0]
    together = rt.generate(prompts, steps=2, seed=[1, 2, 3], lam=lams, progress=False).latents
    for i, (p, lam) in enumerate(zip(prompts, lams, strict=True)):
        alone = rt.generate(p, steps=2, seed=i + 1, lam=lam, progress=False).latents
        # fp32 reduction order differs with the batch size (BLAS blocking): far below any lam effect
        np.testing.assert_allclose(together[i : i + 1].numpy(), alone.numpy(), rtol=0, atol=1e-4)


def test_lam_zero_reproduces_the_stock_export(exports):
    pladis_engine = Runtime(exports("tiny-sdxl"), "ort")
    stock = Runtime(exports("tiny-sdxl", lam=0.0), "ort")
    assert "pladis_scale" not in stock.input_names  # a lam = 0 export is the stock graph
    a = np.asarray(pladis_engine.generate("a cube", steps=3, seed=0, lam=0.0, progress=False).images[0], float)
    b = np.asarray(stock.generate("a cube", steps=3, seed=0, progress=False).images[0], float)
    assert np.abs(a - b).max() <= 1  # within one uint8 step: one engine serves the A/B comparison


@pytest.mark.parametrize("lam, message", [
    (float("nan"), "lam must be a finite number in"), (float("inf"), "lam must be a finite number in"),
    (-0.5, r"in \[0, 10\]"), (10.5, r"in \[0, 10\]"), ([1.0, 2.0], "lam: 2 values for 1 prompts"),
])  # fmt: skip
def test_bad_lam_is_refused_before_work(exports, lam, message):
    rt = Runtime(exports("tiny-sd15"), "ort")
    with pytest.raises(ValueError, match=message):
        rt.generate("a cube", steps=1, lam=lam)
    assert not rt._backends  # refused before any engine ran


def test_lam_on_a_stock_export_and_the_cli(exports, tmp_path, capsys):
    stock_only = r"lam 2.0: this engine was exported without PLADIS layers \(--lam 0\), so it runs only 0; re-export"
    with pytest.raises(ValueError, match=stock_only):  # what to do about it, not "[0, 0]"
        Runtime(exports("tiny-sd15", lam=0.0), "ort").generate("a cube", steps=1, lam=2.0)
    args = ["generate", "--engine", str(exports("tiny-sd15")), "--steps", "1", "--out", str(tmp_path / "a.png")]
    assert cli.main([*args, "--lam", "nan"]) == 2
    assert "lam must be a finite number" in capsys.readouterr().err
    assert cli.main(["parity", "--engine", str(exports("tiny-sd15")), "--steps", "2", "--lam", "3"]) == 0
    assert "lam 3" in capsys.readouterr().out


def test_lam_zero_on_a_stock_export_per_prompt(exports):
    stock = Runtime(exports("tiny-sd15", lam=0.0), "ort")
    two = stock.generate(["a cube", "a ball"], steps=1, seed=[0, 1], lam=[0.0, 0.0], progress=False)  # was refused
    plain = stock.generate(["a cube", "a ball"], steps=1, seed=[0, 1], progress=False)
    assert torch.equal(two.latents, plain.latents)  # atol=0: lam 0 is what a stock engine runs anyway
    with pytest.raises(SettingError, match="exported without PLADIS layers") as err:
        stock.settings(["a cube", "a ball"], lam=[0.0, 2.0])
    assert err.value.field == "lam"


def test_tensor_lam_and_batch_with_a_prompt_list(exports):
    rt = Runtime(exports("tiny-sd15"), "ort")
    for lam in (torch.tensor(1.5), torch.tensor([1.5])):  # 0-dim and one-element float tensors (were refused)
        assert rt.settings("a cube", batch=2, lam=lam).lam == (1.5, 1.5)
    assert rt.settings(["a", "b"], lam=torch.tensor([0.5, 3.0])).lam == (0.5, 3.0)  # one per image
    with pytest.raises(SettingError, match="lam must be a finite number") as err:
        rt.settings("a cube", lam=torch.tensor(1))  # an integer tensor is not a strength
    with pytest.raises(SettingError, match="with a list of prompts give one entry per image") as err:
        rt.settings(["a cube", "a ball"], batch=2)  # batch was silently ignored with a list
    assert err.value.field == "batch"


def test_old_exports_with_lam_baked_in_are_refused(exports, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(exports("tiny-sd15"), old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["format"] = "pladis-onnx/1"
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match="older pladis with lam baked into the graph; re-export"):
        Runtime(old)


def test_engine_build_serves_every_lam(exports, tmp_path):
    from pladis.engine import BuildConfig, build

    meta = build(BuildConfig(onnx=str(exports("tiny-sd15")), out=str(tmp_path / "e"), cache_dir=str(tmp_path / "c")))
    assert meta["lam"] == {"runtime_input": "pladis_scale", "default": 2.0, "range": [0.0, 10.0]}
    assert "lam" not in json.dumps(meta["flags"])
    for lam in (0.0, 3.0):
        assert parity.check(tmp_path / "e", steps=2, lam=lam).ok
