"""Running the app under uvicorn: the port bound before any engine loads, connection timeouts, and a bounded
graceful shutdown.

uvicorn closes idle keep-alive connections (``keep_alive_s``) but has no limit for a client that sends its
headers slowly, and by default waits forever for open connections on shutdown. A sweeper task next to the
server closes every connection that has had no request in progress for ``header_timeout_s`` (new, idle, or
still sending headers) or has held one request past ``request_limit_s`` (a client that does not read its
answer), and on shutdown (SIGTERM, SIGINT): drains the queue at once (503) while the port keeps answering
(``/healthz`` 503, new work 503) as long as the running batch goes on, up to ``shutdown_s``; then stops it
(503), closes the listener and what is still open, so the process exits within about ``shutdown_s`` + 2 s
whatever its clients do. With no batch running it exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time

from pladis.errors import PladisError
from pladis.serve.config import ServeConfig, validate

SWEEP_S = 0.25


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (port 0: a free one), or PladisError saying why not."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]  # fmt: skip
    except socket.gaierror as err:
        raise PladisError(f"--host {host!r} cannot be resolved ({err.strerror}); give an address like 127.0.0.1") \
            from None  # fmt: skip
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart at once after a stop (TIME_WAIT)
    try:
        sock.bind(addr)
    except OSError as err:
        sock.close()
        raise PladisError(f"cannot listen on {host}:{port} ({err.strerror}): the port is in use or not allowed; "
                         "pick another --port or stop the other server") from None  # fmt: skip
    return sock


def uvicorn_server(app, cfg: ServeConfig, log_level: str = "info"):
    """A uvicorn server for ``app`` whose first SIGTERM/SIGINT sets ``stopping`` instead of stopping uvicorn
    at once: ``sweep_once`` then drains, keeps the port answering 503 while the running batch finishes (up to
    ``shutdown_s``) and only then lets uvicorn shut down (``should_exit``). A second signal is uvicorn's."""
    import uvicorn

    class Server(uvicorn.Server):
        stopping = False

        def handle_exit(self, sig, frame):
            first = not (self.stopping or self.should_exit)
            super().handle_exit(sig, frame)  # records the signal, re-raised at exit (the exit status is its)
            if first:
                self.should_exit, self.stopping = False, True

    config = uvicorn.Config(app, log_level=log_level, timeout_keep_alive=cfg.keep_alive_s,
                            timeout_graceful_shutdown=cfg.shutdown_s + 1.0)  # fmt: skip
    return Server(config)


def address(sock: socket.socket) -> str:
    """The URL a bound socket listens on."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def request_limit_s(cfg: ServeConfig) -> float:
    """Longest a request may hold its connection: its body, its deadline, as long again as the body for a
    client to take the answer, and 30 s for one last slow step. Past it the client is not reading: closed."""
    return cfg.body_timeout_s * 2 + cfg.timeout_s + 30


async def sweep(server, app, cfg: ServeConfig) -> None:
    """Every ``SWEEP_S``: ``sweep_once`` (connection limits, bounded shutdown)."""
    memo: dict = {"idle": {}, "busy": {}, "shutdown_at": None}
    while True:
        await asyncio.sleep(SWEEP_S)
        sweep_once(server, app, cfg, memo, time.monotonic())


def sweep_once(server, app, cfg: ServeConfig, memo: dict, now: float) -> None:
    """Close connections idle past ``header_timeout_s`` or holding one request past ``request_limit_s``; once
    a shutdown begins (``server.stopping``, or uvicorn's ``should_exit``): drain at once; when no batch runs
    or ``shutdown_s`` passed (the running batch is then aborted), set ``should_exit`` so uvicorn stops
    listening and closes idle connections; close every connection still open a second after the limit.
    ``memo`` carries what was seen before:
    idle: connection -> since when it has had no request in progress; busy: connection -> (its request,
    since when); shutdown_at."""
    idle, busy = memo["idle"], memo["busy"]
    if (server.should_exit or getattr(server, "stopping", False)) and memo["shutdown_at"] is None:
        memo["shutdown_at"] = now
        app.state.drain()
    shutdown_at = memo["shutdown_at"]
    late = shutdown_at is not None and now - shutdown_at >= cfg.shutdown_s
    if late:
        app.state.abort()
    if shutdown_at is not None and not server.should_exit and (late or app.state.idle()):
        server.should_exit = True  # nothing left to wait for: uvicorn closes the listener and shuts down
    connections = list(server.server_state.connections)
    for conn in connections:
        cycle = getattr(conn, "cycle", None)
        if cycle is not None and not cycle.response_complete:  # a request in progress
            idle.pop(conn, None)
            if busy.get(conn, (None,))[0] is not cycle:
                busy[conn] = (cycle, now)
            close = now - busy[conn][1] > request_limit_s(cfg) or (
                late and now - shutdown_at >= cfg.shutdown_s + 1.0  # still open past the shutdown limit
            )
        else:  # new, idle, or sending its headers
            busy.pop(conn, None)
            close = server.should_exit or now - idle.setdefault(conn, now) > cfg.header_timeout_s
        transport = getattr(conn, "transport", None)
        if close and transport is not None and not transport.is_closing():
            transport.close()
    for gone in set(idle) - set(connections):
        del idle[gone]
    for gone in set(busy) - set(connections):
        del busy[gone]


async def serve_with_sweeper(server, sock: socket.socket, app, cfg: ServeConfig) -> None:
    sweeper = asyncio.create_task(sweep(server, app, cfg))
    try:
        await server.serve(sockets=[sock])
    finally:
        sweeper.cancel()


def serve(cfg: ServeConfig) -> None:
    """Run the server until SIGINT/SIGTERM (Ray Serve when ``cfg.ray``). Options are checked and the port is
    bound before any engine loads; a bad option, busy port or bad engine folder is a PladisError."""
    validate(cfg)
    if cfg.ray:
        from pladis.serve.ray_serve import serve_with_ray

        serve_with_ray(cfg)
        return
    sock = bind(cfg.host, cfg.port)
    try:
        from pladis.runtime import Runtime
        from pladis.serve.app import create_app

        runtime = Runtime(
            cfg.engine,
            cfg.backend or None,
            device=cfg.device,
            cuda_graphs=cfg.cuda_graphs,
            graph_cache_size=cfg.graph_cache_size,
        )  # EngineError is a PladisError
        app = create_app(cfg, runtime)
        server = uvicorn_server(app, cfg)  # configures uvicorn's loggers: the line below shows at its level
        logging.getLogger("uvicorn.error").info("pladis serve: listening on %s (engine %s; /healthz is 503 until "
                                                "the engines are loaded)", address(sock), cfg.engine)  # fmt: skip
        asyncio.run(serve_with_sweeper(server, sock, app, cfg))
    finally:
        sock.close()


def run_in_thread(cfg: ServeConfig, runtime=None, ready_timeout: float = 120.0):
    """Start the server on ``cfg.host:cfg.port`` (``port=0``: a free one) in a background thread and wait
    until ``/healthz`` says ready (tests, benchmarks). Returns (base url, stop); stop() shuts it down as
    SIGTERM does and waits for the thread."""
    import httpx

    from pladis.serve.app import create_app

    validate(cfg)
    sock = bind(cfg.host, cfg.port)
    cfg.port = sock.getsockname()[1]
    app = create_app(cfg, runtime)
    server = uvicorn_server(app, cfg, log_level="warning")
    thread = threading.Thread(target=lambda: asyncio.run(serve_with_sweeper(server, sock, app, cfg)), daemon=True)
    thread.start()
    url = f"http://{cfg.host}:{cfg.port}"

    def stop():
        server.stopping = True
        thread.join(cfg.shutdown_s + 30)
        sock.close()

    ready_by = time.monotonic() + ready_timeout
    while time.monotonic() < ready_by and thread.is_alive():  # healthz is 503 until the engines are warmed up
        try:
            if httpx.get(f"{url}/healthz").status_code == 200:
                return url, stop
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    stop()
    raise RuntimeError(f"the server did not become ready within {ready_timeout:.0f} s")
