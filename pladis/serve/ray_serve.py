"""Scale-out: the same FastAPI app as a Ray Serve deployment, one replica per GPU.

On a multi-node Ray cluster: start Ray on every node (``ray start --head`` on one, ``ray start
--address=HEAD:6379`` on the others), put the engine folder where every node can read it (shared storage
or the same path), then run ``pladis serve --ray --engine DIR --replicas N --num-gpus 1 [--max-replicas M]``
on the head with ``RAY_ADDRESS=auto``. Ray Serve places the replicas, routes requests across them and
autoscales between ``replicas`` and ``max_replicas``; each replica runs the app's own queue and batching.
"""

from __future__ import annotations

import dataclasses
import os

from pladis.serve.app import create_app
from pladis.serve.config import ServeConfig, api_key


def deployment(cfg: ServeConfig):
    """The bound Ray Serve application for ``cfg`` (not yet running)."""
    from ray import serve

    options: dict = {"ray_actor_options": {"num_gpus": cfg.num_gpus}, "max_ongoing_requests": max(cfg.max_queue, 1)}
    if cfg.max_replicas > cfg.replicas:
        options["autoscaling_config"] = {"min_replicas": cfg.replicas, "max_replicas": cfg.max_replicas,
                                         "target_ongoing_requests": 4}  # fmt: skip
    else:
        options["num_replicas"] = cfg.replicas
    # the key is resolved here: replicas may not see this process's environment or files
    settings = dataclasses.asdict(cfg) | {"ray": False, "api_key": api_key(cfg), "api_key_file": ""}

    @serve.deployment(name="pladis", **options)
    @serve.ingress(create_app(ServeConfig(**settings)))
    class PladisServer:
        """Each replica runs the FastAPI app (its lifespan loads and warms up the engines)."""

    return PladisServer.bind()


def start(cfg: ServeConfig, blocking: bool = False):
    """Start Ray (or join ``RAY_ADDRESS``) and Ray Serve's HTTP proxy on ``cfg.host:cfg.port``; deploy."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, ignore_reinit_error=True)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    return serve.run(deployment(cfg), name="pladis", route_prefix="/", blocking=blocking)


def serve_with_ray(cfg: ServeConfig) -> None:
    """``pladis serve --ray``: deploy and block until interrupted."""
    start(cfg, blocking=True)
