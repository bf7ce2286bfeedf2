"""The same server as a Ray Serve application (`lorahub-plus serve --ray [ADDRESS]`): each replica holds the
library and its base model and runs the app of `app.create_app`; Serve spreads requests across them.

Ray is an optional dependency (`pip install "lorahub-plus[ray]"`). Against a cluster, every node must see
the library folder at the same path (a shared file system), and the package must be installed there.
"""
from __future__ import annotations

from pathlib import Path


def build_app(library: str | None, base_model: str | None, api_key: str | None, max_batch: int):
    """The FastAPI app one replica serves (evaluated on the replica, so the model loads there)."""
    from lorahub_plus.hub import Hub
    from lorahub_plus.serving.app import create_app

    return create_app(Hub(library, base_model), api_key, max_batch)


def application(library: str | None = None, base_model: str | None = None, api_key: str | None = None,
                max_batch: int = 16, replicas: int = 2, cpus_per_replica: float = 1.0):
    """A Serve application of `replicas` copies of the server (bind it and `serve.run` it)."""
    from ray import serve

    library = None if library is None else str(library)

    def builder():  # Serve calls a builder function on each replica (a partial would pass for an ASGI app)
        return build_app(library, base_model, api_key, max_batch)

    ingress = serve.ingress(builder)
    deployment = serve.deployment(name="lorahub-plus", num_replicas=replicas,
                                  ray_actor_options={"num_cpus": cpus_per_replica})
    return deployment(ingress(type("LorahubPlus", (), {"__doc__": "one replica of the server"}))).bind()


def serve_on_ray(address: str | None = None, library=None, host: str = "127.0.0.1", port: int = 8000,
                 api_key: str | None = None, base_model: str | None = None, max_batch: int = 16,
                 replicas: int = 2, cpus_per_replica: float = 1.0, blocking: bool = True):
    """Start (or join, given `address`: `ray://host:10001` or `auto`) a Ray instance and serve there."""
    import ray
    from ray import serve

    from lorahub_plus.errors import LoraHubPlusError

    if not ray.is_initialized():
        ray.init(address=address, ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
    if library is not None and address is None:
        library = str(Path(library).resolve())  # replicas start in another folder
    try:
        serve.start(http_options={"host": host, "port": port})
        return serve.run(application(library, base_model, api_key, max_batch, replicas, cpus_per_replica),
                         name="lorahub-plus", route_prefix="/", blocking=blocking)
    except RuntimeError as e:
        raise LoraHubPlusError(f"Ray Serve could not start the server: {e}") from e
