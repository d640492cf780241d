"""Export to ONNX: every tiny architecture, the function body alone, dynamic shapes, bad input."""

import json
import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tolerances
import torch
from onnx import TensorProto, helper

import pladis
from pladis import models, patch
from pladis.export import ExportConfig, contracts, export, onnx_op
from pladis.export.manifest import sha256

TINY = [n for n in models.BUILTINS if n.startswith("tiny-")]


def run_export(tmp_path, **kw):
    cfg = ExportConfig(**{"out": str(tmp_path / "out"), **kw})
    return export(cfg), tmp_path / "out"


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name", TINY)
def test_every_tiny_architecture_exports_and_validates(tmp_path, name):
    manifest, out = run_export(tmp_path, model=name)
    assert json.loads((out / "manifest.json").read_text()) == manifest
    layers = manifest["pladis"]["layers"]
    assert layers and manifest["pladis"]["patched"]
    for comp in manifest["components"].values():
        path = out / comp["file"]
        assert comp["sha256"] == sha256(path)  # the manifest describes the files on disk
        model = onnx.load(str(path))
        nodes = onnx_op.pladis_nodes(model)
        assert len(nodes) == comp["pladis_nodes"] == (len(layers) if comp["role"] == "denoiser" else 0)
        for node in nodes:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            assert attrs["plugin_version"] == b"1" and attrs["plugin_namespace"] == b"pladis"
            assert "lam" not in attrs and attrs["alpha"] == 1.5 and attrs["scale"] > 0
            assert len(node.input) == 5  # q, k, v, mask, lam: the strength is the fifth input
        assert [i.name for i in model.graph.input] == [i["name"] for i in comp["inputs"]]
        if comp["role"] == "denoiser":
            assert comp["inputs"][-1]["name"] == "pladis_scale" == manifest["pladis"]["lam_input"]
        assert [o.name for o in model.graph.output] == [o["name"] for o in comp["outputs"]]
        assert comp["validation"]["values"] == "ok" and comp["validation"]["checker"] == "full"
        for report in comp["validation"]["outputs"].values():
            assert report["rel_l2"] <= 1e-4  # the fp32 export contract
    for key in ("versions", "dims", "opset", "precision", "model", "vae"):
        assert manifest[key]
    assert manifest["model"]["source"] == name and len(manifest["versions"]["torch"]) > 0
    assert (out / "scheduler" / "scheduler_config.json").exists() and (out / "tokenizer").is_dir()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left behind


# --------------------------------------------------------------------------------------------------
# The function body alone, in ONNX Runtime, against the PyTorch operator
# --------------------------------------------------------------------------------------------------


def single_node_model(alpha, text_len, text_first, scale, max_keys, elem=TensorProto.FLOAT):
    node = helper.make_node(
        "PladisAttention", ["q", "k", "v", "mask", "lam"], ["out"], domain="pladis", alpha=alpha, scale=scale,
        text_len=text_len, text_first=int(text_first), plugin_version="1", plugin_namespace="pladis",
    )  # fmt: skip
    inputs = [helper.make_tensor_value_info(n, elem, ["B", "H", None, None]) for n in "qkv"]
    inputs.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, [None] * 4))
    inputs.append(helper.make_tensor_value_info("lam", TensorProto.FLOAT, [None]))
    graph = helper.make_graph([node], "one", inputs, [helper.make_tensor_value_info("out", elem, [None] * 4)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx_op.attach_function(model, 17, max_keys=max_keys)  # the Newton steps an export for these keys gets
    onnx.checker.check_model(model, full_check=True)
    return model


CASES = [  # (text_len, text_first, Lq, Lk)
    (0, False, 33, 77), (0, False, 9, 300), (7, True, 40, 40), (77, False, 300, 300), (1, False, 50, 50),
    (77, True, 200, 200),
]  # fmt: skip


@pytest.mark.parametrize("alpha", [1.5, 2.0])
@pytest.mark.parametrize("text_len, text_first, lq, lk", CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_function_body_matches_operator(alpha, text_len, text_first, lq, lk, dtype):
    rng = np.random.default_rng(lk + lq)
    q, k = (rng.standard_normal((2, 3, n, 16)).astype(np.float32) * 2.5 for n in (lq, lk))
    v = rng.standard_normal((2, 3, lk, 16)).astype(np.float32)
    mask = np.zeros((2, 1, 1, lk), np.float32)
    mask[0, ..., lk - lk // 4 :] = -np.inf  # key padding in batch 0
    if text_len == 0:
        mask = np.broadcast_to(mask, (2, 1, lq, lk)).copy()
        mask[1, 0, 3] = -np.inf  # one query row with no key at all -> zeros
    elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16
    q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
    lam = np.array([2.0, 0.5], np.float32)  # one strength per sample, read from the node's fifth input
    out = session_from(single_node_model(alpha, text_len, text_first, 0.25, text_len or lk, elem)).run(
        None, dict(q=q, k=k, v=v, mask=mask, lam=lam)
    )[0]
    t = [torch.tensor(x.astype(np.float64)) for x in (q, k, v, mask, lam)]
    if text_len:
        ref = pladis.joint_attention(*t[:3], text_len=text_len, text_first=text_first, alpha=alpha, scale=0.25,
                                     attn_mask=t[3], lam=t[4])  # fmt: skip
    else:
        ref = pladis.attention(*t[:3], alpha=alpha, scale=0.25, attn_mask=t[3], lam=t[4])
    # float32 logits and threshold vs float64: float32 rounding of O(10) scores times lam; fp16 inputs also
    # round the mixed map to fp16 (2^-11 relative) before P·V, as the contract says.
    tol = tolerances.FP32 if dtype == np.float32 else tolerances.HALF[torch.float16]
    np.testing.assert_allclose(out.astype(np.float64), ref.numpy(), rtol=tol, atol=tol)
    assert not np.isnan(out).any()


def session_from(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------------------------------
# Dynamic shapes, plugin-only graphs, precision
# --------------------------------------------------------------------------------------------------


def _eager_and_onnx(manifest, out, name, comp_name, d):
    """Run one component eagerly (PLADIS-patched, fresh model of the same seed) and in ORT at dims d."""
    pipe = models.load(name)
    pladis.apply(pipe)
    comp = next(c for c in contracts.components(pipe, patch.family_of(patch.denoiser_of(pipe)).name)
                if c.name == comp_name)  # fmt: skip
    inputs = contracts.sample_inputs(comp, d, torch.float32, seed=3)
    with torch.no_grad():
        expected = contracts.Traced(comp)(*inputs)[0].numpy()
    sess = session(out / manifest["components"][comp_name]["file"])
    got = sess.run(None, {i.name: t.numpy() for i, t in zip(comp.inputs, inputs, strict=True)})[0]
    return got, expected


@pytest.mark.parametrize("name, comp_name, height, run_at", [
    ("tiny-sd15", "unet", 128, dict(cfg_batch=3, latent_height=48, latent_width=80, text=154)),
    ("tiny-sd3", "transformer", 32, dict(cfg_batch=4, latent_height=24, latent_width=40)),
    ("tiny-flux", "transformer", 32, dict(cfg_batch=1, image_tokens=12 * 20)),
])  # fmt: skip
def test_dynamic_shapes_run_inside_the_declared_range(tmp_path, name, comp_name, height, run_at):
    manifest, out = run_export(tmp_path, model=name, height=height, width=height, validate=False)
    dims = {k: tuple(v) for k, v in manifest["dims"].items()}
    for dim, size in run_at.items():
        lo, opt, hi = dims[dim]
        assert lo <= size <= hi and size != opt, f"{dim}={size} must be inside [{lo}, {hi}] and not the export size"
    d = {k: (v[0], run_at.get(k, v[1]), v[2]) for k, v in dims.items()}
    got, expected = _eager_and_onnx(manifest, out, name, comp_name, d)
    assert got.shape == expected.shape
    rel = np.linalg.norm(got - expected) / np.linalg.norm(expected)
    assert rel <= 1e-4, f"rel-L2 {rel:.3g} at {run_at}"  # the fp32 export contract


def test_no_function_body_is_plugin_only_and_valid(tmp_path):
    manifest, out = run_export(tmp_path, model="tiny-sdxl", function_body=False)
    model = onnx.load(str(out / "unet.onnx"))
    assert len(model.functions) == 0 and len(onnx_op.pladis_nodes(model)) == 10
    onnx.checker.check_model(str(out / "unet.onnx"), full_check=True)
    assert manifest["pladis"]["function_body"] is False
    assert manifest["components"]["unet"]["validation"]["values"] == "ok"  # checked with the body, then stripped


def test_fp16_export_validates(tmp_path):
    manifest, out = run_export(tmp_path, model="tiny-sd15", precision="fp16")
    unet = manifest["components"]["unet"]
    assert unet["dtype"] == "float16" and unet["inputs"][0]["dtype"] == "float16"
    assert manifest["components"]["text_encoder"]["dtype"] == "float32"  # see contracts.component_dtype
    assert unet["validation"]["values"] == "ok"


# --------------------------------------------------------------------------------------------------
# Bad input: clear errors, nothing half-written
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, message", [
    (dict(model="tiny-sd99"), "unknown model 'tiny-sd99'.*tiny-sd15, tiny-sdxl"),
    (dict(precision="int8"), "precision must be one of fp32, fp16, bf16"),
    (dict(opset=21), "opset must be in"),
    (dict(alpha=1.25), "alpha 1.5 and 2"),
    (dict(layers="mid"), "layers must be"),
    (dict(height=30), "height must be a multiple of 4"),
])  # fmt: skip
def test_bad_settings(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        run_export(tmp_path, **{"model": "tiny-sd15", **kw})
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("model", ["sdxl", "tiny-flux"])
def test_a_bad_size_or_component_of_a_builtin_is_refused_before_any_weights_are_made(tmp_path, monkeypatch, model):
    # sdxl: the full 14 GB float32 model was built (55 s here) before `--height 17` was refused
    from pladis import sources

    def no_load(*args, **kwargs):
        raise AssertionError("weights loaded before the size check")

    monkeypatch.setattr(sources, "load", no_load)
    with pytest.raises(ValueError, match="height must be a multiple of"):
        run_export(tmp_path, model=model, height=17)
    with pytest.raises(ValueError, match=r"unknown component\(s\) unte; this model has text_encoder"):
        run_export(tmp_path, model=model, components="unte")
    assert not list(tmp_path.iterdir())


def test_output_rule_never_replaces_user_data(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("user data")
    for force in (False, True):  # a folder pladis did not write is refused, --force or not
        with pytest.raises(ValueError, match="a folder pladis did not write"):
            run_export(tmp_path, model="tiny-sd15", validate=False, force=force)
    assert (tmp_path / "out" / "keep.txt").read_text() == "user data"
    (tmp_path / "out" / "keep.txt").unlink()
    run_export(tmp_path, model="tiny-sd15", validate=False)  # an empty folder is used
    with pytest.raises(ValueError, match="holds an earlier export; pass --force"):
        run_export(tmp_path, model="tiny-sd15", validate=False)
    run_export(tmp_path, model="tiny-sd15", validate=False, force=True)  # our own export: replaced with --force
    assert (tmp_path / "out" / "manifest.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    from pladis.export import validate

    def broken(*args, **kwargs):
        raise validate.ValidationError("injected failure")

    monkeypatch.setattr(validate, "component", broken)
    with pytest.raises(validate.ValidationError, match="injected"):
        run_export(tmp_path, model="tiny-sd15")
    assert not list(tmp_path.iterdir())


def test_lam_zero_exports_the_stock_model_and_says_so(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pladis")
    manifest, out = run_export(tmp_path, model="tiny-sd15", lam=0.0)
    assert "exporting the stock model" in caplog.text
    assert manifest["pladis"]["patched"] is False and manifest["components"]["unet"]["pladis_nodes"] == 0
    assert not onnx.load(str(out / "unet.onnx")).functions


def test_external_data_is_gathered_into_one_file(tmp_path):
    # Past 2 GB the exporter writes one file per tensor; export gathers them into <name>.onnx.data
    # without loading the weights. Here: a small model saved the same way.
    from onnx.external_data_helper import load_external_data_for_model

    from pladis.export.exporter import _gather_external_data

    w1, w2 = np.arange(12, dtype=np.float32).reshape(3, 4), np.full((4, 2), 0.5, np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [onnx.numpy_helper.from_array(w1, "w1"), onnx.numpy_helper.from_array(w2, "w2")],
    )  # fmt: skip
    raw = tmp_path / "raw"
    raw.mkdir()
    onnx.save_model(helper.make_model(graph), str(raw / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=False, size_threshold=0)  # fmt: skip
    assert len(list(raw.iterdir())) == 3
    model = onnx.load(str(raw / "model.onnx"), load_external_data=False)
    assert _gather_external_data(model, raw, tmp_path / "m.onnx.data")
    onnx.save_model(model, str(tmp_path / "m.onnx"))
    loaded = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    load_external_data_for_model(loaded, str(tmp_path))
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in loaded.graph.initializer}
    np.testing.assert_array_equal(weights["w1"], w1)  # atol=0: bytes are copied, not converted
    np.testing.assert_array_equal(weights["w2"], w2)
    x = np.ones((1, 3), np.float32)
    np.testing.assert_allclose(session(tmp_path / "m.onnx").run(None, {"x": x})[0], x @ w1 @ w2, rtol=1e-6)
