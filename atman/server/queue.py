"""One worker thread runs the model jobs, one at a time, in arrival order.

Every job sees only its own multipliers (AtMan's manipulation lives in a context variable of the
thread that runs the job, and jobs never overlap), so concurrent requests cannot mix their
perturbations and each gives what it would give alone. Waiting requests are bounded
(``max_queue``; more answer 503). Every job gets a :class:`JobCheck`, which it calls between
forward passes (between batches of an explanation, before each generated token): it raises once
the job's deadline has passed, its client has gone away or the server is stopping. A job whose
client goes away while it waits is dropped before it starts.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from .base import Deadline, Timeout

T = TypeVar("T")
log = logging.getLogger("atman.server")


class QueueFull(Exception):
    """More requests are waiting than the server accepts."""


class Cancelled(Exception):
    """A job stopped before its end: its client went away (``status`` 499) or the server is stopping (503)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class JobCheck:
    """Called by a job between pieces of work; raises :class:`Cancelled` or ``Timeout`` when it must stop.

    The explainer calls it as ``check(done, total)`` (its progress callback), generation as
    ``check(step)``: the last ``(done, total)`` is kept for the log.
    """

    def __init__(self, seconds: float, stopping: threading.Event) -> None:
        self.deadline = Deadline(seconds)
        self.stopping = stopping
        self.gone = threading.Event()
        self.progress: tuple[int, int] | None = None

    def __call__(self, *args: object) -> None:
        if len(args) == 2 and all(isinstance(a, int) for a in args):
            self.progress = (int(args[0]), int(args[1]))  # type: ignore[arg-type]
        if self.gone.is_set():
            raise Cancelled("the client went away", 499)
        if self.stopping.is_set():
            raise Cancelled("the server is shutting down", 503)
        self.deadline()


class JobQueue:
    """Runs blocking model work off the event loop, serially, with a bound, a deadline and cancellation."""

    def __init__(self, max_queue: int, timeout_s: float) -> None:
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="atman-model")
        self._lock = threading.Lock()
        self._pending = 0
        self._stopping = threading.Event()

    @property
    def pending(self) -> int:
        return self._pending

    async def run(self, job: Callable[[JobCheck], T], gone: Callable[[], Awaitable[object]] | None = None,
                  label: str = "job") -> T:
        """Run ``job(check)`` on the worker; the deadline starts now (queueing time counts).

        ``gone()``: an awaitable that completes when the client has disconnected; the job is then dropped if it has not
        started, or stopped at its next check, and this raises :class:`Cancelled`. ``label`` names
        the request in the log.
        """
        with self._lock:
            if self._pending >= self.max_queue:
                raise QueueFull(f"{self._pending} requests are waiting; try again shortly")
            self._pending += 1
        check = JobCheck(self.timeout_s, self._stopping)
        started = time.monotonic()

        def work() -> T:
            check()
            try:
                return job(check)
            except (Cancelled, Timeout) as exc:
                done = f" after {check.progress[0]} of {check.progress[1]} perturbations" if check.progress else ""
                why = ("time limit" if isinstance(exc, Timeout) else
                       "client went away" if check.gone.is_set() else "shutdown")
                log.warning("%s: stopped%s, %.1f s after it arrived (%s)", label, done,
                            time.monotonic() - started, why)
                raise

        def finished(_: object = None) -> None:
            with self._lock:
                self._pending -= 1

        try:
            future = self._executor.submit(work)
        except RuntimeError:  # shut down
            finished()
            raise QueueFull("the server is shutting down") from None
        future.add_done_callback(finished)
        result = asyncio.wrap_future(future)
        if gone is None:
            return await result
        watcher = asyncio.ensure_future(gone())
        try:
            await asyncio.wait({result, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not watcher.done():
                watcher.cancel()
        if result.done():
            return result.result()
        # the client went away first
        check.gone.set()
        dropped = future.cancel()
        result.add_done_callback(_retrieve)
        if dropped:
            log.warning("%s: client went away after %.1f s in the queue; dropped before it started", label,
                        time.monotonic() - started)
        else:
            log.warning("%s: client went away after %.1f s; stopping it at its next check", label,
                        time.monotonic() - started)
        raise Cancelled("the client went away", 499)

    def shutdown(self) -> None:
        """Drop the waiting jobs and stop the running one at its next check."""
        self._stopping.set()
        self._executor.shutdown(wait=True, cancel_futures=True)


def _retrieve(future: asyncio.Future) -> None:
    # an abandoned job's outcome is of no interest, but asyncio warns about exceptions nobody read
    if not future.cancelled():
        future.exception()
