"""Batches of explanations on Ray: each worker an actor that loads the model once.

Two front doors over the same worker (:class:`BatchWorker`, which runs :func:`atman.batch.run_line`):

- :func:`explain_dataset` returns a lazy ``ray.data.Dataset`` (Ray Data ``map_batches`` with an actor
  pool), to chain with one's own Ray pipelines;
- :func:`run_batch_on_ray` runs the JSON-lines contract and writes results as they complete, each with
  its line number, then sorts the file into input order; it is what ``atman explain --input FILE --ray``
  runs. A worker that dies (its process killed, its node gone) is restarted by Ray where there is room,
  and the requests it held go to the next free worker; the one it was running is charged the loss (lost
  twice, it becomes an error line), the ones queued behind it lose nothing.

It is one module because both front doors share the worker, its placement and its restart rules; a
reader checking that a lost node loses no line needs the writer and the worker side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import socket
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..batch import (
    LINE_FIELDS,
    BatchSummary,
    Line,
    error_result,
    open_results,
    read_requests,
    read_results,
    request_id,
    result_line,
    run_line,
)
from ..errors import AtmanError

if TYPE_CHECKING:
    import ray.data

INSTALL = 'pip install "atman[ray]"'
# a request's retries after its worker died (on the next free worker; Ray restarts the dead one)
RETRIES = 1
# at most this many blocks per dataset: a worker lost mid-block costs the requests of its block
MAX_BLOCKS = 4096
# requests queued on each worker beyond the one it runs, so that it never waits for the driver
QUEUED_PER_WORKER = 1
LOST = "the worker explaining this line died twice ({})"


class RayUnavailableError(AtmanError):
    """Ray is not installed, or no Ray cluster answers at the given address."""


def require_ray():
    """The ``ray`` module, or :class:`RayUnavailableError` naming the install command.

        >>> ray = require_ray()  # doctest: +SKIP
    """
    try:
        import ray
    except ImportError:
        raise RayUnavailableError(f"Ray is not installed; install it with: {INSTALL}") from None
    return ray


@dataclass(frozen=True)
class WorkerConfig:
    """What each worker loads and how it explains: the options of :func:`atman.load_model` and
    :class:`atman.Explainer`, and the attribution ``method`` (``"atman"`` or a spec of
    :mod:`atman.baselines`, e.g. ``"occlusion"``).

        >>> WorkerConfig(model="smollm2", method="occlusion").method
        'occlusion'
    """

    model: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    backend: str = "sdpa"
    batch_size: int | None = None
    engine: str = "cached"
    max_memory: str | None = None
    method: str = "atman"


@dataclass(frozen=True)
class WorkerPlan:
    """How many workers, and what each one gets: CPU cores reserved, torch threads, GPUs."""

    workers: int
    threads: int
    cpus: float
    gpus: float


def plan_workers(resources: dict[str, float], workers: int | None = None, threads_per_worker: int | None = None,
                 cpus_per_worker: float | None = None, gpus_per_worker: float | None = None) -> WorkerPlan:
    """Fill in the defaults from a cluster's resources (``ray.cluster_resources()``): one worker per GPU
    when the cluster has GPUs; on CPUs, workers x threads = cores (one thread each unless told).

        >>> plan_workers({"CPU": 8.0})
        WorkerPlan(workers=8, threads=1, cpus=1, gpus=0)
        >>> plan_workers({"CPU": 8.0}, workers=2)
        WorkerPlan(workers=2, threads=4, cpus=4, gpus=0)
        >>> plan_workers({"CPU": 16.0, "GPU": 4.0})
        WorkerPlan(workers=4, threads=1, cpus=1, gpus=1)
    """
    for name, value in (("workers", workers), ("threads per worker", threads_per_worker)):
        if value is not None and value < 1:
            raise AtmanError(f"{name} must be at least 1, got {value}")
    for name, value in (("CPUs per worker", cpus_per_worker), ("GPUs per worker", gpus_per_worker)):
        if value is not None and value < 0:
            raise AtmanError(f"{name} must not be negative, got {value}")
    cores = max(1, int(resources.get("CPU", 1)))
    gpus = resources.get("GPU", 0)
    if gpus_per_worker is None:
        gpus_per_worker = 1 if gpus >= 1 else 0
    if gpus_per_worker > 0:
        if workers is None:
            workers = max(1, int(gpus // gpus_per_worker))
        threads = threads_per_worker or 1
    elif workers is None:
        threads = threads_per_worker or 1
        workers = max(1, cores // threads)
    else:
        threads = threads_per_worker or max(1, cores // workers)
    cpus = threads if cpus_per_worker is None else cpus_per_worker
    return WorkerPlan(workers=workers, threads=threads, cpus=cpus, gpus=gpus_per_worker)


class BatchWorker:
    """One worker: loads the model once, then explains many requests (one line at a time).

    Used as a Ray actor (:func:`run_batch_on_ray`) and as Ray Data's callable class
    (:func:`explain_dataset`); in one process it is just an object:

        >>> worker = BatchWorker(WorkerConfig(model="smollm2"), threads=1)  # doctest: +SKIP
        >>> worker.run(1, '{"prompt": "Ada lives in", "target": " Oslo"}')["line"]  # doctest: +SKIP
        1
    """

    def __init__(self, config: WorkerConfig, threads: int | None = None) -> None:
        import torch

        from ..explainer import Explainer
        from ..models import load_model

        if config.device.startswith("cuda") or threads:
            torch.set_num_threads(threads or 1)
        lm = load_model(config.model, dtype=config.dtype, device=config.device)
        self.explainer = Explainer(lm, backend=config.backend, batch_size=config.batch_size, engine=config.engine,
                                   max_memory=config.max_memory)
        self.method = config.method

    def ready(self) -> str:
        """The loaded model's name (the driver waits for this before sending work)."""
        return self.explainer.lm.name

    def run(self, number: int, line: Line) -> dict[str, Any]:
        """The result (or error object) of batch line ``number``."""
        return run_line(self.explainer, line, number, self.method)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Ray Data: a batch of rows (``request`` JSON strings, or request fields as columns) in; the same
        rows with ``result`` (the result's JSON) and ``error`` (its message, or None) added."""
        import numpy as np

        columns = list(batch)
        size = len(batch[columns[0]]) if columns else 0
        results, errors, numbers = [], [], []
        for i in range(size):
            row = {name: _plain(batch[name][i]) for name in columns}
            number = row.get("line")
            line = row["request"] if "request" in row else json.dumps(
                {k: v for k, v in row.items() if k in LINE_FIELDS and v is not None}, ensure_ascii=False)
            result = self.run(int(number) if number is not None else 0, line)
            if number is None:
                result.pop("line", None)
            numbers.append(number)
            results.append(result_line(result))
            errors.append(result.get("error"))
        out = dict(batch)
        out["result"] = np.array(results, dtype=object)
        out["error"] = np.array(errors, dtype=object)
        return out


def _plain(value: Any) -> Any:
    """A numpy scalar or array from a Ray Data batch as a plain Python value (NaN as None)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def explain_dataset(requests: str | Path | ray.data.Dataset, config: WorkerConfig | None = None, *,
                    workers: int | None = None, threads_per_worker: int | None = None,
                    cpus_per_worker: float | None = None, gpus_per_worker: float | None = None) -> ray.data.Dataset:
    """A lazy Dataset of results, one row per request, computed by an actor pool of ``workers`` workers.

    ``requests`` is a JSON-lines file (its non-empty lines become rows ``{"line": N, "request": b"..."}``,
    the line's bytes, decoded by the worker: a line that is not UTF-8 is that row's error) or a Dataset
    whose rows are either ``{"request": "<JSON line>"}`` or the request's fields as columns
    (``prompt``, ``target``, ...; other columns, e.g. ``line`` or your own keys, are passed through).
    Each output row adds ``result`` (the result's JSON, as :mod:`atman.batch` writes it) and ``error``
    (None when explained). A worker that dies is restarted and its block retried once.
    Needs a running Ray (``ray.init()``).

        >>> ds = explain_dataset("requests.jsonl", WorkerConfig(method="occlusion"), workers=2)  # doctest: +SKIP
        >>> [json.loads(row["result"]) for row in ds.iter_rows()]  # doctest: +SKIP
    """
    ray = require_ray()
    config = config or WorkerConfig()
    if isinstance(requests, (str, Path)):
        items = [{"line": n, "request": line} for n, line in enumerate(read_requests(requests), start=1)
                 if line.strip()]
        if not items:
            raise AtmanError(f"{requests} holds no request")
        requests = ray.data.from_items(items, override_num_blocks=min(len(items), MAX_BLOCKS))
    plan = plan_workers(ray.cluster_resources(), workers, threads_per_worker, cpus_per_worker, gpus_per_worker)
    config = _on_device(config, plan)
    # max_task_retries: Ray Data's default retries a lost block forever; one retry, as run_batch_on_ray does
    # (passed as an extra actor option, deprecated in Ray 2.60, removed in 2.64: hence the extra's bound)
    return requests.map_batches(
        BatchWorker, batch_size=1, compute=ray.data.ActorPoolStrategy(size=plan.workers),
        fn_constructor_kwargs={"config": config, "threads": plan.threads}, num_cpus=plan.cpus,
        num_gpus=plan.gpus, max_restarts=-1, max_task_retries=RETRIES)


def _on_device(config: WorkerConfig, plan: WorkerPlan) -> WorkerConfig:
    if plan.gpus > 0 and config.device == "cpu":
        return WorkerConfig(**{**asdict(config), "device": "cuda"})
    return config


def run_batch_on_ray(lines: Sequence[Line], config: WorkerConfig, output: Path | None, *,
                     workers: int | None = None, threads_per_worker: int | None = None,
                     cpus_per_worker: float | None = None, gpus_per_worker: float | None = None,
                     resume: bool = False, fail_fast: bool = False,
                     progress: Callable[[int, int], None] | None = None) -> BatchSummary:
    """Run batch lines (text, or a file's bytes: :func:`atman.batch.read_requests`) on the connected Ray
    cluster (``ray.init()`` first) with a pool of worker actors.

    With an ``output`` file, each result is appended as soon as it is done (it carries its ``line``),
    and when the run ends the file is rewritten sorted by line number: a killed run keeps everything
    that finished, and ``resume=True`` runs only the lines that have no explained result there yet
    (error objects and a line cut off mid-write are redone). Without ``output`` results go to stdout
    in input order. ``progress(done, total)`` is called as results come in.

        >>> ray.init()  # doctest: +SKIP
        >>> run_batch_on_ray(lines, WorkerConfig(model="smollm2"), Path("out.jsonl"), workers=2)  # doctest: +SKIP
        BatchSummary(requests=50, failed=0, stopped=False, first_error=None, answered=50, kept=0, retried=0)
    """
    ray = require_ray()
    if resume and output is None:
        raise AtmanError("--resume needs an output file (-o): it skips the lines already explained there")
    numbered = [(n, line) for n, line in enumerate(lines, start=1) if line.strip()]
    kept = read_results(output, lines) if resume and output is not None else {}
    todo = [(n, line) for n, line in numbered if n not in kept]
    plan = plan_workers(ray.cluster_resources(), workers, threads_per_worker, cpus_per_worker, gpus_per_worker)
    config = _on_device(config, plan)
    failed = answered = 0
    first_error = None
    lost: list[int] = []
    with _sink(output, kept, [n for n, _ in todo]) as write, \
            contextlib.closing(_results(ray, todo, config, plan, lost)) as results:
        if progress is not None:
            progress(len(kept), len(numbered))
        for result in results:
            write(result)
            answered += 1
            if progress is not None:
                progress(len(kept) + answered, len(numbered))
            if "error" in result:
                failed += 1
                first_error = first_error or result
                if fail_fast:
                    return BatchSummary(len(numbered), failed, True, first_error, answered, len(kept), len(lost))
    return BatchSummary(len(numbered), failed, False, first_error, answered, len(kept), len(lost))


def _results(ray, todo: list[tuple[int, Line]], config: WorkerConfig, plan: WorkerPlan,
             lost: list[int]) -> Iterator[dict[str, Any]]:
    """Results in the order they complete; the workers are killed when the caller stops iterating.

    Each worker holds at most ``1 + QUEUED_PER_WORKER`` requests. When one dies, the requests it held go
    back to the front of the queue (their numbers appended to ``lost``) for the next free worker, and the
    dead one gets no work until Ray has restarted it (a ``ready`` call answers): a worker whose node is
    gone for good, with no room for it elsewhere, holds no request hostage."""
    if not todo:
        return
    remote = ray.remote(BatchWorker).options(num_cpus=plan.cpus, num_gpus=plan.gpus, max_restarts=-1,
                                             max_task_retries=0)
    actors = [remote.remote(config, plan.threads) for _ in range(min(plan.workers, len(todo)))]
    try:
        try:
            ray.get([actor.ready.remote() for actor in actors])
        except ray.exceptions.RayError as exc:
            raise AtmanError(f"the workers could not load the model: {_cause(exc)}") from None
        pending = deque(todo)
        losses: dict[int, int] = {}
        # a call in flight -> (its worker, its request or None for a restarted worker's ready call, its order)
        in_flight: dict[Any, tuple[Any, tuple[int, Line] | None, int]] = {}
        order = itertools.count()
        down: set[int] = set()  # the workers that died and have not answered their ready call yet

        def submit(actor) -> None:
            if pending:
                item = pending.popleft()
                in_flight[actor.run.remote(*item)] = (actor, item, next(order))

        def refill() -> None:
            held = [id(actor) for actor, item, _ in in_flight.values() if item is not None]
            for actor in actors:
                if id(actor) not in down:
                    for _ in range(1 + QUEUED_PER_WORKER - held.count(id(actor))):
                        submit(actor)

        refill()
        while pending or any(item is not None for _, item, _ in in_flight.values()):
            if not in_flight:  # every worker is gone for good
                number, line = pending.popleft()
                yield error_result(LOST.format("no worker is left"), number, request_id(line))
                continue
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            actor, item, position = in_flight.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except ray.exceptions.RayError as exc:
                if item is not None and id(actor) not in down:
                    yield from _requeue(exc, actor, (position, item), in_flight, pending, losses, lost)
                    down.add(id(actor))
                    # answered once Ray has restarted the worker, wherever there is room for it
                    in_flight[actor.ready.options(max_task_retries=-1).remote()] = (actor, None, next(order))
                    refill()
                # else the ready call of a worker that cannot be restarted: it gets no more work
                continue
            if item is None:  # restarted: it takes work again
                down.discard(id(actor))
            refill()
            if item is not None:
                yield result
    finally:
        for actor in actors:
            ray.kill(actor)


def _requeue(exc: BaseException, actor, failed: tuple[int, tuple[int, Line]], in_flight: dict,
             pending: deque, losses: dict[int, int], lost: list[int]) -> Iterator[dict[str, Any]]:
    """A worker died: the requests it held go back to the front of the queue, in their order. Only the
    first (the one it was running) is charged the loss: lost twice it becomes an error line (yielded);
    the ones queued behind it lose nothing."""
    refs = [ref for ref, (other, item, _) in in_flight.items() if other is actor and item is not None]
    held = sorted([failed] + [(position, item) for _, item, position in map(in_flight.pop, refs)],
                  key=lambda entry: entry[0])
    again = []
    for index, (_, (number, line)) in enumerate(held):
        if index == 0:
            losses[number] = losses.get(number, 0) + 1
            if losses[number] > RETRIES:
                yield error_result(LOST.format(_cause(exc)), number, request_id(line))
                continue
        lost.append(number)
        again.append((number, line))
    pending.extendleft(reversed(again))


def _cause(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"[:300]


@contextlib.contextmanager
def _sink(output: Path | None, kept: dict[int, dict[str, Any]],
          order: list[int]) -> Iterator[Callable[[dict[str, Any]], None]]:
    """A writer of results: appended to ``output`` as they come and sorted at the end, or, without a
    file, printed to stdout in input order (each as soon as every line before it is done)."""
    if output is None:
        stdout = sys.stdout
        waiting: dict[int, dict[str, Any]] = {}
        upcoming = iter(order)
        following = next(upcoming, None)

        def write_in_order(result: dict[str, Any]) -> None:
            nonlocal following
            waiting[result["line"]] = result
            while following is not None and following in waiting:
                stdout.write(result_line(waiting.pop(following)) + "\n")
                following = next(upcoming, None)
            stdout.flush()

        # Ray prints its workers' failures to sys.stdout: send them to stderr, away from the results
        with contextlib.redirect_stdout(sys.stderr):
            yield write_in_order
        return
    with open_results(output, kept) as append:
        yield append


def add_batch_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--ray [ADDRESS]``, ``--workers``, ``--threads-per-worker``, ``--cpus-per-worker``,
    ``--gpus-per-worker`` and ``--resume`` to ``atman explain``."""
    parser.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                        help="batch: run --input on Ray; no ADDRESS starts a local Ray, an address (or 'auto') "
                             "joins a running cluster")
    parser.add_argument("--workers", type=int, help="--ray: worker actors, each with its own model "
                                                    "(default: one per GPU; on CPUs cores / threads per worker)")
    parser.add_argument("--threads-per-worker", type=int,
                        help="--ray: torch threads of each worker (default 1 on CPUs, or cores / --workers)")
    parser.add_argument("--cpus-per-worker", type=float, help="--ray: CPUs reserved per worker (default: its threads)")
    parser.add_argument("--gpus-per-worker", type=float,
                        help="--ray: GPUs per worker (default 1 if the cluster has GPUs)")
    parser.add_argument("--resume", action="store_true",
                        help="batch: keep the results already in the output file (-o), run only the other lines")


RAY_ONLY = ("workers", "threads_per_worker", "cpus_per_worker", "gpus_per_worker")


def wants_ray(args: argparse.Namespace) -> bool:
    """Whether ``atman explain --input`` runs on Ray; options that only apply there are refused without it."""
    if args.ray is not None:
        return True
    given = [name for name in RAY_ONLY if getattr(args, name) not in (None, False)]
    if given:
        raise AtmanError(f"--{given[0].replace('_', '-')} applies to --ray batches; add --ray")
    return False


def connect(address: str) -> bool:
    """Join the Ray cluster at ``address`` (``"local"`` starts one in this process); returns whether it
    was started here (then the caller shuts it down). An already connected Ray is used as it is."""
    ray = require_ray()
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    _check_reachable(address)
    try:
        ray.init(address=address, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    except Exception as exc:  # Ray raises ConnectionError, ValueError or RuntimeError for a bad address
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RayUnavailableError(f"cannot reach a Ray cluster at {address!r}: {first}") from None
    return True


def _check_reachable(address: str) -> None:
    """Fail fast on a host:port nobody listens at (Ray itself retries for a minute, logging each try)."""
    host, sep, port = address.rpartition(":")
    if address in ("local", "auto") or "://" in address or not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise RayUnavailableError(f"cannot reach a Ray cluster at {address!r}: {exc.strerror or exc} "
                                  f"(start one with `ray start --head`, or check the address)") from None


def run_cli_batch(args: argparse.Namespace, lines: Sequence[Line]) -> int:
    """``atman explain --input FILE --ray [ADDRESS]``: the exit code (0 all explained, 1 some lines failed,
    2 stopped by ``--fail-fast``); writes the results to ``args.output`` or stdout."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    config = WorkerConfig(model=args.model, dtype=args.dtype, device=args.device or "cpu", backend=args.backend,
                          batch_size=args.batch_size, engine=args.engine, max_memory=args.max_memory,
                          method=args.method)
    if args.batch_size is not None and args.batch_size < 1:
        raise AtmanError("--batch-size must be at least 1")
    require_ray()
    started = connect(args.ray)
    try:
        show = not args.quiet and sys.stderr.isatty()
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=Console(stderr=True), transient=True, disable=not show) as bar:
            task = bar.add_task("batch on ray", total=None)
            summary = run_batch_on_ray(
                lines, config, args.output, workers=args.workers, threads_per_worker=args.threads_per_worker,
                cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker, resume=args.resume,
                fail_fast=args.fail_fast, progress=lambda done, total: bar.update(task, completed=done, total=total))
    finally:
        if started:
            require_ray().shutdown()
    return summary.exit_code(args.output, args.quiet)
