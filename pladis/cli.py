"""The ``pladis`` command: each subcommand fills a typed config and calls the Python function of its name."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from pladis import ops


def _add_config(parser: argparse.ArgumentParser, config_cls) -> None:
    """One ``--flag`` per dataclass field, typed and defaulted by the field, so defaults live in one place."""
    for f in dataclasses.fields(config_cls):
        parser.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f.name,
            type=type(f.default),
            default=f.default,
            help=f"(default: {f.default})",
        )


def _config(config_cls, args: argparse.Namespace):
    return config_cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)})


def cmd_demo(args: argparse.Namespace) -> None:
    from pladis import demo

    print(demo.run(_config(demo.DemoConfig, args)))


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


def cmd_layers(args: argparse.Namespace) -> None:
    print(layers(_config(LayersConfig, args)))


def build_parser() -> argparse.ArgumentParser:
    from pladis import demo

    parser = argparse.ArgumentParser(prog="pladis", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="sample a built-in model with stock attention and with PLADIS, side by side")
    _add_config(p, demo.DemoConfig)
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("layers", help="list the attention layers PLADIS patches in a model")
    _add_config(p, LayersConfig)
    p.set_defaults(func=cmd_layers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ValueError as err:
        print(f"pladis {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
