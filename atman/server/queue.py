"""One worker thread runs the model jobs, one at a time, in arrival order.

Every job sees only its own multipliers (AtMan's manipulation lives in a context variable of the
thread that runs the job, and jobs never overlap), so concurrent requests cannot mix their
perturbations and each gives what it would give alone. Waiting requests are bounded
(``max_queue``; more answer 503), and every job has a deadline that it checks between forward
passes.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from .service import Deadline

T = TypeVar("T")


class QueueFull(Exception):
    """More requests are waiting than the server accepts."""


class JobQueue:
    """Runs blocking model work off the event loop, serially, with a bound and a deadline."""

    def __init__(self, max_queue: int, timeout_s: float) -> None:
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="atman-model")
        self._lock = threading.Lock()
        self._pending = 0

    @property
    def pending(self) -> int:
        return self._pending

    async def run(self, job: Callable[[Deadline], T]) -> T:
        """Run ``job(deadline)`` on the worker; the deadline starts now (queueing time counts)."""
        with self._lock:
            if self._pending >= self.max_queue:
                raise QueueFull(f"{self._pending} requests are waiting; try again shortly")
            self._pending += 1
        deadline = Deadline(self.timeout_s)

        def work() -> T:
            deadline()
            return job(deadline)

        def done(_: object = None) -> None:
            with self._lock:
                self._pending -= 1

        try:
            future = self._executor.submit(work)
        except RuntimeError:  # shut down
            done()
            raise QueueFull("the server is shutting down") from None
        future.add_done_callback(done)
        return await asyncio.wrap_future(future)

    def shutdown(self) -> None:
        """Finish the running job, drop the waiting ones."""
        self._executor.shutdown(wait=True, cancel_futures=True)
