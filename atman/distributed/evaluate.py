"""``atman evaluate`` on Ray: the suite's jobs (one example at one granularity, every method) spread over
worker actors, each with its own model and methods; the records come back in job order, so that the
report is the local run's (the measured seconds aside).

    >>> import ray; ray.init()  # doctest: +SKIP
    >>> result = run_suite(load_model(), ["atman", "random"], SuiteConfig.quick(),
    ...                    runner=evaluate_runner(model=None, workers=2))  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from ..errors import AtmanError
from .ray_data import RETRIES, connect, plan_workers, require_ray


class EvaluateWorker:
    """One worker: loads the model and builds the methods once, then scores jobs."""

    def __init__(self, model: str | None, dtype: str, device: str, methods: Sequence[str], threads: int) -> None:
        import torch

        from ..baselines import get_method
        from ..models import load_model

        torch.set_num_threads(threads)
        self.lm = load_model(model, dtype=dtype, device=device)
        self.methods = {spec: get_method(spec, self.lm) for spec in methods}

    def ready(self) -> str:
        return self.lm.name

    def run(self, job: Any, fractions: Sequence[float]) -> list[dict]:
        """The records of every method on ``job`` (an :class:`atman.evaluate.suite.Job`), in method order."""
        from ..evaluate.suite import run_jobs

        return list(run_jobs(self.lm, [job], self.methods, fractions))


def evaluate_runner(*, model: str | None = None, dtype: str = "float32", device: str = "cpu",
                    address: str | None = None, workers: int | None = None, threads_per_worker: int | None = None,
                    cpus_per_worker: float | None = None, gpus_per_worker: float | None = None):
    """A ``runner`` for :func:`atman.evaluate.suite.run_suite` that scores the jobs on Ray workers (each loads
    ``model`` itself: pass the name the suite's model was loaded with). With ``address`` it connects to
    that cluster (``"local"`` starts one) and shuts a Ray it started down when the jobs are done; without,
    Ray must already be initialised.

        >>> runner = evaluate_runner(model="smollm2", workers=2, threads_per_worker=1)  # doctest: +SKIP
    """

    def run(lm: Any, jobs: Sequence[Any], methods: Mapping[str, Any], fractions: Sequence[float]) -> Iterator[dict]:
        ray = require_ray()
        started = connect(address) if address is not None else False
        if not ray.is_initialized():
            raise AtmanError("Ray is not running: call ray.init() or give an address")
        try:
            yield from _scored(ray, jobs, list(methods), fractions)
        finally:
            if started:
                ray.shutdown()

    def _scored(ray, jobs, specs, fractions) -> Iterator[dict]:
        if not jobs or not specs:
            return
        plan = plan_workers(ray.cluster_resources(), workers, threads_per_worker, cpus_per_worker, gpus_per_worker)
        on = "cuda" if plan.gpus > 0 and device == "cpu" else device
        remote = ray.remote(EvaluateWorker).options(num_cpus=plan.cpus, num_gpus=plan.gpus, max_restarts=-1,
                                                    max_task_retries=RETRIES)
        actors = [remote.remote(model, dtype, on, specs, plan.threads) for _ in range(min(plan.workers, len(jobs)))]
        try:
            try:
                ray.get([actor.ready.remote() for actor in actors])
            except ray.exceptions.RayError as exc:
                raise AtmanError(f"the workers could not load the model: {exc}") from None
            pool = ray.util.ActorPool(actors)
            # ActorPool.map keeps the jobs' order: records come back as the local run makes them
            for records in pool.map(lambda actor, job: actor.run.remote(job, list(fractions)), list(jobs)):
                yield from records
        finally:
            for actor in actors:
                ray.kill(actor)

    return run


def add_evaluate_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--ray [ADDRESS]``, ``--workers`` and ``--threads-per-worker`` to ``atman evaluate``."""
    parser.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                        help="spread the examples over Ray workers; no ADDRESS starts a local Ray")
    parser.add_argument("--workers", type=int, help="--ray: worker actors (default: one per GPU, or per core)")
    parser.add_argument("--threads-per-worker", type=int, help="--ray: torch threads of each worker")


def runner_from_args(args: argparse.Namespace):
    """The runner ``atman evaluate`` passes to ``run_suite``: None (here) without ``--ray``."""
    if args.ray is None:
        if args.workers is not None or args.threads_per_worker is not None:
            raise AtmanError("--workers and --threads-per-worker apply to --ray; add --ray")
        return None
    require_ray()
    return evaluate_runner(model=args.model, dtype=args.dtype, device=args.device, address=args.ray,
                           workers=args.workers, threads_per_worker=args.threads_per_worker)
