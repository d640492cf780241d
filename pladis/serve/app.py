"""The HTTP server: ``POST /v1/images/generations`` (OpenAI images API shape), ``GET /healthz``, ``GET /metrics``.

Every field is validated (Pydantic, then against the engine's manifest) before the request is queued; a
bad request gets a 4xx whose body names the field. A full queue answers 429 with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import base64
import io
import random
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from pladis.serve.worker import Job, QueueFull, ShuttingDown, Worker


@dataclass
class ServeConfig:
    """Settings of ``pladis serve``; the CLI flags are generated from these fields and defaults."""

    engine: str = "build/tiny-sdxl-ort"
    host: str = "127.0.0.1"
    port: int = 8000
    backend: str = ""  # "": as built
    device: str = "cpu"
    max_queue: int = 64
    max_steps: int = 50
    max_prompt_chars: int = 2000
    max_body_bytes: int = 65536
    batch_window_ms: float = 20.0
    timeout_s: float = 120.0
    api_key: str = ""  # "": no key required (the default binds to localhost)
    ray: bool = False
    replicas: int = 1
    num_gpus: float = 0.0  # per Ray replica (1 on GPU clusters: one replica per GPU)
    max_replicas: int = 0  # > replicas: Ray Serve autoscaling between replicas and this


class ImageRequest(BaseModel):
    """The request body. Engine-dependent limits (size range, n, scheduler, lam/alpha) are checked after."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1)
    n: int = Field(1, ge=1)
    size: str | None = Field(None, pattern=r"^\d+x\d+$")
    response_format: Literal["b64_json"] = "b64_json"
    negative_prompt: str | None = None
    steps: int | None = Field(None, ge=1)
    guidance: float | None = Field(None, ge=0.0, le=50.0)
    scheduler: str | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    lam: float | None = None
    alpha: float | None = None


class Metrics:
    """Prometheus metrics in a registry of their own."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "pladis_requests", "HTTP image requests by status code", ["status"], registry=self.registry
        )
        self.queue = Gauge("pladis_queue_depth", "requests waiting for the worker", registry=self.registry)
        self.latency = Histogram("pladis_request_seconds", "latency of answered image requests", registry=self.registry,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))  # fmt: skip
        self.images = Counter("pladis_images", "images generated", registry=self.registry)
        self.batch_size = Histogram("pladis_batch_size", "images per engine batch", registry=self.registry,
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16))  # fmt: skip


def _field_error(status: int, field: str, message: str):
    return JSONResponse({"detail": [{"loc": ["body", field], "msg": message}]}, status_code=status)


def create_app(cfg: ServeConfig, runtime=None):
    """The FastAPI app over one engine folder (``runtime``: an already opened Runtime, for tests)."""
    from pladis.runtime import Runtime
    from pladis.runtime.pipeline import scheduler_names

    metrics = Metrics()
    state: dict = {"ready": False}

    def generate(prompts, seeds, key):
        height, width, steps, scheduler, guidance, negative = key
        result = state["runtime"].generate(prompts, progress=False, negative_prompt=negative, steps=steps,
                                           guidance=guidance, scheduler=scheduler, seed=seeds, height=height,
                                           width=width)  # fmt: skip
        return result.images

    @asynccontextmanager
    async def lifespan(app):
        rt = runtime or Runtime(cfg.engine, cfg.backend or None, device=cfg.device)
        state["runtime"] = rt
        state["worker"] = Worker(generate, rt.engine.dim("batch")[2], cfg.max_queue, cfg.batch_window_ms / 1000,
                                 metrics)  # fmt: skip
        await asyncio.to_thread(rt.generate, "warm-up", progress=False, steps=1)  # load every engine once
        state["ready"] = True
        yield
        state["ready"] = False
        await asyncio.to_thread(state["worker"].stop)

    app = FastAPI(title="pladis", lifespan=lifespan)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if request.url.path.startswith("/v1/"):
            if cfg.api_key and request.headers.get("authorization") != f"Bearer {cfg.api_key}":
                return JSONResponse({"detail": "missing or wrong API key (Authorization: Bearer KEY)"}, 401)
            length = request.headers.get("content-length")
            if length is not None and int(length) > cfg.max_body_bytes:
                metrics.requests.labels("413").inc()
                return _field_error(413, "body", f"request body over {cfg.max_body_bytes} bytes")
        response = await call_next(request)
        if request.url.path.startswith("/v1/"):
            metrics.requests.labels(str(response.status_code)).inc()
        return response

    @app.get("/healthz")
    async def healthz():
        if not state["ready"]:
            return JSONResponse({"status": "starting"}, 503)
        return {"status": "ready", "queue_depth": state["worker"].depth()}

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        if "worker" in state:
            metrics.queue.set(state["worker"].depth())
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/images/generations")
    async def images(body: ImageRequest, request: Request):
        if not state["ready"]:
            return JSONResponse({"detail": "engines are still loading; retry shortly"}, 503, {"Retry-After": "5"})
        rt, started = state["runtime"], time.monotonic()
        problem = _check(body, rt, cfg, scheduler_names)
        if problem:
            return _field_error(422, *problem)
        width, height = _size(body.size)
        image = rt.engine.manifest["image"]
        height, width = height or image["height"], width or image["width"]
        seed = random.randrange(2**31) if body.seed is None else body.seed
        seeds = [seed + i for i in range(body.n)]
        key = (height, width, body.steps, body.scheduler, body.guidance, body.negative_prompt)
        job = Job(key, body.prompt, seeds, deadline=time.monotonic() + cfg.timeout_s)
        try:
            future = state["worker"].submit(job)
        except QueueFull as err:
            return JSONResponse({"detail": str(err)}, 429, {"Retry-After": "1"})
        except ShuttingDown as err:
            return JSONResponse({"detail": str(err)}, 503)
        waiter = asyncio.wrap_future(future)
        while not waiter.done():  # wake up now and then to notice a client that went away
            done, _ = await asyncio.wait({waiter}, timeout=0.25)
            if done:
                break
            if await request.is_disconnected() or time.monotonic() > job.deadline:
                job.abandoned = True
                waiter.cancel()
                return JSONResponse({"detail": f"no result within {cfg.timeout_s} s"}, 504)
        try:
            images = waiter.result()
        except TimeoutError as err:
            return JSONResponse({"detail": str(err)}, 504)
        except ShuttingDown as err:
            return JSONResponse({"detail": str(err)}, 503)
        metrics.images.inc(len(images))
        metrics.latency.observe(time.monotonic() - started)
        return {"created": int(time.time()), "data": [{"b64_json": _png_b64(im), "seed": s}
                                                      for im, s in zip(images, seeds, strict=True)]}  # fmt: skip

    return app


def _check(body: ImageRequest, rt, cfg: ServeConfig, scheduler_names) -> tuple[str, str] | None:
    """(field, message) of the first request field the engine cannot serve, or None."""
    if len(body.prompt) > cfg.max_prompt_chars:
        return "prompt", f"prompt is over {cfg.max_prompt_chars} characters"
    max_batch = rt.engine.dim("batch")[2]
    if body.n > max_batch:
        return "n", f"n = {body.n} is over this engine's batch of {max_batch}"
    if body.steps is not None and body.steps > cfg.max_steps:
        return "steps", f"steps = {body.steps} is over the server's maximum of {cfg.max_steps}"
    width, height = _size(body.size)
    if body.size:
        for name, value in (("width", width), ("height", height)):
            lo, _, hi = rt.engine.dim(name)
            if not lo <= value <= hi or value % rt.engine.manifest["image"]["multiple"]:
                return "size", (f"size {body.size}: {name} must be in [{lo}, {hi}] and a multiple of "
                                f"{rt.engine.manifest['image']['multiple']}")  # fmt: skip
    names = scheduler_names(rt.engine.family)
    if body.scheduler is not None and body.scheduler not in names:
        return "scheduler", f"unknown scheduler {body.scheduler!r}; choose one of {', '.join(names)}"
    pl = rt.engine.manifest["pladis"]
    for name in ("lam", "alpha"):
        value = getattr(body, name)
        if value is not None and value != pl[name] and pl["patched"]:
            return name, f"this engine was exported with {name}={pl[name]}; re-export it to serve another value"
    try:  # the runtime's own checks (CFG batch, negative prompt without CFG, ...), without running anything
        rt.settings(body.prompt, negative_prompt=body.negative_prompt, steps=body.steps, guidance=body.guidance,
                    scheduler=body.scheduler, batch=body.n, height=height, width=width)  # fmt: skip
    except ValueError as err:
        return "request", str(err)
    return None


def _size(size: str | None) -> tuple[int | None, int | None]:
    """OpenAI's "WIDTHxHEIGHT" -> (width, height); None -> the engine's default."""
    if not size:
        return None, None
    width, height = (int(x) for x in size.split("x"))
    return width, height


def _png_b64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()
