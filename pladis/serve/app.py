"""The HTTP app: ``POST /v1/images/generations`` and ``GET /v1/models`` as the OpenAI images API has them,
``GET /healthz`` (readiness), ``GET /livez`` (liveness), ``GET /metrics`` (Prometheus).

Every request body is read with a byte limit and a time limit, parsed, and checked field by field (Pydantic,
then the engine's manifest) before it is queued; a bad one gets OpenAI's error body ``{"error": {"message",
"type", "param", "code"}}`` with a 4xx whose ``param`` names the field. The engine folder is read once, at
start-up.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import random
import re
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from pladis.serve.config import ServeConfig, api_key, validate
from pladis.serve.worker import Expired, Job, QueueFull, ShuttingDown, Worker

log = logging.getLogger("pladis.serve")

CLIENT_GONE = 499  # nginx's "client closed request": counted in /metrics, never sent (nobody is listening)
FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP", "gif": "GIF"}
SIZE = re.compile(r"(\d{1,6})x(\d{1,6})")


class ImageRequest(BaseModel):
    """The request body: every field of OpenAI's ``images.generate`` plus this server's sampling fields.

    Mapped: ``model`` (any name: this server serves one engine, listed by ``/v1/models``), ``n``, ``size``
    ("auto": the engine's default), ``response_format`` (b64_json only), ``output_format`` (png, jpeg,
    webp, gif), ``output_compression`` (jpeg/webp quality). Accepted and ignored: ``quality``, ``style``,
    ``background`` (images are opaque), ``moderation``, ``user``, ``safety_identifier``, ``complexity``,
    ``partial_images``, ``frame_count``, ``frame_duration_ms``, ``svg``; ``stream`` only as false.
    Engine-dependent limits (size range, n, scheduler, lam/alpha) are checked after parsing.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

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
    import hmac

    sent = dict(scope["headers"]).get(b"authorization", b"")
    return hmac.compare_digest(sent, f"Bearer {key}".encode())


def create_app(cfg: ServeConfig, runtime=None) -> FastAPI:
    """The FastAPI app over one engine (``runtime``: an already opened Runtime; else opened at start-up)."""
    validate(cfg)
    key = api_key(cfg)
    metrics = Metrics()
    state: dict = {"ready": False, "draining": False, "worker": None, "runtime": runtime}
    stall_s = stall_limit_s(cfg)

    def generate(jobs: list[Job], check):
        from pladis.runtime.pipeline import step_generators

        rt = state["runtime"]
        height, width, steps, scheduler, guidance, negative = jobs[0].key
        # lam is a runtime input: requests with different strengths share a batch, one value per image
        default = rt.engine.manifest.pladis.lam
        lams = None if all(j.lam is None for j in jobs) else \
            [default if j.lam is None else j.lam for j in jobs for _ in j.seeds]  # fmt: skip
        s = rt.settings([j.prompt for j in jobs for _ in j.seeds], negative_prompt=negative, steps=steps,
                        guidance=guidance, scheduler=scheduler, seed=[x for j in jobs for x in j.seeds],
                        height=height, width=width, lam=lams)  # fmt: skip
        # Runtime.generate's loop, with a check between steps so abandoned work stops early
        cond, sched, latents = rt.prepare(s)
        g = step_generators(s)
        for t in sched.timesteps:
            check()
            latents = sched.step(rt.predict(latents, t, cond, sched, s), t, latents, generator=g).prev_sample
        check()
        return rt.decode(latents, s)

    async def supervise():
        """Restart the worker thread if it ever dies (readiness is 503 until it runs again)."""
        while True:
            await asyncio.sleep(0.2)
            worker = state["worker"]
            if worker.running and not worker.alive():
                log.error("the worker thread died; restarting it")
                metrics.restarts.inc()
                worker.start()

    @asynccontextmanager
    async def lifespan(app):
        rt = state["runtime"]
        if rt is None:
            from pladis.runtime import Runtime

            rt = await asyncio.to_thread(Runtime, cfg.engine, cfg.backend or None, device=cfg.device)
        read_engine_once(rt)
        await asyncio.to_thread(rt.generate, "warm-up", progress=False, steps=1)  # load every engine once
        state["runtime"] = rt
        state["model"] = cfg.model_name or Path(rt.engine.folder).resolve().name
        state["created"] = int(time.time())
        state["worker"] = Worker(generate, rt.engine.dim("batch")[2], cfg.max_queue, cfg.batch_window_ms / 1000,
                                 metrics)  # fmt: skip
        supervisor = asyncio.create_task(supervise())
        state["ready"] = True
        try:
            yield
        finally:
            state["ready"] = False
            supervisor.cancel()
            await asyncio.to_thread(state["worker"].stop, cfg.shutdown_s + 5)

    app = FastAPI(title="pladis", lifespan=lifespan)
    app.add_middleware(_Guard, key=key, metrics=metrics)

    def drain():
        """Shutdown began: readiness 503, queued work 503 now, new work 503; the running batch goes on."""
        state["draining"] = True
        if state["worker"] is not None:
            state["worker"].drain()

    def abort():
        """The shutdown limit passed: the running batch's requests get 503 now; the batch stops at its next step."""
        if state["worker"] is not None:
            state["worker"].abort_running()

    app.state.pladis, app.state.drain, app.state.abort = state, drain, abort

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

    def problem() -> str | None:
        """Why the server is not ready now, or None."""
        worker = state["worker"]
        if not state["ready"]:
            return "starting"
        if state["draining"]:
            return "shutting down"
        if not worker.alive():
            return "worker down (restarting)"
        if worker.batch_started is not None and time.monotonic() - worker.batch_started > stall_s:
            return "stalled"
        return None

    @app.get("/healthz")
    @app.get("/readyz")
    async def readiness():
        """200 only while a request would be served now: engines loaded, worker running, not shutting down."""
        why = problem()
        if why:
            return JSONResponse({"status": why}, 503, {"Retry-After": "5"})
        return {"status": "ready", "queue_depth": state["worker"].depth(), "running": len(state["worker"].batch)}

    @app.get("/livez")
    async def liveness():
        """200 while the process can recover by itself (loading, draining, a worker restart); 503 when a batch is
        stuck past every deadline (restart the process)."""
        why = problem()
        if why == "stalled":
            return JSONResponse({"status": why}, 503)
        return {"status": "alive"}

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        if state["worker"] is not None:
            metrics.queue.set(state["worker"].depth())
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def model_card() -> dict:
        return {"id": state["model"], "object": "model", "created": state["created"], "owned_by": "pladis"}

    @app.get("/v1/models")
    async def models():
        if not state["ready"]:
            raise ApiError(503, "engines are still loading; retry shortly", headers={"Retry-After": "5"})
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name}")
    async def model(name: str):
        if not state["ready"] or name != state["model"]:
            raise ApiError(404, f"no model {_short(name)}; this server serves {state.get('model')!r} (GET /v1/models)",
                           param="model", code="model_not_found")  # fmt: skip
        return model_card()

    @app.post("/v1/images/generations")
    async def images(request: Request):
        why = problem()
        if why:
            raise ApiError(503, f"not serving now ({why}); retry shortly", code="unavailable",
                           headers={"Retry-After": "5"})  # fmt: skip
        rt, started = state["runtime"], time.monotonic()
        try:
            body = await read_request(request, cfg)
        except ClientDisconnect:
            return _JSON({}, CLIENT_GONE)
        height, width, fmt = check(body, rt, cfg)
        seed = random.randrange(2**31) if body.seed is None else body.seed
        seeds = [seed + i for i in range(body.n or 1)]
        key = (height, width, body.steps, body.scheduler, body.guidance, body.negative_prompt)
        job = Job(key, body.prompt, seeds, deadline=time.monotonic() + cfg.timeout_s, lam=body.lam)
        try:
            future = state["worker"].submit(job)
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
                state["worker"].discard(job)
                waiter.cancel()
        if waiter not in done:
            if gone in done:
                return _JSON({}, CLIENT_GONE)
            raise _timeout(cfg)
        try:
            images = waiter.result()
        except Expired:
            raise _timeout(cfg) from None
        except ShuttingDown as err:
            raise ApiError(503, str(err), code="shutting_down") from None
        except Exception as err:  # noqa: BLE001 - the batch failed: this request (and its batch) get 500
            raise ApiError(500, f"generation failed ({type(err).__name__}: {_short(str(err), 200)}); the server is "
                           "still serving, retry", code="generation_failed") from None  # fmt: skip
        metrics.images.inc(len(images))
        data = await asyncio.to_thread(lambda: [{"b64_json": _encode(im, fmt, body.output_compression), "seed": s}
                                                for im, s in zip(images, seeds, strict=True)])  # fmt: skip
        metrics.latency.observe(time.monotonic() - started)
        return _JSON({"created": int(time.time()), "data": data, "output_format": fmt, "size": f"{width}x{height}",
                      "background": "opaque"})  # fmt: skip

    return app


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


async def read_request(request: Request, cfg: ServeConfig) -> ImageRequest:
    """The body, read with the byte and time limits, parsed and validated; ApiError naming the problem."""
    media = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise ApiError(415, f"content type {_short(media)} is not JSON; send 'Content-Type: application/json'",
                       param="content-type", code="unsupported_media_type")  # fmt: skip
    too_big = ApiError(413, f"the request body is over {cfg.max_body_bytes} bytes", param="body", code="too_large")
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


def check(body: ImageRequest, rt, cfg: ServeConfig) -> tuple[int, int, str]:
    """(height, width, output format) of a request the engine can serve, else ApiError naming the field."""
    from pladis.runtime.pipeline import scheduler_names

    def bad(field: str, message: str):
        return ApiError(400, message, param=field, code="invalid_value")

    for name in ("prompt", "negative_prompt"):
        value = getattr(body, name)
        if value is not None and len(value) > cfg.max_prompt_chars:
            raise bad(name, f"{name} is {len(value)} characters, over the server's maximum of {cfg.max_prompt_chars}")
    if body.stream:
        raise bad("stream", "streaming is not supported; leave stream out or false")
    if body.response_format not in (None, "b64_json"):
        raise bad("response_format", "only response_format 'b64_json' is served (this server stores no images)")
    fmt = body.output_format or "png"
    if fmt not in FORMATS:
        raise bad("output_format", f"output_format {_short(fmt)} is not served; choose one of {', '.join(FORMATS)}")
    n, max_batch = body.n or 1, rt.engine.dim("batch")[2]
    if n > max_batch:
        raise bad("n", f"n = {n} is over this engine's batch of {max_batch}")
    if body.steps is not None and body.steps > cfg.max_steps:
        raise bad("steps", f"steps = {body.steps} is over the server's maximum of {cfg.max_steps}")
    image = rt.engine.manifest.image
    height, width = image.height, image.width
    if body.size not in (None, "", "auto"):
        match = SIZE.fullmatch(body.size)
        if not match:
            raise bad("size", f"size {_short(body.size)} is not 'auto' or WIDTHxHEIGHT, e.g. {width}x{height}")
        width, height = int(match[1]), int(match[2])
        for name, value in (("width", width), ("height", height)):
            lo, _, hi = rt.engine.dim(name)
            if not lo <= value <= hi or value % image.multiple:
                raise bad("size", f"size {body.size}: {name} must be in [{lo}, {hi}] and a multiple of "
                                  f"{image.multiple}")  # fmt: skip
    names = scheduler_names(rt.engine.family)
    if body.scheduler is not None and body.scheduler not in names:
        raise bad("scheduler", f"unknown scheduler {_short(body.scheduler)}; choose one of {', '.join(names)}")
    pl = rt.engine.manifest.pladis
    if body.alpha is not None and body.alpha != pl.alpha and pl.patched:  # alpha selects the graph's algorithm
        raise bad("alpha", f"this engine was exported with alpha={pl.alpha}; re-export it to serve another alpha")
    try:  # lam is a runtime input: any value in the engine's range, per request
        rt.check_lam(body.lam, 1)
    except ValueError as err:
        raise bad("lam", str(err)) from None
    try:  # the runtime's own checks (CFG batch, negative prompt without CFG, ...), without running anything
        rt.settings(body.prompt, negative_prompt=body.negative_prompt, steps=body.steps, guidance=body.guidance,
                    scheduler=body.scheduler, batch=n, height=height, width=width)  # fmt: skip
    except ValueError as err:
        field = next((f for f in ("negative_prompt", "guidance", "steps") if f in str(err)), "n")
        raise bad(field, str(err)) from None
    return height, width, fmt


def read_engine_once(rt) -> None:
    """Read what the runtime would re-read from the engine folder per request (the scheduler config) now,
    so moving or changing the folder later cannot fail requests. Tokenizers and engines load at warm-up."""
    import diffusers

    from pladis.runtime.pipeline import SCHEDULERS

    config = json.loads((Path(rt.engine.folder) / "scheduler" / "scheduler_config.json").read_text())

    def scheduler(name: str | None = None):
        cls = getattr(diffusers, SCHEDULERS[name] if name else config["_class_name"])
        return cls.from_config(config)

    rt.scheduler = scheduler


def _short(text: str, limit: int = 40) -> str:
    """``text`` quoted for a message, cut to ``limit`` characters."""
    return repr(text[:limit] + ("..." if len(text) > limit else ""))


def _encode(image, fmt: str, compression: int | None) -> str:
    buf = io.BytesIO()
    options = {"quality": 90 if compression is None else compression} if fmt in ("jpeg", "webp") else {}
    image.save(buf, format=FORMATS[fmt], **options)
    return base64.b64encode(buf.getvalue()).decode()
