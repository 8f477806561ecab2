"""Spread explanations over a Ray cluster: batches on Ray Data and actors, servers on Ray Serve.

Ray is an optional extra (``pip install "atman[ray]"``); this package imports without it and says
how to install it when a function needs it.

- :func:`explain_dataset`: a ``ray.data.Dataset`` of batch requests (or a JSON-lines file) in, a
  Dataset of results out; each worker is an actor that loads the model once (Ray Data
  ``map_batches`` with an actor pool), AtMan or any method of :mod:`atman.baselines`.
- :func:`run_batch_on_ray`: the JSON-lines contract of :mod:`atman.batch` on a cluster, results
  written to a file as they complete (with their line number), resumable, sorted into input order at
  the end; what ``atman explain --input FILE --ray [ADDRESS]`` runs (:func:`run_cli_batch`).
- :mod:`atman.distributed.serve`: several ``atman serve`` replicas behind one address (Ray Serve).

Example::

    >>> from atman.distributed import WorkerConfig, explain_dataset
    >>> results = explain_dataset("requests.jsonl", WorkerConfig(model="smollm2"), workers=2)  # doctest: +SKIP
    >>> results.take(1)[0]["line"]  # doctest: +SKIP
    1
"""

from __future__ import annotations

from .ray_data import (
    RayUnavailableError,
    WorkerConfig,
    add_batch_options,
    explain_dataset,
    plan_workers,
    require_ray,
    run_batch_on_ray,
    run_cli_batch,
    wants_ray,
)

__all__ = [
    "RayUnavailableError",
    "WorkerConfig",
    "add_batch_options",
    "explain_dataset",
    "plan_workers",
    "require_ray",
    "run_batch_on_ray",
    "run_cli_batch",
    "wants_ray",
]
