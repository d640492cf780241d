"""The HTTP app: ``POST /v1/images/generations`` and ``GET /v1/models`` as the OpenAI images API has them,
``GET /healthz`` (readiness), ``GET /livez`` (liveness), ``GET /metrics`` (Prometheus).

Every request body is read with a byte limit and a time limit, parsed with strict types (Pydantic), checked
against this server's limits, then made into the runtime's ``Request`` and checked against the engine by the
runtime's one check, before it is queued; a bad one gets OpenAI's error body ``{"error": {"message", "type",
"param", "code"}}`` with a 4xx whose ``param`` names the field (a ``SettingError``'s field, mapped by
``PARAMS``). The worker runs each batch through ``Runtime.generate``, whose per-step hook stops abandoned
work. ``Service`` holds the state; ``create_app`` wires its methods to the routes. The engine folder is read
once, at start-up.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import random
import re
import time
from collections import OrderedDict
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HttpRequest

from pladis.errors import PladisError, SettingError
from pladis.runtime.request import Request
from pladis.serve.config import ServeConfig, api_key, validate
from pladis.serve.worker import Expired, Job, QueueFull, ShuttingDown, Worker

log = logging.getLogger("pladis.serve")

CLIENT_GONE = 499  # nginx's "client closed request": counted in /metrics, never sent (nobody is listening)
FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP", "gif": "GIF"}
SIZE = re.compile(r"(\d{1,6})x(\d{1,6})")


class LoraItem(BaseModel):
    """One adapter of a request: a file of the server's ``--lora-dir`` by name (without ``.safetensors``)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)

    name: str = Field(min_length=1, max_length=200)
    scale: float = 1.0


class ImageRequest(BaseModel):
    """The request body: every field of OpenAI's ``images.generate`` plus this server's sampling fields.

    Mapped: ``model`` (any name: this server serves one engine, listed by ``/v1/models``), ``n``, ``size``
    ("auto": the engine's default), ``response_format`` (b64_json only), ``output_format`` (png, jpeg,
    webp, gif), ``output_compression`` (jpeg/webp quality). Accepted and ignored: ``quality``, ``style``,
    ``background`` (images are opaque), ``moderation``, ``user``, ``safety_identifier``, ``complexity``,
    ``partial_images``, ``frame_count``, ``frame_duration_ms``, ``svg``; ``stream`` only as false.
    Engine-dependent limits (size range, n, scheduler, lam/alpha) are checked after parsing.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)  # "n": "2" or true is an error

    prompt: str = Field(min_length=1)
    model: str | None = None
    n: int | None = Field(None, ge=1)
    size: str | None = None
    response_format: str | None = None
    output_format: str | None = None
    output_compression: int | None = Field(None, ge=0, le=100)
    stream: bool | None = None
    quality: str | None = None
    style: str | None = None
    background: str | None = None
    moderation: str | None = None
    user: str | None = None
    safety_identifier: str | None = None
    complexity: str | None = None
    partial_images: int | None = None
    frame_count: int | None = None
    frame_duration_ms: int | None = None
    svg: dict | None = None
    # this server's own fields (pass them as extra_body with the OpenAI SDK)
    negative_prompt: str | None = None
    steps: int | None = Field(None, ge=1)
    guidance: float | None = Field(None, ge=0.0, le=50.0)
    scheduler: str | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    lam: float | None = None
    alpha: float | None = None
    loras: list[LoraItem] | None = Field(None, max_length=16)  # adapters from --lora-dir, applied in this order


class ApiError(Exception):
    """An answer other than 200: status, message (what is wrong and the fix), the field it is about."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


_TYPES = {401: "invalid_request_error", 429: "rate_limit_error"}


class _JSON(JSONResponse):
    """JSON with every non-ASCII character escaped: an error that quotes odd input can always be sent."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def error_response(err: ApiError) -> JSONResponse:
    """OpenAI's error body for ``err``."""
    kind = _TYPES.get(err.status, "server_error" if err.status >= 500 else "invalid_request_error")
    body = {"error": {"message": err.message, "type": kind, "param": err.param, "code": err.code}}
    return _JSON(body, err.status, err.headers)


class Metrics:
    """Prometheus metrics in a registry of their own."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("pladis_requests", "HTTP requests to /v1/ by status code (499: client went away)",
                                ["status"], registry=self.registry)  # fmt: skip
        self.queue = Gauge("pladis_queue_depth", "requests waiting for the worker", registry=self.registry)
        self.latency = Histogram("pladis_request_seconds", "latency of answered image requests", registry=self.registry,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))  # fmt: skip
        self.images = Counter("pladis_images", "images generated", registry=self.registry)
        self.batch_size = Histogram("pladis_batch_size", "images per engine batch", registry=self.registry,
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16))  # fmt: skip
        self.lora_swaps = Counter("pladis_lora_swaps", "times the engine's weights changed to another LoRA set",
                                  registry=self.registry)  # fmt: skip
        self.lora_cache_hits = Counter("pladis_lora_cache_hits", "LoRA sets whose fused weights were in the cache",
                                       registry=self.registry)  # fmt: skip
        self.lora_cache_misses = Counter("pladis_lora_cache_misses", "LoRA sets whose fused weights were computed",
                                         registry=self.registry)  # fmt: skip
        self.restarts = Counter("pladis_worker_restarts", "times the worker thread died and was restarted",
                                registry=self.registry)  # fmt: skip


class _Guard:
    """ASGI middleware on /v1/: the API key, and one count per answer in ``pladis_requests_total{status}``.

    Pure ASGI (no BaseHTTPMiddleware), so the endpoint sees the client's own ``receive`` and its disconnects.
    """

    def __init__(self, app, key: str, metrics: Metrics):
        self.app, self.key, self.metrics = app, key, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        status = None

        async def send_counted(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        label = None
        try:
            if self.key and not _authorized(scope, self.key):
                err = ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                               code="invalid_api_key",
                               headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
                await error_response(err)(scope, receive, send_counted)
            else:
                await self.app(scope, receive, send_counted)
        except Exception:
            label = "500"  # the app failed; Starlette's outer handler answers 500 (error_response)
            raise
        except BaseException:
            label = "cancelled"  # the server cancelled the request (shutdown limit): no answer was sent
            raise
        finally:
            self.metrics.requests.labels(str(status) if status else label or "500").inc()


def _authorized(scope, key: str) -> bool:
    """Whether the request sends ``Authorization: Bearer KEY`` (the scheme in any case, as HTTP has it)."""
    import hmac

    scheme, _, token = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key.encode())


PARAMS = {"batch": "n", "height": "size", "width": "size"}  # a Request field -> the HTTP body's field


class Service:
    """The server over one engine: the runtime, the worker that owns it, readiness, and the image endpoint.

    ``runtime``: an already opened Runtime (else opened by ``start``). The engine folder is read once: the
    runtime reads the scheduler config when it opens, and ``start`` loads engines and tokenizers.
    """

    def __init__(self, cfg: ServeConfig, runtime=None):
        validate(cfg)
        self.cfg, self.runtime, self.metrics = cfg, runtime, Metrics()
        self.worker: Worker | None = None
        self.lora_sets: OrderedDict[tuple, tuple] = OrderedDict()  # LoRA set -> (Loras, fused weights), LRU
        self.base_set: tuple = ((), {})  # what a request without LoRAs runs: the engine as opened
        self.ready = self.draining = False
        self.model, self.created = "", 0

    async def start(self) -> None:
        """Open the engine (unless given), load and warm every component, start the worker."""
        cfg = self.cfg
        if self.runtime is None:
            from pladis.runtime import Runtime

            self.runtime = await asyncio.to_thread(
                Runtime,
                cfg.engine,
                cfg.backend or None,
                device=cfg.device,
                cuda_graphs=cfg.cuda_graphs,
                graph_cache_size=cfg.graph_cache_size,
            )
        await asyncio.to_thread(self.runtime.load)
        self.base_set = self.runtime.lora_set
        await asyncio.to_thread(self.runtime.generate, "warm-up", progress=False, steps=1)
        self.model = cfg.model_name or Path(self.runtime.engine.folder).resolve().name
        self.created = int(time.time())
        max_batch = self.runtime.engine.dim("batch")[2]
        self.worker = Worker(self.run_batch, max_batch, cfg.max_queue, cfg.batch_window_ms / 1000, self.metrics)
        self.ready = True

    async def supervise(self) -> None:
        """Restart the worker thread if it ever dies (readiness is 503 until it runs again)."""
        while True:
            await asyncio.sleep(0.2)
            if self.worker.running and not self.worker.alive():
                log.error("the worker thread died; restarting it")
                self.metrics.restarts.inc()
                self.worker.start()

    def run_batch(self, jobs: list[Job], check) -> list:
        """The worker's batch: the jobs' checked settings (one key) as one request through ``Runtime.generate``,
        ``check`` after every step so abandoned work stops early. lam is a runtime input: requests with
        different strengths share a batch, one value per image."""
        self.use_loras(jobs[0].key[-1])  # one key per batch: one LoRA set
        parts, first = [j.work for j in jobs], jobs[0].work
        request = Request(
            prompt=[p for s in parts for p in s.prompts],
            negative_prompt=None if first.negatives is None else [n for s in parts for n in s.negatives],
            steps=first.steps, guidance=first.guidance, guidance_rescale=first.guidance_rescale,
            scheduler=first.scheduler, seed=[x for s in parts for x in s.seeds], height=first.height,
            width=first.width, lam=None if first.lam is None else [x for s in parts for x in s.lam],
        )  # fmt: skip
        return self.runtime.generate(request, on_step=lambda *_: check(), progress=False).images

    def use_loras(self, named: tuple) -> None:
        """Swap the LoRA set ``named`` (``((name, scale), ...)``) into the runtime, its fused weights from the LRU
        cache (``--lora-cache`` sets) or computed now; nothing happens when it is in already. The empty set is
        the engine as opened (with the LoRAs ``pladis lora`` attached to its folder, if any): never evicted."""
        rt = self.runtime
        if not named:
            loras, fused = self.base_set
        else:
            if named in self.lora_sets:
                self.metrics.lora_cache_hits.inc()
            else:
                self.metrics.lora_cache_misses.inc()
                self.lora_sets[named] = rt.lora_weights(self.lora_files(named))
                while len(self.lora_sets) > self.cfg.lora_cache:
                    self.lora_sets.popitem(last=False)
            self.lora_sets.move_to_end(named)
            loras, fused = self.lora_sets[named]
        if loras != rt.loras:
            self.metrics.lora_swaps.inc()
            rt.use_lora_weights(loras, fused)

    def lora_files(self, named: tuple) -> list[tuple]:
        """``((name, scale), ...)`` -> ``[(file, scale), ...]`` in ``--lora-dir``."""
        folder = Path(self.cfg.lora_dir)
        return [(folder / f"{name}.safetensors", scale) for name, scale in named]

    def loras_of(self, body: ImageRequest) -> tuple:
        """The request's LoRA set ``((name, scale), ...)``, checked: ApiError 400 naming an unknown adapter, a
        server without ``--lora-dir``, or a LoRA that does not fit the engine."""
        if not body.loras:
            return ()
        if not self.cfg.lora_dir:
            raise _bad("loras", "this server serves no LoRAs; start it with --lora-dir FOLDER")
        folder = Path(self.cfg.lora_dir)
        named = []
        for item in body.loras:
            if not re.fullmatch(r"[\w.-]+", item.name) or not (folder / f"{item.name}.safetensors").is_file():
                known = sorted(p.stem for p in folder.glob("*.safetensors"))[:10]
                raise _bad("loras", f"unknown LoRA adapter {_short(item.name)}; this server has "
                                    f"{', '.join(known) or 'none'} (files in --lora-dir)")  # fmt: skip
            if any(item.name == name for name, _ in named):
                raise _bad("loras", f"LoRA adapter {_short(item.name)} is named twice; name each adapter once, with "
                                    "the scale it should have")  # fmt: skip
            named.append((item.name, float(item.scale)))
        named = tuple(named)
        if named not in self.lora_sets:
            try:  # the fit to the engine, before the request is queued (adapters are read once per file)
                self.runtime.lora_check(self.lora_files(named))
            except PladisError as err:  # the adapter's name for the client, not where the server keeps it
                raise _bad("loras", str(err).replace(f"{folder.resolve()}{os.sep}", "")) from None
        return named

    def drain(self) -> None:
        """Shutdown began: readiness 503, queued work 503 now, new work 503; the running batch goes on."""
        self.draining = True
        if self.worker is not None:
            self.worker.drain()

    def abort(self) -> None:
        """The shutdown limit passed: the running batch's requests get 503 now; the batch stops at its next step."""
        if self.worker is not None:
            self.worker.abort_running()

    def idle(self) -> bool:
        """No batch runs now (during a shutdown: nothing is left to wait for)."""
        return self.worker is None or not self.worker.batch

    def problem(self) -> str | None:
        """Why the server is not ready now, or None."""
        if not self.ready:
            return "starting"
        if self.draining:
            return "shutting down"
        if not self.worker.alive():
            return "worker down (restarting)"
        started = self.worker.batch_started
        if started is not None and time.monotonic() - started > stall_limit_s(self.cfg):
            return "stalled"
        return None

    def job(self, body: ImageRequest) -> tuple[Job, str]:
        """The queued job of a parsed body and its output format; ApiError 400 naming the field."""
        fmt = check_body(body, self.cfg)
        pl, n = self.runtime.engine.manifest.pladis, body.n or 1
        if body.alpha is not None and body.alpha != pl.alpha and pl.patched:  # alpha selects the graph's algorithm
            raise _bad("alpha", f"this engine was exported with alpha={pl.alpha}; re-export it to serve another alpha")
        height, width = _size(body.size, self.runtime.engine.manifest.image)
        seed = random.randrange(2**31) if body.seed is None else body.seed
        request = Request(prompt=body.prompt, negative_prompt=body.negative_prompt, steps=body.steps,
                          guidance=body.guidance, scheduler=body.scheduler, seed=seed, batch=n, height=height,
                          width=width, lam=body.lam)  # fmt: skip
        try:
            s = self.runtime.settings(request)
        except SettingError as err:
            param = PARAMS.get(err.field, err.field)
            prefix = {"size": f"size {body.size}: ", "n": f"n = {n}: "}.get(param, "")
            raise _bad(param, prefix + str(err)) from None
        loras = self.loras_of(body)  # last in the key: a batch runs one LoRA set
        key = (s.height, s.width, s.steps, s.scheduler, s.guidance, s.guidance_rescale, s.negatives and s.negatives[0],
               loras)  # fmt: skip
        return Job(key, s, len(s.seeds), deadline=time.monotonic() + self.cfg.timeout_s), fmt

    async def images(self, request: HttpRequest) -> JSONResponse:
        """POST /v1/images/generations: read and check the body, queue it, wait for the images."""
        why = self.problem()
        if why:
            raise ApiError(503, f"not serving now ({why}); retry shortly", code="unavailable",
                           headers={"Retry-After": "5"})  # fmt: skip
        started = time.monotonic()
        try:
            body = await read_request(request, self.cfg)
        except ClientDisconnect:
            return _JSON({}, CLIENT_GONE)
        # in a thread: a new LoRA set's first check reads its adapters (seconds), which must not stall the loop
        job, fmt = await asyncio.to_thread(self.job, body)
        images = await self.wait(job, request)
        if images is None:
            return _JSON({}, CLIENT_GONE)
        self.metrics.images.inc(len(images))
        seeds, s = job.work.seeds, job.work
        data = await asyncio.to_thread(lambda: [{"b64_json": _encode(im, fmt, body.output_compression), "seed": x}
                                                for im, x in zip(images, seeds, strict=True)])  # fmt: skip
        self.metrics.latency.observe(time.monotonic() - started)
        return _JSON({"created": int(time.time()), "data": data, "output_format": fmt, "size": f"{s.width}x{s.height}",
                      "background": "opaque"})  # fmt: skip

    async def wait(self, job: Job, request: HttpRequest) -> list | None:
        """Queue ``job`` and wait for its images (None: the client went away); ApiError for every other end."""
        try:
            future = self.worker.submit(job)
        except QueueFull as err:
            raise ApiError(429, str(err), code="queue_full", headers={"Retry-After": "1"}) from None
        except ShuttingDown as err:
            raise ApiError(503, str(err), code="shutting_down") from None
        waiter = asyncio.wrap_future(future)
        gone = asyncio.create_task(_disconnected(request.receive))
        try:
            done, _ = await asyncio.wait({waiter, gone}, timeout=max(0.0, job.deadline - time.monotonic()),
                                         return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        finally:
            gone.cancel()
            if not waiter.done():  # deadline, disconnect or cancellation: out of the queue, or stopped if it runs
                self.worker.discard(job)
                waiter.cancel()
        if waiter not in done:
            if gone in done:
                return None
            raise _timeout(self.cfg)
        try:
            return waiter.result()
        except Expired:
            raise _timeout(self.cfg) from None
        except ShuttingDown as err:
            raise ApiError(503, str(err), code="shutting_down") from None
        except Exception as err:  # noqa: BLE001 - the batch failed: this request (and its batch) get 500
            raise ApiError(500, f"generation failed ({type(err).__name__}: {_short(str(err), 200)}); the server is "
                           "still serving, retry", code="generation_failed") from None  # fmt: skip

    async def readiness(self) -> JSONResponse | dict:
        """200 only while a request would be served now: engines loaded, worker running, not shutting down."""
        why = self.problem()
        if why:
            return JSONResponse({"status": why}, 503, {"Retry-After": "5"})
        return {"status": "ready", "queue_depth": self.worker.depth(), "running": len(self.worker.batch)}

    async def liveness(self) -> JSONResponse | dict:
        """200 while the process can recover by itself (loading, draining, a worker restart); 503 when a batch is
        stuck past every deadline (restart the process)."""
        if self.problem() == "stalled":
            return JSONResponse({"status": "stalled"}, 503)
        return {"status": "alive"}

    async def prometheus(self) -> PlainTextResponse:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        if self.worker is not None:
            self.metrics.queue.set(self.worker.depth())
        return PlainTextResponse(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def models(self) -> dict:
        """GET /v1/models: the one engine this server serves."""
        return {"object": "list", "data": [await self.model_card()]}

    async def model_card(self, name: str | None = None) -> dict:
        """GET /v1/models/{name} (``name`` None: the card ``GET /v1/models`` lists)."""
        if name is None and not self.ready:
            raise ApiError(503, "engines are still loading; retry shortly", headers={"Retry-After": "5"})
        if name is not None and (not self.ready or name != self.model):
            raise ApiError(404, f"no model {_short(name)}; this server serves {self.model!r} (GET /v1/models)",
                           param="model", code="model_not_found")  # fmt: skip
        return {"id": self.model, "object": "model", "created": self.created, "owned_by": "pladis"}


def create_app(cfg: ServeConfig, runtime=None) -> FastAPI:
    """The FastAPI app over one engine (``runtime``: an already opened Runtime; else opened at start-up).
    ``app.state.pladis`` is its ``Service``; ``app.state.drain`` / ``abort`` / ``idle`` serve the shutdown."""
    service = Service(cfg, runtime)

    @asynccontextmanager
    async def lifespan(app):
        await service.start()
        supervisor = asyncio.create_task(service.supervise())
        try:
            yield
        finally:
            service.ready = False
            supervisor.cancel()
            await asyncio.to_thread(service.worker.stop, cfg.shutdown_s + 5)

    # no /docs, /redoc or /openapi.json: they would be served without the API key, and /docs loads its page
    # from a CDN an edge machine may not reach; the README documents the API
    app = FastAPI(title="pladis", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_Guard, key=api_key(cfg), metrics=service.metrics)
    app.state.pladis, app.state.drain, app.state.abort, app.state.idle = service, service.drain, service.abort, \
        service.idle  # fmt: skip
    _errors(app)
    routes = {
        "/healthz": service.readiness,
        "/readyz": service.readiness,
        "/livez": service.liveness,
        "/metrics": service.prometheus,
        "/v1/models": service.models,
        "/v1/models/{name}": service.model_card,
    }
    for path, endpoint in routes.items():  # HEAD too: some health-check probes send it
        app.add_api_route(path, endpoint, methods=["GET", "HEAD"], response_model=None)
    app.add_api_route("/v1/images/generations", service.images, methods=["POST"], response_model=None)
    return app


def _errors(app: FastAPI) -> None:
    """Every failure as OpenAI's error body: ApiError as it is, HTTP and validation errors mapped, anything
    else a logged 500 (the server goes on serving)."""

    @app.exception_handler(ApiError)
    async def api_error(request, err: ApiError):
        return error_response(err)

    @app.exception_handler(HTTPException)
    async def http_error(request, err: HTTPException):
        return error_response(ApiError(err.status_code, str(err.detail), headers=err.headers))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, err: RequestValidationError):
        return error_response(_validation_error(err.errors()))

    @app.exception_handler(Exception)
    async def server_error(request, err: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error_response(ApiError(500, f"internal error ({type(err).__name__}); the server is still serving"))


def stall_limit_s(cfg: ServeConfig) -> float:
    """How long a batch may run before liveness calls it stuck: it stops at its first step past every deadline
    (at most ``timeout_s`` after it started), so twice that plus 30 s for one slow step means it hangs."""
    return 2 * cfg.timeout_s + 30


def _timeout(cfg: ServeConfig) -> ApiError:
    # x-should-retry: false: the OpenAI SDK retries 5xx by default, which would triple an overload
    return ApiError(504, f"no result within the server's deadline of {cfg.timeout_s:g} s; the server is busy, "
                    "retry later or ask for fewer steps/images", code="timeout",
                    headers={"x-should-retry": "false"})  # fmt: skip


async def _disconnected(receive) -> None:
    """Return once the client has gone away (after the body, ``receive`` waits for exactly that)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def read_request(request: HttpRequest, cfg: ServeConfig) -> ImageRequest:
    """The body, read with the byte and time limits, parsed and validated; ApiError naming the problem."""
    media = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise ApiError(415, f"content type {_short(media)} is not JSON; send 'Content-Type: application/json'",
                       param="content-type", code="unsupported_media_type")  # fmt: skip
    too_big = ApiError(413, f"the request body is over the server's maximum of {cfg.max_body_bytes} bytes; send a "
                       "smaller one (a shorter prompt)", param="body", code="too_large")  # fmt: skip
    length = request.headers.get("content-length", "")
    if len(length) > 18 or (length.isdigit() and int(length) > cfg.max_body_bytes):
        raise too_big
    chunks, total = [], 0
    try:
        async with asyncio.timeout(cfg.body_timeout_s):
            async for chunk in request.stream():  # counted as read: a chunked body has no Content-Length
                total += len(chunk)
                if total > cfg.max_body_bytes:
                    raise too_big
                chunks.append(chunk)
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {cfg.body_timeout_s:g} s", param="body",
                       code="body_timeout") from None  # fmt: skip
    try:
        data = json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as err:  # also UnicodeDecodeError, ints over 4300 digits, deep nesting
        reason = err.msg if isinstance(err, json.JSONDecodeError) else type(err).__name__
        raise ApiError(400, f"the body is not valid JSON ({reason}); send one JSON object", param="body",
                       code="invalid_json") from None  # fmt: skip
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object with at least 'prompt'", param="body", code="invalid_json")
    for name, value in data.items():
        if not _utf8(name):
            raise ApiError(400, "a field name is not valid Unicode (lone surrogate)", param="body",
                           code="invalid_value")  # fmt: skip
        if not _utf8(value):
            raise ApiError(400, f"{name} is not valid Unicode text (lone surrogate \\ud800-\\udfff); send UTF-8 text",
                           param=name, code="invalid_value")  # fmt: skip
    try:
        return ImageRequest.model_validate(data)
    except ValidationError as err:
        raise _validation_error(err.errors(include_input=False, include_context=False)) from None


def _utf8(value, depth: int = 0) -> bool:
    """Whether every string in ``value`` (nested up to a bound) can be encoded as UTF-8."""
    if isinstance(value, str):
        try:
            value.encode()
            return True
        except UnicodeEncodeError:
            return False
    if depth > 8:
        return True  # deeper values are refused by the schema anyway (no field nests this deep)
    if isinstance(value, dict):
        return all(_utf8(k, depth + 1) and _utf8(v, depth + 1) for k, v in value.items())
    if isinstance(value, list):
        return all(_utf8(v, depth + 1) for v in value)
    return True


def _validation_error(errors: list) -> ApiError:
    """The first Pydantic error as a 400 naming its field (the input itself is never echoed)."""
    first = errors[0]
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or "body"
    if first.get("type") == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {_short(param)}; remove it (fields: see the README)"
    else:
        message = f"{param}: {first.get('msg', 'invalid value')}"
    return ApiError(400, message, param=param[:100], code="invalid_value")


def _bad(field: str, message: str) -> ApiError:
    return ApiError(400, message, param=field, code="invalid_value")


def check_body(body: ImageRequest, cfg: ServeConfig) -> str:
    """The output format of a body within this server's own limits (the engine's are the Request's), else
    ApiError naming the field."""
    for name in ("prompt", "negative_prompt"):
        value = getattr(body, name)
        if value is not None and len(value) > cfg.max_prompt_chars:
            raise _bad(name, f"{name} is {len(value)} characters, over the server's maximum of {cfg.max_prompt_chars}; "
                             "shorten it")  # fmt: skip
    if body.stream:
        raise _bad("stream", "streaming is not supported; leave stream out or false")
    if body.response_format not in (None, "b64_json"):
        raise _bad("response_format", "only response_format 'b64_json' is served (this server stores no images)")
    fmt = body.output_format or "png"
    if fmt not in FORMATS:
        raise _bad("output_format", f"output_format {_short(fmt)} is not served; choose one of {', '.join(FORMATS)}")
    if body.steps is not None and body.steps > cfg.max_steps:
        raise _bad("steps", f"steps = {body.steps} is over the server's maximum of {cfg.max_steps}; ask for at most "
                            f"{cfg.max_steps}")  # fmt: skip
    return fmt


def _size(size: str | None, image) -> tuple[int | None, int | None]:
    """(height, width) of ``size`` ("WxH"; None, "" or "auto": the engine's default, None here)."""
    if size in (None, "", "auto"):
        return None, None
    match = SIZE.fullmatch(size)
    if not match:
        raise _bad("size", f"size {_short(size)} is not 'auto' or WIDTHxHEIGHT, e.g. {image.width}x{image.height}")
    return int(match[2]), int(match[1])


def _short(text: str, limit: int = 40) -> str:
    """``text`` quoted for a message, cut to ``limit`` characters."""
    return repr(text[:limit] + ("..." if len(text) > limit else ""))


def _encode(image, fmt: str, compression: int | None) -> str:
    buf = io.BytesIO()
    options = {"quality": 90 if compression is None else compression} if fmt in ("jpeg", "webp") else {}
    image.save(buf, format=FORMATS[fmt], **options)
    return base64.b64encode(buf.getvalue()).decode()
