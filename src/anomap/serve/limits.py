"""Service limits and the admission gate that keeps overload from turning into unbounded memory.

A request is admitted only while fewer than ``concurrency + queue`` requests are in the house; the rest
get 503 at once. Admitted requests then wait for one of ``concurrency`` inference slots. A request whose
work outlives its timeout gets 504; queued work is dropped, while work already in its thread keeps its
slot and its place until the thread returns (a Python thread cannot be killed), so timeouts cannot pile
up threads either.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from anomap.errors import ConfigError

T = TypeVar("T")

MiB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """What one server accepts and how much work it takes on at once.

    Attributes:
        max_bytes: largest request body (all images of one request together), in bytes.
        max_pixels: largest image, width x height, checked from the header before decoding.
        max_files: most images in one request.
        timeout_s: seconds from admission to answer; after that the client gets 504.
        concurrency: batches scored at the same time (1: one batch already uses every core of a
            small CPU); up to ``concurrency x max_batch`` requests are decoded or wait for a batch.
        queue: admitted requests that may wait beyond those; beyond that -> 503 at once.
        heatmap_side: long side in pixels of the heat-map overlay PNG sent back on request.
        max_batch: dynamic batching: a batch closes once it holds this many images ...
        max_wait_ms: ... or this many milliseconds after its oldest request arrived (whichever first).
    """

    max_bytes: int = 20 * MiB
    max_pixels: int = 20_000_000
    max_files: int = 16
    timeout_s: float = 30.0
    concurrency: int = 1
    queue: int = 16
    heatmap_side: int = 768
    max_batch: int = 8
    max_wait_ms: float = 5.0

    @property
    def slots(self) -> int:
        """Requests that may be decoding or waiting in a batch at once."""
        return self.concurrency * self.max_batch

    @property
    def capacity(self) -> int:
        """Requests admitted at once; more get 503."""
        return self.slots + self.queue

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_pixels", "max_files", "concurrency", "heatmap_side", "max_batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"serve limit {name} must be a positive integer, not {value!r}.",
                                  fix=f"give {name} >= 1")
        if not isinstance(self.queue, int) or isinstance(self.queue, bool) or self.queue < 0:
            raise ConfigError(f"serve limit queue must be an integer >= 0, not {self.queue!r}.",
                              fix="give queue >= 0 (0 = no waiting: busy means 503)")
        t = self.timeout_s
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t <= 0:
            raise ConfigError(f"serve limit timeout_s must be a positive number of seconds, not {t!r}.",
                              fix="give timeout_s > 0")
        w = self.max_wait_ms
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w) or not 0 <= w <= 10_000:
            raise ConfigError(f"serve limit max_wait_ms must be a number of milliseconds from 0 to 10000, not {w!r}.",
                              fix="give max_wait_ms >= 0, e.g. 5 (0: score whatever is queued at once)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Overloaded(Exception):
    """The server already holds ``concurrency + queue`` requests."""


class TimedOut(Exception):
    """The work did not finish within the request's time budget."""


class Gate:
    """Bounded admission (a counter) plus ``concurrency`` work slots (an asyncio semaphore).

    All methods run on the server's event loop, so the counter needs no lock. The semaphore is made
    lazily on the running loop.
    """

    def __init__(self, concurrency: int, queue: int):
        self.capacity = concurrency + queue
        self.concurrency = concurrency
        self.active = 0  # admitted requests whose work has not finished yet
        self.running = 0  # of those, holding a work slot
        self._slots: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def enter(self) -> None:
        """Admit one request or raise :class:`Overloaded` at once."""
        if self.active >= self.capacity:
            raise Overloaded()
        self.active += 1

    def leave(self) -> None:
        self.active -= 1

    async def run(self, work: Callable[[], Awaitable[T]], timeout_s: float) -> T:
        """Run ``work`` (already admitted) in a slot; raise :class:`TimedOut` past ``timeout_s``.

        The admission taken by :meth:`enter` is given back when ``work`` finishes, even after a timeout.
        The caller must not call :meth:`leave` itself once ``run`` was called.
        """
        loop = asyncio.get_running_loop()
        if self._slots is None or self._loop is not loop:  # one loop in a server; tests may start several
            self._slots, self._loop = asyncio.Semaphore(self.concurrency), loop
        slots = self._slots

        started = False

        async def in_slot() -> T:
            nonlocal started
            async with slots:
                started = True
                self.running += 1
                try:
                    return await work()
                finally:
                    self.running -= 1

        task = asyncio.ensure_future(in_slot())
        task.add_done_callback(self._finished)
        done, _ = await asyncio.wait({task}, timeout=max(timeout_s, 0.0))
        if not done:
            # Still queued: dropped, never runs. Already running (in its worker thread): left to finish,
            # holding its slot and its admission until the thread returns.
            if not started:
                task.cancel()
            raise TimedOut()
        return task.result()

    def _finished(self, task: asyncio.Future) -> None:
        self.leave()
        if not task.cancelled():
            task.exception()  # mark as retrieved: a late failure after a 504 is not an unhandled error
