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
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx
import torch
from pladis.export import contracts, onnx_op, validate
from pladis.export.manifest import build_manifest, config_hash
from tqdm import tqdm

from pladis import models, ops, patch, sources
from pladis.files import write_text

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class ExportConfig:
    """Settings of ``pladis export``; the CLI flags are generated from these fields and defaults."""

    model: str = "tiny-sdxl"
    out: str = "build/tiny-sdxl"
    precision: str = "fp32"
    lam: float = ops.DEFAULT_LAM
    alpha: float = ops.DEFAULT_ALPHA
    layers: str = "default"
    height: int = 0  # 0: the model's default size (built-ins: their test size; others: sample_size * vae factor)
    width: int = 0
    batch: int = 1
    static: bool = False
    opset: int = onnx_op.DEFAULT_OPSET
    function_body: bool = True
    validate: bool = True
    force: bool = False
    seed: int = 0
    components: str = ""  # "": all; or a comma list such as "unet" (benchmarks of one component)
    config: str = field(
        default="",
        metadata={
            "help": "single-file checkpoints: a local diffusers folder with the "
            "architecture configs (model_index.json, component configs, tokenizers, scheduler)"
        },
    )
    lora: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "LoRA FILE[:SCALE] fused into the weights before export (repeatable; scale 1.0 by default)",
            "repeat": True,
        },
    )


def check_config(cfg: ExportConfig) -> sources.Source:
    """Raise ValueError for settings that cannot work, before any model is loaded; returns the model source."""
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {cfg.precision!r}")
    ops.check_params(cfg.lam, cfg.alpha)
    if cfg.lam != 0 and cfg.alpha not in onnx_op.NEWTON_STEPS:
        raise ValueError(f"export supports alpha 1.5 and 2 (exact ONNX function body); got alpha={cfg.alpha}")
    if cfg.layers not in ("default", "all"):
        raise ValueError(f'layers must be "default" or "all"; got {cfg.layers!r}')
    if not onnx_op.MIN_OPSET <= cfg.opset <= onnx_op.MAX_OPSET:
        raise ValueError(
            f"opset must be in [{onnx_op.MIN_OPSET}, {onnx_op.MAX_OPSET}] (TensorRT 10's ONNX parser reads <= 20); "
            f"got {cfg.opset}"
        )
    for name in ("height", "width", "batch"):
        if getattr(cfg, name) < 0 or (name == "batch" and cfg.batch < 1):
            raise ValueError(f"{name} must be positive; got {getattr(cfg, name)}")
    out = Path(cfg.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not cfg.force:
        raise ValueError(f"output folder {out} is not empty; pass --force (force=True) to replace it")
    return sources.resolve(cfg.model, cfg.config, cfg.lora)  # model, config and LoRAs, no weights loaded


def export(cfg: ExportConfig) -> dict:
    """Export ``cfg.model`` to ``cfg.out``; returns the manifest (also written to ``cfg.out/manifest.json``)."""
    source = check_config(cfg)
    start = time.perf_counter()
    dtype = PRECISIONS[cfg.precision]
    pipe = sources.load(source, seed=cfg.seed, dtype=dtype)  # LoRAs fused before PLADIS is applied
    model = patch.denoiser_of(pipe)
    family = patch.family_of(model).name
    height, width = _size(cfg, pipe)
    report = patch.apply(pipe, lam=cfg.lam, alpha=cfg.alpha, layers=cfg.layers)
    if not report.layers:
        print(f"lam = {cfg.lam}: exporting the stock model (no PLADIS layers, no PladisAttention nodes)")
    d = contracts.dims(pipe, family, height=height, width=width, batch=cfg.batch, static=cfg.static)
    comps = contracts.components(pipe, family)
    if cfg.components:
        wanted = {c.strip() for c in cfg.components.split(",")}
        unknown = wanted - {c.name for c in comps}
        if unknown:
            raise ValueError(f"unknown component(s) {', '.join(sorted(unknown))}; this model has "
                             f"{', '.join(c.name for c in comps)}")  # fmt: skip
        comps = [c for c in comps if c.name in wanted]
    trace = contracts.trace_dims(pipe, family, d)
    onnx_op.register_symbolics(cfg.opset)

    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        files, checks = {}, {}
        for comp in tqdm(comps, desc=f"export {cfg.model}", unit="component"):
            cdt = contracts.component_dtype(comp, dtype)
            _cast(comp.module, cdt)
            files[comp.name] = _export_component(comp, d, trace, cdt, tmp, cfg)
            path = tmp / files[comp.name]["file"]
            if cdt == torch.bfloat16 and (why := _bf16_unsupported(path)):
                # ONNX opsets <= 20 have no bfloat16 Conv (and a few others): such a component is exported in
                # float32, and TensorRT can still run it in bf16 (`pladis build --precision bf16`).
                print(f"  {comp.name}: bf16 graph is not valid ONNX ({why}); exporting it in float32")
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
            seconds=time.perf_counter() - start, source=sources.record(source),
        )  # fmt: skip
        write_text(tmp / "manifest.json", json.dumps(manifest, indent=2) + "\n")
        _replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        patch.remove(pipe)
    return manifest


def _size(cfg: ExportConfig, pipe) -> tuple[int, int]:
    if cfg.model in models.BUILTINS:
        spec = models.BUILTINS[cfg.model]
        default_h, default_w = spec.height, spec.width
    else:
        denoiser = patch.denoiser_of(pipe)
        vae = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        default_h = default_w = denoiser.config.sample_size * vae
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
    return {"file": name, "external_data": [f"{name}.data"] if external else [], "pladis_nodes": n_nodes,
            "dtype": str(dtype).removeprefix("torch."),
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


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished folder into place; an old folder (``force``) is removed only after that."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()
