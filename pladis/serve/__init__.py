"""pladis.serve: an image server on the engines (FastAPI + uvicorn), and scale-out on Ray Serve.

``serve(ServeConfig(engine=...))`` runs the HTTP server (127.0.0.1 by default); ``create_app`` builds the
FastAPI app; ``worker`` holds the bounded queue and the batching engine worker; ``server`` runs uvicorn
with connection timeouts and a bounded shutdown; ``ray_serve`` deploys the same app as Ray Serve replicas.

Importing this package needs only the standard library (``ServeConfig`` lives in ``config``), so the CLI
works without the ``serve`` extra; the app and the server are imported when first used.
"""

from pladis.serve.config import ServeConfig


def serve(cfg: ServeConfig) -> None:
    """Run the server until SIGINT/SIGTERM (see ``pladis.serve.server.serve``)."""
    from pladis.serve.server import serve as run

    run(cfg)


def run_in_thread(cfg: ServeConfig, runtime=None, ready_timeout: float = 120.0):
    """A server in a background thread, ready; returns (base url, stop) (see ``pladis.serve.server``)."""
    from pladis.serve.server import run_in_thread as run

    return run(cfg, runtime, ready_timeout)


def __getattr__(name: str):
    if name in ("ImageRequest", "create_app"):
        from pladis.serve import app

        return getattr(app, name)
    raise AttributeError(f"module 'pladis.serve' has no attribute {name!r}")


__all__ = ["ImageRequest", "ServeConfig", "create_app", "run_in_thread", "serve"]
