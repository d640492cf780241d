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


__all__ = ["ImageRequest", "ServeConfig", "create_app", "serve"]
