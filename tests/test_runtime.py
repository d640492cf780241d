"""The runtime: engines in the scheduler loop, parity against eager PyTorch, and bad input."""

import json
import logging
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from pladis import cli, models
from pladis.errors import SettingError
from pladis.export import ExportConfig, export
from pladis.runtime import EngineError, Request, Runtime, parity

TINY = [n for n in models.BUILTINS if n.startswith("tiny-")]


@pytest.fixture(scope="session")
def engines(tmp_path_factory):
    """One fp32 export per tiny architecture (validation is the export tests' job)."""
    root = tmp_path_factory.mktemp("engines")
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = root / name
            export(ExportConfig(model=name, out=str(cache[name]), validate=False))
        return cache[name]

    return get


# (model, scheduler, guidance): every architecture, with CFG and without, five schedulers in all
PARITY_CASES = [
    ("tiny-sd15", "euler", None),
    ("tiny-sd15", "ddim", 1.0),
    ("tiny-sdxl", "dpmpp_2m", None),
    ("tiny-sdxl", "euler_a", 1.0),
    ("tiny-pixart", "dpmpp_2m", None),
    ("tiny-pixart", "lcm", 1.0),
    ("tiny-sd3", "flow_euler", None),
    ("tiny-sd3", "flow_euler", 1.0),
    ("tiny-flux", "flow_euler", None),
]


@pytest.mark.parametrize("name, scheduler, guidance", PARITY_CASES)
def test_ort_engine_matches_eager_through_the_loop(engines, name, scheduler, guidance):
    report = parity.check(engines(name), "ort", steps=3, scheduler=scheduler, guidance=guidance)
    assert report.ok, report.table()  # fp32: rel-L2 <= 1e-4 per teacher-forced step (parity.TOLERANCE)
    assert len(report.teacher_forced) == len(report.free_running) == 3
    for row in report.free_running:  # free-running trajectories stay together too on these short runs
        assert row["latent"]["rel_l2"] < 1e-3, report.table()
    assert report.image_psnr_db > 40


def test_determinism_and_seeds(engines):
    rt = Runtime(engines("tiny-sd15"), "ort")
    a, b = (np.asarray(rt.generate("a cat", steps=2, seed=3, progress=False).images[0]) for _ in range(2))
    c = np.asarray(rt.generate("a cat", steps=2, seed=4, progress=False).images[0])
    assert np.array_equal(a, b)  # atol=0: same seed, same backend
    assert not np.array_equal(a, c)


def test_batch_and_component_backends(engines):
    rt = Runtime(engines("tiny-sdxl"), "ort")
    batch = rt.generate(["a cat", "a dog"], steps=2, seed=0, progress=False)
    single = rt.generate("a dog", steps=2, seed=0, progress=False)
    assert len(batch.images) == 2 and batch.images[0].size == (32, 32)
    mixed = Runtime(engines("tiny-sdxl"), "ort", {"vae_decoder": "torch", "text_encoder": "torch"})
    out = mixed.generate("a dog", steps=2, seed=0, progress=False)
    diff = np.abs(np.asarray(out.images[0], float) - np.asarray(single.images[0], float))
    assert diff.max() <= 1  # same maths on both backends: at most one uint8 rounding step apart
    assert batch.latents.shape[0] == 2


def test_parity_fails_on_a_corrupted_engine(engines, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(engines("tiny-sd15"), broken)
    model = onnx.load(str(broken / "unet.onnx"))
    weight = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    values = onnx.numpy_helper.to_array(weight).copy()
    values.flat[0] += 1.0  # one perturbed weight
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    onnx.save_model(model, str(broken / "unet.onnx"))
    with pytest.raises(EngineError, match="does not match the manifest's sha256"):
        Runtime(broken, "ort")
    code = cli.main(
        ["parity", "--engine", str(broken), "--steps", "2", "--no-verify", "--json", str(tmp_path / "p.json")]
    )
    assert code == 1
    printed = capsys.readouterr().out
    assert "FAIL: step 0" in printed
    saved = json.loads((tmp_path / "p.json").read_text())
    assert saved["ok"] is False and saved["failures"]


def test_generate_command_writes_the_api_image(engines, tmp_path, capsys):
    out = tmp_path / "img.png"
    args = ["generate", "--engine", str(engines("tiny-sd15")), "--prompt", "a cat", "--steps", "2", "--seed", "5"]
    assert cli.main([*args, "--out", str(out)]) == 0
    assert "ms/step" in capsys.readouterr().out
    from PIL import Image

    api = Runtime(engines("tiny-sd15"), "ort").generate("a cat", steps=2, seed=5, progress=False).images[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(api))  # atol=0: same engine, same seed


def test_parity_command_and_plot(engines, tmp_path, capsys):
    plot = tmp_path / "p.png"
    assert cli.main(["parity", "--engine", str(engines("tiny-sd15")), "--steps", "2", "--plot", str(plot)]) == 0
    printed = capsys.readouterr().out
    assert "PASS" in printed and printed.strip().endswith(f"wrote {plot}")  # it says what it wrote, last
    from PIL import Image

    assert Image.open(plot).size[0] > 400


@pytest.mark.parametrize("kwargs, field, message", [
    (dict(scheduler="heun"), "scheduler", "unknown scheduler 'heun'.*euler"),
    (dict(height=1024), "height", "height 1024 is outside the exported range"),
    (dict(width=34), "width", "width 34 is not a multiple of 4"),
    (dict(batch=5), "batch", "over this engine's maximum of 4"),
    (dict(prompt=[]), "prompt", "prompt is empty"),
    (dict(prompt=" "), "prompt", "prompt is empty"),
    (dict(prompt=3), "prompt", "prompt must be a string or a list of strings"),
    (dict(guidance=1.0, negative_prompt="blurry"), "negative_prompt", "negative_prompt needs classifier-free guidance"),
    (dict(steps=0), "steps", "steps must be at least 1"),
    (dict(steps=True), "steps", "steps must be a whole number"),
    (dict(guidance=float("nan")), "guidance", "guidance must be a finite number"),
    (dict(seed=[1, 2]), "seed", "2 seeds for 1 prompts"),
    (dict(seed=2**64), "seed", "outside"),  # torch's generator cannot take it (was a traceback)
    (dict(seed=2**63 - 1, batch=2), "seed", r"image 1's: seed \+ 1"),
])  # fmt: skip
def test_bad_settings_are_refused_before_work(engines, kwargs, field, message):
    rt = Runtime(engines("tiny-sd15"), "ort")
    with pytest.raises(SettingError, match=message) as err:
        rt.generate(**{"prompt": "a cat", **kwargs})
    assert err.value.field == field  # the one check names the field it refuses (the server's `param`)
    assert not rt._backends  # nothing was loaded: the checks come first


def test_generate_takes_a_request_and_calls_on_step(engines):
    rt = Runtime(engines("tiny-sd15"), "ort")
    seen = []
    request = Request("a cat", steps=3, seed=5)
    result = rt.generate(request, on_step=lambda i, t, latents: seen.append((i, tuple(latents.shape))), progress=False)
    assert [i for i, _ in seen] == [0, 1, 2] and seen[-1][1] == tuple(result.latents.shape)
    keywords = rt.generate("a cat", steps=3, seed=5, progress=False)
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(keywords.images[0]))  # atol=0: one code path

    def stop(i, t, latents):
        if i == 1:
            raise KeyboardInterrupt  # what a caller's hook raises goes through: the run stops there

    with pytest.raises(KeyboardInterrupt):
        rt.generate(request, on_step=stop, progress=False)


def test_generate_prints_nothing_at_the_default_level(engines, capfd, unconfigured):
    rt = Runtime(engines("tiny-sd15"), "ort")
    rt.generate("a cat", steps=2)  # progress=None: the bar follows the module's INFO level, off by default
    out, err = capfd.readouterr()
    assert out == "" and "denoise" not in err, (out, err)
    logging.getLogger("pladis").setLevel(logging.INFO)  # an application that asks for pladis's lines gets the bar
    rt.generate("a cat", steps=2)
    assert "denoise" in capfd.readouterr().err


def test_load_preloads_tokenizers_and_libraries(engines):
    """After rt.load() the first generate imports nothing and loads no tokenizer (encode time is encoding's)."""
    code = (
        "import sys; from pladis.runtime import Runtime; import transformers\n"
        f"rt = Runtime({str(engines('tiny-sdxl'))!r}, 'ort'); rt.load()\n"
        "transformers.AutoTokenizer.from_pretrained = None  # any tokenizer loaded from here on fails\n"
        "before = set(sys.modules); rt.generate('a cat', steps=1, progress=False)\n"
        "print(sorted(m for m in set(sys.modules) - before if m.startswith(('diffusers', 'transformers'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("[]"), out.stdout[-2000:] + out.stderr[-3000:]


@pytest.mark.parametrize("command, device", [("generate", "mps"), ("parity", "cuda"), ("generate", "cuda")])
def test_an_unavailable_device_is_one_line(engines, tmp_path, capsys, command, device):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    args = [command, "--engine", str(engines("tiny-sd15")), "--steps", "1", "--device", device]
    out = ["--out", str(tmp_path / "a.png")] if command == "generate" else []
    assert cli.main(args + out) == 2  # was a traceback (mps: "not linked with support"; parity: an assertion)
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"pladis {command}: error: device {device!r}") and "\n" not in err, err


def test_one_default_engine_and_no_circle():
    """generate, parity and serve read the same default folder; parity does not import the CLI configs."""
    from pladis.options import DEFAULT_ENGINE
    from pladis.runtime.commands import GenerateConfig, ParityConfig
    from pladis.serve import ServeConfig

    assert GenerateConfig().engine == ParityConfig().engine == ServeConfig().engine == DEFAULT_ENGINE
    code = "import sys, pladis.runtime.parity; print('pladis.runtime.commands' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "False", out.stdout + out.stderr


def test_bad_engine_folders(engines, tmp_path):
    with pytest.raises(EngineError, match="has no manifest.json"):
        Runtime(tmp_path, "ort")
    missing = tmp_path / "missing"
    shutil.copytree(engines("tiny-sd15"), missing)
    (missing / "vae_decoder.onnx").unlink()
    with pytest.raises(EngineError, match="missing vae_decoder.onnx"):
        Runtime(missing, "ort")
    with pytest.raises(EngineError, match="unknown backend 'tf'"):
        Runtime(engines("tiny-sd15"), "tf").generate("a cat", steps=1, progress=False)
    with pytest.raises(EngineError, match="needs an engine folder built by `pladis build --backend trt`"):
        Runtime(engines("tiny-sd15"), "trt").generate("a cat", steps=1, progress=False)
    with pytest.raises(EngineError, match="no component unet2"):
        Runtime(engines("tiny-sd15"), "ort", {"unet2": "torch"})


def test_a_prompt_longer_than_the_encoder_reads_is_said_not_dropped_silently(engines, caplog):
    # a new user's 1000-character prompt ran with no word that most of it was cut (diffusers' pipelines warn)
    rt = Runtime(engines("tiny-sd15"), "ort")
    with caplog.at_level(logging.WARNING, logger="pladis"):
        rt.generate("a red cube", steps=1)
    assert not [r for r in caplog.records if "longer than" in r.getMessage()]  # a short prompt: nothing to say
    with caplog.at_level(logging.WARNING, logger="pladis"):
        rt.generate("a red cube " * 100, steps=1)
    said = [r.getMessage() for r in caplog.records if "longer than" in r.getMessage()]
    assert len(said) == 1 and "'a red cube a red cube" in said[0] and "tokens text_encoder reads" in said[0], said
    assert "the rest is dropped" in said[0]
