"""Several ``atman serve`` replicas behind one address, with Ray Serve.

Each replica is a Ray actor that loads its models once and runs the same FastAPI app as ``atman serve``
(:func:`atman.server.create_app`), used as the deployment's ingress; Ray Serve's proxy spreads the
requests over the replicas. Every answer carries the header ``x-atman-replica`` (the replica's id), so
that one can see which replica answered.

From the shell (Ray's own ``serve run``, with this module's application builder)::

    serve run atman.distributed.serve:build replicas=2 models=smollm2 threads=1

From Python::

    >>> from ray import serve
    >>> serve.start(http_options={"host": "127.0.0.1", "port": 8000})  # doctest: +SKIP
    >>> serve.run(application(["smollm2"], replicas=2), route_prefix="/")  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import AtmanError
from .ray_data import INSTALL, RayUnavailableError

REPLICA_HEADER = "x-atman-replica"


def require_serve():
    """The ``ray.serve`` module, or :class:`RayUnavailableError` naming the install command."""
    try:
        from ray import serve
    except ImportError:
        raise RayUnavailableError(f"Ray Serve is not installed; install it with: {INSTALL}") from None
    return serve


class Replica:
    """One replica: its models, loaded once when Ray Serve starts it, behind the server's FastAPI app."""

    def __init__(self, models: Sequence[str], dtype: str = "float32", device: str = "cpu", threads: int = 1,
                 limits: Any = None, token: str | None = None) -> None:
        self.models, self.dtype, self.device = tuple(models), dtype, device
        self.threads, self.limits, self.token = threads, limits, token

    def __serve_build_asgi_app__(self):
        """Ray Serve calls this on the replica, after ``__init__``: the app this replica answers with."""
        import torch
        from ray import serve

        from ..models import load_model
        from ..server import create_app

        torch.set_num_threads(self.threads)
        loaded = {name: load_model(name, dtype=self.dtype, device=self.device) for name in self.models}
        app = create_app(loaded, limits=self.limits, token=self.token)
        replica = serve.get_replica_context().replica_id.unique_id

        @app.middleware("http")
        async def name_the_replica(request, call_next):
            response = await call_next(request)
            response.headers[REPLICA_HEADER] = replica
            return response

        return app


def application(models: Sequence[str] = ("smollm2",), *, replicas: int = 2, dtype: str = "float32",
                device: str = "cpu", threads: int = 1, cpus_per_replica: float | None = None,
                gpus_per_replica: float = 0, limits: Any = None, token: str | None = None):
    """A Ray Serve application of ``replicas`` replicas of the server, each with its own copy of ``models``
    (names as ``atman serve --model`` takes them); run it with ``serve.run(app, route_prefix="/")``.

    ``limits`` is an :class:`atman.server.Limits`; ``token`` as in ``atman serve``. Each replica reserves
    ``cpus_per_replica`` CPUs (default: its ``threads``) and ``gpus_per_replica`` GPUs (use ``device="cuda"``).

        >>> app = application(["smollm2"], replicas=2, threads=1)  # doctest: +SKIP
    """
    serve = require_serve()
    if replicas < 1 or threads < 1:
        raise AtmanError("replicas and threads must be at least 1")
    if not models:
        raise AtmanError("name at least one model to serve")
    deployment = serve.deployment(
        serve.ingress()(Replica), name="atman", num_replicas=replicas,
        ray_actor_options={"num_cpus": threads if cpus_per_replica is None else cpus_per_replica,
                           "num_gpus": gpus_per_replica})
    return deployment.bind(tuple(models), dtype=dtype, device=device, threads=threads, limits=limits, token=token)


def build(args: dict[str, str]):
    """The application builder for ``serve run atman.distributed.serve:build key=value ...``: keys
    ``models`` (comma-separated), ``replicas``, ``threads``, ``dtype``, ``device``, ``cpus_per_replica``,
    ``gpus_per_replica``; the bearer token, if any, from the environment variable ``ATMAN_SERVER_TOKEN``.

        >>> build({"models": "smollm2", "replicas": "2"})  # doctest: +SKIP
    """
    import os

    known = {"models", "replicas", "threads", "dtype", "device", "cpus_per_replica", "gpus_per_replica"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise AtmanError(f"unknown argument(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    try:
        return application(
            [m for m in args.get("models", "smollm2").split(",") if m], replicas=int(args.get("replicas", 2)),
            dtype=args.get("dtype", "float32"), device=args.get("device", "cpu"),
            threads=int(args.get("threads", 1)),
            cpus_per_replica=float(args["cpus_per_replica"]) if "cpus_per_replica" in args else None,
            gpus_per_replica=float(args.get("gpus_per_replica", 0)),
            token=os.environ.get("ATMAN_SERVER_TOKEN") or None)
    except ValueError as exc:
        raise AtmanError(f"bad argument: {exc}") from None
