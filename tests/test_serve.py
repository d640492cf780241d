"""The image server on 127.0.0.1 (tiny engine, ORT backend): API contract, the OpenAI SDK, bad input, batching,
load, and a server that survives its users (deadlines, overload, failing batches, slow and vanishing clients,
a moved engine folder, SIGTERM)."""

import ast
import asyncio
import base64
import concurrent.futures
import io
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from pladis.export import ExportConfig, export
from pladis.runtime import Runtime
from pladis.serve import ServeConfig, run_in_thread, serve
from pladis.serve.config import api_key, validate
from pladis.serve.worker import Job, Worker

KEY = "test-key-0123"
AUTH = {"Authorization": f"Bearer {KEY}"}
HEAVY = {"prompt": "heavy", "n": 4, "steps": 50, "size": "64x64"}  # ~20 s on a 2-core CPU: always past a 3 s deadline


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "tiny-sdxl"
    export(ExportConfig(model="tiny-sdxl", out=str(out), validate=False))
    return out


@pytest.fixture(scope="module")
def stock_engine(tmp_path_factory):
    """A `--lam 0` export: the stock graph, no PLADIS layers and no lam input."""
    out = tmp_path_factory.mktemp("serve") / "tiny-sdxl-stock"
    export(ExportConfig(model="tiny-sdxl", out=str(out), lam=0.0, validate=False))
    return out


@pytest.fixture(scope="module")
def served(engine, tmp_path_factory):
    """A copy of the engine for the module server, so one test can move it without touching the others."""
    return Path(shutil.copytree(engine, tmp_path_factory.mktemp("served") / "tiny-sdxl-served"))


@pytest.fixture(scope="module")
def hooks():
    """``hooks["step"]``: called in the worker thread before each denoising step (block it, make it fail)."""
    return {"step": None}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _hooked_runtime(folder, hooks) -> Runtime:
    rt = Runtime(folder, "ort")
    predict = rt.predict

    def hooked(*args, **kwargs):
        if hooks["step"] is not None:
            hooks["step"]()
        return predict(*args, **kwargs)

    rt.predict = hooked
    return rt


@pytest.fixture(scope="module")
def server(served, hooks, tmp_path_factory):
    """A real uvicorn server on 127.0.0.1 in a thread (API key from a file), stopped after the module."""
    key_file = tmp_path_factory.mktemp("key") / "key"
    key_file.write_text(KEY + "\n")
    cfg = ServeConfig(engine=str(served), port=0, max_queue=8, max_steps=50, batch_window_ms=50,
                      api_key_file=str(key_file))  # fmt: skip
    url, stop = run_in_thread(cfg, _hooked_runtime(served, hooks))
    yield url
    stop()


@pytest.fixture(scope="module")
def strict(engine):
    """A second server with a 3 s deadline, for deadline misses and overload."""
    cfg = ServeConfig(engine=str(engine), port=0, max_queue=8, max_steps=50, timeout_s=3)
    url, stop = run_in_thread(cfg)
    yield url
    stop()


@pytest.fixture
def gate(hooks):
    """Block the worker at its next step: ``started`` is set when it blocks, ``release`` lets it go."""
    started, release = threading.Event(), threading.Event()

    def block():
        started.set()
        release.wait(60)

    hooks["step"] = block
    yield started, release
    release.set()
    hooks["step"] = None


def post(url, timeout=60, **body):
    return httpx.post(f"{url}/v1/images/generations", json={"prompt": "a red cube", "steps": 2, **body},
                      headers=AUTH, timeout=timeout)  # fmt: skip


def post_raw(url, content: bytes, content_type="application/json"):
    return httpx.post(f"{url}/v1/images/generations", content=content,
                      headers={**AUTH, "content-type": content_type}, timeout=60)  # fmt: skip


def decode(item) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))))


def counts(url) -> dict[str, float]:
    """``pladis_requests_total`` by status, and the other counters, from /metrics."""
    out = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        m = re.match(r'pladis_requests_total\{status="(\w+)"\} (\S+)', line)
        if m:
            out[m[1]] = float(m[2])
        elif line.startswith(("pladis_images_total ", "pladis_worker_restarts_total ")):
            out[line.split()[0]] = float(line.split()[1])
    return out


def wait_for(predicate, what: str, limit_s: float = 30):
    """Poll ``predicate`` every 50 ms up to ``limit_s`` (bounded: a hang is a failure, not a stuck test)."""
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"not within {limit_s} s: {what}")


def health(url) -> dict:
    return httpx.get(f"{url}/healthz").json()


# -- the API contract -------------------------------------------------------------------------------------


def test_valid_request_matches_generate_bit_for_bit(server, engine):
    r = post(server, seed=7, n=2)
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [d["seed"] for d in data] == [7, 8] and decode(data[0]).shape == (32, 32, 3)
    rt = Runtime(engine, "ort")
    for i, item in enumerate(data):  # each image alone, as `pladis generate --seed 7+i` makes it
        alone = rt.generate("a red cube", steps=2, seed=7 + i, progress=False).images[0]
        assert np.array_equal(decode(item), np.asarray(alone))  # atol=0: same engine, same seed


def test_server_and_pladis_generate_make_the_same_image(server, engine, tmp_path):
    """One request through HTTP and through the CLI (same seed, steps, lam): the same pixels, bit for bit."""
    from pladis import cli

    r = post(server, seed=7, lam=3.0)
    assert r.status_code == 200, r.text
    out = tmp_path / "cli.png"
    args = ["--engine", str(engine), "--prompt", "a red cube", "--steps", "2", "--seed", "7", "--lam", "3"]
    assert cli.main(["generate", *args, "--out", str(out)]) == 0
    assert np.array_equal(decode(r.json()["data"][0]), np.asarray(Image.open(out)))  # atol=0: one loop, one engine


def test_lam_zero_on_a_stock_engine_is_served(stock_engine):
    """lam = 0 is what a stock engine runs: 200 (it was a 500, also with n = 2); any other lam a 400 naming lam."""
    from fastapi.testclient import TestClient

    from pladis.serve import create_app

    with TestClient(create_app(ServeConfig(engine=str(stock_engine)))) as client:
        for extra in ({"lam": 0}, {"lam": 0.0, "n": 2}):
            r = client.post("/v1/images/generations", json={"prompt": "a red cube", "steps": 1, **extra})
            assert r.status_code == 200, r.text
        r = client.post("/v1/images/generations", json={"prompt": "a red cube", "steps": 1, "lam": 2.0})
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"] == "lam" and "without PLADIS layers" in error["message"], r.text


def test_no_unauthenticated_api_pages_and_health_answers_head(server):
    # FastAPI's /docs, /redoc and /openapi.json were served without the key (and /docs loads from a CDN)
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(f"{server}{path}").status_code in (401, 404), path
        assert httpx.get(f"{server}{path}", headers=AUTH).status_code == 404, path
    r = httpx.head(f"{server}/healthz")  # some load balancers' probes send HEAD (it was a 405)
    assert r.status_code == 200 and not r.content


def test_the_bearer_scheme_is_case_insensitive(server):
    for scheme in ("bearer", "BEARER"):  # HTTP auth schemes are case-insensitive (lower case was a 401)
        r = httpx.post(f"{server}/v1/images/generations", json={"prompt": "a red cube", "steps": 2},
                       headers={"authorization": f"{scheme} {KEY}"}, timeout=60)  # fmt: skip
        assert r.status_code == 200, r.text
    r = httpx.get(f"{server}/v1/models", headers={"authorization": f"Basic {KEY}"})
    assert r.status_code == 401


HUGE = "9" * 5000


@pytest.mark.parametrize("body, field", [
    (dict(size="1024x1024"), "size"),
    (dict(size="33x32"), "size"),
    (dict(size="big"), "size"),
    (dict(size=f"{HUGE}x32"), "size"),  # thousands of digits: int() would refuse them (was a 500)
    (dict(steps=51), "steps"),
    (dict(steps=0), "steps"),
    (dict(n=5), "n"),
    (dict(n="two"), "n"),
    (dict(n=10**12), "n"),  # over the engine's batch: refused before the prompt is repeated (was a MemoryError 500)
    (dict(scheduler="heun"), "scheduler"),
    (dict(response_format="url"), "response_format"),
    (dict(output_format="svg"), "output_format"),
    (dict(stream=True), "stream"),
    (dict(lam=10.5), "lam"),  # lam is a runtime input: any value in the engine's range [0, 10]
    (dict(lam=-1), "lam"),
    (dict(alpha=2.0), "alpha"),  # alpha selects the graph's algorithm: fixed at export
    (dict(colour="red"), "colour"),
    (dict(prompt=""), "prompt"),
    (dict(prompt="x" * 2001), "prompt"),
    (dict(guidance=-1), "guidance"),
    (dict(guidance=0, negative_prompt="blur"), "negative_prompt"),  # the runtime's own check, named
    (dict(seed=-1), "seed"),
    (dict(seed=2**63 - 1, n=2), "seed"),  # image 1 gets seed + 1, past the range (was served)
    (dict(steps=True), "steps"),  # strict types: no bool for a number (was accepted as 1)
    (dict(n="2"), "n"),  # no string for a number (was accepted as 2)
    (dict(guidance="7"), "guidance"),
    (dict(prompt="   "), "prompt"),  # blank (was reported with param "n")
])  # fmt: skip
def test_bad_fields_get_400_naming_them(server, body, field):
    r = post(server, **body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]  # OpenAI's error body
    assert error["param"] == field and error["type"] == "invalid_request_error" and error["message"], error


@pytest.mark.parametrize("content, field", [
    (b'{"prompt": "\\ud800"}', "prompt"),  # a lone surrogate (was a 500)
    (b'{"prompt": "x", "negative_prompt": "\\udfff", "guidance": 5}', "negative_prompt"),
    (b'{"prompt": "x", "guidance": NaN}', "guidance"),  # (was a 500)
    (b'{"prompt": "x", "guidance": Infinity}', "guidance"),
    (b'{"prompt": "x", "n": 1e400}', "n"),  # inf (was a 500)
    (b'{"prompt": "x", "n": ' + HUGE.encode() + b"}", "body"),  # an int json refuses to parse
    (b"[" * 30000 + b"]" * 30000, "body"),  # nesting past the parser's recursion limit, under 64 KiB
    (b'{"prompt": "x"', "body"),
    (b'"just a string"', "body"),
    (b"\xff\xfe", "body"),
])  # fmt: skip
def test_odd_input_gets_400_not_500(server, content, field):
    r = post_raw(server, content)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field, r.text


@pytest.mark.parametrize("body, fix", [
    (dict(prompt="x" * 2001), "shorten it"),
    (dict(negative_prompt="x" * 2001, guidance=5), "shorten it"),
    (dict(steps=51), "ask for at most 50"),
])  # fmt: skip
def test_refusals_at_the_servers_limits_say_the_fix(server, body, fix):
    r = post(server, **body)  # the limit alone left the client guessing what to change
    assert r.status_code == 400 and fix in r.json()["error"]["message"], r.text


def test_non_json_content_type_is_415(server):
    r = post_raw(server, b"prompt=a red cube", "text/plain")
    assert r.status_code == 415 and r.json()["error"]["param"] == "content-type", r.text


def test_a_body_without_a_content_type_is_read_as_json(server):
    request = httpx.Request("POST", f"{server}/v1/images/generations", headers=AUTH,
                            content=b'{"prompt": "a red cube", "steps": 1}')  # fmt: skip
    assert "content-type" not in request.headers  # as the README says: read as JSON, not a 415
    r = httpx.Client(timeout=60).send(request)
    assert r.status_code == 200 and len(r.json()["data"]) == 1, r.text


def test_openai_sdk_sync_with_its_usual_arguments_and_errors(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)
    r = client.images.generate(model="dall-e-3", prompt="a red cube", n=1, quality="hd", style="vivid", user="u1",
                               size="auto", background="auto", response_format="b64_json",
                               extra_body={"steps": 2, "seed": 3})  # fmt: skip
    assert decode({"b64_json": r.data[0].b64_json}).shape == (32, 32, 3)
    r = client.images.generate(model="gpt-image-1", prompt="a red cube", output_format="jpeg", output_compression=80,
                               moderation="low", quality="low", background="opaque", size="32x32",
                               extra_body={"steps": 2})  # fmt: skip
    assert Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json))).format == "JPEG"
    assert [m.id for m in client.models.list()] == ["tiny-sdxl-served"]  # the engine folder's name
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(prompt="a red cube", size="1024x1024")
    assert err.value.param == "size" and "size" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(prompt="a red cube", extra_body={"colour": "red"})
    assert err.value.param == "colour"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).images.generate(prompt="x")


def test_openai_sdk_async(server):
    openai = pytest.importorskip("openai")

    async def run():
        client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)
        ok = await asyncio.gather(*[client.images.generate(model="dall-e-2", prompt=f"cube {i}", size="32x32",
                                                           extra_body={"steps": 2}) for i in range(3)])  # fmt: skip
        with pytest.raises(openai.BadRequestError) as err:
            await client.images.generate(prompt="x", n=9)
        return ok, err.value

    ok, err = asyncio.run(run())
    assert all(decode({"b64_json": r.data[0].b64_json}).shape == (32, 32, 3) for r in ok) and err.param == "n"


def test_api_key_401_is_openai_shaped_and_counted(server):
    before = counts(server).get("401", 0)
    r = httpx.post(f"{server}/v1/images/generations", json={"prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server}/v1/models").status_code == 401
    assert counts(server)["401"] == before + 2  # /metrics counts 401s (it did not)


def test_readiness_liveness_metrics(server):
    assert health(server)["status"] == "ready"
    assert httpx.get(f"{server}/readyz").status_code == 200 and httpx.get(f"{server}/livez").status_code == 200
    text = httpx.get(f"{server}/metrics").text
    assert "pladis_requests_total" in text and "pladis_queue_depth" in text and "pladis_worker_restarts" in text


# -- bodies ------------------------------------------------------------------------------------------------


def test_oversize_body_by_content_length_is_413(server):
    r = post_raw(server, b"{" + b" " * 70000 + b"}")
    assert r.status_code == 413 and r.json()["error"]["param"] == "body"
    assert "send a smaller one" in r.json()["error"]["message"], r.text


def _rss() -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text())[1]) * 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc (Linux)")
def test_chunked_oversize_body_is_413_with_bounded_memory(server):
    """100 MB offered in chunks (no Content-Length): the server stops reading at its limit (64 KiB)."""
    host, port = server.removeprefix("http://").split(":")
    base, peak, done = _rss(), [0], threading.Event()

    def sample():  # the server runs in this process: its peak RSS is ours
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    answer, sent = b"", 0
    pool = concurrent.futures.ThreadPoolExecutor(1)
    with socket.create_connection((host, int(port)), timeout=30) as sock, pool:
        reader = pool.submit(lambda: sock.recv(4096))
        sock.sendall(f"POST /v1/images/generations HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
                     "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode())  # fmt: skip
        chunk = b"%x\r\n%s\r\n" % (1 << 20, b'{"prompt": "' + b"a" * ((1 << 20) - 12))
        try:
            while sent < 100 << 20 and not reader.done():
                sock.sendall(chunk)
                sent += 1 << 20
        except OSError:  # the server answered and closed: exactly what should happen
            pass
        answer = reader.result(timeout=30)
    done.set()
    sampler.join()
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < 100 << 20  # the server stopped reading long before the end
    assert peak[0] - base < 50 << 20, (peak[0] - base) / 2**20  # was +3x the body; 50 MB: allocator noise


# -- a worker that cannot die ------------------------------------------------------------------------------


def test_worker_survives_a_cancelled_running_future():
    """The old worker died setting a result on a future its HTTP side had cancelled (unit level, no engine)."""
    release = threading.Event()

    def generate(jobs, check):
        release.wait(10)
        return [None] * sum(j.images for j in jobs)

    worker = Worker(generate, max_batch=4, max_queue=4, window_s=0)
    try:
        first = Job(("k",), "a", 1, deadline=time.monotonic() + 60)
        worker.submit(first)
        wait_for(lambda: worker.batch, "the first job runs")
        first.future.cancel()  # what the HTTP side does on a deadline or a disconnect
        first.abandoned = True
        release.set()
        second = Job(("k",), "b", 1, deadline=time.monotonic() + 60)
        assert worker.submit(second).result(timeout=10) == [None] and worker.alive()
    finally:
        release.set()
        worker.stop(5)


def test_deadline_miss_then_20_normal_requests_succeed(strict):
    r = httpx.post(f"{strict}/v1/images/generations", json=HEAVY, timeout=60)
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout", r.text
    statuses = [post(strict, seed=i).status_code for i in range(20)]
    assert statuses == [200] * 20, statuses
    assert health(strict)["status"] == "ready"


def test_overload_of_heavy_requests_then_healthy_service(strict):
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        statuses = list(pool.map(lambda i: httpx.post(f"{strict}/v1/images/generations", json={**HEAVY, "seed": i},
                                                      timeout=60).status_code, range(12)))  # fmt: skip
    assert set(statuses) <= {504, 429}, statuses  # every heavy request misses the 3 s deadline or finds no room
    statuses = [post(strict, seed=i).status_code for i in range(10)]
    assert statuses == [200] * 10, statuses
    assert health(strict)["status"] == "ready" and "500" not in counts(strict)


def test_a_failing_batch_is_500_for_its_requests_only(server, hooks):
    openai = pytest.importorskip("openai")
    before = counts(server).get("500", 0)

    def fail_once():
        hooks["step"] = None
        raise RuntimeError("injected engine failure")

    hooks["step"] = fail_once
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.InternalServerError) as err:
        client.images.generate(prompt="a red cube", extra_body={"steps": 2})
    assert "injected engine failure" in err.value.message and err.value.code == "generation_failed"
    assert [post(server, seed=i).status_code for i in range(3)] == [200] * 3
    assert counts(server)["500"] == before + 1  # /metrics counts 500s (it did not)


class _Die(BaseException):
    """Not an Exception: escapes the worker's per-batch handler and ends its thread."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_worker_thread_is_restarted(server, hooks):
    restarts = counts(server).get("pladis_worker_restarts_total", 0)

    def die_once():
        hooks["step"] = None
        raise _Die()

    hooks["step"] = die_once
    r = post(server)
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error", r.text
    wait_for(lambda: health(server)["status"] == "ready", "the supervisor restarts the worker", 10)
    assert counts(server)["pladis_worker_restarts_total"] == restarts + 1
    assert [post(server, seed=i).status_code for i in range(3)] == [200] * 3


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_readiness_is_503_while_the_worker_is_down(engine):
    """The supervisor's restart held back: readiness says the worker is down, liveness that it can recover."""
    from fastapi.testclient import TestClient

    from pladis.serve import create_app

    hooks = {"step": None}
    app = create_app(ServeConfig(engine=str(engine)), _hooked_runtime(engine, hooks))
    with TestClient(app) as client:
        worker = app.state.pladis.worker
        start, worker.start = worker.start, lambda: None

        def die_once():
            hooks["step"] = None
            raise _Die()

        hooks["step"] = die_once
        assert client.post("/v1/images/generations", json={"prompt": "x", "steps": 2}).status_code == 500
        wait_for(lambda: client.get("/healthz").status_code == 503, "readiness turns 503", 10)
        assert client.get("/healthz").json()["status"] == "worker down (restarting)"
        assert client.post("/v1/images/generations", json={"prompt": "x", "steps": 2}).status_code == 503
        assert client.get("/livez").status_code == 200
        worker.start = start
        wait_for(lambda: client.get("/healthz").status_code == 200, "the supervisor restarts the worker", 10)
        assert client.post("/v1/images/generations", json={"prompt": "x", "steps": 2}).status_code == 200


def test_liveness_is_503_while_a_batch_hangs(engine, monkeypatch):
    from fastapi.testclient import TestClient

    from pladis.serve import app as app_module

    monkeypatch.setattr(app_module, "stall_limit_s", lambda cfg: 0.5)  # instead of 2 x timeout_s + 30 s
    hooks, started, release = {"step": None}, threading.Event(), threading.Event()
    app = app_module.create_app(ServeConfig(engine=str(engine)), _hooked_runtime(engine, hooks))
    with TestClient(app) as client, concurrent.futures.ThreadPoolExecutor(1) as pool:
        assert client.get("/livez").status_code == 200
        hooks["step"] = lambda: (started.set(), release.wait(30))
        answer = pool.submit(client.post, "/v1/images/generations", json={"prompt": "x", "steps": 2})
        assert started.wait(30)
        wait_for(lambda: client.get("/livez").status_code == 503, "liveness turns 503", 10)
        assert client.get("/healthz").json()["status"] == "stalled"
        hooks["step"] = None
        release.set()
        assert answer.result(timeout=30).status_code == 200
        assert client.get("/livez").status_code == 200 and client.get("/healthz").status_code == 200


def test_queue_full_is_429_and_the_sdk_rate_limit_error(server, gate):
    openai = pytest.importorskip("openai")
    started, release = gate
    with concurrent.futures.ThreadPoolExecutor(9) as pool:
        running = pool.submit(post, server, seed=1)
        assert started.wait(30)
        queued = [pool.submit(post, server, seed=10 + i) for i in range(8)]
        wait_for(lambda: health(server)["queue_depth"] == 8, "8 requests queued")
        r = post(server)
        assert r.status_code == 429 and r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "queue_full"
        with pytest.raises(openai.RateLimitError):
            openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0).images.generate(prompt="x")
        release.set()
        assert [f.result().status_code for f in [running, *queued]] == [200] * 9


def test_requests_with_different_lam_share_a_batch_and_equal_their_solo_images(server, engine, gate):
    started, release = gate
    before = _batch_sizes(server)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        running = pool.submit(post, server, seed=1)
        assert started.wait(30)  # the worker is busy: the next two requests wait in the queue together
        a, b = pool.submit(post, server, seed=21, lam=0.0), pool.submit(post, server, seed=22, lam=3.0)
        wait_for(lambda: health(server)["queue_depth"] == 2, "2 requests queued")
        release.set()
        results = [f.result() for f in (running, a, b)]
    assert [r.status_code for r in results] == [200] * 3
    assert _batch_sizes(server).get("2.0", 0) > before.get("2.0", 0)  # the lam 0 and lam 3 requests: one batch
    rt = Runtime(engine, "ort")
    for r, seed, lam in ((results[1], 21, 0.0), (results[2], 22, 3.0)):
        alone = np.asarray(rt.generate("a red cube", steps=2, seed=seed, lam=lam, progress=False).images[0], float)
        # same seed and lam; only BLAS blocking differs with the batch size: one uint8 step at most
        assert np.abs(decode(r.json()["data"][0]).astype(float) - alone).max() <= 1
    solo = [np.asarray(rt.generate("a red cube", steps=2, seed=22, lam=x, progress=False).images[0], float)
            for x in (0.0, 3.0)]  # fmt: skip
    assert np.abs(solo[0] - solo[1]).max() > 1  # lam reaches the image: the test can tell the two apart


def _batch_sizes(url) -> dict[str, float]:
    """Cumulative ``pladis_batch_size`` histogram buckets by upper bound."""
    out = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        m = re.match(r'pladis_batch_size_bucket\{le="([\d.]+)"\} (\S+)', line)
        if m:
            out[m[1]] = float(m[2])
    return {k: v - out.get(str(float(k) - 1.0), 0.0) for k, v in out.items()}


def test_client_disconnect_drops_the_request_and_is_counted(server, gate):
    started, release = gate
    host, port = server.removeprefix("http://").split(":")
    before = counts(server)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(post, server, seed=1)
        assert started.wait(30)
        body = b'{"prompt": "abandoned", "steps": 2}'
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(
                f"POST /v1/images/generations HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            wait_for(lambda: health(server)["queue_depth"] == 1, "the request is queued")
        wait_for(lambda: counts(server).get("499", 0) == before.get("499", 0) + 1, "the disconnect is seen", 10)
        assert health(server)["queue_depth"] == 0  # dropped, not left for the worker
        release.set()
        assert running.result().status_code == 200
    after = counts(server)
    assert after["pladis_images_total"] == before["pladis_images_total"] + 1  # the abandoned one never ran
    assert after.get("200", 0) == before.get("200", 0) + 1


def test_engine_folder_moved_mid_request(server, served, gate):
    started, release = gate
    moved = served.with_name(served.name + "-moved")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(post, server, seed=1)
        assert started.wait(30)
        served.rename(moved)
        try:
            release.set()
            assert running.result().status_code == 200
            for scheduler in ("euler_a", "ddim", "dpmpp_2m"):  # each builds a scheduler from the folder's config
                r = post(server, scheduler=scheduler)
                assert r.status_code == 200, r.text
            assert health(server)["status"] == "ready"
        finally:
            moved.rename(served)


# -- load --------------------------------------------------------------------------------------------------


def test_load_batching_and_no_5xx(server):
    """100 requests, 16 at a time, capped at 120 s: every answer an image or a 429, zero 5xx, batches > 1."""
    statuses, latencies = [], []
    deadline = time.monotonic() + 120

    def one(i):
        if time.monotonic() > deadline:
            return None
        t0 = time.monotonic()
        r = post(server, seed=i)
        latencies.append(time.monotonic() - t0)
        if r.status_code == 200:
            assert decode(r.json()["data"][0]).shape == (32, 32, 3)
        return r.status_code

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        statuses = [s for s in pool.map(one, range(100)) if s is not None]
    elapsed = time.monotonic() - t0
    assert statuses and set(statuses) <= {200, 429}, sorted(set(statuses))
    assert health(server)["status"] == "ready"
    metrics = httpx.get(f"{server}/metrics").text
    batched = [line for line in metrics.splitlines() if line.startswith('pladis_batch_size_bucket{le="1.0"}')]
    total = [line for line in metrics.splitlines() if line.startswith("pladis_batch_size_count")]
    assert float(batched[0].split()[-1]) < float(total[0].split()[-1])  # some batches held more than one image
    ok = statuses.count(200)
    print(f"load: {len(statuses)} requests, {ok} ok, {statuses.count(429)} x 429, {ok / elapsed:.1f} img/s, "
          f"p50 {np.percentile(latencies, 50):.2f} s, p95 {np.percentile(latencies, 95):.2f} s")  # fmt: skip


def test_batched_images_equal_unbatched(engine):
    rt = Runtime(engine, "ort")
    batch = rt.generate(["a cat", "a dog"], steps=2, seed=[3, 11], progress=False).images
    alone = [rt.generate(p, steps=2, seed=s, progress=False).images[0] for p, s in (("a cat", 3), ("a dog", 11))]
    for b, a in zip(batch, alone, strict=True):
        # same seeds, same maths; only BLAS blocking differs with the batch size: one uint8 step at most
        assert np.abs(np.asarray(b, float) - np.asarray(a, float)).max() <= 1


# -- options, start-up, shutdown ----------------------------------------------------------------------------


@pytest.mark.parametrize("changes, flag", [
    (dict(port=70000), "--port"),  # (listened on 70000 % 65536)
    (dict(port=-1), "--port"),
    (dict(max_queue=-1), "--max-queue"),  # (answered everything 429)
    (dict(max_queue=0), "--max-queue"),
    (dict(timeout_s=float("nan")), "--timeout-s"),
    (dict(header_timeout_s=0), "--header-timeout-s"),
    (dict(body_timeout_s=-1), "--body-timeout-s"),
    (dict(shutdown_s=float("inf")), "--shutdown-s"),
    (dict(max_body_bytes=10), "--max-body-bytes"),
    (dict(api_key="a", api_key_file="f"), "--api-key-file"),
    (dict(api_key_file="/nonexistent/key"), "--api-key-file"),
])  # fmt: skip
def test_options_are_checked(changes, flag):
    with pytest.raises(ValueError, match=flag):
        validate(ServeConfig(**changes))


def test_api_key_from_env_or_file(monkeypatch, tmp_path):
    monkeypatch.setenv("PLADIS_API_KEY", "from-env")
    assert api_key(ServeConfig()) == "from-env"
    (tmp_path / "key").write_text("from-file\n")
    assert api_key(ServeConfig(api_key_file=str(tmp_path / "key"))) == "from-file"
    (tmp_path / "empty").write_text("")
    with pytest.raises(ValueError, match="empty"):
        api_key(ServeConfig(api_key_file=str(tmp_path / "empty")))


def test_busy_port_fails_before_any_engine_loads(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(ValueError, match="in use"):  # an engine folder that does not exist is never opened
            serve(ServeConfig(engine=str(tmp_path / "missing"), port=port))
    assert time.monotonic() - t0 < 30  # generous: it fails at bind(), long before any engine would load


def test_package_imports_without_the_serve_extra():
    """`pladis serve --help` needs ServeConfig only: no FastAPI, uvicorn or httpx at import; config.py is stdlib."""
    code = ("import sys, pladis.serve; from pladis.serve import ServeConfig; "
            "print([m for m in ('fastapi', 'uvicorn', 'httpx', 'starlette') if m in sys.modules])")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    import pladis.serve.config as config

    tree = ast.parse(Path(config.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    light = {"__future__", "pladis.errors", "pladis.options"}  # pladis's own light modules: stdlib imports only
    assert imported <= set(sys.stdlib_module_names) | light, imported
    assert all(f.metadata.get("help") for f in __import__("dataclasses").fields(ServeConfig))  # the CLI's help


class _Conn:
    """A uvicorn connection as the sweeper sees it: ``cycle`` (the request in progress) and a transport."""

    def __init__(self, busy: bool):
        self.cycle = types.SimpleNamespace(response_complete=False) if busy else None
        self.transport, self.closed = self, False

    def is_closing(self):
        return self.closed

    def close(self):
        self.closed = True


def test_sweeper_limits_connections_and_bounds_shutdown():
    """The sweeper's rules on a fake clock: idle/slow-header limit, a request that holds its connection too
    long (a client that never reads its answer), and the shutdown sequence."""
    from pladis.serve.server import request_limit_s, sweep_once

    cfg = ServeConfig(header_timeout_s=2, body_timeout_s=5, timeout_s=10, shutdown_s=3)
    idle, busy, renewed = _Conn(False), _Conn(True), _Conn(True)
    calls = []
    server = types.SimpleNamespace(
        should_exit=False, server_state=types.SimpleNamespace(connections={idle, busy, renewed})
    )
    app = types.SimpleNamespace(state=types.SimpleNamespace(drain=lambda: calls.append("drain"),
                                                            abort=lambda: calls.append("abort"),
                                                            idle=lambda: False))  # fmt: skip
    memo = {"idle": {}, "busy": {}, "shutdown_at": None}
    limit = request_limit_s(cfg)
    for now in (0.0, 1.9, 2.1, limit - 0.1, limit + 0.1):
        renewed.cycle = types.SimpleNamespace(response_complete=False)  # a keep-alive client's next request
        sweep_once(server, app, cfg, memo, now)
        if now == 1.9:
            assert not idle.closed
        if now == 2.1:
            assert idle.closed and not busy.closed
    assert busy.closed and not renewed.closed and calls == []
    late, fresh = _Conn(True), _Conn(False)
    server.server_state.connections = {late, fresh}
    server.should_exit, t0 = True, 1000.0
    sweep_once(server, app, cfg, memo, t0)
    assert calls == ["drain"] and fresh.closed and not late.closed  # queue drained, no new request accepted
    sweep_once(server, app, cfg, memo, t0 + 3.0)
    assert calls == ["drain", "abort"] and not late.closed  # the running batch is stopped at shutdown_s
    sweep_once(server, app, cfg, memo, t0 + 4.1)
    assert late.closed  # and a connection still open a second later is closed


def _raw(port: int, data: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=15)
    sock.sendall(data)
    return sock


def test_slow_clients_time_out_and_sigterm_exits_within_the_shutdown_limit(engine, tmp_path):
    """A separate `pladis serve` process: slow headers and a slow body are cut off; SIGTERM with a running
    heavy request, a queued one and a stalled client exits within shutdown_s (the old server never did)."""
    port, shutdown_s = _free_port(), 3.0
    code = (
        f"from pladis.serve import ServeConfig, serve; serve(ServeConfig(engine={str(engine)!r}, port={port}, "
        f"max_steps=50, header_timeout_s=2, body_timeout_s=2, keep_alive_s=1, shutdown_s={shutdown_s}))"
    )
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    pool = concurrent.futures.ThreadPoolExecutor(2)
    try:

        def up():
            try:
                return httpx.get(f"{url}/healthz").status_code == 200
            except httpx.TransportError:
                return proc.poll() is not None

        wait_for(up, "the server starts", 180)
        assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
        assert f"listening on http://127.0.0.1:{port}" in (tmp_path / "server.log").read_text()  # (it never said)
        head = "POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        slow_headers = _raw(port, head.encode())  # and nothing more
        slow_body = _raw(port, (head + 'Content-Length: 100\r\n\r\n{"prompt": ').encode())
        assert slow_body.recv(4096).startswith(b"HTTP/1.1 408")  # recv times out (15 s) if never answered
        assert slow_headers.recv(4096) == b""  # closed by the server after header_timeout_s (2 s)
        running = pool.submit(lambda: httpx.post(f"{url}/v1/images/generations", json=HEAVY, timeout=60))
        wait_for(lambda: health(url)["running"] == 1, "the heavy request runs")
        queued = pool.submit(lambda: httpx.post(f"{url}/v1/images/generations", json={"prompt": "x", "steps": 2},
                                                timeout=60))  # fmt: skip
        wait_for(lambda: health(url)["queue_depth"] == 1, "a request is queued")
        stalled = _raw(port, (head + "Content-Length: 100\r\n\r\n{").encode())
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)

        def shutting_down():  # the port still answers while the running batch may finish (was: refused)
            try:
                r = httpx.get(f"{url}/healthz", timeout=2)
                return r.status_code == 503 and r.json()["status"] == "shutting down"
            except httpx.TransportError:
                return False

        wait_for(shutting_down, "/healthz answers 503 in the shutdown window", shutdown_s - 1)
        proc.wait(timeout=shutdown_s + 30)  # raises if the server hangs (the old one waited forever)
        exited = time.monotonic() - t0
        assert queued.result().status_code == 503  # queued work is rejected at once
        assert running.result().status_code in (200, 503)  # finished, or stopped at the shutdown limit
        assert exited < shutdown_s + 8, exited  # limit + uvicorn's 1 s + sweep period + a loaded CI machine
        print(f"SIGTERM with a running batch, a queued request and a stalled client: exit after {exited:.1f} s")
        for sock in (slow_headers, slow_body, stalled):
            sock.close()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


# -- Ray Serve -------------------------------------------------------------------------------------------


def _ray_or_skip():
    try:
        import ray
    except ImportError:
        pytest.skip("Ray is not installed (install the `serve` extra)")
    try:
        ray.init(num_cpus=4, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    except Exception as err:  # noqa: BLE001 - any reason Ray cannot start here is a skip reason
        pytest.skip(f"Ray cannot start on this machine: {err}")
    return ray


@pytest.mark.slow
def test_ray_serve_two_replicas(engine):
    ray = _ray_or_skip()
    from ray import serve as ray_serve_api

    from pladis.serve import ray_serve

    cfg = ServeConfig(engine=str(engine), port=_free_port(), replicas=2)
    try:
        ray_serve.start(cfg)
        url = f"http://127.0.0.1:{cfg.port}"
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda s: httpx.post(f"{url}/v1/images/generations", timeout=60,
                                                         json={"prompt": "a red cube", "steps": 2, "seed": s}),
                                    range(8)))  # fmt: skip
        assert [r.status_code for r in answers] == [200] * 8, [r.text for r in answers if r.status_code != 200]
        rt = Runtime(engine, "ort")
        alone = rt.generate("a red cube", steps=2, seed=5, progress=False).images[0]
        assert np.array_equal(decode(answers[5].json()["data"][0]), np.asarray(alone))  # same image as one process
        status = ray_serve_api.status().applications["pladis"].deployments["pladis"]
        assert sum(status.replica_states.values()) == 2
    finally:
        ray_serve_api.shutdown()
        ray.shutdown()
