"""Dynamic batching: concurrent requests' images scored together in one model call.

Each request hands its decoded images to :meth:`Batcher.submit` as one job. A worker takes the oldest
job and keeps adding queued jobs until the batch holds ``max_batch`` images or ``max_wait_ms`` have
passed since that oldest job arrived, whichever comes first; jobs are never split. The batch is
scored in a worker thread and each job gets back its own scores and maps. While a batch is being
scored, new jobs queue up, so under load batches fill without waiting at all.

Isolation: a job whose deadline passed while it queued is dropped (its request has already been
answered 504) and never scored. When scoring a batch raises, each of its jobs is scored again alone,
so only the job that fails gets the error. ``max_batch=1`` scores every job alone, in arrival order.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from starlette.concurrency import run_in_threadpool

from anomap.serve.limits import TimedOut

log = logging.getLogger("anomap.serve")

# images -> (raw scores (N,), raw maps (empty list when maps are not wanted), what scored them)
ScoreFn = Callable[[Sequence[np.ndarray], bool], tuple[np.ndarray, list[np.ndarray], Any]]
Result = tuple[np.ndarray, list[np.ndarray], Any]


@dataclass
class Job:
    images: list[np.ndarray]
    maps: bool
    deadline: float  # loop time after which nobody waits for the result
    arrived: float
    future: asyncio.Future = field(repr=False)


class Batcher:
    """Queue of scoring jobs served by ``workers`` asyncio tasks, each scoring one batch at a time.

    Args:
        score: the model call (runs in a worker thread); see :data:`ScoreFn`.
        max_batch: a batch closes once it holds this many images (>= 1).
        max_wait_ms: ... or this long after its oldest job arrived.
        workers: batches scored at the same time (1 on a small CPU: one batch already uses every core).
        on_batch: called with the number of images of every batch scored (metrics).
    """

    def __init__(self, score: ScoreFn, max_batch: int = 8, max_wait_ms: float = 5.0, workers: int = 1,
                 on_batch: Callable[[int], None] | None = None):
        self.score = score
        self.max_batch = max(1, int(max_batch))
        self.max_wait_s = max(0.0, float(max_wait_ms)) / 1000.0
        self.workers = max(1, int(workers))
        self.on_batch = on_batch
        self.queued_images = 0  # images waiting for a batch (the queue-depth gauge)
        self._jobs: deque[Job] = deque()
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task] = []

    def _start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # one loop in a server; tests may start several
            self._loop, self._jobs, self._wake, self.queued_images = loop, deque(), asyncio.Event(), 0
            self._tasks = [loop.create_task(self._work()) for _ in range(self.workers)]

    async def submit(self, images: list[np.ndarray], maps: bool, timeout_s: float) -> Result:
        """Scores, maps (when ``maps``) and the scorer's tag for ``images``, scored within a batch.

        Raises what scoring them raised, or :class:`TimedOut` when the job expired in the queue.
        """
        self._start()
        loop = asyncio.get_running_loop()
        now = loop.time()
        job = Job(list(images), maps, now + timeout_s, now, loop.create_future())
        self.queued_images += len(job.images)
        self._jobs.append(job)
        self._wake.set()
        return await job.future

    async def _work(self) -> None:
        while True:
            batch = await self._collect()
            try:
                live = self._drop_expired(batch)
                if live:
                    await self._score(live)
            except Exception as exc:  # a bug here must fail these requests, not stop the worker
                log.exception("batch worker error")
                for job in batch:
                    _resolve(job.future, exc=exc)

    async def _next_job(self, until: float | None) -> Job | None:
        """The oldest queued job, waiting for one at most until loop time ``until`` (None: forever).

        Waiting is on an event, never on a queue: a timeout cannot swallow a job.
        """
        loop = asyncio.get_running_loop()
        while not self._jobs:
            self._wake.clear()
            if until is None:
                await self._wake.wait()
                continue
            wait = until - loop.time()
            if wait <= 0:
                return None
            try:
                await asyncio.wait_for(self._wake.wait(), wait)
            except TimeoutError:
                return None
        return self._jobs.popleft()

    async def _collect(self) -> list[Job]:
        first = await self._next_job(None)
        assert first is not None
        batch, n = [first], len(first.images)
        close_at = first.arrived + self.max_wait_s
        while n < self.max_batch and (job := await self._next_job(close_at)) is not None:
            batch.append(job)
            n += len(job.images)
        self.queued_images -= n
        return batch

    def _drop_expired(self, batch: list[Job]) -> list[Job]:
        now = asyncio.get_running_loop().time()
        live = []
        for job in batch:
            if job.future.done():  # the request went away (cancelled)
                continue
            if job.deadline <= now:
                job.future.set_exception(TimedOut())
                continue
            live.append(job)
        return live

    async def _score(self, jobs: list[Job]) -> None:
        images = [img for job in jobs for img in job.images]
        maps = any(job.maps for job in jobs)
        try:
            scores, out_maps, tag = await run_in_threadpool(self.score, images, maps)
        except Exception as exc:
            if len(jobs) == 1:
                _resolve(jobs[0].future, exc=exc)
                return
            for job in jobs:  # find the culprit: each job alone, so only it fails
                await self._score([job])
            return
        if self.on_batch is not None:
            self.on_batch(len(images))
        start = 0
        for job in jobs:
            end = start + len(job.images)
            _resolve(job.future, (scores[start:end], out_maps[start:end] if job.maps else [], tag))
            start = end


def _resolve(future: asyncio.Future, result: object = None, exc: BaseException | None = None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
