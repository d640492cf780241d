"""``export``: a PLADIS-patched pipeline to a folder of ONNX files plus ``manifest.json``.

Steps: load the pipeline (built-in or ``from_pretrained``) in the export precision → ``pladis.apply`` →
trace each component with the TorchScript exporter, which maps ``pladis::attention`` to one
``PladisAttention`` node → attach (or strip) the node's function body → validate (checker, shape
inference, ONNX Runtime vs eager PyTorch) → write the manifest. Everything is written into a temporary
sibling folder that is renamed to ``out`` only at the end, so a failed export leaves nothing that looks
complete.

Why the TorchScript exporter (``dynamo=False``): it traces diffusers models with dynamic batch, image
size and text length without shape guards, keeps the custom op as one node through
``register_custom_op_symbolic``, and targets opsets <= 20 that TensorRT 10's parser reads.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import onnx
import torch
from tqdm import tqdm

from pladis import models, numerics, ops, patch, provenance, sources
from pladis.errors import SettingError
from pladis.export import contracts, onnx_op, validate, weight_map
from pladis.export.config import ExportConfig
from pladis.export.manifest import build_manifest, config_hash, sealed
from pladis.files import check_output_folder, clean_stale, no_space, replace_folder, temp_dir, write_text
from pladis.precision import PRECISIONS, torch_dtype

log = logging.getLogger(__name__)


def check_config(cfg: ExportConfig) -> sources.Source:
    """Raise SettingError for settings that cannot work, before any model is loaded; returns the model source."""
    if cfg.precision not in PRECISIONS:
        raise SettingError("precision", f"precision must be one of {', '.join(PRECISIONS)}; got {cfg.precision!r}")
    numerics.check_lam(cfg.lam)  # the range the manifest records: a lam outside it could never run
    ops.check_params(cfg.lam, cfg.alpha)
    if cfg.lam != 0 and cfg.alpha not in onnx_op.NEWTON_STEPS:
        raise SettingError(
            "alpha", f"export supports alpha 1.5 and 2 (exact ONNX function body); got alpha={cfg.alpha}"
        )
    if cfg.layers not in ("default", "all"):
        raise SettingError("layers", f'layers must be "default" or "all"; got {cfg.layers!r}')
    if not onnx_op.MIN_OPSET <= cfg.opset <= onnx_op.MAX_OPSET:
        raise SettingError(
            "opset",
            f"opset must be in [{onnx_op.MIN_OPSET}, {onnx_op.MAX_OPSET}] (TensorRT 10's ONNX parser reads <= 20); "
            f"got {cfg.opset}",
        )
    for name in ("height", "width", "batch"):
        if getattr(cfg, name) < 0 or (name == "batch" and cfg.batch < 1):
            raise SettingError(name, f"{name} must be positive; got {getattr(cfg, name)}")
    local = [p for p in (cfg.model, cfg.config, *(x.rsplit(":", 1)[0] for x in cfg.lora)) if p and Path(p).exists()]
    check_output_folder(cfg.out, "export", cfg.force, inputs=tuple(local))  # never the model source itself
    source = sources.resolve(cfg.model, cfg.config, cfg.lora)  # model, config and LoRAs, no weights loaded
    if source.kind == "builtin":  # size and components from the structure alone (other sources: once loaded)
        meta = models.load(cfg.model, device="meta")
        family = patch.family_of(patch.denoiser_of(meta)).name
        contracts.check_size(meta, family, *_size(cfg, meta))
        _wanted(cfg, contracts.components(meta, family))
    elif (meta := sources.structure(source)) is not None:  # a diffusers folder: its configs on the meta device
        contracts.check_size(meta, patch.family_of(patch.denoiser_of(meta)).name, *_size(cfg, meta))
    return source


def _wanted(cfg: ExportConfig, comps: list) -> list:
    """The components ``cfg.components`` names (all when empty); SettingError naming the unknown ones."""
    if not cfg.components:
        return comps
    wanted = {c.strip() for c in cfg.components.split(",")}
    unknown = wanted - {c.name for c in comps}
    if unknown:
        raise SettingError("components", f"unknown component(s) {', '.join(sorted(unknown))}; this model has "
                           f"{', '.join(c.name for c in comps)}")  # fmt: skip
    return [c for c in comps if c.name in wanted]


def export(cfg: ExportConfig) -> dict:
    """Export ``cfg.model`` to ``cfg.out``; returns the manifest (also written to ``cfg.out/manifest.json``).
    A full disk is a ``NoSpace`` error naming the folder; nothing half-written is left."""
    source = check_config(cfg)
    with no_space(Path(cfg.out).resolve().parent):
        return _export(cfg, source)


def _export(cfg: ExportConfig, source: sources.Source) -> dict:
    start = time.perf_counter()
    dtype = torch_dtype(cfg.precision)
    pipe = sources.load(source, seed=cfg.seed, dtype=dtype)  # LoRAs fused before PLADIS is applied
    model = patch.denoiser_of(pipe)
    family = patch.family_of(model).name
    height, width = _size(cfg, pipe)
    report = patch.apply(pipe, lam=cfg.lam, alpha=cfg.alpha, layers=cfg.layers)
    if not report.layers:
        log.info(f"lam = {cfg.lam}: exporting the stock model (no PLADIS layers, no PladisAttention nodes)")
    d = contracts.dims(pipe, family, height=height, width=width, batch=cfg.batch, static=cfg.static)
    comps = contracts.components(pipe, family)
    comps = _wanted(cfg, comps)
    trace = contracts.trace_dims(pipe, family, d)
    onnx_op.register_symbolics(cfg.opset)

    out = Path(cfg.out)
    clean_stale(out.parent)  # temporaries of killed exports
    tmp = temp_dir(out)
    try:
        files, checks = {}, {}
        bar = not log.isEnabledFor(logging.INFO)  # the progress bar shows where the export's log lines would
        for comp in tqdm(comps, desc=f"export {cfg.model}", unit="component", disable=bar):
            cdt = contracts.component_dtype(comp, dtype)
            _cast(comp.module, cdt)
            files[comp.name] = _export_component(comp, d, trace, cdt, tmp, cfg)
            path = tmp / files[comp.name]["file"]
            if cdt == torch.bfloat16 and (why := _bf16_unsupported(path)):
                # ONNX opsets <= 20 have no bfloat16 Conv (and a few others): such a component is exported in
                # float32, and TensorRT can still run it in bf16 (`pladis build --precision bf16`).
                log.info(f"  {comp.name}: bf16 graph is not valid ONNX ({why}); exporting it in float32")
                path.unlink()
                cdt = torch.float32
                _cast(comp.module, cdt)
                files[comp.name] = _export_component(comp, d, trace, cdt, tmp, cfg)
                files[comp.name]["note"] = f"requested bf16, exported float32: {why}"
            if cfg.validate:  # before any function body is stripped: ONNX Runtime runs the body
                checks[comp.name] = validate.component(path, comp, d, cdt, cfg.seed)
            if not cfg.function_body:
                _strip_function(path)
            comp.module.to("meta")  # done with its weights: free them before the next (larger) component
        _save_pipeline_files(pipe, tmp)
        manifest = build_manifest(
            cfg=asdict(cfg), pipe=pipe, family=family, report=report, dims=d, comps=comps, files=files,
            folder=tmp, validation=checks, config_hashes={c.name: config_hash(c.module) for c in comps},
            height=height, width=width, multiple=contracts.size_multiple(pipe, family),
            seconds=time.perf_counter() - start, source=provenance.record(source),
        )  # fmt: skip
        manifest = sealed(manifest)
        write_text(tmp / "manifest.json", json.dumps(manifest, indent=2) + "\n")
        replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        patch.remove(pipe)
    return manifest


def _size(cfg: ExportConfig, pipe) -> tuple[int, int]:
    if cfg.model in models.BUILTINS:
        spec = models.BUILTINS[cfg.model]
        default_h, default_w = spec.height, spec.width
    else:
        fam = patch.family_of(patch.denoiser_of(pipe))
        side = fam.default_side or patch.denoiser_of(pipe).config.sample_size * fam.vae_scale(pipe.vae.config)
        default_h = default_w = side
    return cfg.height or default_h, cfg.width or default_w


def _export_component(comp, d, trace, dtype, folder: Path, cfg: ExportConfig) -> dict:
    """Trace one component to ``folder/<name>.onnx`` (external data past 2 GB); returns file facts."""
    t0 = time.perf_counter()
    samples = contracts.sample_inputs(comp, trace, dtype, cfg.seed)
    raw = folder / "raw" / comp.name
    raw.mkdir(parents=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*aten::index operator of advanced indexing.*")  # CLIP pooling
        torch.onnx.export(
            contracts.Traced(comp).eval(), tuple(samples), str(raw / "model.onnx"),
            input_names=[i.name for i in comp.inputs], output_names=[o.name for o in comp.outputs],
            dynamic_axes=contracts.dynamic_axes(comp, d), opset_version=cfg.opset, dynamo=False,
            do_constant_folding=True,
        )  # fmt: skip
    model = onnx.load(str(raw / "model.onnx"), load_external_data=False)  # weights stay on disk
    onnx_op.drop_dynamic_squeeze(model)
    onnx_op.attach_function(model, cfg.opset, max_keys=d["text"][2])
    name = f"{comp.name}.onnx"
    external = _gather_external_data(model, raw, folder / f"{name}.data")
    onnx.save_model(model, str(folder / name))
    shutil.rmtree(folder / "raw")
    n_nodes = len(onnx_op.pladis_nodes(model))
    del model
    weights, missing = {}, {}
    if comp.name != "vae_decoder":  # what diffusers' LoRA loaders address; metadata only, the file is unchanged
        weights, missing = weight_map.build(comp.module, folder / name)
    log.debug(f"{comp.name}: traced to {name} in {time.perf_counter() - t0:.1f} s ({n_nodes} PladisAttention nodes)")
    return {"file": name, "external_data": [f"{name}.data"] if external else [], "pladis_nodes": n_nodes,
            "dtype": str(dtype).removeprefix("torch."), "weights": weights, "weights_missing": missing,
            "export_seconds": round(time.perf_counter() - t0, 3)}  # fmt: skip


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> None:
    if next(module.parameters()).dtype != dtype:  # diffusers warns on every .to(dtype), even a no-op
        module.to(dtype)


def _bf16_unsupported(path: Path) -> str | None:
    """Why a bf16 graph fails ONNX's type check (an op without bfloat16 at this opset), or None."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.shape_inference.InferenceError as err:
        if "bfloat16" in str(err):
            return str(err).split("\n")[0][:200]
        raise
    return None


def _gather_external_data(model: onnx.ModelProto, src: Path, data: Path) -> bool:
    """Copy the external tensors the exporter wrote (one file per tensor, past 2 GB) into one ``data``
    file, a tensor at a time, and point the model at it; returns whether there were any.

    The model is never held with its weights in memory (a 2.6 B-parameter U-Net would not fit twice).
    """
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    tensors = [t for t in model.graph.initializer if uses_external_data(t)]
    if not tensors:
        return False
    with open(data, "wb") as out:
        for tensor in tensors:
            info = ExternalDataInfo(tensor)
            with open(src / info.location, "rb") as f:
                f.seek(info.offset or 0)
                payload = f.read(info.length) if info.length else f.read()
            offset = out.tell()
            out.write(payload)
            del tensor.external_data[:]
            for key, value in (("location", data.name), ("offset", offset), ("length", len(payload))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, str(value)
    return True


def _strip_function(path: Path) -> None:
    """Rewrite ``path`` without PladisAttention function bodies: the plugin-only graph for TensorRT."""
    model = onnx.load(str(path), load_external_data=False)  # weights stay where they are
    if onnx_op.pladis_nodes(model):
        onnx_op.attach_function(model, with_body=False)
        onnx.save_model(model, str(path))


def _save_pipeline_files(pipe, folder: Path) -> None:
    """Tokenizers and the scheduler config: what the runtime needs besides the ONNX files (offline)."""
    for name, component in pipe.components.items():
        if name.startswith("tokenizer") and component is not None:
            component.save_pretrained(folder / name)
    pipe.scheduler.save_pretrained(folder / "scheduler")
