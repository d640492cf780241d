"""pladis.serve: an image server on the engines (FastAPI + uvicorn), and scale-out on Ray Serve.

``serve(ServeConfig(engine=...))`` runs the HTTP server (127.0.0.1 by default); ``create_app`` builds the
FastAPI app; ``worker`` holds the bounded queue and the batching GPU worker; ``ray_serve`` deploys the
same app as Ray Serve replicas.
"""

from pladis.serve.app import ImageRequest, ServeConfig, create_app


def serve(cfg: ServeConfig) -> None:
    """Run the server until interrupted (Ray Serve when ``cfg.ray``)."""
    if cfg.ray:
        from pladis.serve.ray_serve import run

        run(cfg)
        return
    import uvicorn

    uvicorn.run(create_app(cfg), host=cfg.host, port=cfg.port, log_level="info")


def run_in_thread(cfg: ServeConfig, ready_timeout: float = 120.0):
    """Start the server on ``cfg.host:cfg.port`` (``port=0``: a free one) in a background thread and wait
    until ``/healthz`` says ready (tests, benchmarks). Returns (base url, stop), stop() shuts it down."""
    import socket
    import threading
    import time

    import httpx
    import uvicorn

    if cfg.port == 0:
        with socket.socket() as sock:
            sock.bind((cfg.host, 0))
            cfg.port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(cfg), host=cfg.host, port=cfg.port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://{cfg.host}:{cfg.port}"

    def stop():
        server.should_exit = True
        thread.join(30)

    ready_by = time.monotonic() + ready_timeout
    while time.monotonic() < ready_by:  # healthz is 503 until the engines are loaded and warmed up
        try:
            if httpx.get(f"{url}/healthz").status_code == 200:
                return url, stop
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    stop()
    raise RuntimeError(f"the server did not become ready within {ready_timeout:.0f} s")


__all__ = ["ImageRequest", "ServeConfig", "create_app", "run_in_thread", "serve"]
