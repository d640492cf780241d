"""Settings of ``pladis serve``: one dataclass, its help texts and its checks (the standard library and
pladis's light ``options`` and ``errors`` only, so the CLI and ``pladis serve --help`` work without the
``serve`` extra installed)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from pladis.errors import SettingError
from pladis.options import CUDA_GRAPHS_HELP, DEFAULT_ENGINE, DEFAULT_GRAPH_CACHE_SIZE, GRAPH_CACHE_HELP

API_KEY_ENV = "PLADIS_API_KEY"


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class ServeConfig:
    """Settings of ``pladis serve``; the CLI flags are generated from these fields, defaults and help texts."""

    engine: str = _opt(DEFAULT_ENGINE, "engine folder (pladis build) or export folder; read once at start-up")
    host: str = _opt("127.0.0.1", "bind address (default localhost; expose deliberately)")
    port: int = _opt(8000, "TCP port, 1-65535 (0: any free port)")
    backend: str = _opt("", "backend for every component (default: as built)")
    device: str = _opt("cpu", "cpu or cuda")
    cuda_graphs: bool = _opt(False, CUDA_GRAPHS_HELP)
    graph_cache_size: int = _opt(DEFAULT_GRAPH_CACHE_SIZE, GRAPH_CACHE_HELP)
    model_name: str = _opt("", "name under which /v1/models lists the engine (default: the engine folder's name)")
    max_queue: int = _opt(64, "requests waiting at most (>= 1); beyond it 429 with Retry-After")
    max_steps: int = _opt(50, "largest `steps` a request may ask for")
    max_prompt_chars: int = _opt(2000, "longest prompt (and negative prompt) in characters")
    max_body_bytes: int = _opt(65536, "largest request body, counted on the bytes read (chunked too); then 413")
    batch_window_ms: float = _opt(20.0, "how long the worker waits to batch compatible requests")
    timeout_s: float = _opt(120.0, "per-request deadline (queue + run); then 504 and the work is dropped")
    header_timeout_s: float = _opt(10.0, "a connection with no request in progress (new, idle or still sending "
                                   "its headers) is closed after this")  # fmt: skip
    body_timeout_s: float = _opt(30.0, "the request body must arrive within this; then 408")
    keep_alive_s: float = _opt(5.0, "idle keep-alive connections are closed after this")
    shutdown_s: float = _opt(30.0, "on SIGTERM: queued work gets 503 at once, running work may finish for this "
                             "long, then it is stopped (503) and remaining connections are closed")  # fmt: skip
    api_key: str = _opt("", f"require 'Authorization: Bearer KEY' on /v1/ (visible in `ps`: prefer ${API_KEY_ENV} "
                        "or --api-key-file)")  # fmt: skip
    api_key_file: str = _opt("", f"read the API key from this file (first line); else ${API_KEY_ENV}, if set")
    lora_dir: str = _opt("", "folder of LoRA files (.safetensors) requests may name in `loras`, by file name "
                         "without the suffix; none: requests cannot ask for LoRAs")  # fmt: skip
    lora_cache: int = _opt(4, "fused weight sets (one per LoRA set and scales) kept in memory, least recently used "
                           "dropped first (>= 1)")  # fmt: skip
    ray: bool = _opt(False, "deploy on Ray Serve instead of one local process")
    replicas: int = _opt(1, "Ray Serve replicas (one per GPU on a GPU cluster)")
    num_gpus: float = _opt(0.0, "GPUs per Ray replica (1 on GPU clusters: one replica per GPU)")
    max_replicas: int = _opt(0, "Ray Serve autoscaling upper bound (0: fixed replicas)")


def validate(cfg: ServeConfig) -> None:
    """Raise ``SettingError`` naming the first option out of range (the CLI turns it into exit 2)."""

    def need(ok: bool, flag: str, rule: str):
        if not ok:
            raise SettingError(flag, f"--{flag.replace('_', '-')} {getattr(cfg, flag)!r}: {rule}")

    need(bool(cfg.host.strip()), "host", "give a bind address, e.g. 127.0.0.1")
    need(0 <= cfg.port <= 65535, "port", "must be in 1-65535 (0: any free port)")
    for name in ("max_queue", "max_steps", "max_prompt_chars", "replicas", "lora_cache", "graph_cache_size"):
        need(getattr(cfg, name) >= 1, name, "must be at least 1")
    need(cfg.max_body_bytes >= 1024, "max_body_bytes", "must be at least 1024 (a request with a prompt needs room)")
    need(
        not cfg.cuda_graphs or cfg.device.startswith("cuda"),
        "cuda_graphs",
        "CUDA graphs need a CUDA device: add --device cuda, or drop --cuda-graphs",
    )
    need(cfg.max_replicas >= 0, "max_replicas", "must be 0 (fixed replicas) or more")
    for name in ("timeout_s", "header_timeout_s", "body_timeout_s", "keep_alive_s"):
        value = getattr(cfg, name)
        need(math.isfinite(value) and value > 0, name, "must be a positive number of seconds")
    for name in ("batch_window_ms", "shutdown_s", "num_gpus"):
        value = getattr(cfg, name)
        need(math.isfinite(value) and value >= 0, name, "must be a finite number, 0 or more")
    need(not cfg.lora_dir or Path(cfg.lora_dir).is_dir(), "lora_dir", "must be an existing folder of LoRA files")
    need(not (cfg.api_key and cfg.api_key_file), "api_key_file", "give the key once: --api-key or --api-key-file")
    api_key(cfg)  # a missing or empty key file is an option error too


def api_key(cfg: ServeConfig) -> str:
    """The key clients must send: ``--api-key-file``, else ``--api-key``, else ``$PLADIS_API_KEY``; "" for none."""
    if cfg.api_key_file:
        path = Path(cfg.api_key_file)
        try:
            lines = path.read_text().splitlines()
        except OSError as err:
            raise SettingError("api_key_file", f"--api-key-file {path}: cannot read it ({err.strerror})") from None
        key = lines[0].strip() if lines else ""
        if not key:
            raise SettingError("api_key_file", f"--api-key-file {path} is empty; write the key on its first line")
        return key
    return cfg.api_key or os.environ.get(API_KEY_ENV, "").strip()
