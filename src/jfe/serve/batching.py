"""Micro-batching: concurrent requests are queued and run together in one worker.

A forward pass over 32 items costs far less than 32 passes over one item, so under load the service
collects what arrived while the previous batch ran (or within ``max_wait_ms`` of the first waiting
request) and hands it to the model in one call: :class:`EncodeBatcher` for embeddings, :class:`RerankBatcher`
for ``/search``'s reranking (every waiting query's shortlist scored in one ``rerank`` call). All models run on one
thread (a :class:`ModelThread`, which the service's batchers share): torch modules are not safe to call
concurrently, two models on two threads would fight over the same cores, and the event loop stays free to accept
requests meanwhile. A lone request on an idle service is sent at once (no wait), so batching costs a single user
nothing. With ``enabled=False`` every request runs on its own (still on that one thread), which is the baseline the
load benchmark compares against.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

from jfe.data.items import Item
from jfe.indexing import RerankJob, score_rerank_jobs


@dataclass
class BatchStats:
    """Counters for /health and the benchmark: how much batching actually happened."""

    requests: int = 0
    batches: int = 0
    items: int = 0
    largest_batch: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"requests": self.requests, "batches": self.batches, "items": self.items,
                "largest_batch": self.largest_batch}


Payload = TypeVar("Payload")
Result = TypeVar("Result")


class ModelThread:
    """The one thread every model of the service runs on (a single-worker executor)."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jfe-model")

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def restart(self) -> None:
        """Drop queued work; a fresh (thread-less until used) executor, so an app restarted by its lifespan works."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jfe-model")


@dataclass
class _Job(Generic[Payload]):
    payload: Payload
    size: int
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)


class MicroBatcher(Generic[Payload, Result]):
    """Queue jobs from many coroutines and run them as few :meth:`_run_batch` calls as possible on the model thread.

    Subclasses say how big a job is (:meth:`_size`, in the units of ``max_batch``) and how a list of jobs runs
    (:meth:`_run_batch`, on the model thread, one result per job). A batch that fails is run again job by job, so one
    bad request never fails the others.
    """

    def __init__(self, *, enabled: bool = True, max_batch: int = 32, max_wait_ms: float = 5.0,
                 thread: ModelThread | None = None) -> None:
        self.enabled = enabled
        self.max_batch = max(1, int(max_batch))
        self.max_wait = max(0.0, float(max_wait_ms)) / 1000.0
        self.stats = BatchStats()
        self.thread = thread or ModelThread()
        self._last_batch = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: deque[_Job[Payload]] = deque()
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

    def _size(self, payload: Payload) -> int:
        raise NotImplementedError

    def _run_batch(self, payloads: list[Payload]) -> list[Result]:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------ public
    async def submit(self, payload: Payload) -> Result:
        """The result of one job; errors of this job are raised here."""
        self.stats.requests += 1
        size = self._size(payload)
        if not self.enabled:
            self._count(size)
            return (await self.thread.run(self._run_batch, [payload]))[0]  # type: ignore[no-any-return]
        loop = asyncio.get_running_loop()
        self._ensure_worker(loop)
        assert self._wake is not None, "_ensure_worker creates the event"
        job: _Job[Payload] = _Job(payload, size, loop.create_future())
        self._pending.append(job)
        self._wake.set()
        return await job.future  # type: ignore[no-any-return]

    async def aclose(self) -> None:
        """Stop the worker; jobs still queued fail with RuntimeError."""
        if self._worker is not None and not self._worker.done():
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        self._worker = None
        while self._pending:
            job = self._pending.popleft()
            if not job.future.done():
                job.future.set_exception(RuntimeError("the service is shutting down"))

    # ------------------------------------------------------------------------------------ internals
    def _count(self, n: int) -> None:
        self._last_batch = n
        self.stats.batches += 1
        self.stats.items += n
        self.stats.largest_batch = max(self.stats.largest_batch, n)

    def _ensure_worker(self, loop: asyncio.AbstractEventLoop) -> None:
        # A new event loop (e.g. a TestClient used without `with`) needs its own event and worker.
        if self._loop is not loop or self._worker is None or self._worker.done():
            if self._loop is not loop:
                self._pending.clear()
            self._loop = loop
            self._wake = asyncio.Event()
            self._worker = loop.create_task(self._run(), name=f"jfe-{type(self).__name__}")

    def _take_batch(self) -> list[_Job[Payload]]:
        jobs: list[_Job[Payload]] = []
        n = 0
        while self._pending and (not jobs or n + self._pending[0].size <= self.max_batch):
            job = self._pending.popleft()
            jobs.append(job)
            n += job.size
        return jobs

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            # Wait for company until the batch is full or the oldest request has waited max_wait. A lone request
            # after a lone batch is sent at once: no load, nothing to batch with, so waiting only adds latency.
            under_load = self._last_batch > 1 or len(self._pending) > 1
            wait = self.max_wait if under_load else 0.0
            while self._pending and sum(j.size for j in self._pending) < self.max_batch:
                remaining = self._pending[0].arrived + wait - time.monotonic()
                if remaining <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            jobs = self._take_batch()
            if not self._pending:
                self._wake.clear()
            jobs = [j for j in jobs if not j.future.done()]  # drop requests whose client went away
            if jobs:
                await self._process(jobs)

    async def _process(self, jobs: list[_Job[Payload]]) -> None:
        self._count(sum(job.size for job in jobs))
        try:
            results = await self.thread.run(self._run_batch, [job.payload for job in jobs])
        except Exception as exc:  # noqa: BLE001 - handed to the waiting requests
            if len(jobs) == 1:
                _settle(jobs[0].future, exc=exc)
                return
            # One bad request must not fail the others: run each request alone.
            for job in jobs:
                try:
                    _settle(job.future, (await self.thread.run(self._run_batch, [job.payload]))[0])
                except Exception as one_exc:  # noqa: BLE001
                    _settle(job.future, exc=one_exc)
            return
        for job, result in zip(jobs, results, strict=True):
            _settle(job.future, result)


class EncodeBatcher(MicroBatcher[list[Item], np.ndarray]):
    """Embeddings: ``vectors = await batcher.encode(items)``; one ``model.encode`` call per batch of items.

    Items must already carry their instruction (``Item.with_instruction``), so requests with different instructions
    share a batch. ``max_batch`` counts items.
    """

    def __init__(self, model: Any, **options: Any) -> None:
        super().__init__(**options)
        self.model = model

    async def encode(self, items: Sequence[Item]) -> np.ndarray:
        """Embeddings of ``items`` as float32 ``[n, dim]``; errors of this request are raised here."""
        items = list(items)
        if not items:
            self.stats.requests += 1
            return np.zeros((0, self.model.dim), dtype=np.float32)
        return await self.submit(items)

    async def aclose(self) -> None:
        await super().aclose()
        self.thread.restart()

    def _size(self, payload: list[Item]) -> int:
        return len(payload)

    def _run_batch(self, payloads: list[list[Item]]) -> list[np.ndarray]:
        items = [item for payload in payloads for item in payload]
        vectors = np.asarray(self.model.encode(items, batch_size=max(len(items), 1)), dtype=np.float32)
        bounds = np.cumsum([0, *(len(p) for p in payloads)])
        return [vectors[bounds[i]:bounds[i + 1]] for i in range(len(payloads))]


class RerankBatcher(MicroBatcher[RerankJob, np.ndarray]):
    """Reranking: ``scores = await batcher.rerank(job)``; the shortlists of every waiting query are scored together
    (:func:`jfe.indexing.score_rerank_jobs`: pairs packed across queries). ``max_batch`` counts candidate pairs."""

    def __init__(self, reranker: Any, *, batch_size: int = 64, **options: Any) -> None:
        super().__init__(**options)
        self.reranker = reranker
        self.batch_size = batch_size

    async def rerank(self, job: RerankJob) -> np.ndarray:
        return await self.submit(job)

    def _size(self, payload: RerankJob) -> int:
        return max(1, len(payload.candidates))

    def _run_batch(self, payloads: list[RerankJob]) -> list[np.ndarray]:
        return score_rerank_jobs(self.reranker, payloads, self.batch_size)


def _settle(future: asyncio.Future, result: np.ndarray | None = None, exc: BaseException | None = None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
