"""Bring your own model: diffusers folders, single-file checkpoints, LoRAs, the manifest's source record, and
the eager reference that rebuilds (and checks) the same model. Tiny models, CPU, offline."""

import json
import os
import re
import shutil
import zlib

import numpy as np
import onnxruntime as ort
import pytest
import torch
from ldm_layout import pipeline_to_ldm, sd3_to_original
from safetensors.torch import load_file, save_file

import pladis
from pladis import cli, model_files, models, patch, provenance, sources
from pladis.export import ExportConfig, contracts, export
from pladis.files import sha256
from pladis.runtime import backends, parity

pytest.importorskip("peft")  # in the dev and lora extras; the fixtures make LoRAs with it


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """tiny-sd15 and tiny-sdxl as diffusers folders (save_pretrained) and as original-layout single files,
    plus LoRAs made with peft: two for tiny-sdxl (a, b) and one for tiny-sd15."""
    root = tmp_path_factory.mktemp("byom")
    for name in ("tiny-sd15", "tiny-sdxl"):
        pipe = models.load(name)
        pipe.save_pretrained(root / name)
        save_file(pipeline_to_ldm(pipe), str(root / f"{name}.safetensors"))
    for lora, name, seed in (("a", "tiny-sdxl", 1), ("b", "tiny-sdxl", 2), ("sd15", "tiny-sd15", 3)):
        make_lora(name, seed, root / f"lora-{lora}.safetensors")
    return root


def make_lora(name, seed, path):
    """A rank-4 LoRA on every attention projection of the U-Net, saved with diffusers' save_lora_weights.
    init_lora_weights=False: random up-projections too (peft's default zeros would change nothing)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = models.load(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                         init_lora_weights=False))  # fmt: skip
    layers = get_peft_model_state_dict(pipe.unet)
    type(pipe).save_lora_weights(str(path.parent), unet_lora_layers=layers, weight_name=path.name)


def ort_outputs(folder, seed=0) -> dict:
    """Every exported component run in ONNX Runtime on seeded inputs of its optimal shape."""
    manifest = json.loads((folder / "manifest.json").read_text())
    out = {}
    for name, comp in manifest["components"].items():
        gen = np.random.default_rng([seed, zlib.crc32(name.encode())])  # per component: subsets compare too
        feeds = {}
        for i in comp["inputs"]:
            if i["dtype"].startswith("int"):
                feeds[i["name"]] = gen.integers(0, 60, i["opt"]).astype(i["dtype"])
            else:
                feeds[i["name"]] = (gen.standard_normal(i["opt"]) * (50 if "time" in i["name"] else 1)).astype(
                    i["dtype"]
                )
        sess = ort.InferenceSession(str(folder / comp["file"]), providers=["CPUExecutionProvider"])
        out[name] = (feeds, sess.run(None, feeds))
    return out


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def exports(saved, tmp_path_factory):
    """Export folders by key, each made once (no validation: that is test_export's job; here outputs are
    compared with each other and with eager references). "folder-sd15" exports a copy of the tiny-sd15
    folder named as a relative path, which the last test then moves and changes."""
    root = tmp_path_factory.mktemp("exports")
    shutil.copytree(saved / "tiny-sd15", root / "mine")
    kinds = {
        "builtin-sd15": dict(model="tiny-sd15"),
        "folder-sd15": dict(model="mine"),  # relative to root
        "file-sd15": dict(model=str(saved / "tiny-sd15.safetensors")),  # no --config: the matching built-in's
        "folder-sdxl": dict(model=str(saved / "tiny-sdxl")),
        # the U-Net only: the LoRA test below compares the other components of an SDXL single-file export
        "file-sdxl-unet": dict(
            model=str(saved / "tiny-sdxl.safetensors"), config=str(saved / "tiny-sdxl"), components="unet"
        ),  # fmt: skip
    }
    cache = {}

    def get(key):
        if key not in cache:
            cache[key] = root / key
            cwd = os.getcwd()
            os.chdir(root)
            try:
                export(ExportConfig(**kinds[key], out=str(cache[key]), validate=False))
            finally:
                os.chdir(cwd)
        return cache[key]

    return get


def assert_same_outputs(got: dict, want: dict, skip=()):
    assert set(got) == set(want)
    for name, (_, outs) in got.items():
        if name not in skip:
            for a, b in zip(outs, want[name][1], strict=True):
                np.testing.assert_array_equal(a, b)  # atol=0: same weights, same graph, same ONNX Runtime


# --------------------------------------------------------------------------------------------------
# Folders and single files: the same weights give the same ONNX outputs
# --------------------------------------------------------------------------------------------------


def test_folder_exports_like_the_builtin(exports, saved):
    got = ort_outputs(exports("folder-sd15"))
    assert set(got) == {"text_encoder", "unet", "vae_decoder"}
    assert_same_outputs(got, ort_outputs(exports("builtin-sd15")))
    m = json.loads((exports("folder-sd15") / "manifest.json").read_text())["model"]
    mine = exports("folder-sd15").parent / "mine"
    assert m["kind"] == "folder" and m["source"] == str(mine.resolve())  # typed "mine": recorded absolute
    weights = {f["file"]: f["sha256"] for f in m["files"]}
    assert weights["unet/diffusion_pytorch_model.safetensors"] == sha256(
        mine / "unet" / "diffusion_pytorch_model.safetensors"
    )
    assert len(m["config_sha256"]) == 64 and m["loras"] == []


def test_sd15_single_file_exports_like_the_folder(exports, saved):
    assert_same_outputs(ort_outputs(exports("file-sd15")), ort_outputs(exports("folder-sd15")))
    m = json.loads((exports("file-sd15") / "manifest.json").read_text())["model"]
    assert m["kind"] == "single_file" and m["files"][0]["sha256"] == sha256(saved / "tiny-sd15.safetensors")
    assert m["layout"].startswith("SD 1.x") and m["config"]["origin"] == "builtin:tiny-sd15"


def test_sdxl_single_file_unet_exports_like_the_folder(exports, saved):
    got, want = ort_outputs(exports("file-sdxl-unet")), ort_outputs(exports("folder-sdxl"))
    assert set(got) == {"unet"}
    assert_same_outputs(got, {"unet": want["unet"]})
    m = json.loads((exports("file-sdxl-unet") / "manifest.json").read_text())["model"]
    assert m["layout"].startswith("SDXL") and m["config"] == {
        "origin": "folder", "path": str((saved / "tiny-sdxl").resolve()),
        "config_sha256": model_files.config_sha256(saved / "tiny-sdxl"),
    }  # fmt: skip


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_single_file_loads_the_folder_weights_exactly(saved, family):
    config = str(saved / f"tiny-{family}") if family == "sdxl" else ""
    got = sources.load(sources.resolve(str(saved / f"tiny-{family}.safetensors"), config))
    want = models.load(f"tiny-{family}")
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(want, name, None) is not None:
            a, b = getattr(got, name).state_dict(), getattr(want, name).state_dict()
            assert a.keys() == b.keys(), name
            for key in a:
                assert torch.equal(a[key], b[key]), f"{name}.{key}"  # the conversion copies, never computes


def test_ckpt_and_denoiser_only_files(saved, tmp_path):
    # A .ckpt (torch.save, weights nested under "state_dict" as training runs write them), a U-Net-only file
    # and a file without VAE, whose missing components come from the --config folder's weights
    pipe = models.load("tiny-sdxl")
    torch.save({"state_dict": pipeline_to_ldm(pipe)}, tmp_path / "full.ckpt")
    unet_only = {k: v for k, v in pipeline_to_ldm(pipe).items() if k.startswith("model.diffusion_model.")}
    save_file(unet_only, str(tmp_path / "unet.safetensors"))
    no_vae = {k: v for k, v in pipeline_to_ldm(pipe).items() if not k.startswith("first_stage_model.")}
    save_file(no_vae, str(tmp_path / "no-vae.safetensors"))  # "no-VAE" releases: the VAE comes from --config
    with pytest.raises(ValueError, match="holds only a denoiser .*pass --config FOLDER"):
        sources.resolve(str(tmp_path / "unet.safetensors"))
    with pytest.raises(ValueError, match="must hold the weights of vae \\(no-vae.safetensors has no VAE weights\\)"):
        sources.resolve(str(tmp_path / "no-vae.safetensors"))  # the built-in config has no weights
    for path in (tmp_path / "full.ckpt", tmp_path / "unet.safetensors", tmp_path / "no-vae.safetensors"):
        src = sources.resolve(str(path), str(saved / "tiny-sdxl"))
        assert (src.denoiser_only, src.vae_from_config) == {"full": (False, False), "unet": (True, False),
                                                             "no-vae": (False, True)}[path.stem]  # fmt: skip
        got = sources.load(src)
        for name in ("unet", "vae", "text_encoder_2"):
            a, b = getattr(got, name).state_dict(), getattr(pipe, name).state_dict()
            assert all(torch.equal(a[k], b[k]) for k in b), f"{path.name}: {name}"  # copies: bitwise


def test_legacy_format_ckpt_is_read(saved, tmp_path):
    # issue 22 D8: torch.save's legacy (pre-zip) format cannot be memory-mapped; torch.load(weights_only=True)
    # reads it, and so must pladis
    pipe = models.load("tiny-sd15")
    path = tmp_path / "legacy.ckpt"
    torch.save({"state_dict": pipeline_to_ldm(pipe)}, path, _use_new_zipfile_serialization=False)
    src = sources.resolve(str(path), str(saved / "tiny-sd15"))
    assert src.layout.pipeline == "StableDiffusionPipeline"
    got = sources.load(src)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(got, name).state_dict(), getattr(pipe, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in b), name  # copies: bitwise


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_malicious_ckpt_is_refused_on_one_line_without_torchs_advice(tmp_path, capsys):
    # issue 22 D11: the refusal is right, but torch's message spans lines and advises weights_only=False
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": _Payload()}}, path)
    with pytest.raises(ValueError, match="is not a checkpoint torch.load.weights_only=True. can read") as err:
        sources.resolve(str(path))
    msg = str(err.value)
    assert "\n" not in msg and "False" not in msg and "GLOBAL" in msg, msg  # names the refused object, no advice
    out = tmp_path / "out"
    assert cli.main(["export", "--model", str(path), "--out", str(out)]) == 2 and not out.exists()
    line = capsys.readouterr().err.strip()
    assert line.startswith("pladis export: error: ") and "\n" not in line and "False" not in line, line


def test_sd3_transformer_single_file(tmp_path):
    # A DiT single file: SD3's MMDiT in the original layout (joint_blocks.*), the rest from --config's weights.
    # (FLUX's converter in diffusers 0.42 hard-codes the full model's width, so no tiny FLUX file can be made.)
    pipe = models.load("tiny-sd3")
    pipe.save_pretrained(tmp_path / "base")
    save_file(sd3_to_original(pipe.transformer.state_dict()), str(tmp_path / "mmdit.safetensors"))
    src = sources.resolve(str(tmp_path / "mmdit.safetensors"), str(tmp_path / "base"))
    assert src.layout.name.startswith("SD3") and src.denoiser_only
    got = sources.load(src)
    assert type(got).__name__ == "StableDiffusion3Pipeline"
    a, b = got.transformer.state_dict(), pipe.transformer.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)  # copies: bitwise
    rec = provenance.record(src)
    assert rec["config"]["files"] and rec["files"][0]["file"] == "mmdit.safetensors"  # the folder's weights too


# --------------------------------------------------------------------------------------------------
# LoRA: fused at export, checked against eager diffusers with the LoRAs loaded as adapters
# --------------------------------------------------------------------------------------------------


def eager_unet_with_loras(folder, loras):
    """The independent reference: diffusers' own pipeline with the LoRAs as active (unfused) peft adapters."""
    import diffusers

    pipe = diffusers.DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    names = []
    for i, (path, _) in enumerate(loras):
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=f"l{i}")
        names.append(f"l{i}")
    pipe.set_adapters(names, adapter_weights=[s for _, s in loras])
    pladis.apply(pipe)
    family = patch.family_of(patch.denoiser_of(pipe)).name
    return next(c for c in contracts.components(pipe, family) if c.name == "unet")


def test_sdxl_single_file_with_loras_matches_eager_and_parity_passes(exports, saved, tmp_path, capsys):
    """The README's command: an SDXL single file, --config, two LoRAs (0.5 and 1.0), through the CLI.

    The LoRAs touch only the U-Net, so the text encoders and the VAE decoder must equal the folder export's
    exactly (the single-file conversion); the U-Net must match diffusers' eager pipeline, loaded from the
    folder with both LoRAs as active adapters, and must differ from the U-Net without them."""
    out = tmp_path / "lora"
    a, b = saved / "lora-a.safetensors", saved / "lora-b.safetensors"
    argv = ["export", "--model", str(saved / "tiny-sdxl.safetensors"), "--config", str(saved / "tiny-sdxl"),
            "--lora", f"{a}:0.5", "--lora", str(b), "--out", str(out), "--no-validate"]  # fmt: skip
    assert cli.main(argv) == 0, capsys.readouterr().err
    m = json.loads((out / "manifest.json").read_text())
    assert m["model"]["loras"] == [
        {"file": a.name, "path": str(a.resolve()), "sha256": sha256(a), "scale": 0.5},
        {"file": b.name, "path": str(b.resolve()), "sha256": sha256(b), "scale": 1.0},
    ]
    assert m["model"]["kind"] == "single_file" and m["model"]["config"]["origin"] == "folder"

    got, plain = ort_outputs(out), ort_outputs(exports("folder-sdxl"))
    assert_same_outputs(got, plain, skip={"unet"})
    feeds, outs = got["unet"]
    unet = eager_unet_with_loras(saved / "tiny-sdxl", [(a, 0.5), (b, 1.0)])
    with torch.no_grad():
        want = unet.forward(unet.module, **{k: torch.from_numpy(v) for k, v in feeds.items()})[0].numpy()
    rel = rel_l2(outs[0], want)
    print(f"LoRA a:0.5 + b:1.0, fused ONNX vs eager diffusers adapters: rel-L2 {rel:.2e}")
    assert rel <= 1e-4  # the fp32 export contract; fusing W + s·BA rounds differently from adding s·B(Ax)
    assert rel_l2(outs[0], plain["unet"][1][0]) > 1e-2  # the LoRAs change the model (~0.1 here)

    report = parity.check(out, "ort", steps=2)  # the torch backend rebuilds the same file + LoRAs, fused
    assert report.ok, report.table()  # fp32: rel-L2 <= 1e-4 per teacher-forced step (parity.TOLERANCE)


def test_text_encoder_lora_is_fused_too(saved, tmp_path):
    # LoRAs may carry text-encoder layers (keys "text_encoder.*"); fused the same way. Only the text encoder
    # is exported: it is the component this LoRA changes. Written by hand in diffusers' format (transformers 5's
    # own add_adapter wants peft >= 0.22; diffusers' loader does not).
    pipe = models.load("tiny-sdxl")
    gen, layers = torch.Generator().manual_seed(4), {}
    for name, m in pipe.text_encoder.named_modules():
        if name.endswith(("q_proj", "k_proj", "v_proj", "out_proj")):
            key = f"text_encoder.{name if name.startswith('text_model.') else 'text_model.' + name}"
            layers[f"{key}.lora_A.weight"] = torch.randn(4, m.in_features, generator=gen) * 0.1
            layers[f"{key}.lora_B.weight"] = torch.randn(m.out_features, 4, generator=gen) * 0.1
    lora = tmp_path / "te.safetensors"
    save_file(layers, str(lora))
    out = tmp_path / "out"
    export(ExportConfig(model=str(saved / "tiny-sdxl"), lora=(f"{lora}:0.7",), out=str(out), components="text_encoder",
                        validate=False))  # fmt: skip
    feeds, outs = ort_outputs(out)["text_encoder"]
    feeds = {k: torch.from_numpy(v) for k, v in feeds.items()}

    import diffusers

    ref = diffusers.DiffusionPipeline.from_pretrained(str(saved / "tiny-sdxl"), local_files_only=True)
    ref.load_lora_weights(str(tmp_path), weight_name=lora.name, adapter_name="te")
    ref.set_adapters(["te"], adapter_weights=[0.7])
    comp = next(c for c in contracts.components(ref, "unet") if c.name == "text_encoder")
    with torch.no_grad():
        want = comp.forward(comp.module, **feeds)[0].numpy()
        base = comp.forward(pipe.text_encoder, **feeds)[0].numpy()
    assert rel_l2(outs[0], want) <= 1e-4  # the fp32 export contract
    assert rel_l2(outs[0], base) > 1e-2  # the LoRA changed the text encoder (~0.3 here)


# --------------------------------------------------------------------------------------------------
# Issue 12: the eager reference finds the source by absolute path and says when it moved or changed
# --------------------------------------------------------------------------------------------------


def test_moved_or_changed_source_is_reported(exports, saved, monkeypatch):
    out = exports("folder-sd15")  # exported as "mine", a relative path
    folder = out.parent / "mine"
    monkeypatch.chdir(saved)  # parity from another directory finds the model by its absolute path
    backends.eager_components.cache_clear()
    assert parity.check(out, "ort", steps=1).ok

    folder.rename(out.parent / "elsewhere")
    backends.eager_components.cache_clear()
    with pytest.raises(provenance.SourceChanged, match=re.escape(f"no longer at {folder}: it was moved or deleted")):
        parity.check(out, "ort", steps=1)
    (out.parent / "elsewhere").rename(folder)

    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(weights))
    sd["conv_in.bias"] = sd["conv_in.bias"] + 1
    save_file(sd, str(weights))
    backends.eager_components.cache_clear()
    with pytest.raises(provenance.SourceChanged, match=r"diffusion_pytorch_model.safetensors changed since the export: "
                       r"its sha256 is \w+…, the manifest records"):  # fmt: skip
        parity.check(out, "torch", steps=1)
    backends.eager_components.cache_clear()


# --------------------------------------------------------------------------------------------------
# Bad input: a clear ValueError before any heavy work, nothing written
# --------------------------------------------------------------------------------------------------


def test_a_folders_bad_size_is_refused_before_its_weights_are_read(saved, tmp_path, monkeypatch):
    # the size rule from the folder's configs on the meta device, before DiffusionPipeline.from_pretrained
    import diffusers

    from pladis.export import ExportConfig, export

    def no_load(*args, **kwargs):
        raise AssertionError("weights read before the size check")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", no_load)
    with pytest.raises(ValueError, match="height must be a multiple of 4 for this model; got 17"):
        export(ExportConfig(model=str(saved / "tiny-sd15"), out=str(tmp_path / "out"), height=17))
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def bad_files(saved, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    (root / "not-a-pipeline").mkdir()
    (root / "not-a-pipeline" / "unet.safetensors").write_bytes(b"")
    save_file({"encoder.layers.0.weight": torch.zeros(2, 2)}, str(root / "text-model.safetensors"))
    config = root / "config-without-unet"
    shutil.copytree(saved / "tiny-sdxl", config, ignore=shutil.ignore_patterns("*.safetensors"))
    (config / "unet" / "config.json").unlink()
    sd = pipeline_to_ldm(models.load("tiny-sdxl"))  # a fine-tune of an SDXL variant pladis does not know
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(32, 8, 3, 3)
    save_file(sd, str(root / "unknown-sdxl.safetensors"))
    return root


BAD = [  # (model, config, loras, message)
    ("{bad}/missing/model.safetensors", "", (), "model path .*missing/model.safetensors does not exist"),
    ("./nope", "", (), "model path ./nope does not exist"),
    ("{bad}/not-a-pipeline", "", (), "not a diffusers pipeline folder: .*model_index.json is missing"),
    ("{bad}/text-model.safetensors", "", (), r"keys match no supported single-file layout \(tried: SDXL base .*; "
     r"SD 1.x/2.x .*; FLUX.1 .*\); its first keys are encoder.layers.0.weight"),
    ("{saved}/tiny-sdxl.safetensors", "{bad}/config-without-unet", (), "without-unet/unet/config.json is missing"),
    ("{saved}/tiny-sdxl.safetensors", "{bad}/nowhere", (), "--config .*nowhere does not exist"),
    ("{saved}/tiny-sdxl.safetensors", "{saved}/tiny-sd15", (), "SDXL base .* layout .* but the config .* is a "
     "StableDiffusionPipeline"),
    ("{bad}/unknown-sdxl.safetensors", "", (), "has the SDXL base .* layout, but its architecture config is not "
     "available offline.*stabilityai/stable-diffusion-xl-base-1.0/model_index.json.*Pass --config FOLDER"),
    ("tiny-sd15", "{saved}/tiny-sd15", (), "--config is for single-file checkpoints"),
    ("{saved}/tiny-sdxl", "", ("{saved}/lora-sd15.safetensors",), "LoRA lora-sd15.safetensors does not fit .*: key "
     "'unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_\\w.lora_A.weight' names layer .* which the "
     "model does not have"),
    ("tiny-sdxl", "", ("{saved}/lora-a.safetensors:nan",), "scale must be a finite number; got nan"),
    ("tiny-sdxl", "", ("{saved}/lora-a.safetensors:inf",), "scale must be a finite number; got inf"),
    # finite but far past any LoRA's range: the fused weights would overflow to a black image
    ("tiny-sdxl", "", ("{saved}/lora-a.safetensors:1e30",), r"scale 1e\+30 is outside ±100"),
    ("tiny-sdxl", "", ("{saved}/lora-a.safetensors:strong",), "scale 'strong' is not a number"),
    ("tiny-sdxl", "", ("{saved}/lora-missing.safetensors:0.5",), "LoRA file .*lora-missing.safetensors does not exist"),
    ("tiny-pixart", "", ("{saved}/lora-a.safetensors",), "PixArtAlphaPipeline, which has no LoRA loader in diffusers"),
    ("tiny-sdxl", "", ("{saved}/tiny-sdxl.safetensors",), "LoRA tiny-sdxl.safetensors: .*finds no LoRA layers in it"),
]  # fmt: skip


@pytest.mark.parametrize("model, config, loras, message", BAD)
def test_bad_input(saved, bad_files, tmp_path, monkeypatch, model, config, loras, message):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    fill = {"saved": saved, "bad": bad_files}
    model, config = model.format(**fill), config.format(**fill)
    loras = tuple(x.format(**fill) for x in loras)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        export(ExportConfig(model=model, config=config, lora=loras, out=str(out)))
    assert not out.exists() and not list(tmp_path.glob(".out*"))  # nothing written


def test_cli_bad_lora_exits_2(saved, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["export", "--model", "tiny-sdxl", "--lora", f"{saved}/lora-a.safetensors:nan", "--out", str(out)]
    assert cli.main(argv) == 2
    assert "scale must be a finite number" in capsys.readouterr().err and not out.exists()


def test_kohya_lora(saved, tmp_path):
    # The A1111/kohya naming (lora_unet_..., lora_down/lora_up, alpha), which diffusers converts on loading:
    # fused like the others, and checked against the model's layers like the others
    import diffusers

    unet = models.load("tiny-sd15").unet
    gen, layers = torch.Generator().manual_seed(5), {}
    for name, m in unet.named_modules():
        if name.endswith(("attn1.to_q", "attn2.to_k", "attn2.to_v")):
            key = "lora_unet_" + name.replace(".", "_")
            layers[f"{key}.lora_down.weight"] = torch.randn(4, m.in_features, generator=gen) * 0.1
            layers[f"{key}.lora_up.weight"] = torch.randn(m.out_features, 4, generator=gen) * 0.1
            layers[f"{key}.alpha"] = torch.tensor(2.0)
    save_file(layers, str(tmp_path / "kohya.safetensors"))
    spec = f"{tmp_path / 'kohya.safetensors'}:0.6"
    fused = sources.load(sources.resolve(str(saved / "tiny-sd15"), "", [spec])).unet
    ref = diffusers.DiffusionPipeline.from_pretrained(str(saved / "tiny-sd15"), local_files_only=True)
    ref.load_lora_weights(str(tmp_path), weight_name="kohya.safetensors", adapter_name="k")
    ref.set_adapters(["k"], adapter_weights=[0.6])
    x, e = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 77, 32, generator=gen)
    with torch.no_grad():
        got, want, base = (u(x, 10, e).sample.numpy() for u in (fused, ref.unet, unet))
    assert rel_l2(got, want) <= 1e-5  # fused W + s·BA vs the adapter's s·B(Ax): float32 rounding only
    assert rel_l2(got, base) > 1e-3  # the LoRA changes the U-Net (~1e-2 here)
    with pytest.raises(ValueError, match="does not fit .*attn1.processor.to_q_lora.down.weight' names layer"):
        sources.resolve(str(saved / "tiny-sdxl"), "", [spec])


def test_lora_refusal_lists_only_pipelines_pladis_takes(saved):
    # issue 22 D19: the list named SanaPipeline, a pipeline pladis refuses
    with pytest.raises(ValueError, match="PixArtAlphaPipeline, which has no LoRA loader") as err:
        sources.resolve("tiny-pixart", "", [str(saved / "lora-a.safetensors")])
    listed = str(err.value).rpartition("--lora works with ")[2].split(", ")
    assert "Sana" not in str(err.value) and "StableDiffusionXLPipeline" in listed
    import diffusers

    assert all(hasattr(getattr(diffusers, name), "load_lora_weights") for name in listed)  # each one has a loader


def test_lora_fits_check_names_shape_mismatch(saved):
    # a LoRA with the right layer names but another width: the first misfit is named with both sizes
    lora = saved / "lora-a.safetensors"
    sd = load_file(str(lora))
    key = next(k for k in sd if k.endswith("lora_A.weight"))
    sd[key] = torch.zeros(4, 7)
    wide = saved / "lora-wide.safetensors"
    save_file(sd, str(wide))
    with pytest.raises(ValueError, match=r"key '.*lora_A.weight' has input size 7, but layer .* has \d+"):
        sources.resolve("tiny-sdxl", "", [str(wide)])


def test_patch_of_fused_model_matches_builtin_layers(saved):
    # LoRA fusing leaves plain layers: PLADIS patches the same attention layers as on the base model
    src = sources.resolve(str(saved / "tiny-sdxl"), "", [str(saved / "lora-a.safetensors")])
    pipe = sources.load(src)
    assert not any("lora" in n for n, _ in pipe.unet.named_modules())
    assert patch.apply(pipe).layers == patch.apply(models.load("tiny-sdxl")).layers


def test_manifests_from_before_source_records(tmp_path, monkeypatch):
    # Exports made before issue 12 stored the model as typed: built-ins still rebuild; a relative path is
    # refused with the fix instead of being tried as a hub id
    assert provenance.verify({"source": "tiny-sd15", "seed": 0}).kind == "builtin"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(provenance.SourceChanged, match="relative path 'mine' .* re-export it"):
        provenance.verify({"source": "mine", "seed": 0})


def test_source_failures_are_pladis_errors():
    # the CLI turns PladisErrors into one line; a moved source, a bad LoRA or checkpoint is the user's to fix
    from pladis import lora, single_file
    from pladis.errors import PladisError

    for cls in (provenance.SourceChanged, sources.SourceError, lora.LoraError, single_file.CheckpointError):
        assert issubclass(cls, PladisError), cls
    with pytest.raises(PladisError, match="relative path 'mine'"):
        provenance.verify({"source": "mine", "seed": 0})
