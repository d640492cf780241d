"""LoRA without a rebuild: the weight map every export writes (module path -> the ONNX initializer holding it)."""

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from pladis import models
from pladis.export import ExportConfig, export

TINY = [n for n in models.BUILTINS if n.startswith("tiny-")]


@pytest.mark.parametrize("name", TINY)
def test_weight_map_covers_every_linear_and_holds_its_values(tmp_path, name):
    """Every nn.Linear of each LoRA-addressable component (denoiser, text encoders) is in the map, and the named
    initializer holds exactly that weight (transposed where the map says so). Reference: the freshly built
    pipeline's own weights (same seed), not the exporter's module. Misses: none (the VAE decoder is no LoRA target
    and has no map)."""
    from pladis.export import contracts

    manifest = export(ExportConfig(model=name, out=str(tmp_path / "out"), validate=False))
    pipe = models.load(name, seed=manifest["model"]["seed"])
    # the module each component's graph computes: the pipeline's attribute, or the part of it that is exported
    # (Qwen-Image's text decoder without the LM head and vision tower)
    exported = {c.name: c for c in contracts.components(pipe, manifest["model"]["family"])}
    dims = {k: tuple(v) for k, v in manifest["dims"].items()}
    for comp_name, comp in manifest["components"].items():
        if comp["role"] == "vae_decoder":
            assert comp["weights"] == {} and comp["weights_missing"] == {}
            continue
        module = exported[comp_name].module
        linears = {n: m for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)}
        # misses: only layers that never reach the outputs (Qwen-Image's last text-stream layers, pruned by the
        # exporter; FLUX.2 [dev]'s vision tower and projector: its prompts carry no images); a LoRA on them changes
        # nothing
        dead = _unused(exported[comp_name], dims, linears, comp["weights_missing"])
        assert set(comp["weights_missing"]) == dead, f"{name} {comp_name} misses {sorted(comp['weights_missing'])}"
        assert set(comp["weights"]) == set(linears) - dead
        inits = {t.name: t for t in onnx.load(str(tmp_path / "out" / comp["file"])).graph.initializer}
        for path, entry in comp["weights"].items():
            value = numpy_helper.to_array(inits[entry["initializer"]])
            want = linears[path].weight.detach().float().numpy()
            np.testing.assert_array_equal(value.T if entry["transposed"] else value, want)  # bitwise: same bytes


def _unused(comp, dims: dict, linears: dict, names) -> set[str]:
    """The layers among ``names`` whose weights do not reach ``comp``'s outputs: changing one leaves them bitwise."""
    from pladis.export import contracts

    inputs = contracts.sample_inputs(comp, dims, torch.float32)
    with torch.no_grad():
        before = contracts.Traced(comp)(*inputs)
        out = set()
        for name in names:
            w = linears[name].weight
            saved = w.clone()
            w.add_(1.0)
            after = contracts.Traced(comp)(*inputs)
            w.copy_(saved)
            if all(torch.equal(a, b) for a, b in zip(before, after, strict=True)):
                out.add(name)
    return out


# --------------------------------------------------------------------------------------------------
# Swapping LoRAs on a built engine (pladis.runtime.lora): vs a fresh export with the same LoRAs fused
# --------------------------------------------------------------------------------------------------

pytest.importorskip("peft")  # in the dev and lora extras; the LoRAs are made with it

# family -> (the denoiser's LoRA target modules, the LoRA-loader keyword its layers are saved under)
FAMILIES = {
    "tiny-sdxl": (["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2"], "unet_lora_layers"),
    "tiny-flux": (["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "proj_mlp", "ff.net.2"],
                  "transformer_lora_layers"),
}  # fmt: skip


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def make_lora(name: str, seed: int, path, rank: int = 4):
    """A peft LoRA (random up- and down-projections: peft's default zeros would change nothing) on the
    denoiser's attention and feed-forward linears, and for SDXL on both text encoders' attention projections,
    saved with diffusers' save_lora_weights from peft's own state dicts."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    targets, keyword = FAMILIES[name]
    torch.manual_seed(seed)
    pipe = models.load(name)
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False)
    denoiser.add_adapter(config)
    layers = {keyword: get_peft_model_state_dict(denoiser)}
    if name == "tiny-sdxl":  # text encoders: transformers 5's add_adapter wants peft >= 0.22; peft's own injection
        te = LoraConfig(r=rank, lora_alpha=rank, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"],
                        init_lora_weights=False)  # fmt: skip
        for comp in ("text_encoder", "text_encoder_2"):
            module = inject_adapter_in_model(te, getattr(pipe, comp))
            layers[f"{comp}_lora_layers"] = get_peft_model_state_dict(module)
    type(pipe).save_lora_weights(str(path.parent), weight_name=path.name, **layers)
    return path


def kohya(src, dst):
    """The U-Net layers of a diffusers-saved SDXL LoRA renamed as kohya's sd-scripts names them
    (``lora_unet_<path with _>.lora_down/lora_up.weight`` and an ``.alpha`` of the rank); text encoders as
    ``lora_te1_`` / ``lora_te2_``."""
    from safetensors.torch import load_file, save_file

    prefixes = {"unet.": "lora_unet_", "text_encoder.": "lora_te1_", "text_encoder_2.": "lora_te2_"}
    out = {}
    for key, value in load_file(str(src)).items():
        comp = next(p for p in sorted(prefixes, key=len, reverse=True) if key.startswith(p))
        layer, _, kind = key.removeprefix(comp).rpartition(".lora_")
        base = prefixes[comp] + layer.replace(".", "_")
        out[f"{base}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = value
        if kind.startswith("A"):
            out[f"{base}.alpha"] = torch.tensor(float(value.shape[0]))
    save_file(out, str(dst))
    return dst


def feeds_of(manifest: dict, seed: int = 0) -> dict:
    """Seeded inputs of each LoRA-addressable component at its optimal shape."""
    out = {}
    for name, comp in manifest["components"].items():
        gen = torch.Generator().manual_seed(seed + len(name))
        feeds = {}
        for i in comp["inputs"]:
            if i["dtype"].startswith("int"):
                feeds[i["name"]] = torch.randint(0, 60, i["opt"], generator=gen, dtype=getattr(torch, i["dtype"]))
            else:
                scale = 50 if "time" in i["name"] else 1
                feeds[i["name"]] = torch.randn(i["opt"], generator=gen) * scale
        if comp["role"] != "vae_decoder":
            out[name] = feeds
    return out


def outputs(rt, feeds) -> dict:
    return {n: {k: v.numpy().copy() for k, v in rt.run(n, f).items()} for n, f in feeds.items()}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """One module-scoped set per family: the base export, LoRAs a and b, and a fresh export with a:0.5 + b:1.0
    fused through the existing --lora path (the reference)."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    a, b = make_lora(name, 1, root / "a.safetensors"), make_lora(name, 2, root / "b.safetensors")
    base = root / "base"
    manifest = export(ExportConfig(model=name, out=str(base), validate=False))
    fused = root / "fused"
    export(ExportConfig(model=name, out=str(fused), validate=False, lora=(f"{a}:0.5", f"{b}:1.0")))
    return {"name": name, "root": root, "a": a, "b": b, "base": base, "fused": fused, "feeds": feeds_of(manifest)}


def test_swapped_loras_match_a_fresh_export_with_them_fused(family):
    """a:0.5 + b:1.0 swapped into the base ORT engine vs the export with both fused (diffusers' own fuse_lora)
    and run by ONNX Runtime: every LoRA-touched component (SDXL: U-Net and both text encoders)."""
    from pladis.runtime import Runtime

    feeds = family["feeds"]
    want = outputs(Runtime(family["fused"], "ort"), feeds)
    rt = Runtime(family["base"], "ort", loras=[(family["a"], 0.5), (family["b"], 1.0)])
    got = outputs(rt, feeds)
    base = outputs(Runtime(family["base"], "ort"), feeds)
    touched = {"tiny-sdxl": {"unet", "text_encoder", "text_encoder_2"}, "tiny-flux": {"transformer"}}[family["name"]]
    assert set(rt._lora_weights) == touched
    for comp in touched:
        for key in want[comp]:
            # same fp32 weights (W0 + 0.5·Δa + 1.0·Δb, added in diffusers' order) in the same graph: only the
            # summation order of the weight update may differ, far below 1e-6
            assert rel_l2(got[comp][key], want[comp][key]) <= 1e-6, (comp, key)
            assert rel_l2(base[comp][key], want[comp][key]) > 1e-3, (comp, key)  # the LoRAs change the outputs


def test_a_b_a_returns_a_bitwise_and_removing_all_returns_the_base(family):
    from pladis.runtime import Runtime

    feeds = family["feeds"]
    base = outputs(Runtime(family["base"], "ort"), feeds)
    rt = Runtime(family["base"], "ort", loras=[f"{family['a']}:1.0"])
    first = outputs(rt, feeds)
    rt.set_loras([f"{family['b']}:0.5"])
    other = outputs(rt, feeds)
    rt.set_loras([f"{family['a']}:1.0"])
    again = outputs(rt, feeds)
    rt.set_loras([])
    plain = outputs(rt, feeds)
    for comp in first:
        for key in first[comp]:
            np.testing.assert_array_equal(again[comp][key], first[comp][key])  # A -> B -> A: no residue, bitwise
            np.testing.assert_array_equal(plain[comp][key], base[comp][key])  # none: the base engine, bitwise
    denoiser = next(n for n in ("unet", "transformer") if n in first)
    assert (
        rel_l2(
            other[denoiser]["noise_pred" if "noise_pred" in other[denoiser] else next(iter(other[denoiser]))],
            first[denoiser][next(iter(first[denoiser]))],
        )
        > 1e-3
    )  # fmt: skip  (B is another LoRA)


def test_torch_backend_swaps_the_same_weights_and_restores_the_base(family):
    """The torch backend: the fused weights in the shared eager module's parameters for each run only. Reference:
    the eager pipeline of the fused export (diffusers' own load_lora_weights + fuse_lora on the same model)."""
    from pladis.runtime import Runtime

    if family["name"] != "tiny-sdxl":
        pytest.skip("one family is enough for the torch backend's parameter swap")
    feeds = {"unet": family["feeds"]["unet"]}
    want = outputs(Runtime(family["fused"], "torch"), feeds)["unet"]
    rt = Runtime(family["base"], "torch", loras=[(family["a"], 0.5), (family["b"], 1.0)])
    got = outputs(rt, feeds)["unet"]
    base = outputs(Runtime(family["base"], "torch"), feeds)["unet"]
    for key in want:
        # the same fp32 weights in the same eager module: only the weight update's summation order may differ
        assert rel_l2(got[key], want[key]) <= 1e-6
        assert rel_l2(base[key], want[key]) > 1e-3  # the LoRAs change the output
    rt.set_loras([])
    for key, value in outputs(rt, feeds)["unet"].items():
        np.testing.assert_array_equal(value, base[key])  # the base tensors themselves are back


class FrozenCapture:
    """A capture function whose replay is stale the way a CUDA graph is: NOT a CUDA graph (no GPU here).

    A real graph replays the kernels it recorded on the memory they read at capture time; a weight swap done
    after it (the torch backend rebinds ``lora`` to new fused tensors, ORT creates a new session, TensorRT
    refits) never reaches it. This stand-in keeps a shallow copy of the denoiser backend's attributes when it
    captures (``backend``: set by the test once the runtime made it) and its replay puts them back for the call,
    so it re-runs the captured call on the backend as it was then (the LoRA weights of capture time) and copies
    the result into the static outputs. A runtime that kept a graph across a swap therefore gets the old weights'
    outputs here, as it would on a GPU; one that dropped it captures again with the new weights."""

    def __init__(self):
        self.backend = None
        self.captures = 0

    def __call__(self, call):
        frozen = dict(vars(self.backend))  # the tensors it reads now, as a graph keeps its addresses
        outputs = {k: v.clone() for k, v in call().items()}
        self.captures += 1

        def replay():
            now = dict(vars(self.backend))
            vars(self.backend).update(frozen)
            try:
                result = call()
            finally:
                vars(self.backend).clear()
                vars(self.backend).update(now)
            for k, v in result.items():
                outputs[k].copy_(v)

        return replay, outputs


def test_a_lora_swap_drops_the_denoisers_captured_graphs(family, monkeypatch):
    """Runtime(cuda_graphs=GraphCache(FrozenCapture)) on the cpu: generate (the denoiser's graph captured in the
    warm-up), swap LoRA a in, generate, swap back to none, generate. Each swap drops the denoiser's graph and the
    next generate captures it again, and every result equals a graphs-off runtime with the same LoRAs bitwise.
    It can fail: the replay is stale like a real graph's (FrozenCapture), so without ``graphs.drop`` in
    ``use_lora_weights`` the swapped runtime replays the base U-Net; the last part runs exactly that (drop made
    a no-op) and checks it gives other latents than a's."""
    from pladis.runtime import Runtime, graphs

    f = _sdxl(family)
    run = {"prompt": "a red cube", "steps": 3, "seed": 1, "progress": False}

    def graphed():
        rec = FrozenCapture()
        rt = Runtime(f["base"], "torch", cuda_graphs=graphs.GraphCache(rec))
        rec.backend = rt.backend(rt.engine.denoiser)
        return rt, rec

    def keys(rt):
        return [k for k in rt.graphs.graphs if k[0] == rt.engine.denoiser]

    def same(got, want):
        # atol=0: the same torch backend and fp32 ops on the same values, through the cache's static buffers
        assert torch.equal(got.latents, want.latents)
        assert all(np.array_equal(np.asarray(g), np.asarray(w)) for g, w in zip(got.images, want.images, strict=True))

    eager = Runtime(f["base"], "torch")
    want_base = eager.generate(**run)
    eager.set_loras([(f["a"], 1.0)])
    want_a = eager.generate(**run)
    assert not torch.equal(want_a.latents, want_base.latents)  # a changes the latents: a stale graph would show

    rt, rec = graphed()
    same(rt.generate(**run), want_base)
    captured = keys(rt)
    assert len(captured) == 1 and rec.captures == 1 and rt.graphs.captures == 1
    rt.set_loras([(f["a"], 1.0)])
    assert not keys(rt)  # dropped with the swap
    same(rt.generate(**run), want_a)
    assert keys(rt) == captured and rec.captures == 2  # captured again, on a's weights
    rt.set_loras([])
    assert not keys(rt)
    same(rt.generate(**run), want_base)
    assert keys(rt) == captured and rec.captures == 3

    stale, stale_rec = graphed()  # the same swap with drop made a no-op: what the test above guards against
    stale.generate(**run)
    monkeypatch.setattr(stale.graphs, "drop", lambda component: None)
    stale.set_loras([(f["a"], 1.0)])
    kept = stale.generate(**run)
    # the base U-Net replayed on a's text conditioning (a also touches both text encoders): neither result
    assert stale_rec.captures == 1 and rel_l2(kept.latents, want_a.latents) > 1e-3


def test_a_kohya_named_lora_swaps_in_the_same(family, tmp_path):
    if family["name"] != "tiny-sdxl":
        pytest.skip("kohya's sd-scripts names: written for the SDXL U-Net and text encoders")
    from pladis.runtime import Runtime

    k = kohya(family["a"], tmp_path / "kohya.safetensors")
    feeds = family["feeds"]
    want = outputs(Runtime(family["base"], "ort", loras=[(family["a"], 0.7)]), feeds)
    got = outputs(Runtime(family["base"], "ort", loras=[(k, 0.7)]), feeds)
    for comp in want:
        for key in want[comp]:
            # the same tensors under other names, alpha = rank: diffusers' converter gives the same deltas
            assert rel_l2(got[comp][key], want[comp][key]) <= 1e-6, (comp, key)


def _sdxl(family):
    if family["name"] != "tiny-sdxl":
        pytest.skip("the command and the refusals need one family")
    return family


def test_pladis_lora_writes_an_engine_folder_that_runs_with_them(family, tmp_path, capsys):
    """The command: a new folder with loras.json beside the engine's (linked) files; a Runtime on it swaps them
    in; an existing pladis folder is replaced only with --force; the LoRA-free command gives the base again."""
    from pladis import cli
    from pladis.runtime import Runtime

    f = _sdxl(family)
    out = tmp_path / "with-loras"
    assert cli.main(["lora", "--engine", str(f["base"]), "--lora", f"{f['a']}:0.5", "--lora", str(f["b"]),
                     "--out", str(out)]) == 0  # fmt: skip
    assert "LoRAs: a.safetensors:0.5, b.safetensors:1" in capsys.readouterr().out
    feeds = {"unet": f["feeds"]["unet"]}
    got = outputs(Runtime(out, "ort"), feeds)["unet"]
    want = outputs(Runtime(f["base"], "ort", loras=[(f["a"], 0.5), (f["b"], 1.0)]), feeds)["unet"]
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])  # the same swap, by the folder's loras.json
    assert cli.main(["lora", "--engine", str(f["base"]), "--out", str(out)]) == 2  # exists: needs --force
    assert "--force" in capsys.readouterr().err
    assert cli.main(["lora", "--engine", str(f["base"]), "--out", str(out), "--force"]) == 0
    base = outputs(Runtime(f["base"], "ort"), feeds)["unet"]
    for key, value in outputs(Runtime(out, "ort"), feeds)["unet"].items():
        np.testing.assert_array_equal(value, base[key])


def _refused(capsys, args, *words):
    from pladis import cli

    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(w in err for w in words), err


def test_refusals_before_any_work(family, tmp_path, capsys):
    """Each refusal is one line, exit 2, and writes nothing: a LoRA for another model (sizes), a LoRA layer the
    engine's weight map does not hold (a conv layer), a scale that is not finite; and in the API a family
    without a diffusers LoRA loader and a TensorRT engine not built refittable."""
    import json

    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from pladis.lora import LoraError
    from pladis.manifest import Engine, EngineError
    from pladis.runtime import Runtime, backends
    from pladis.runtime import lora as swap

    f = _sdxl(family)
    out = tmp_path / "out"
    other = tmp_path / "sd15.safetensors"  # a LoRA for tiny-sd15: other layer sizes
    pipe = models.load("tiny-sd15")
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q"], init_lora_weights=False))
    type(pipe).save_lora_weights(str(tmp_path), weight_name=other.name,
                                 unet_lora_layers=get_peft_model_state_dict(pipe.unet))  # fmt: skip
    _refused(capsys, ["lora", "--engine", str(f["base"]), "--lora", str(other), "--out", str(out)],
             "does not fit tiny-sdxl", "key 'unet.")  # fmt: skip
    conv = tmp_path / "conv.safetensors"  # a LoRA on the resnets' convolutions: not in the weight map
    pipe = models.load("tiny-sdxl")
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["conv1"], init_lora_weights=False))
    type(pipe).save_lora_weights(str(tmp_path), weight_name=conv.name,
                                 unet_lora_layers=get_peft_model_state_dict(pipe.unet))  # fmt: skip
    _refused(capsys, ["lora", "--engine", str(f["base"]), "--lora", str(conv), "--out", str(out)],
             "not in this engine's weight map", "unet.down_blocks.0.resnets.0.conv1")  # fmt: skip
    _refused(capsys, ["lora", "--engine", str(f["base"]), "--lora", f"{f['a']}:inf", "--out", str(out)],
             "finite")  # fmt: skip
    assert not out.exists() and not list(tmp_path.glob(".out.*"))  # nothing written
    with pytest.raises(LoraError, match="finite"):
        Runtime(f["base"], "ort", loras=[(f["a"], float("nan"))])
    manifest = json.loads((f["base"] / "manifest.json").read_text())
    manifest["model"]["pipeline_class"] = "PixArtAlphaPipeline"  # a family diffusers gives no LoRA loader
    with pytest.raises(LoraError, match="PixArtAlphaPipeline, which has no LoRA loader"):
        swap.Adapters(Engine(f["base"], manifest)).check(swap.parse([f["a"]]))
    built = {"backend": "trt", "flags": {"refit": False},
             "components": {"unet": {"file": "unet.plan", "kind": "trt"}}}  # fmt: skip
    with pytest.raises(EngineError, match="not built refittable.*--refit"):
        backends.check_lora(Engine(f["base"], json.loads((f["base"] / "manifest.json").read_text()), built), "unet",
                            "trt")  # fmt: skip
    built["flags"]["refit"] = True
    backends.check_lora(Engine(f["base"], json.loads((f["base"] / "manifest.json").read_text()), built), "unet", "trt")


def test_parity_with_swapped_loras_rebuilds_the_eager_reference_with_them(family, tmp_path, monkeypatch, capsys):
    """`pladis parity --lora`: the ORT engine with a:0.5 + b swapped in vs eager diffusers with both loaded and
    fused on the real pipeline; passes, and fails when the reference is left without them (so it can fail)."""
    from pladis import cli
    from pladis.runtime import backends, parity

    f = _sdxl(family)
    args = ["parity", "--engine", str(f["base"]), "--backend", "ort", "--steps", "2",
            "--lora", f"{f['a']}:0.5", "--lora", str(f["b"])]  # fmt: skip
    assert cli.main(args) == 0, capsys.readouterr().out  # fp32: parity.TOLERANCE per teacher-forced step
    real = backends.eager_components
    monkeypatch.setattr(backends, "eager_components", lambda folder, device, loras=(): real(folder, device))
    report = parity.check(f["base"], "ort", steps=2, loras=[(f["a"], 0.5), (f["b"], 1.0)])
    assert not report.ok  # the engine carries the LoRAs, a reference without them differs


def test_a_built_ort_engine_takes_the_same_swap(family, tmp_path):
    """`pladis build --backend ort` saves an optimised graph; the weight map's initializers are still there by
    name, so the swap overrides them at session creation the same way as on the export folder."""
    from pladis.engine import BuildConfig, build
    from pladis.runtime import Runtime

    f = _sdxl(family)
    build(BuildConfig(onnx=str(f["base"]), backend="ort", out=str(tmp_path / "eng"), cache_dir=str(tmp_path / "c")))
    feeds = f["feeds"]
    want = outputs(Runtime(f["fused"], "ort"), feeds)
    rt = Runtime(tmp_path / "eng", loras=[(f["a"], 0.5), (f["b"], 1.0)])
    assert set(rt.backend_names.values()) == {"ort"} and rt.engine.built is not None
    got = outputs(rt, feeds)
    for comp in want:
        for key in want[comp]:
            # the fused export's weights in the optimised graph: kernels may be fused differently, not the weights
            assert rel_l2(got[comp][key], want[comp][key]) <= 1e-6, (comp, key)


def test_server_serves_each_request_its_own_loras(family, tmp_path):
    """--lora-dir: two concurrent request streams with different adapters get the images their adapters give
    alone (bitwise vs solo requests afterwards), a request without adapters gets the base engine's image (bitwise
    vs Runtime.generate on the plain engine), an unknown adapter is a 400 naming it, /metrics counts swaps and
    cache hits."""
    import base64
    import io
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    from fastapi.testclient import TestClient
    from PIL import Image

    from pladis.runtime import Runtime
    from pladis.serve import create_app
    from pladis.serve.config import ServeConfig

    f = _sdxl(family)
    folder = tmp_path / "loras"
    folder.mkdir()
    shutil.copy(f["a"], folder / "style-a.safetensors")
    shutil.copy(f["b"], folder / "style-b.safetensors")
    cfg = ServeConfig(engine=str(f["base"]), backend="ort", lora_dir=str(folder), lora_cache=2, batch_window_ms=200)

    def image(r):
        assert r.status_code == 200, r.text
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))))

    body = {"prompt": "a red cube", "steps": 2, "size": "32x32"}
    sets = {"a": [{"name": "style-a", "scale": 0.8}], "b": [{"name": "style-b"}], "none": None}
    with TestClient(create_app(cfg)) as client:
        post = lambda key, seed: client.post(  # noqa: E731
            "/v1/images/generations", json={**body, "seed": seed, **({"loras": sets[key]} if sets[key] else {})}
        )
        jobs = [("a", 1), ("b", 1), ("a", 2), ("b", 2), ("none", 3), ("a", 3), ("b", 3)]
        with ThreadPoolExecutor(len(jobs)) as pool:
            together = dict(zip(jobs, pool.map(lambda j: image(post(*j)), jobs), strict=True))
        alone = {j: image(post(*j)) for j in jobs}
        r = client.post("/v1/images/generations", json={**body, "loras": [{"name": "style-c"}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "loras"
        assert "'style-c'" in r.json()["error"]["message"] and "style-a" in r.json()["error"]["message"]
        r = client.post("/v1/images/generations", json={**body, "loras": [{"name": "style-a"}, {"name": "style-a"}]})
        assert r.status_code == 400 and "named twice" in r.json()["error"]["message"], r.text
        (folder / "broken.safetensors").write_bytes(b"not a safetensors file")
        r = client.post("/v1/images/generations", json={**body, "loras": [{"name": "broken"}]})
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"] == "loras" and "broken.safetensors" in error["message"], r.text
        assert str(tmp_path) not in error["message"]  # the client is not told where the server keeps its files
        metrics = client.get("/metrics").text
    for j in jobs:
        np.testing.assert_array_equal(together[j], alone[j])  # batched with others of its set = alone
    assert not np.array_equal(alone[("a", 1)], alone[("b", 1)])  # the adapters give different images
    plain = Runtime(f["base"], "ort").generate(body["prompt"], steps=2, seed=3, height=32, width=32).images[0]
    np.testing.assert_array_equal(alone[("none", 3)], np.asarray(plain))
    assert not np.array_equal(alone[("a", 3)], np.asarray(plain))
    values = {
        line.split()[0]: float(line.split()[1]) for line in metrics.splitlines() if line.startswith("pladis_lora")
    }
    assert values["pladis_lora_swaps_total"] >= 3 and values["pladis_lora_cache_hits_total"] >= 1


def test_the_swap_benchmark_parses_its_arguments_and_writes_json_and_a_row(tmp_path, capsys):
    """bench/lora_swap.py on tiny-sd15 (the full-size sd15 run is the benchmark, not a test): its flags, its JSON
    (both measurements of one run) and its table row; no timing is asserted."""
    import json

    from pladis.bench import lora_swap

    assert lora_swap.parse_args([]).model == "sd15" and lora_swap.parse_args([]).rank == 16
    with pytest.raises(SystemExit):
        lora_swap.parse_args(["--rank", "0"])
    assert lora_swap.main(["--model", "tiny-sd15", "--rank", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    data = json.loads((tmp_path / "lora_swap.json").read_text())
    r = data["results"]["tiny-sd15-ort"]
    assert r["lora_layers"] > 0 and r["swap_s"] > 0 and r["rebuild_s"] > 0 and "machine" in r
    assert r["swap_over_rebuild"] == pytest.approx(r["swap_s"] / r["rebuild_s"], abs=1e-3)  # from unrounded times
    assert "| tiny-sd15 | 2 |" in out and "swap / rebuild" in out
    from pladis.bench import report

    assert "## LoRA swap vs rebuild" in report.render(tmp_path) and "| tiny-sd15 | 2 |" in report.render(tmp_path)


@pytest.mark.slow
def test_an_aoti_engine_swaps_its_constants(family, tmp_path):
    """--backend aoti: the fused weights loaded as the .pt2's constants (load_constants), the base constants back
    on removal (bitwise), A's outputs vs the eager pipeline with the LoRAs fused by diffusers."""
    from pladis import torch_internals
    from pladis.engine import BuildConfig, build
    from pladis.runtime import Runtime

    f = _sdxl(family)
    if not torch_internals.aoti_updates_constants():
        pytest.skip(f"torch {torch.__version__} has no AOTInductor constant update (the swap is refused by name)")
    build(BuildConfig(onnx=str(f["base"]), backend="aoti", out=str(tmp_path / "eng"), cache_dir=str(tmp_path / "c")))
    feeds = {"unet": f["feeds"]["unet"]}
    rt = Runtime(tmp_path / "eng")
    assert rt.backend_names["unet"] == "aoti"
    base = outputs(rt, feeds)["unet"]
    want = outputs(Runtime(f["fused"], "torch"), feeds)["unet"]
    rt.set_loras([(f["a"], 0.5), (f["b"], 1.0)])
    got = outputs(rt, feeds)["unet"]
    rt.set_loras([])
    again = outputs(rt, feeds)["unet"]
    for key in want:
        assert rel_l2(got[key], want[key]) <= 1e-4  # AOTInductor's kernels vs eager: the fp32 export contract
        assert rel_l2(base[key], want[key]) > 1e-3  # the constants changed
        np.testing.assert_array_equal(again[key], base[key])  # the base constants back, bitwise
