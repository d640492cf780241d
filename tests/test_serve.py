"""The image server: API contract, bad requests, batching, load on 127.0.0.1 (tiny engine, ORT backend)."""

import base64
import concurrent.futures
import io
import socket
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from pladis.export import ExportConfig, export
from pladis.runtime import Runtime

from pladis.serve import ServeConfig, create_app, run_in_thread


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "tiny-sdxl"
    export(ExportConfig(model="tiny-sdxl", out=str(out), validate=False))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(engine):
    """A real uvicorn server on 127.0.0.1 in a thread, stopped (gracefully) after the module."""
    cfg = ServeConfig(engine=str(engine), port=0, max_queue=8, max_steps=8, batch_window_ms=50)
    url, stop = run_in_thread(cfg)
    yield url
    stop()


def post(url, **body):
    return httpx.post(f"{url}/v1/images/generations", json={"prompt": "a red cube", "steps": 2, **body}, timeout=60)


def decode(item) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))))


def test_valid_request_matches_generate_bit_for_bit(server, engine):
    r = post(server, seed=7, n=2)
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [d["seed"] for d in data] == [7, 8] and decode(data[0]).shape == (32, 32, 3)
    rt = Runtime(engine, "ort")
    for i, item in enumerate(data):  # each image alone, as `pladis generate --seed 7+i` makes it
        alone = rt.generate("a red cube", steps=2, seed=7 + i, progress=False).images[0]
        assert np.array_equal(decode(item), np.asarray(alone))  # atol=0: same engine, same seed


@pytest.mark.parametrize("body, field", [
    (dict(size="1024x1024"), "size"),
    (dict(size="33x32"), "size"),
    (dict(size="big"), "size"),
    (dict(steps=9), "steps"),
    (dict(steps=0), "steps"),
    (dict(n=5), "n"),
    (dict(n="two"), "n"),
    (dict(scheduler="heun"), "scheduler"),
    (dict(response_format="url"), "response_format"),
    (dict(lam=3.0), "lam"),
    (dict(colour="red"), "colour"),
    (dict(prompt=""), "prompt"),
    (dict(guidance=-1), "guidance"),
])  # fmt: skip
def test_bad_fields_get_4xx_naming_them(server, body, field):
    r = post(server, **body)
    assert 400 <= r.status_code < 500, r.text
    assert any(field in map(str, d["loc"]) for d in r.json()["detail"]), r.text


def test_oversize_body_and_health_and_metrics(server):
    r = httpx.post(f"{server}/v1/images/generations", content=b"{" + b" " * 70000 + b"}",
                   headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code == 413 and "body" in r.text
    assert httpx.get(f"{server}/healthz").json()["status"] == "ready"
    text = httpx.get(f"{server}/metrics").text
    assert "pladis_requests_total" in text and "pladis_queue_depth" in text


def test_load_batching_and_no_5xx(server):
    """200 requests, 16 at a time, capped at 120 s: every answer an image or a 429, zero 5xx, batches > 1."""
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
        statuses = [s for s in pool.map(one, range(200)) if s is not None]
    elapsed = time.monotonic() - t0
    assert statuses and set(statuses) <= {200, 429}, sorted(set(statuses))
    assert httpx.get(f"{server}/healthz").status_code == 200
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


def test_api_key_and_queue_full(engine):
    from fastapi.testclient import TestClient

    cfg = ServeConfig(engine=str(engine), api_key="s3cret", max_queue=0)
    with TestClient(create_app(cfg)) as client:
        assert client.post("/v1/images/generations", json={"prompt": "x"}).status_code == 401
        r = client.post("/v1/images/generations", json={"prompt": "x", "steps": 1},
                        headers={"Authorization": "Bearer s3cret"})  # fmt: skip
        assert r.status_code == 429 and r.headers["retry-after"] == "1"


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
    from ray import serve

    from pladis.serve import ray_serve

    cfg = ServeConfig(engine=str(engine), port=_free_port(), replicas=2)
    try:
        ray_serve.start(cfg)
        url = f"http://127.0.0.1:{cfg.port}"
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda s: post(url, seed=s), range(8)))
        assert [r.status_code for r in answers] == [200] * 8, [r.text for r in answers if r.status_code != 200]
        rt = Runtime(engine, "ort")
        alone = rt.generate("a red cube", steps=2, seed=5, progress=False).images[0]
        assert np.array_equal(decode(answers[5].json()["data"][0]), np.asarray(alone))  # same image as one process
        status = serve.status().applications["pladis"].deployments["pladis"]
        assert sum(status.replica_states.values()) == 2
    finally:
        serve.shutdown()
        ray.shutdown()
