"""The M-BEIR evaluation protocol (docs/index_eval.md), for MiniBEIR and the real M-BEIR layout.

1. Queries: every ``query/{split}/*.jsonl``; positives from ``qrels/{split}/<stem>_qrels.txt`` where present
   (as UniIR scores), else the query's ``pos_cand_list``. Each query gets the instruction chosen
   deterministically by :func:`jfe.data.instructions.pick_instruction` for its (dataset id, query
   modality, candidate modality) key, :func:`jfe.data.instructions.instruction_key` (the task's candidate
   modality, else its first positive's in the pools read); its text is ``with_instruction(instruction, query_txt)``.
2. Candidates: ``local`` = each query file's own pool (``mbeir_<ds>_task<k>_cand_pool.jsonl``), ``global``
   = the union pool of the split (``cand_pool/global/*<split>*``; all global files if none is named so).
   Every unique candidate is embedded once, by its content (pools share candidates), without instruction.
3. Search: inner product over the L2-normalised vectors (exact, :class:`jfe.index.VectorIndex`), top
   ``max(ks)``, each query's ``exclude_dids`` (``query_src_content``) removed from its own ranking (CIRR's
   convention: a composed query's reference image is not a hit). Equal scores rank in pool-file order.
4. Metrics: M-BEIR Recall@k = hit rate (:mod:`jfe.eval.metrics`), averaged per (dataset, task); per
   category = mean over the (dataset, task) rows of its tasks; plus breakdowns per modification type and
   per ``non_additive`` flag (MiniBEIR records both in ``query_src_content``). Queries none of whose
   positives is in the pool score 0 and are counted and listed.

Embeddings are cached per model (a fingerprint of its config and weights) and per item content in
``out_dir/embeddings`` (or ``cache_dir``), so a rerun, or the other pool, only searches.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from jfe.data.images import content_digest
from jfe.data.instructions import TEXT_MODES, TextMode, instruction_key, instruction_set_for, pick_instruction
from jfe.data.items import Item, candidate_item, query_item
from jfe.data.mbeir import MBEIRLayout, read_instructions, read_pool_files, read_qrels, read_queries
from jfe.data.records import CATEGORIES, FUSION_CATEGORIES, TASK_CATEGORY, TASKS, Candidate, InstructionSet, Query
from jfe.errors import ConfigError, DataError
from jfe.eval.metrics import DEFAULT_KS, PRIMARY_METRIC, first_hit_rank, headline_k, recall_at_ks, recall_k, recall_key
from jfe.eval.runfiles import write_trec_run, write_tsv
from jfe.paths import atomic_write, check_writable_path

if TYPE_CHECKING:
    from jfe.index.vector_index import VectorIndex
    from jfe.models.base import Encoder

RESULTS_FILE = "results.json"
RUN_FILE = "run.trec"
FIRST_STAGE_RUN_FILE = "run.first_stage.trec"  # beside run.trec when a reranker reordered the first stage
TSV_FILE = "results.tsv"
CATEGORY_TSV_FILE = "categories.tsv"
PER_QUERY_FILE = "per_query.jsonl"
HELDOUT_INSTRUCTIONS = "heldout_instructions.tsv"
HIT_RATE_NOTE = "Recall@k is M-BEIR's hit rate: 1 if any positive is in the top k."
EXCLUSION_NOTE = ("Each query's exclude_dids (e.g. the reference image of a composed query) are removed from its own "
                  "ranking before scoring (CIRR's convention).")
_STEM = re.compile(r"^mbeir_(?P<dataset>.+?)_task(?P<task>\d+)(?:_(?:train|val|test|dev))?$")
# every result carries these; anything else in EvalResult.notes is about this run (and jfe eval prints it)
STANDARD_NOTES = (EXCLUSION_NOTE, HIT_RATE_NOTE)


# ------------------------------------------------------------------------------------------------ result
@dataclass
class EvalResult:
    """Everything one evaluation measured; ``results.json`` is its JSON form (``EvalResult.load`` reads it)."""

    run_name: str
    model: str
    data_root: str
    split: str
    pool: str
    instructions: str
    ks: list[int]
    rows: list[dict[str, Any]]  # one per (dataset, task): dataset, task, modality, category, pool, queries, R@k
    categories: dict[str, dict[str, Any]]  # category -> {"tasks": [...], "rows": n, "fusion": bool, "R@k": ...}
    average: dict[str, float]  # mean over rows
    modifications: list[dict[str, Any]] = field(default_factory=list)  # per (task, modification type)
    non_additive: list[dict[str, Any]] = field(default_factory=list)  # per (task, non_additive flag)
    missing_positives: dict[str, Any] = field(default_factory=dict)  # count + example qids per row
    n_queries: int = 0
    n_candidates: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    arch: str = ""
    fusion_role: str = ""  # the model's declared role (Encoder.fusion_role) or the study's for this run
    reranker: str | None = None  # the reranker that reordered each query's first-stage top rerank_k, if any
    rerank_k: int | None = None
    # how the embeddings were computed: {"backend": "torch" | "onnx" | "openvino", "precision": ...}
    # (Encoder.compute_record)
    compute: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> EvalResult:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in obj.items() if k in known})

    @classmethod
    def load(cls, path: str | os.PathLike) -> EvalResult:
        """Read ``results.json`` (or the folder that holds it)."""
        path = Path(path)
        if path.is_dir():
            path = path / RESULTS_FILE
        if not path.is_file():
            raise DataError("no evaluation results here (results.json missing)", path=str(path))
        try:
            return cls.from_json(json.loads(path.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, TypeError) as exc:
            raise DataError(f"malformed results file ({exc})", path=str(path)) from None

    def save(self, path: str | os.PathLike) -> None:
        with atomic_write(path) as handle:
            handle.write(json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n")

    def task_score(self, task: int, metric: str = PRIMARY_METRIC) -> float | None:
        """Mean of ``metric`` over the rows of one task id (None when the task is absent)."""
        values = [r[metric] for r in self.rows if r["task"] == task]
        return float(np.mean(values)) if values else None


# ------------------------------------------------------------------------------------------------ inputs
@dataclass
class _QueryFile:
    path: Path
    dataset: str
    queries: list[Query]
    positives: list[set[str]]
    pool_files: list[Path]


def dataset_of(stem: str) -> str:
    """``mbeir_cirr_task7_test`` -> ``cirr``; other names are kept whole."""
    match = _STEM.match(stem)
    return match.group("dataset") if match else stem


def _global_pool_files(layout: MBEIRLayout, split: str) -> list[Path]:
    files = layout.global_pool_files()
    named = [f for f in files if re.search(rf"(^|_){re.escape(split)}(_|$)", f.stem)]
    return named or files


def _load_query_files(layout: MBEIRLayout, split: str, pool: str, max_queries: int | None,
                      keep: Callable[[Query], bool] | None = None) -> list[_QueryFile]:
    query_files = layout.query_files(split)
    if not query_files:
        raise DataError(f"no query files for split {split!r}", path=str(layout.root / "query" / split))
    global_files = _global_pool_files(layout, split) if pool == "global" else []
    if pool == "global" and not global_files:
        raise DataError("no global candidate pool", path=str(layout.root / "cand_pool" / "global"))
    out = []
    for path in query_files:
        queries = read_queries(path)
        if keep is not None:
            queries = [q for q in queries if keep(q)]
        if max_queries is not None:
            queries = queries[:max_queries]
        qrels_path = layout.root / "qrels" / split / f"{path.stem}_qrels.txt"
        qrels = read_qrels(qrels_path) if qrels_path.is_file() else None
        positives = [set(qrels.get(q.qid, ())) if qrels is not None else set(q.pos_cand_list) for q in queries]
        if pool == "local":
            local = layout.local_pool_for(path)
            if local is None:
                expected = " or ".join(f"cand_pool/local/{n}" for n in layout.local_pool_names(path))
                raise DataError(f"no local candidate pool for this query file (expected {expected})", path=str(path))
            pools = [local]
        else:
            pools = global_files
        out.append(_QueryFile(path, dataset_of(path.stem), queries, positives, pools))
    return out


# ------------------------------------------------------------------------------------------------ cache
def model_fingerprint(model: Encoder) -> str:
    """A short hash of the model's arch, config and weights: embeddings cached under it stay valid."""
    import torch

    from jfe.models.base import compute_of
    from jfe.models.precision import resolve_precision

    digest = hashlib.sha1()
    # an Encoder's config is pydantic; any other encoder-like object is fingerprinted by its config's repr
    config: object = getattr(model, "config", None)
    dumped = config.model_dump() if hasattr(config, "model_dump") else repr(config)
    computed = compute_of(model)
    if computed:  # backend, precision, vision precision: bf16 or int8 vectors differ slightly
        tags = [value for key, value in sorted(computed.items()) if (key, value) not in (("backend", "torch"),
                                                                                           ("precision", "fp32"))]
    else:
        precision = resolve_precision(getattr(model, "precision", "fp32"), model.device)
        tags = [precision] if precision != "fp32" else []
    # an ONNX export has no torch weights: its graphs' digests stand in for them
    tags += list(getattr(model, "graph_digests", ()))
    digest.update(json.dumps([model.arch, dumped] + tags, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def _item_key(text: str | None, image: str | None) -> str:
    """The cache key of an item: its text and its image's *content* digest (not its path: a file replaced
    under the same name must not be served its old vector)."""
    return hashlib.sha1(json.dumps([text, image], ensure_ascii=False).encode()).hexdigest()


def _image_digest(root: Path, rel: str | None, record_id: str) -> str | None:
    return content_digest(root / rel, item_id=record_id) if rel else None


class EmbeddingCache:
    """Vectors by item-content key for one model, in ``<dir>/<fingerprint>/{keys.txt,vectors.npy}``."""

    def __init__(self, directory: Path | None, fingerprint: str) -> None:
        self.dir = Path(directory) / fingerprint if directory is not None else None
        self.vectors: dict[str, np.ndarray] = {}
        self.dirty = False
        if self.dir is not None and (self.dir / "keys.txt").is_file() and (self.dir / "vectors.npy").is_file():
            keys = (self.dir / "keys.txt").read_text().split()
            matrix = np.load(self.dir / "vectors.npy")
            if len(keys) == len(matrix):  # else: a torn cache from an old crash; recompute
                self.vectors = dict(zip(keys, matrix, strict=True))

    def embed(self, model: Encoder, keys: list[str], items: list[Item], batch_size: int, progress: bool,
              desc: str) -> np.ndarray:
        todo = [i for i, key in enumerate(keys) if key not in self.vectors]
        # several items may share one key (same content): embed each key once
        unique: dict[str, int] = {}
        for i in todo:
            unique.setdefault(keys[i], i)
        if unique:
            fresh = model.encode([items[i] for i in unique.values()], batch_size=batch_size, progress=progress,
                                 desc=desc)
            for key, vec in zip(unique, np.asarray(fresh, dtype=np.float32), strict=True):
                self.vectors[key] = vec
            self.dirty = True
        if not keys:
            return np.zeros((0, model.dim), dtype=np.float32)
        return np.stack([self.vectors[key] for key in keys]).astype(np.float32, copy=False)

    def save(self) -> None:
        if self.dir is None or not self.dirty:
            return
        keys = list(self.vectors)
        self.dir.mkdir(parents=True, exist_ok=True)
        with atomic_write(self.dir / "vectors.npy", mode="wb") as handle:
            np.save(handle, np.stack([self.vectors[k] for k in keys]))
        with atomic_write(self.dir / "keys.txt") as handle:
            handle.write("\n".join(keys) + "\n")
        self.dirty = False


# ------------------------------------------------------------------------------------------------ evaluate
# evaluate() runs five named steps: read -> embed -> rank -> score -> write. The rank step is public and the
# score step is jfe.eval.metrics.recall_at_ks, because training validation (jfe.train.trainer) ranks and
# scores its capped pools with them too.
@dataclass
class _Inputs:
    """What the read step found: the query files, every candidate of their pools, the instruction sets."""

    root: Path
    files: list[_QueryFile]
    candidates: dict[str, Candidate]
    pool_dids: dict[Path, list[str]]
    instruction_sets: dict[tuple[str, str, str], InstructionSet]


@dataclass
class _Scored:
    """What the score step produced: run-file rows, per-query entries and one row per (dataset, task, file)."""

    run_rows: list[tuple[str, list[str], list[float], Any]] = field(default_factory=list)
    per_query: list[dict[str, Any]] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else 0.0


def _check_options(pool: str, instructions: str, text_mode: str) -> None:
    """The options of the read step, checked before anything is read (evaluation and mining alike)."""
    if pool not in ("local", "global"):
        raise ConfigError(f"pool must be 'local' or 'global', got {pool!r}")
    if instructions not in ("default", "heldout", "none"):
        raise ConfigError(f"instructions must be 'default', 'heldout' or 'none', got {instructions!r}")
    if text_mode not in TEXT_MODES:
        raise ConfigError(f"text_mode must be one of {', '.join(TEXT_MODES)}, got {text_mode!r}")


def _checked_ks(ks: Sequence[int]) -> list[int]:
    """``ks`` sorted and deduplicated; a ConfigError unless they are positive."""
    checked = sorted({int(k) for k in ks})
    if not checked or checked[0] < 1:
        raise ConfigError(f"ks must be positive integers, got {checked}")
    return checked


def _read_instruction_sets(layout: MBEIRLayout, instructions: str, notes: list[str]
                           ) -> dict[tuple[str, str, str], InstructionSet]:
    if instructions == "none":
        return {}
    tsv = layout.instructions_file if instructions == "default" else layout.root / "instructions" / \
        HELDOUT_INSTRUCTIONS
    if tsv.is_file():
        return read_instructions(tsv)
    if instructions == "heldout":
        raise DataError("held-out instructions requested but the dataset has none", path=str(tsv))
    notes.append(f"No instructions file at {tsv}: queries were embedded without instructions.")
    return {}


def _read(root: Path, split: str, pool: str, instructions: str, max_queries: int | None,
          notes: list[str], keep: Callable[[Query], bool] | None = None) -> _Inputs:
    """Read step: query files (their queries ``keep`` accepts), their pools' candidates (each did once) and the
    instruction sets."""
    layout = MBEIRLayout(root)
    files = _load_query_files(layout, split, pool, max_queries, keep)
    candidates, pool_dids = read_pool_files(sorted({p for f in files for p in f.pool_files}))
    return _Inputs(root, files, candidates, pool_dids, _read_instruction_sets(layout, instructions, notes))


def _ordered_positives(query: Query, positives: set[str]) -> list[str]:
    """The positives in the query's ``pos_cand_list`` order, then any others (qrels-only) sorted: the
    "first positive" of :func:`jfe.data.instructions.instruction_key` must not depend on set order."""
    listed = [d for d in query.pos_cand_list if d in positives]
    return listed + sorted(positives.difference(listed))


def _query_items(qf: _QueryFile, inputs: _Inputs, instructions: str, instruction_mode: str,
                 text_mode: TextMode) -> tuple[list[str], list[Item]]:
    """Cache keys and items of one file's queries, each with its instruction (and held-out text)."""
    keys, items = [], []
    for q, pos in zip(qf.queries, qf.positives, strict=True):
        instruction = None
        if inputs.instruction_sets:
            key = instruction_key(q, inputs.candidates, _ordered_positives(q, pos))
            instruction = pick_instruction(q.qid, instruction_set_for(inputs.instruction_sets, key), instruction_mode)
        heldout = q.src.get("query_txt_heldout") if instructions == "heldout" else None
        item = query_item(q, inputs.root, instruction, text_mode, heldout if isinstance(heldout, str) else None)
        keys.append(_item_key(item.text, _image_digest(inputs.root, q.query_img_path, q.qid)))
        items.append(item)
    return keys, items


def _embed(model: Encoder, inputs: _Inputs, cache: EmbeddingCache, batch_size: int, progress: bool,
           instructions: str, instruction_mode: str, text_mode: TextMode
           ) -> tuple[np.ndarray, dict[str, int], list[np.ndarray], list[list[Item]]]:
    """Embed step: candidates by content, once, without instruction; queries with their instruction.
    Returns the candidate matrix, each did's row in it, one query matrix per query file and its query items."""
    candidates = inputs.candidates
    cand_ids = sorted(candidates, key=lambda d: d)  # sorted: stable cache order regardless of pool order
    cand_row = {did: i for i, did in enumerate(cand_ids)}
    cand_items = [candidate_item(candidates[d], inputs.root, text_mode) for d in cand_ids]
    cand_keys = [_item_key(item.text, _image_digest(inputs.root, candidates[d].img_path, d))
                 for d, item in zip(cand_ids, cand_items, strict=True)]
    cand_vecs = cache.embed(model, cand_keys, cand_items, batch_size, progress, "embed candidates")
    query_vecs: list[np.ndarray] = []
    query_items: list[list[Item]] = []
    for qf in inputs.files:
        keys, items = _query_items(qf, inputs, instructions, instruction_mode, text_mode)
        query_vecs.append(cache.embed(model, keys, items, batch_size, progress, f"embed {qf.path.stem}"))
        query_items.append(items)
    cache.save()
    return cand_vecs, cand_row, query_vecs, query_items


def pool_index(pool_ids: Sequence[str], vectors: np.ndarray, dim: int) -> VectorIndex:
    """Rank step, part 1: an exact inner-product index over one pool. ``vectors[i]`` is ``pool_ids[i]``'s;
    ids are added in pool order, which is the tie rule (equal scores rank in pool order)."""
    from jfe.index.vector_index import VectorIndex

    index = VectorIndex(dim)
    if len(pool_ids):
        index.add(list(pool_ids), vectors)
    return index


def rank(index: VectorIndex, query_vecs: np.ndarray, k: int, exclude: Sequence[Collection[str]]
         ) -> tuple[list[list[str]], np.ndarray | None]:
    """Rank step, part 2: each query's top-``k`` ids and scores in ``index``, its ``exclude`` ids removed
    from its own ranking (CIRR's convention). No queries: ``([], None)``."""
    if not len(query_vecs):
        return [], None
    return index.search(query_vecs, k, exclude=exclude)


def _rank_files(inputs: _Inputs, cand_vecs: np.ndarray, cand_row: dict[str, int], query_vecs: list[np.ndarray],
                k: int, dim: int) -> tuple[dict[tuple[Path, ...], VectorIndex], list[tuple[list, Any]]]:
    """Rank every query file in its pool (one index per distinct pool, shared by the files that use it)."""
    indexes: dict[tuple[Path, ...], VectorIndex] = {}
    rankings = []
    for qf, qvecs in zip(inputs.files, query_vecs, strict=True):
        pool_key = tuple(qf.pool_files)
        if pool_key not in indexes:
            dids = list(dict.fromkeys(d for p in qf.pool_files for d in inputs.pool_dids[p]))
            indexes[pool_key] = pool_index(dids, cand_vecs[[cand_row[d] for d in dids]], dim)
        rankings.append(rank(indexes[pool_key], qvecs, k, [q.excluded_dids for q in qf.queries]))
    return indexes, rankings


def _score_file(qf: _QueryFile, ranked: list[list[str]], scores: Any, index: VectorIndex, ks: Sequence[int],
                pool: str, into: _Scored) -> None:
    """Score step for one query file: its run rows, per-query entries and one row per (dataset, task)."""
    start = len(into.per_query)
    for i, q in enumerate(qf.queries):
        into.run_rows.append((q.qid, ranked[i], scores[i][:len(ranked[i])].tolist(), q.task_id))
        src = q.src
        into.per_query.append({"qid": q.qid, "dataset": qf.dataset, "task": q.task_id, "file": qf.path.stem,
                               "first_hit_rank": first_hit_rank(ranked[i], qf.positives[i]),
                               "positives_in_pool": any(d in index for d in qf.positives[i]),
                               "modification": src.get("modification"), "non_additive": src.get("non_additive"),
                               "base": src.get("base")})
    # M-BEIR files hold one task each, but be general
    by_task: dict[Any, list[int]] = {}
    for i, q in enumerate(qf.queries):
        by_task.setdefault(q.task_id, []).append(i)
    for task, idx in sorted(by_task.items(), key=lambda kv: (kv[0] is None, kv[0])):
        row = {"dataset": qf.dataset, "task": task,
               "modality": "→".join(TASKS[task]) if task in TASKS else "?",
               "category": TASK_CATEGORY.get(task, "other"),
               "pool": "+".join(p.stem for p in qf.pool_files) if pool == "local" else "global",
               "queries": len(idx), "file": qf.path.stem,
               "missing_positives": sum(1 for i in idx if not into.per_query[start + i]["positives_in_pool"])}
        row.update(recall_at_ks([ranked[i] for i in idx], [qf.positives[i] for i in idx],
                         sorted({*ks, headline_k(qf.dataset)})))
        into.rows.append(row)


def _summarise(result: EvalResult, scored: _Scored, ks: Sequence[int]) -> None:
    """Fill the result's headline, category, average, breakdown and missing-positive fields from its rows."""
    for row in result.rows:
        row["headline_k"] = headline_k(row["dataset"])
        row["headline"] = row[recall_key(row["headline_k"])]
    result.categories = _categories(result.rows, ks)
    result.average = {m: _mean([r[m] for r in result.rows]) for m in (*(recall_key(k) for k in ks), "headline")}
    result.modifications, result.non_additive = _breakdowns(scored.per_query, ks)
    missing = [p["qid"] for p in scored.per_query if not p["positives_in_pool"]]
    result.missing_positives = {"count": len(missing), "qids": missing[:50]}
    if missing:
        result.notes.append(f"{len(missing)} queries have no positive in their pool; they count as misses.")


def _write(out: Path, result: EvalResult, scored: _Scored, pool: str) -> None:
    """Write step: ``run.trec``, ``results.tsv``, ``categories.tsv``, ``per_query.jsonl``, then ``results.json``."""
    out.mkdir(parents=True, exist_ok=True)
    write_trec_run(out / RUN_FILE, scored.run_rows, result.run_name)
    write_tsv(out / TSV_FILE, [*result.rows, {"dataset": "average", "task": "all", "modality": "",
                                              "pool": pool, "queries": result.n_queries, **result.average}],
              result.ks)
    write_tsv(out / CATEGORY_TSV_FILE, [{**v, "category": c, "tasks": ",".join(map(str, v["tasks"]))}
                                        for c, v in result.categories.items()],
              result.ks, head=("category", "tasks", "rows", "queries"))
    with atomic_write(out / PER_QUERY_FILE) as handle:
        for entry in scored.per_query:
            handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
    result.save(out / RESULTS_FILE)  # last: its presence marks a complete evaluation


@dataclass
class FirstStage:
    """The read, embed and rank steps' output: what a reranker reorders and what mining lists. ``rankings[f]``
    is query file ``f``'s ``(ranked ids, scores)``; ``query_items[f]`` its queries as embedded (instruction
    included); ``query_vecs[f]`` their vectors; ``cand_vecs[cand_row[did]]`` a candidate's vector."""

    inputs: _Inputs
    query_items: list[list[Item]]
    query_vecs: list[np.ndarray]
    cand_vecs: np.ndarray
    cand_row: dict[str, int]
    indexes: dict[tuple[Path, ...], VectorIndex]
    rankings: list[tuple[list[list[str]], Any]]

    @property
    def files(self) -> list[_QueryFile]:
        return self.inputs.files


def first_stage(model: Encoder, data_root: str | os.PathLike, *, split: str, pool: str, k: int,
                instructions: str = "default", instruction_mode: str = "hash", batch_size: int = 64,
                progress: bool = True, max_queries: int | None = None, text_mode: TextMode = "jfe",
                cache_dir: str | os.PathLike | None = None, notes: list[str] | None = None,
                timings: dict[str, float] | None = None, keep: Callable[[Query], bool] | None = None
                ) -> FirstStage:
    """Read, embed and rank (module docstring, steps 1-3): each query's top ``k`` in its pool. Reads only
    ``query/<split>``, ``qrels/<split>`` and the pools those queries search; ``keep`` selects queries (a fold)."""
    _check_options(pool, instructions, text_mode)
    timings = timings if timings is not None else {}
    t0 = time.perf_counter()
    inputs = _read(Path(data_root).resolve(), split, pool, instructions, max_queries,
                   notes if notes is not None else [], keep)
    timings["read"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    cache = EmbeddingCache(Path(cache_dir) if cache_dir is not None else None, model_fingerprint(model))
    cand_vecs, cand_row, query_vecs, query_items = _embed(model, inputs, cache, batch_size, progress, instructions,
                                                          instruction_mode, text_mode)
    timings["embed"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    dim = cand_vecs.shape[1] if len(cand_vecs) else model.dim
    indexes, rankings = _rank_files(inputs, cand_vecs, cand_row, query_vecs, k, dim)
    timings["search"] = time.perf_counter() - t0
    return FirstStage(inputs, query_items, query_vecs, cand_vecs, cand_row, indexes, rankings)


def _rerank(stage: FirstStage, reranker: Any, rerank_k: int, batch_size: int, progress: bool,
            text_mode: TextMode) -> list[tuple[list[list[str]], Any]]:
    """Rerank step: each query's first ``rerank_k`` candidates reordered by the reranker's scores (the rest of
    the ranking keeps its first-stage order below them); returns the new rankings."""
    queries: list[Item] = []
    lists: list[list[Item]] = []
    priors: list[list[float]] = []
    where: list[tuple[int, int, int]] = []  # (file, query, shortlist length)
    inputs = stage.inputs
    for f, (ranked, scores) in enumerate(stage.rankings):
        for i, ids in enumerate(ranked):
            short = ids[:rerank_k]
            if not short:
                continue
            queries.append(stage.query_items[f][i])
            lists.append([candidate_item(inputs.candidates[d], inputs.root, text_mode) for d in short])
            priors.append([float(x) for x in scores[i][:len(short)]])
            where.append((f, i, len(short)))
    new_scores = reranker.rerank(queries, lists, priors, batch_size=batch_size, progress=progress) if queries else []
    out = [([list(r) for r in ranked], None if scores is None else np.array(scores, dtype=np.float32, copy=True))
           for ranked, scores in stage.rankings]
    for (f, i, n), reranked in zip(where, new_scores, strict=True):
        lists_f, scores_f = out[f]
        order = np.argsort(-reranked, kind="stable")  # ties keep the first stage's order
        lists_f[i] = [lists_f[i][j] for j in order] + lists_f[i][n:]
        assert scores_f is not None
        scores_f[i, :n] = reranked[order]
        if scores_f.shape[1] > n:  # keep the run sorted by score (trec_eval re-sorts): the tail goes below
            scores_f[i, n:] -= max(0.0, float(scores_f[i, n] - reranked.min()) + 1e-3)
    return out


def evaluate(model: Encoder, data_root: str | os.PathLike, *, split: str = "test", pool: str = "local",
             out_dir: str | os.PathLike | None = None, instructions: str = "default",
             ks: Sequence[int] = DEFAULT_KS, batch_size: int = 64, run_name: str | None = None,
             model_name: str | None = None, cache_dir: str | os.PathLike | None = None, progress: bool = True,
             instruction_mode: str = "hash", max_queries: int | None = None,
             text_mode: TextMode = "jfe", fusion_role: str | None = None, reranker: Any = None,
             rerank_k: int = 50, reranker_name: str | None = None) -> EvalResult:
    """Run the M-BEIR protocol (module docstring) and, with ``out_dir``, write ``run.trec``, ``results.tsv``,
    ``categories.tsv``, ``per_query.jsonl`` and ``results.json`` there.

    ``instructions``: ``"default"`` (``instructions/query_instructions.tsv``), ``"heldout"``
    (``instructions/heldout_instructions.tsv`` and, where a query's ``query_src_content`` has it,
    ``query_txt_heldout`` as its text) or ``"none"``. ``max_queries`` caps queries per file (smoke runs).
    ``text_mode``: ``"jfe"`` or ``"uniir"`` (UniIR's exact text formatting, see :mod:`jfe.data.instructions`).
    ``fusion_role`` is recorded for reports (default: the model's declared ``fusion_role``).
    ``reranker`` (a :class:`jfe.models.rerankers.Reranker`): each query's first ``rerank_k`` candidates are
    reordered by it and scored so; the first stage's run is kept beside as ``run.first_stage.trec``.
    """
    from jfe.models.base import compute_of
    from jfe.models.registry import model_name_of

    ks = _checked_ks(ks)  # the other options: first_stage checks them before it reads anything
    if fusion_role is not None:
        from jfe.models.base import FUSION_ROLES

        if fusion_role not in FUSION_ROLES:
            raise ConfigError(f"fusion_role must be one of {', '.join(FUSION_ROLES)}, got {fusion_role!r}")
    if reranker is not None and rerank_k < 1:
        raise ConfigError(f"rerank_k must be at least 1, got {rerank_k}")
    root = Path(data_root).resolve()
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        check_writable_path(out, folder=True)  # before hours of embedding, not after
    timings: dict[str, float] = {}
    notes = list(STANDARD_NOTES)
    depth = max(ks[-1], rerank_k) if reranker is not None else ks[-1]
    stage = first_stage(model, root, split=split, pool=pool, k=depth, instructions=instructions,
                        instruction_mode=instruction_mode, batch_size=batch_size, progress=progress,
                        max_queries=max_queries, text_mode=text_mode,
                        cache_dir=cache_dir if cache_dir is not None else (out / "embeddings" if out else None),
                        notes=notes, timings=timings)
    rankings = stage.rankings
    first_rows: _Scored | None = None
    if reranker is not None:
        first_rows = _Scored()
        for qf, (ranked, scores) in zip(stage.files, rankings, strict=True):
            _score_file(qf, ranked, scores, stage.indexes[tuple(qf.pool_files)], ks, pool, first_rows)
        t0 = time.perf_counter()
        rankings = _rerank(stage, reranker, rerank_k, batch_size, progress, text_mode)
        timings["rerank"] = time.perf_counter() - t0
        first = getattr(getattr(reranker, "config", None), "retriever", None)
        name = model_name or model_name_of(model)
        notes.append(f"Reranked: each query's first-stage top {rerank_k} reordered by "
                     f"{reranker_name or model_name_of(reranker)}.")
        if first and first != name:
            notes.append(f"The reranker was trained on {first}'s scores; the first stage here is {name}.")
    t0 = time.perf_counter()
    scored = _Scored()
    for qf, (ranked, scores) in zip(stage.files, rankings, strict=True):
        _score_file(qf, [r[:ks[-1]] for r in ranked], scores, stage.indexes[tuple(qf.pool_files)], ks, pool, scored)
    timings["score"] = time.perf_counter() - t0

    result = EvalResult(
        run_name=run_name or model_name or model_name_of(model), model=model_name or model_name_of(model),
        data_root=str(root), split=split, pool=pool, instructions=instructions, ks=list(ks),
        rows=_merge_rows(scored.rows, ks), categories={}, average={}, n_queries=len(scored.per_query),
        n_candidates=len({d for idx in stage.indexes.values() for d in idx.ids}), timings={}, notes=notes,
        arch=getattr(model, "arch", ""), fusion_role=fusion_role or str(getattr(model, "fusion_role", "other")),
        reranker=(reranker_name or model_name_of(reranker)) if reranker is not None else None,
        rerank_k=rerank_k if reranker is not None else None, compute=compute_of(model))
    _summarise(result, scored, ks)
    result.timings = {k: round(v, 3) for k, v in timings.items()}
    if out is not None:
        if first_rows is not None:
            write_trec_run(out / FIRST_STAGE_RUN_FILE, first_rows.run_rows, f"{result.model}.first_stage")
        _write(out, result, scored, pool)
    return result


def _merge_rows(rows: list[dict[str, Any]], ks: Sequence[int]) -> list[dict[str, Any]]:
    """Rows from several files with the same (dataset, task) become one, weighted by query count."""
    merged: dict[tuple[str, Any], dict[str, Any]] = {}
    for row in rows:
        key = (row["dataset"], row["task"])
        if key not in merged:
            merged[key] = dict(row)
            continue
        old = merged[key]
        n_old, n_new = old["queries"], row["queries"]
        for metric in (m for m in row if recall_k(m) is not None):
            old[metric] = (old[metric] * n_old + row[metric] * n_new) / max(1, n_old + n_new)
        old["queries"] = n_old + n_new
        old["missing_positives"] += row["missing_positives"]
        old["file"] += "," + row["file"]
    return sorted(merged.values(), key=lambda r: (r["task"] if r["task"] is not None else 99, r["dataset"]))


def _categories(rows: list[dict[str, Any]], ks: Sequence[int]) -> dict[str, dict[str, Any]]:
    out = {}
    for category, tasks in CATEGORIES.items():
        members = [r for r in rows if r["task"] in tasks]
        if not members:
            continue
        out[category] = {"tasks": sorted({r["task"] for r in members}), "rows": len(members),
                         "queries": sum(r["queries"] for r in members), "fusion": category in FUSION_CATEGORIES,
                         **{recall_key(k): _mean([r[recall_key(k)] for r in members]) for k in ks},
                         "headline": _mean([r["headline"] for r in members])}
    return out


def _breakdowns(per_query: list[dict[str, Any]], ks: Sequence[int]) -> tuple[list[dict], list[dict]]:
    def score(group: list[dict[str, Any]]) -> dict[str, float]:
        ranks = [g["first_hit_rank"] for g in group]
        return {recall_key(k): _mean([1.0 if r is not None and r <= k else 0.0 for r in ranks]) for k in ks}

    by_mod: dict[tuple[Any, str], list[dict]] = {}
    by_flag: dict[tuple[Any, bool], list[dict]] = {}
    for entry in per_query:
        if entry["modification"] is not None:
            by_mod.setdefault((entry["task"], str(entry["modification"])), []).append(entry)
        if entry["non_additive"] is not None:
            by_flag.setdefault((entry["task"], bool(entry["non_additive"])), []).append(entry)
    mods = []
    for (task, mod), group in sorted(by_mod.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        flags = {g["non_additive"] for g in group if g["non_additive"] is not None}
        mods.append({"task": task, "modification": mod, "queries": len(group),
                     "non_additive": flags.pop() if len(flags) == 1 else None, **score(group)})
    flag_rows = [{"task": task, "non_additive": flag, "queries": len(group), **score(group)}
                 for (task, flag), group in sorted(by_flag.items(), key=lambda kv: (str(kv[0][0]), kv[0][1]))]
    return mods, flag_rows
