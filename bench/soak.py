"""``python -m pladis.bench.soak [--minutes 2]``: a bounded soak of ``pladis serve`` (not CI).

A server process (tiny-sdxl ORT engine, a short deadline, an API key) takes N minutes of mixed traffic from
client threads on 127.0.0.1: valid requests, heavy requests that miss the deadline, invalid bodies (odd
JSON, NaN, lone surrogates, unknown fields, oversize chunked bodies, wrong content type, no key), clients
that go away mid-request, and slow clients (headers or body trickled, then abandoned). It records each
kind's status counts, the server's own /metrics counts, its RSS after warm-up, at the end and at its peak,
that /healthz is 200 afterwards, and how long SIGTERM takes; a 5xx other than the deadline's 504 is
"unexplained". Results: ``bench/results/soak.json``; ``python -m pladis.bench.report`` adds them to
``docs/PERFORMANCE.md``.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

KEY = "soak-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
EXPECTED = {  # kind -> statuses that are the documented answer to it ("closed": the server hung up)
    "valid": {200, 429, 504},
    "heavy": {200, 429, 504},
    "invalid": {400, 413, 415},
    "no_key": {401},
    "cancelled": {"gone"},
    "slow_headers": {"closed"},
    "slow_body": {408, "closed"},
}
WEIGHTS = {"valid": 50, "heavy": 5, "invalid": 25, "no_key": 5, "cancelled": 8, "slow_headers": 3, "slow_body": 4}
INVALID = [  # raw bodies (content type, bytes)
    ("application/json", b'{"prompt": "x", "guidance": NaN}'),
    ("application/json", b'{"prompt": "\\ud800"}'),
    ("application/json", b'{"prompt": "x", "n": 1e400}'),
    ("application/json", b'{"prompt": "x", "size": "' + b"9" * 5000 + b'x32"}'),
    ("application/json", b'{"prompt": "x", "colour": "red"}'),
    ("application/json", b'{"prompt": "x", "size": "1024x1024"}'),
    ("application/json", b'{"prompt": "x"'),
    ("application/json", b"[" * 30000 + b"]" * 30000),
    ("application/json", b'{"prompt": "' + b"a" * 200_000 + b'"}'),  # over the 64 KiB body limit
    ("text/plain", b"prompt=x"),
]


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", text)[1]) / 1024


def server_counts(url: str) -> dict[str, float]:
    import httpx

    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        m = re.match(r'pladis_requests_total\{status="(\w+)"\} (\S+)', line)
        if m:
            out[m[1]] = float(m[2])
        elif line.startswith(("pladis_images_total ", "pladis_worker_restarts_total ")):
            out[line.split()[0]] = float(line.split()[1])
    return out


def one(kind: str, url: str, port: int, rng: random.Random):
    """Send one request of ``kind``; its status (an int, or "gone"/"closed"/"error:...")."""
    import httpx

    endpoint = f"{url}/v1/images/generations"
    if kind == "valid":
        return httpx.post(endpoint, json={"prompt": "a red cube", "steps": 2, "seed": rng.randrange(1000)},
                          headers=AUTH, timeout=60).status_code  # fmt: skip
    if kind == "heavy":
        return httpx.post(endpoint, json={"prompt": "heavy", "n": 2, "steps": 30, "size": "64x64"}, headers=AUTH,
                          timeout=60).status_code  # fmt: skip
    if kind == "invalid":
        ctype, body = rng.choice(INVALID)
        return httpx.post(endpoint, content=body, headers={**AUTH, "content-type": ctype}, timeout=60).status_code
    if kind == "no_key":
        return httpx.post(endpoint, json={"prompt": "x"}, timeout=60).status_code
    head = f"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
    head += "Content-Type: application/json\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        if kind == "cancelled":  # a whole request, then the client goes away before the answer
            body = b'{"prompt": "abandoned", "steps": 2}'
            sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
            time.sleep(rng.uniform(0.0, 0.5))
            return "gone"
        if kind == "slow_headers":  # the request line and part of the headers, then silence
            sock.sendall(head.encode())
        else:  # slow_body: the headers, a trickle of the body, then silence
            sock.sendall(f"{head}Content-Length: 200\r\n\r\n".encode())
            sock.sendall(b'{"prompt": ')
        answer = sock.recv(4096)
        return int(answer.split()[1]) if answer.startswith(b"HTTP/1.1") else "closed"


def soak(minutes: float, concurrency: int, engine: str) -> dict:
    import httpx

    port = _free_port()
    settings = dict(engine=engine, port=port, max_queue=16, max_steps=50, timeout_s=5.0, header_timeout_s=3.0,
                    body_timeout_s=3.0, shutdown_s=5.0)  # fmt: skip
    code = f"from pladis.serve import ServeConfig, serve; serve(ServeConfig(**{settings!r}))"
    env = {**os.environ, "PLADIS_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc)
        rss_before = rss_mib(proc.pid)
        statuses: dict[str, collections.Counter] = {k: collections.Counter() for k in WEIGHTS}
        lock, end = threading.Lock(), time.monotonic() + minutes * 60

        def client(i: int):
            rng = random.Random(i)
            while time.monotonic() < end:
                kind = rng.choices(list(WEIGHTS), weights=list(WEIGHTS.values()))[0]
                try:
                    status = one(kind, url, port, rng)
                except (OSError, httpx.HTTPError) as err:
                    status = f"error:{type(err).__name__}"
                with lock:
                    statuses[kind][status] += 1

        threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        timeline = []  # (seconds, server RSS MiB) every 30 s: does memory level off?
        while any(t.is_alive() for t in threads):
            threads[0].join(1.0)
            if time.monotonic() - t0 >= 30 * (len(timeline) + 1):
                timeline.append((round(time.monotonic() - t0), round(rss_mib(proc.pid), 1)))
        for t in threads:
            t.join()
        elapsed = time.monotonic() - t0
        time.sleep(1.0)  # let the last disconnects be counted
        healthy = httpx.get(f"{url}/healthz", timeout=10).status_code == 200
        counts = server_counts(url)
        rss_after, rss_peak = rss_mib(proc.pid), rss_mib(proc.pid, "VmHWM")
        t1 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        exit_code = proc.wait(timeout=60)
        sigterm_s = time.monotonic() - t1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    by_kind = {k: {str(s): n for s, n in sorted(c.items(), key=str)} for k, c in statuses.items()}
    unexpected = {k: {str(s): n for s, n in c.items() if s not in EXPECTED[k]} for k, c in statuses.items()}
    five_xx = {s: n for s, n in counts.items() if s.isdigit() and int(s) >= 500}
    return {
        "minutes": minutes, "concurrency": concurrency,
        "settings": {k: v for k, v in settings.items() if k not in ("port", "engine")},
        "seconds": round(elapsed, 1), "requests": sum(sum(c.values()) for c in statuses.values()),
        "by_kind": by_kind, "unexpected": {k: v for k, v in unexpected.items() if v},
        "server_counts": counts, "server_5xx": five_xx,
        "unexplained_5xx": sum(n for s, n in five_xx.items() if s != "504"),
        "rss_mib": {"after_warmup": round(rss_before, 1), "after_soak": round(rss_after, 1),
                    "peak": round(rss_peak, 1), "every_30_s": timeline},
        "healthy_after": healthy, "sigterm_exit_s": round(sigterm_s, 2), "exit_code": exit_code,
    }  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc, limit_s: float = 300) -> None:
    import httpx

    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server was not ready within {limit_s:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--engine", default="", help="engine folder (default: export tiny-sdxl to a temp folder)")
    from pladis.bench import harness

    harness.add_out_argument(parser)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        engine = args.engine
        if not engine:
            from pladis.export import ExportConfig, export

            engine = f"{tmp}/tiny-sdxl"
            export(ExportConfig(model="tiny-sdxl", out=engine, validate=False))
        result = soak(args.minutes, args.concurrency, engine)
    result["engine"] = "tiny-sdxl (ORT, exported fresh)" if not args.engine else args.engine
    command = f"python -m pladis.bench.soak --minutes {args.minutes:g} --concurrency {args.concurrency}"
    path = harness.save("soak", {"command": command, "results": {"soak": result}}, args.out)
    print(f"{result['requests']} requests in {result['seconds']} s; unexplained 5xx: {result['unexplained_5xx']}; "
          f"unexpected: {result['unexpected'] or 'none'}; RSS {result['rss_mib']}; healthy after: "
          f"{result['healthy_after']}; SIGTERM exit {result['sigterm_exit_s']} s; wrote {path}")  # fmt: skip
    return 0 if result["unexplained_5xx"] == 0 and not result["unexpected"] and result["healthy_after"] else 1


if __name__ == "__main__":
    sys.exit(main())
