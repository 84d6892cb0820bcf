"""Embed M-BEIR candidate pools with a model and write a searchable index: what ``jfe index build`` does.

This layer sits above :mod:`jfe.index` (which stores and searches vectors only) and :mod:`jfe.models`: it reads
the pools (:func:`read_pools`), embeds every candidate without instruction (in this process, or with Ray Data
across workers: :func:`encode_with_ray`), and fills a single or a sharded index (:func:`build_index`,
:func:`write_index`). ``meta.json`` records the model, the pools, the data root and the precision the vectors
were computed in.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import warnings
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jfe.data.items import Item, candidate_item
from jfe.data.mbeir import parse_candidate, read_pool_files
from jfe.data.records import Candidate
from jfe.errors import ConfigError, DataError
from jfe.hardware import cpu_bf16_flags
from jfe.index.build import RECALL_QUERIES, check_factory, index_vectors
from jfe.index.hits import Hit, hits_from
from jfe.index.lance import LanceIndex, check_lance_factory
from jfe.index.shards import ShardedIndex, split_rows
from jfe.index.vector_index import INDEX_KIND, VectorIndex
from jfe.models.base import Encoder, default_device, encode_batches
from jfe.models.onnx_backend import EXPORT_BACKENDS, check_backend, is_onnx_export
from jfe.models.precision import check_precision, resolve_precision
from jfe.models.registry import load_model, model_name_of
from jfe.paths import check_out_dir

logger = logging.getLogger(__name__)

#: where ``jfe index build`` keeps the vectors: a faiss index folder (JFE's own), or a LanceDB table
STORES: tuple[str, ...] = ("faiss", "lancedb")


def read_pools(pool_files: Sequence[str | os.PathLike]) -> list[Candidate]:
    """All candidates of the given pool files, each did once (the global pool repeats the local ones); the
    data layer's :func:`jfe.data.mbeir.read_pool_files`, whose errors name the file and the record."""
    return list(read_pool_files(pool_files)[0].values())


def build_index(model: Encoder, pool_files: Sequence[Path], data_root: Path, *, factory: str = "Flat",
                batch_size: int = 64, progress: bool = True, model_name: str | None = None,
                meta: dict[str, Any] | None = None, search_params: dict[str, float] | None = None,
                seed: int = 0, recall_queries: int = RECALL_QUERIES, precision: str = "auto") -> VectorIndex:
    """Embed every candidate of ``pool_files`` (no instruction) and index it with its M-BEIR record.

    ``precision`` (auto | fp32 | bf16) is the encoder's compute precision; the one it resolved to is kept in
    ``meta.json``, since queries should be encoded the same way.

    Image paths in the records stay relative to ``data_root`` (stored absolute in ``index.meta``), as
    M-BEIR keeps them. ``model_name`` is what ``jfe search`` reloads the model by (default: guessed from
    the model). Nothing is written here; call :meth:`VectorIndex.save` (atomic) or use :func:`write_index`.
    """
    check_factory(factory)
    candidates, vectors, info = embed_pool(model, pool_files, data_root, factory=factory, batch_size=batch_size,
                                           progress=progress, model_name=model_name, precision=precision)
    info.update(meta or {})
    return index_vectors([c.did for c in candidates], vectors, [c.to_json() for c in candidates], factory=factory,
                         search_params=search_params, seed=seed, recall_queries=recall_queries, meta=info)


def embed_pool(model: Encoder, pool_files: Sequence[Path], data_root: Path, *, factory: str, batch_size: int,
               progress: bool, model_name: str | None, precision: str
               ) -> tuple[list[Candidate], np.ndarray, dict[str, Any]]:
    """The pools' candidates, their vectors (pool order) and the index's meta (model, pools, data root, how the
    vectors were computed): what every index store is built from."""
    data_root = Path(data_root).resolve()
    candidates = read_pools(pool_files)
    if not candidates:
        raise DataError("no candidates in the pool file(s): " + ", ".join(str(p) for p in pool_files))
    vectors, precision_info = _encode_candidates(model, candidates, data_root, batch_size, progress, precision)
    info = pool_meta(model_name or model_name_of(model), model.arch, data_root, pool_files, factory)
    info.update(precision_info)
    return candidates, vectors, info


def pool_meta(model_name: str, arch: str | None, data_root: Path, pool_files: Sequence[Path],
              factory: str) -> dict[str, Any]:
    return {"model": model_name, "arch": arch, "data_root": str(data_root),
            "pool_files": [str(Path(p).resolve()) for p in pool_files], "factory": factory}


def _encode_candidates(model: Encoder, candidates: Sequence[Candidate], data_root: Path, batch_size: int,
                       progress: bool, precision: str) -> tuple[np.ndarray, dict[str, str]]:
    """The candidates' vectors (float32, pool order) and meta.json's record of their precision, resolved once."""
    info = precision_meta(model, precision)
    vectors = model.encode([candidate_item(c, data_root) for c in candidates], batch_size=batch_size,
                           progress=progress, desc="embed candidates", precision=info["precision"])
    return np.asarray(vectors, dtype=np.float32), info


def precision_meta(model: Encoder, precision: str) -> dict[str, str]:
    """``meta.json``'s record of how the vectors were computed: the backend (``torch``, ``onnx``, ``openvino``),
    the precision ``model`` really computes in for ``precision`` (``fp32``/``bf16``; an ONNX Runtime export's
    ``fp32``/``int8``), and ``vision_precision: bf16`` where the vision tower computed in bf16 too (torch's
    ``set_precision(..., vision="follow")``, OpenVINO's bf16)."""
    return model.compute_record(precision)


def write_index(out: Path, model: str, pool_files: Sequence[Path], data_root: Path, *, factory: str = "Flat",
                search_params: dict[str, float] | None = None, batch_size: int = 64, progress: bool = True,
                shards: int = 1, ray_address: str | None = None, seed: int = 0, precision: str = "auto",
                overwrite: bool = False, backend: str | None = None, store: str = "faiss") -> Any:
    """What ``jfe index build`` does: encode the pools, index them, write ``out`` atomically.

    ``shards > 1`` or ``ray_address`` writes a sharded index folder (:mod:`jfe.index.shards`); with
    ``ray_address`` the encoding runs as Ray Data tasks across the cluster's workers (the ``ray`` extra).
    The folder is built under a temporary name next to ``out`` and renamed into place, so a failed or
    killed build leaves any previous index at ``out`` untouched. A folder at ``out`` that is not an index is
    refused before any work unless ``overwrite``. ``backend`` (torch | onnx | openvino, default what ``model`` is) is
    recorded in meta.json with the precision, and searches of the index encode queries the same way.
    ``store="lancedb"`` writes a LanceDB table instead of a faiss index (:mod:`jfe.index.lance`; ``factory`` is then
    a LanceDB index type: Flat, IVF_PQ, IVF_HNSW_SQ).
    """
    check_out_dir(out, INDEX_KIND, overwrite=overwrite)
    if store not in STORES:
        raise ConfigError(f"unknown index store {store!r}: expected one of {', '.join(STORES)}")
    if store == "lancedb" and (shards > 1 or ray_address):
        raise ConfigError("--store lancedb writes one LanceDB table (LanceDB scales it on disk itself): drop "
                          "--shards / --ray")
    factory = check_lance_factory(factory) if store == "lancedb" else factory
    if store == "faiss":
        check_factory(factory)
    if backend in EXPORT_BACKENDS and ray_address:
        raise ConfigError(f"--ray encodes with PyTorch workers; the {backend} backend encodes in this process (drop "
                          f"--ray or --backend {backend})")
    if not is_onnx_export(model):  # an export computes in the precision it was exported in
        precision = check_precision(precision)
    if store == "lancedb":
        if search_params and "nprobe" in search_params:  # faiss's spelling (--nprobe) of LanceDB's nprobes
            search_params = {("nprobes" if k == "nprobe" else k): v for k, v in search_params.items()}
        candidates, vectors, meta = embed_pool(load_model(model, backend=backend), pool_files, data_root,
                                               factory=factory, batch_size=batch_size, progress=progress,
                                               model_name=model, precision=precision)
        meta["store"] = "lancedb"
        return LanceIndex.write(out, [c.did for c in candidates], vectors, [c.to_json() for c in candidates],
                                factory=factory, meta=meta, search_params=search_params, overwrite=overwrite,
                                seed=seed)
    if ray_address is None and shards <= 1:
        index = build_index(load_model(model, backend=backend), pool_files, data_root, factory=factory,
                            batch_size=batch_size, progress=progress, model_name=model, search_params=search_params,
                            seed=seed, precision=precision)
        index.save(out, overwrite=overwrite)
        return index
    return build_sharded(out, model, pool_files, data_root, factory=factory, search_params=search_params,
                         batch_size=batch_size, progress=progress, shards=max(shards, 2 if ray_address else 1),
                         ray_address=ray_address, seed=seed, precision=precision, overwrite=overwrite,
                         backend=backend)


def build_sharded(out: Path, model: str, pool_files: Sequence[Path], data_root: Path, *, factory: str,
                  search_params: dict[str, float] | None, batch_size: int, progress: bool, shards: int,
                  ray_address: str | None, seed: int = 0, precision: str = "auto",
                  overwrite: bool = False, backend: str | None = None) -> ShardedIndex:
    """Encode the pools (locally or with Ray), cut them into ``shards`` contiguous shards, write atomically."""
    data_root = Path(data_root).resolve()
    candidates = read_pools(pool_files)
    if not candidates:
        raise DataError("no candidates in the pool file(s): " + ", ".join(str(p) for p in pool_files))
    if ray_address:
        # one index, one precision: resolved once here and passed to every worker as it is, so the vectors do
        # not depend on which worker's hardware encoded them (meta.json records the resolved value)
        resolved = resolve_precision(precision, default_device())
        vectors = encode_with_ray(model, candidates, data_root, address=ray_address, workers=shards,
                                  batch_size=batch_size, precision=resolved)
        arch, precision_info = None, {"backend": "torch", "precision": str(resolved)}
    else:
        encoder = load_model(model, backend=backend)
        arch = encoder.arch
        vectors, precision_info = _encode_candidates(encoder, candidates, data_root, batch_size, progress, precision)
    meta = pool_meta(model, arch, data_root, pool_files, factory)
    meta.update(precision_info)
    meta["encoded_with"] = f"ray ({ray_address})" if ray_address else "one process"
    parts = []
    for start, stop in split_rows(len(candidates), shards):
        part = candidates[start:stop]
        parts.append(index_vectors([c.did for c in part], vectors[start:stop], [c.to_json() for c in part],
                                   factory=factory, search_params=search_params, seed=seed, meta=dict(meta)))
    index = ShardedIndex(parts, meta=meta, factory=factory)
    index.save(out, overwrite=overwrite)
    return index


def encode_with_ray(model: str, candidates: Sequence[Any], data_root: Path, *, address: str, workers: int,
                    batch_size: int, precision: str = "auto") -> np.ndarray:
    """Encode ``candidates`` (pool order) with Ray Data across ``workers`` actors; returns [n, dim] float32."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise ConfigError('--ray needs the optional Ray extra: pip install "jfe[ray]" (ray[data]>=2.10)') from None

    # Ray gives each worker one thread by default; results in bf16 depend on the thread count (up to 1.5e-3 per
    # coordinate between 1 and 2 threads, measured): workers compute with this process's count, as a build here would
    threads = torch.get_num_threads()

    class _Encode:
        def __init__(self) -> None:
            import torch

            from jfe.models.registry import load_model

            torch.set_num_threads(threads)
            self.encoder = load_model(model).set_precision(precision)

        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            from jfe.data.items import candidate_item
            from jfe.data.records import Candidate

            rows, vectors = [], []
            for group in batch["group"]:  # one encoder batch of the single-process build, encoded whole
                members = json.loads(group)
                items = [candidate_item(Candidate(**record), Path(str(data_root))) for record in members["records"]]
                vectors.append(self.encoder.encode(items, batch_size=len(items), progress=False))
                rows.extend(members["rows"])
            return {"row": np.asarray(rows, dtype=np.int64),
                    "vector": np.concatenate(vectors).astype(np.float32, copy=False)}

    started_here = False
    if not ray.is_initialized():
        _connect_ray(ray, address)
        started_here = True
    try:
        # the batches a single-process encode runs (encode_batches): under bf16 a vector depends a little on what it
        # is batched with, so the workers encode exactly those batches and the index is the one process's
        items = [candidate_item(c, data_root) for c in candidates]
        groups = [{"group": json.dumps({"rows": rows, "records": [candidates[i].to_json() for i in rows]})}
                  for rows in encode_batches(items, batch_size)]
        dataset = ray.data.from_items(groups, override_num_blocks=min(len(groups), max(workers, 1) * 2))
        encoded = dataset.map_batches(_Encode, batch_size=1, concurrency=workers, batch_format="numpy")
        out: np.ndarray | None = None
        for batch in encoded.iter_batches(batch_size=None, batch_format="numpy"):
            if out is None:
                out = np.empty((len(candidates), batch["vector"].shape[1]), dtype=np.float32)
            out[batch["row"]] = batch["vector"]
        assert out is not None
        return out
    finally:
        if started_here:
            ray.shutdown()


def _connect_ray(ray: Any, address: str) -> None:
    """``local``: a Ray instance in this process's machine; ``auto``: the running cluster if there is one, else
    a local instance (what a user typing ``--ray auto`` on a laptop expects); anything else: that address, with
    a clear error when nothing answers there."""
    if address == "auto":
        try:
            ray.init(address="auto", ignore_reinit_error=True, log_to_driver=False)
            return
        except ConnectionError:
            logger.info("no running Ray cluster found: starting a local Ray instance")
            address = "local"
    try:
        ray.init(address=None if address == "local" else address, ignore_reinit_error=True, log_to_driver=False)
    except ConnectionError as exc:
        raise ConfigError(f"--ray {address}: no Ray cluster answers there ({exc}); start one (`ray start --head`) "
                          f"or use --ray auto / --ray local for a local instance") from None


def query_backend(meta: dict[str, Any], model: str, backend: str | None = None) -> str | None:
    """The backend to encode queries against an index with: ``backend`` when given, else the one the index's
    ``meta.json`` records when ``model`` is the model that built it (None: what ``model`` is)."""
    return check_backend(backend) or (meta.get("backend") if str(model) == str(meta.get("model")) else None)


def query_precision(meta: dict[str, Any], precision: str | None = "auto",
                    model: Encoder | None = None) -> tuple[str, str | None]:
    """``(precision, vision)`` to encode queries against an index with: ``"auto"`` (or None) follows what the
    index's ``meta.json`` records (the precision its vectors were computed in, and ``vision: "follow"`` where
    its images went through the vision tower in bf16), so ``jfe search``, ``jfe.search`` and ``jfe serve``
    encode queries as the pool was. An explicit precision other than the index's is used, with a warning.
    An ONNX Runtime ``model`` computes in its export's precision: ``auto`` stays ``auto``; an OpenVINO one follows
    the index where its CPU can (bf16 needs native bf16)."""
    if model is not None and model.backend == "onnx":
        return model.resolve_compute(precision)[0], None
    requested = check_precision(precision or "auto")
    # (an index built by an int8 export gives torch no precision to follow; an fp32 export's is fp32)
    built = meta.get("precision") if meta.get("precision") in ("fp32", "bf16") else None
    if requested == "auto":
        chosen = built or "auto"
    else:
        chosen = requested
        if built is not None and requested != built:
            warnings.warn(f"queries will be encoded in {requested}, but the index's vectors were computed in "
                          f"{built} (meta.json): rankings may differ slightly; --precision auto follows the index",
                          stacklevel=2)
    vision = "follow" if chosen == "bf16" and meta.get("vision_precision") == "bf16" else None
    if model is not None and model.backend == "openvino":
        if chosen == "bf16" and requested == "auto" and not cpu_bf16_flags():
            chosen = "auto"  # an index built in bf16 elsewhere: this CPU computes in fp32
        return model.resolve_compute(chosen)[0], None
    return chosen, vision


@dataclass
class RerankJob:
    """One query's shortlist for a reranker: its candidates, and the first stage's scores of them (``prior``) or
    the retriever that computes them."""

    query: Item
    candidates: list[Item]
    prior: list[float] | None
    retriever: Encoder | None
    precision: str | None = None


def score_rerank_jobs(reranker: Any, jobs: Sequence[RerankJob], batch_size: int = 64) -> list[np.ndarray]:
    """Each job's scores (its candidates' order), from as few ``reranker.rerank`` calls as the jobs allow: jobs
    carrying the first stage's scores go together, jobs whose scores a retriever computes go per retriever (and
    per precision)."""
    groups: dict[tuple[int, str | None], list[int]] = {}
    out: dict[int, np.ndarray] = {}
    for i, job in enumerate(jobs):
        if not job.candidates:  # an empty shortlist needs no reranker call
            out[i] = np.zeros(0, dtype=np.float32)
            continue
        groups.setdefault((id(job.retriever) if job.prior is None else 0, job.precision), []).append(i)
    for rows in groups.values():
        group = [jobs[i] for i in rows]
        priors = None if group[0].prior is None else [job.prior for job in group]
        scores = reranker.rerank([job.query for job in group], [job.candidates for job in group], priors,
                                 retriever=group[0].retriever, batch_size=batch_size, precision=group[0].precision)
        out.update(zip(rows, scores, strict=True))
    return [out[i] for i in range(len(jobs))]


def ranked_hits(index: Any, query: Item, vector: np.ndarray, k: int, *, exclude: Collection[str] | None = None,
                reranker: Any = None, rerank_k: int = 50, precision: str | None = None) -> list[Hit]:
    """One query's top ``k`` hits in ``index`` (``vector``: its embedding ``[1, d]``), what ``jfe.search`` and
    ``jfe search`` return (``POST /search`` runs the same three steps, scoring through its micro-batcher). With
    ``reranker``, the first ``rerank_k`` are searched and reordered by it and each hit says where the retriever had
    put it: :func:`first_stage_hits`, :func:`rerank_job`, :func:`score_rerank_jobs`, :func:`reordered`."""
    ids, scores = first_stage_hits(index, vector, k, exclude=exclude,
                                   rerank_k=rerank_k if reranker is not None else None)
    if reranker is None:
        return hits_from(index, ids[:k], scores[:k])
    job = rerank_job(reranker, index, query, ids, scores, rerank_k=rerank_k, precision=precision)
    ids, scores, firsts = reordered(ids, scores, score_rerank_jobs(reranker, [job])[0])
    return hits_from(index, ids[:k], scores[:k], firsts[:k])


def first_stage_hits(index: Any, vector: np.ndarray, k: int, *, exclude: Collection[str] | None = None,
                     rerank_k: int | None = None) -> tuple[list[str], list[float]]:
    """The retriever's ranked ``(ids, scores)`` for one query: its top ``k``, or ``max(k, rerank_k)`` when a
    reranker will reorder the first ``rerank_k``."""
    depth = max(k, rerank_k) if rerank_k is not None else k
    ids, scores = index.search(vector, depth, exclude=[set(exclude)] if exclude else None)
    return list(ids[0]), scores[0].tolist()


def rerank_job(reranker: Any, index: Any, query: Item, ids: Sequence[str], scores: Sequence[float], *,
               rerank_k: int, precision: str | None = None) -> RerankJob:
    """What ``reranker`` (:class:`jfe.models.rerankers.Reranker`) scores to reorder a query's first ``rerank_k``
    hits (``ids``, ``scores``: the first stage's ranking), for :func:`score_rerank_jobs`.

    The candidates are rebuilt from the index's stored records (images relative to its ``data_root``); a hit
    without one is a :class:`DataError` naming it. The index's scores are the reranker's first stage when the
    index was built by the retriever it was trained on; otherwise that retriever scores the shortlist itself.
    """
    short = list(ids[:rerank_k])
    root = Path(getattr(index, "meta", {}).get("data_root") or ".")
    candidates = []
    for did in short:
        record = index.record(did)
        if not record:
            raise DataError(f"candidate {did!r} has no stored record in the index, so it cannot be reranked "
                            f"(build the index from pool files: `jfe index build`)", record_id=did)
        candidates.append(candidate_item(parse_candidate(record, path=f"the index's record of {did}"), root))
    trained_on = getattr(reranker.config, "retriever", None)
    prior, retriever = None, None
    if getattr(index, "meta", {}).get("model") == trained_on or not trained_on:
        prior = list(map(float, scores[:len(short)]))
    else:
        retriever = first_stage_retriever(reranker)
    return RerankJob(query, candidates, prior, retriever, precision)


def reordered(ids: Sequence[str], scores: Sequence[float], new: np.ndarray
              ) -> tuple[list[str], list[float], list[int]]:
    """A ranking whose first ``len(new)`` hits are reordered by their reranker scores ``new``; the hits below
    keep their order (and scores shifted below the reranked ones, so scores stay sorted). Returns ``(ids,
    scores, first_stage_ranks)`` (ranks from 1)."""
    n = len(new)
    order = np.argsort(-np.asarray(new), kind="stable")
    ranked = [ids[i] for i in order] + list(ids[n:])
    tail = [float(s) for s in scores[n:]]
    if tail and n:
        shift = max(0.0, tail[0] - float(np.min(new)) + 1e-3)
        tail = [s - shift for s in tail]
    new_scores = [float(new[i]) for i in order] + tail
    first_ranks = [int(i) + 1 for i in order] + list(range(n + 1, len(ids) + 1))
    return ranked, new_scores, first_ranks


def first_stage_retriever(reranker: Any) -> Encoder | None:
    """The retriever a reranker was trained on (``config.retriever``), loaded once per process: it scores a
    shortlist when the caller has no first-stage scores of its own. None for a reranker that scores pairs alone
    (``reads_first_stage`` false: an HF yes/no reranker), which needs no first stage."""
    name = getattr(reranker.config, "retriever", None)
    return _loaded_retriever(name) if name else None


@functools.lru_cache(maxsize=4)
def _loaded_retriever(name: str) -> Encoder:
    return load_model(name)
