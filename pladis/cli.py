"""The ``pladis`` command: each subcommand fills a typed config and calls the Python function of its name."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from pladis import ops


def _add_config(parser: argparse.ArgumentParser, config_cls, help: dict[str, str] | None = None) -> None:
    """One ``--flag`` per dataclass field, typed and defaulted by the field, so defaults live in one place.

    Booleans become switches: ``--name`` for a field that defaults to False, ``--no-name`` for True.
    """
    help = help or {}
    for f in dataclasses.fields(config_cls):
        flag, text = f.name.replace("_", "-"), help.get(f.name, f.metadata.get("help", ""))
        if f.metadata.get("repeat"):  # a tuple field: the flag may be given several times
            parser.add_argument(f"--{flag}", dest=f.name, action="append", default=list(f.default), help=text)
        elif isinstance(f.default, bool):
            action = "store_false" if f.default else "store_true"
            flag = f"no-{flag}" if f.default else flag
            parser.add_argument(f"--{flag}", dest=f.name, action=action, default=f.default, help=text)
        else:
            text = f"{text} (default: {f.default})".strip()
            kind = type(f.default) if f.default is not None else _TYPES[str(f.type).split("|")[0].strip()]
            parser.add_argument(f"--{flag}", dest=f.name, type=kind, default=f.default, help=text)


_TYPES = {"int": int, "float": float, "str": str}  # for fields whose default is None (``int | None``)


def _config(config_cls, args: argparse.Namespace):
    return config_cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)})


def cmd_demo(args: argparse.Namespace) -> int:
    from pladis import demo

    text, ok = demo.run(_config(demo.DemoConfig, args))
    print(text)
    return 0 if ok else 1


def cmd_build(args: argparse.Namespace) -> int:
    from pladis import engine

    meta = engine.build(_config(engine.BuildConfig, args))
    print(f"{meta['backend']} engine, key {meta['key'][:12]}: "
          + ", ".join(f"{n}={c['kind']}:{c['file']}" for n, c in meta["components"].items()))  # fmt: skip
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from pladis import serve

    serve.serve(_config(serve.ServeConfig, args))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from pladis.runtime import commands

    result, paths = commands.generate(_config(commands.GenerateConfig, args))
    print(f"wrote {', '.join(map(str, paths))} | {result.summary()}")
    return 0


def cmd_parity(args: argparse.Namespace) -> int:
    from pladis.runtime import commands

    report = commands.parity(_config(commands.ParityConfig, args))
    print(report.table())
    return 0 if report.ok else 1


@dataclasses.dataclass
class LayersConfig:
    """Settings of ``pladis layers``."""

    model: str = "sdxl"
    layers: str = "default"
    lam: float = ops.DEFAULT_LAM
    alpha: float = ops.DEFAULT_ALPHA


def layers(cfg: LayersConfig):
    """The patch report for ``cfg.model``; built-ins are built on the meta device (no weights, instant)."""
    from pladis import models, patch

    pipe = models.load(cfg.model, device="meta" if cfg.model in models.BUILTINS else "cpu")
    return patch.apply(pipe, lam=cfg.lam, alpha=cfg.alpha, layers=cfg.layers)


def cmd_layers(args: argparse.Namespace) -> int:
    print(layers(_config(LayersConfig, args)))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pladis import export

    manifest = export.export(_config(export.ExportConfig, args))
    rows = [
        f"| {name} | {c['file']} | {c['dtype']} | {c['bytes'] / 1e6:.1f} | {c['pladis_nodes']} |"
        for name, c in manifest["components"].items()
    ]
    head = f"exported {manifest['model']['source']} to {args.out} in {manifest['export_seconds']:.1f} s"
    table = ["| component | file | dtype | MB | PladisAttention nodes |", "| --- | --- | --- | --- | --- |"]
    print("\n".join([head, *table, *rows]))
    return 0


EXPORT_HELP = {
    "model": "built-in name, diffusers folder or hub id",
    "out": "output folder (written atomically)",
    "precision": "fp32 | fp16 | bf16",
    "layers": "default | all",
    "height": "image height in pixels (0: the model's default)",
    "width": "image width in pixels (0: the model's default)",
    "batch": "prompts per call at the optimal shape (the denoiser sees twice as many with CFG)",
    "static": "fix every dim at its optimal size instead of exporting dynamic axes",
    "opset": "ONNX opset (17-20)",
    "function_body": "omit the PladisAttention function bodies (plugin-only graph for TensorRT)",
    "validate": "skip the checker and the ONNX Runtime vs eager comparison",
    "force": "replace a non-empty output folder",
    "components": "export only these components (comma list, e.g. unet); default: all",
}


BUILD_HELP = {
    "onnx": "export folder (written by `pladis export`)",
    "backend": "ort | aoti | trt",
    "out": "engine folder to write",
    "precision": "fp32 | fp16 | bf16 (default: the export's; only trt lowers an fp32 export)",
    "dims": "narrow shape ranges, e.g. cfg_batch=1:2:4,latent_height=16:16:32 (min:opt:max)",
    "device": "cpu or cuda",
    "cache_dir": "engine cache (default: $PLADIS_CACHE or ~/.cache/pladis/engines)",
    "timing_cache": "trt timing cache file (loaded and saved)",
    "opt_level": "trt builder optimisation level 0-5; ort graph optimisation level 0-3",
    "refit": "trt: refittable engine",
    "verify": "skip the sha256 check of the export's files",
}

SERVE_HELP = {
    "engine": "engine folder (pladis build) or export folder",
    "host": "bind address (default localhost; expose deliberately)",
    "max_queue": "requests waiting at most; beyond it 429 with Retry-After",
    "batch_window_ms": "how long the worker waits to batch compatible requests",
    "timeout_s": "per-request deadline (queue + run); then 504",
    "api_key": "require 'Authorization: Bearer KEY' on /v1/ (off by default)",
    "ray": "deploy on Ray Serve instead of one local process",
    "replicas": "Ray Serve replicas (one per GPU on a GPU cluster)",
    "num_gpus": "GPUs per Ray replica",
    "max_replicas": "Ray Serve autoscaling upper bound (0: fixed replicas)",
}

RUNTIME_HELP = {
    "engine": "engine folder (written by `pladis export`)",
    "backend": "torch | ort | aoti | trt for every component (default: as built, or ort for an export folder)",
    "component_backends": "per-component backends, e.g. vae_decoder=torch,text_encoder=torch",
    "scheduler": "euler | euler_a | dpmpp_2m | ddim | lcm (flow models: flow_euler); default: the engine's",
    "guidance": "CFG scale (FLUX: the embedded guidance); <= 1 turns CFG off",
    "device": "cpu, or cuda (onnxruntime-gpu)",
    "verify": "skip the sha256 check of the engine files",
    "json": "write the parity report as JSON to this file",
    "plot": "write a PNG plot of the error per step to this file",
}


def build_parser() -> argparse.ArgumentParser:
    from pladis import demo

    parser = argparse.ArgumentParser(prog="pladis", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    from pladis import engine, export, serve
    from pladis.runtime import commands

    subcommands = [  # name, help, typed config, per-field help, handler
        ("demo", "the whole path on a built-in model: export -> engine -> generate -> parity", demo.DemoConfig, {},
         cmd_demo),
        ("layers", "list the attention layers PLADIS patches in a model", LayersConfig, {}, cmd_layers),
        ("export", "export a PLADIS-patched pipeline to ONNX (+ manifest.json)", export.ExportConfig, EXPORT_HELP,
         cmd_export),
        ("build", "build an engine folder (ort | aoti | trt) from an export folder, cached", engine.BuildConfig,
         BUILD_HELP, cmd_build),
        ("generate", "generate images with an engine folder", commands.GenerateConfig, RUNTIME_HELP, cmd_generate),
        ("serve", "serve an engine over HTTP (OpenAI images API shape); --ray for Ray Serve", serve.ServeConfig,
         SERVE_HELP, cmd_serve),
        ("parity", "compare an engine with eager PyTorch, step by step (exit 1 on failure)", commands.ParityConfig,
         RUNTIME_HELP, cmd_parity),
    ]  # fmt: skip
    for name, text, config_cls, field_help, handler in subcommands:
        p = sub.add_parser(name, help=text)
        _add_config(p, config_cls, field_help)
        p.set_defaults(func=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:
        print(f"pladis {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
