"""Micro-batching: concurrent requests share encode calls, results stay per request, errors stay isolated."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from jfe.data.items import Item
from jfe.errors import DataError
from jfe.indexing import build_index
from jfe.models.toy import ToyEncoder
from jfe.serve.app import create_app
from jfe.serve.batching import EncodeBatcher
from jfe.serve.schemas import ServeSettings


class RecordingModel:
    """Wraps the toy encoder: records every encode call's size and which thread ran it; can be slow."""

    def __init__(self, delay: float = 0.0) -> None:
        self.inner, self.delay = ToyEncoder(), delay
        self.calls: list[int] = []
        self.threads: set[str] = set()
        self.dim = self.inner.dim

    def encode(self, items, batch_size: int = 32, **_):  # noqa: ANN001, ANN201
        self.calls.append(len(items))
        self.threads.add(threading.current_thread().name)
        if any(item.text == "boom" for item in items):
            raise DataError("cannot encode 'boom'", record_id="query")
        time.sleep(self.delay)
        return self.inner.encode(items, batch_size=batch_size)


def run(coro):  # noqa: ANN001, ANN201
    return asyncio.run(coro)


def test_concurrent_requests_are_batched_and_results_stay_in_order() -> None:
    model = RecordingModel(delay=0.02)
    batcher = EncodeBatcher(model, max_batch=64, max_wait_ms=30)
    texts = [f"word{i} other{i % 3}" for i in range(20)]

    async def main():  # noqa: ANN202
        out = await asyncio.gather(*(batcher.encode([Item(text=t)]) for t in texts))
        await batcher.aclose()
        return out

    results = run(main())
    np.testing.assert_allclose(np.concatenate(results), model.inner.encode(texts), atol=1e-6)
    assert sum(model.calls) == 20
    assert len(model.calls) < 20  # fewer forward passes than requests
    assert batcher.stats.requests == 20 and batcher.stats.items == 20
    assert len(model.threads) == 1  # the model only ever runs on the one worker thread


def test_max_batch_is_respected() -> None:
    model = RecordingModel(delay=0.01)
    batcher = EncodeBatcher(model, max_batch=4, max_wait_ms=50)

    async def main():  # noqa: ANN202
        out = await asyncio.gather(*(batcher.encode([Item(text=f"t{i}")]) for i in range(13)))
        await batcher.aclose()
        return out

    results = run(main())
    assert len(results) == 13 and max(model.calls) <= 4 and sum(model.calls) == 13
    assert batcher.stats.largest_batch == max(model.calls)


def test_multi_item_requests_keep_their_rows() -> None:
    model = RecordingModel()
    batcher = EncodeBatcher(model, max_batch=8, max_wait_ms=20)
    groups = [[f"a{i}", f"b{i}", f"c{i}"] for i in range(5)]

    async def main():  # noqa: ANN202
        out = await asyncio.gather(*(batcher.encode([Item(text=t) for t in g]) for g in groups))
        await batcher.aclose()
        return out

    for group, vectors in zip(groups, run(main()), strict=True):
        assert vectors.shape == (3, model.dim)
        np.testing.assert_allclose(vectors, model.inner.encode(group), atol=1e-6)


def test_disabled_batching_encodes_each_request_alone() -> None:
    model = RecordingModel(delay=0.01)
    batcher = EncodeBatcher(model, enabled=False)

    async def main():  # noqa: ANN202
        out = await asyncio.gather(*(batcher.encode([Item(text=f"t{i}")]) for i in range(6)))
        await batcher.aclose()
        return out

    results = run(main())
    assert model.calls == [1] * 6 and len(results) == 6
    assert batcher.stats.batches == 6


def test_a_bad_request_does_not_fail_its_batch_mates() -> None:
    model = RecordingModel()
    batcher = EncodeBatcher(model, max_batch=16, max_wait_ms=30)

    async def main():  # noqa: ANN202
        out = await asyncio.gather(batcher.encode([Item(text="fine one")]), batcher.encode([Item(text="boom")]),
                                   batcher.encode([Item(text="fine two")]), return_exceptions=True)
        await batcher.aclose()
        return out

    good1, bad, good2 = run(main())
    assert isinstance(bad, DataError)
    np.testing.assert_allclose(good1[0], model.inner.encode(["fine one"])[0], atol=1e-6)
    np.testing.assert_allclose(good2[0], model.inner.encode(["fine two"])[0], atol=1e-6)


def test_empty_request_needs_no_model_call() -> None:
    model = RecordingModel()
    batcher = EncodeBatcher(model)
    assert run(batcher.encode([])).shape == (0, model.dim)
    assert model.calls == []


def test_batcher_survives_a_new_event_loop() -> None:
    model = RecordingModel()
    batcher = EncodeBatcher(model, max_wait_ms=1)
    first = run(batcher.encode([Item(text="x")]))
    second = run(batcher.encode([Item(text="x")]))  # another loop: the worker is recreated there
    np.testing.assert_allclose(first, second)


@pytest.mark.parametrize("batching", [True, False])
def test_concurrent_http_requests_through_the_app(tiny_mbeir: Path, batching: bool) -> None:
    model = RecordingModel(delay=0.02)
    pools = sorted((tiny_mbeir / "cand_pool" / "global").glob("*.jsonl"))
    index = build_index(model.inner, pools, tiny_mbeir, progress=False)
    app = create_app(model, index, ServeSettings(batching=batching, max_wait_ms=30, max_batch=32))
    queries = [f"a red square {i}" for i in range(12)]

    async def main():  # noqa: ANN202
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            responses = await asyncio.gather(*(client.post("/search", json={"text": q, "k": 3}) for q in queries))
            health = (await client.get("/health")).json()
        await app.state.batcher.aclose()
        return responses, health

    responses, health = run(main())
    for query, response in zip(queries, responses, strict=True):
        assert response.status_code == 200
        expected, _ = index.search(model.inner.encode([query]), 3)
        assert [h["did"] for h in response.json()["results"]] == expected[0]
    assert health["stats"]["requests"] == 12
    if batching:
        assert health["stats"]["batches"] < 12
    else:
        assert health["stats"]["batches"] == 12 and model.calls == [1] * 12


class RecordingReranker:
    """Wraps a reranker: records every rerank call's number of queries and the thread that ran it."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.config = inner.config  # type: ignore[attr-defined]
        self.calls: list[int] = []
        self.threads: set[str] = set()

    def rerank(self, queries, candidates, first_stage=None, **options):  # noqa: ANN001, ANN003, ANN201
        self.calls.append(len(queries))
        self.threads.add(threading.current_thread().name)
        time.sleep(0.02)
        return self.inner.rerank(queries, candidates, first_stage, **options)  # type: ignore[attr-defined]


def _rerank_service(tiny_mbeir: Path, max_wait_ms: float):  # noqa: ANN202
    import torch

    from jfe.models.rerankers import JointRerankConfig, JointReranker

    joint = JointReranker(JointRerankConfig(grid=2, retriever="toy")).eval()
    with torch.no_grad():
        joint.head[-1].weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))  # type: ignore[union-attr]
    model, reranker = RecordingModel(), RecordingReranker(joint)
    pools = sorted((tiny_mbeir / "cand_pool" / "global").glob("*.jsonl"))
    index = build_index(model.inner, pools, tiny_mbeir, progress=False, model_name="toy")
    app = create_app(model, index, ServeSettings(max_wait_ms=max_wait_ms), {"joint": reranker})
    return app, model, reranker, joint, index


def _reranked_searches(app, queries: list[str], threads: int | None = None) -> list[httpx.Response]:  # noqa: ANN001
    async def main():  # noqa: ANN202
        if threads is not None:  # the threadpool starlette runs blocking work on
            import anyio.to_thread

            anyio.to_thread.current_default_thread_limiter().total_tokens = threads
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            out = await asyncio.gather(*(client.post("/search", json={"text": q, "k": 3, "rerank": "joint",
                                                                     "rerank_k": 5}) for q in queries))
        await app.state.batcher.aclose()
        return out

    return run(main())


def test_concurrent_reranked_searches_share_rerank_calls_on_the_model_thread(tiny_mbeir: Path) -> None:
    import jfe

    app, model, reranker, joint, index = _rerank_service(tiny_mbeir, max_wait_ms=30)
    queries = [f"a red square {i}" for i in range(8)]
    responses = _reranked_searches(app, queries)
    for query, response in zip(queries, responses, strict=True):
        assert response.status_code == 200, response.text
        alone = jfe.search(index, query, model=model.inner, k=3, rerank=joint, rerank_k=5)
        assert [h["did"] for h in response.json()["results"]] == [h["did"] for h in alone]
        assert [h["first_stage_rank"] for h in response.json()["results"]] == [h["first_stage_rank"] for h in alone]
    assert sum(reranker.calls) == 8 and len(reranker.calls) < 8  # shortlists of several requests per call
    assert reranker.threads == model.threads and len(model.threads) == 1  # one model thread for both


def test_a_reranked_search_holds_no_worker_thread_while_it_waits_for_its_batch(tiny_mbeir: Path) -> None:
    """With one worker thread, requests waiting in the rerank batcher must not hold it: the others still reach
    the batcher and share its call (a request that blocked a thread there would leave them queued behind it)."""
    app, _, reranker, _, _ = _rerank_service(tiny_mbeir, max_wait_ms=300)
    responses = _reranked_searches(app, [f"a red square {i}" for i in range(4)], threads=1)
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    assert sum(reranker.calls) == 4 and len(reranker.calls) < 4
