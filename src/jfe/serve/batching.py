"""Micro-batching: concurrent requests are queued and encoded together in one worker.

A forward pass over 32 items costs far less than 32 passes over one item, so under load the service
collects what arrived while the previous batch ran (or within ``max_wait_ms`` of the first waiting
request) and hands it to ``model.encode`` in one call. The model only ever runs on one thread (a
single-worker executor): torch modules are not safe to call concurrently, and the event loop stays
free to accept requests meanwhile. A lone request on an idle service is sent at once (no wait), so
batching costs a single user nothing. With ``enabled=False`` every request is encoded on its own (still on
that one thread), which is the baseline the load benchmark compares against.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from jfe.data.items import Item


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


@dataclass
class _Job:
    items: list[Item]
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)


class EncodeBatcher:
    """Queue ``encode`` calls from many coroutines and run them as few ``model.encode`` calls as possible.

    Use from async code: ``vectors = await batcher.encode(items)``. Items must already carry their
    instruction (``Item.with_instruction``), so requests with different instructions share a batch.
    """

    def __init__(self, model, *, enabled: bool = True, max_batch: int = 32, max_wait_ms: float = 5.0) -> None:  # noqa: ANN001
        self.model = model
        self.enabled = enabled
        self.max_batch = max(1, int(max_batch))
        self.max_wait = max(0.0, float(max_wait_ms)) / 1000.0
        self.stats = BatchStats()
        self._last_batch = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jfe-encode")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: deque[_Job] = deque()
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

    # ------------------------------------------------------------------------------------ public
    async def encode(self, items: Sequence[Item]) -> np.ndarray:
        """Embeddings of ``items`` as float32 ``[n, dim]``; errors of this request are raised here."""
        items = list(items)
        self.stats.requests += 1
        if not items:
            return np.zeros((0, self.model.dim), dtype=np.float32)
        loop = asyncio.get_running_loop()
        if not self.enabled:
            self._count(len(items))
            return await loop.run_in_executor(self._executor, self._encode_now, items)
        self._ensure_worker(loop)
        assert self._wake is not None, "_ensure_worker creates the event"
        job = _Job(items, loop.create_future())
        self._pending.append(job)
        self._wake.set()
        return await job.future

    async def aclose(self) -> None:
        """Stop the worker; requests still queued fail with RuntimeError."""
        if self._worker is not None and not self._worker.done():
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        self._worker = None
        while self._pending:
            job = self._pending.popleft()
            if not job.future.done():
                job.future.set_exception(RuntimeError("the encoder is shutting down"))
        self._executor.shutdown(wait=False, cancel_futures=True)
        # A fresh (thread-less until used) executor, so an app restarted by its lifespan still works.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jfe-encode")

    # ------------------------------------------------------------------------------------ internals
    def _encode_now(self, items: list[Item]) -> np.ndarray:
        return np.asarray(self.model.encode(items, batch_size=max(len(items), 1)), dtype=np.float32)

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
            self._worker = loop.create_task(self._run(), name="jfe-encode-batcher")

    def _take_batch(self) -> list[_Job]:
        jobs: list[_Job] = []
        n = 0
        while self._pending and (not jobs or n + len(self._pending[0].items) <= self.max_batch):
            job = self._pending.popleft()
            jobs.append(job)
            n += len(job.items)
        return jobs

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            # Wait for company until the batch is full or the oldest request has waited max_wait. A lone request
            # after a lone batch is sent at once: no load, nothing to batch with, so waiting only adds latency.
            under_load = self._last_batch > 1 or len(self._pending) > 1
            wait = self.max_wait if under_load else 0.0
            while self._pending and sum(len(j.items) for j in self._pending) < self.max_batch:
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

    async def _process(self, jobs: list[_Job]) -> None:
        loop = asyncio.get_running_loop()
        items = [item for job in jobs for item in job.items]
        self._count(len(items))
        try:
            vectors = await loop.run_in_executor(self._executor, self._encode_now, items)
        except Exception as exc:  # noqa: BLE001 - handed to the waiting requests
            if len(jobs) == 1:
                _settle(jobs[0].future, exc=exc)
                return
            # One bad request must not fail the others: encode each request alone.
            for job in jobs:
                try:
                    _settle(job.future, await loop.run_in_executor(self._executor, self._encode_now, job.items))
                except Exception as one_exc:  # noqa: BLE001
                    _settle(job.future, exc=one_exc)
            return
        start = 0
        for job in jobs:
            _settle(job.future, vectors[start:start + len(job.items)])
            start += len(job.items)


def _settle(future: asyncio.Future, result: np.ndarray | None = None, exc: BaseException | None = None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
