"""A faiss-backed inner-product index over string ids, with the candidate records kept alongside.

* Metric: inner product (vectors are L2-normalised by every JFE encoder, so this is cosine similarity).
* ``factory``: any ``faiss.index_factory`` string. ``"Flat"`` (the default) is exact search; ``"IVF1024,Flat"``,
  ``"IVF4096,PQ32"``, ``"HNSW32"``... trade exactness for speed on large pools. Indexes that need training
  are trained on the first vectors added (so add a representative batch first; ``build_index`` adds the
  whole pool at once).
* String ids map to sequential int64 ids through ``faiss.IndexIDMap2``; the int id also records insertion
  order, which is the tie rule: among retrieved candidates with equal scores, the one added first ranks
  first (an exact tie straddling the k-th place may be cut either way).
* Exact search of a batch of queries runs through :func:`jfe.index.exact.exact_topk` over the stored vectors
  (a blocked matrix product with a running top-k, faster than faiss-cpu's flat search and than numpy
  matmul + argpartition here); single queries and approximate indexes go through faiss. On CPUs with native
  bf16 the scan runs in bf16 (fp32 rescoring, same results) over a bf16 copy of the vectors kept beside them
  (half their size more RAM, made at the first batch search, dropped by ``add``/``remove``; never for a
  memory-mapped index). ``VectorIndex(..., scan_precision="fp32")`` (or the attribute) turns it off.
* ``load(..., mmap=True)`` memory-maps the faiss file (``faiss.IO_FLAG_MMAP``): the vectors / codes stay on
  disk and page in on use, so an index larger than RAM can still be searched (read-only).
* ``remove`` really removes (the vector leaves the faiss index, the id and the record leave the maps).
* ``save``/``load``: a folder with ``index.faiss``, ``items.jsonl`` (one ``[int id, did, record]`` per line)
  and ``meta.json``, written under a temporary name and renamed into place, so a crash never leaves a half
  index behind.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from jfe.errors import ConfigError, DataError
from jfe.index.exact import Bf16Pool, exact_topk, rescore, resolve_scan_precision
from jfe.paths import ArtefactKind, atomic_dir, read_json_object, recover_dir

FORMAT_VERSION = 1
INDEX_FILE = "index.faiss"
ITEMS_FILE = "items.jsonl"
META_FILE = "meta.json"
# what `--out` may replace: a folder holding an index (single, sharded: shards.json, LanceDB: lancedb.json), or an
# empty one
INDEX_KIND = ArtefactKind("JFE index", (META_FILE, "shards.json", "lancedb.json"))
# Queries per faiss call: bounds the [batch, k] result buffers for very large query sets.
SEARCH_BATCH = 4096
# Exact (Flat) search of this many queries or more goes through exact_topk (blocked BLAS + running top-k):
# measured several times faster than faiss-cpu's IndexFlatIP for batches here (docs/index_eval.md); single
# queries stay on faiss.
NUMPY_MIN_BATCH = 16
# Exact search fetches this many more than k and rescores them deterministically (exact.rescore), so
# candidates tied with the k-th one make it into the list in insertion order, in a batch as for one query.
TIE_SLACK = 16


def _faiss():  # noqa: ANN202 - imported lazily so that `jfe --help` stays fast
    import faiss

    return faiss


class VectorIndex:
    """Inner-product vector index with string ids and stored candidate records.

    >>> index = VectorIndex(dim=4)
    >>> index.add(["1:1", "1:2"], np.eye(4, dtype=np.float32)[:2])
    >>> index.search(np.eye(4, dtype=np.float32)[:1], k=1)[0]
    [['1:1']]
    """

    #: arithmetic of the exact batch scan: "auto" (bf16 where the CPU has it, rescored in fp32: the same
    #: results), "fp32" or "bf16"; see :mod:`jfe.index.exact`
    scan_precision: str = "auto"

    def __init__(self, dim: int, factory: str = "Flat", meta: dict | None = None, scan_precision: str = "auto"
                 ) -> None:
        if dim < 1:
            raise ConfigError(f"index dimension must be positive, got {dim}")
        faiss = _faiss()
        try:
            inner = faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise ConfigError(f"invalid faiss factory string {factory!r}: {str(exc).strip().splitlines()[-1]}") \
                from None
        self.dim = int(dim)
        self.factory = factory
        self.scan_precision = scan_precision
        self.meta: dict = dict(meta or {})
        self.meta.setdefault("created", datetime.now(timezone.utc).isoformat(timespec="seconds"))
        self._index = faiss.IndexIDMap2(inner)
        self._did_to_int: dict[str, int] = {}
        self._int_to_did: dict[int, str] = {}
        self._records: dict[str, dict] = {}
        self._next_id = 0
        self._params: dict[str, float] = {}
        self._mmap = False
        self._bf16: Bf16Pool | None = None  # bf16 copy of a Flat pool for batch search, made on first use

    # ------------------------------------------------------------------------------------- basics
    def __len__(self) -> int:
        return len(self._did_to_int)

    def __contains__(self, did: object) -> bool:
        return did in self._did_to_int

    def __repr__(self) -> str:
        return f"VectorIndex(dim={self.dim}, factory={self.factory!r}, size={len(self)})"

    @property
    def ids(self) -> list[str]:
        """All ids in insertion order."""
        return [self._int_to_did[i] for i in sorted(self._int_to_did)]

    @property
    def is_trained(self) -> bool:
        return bool(self._index.is_trained)

    def record(self, did: str) -> dict | None:
        """The stored candidate record (M-BEIR json) of ``did``; None if absent or stored without one."""
        return self._records.get(did)

    def vector(self, did: str) -> np.ndarray:
        """The stored vector of ``did`` (exact for Flat; the reconstruction for compressed indexes)."""
        if did not in self._did_to_int:
            raise KeyError(did)
        return self._index.reconstruct(self._did_to_int[did])

    def set_search_param(self, name: str, value: float) -> None:
        """Set a faiss search parameter (``nprobe`` for IVF, ``efSearch`` for HNSW); kept by save/load."""
        try:
            _faiss().ParameterSpace().set_index_parameter(self._index.index, name, value)
        except RuntimeError as exc:
            raise ConfigError(f"faiss index {self.factory!r} has no parameter {name!r}: "
                              f"{str(exc).strip().splitlines()[-1]}") from None
        self._params[name] = value

    # ------------------------------------------------------------------------------------- updates
    def _check_vectors(self, vectors: np.ndarray, what: str) -> np.ndarray:
        vectors = np.asarray(vectors)
        if vectors.ndim == 1:
            vectors = vectors[None, :]
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise DataError(f"{what} must have shape [n, {self.dim}], got {list(vectors.shape)}")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if not np.isfinite(vectors).all():
            raise DataError(f"{what} contain NaN or infinite values")
        return vectors

    def train(self, vectors: np.ndarray) -> None:
        """Train a quantising index (IVF, PQ, ...) on sample vectors; a no-op for Flat/HNSW."""
        vectors = self._check_vectors(vectors, "training vectors")
        if self._index.is_trained:
            return
        try:
            self._index.train(vectors)
        except RuntimeError as exc:
            raise ConfigError(f"cannot train faiss index {self.factory!r} on {len(vectors)} vectors: "
                              f"{str(exc).strip().splitlines()[-1]} (use fewer lists or a Flat index)") from None

    def add(self, ids: Sequence[str], vectors: np.ndarray, records: Sequence[dict] | None = None) -> None:
        """Add vectors under string ids. An id already present is replaced (its old vector removed)."""
        ids = [str(i) for i in ids]
        vectors = self._check_vectors(vectors, "vectors")
        if len(ids) != len(vectors):
            raise DataError(f"{len(ids)} ids but {len(vectors)} vectors")
        if records is not None and len(records) != len(ids):
            raise DataError(f"{len(ids)} ids but {len(records)} records")
        if len(set(ids)) != len(ids):
            seen: set[str] = set()
            dup = next(i for i in ids if i in seen or seen.add(i))  # type: ignore[func-returns-value]
            raise DataError("duplicate id in one add() call", record_id=dup)
        if not ids:
            return
        if not self._index.is_trained:
            self.train(vectors)
        replaced = [i for i in ids if i in self._did_to_int]
        if replaced:
            self.remove(replaced)
        int_ids = np.arange(self._next_id, self._next_id + len(ids), dtype=np.int64)
        self._bf16 = None
        self._index.add_with_ids(vectors, int_ids)
        self._next_id += len(ids)
        for did, n in zip(ids, int_ids.tolist(), strict=True):
            self._did_to_int[did] = n
            self._int_to_did[n] = did
        if records is not None:
            for did, rec in zip(ids, records, strict=True):
                if rec is not None:
                    self._records[did] = dict(rec)

    def remove(self, ids: Iterable[str]) -> int:
        """Remove ids (unknown ones are ignored); returns how many were removed."""
        present = [did for did in dict.fromkeys(str(i) for i in ids) if did in self._did_to_int]
        if not present:
            return 0
        int_ids = np.array([self._did_to_int[did] for did in present], dtype=np.int64)
        self._bf16 = None
        try:
            removed = self._index.remove_ids(int_ids)
        except RuntimeError as exc:
            raise ConfigError(f"faiss index {self.factory!r} does not support removal "
                              f"({str(exc).strip().splitlines()[-1]}); rebuild it instead") from None
        for did, n in zip(present, int_ids.tolist(), strict=True):
            del self._did_to_int[did]
            del self._int_to_did[n]
            self._records.pop(did, None)
        return int(removed)

    # ------------------------------------------------------------------------------------- search
    def search(self, queries: np.ndarray, k: int, exclude: Sequence[Collection[str]] | None = None
               ) -> tuple[list[list[str]], np.ndarray]:
        """Top-``k`` ids and scores per query.

        ``exclude[i]`` holds ids that must not appear in query ``i``'s ranking (e.g. the reference image
        of a composed query): the index over-fetches by that many and filters. Equal scores rank in
        insertion order. Where fewer than ``k`` candidates remain, the id list is shorter and the score
        row is padded with ``-inf``.
        """
        if k < 1:
            raise ConfigError(f"k must be >= 1, got {k}")
        queries = self._check_vectors(queries, "queries")
        if exclude is not None and len(exclude) != len(queries):
            raise DataError(f"{len(queries)} queries but {len(exclude)} exclude sets")
        m = len(queries)
        out_ids: list[list[str]] = []
        out_scores = np.full((m, k), -np.inf, dtype=np.float32)
        if m == 0 or len(self) == 0:
            return [[] for _ in range(m)], out_scores
        for start in range(0, m, SEARCH_BATCH):
            stop = min(m, start + SEARCH_BATCH)
            excl = [set()] * (stop - start) if exclude is None else \
                [e if isinstance(e, (set, frozenset)) else set(e) for e in exclude[start:stop]]
            # Excluded ids can take at most len(excl) of the top slots, so fetching that many more is exact.
            extra = max((sum(1 for d in e if d in self._did_to_int) for e in excl), default=0)
            exact = self.factory == "Flat"
            fetch = min(len(self), k + extra + (TIE_SLACK if exact else 0))
            scores, labels = self._top(queries[start:stop], fetch)
            if exact:
                scores = self._rescored(queries[start:stop], labels, scores)
            for row in range(stop - start):
                lab, sc = labels[row], scores[row]
                valid = lab >= 0
                lab, sc = lab[valid], sc[valid]
                order = np.lexsort((lab, -sc))  # score descending, then insertion order
                ids_row: list[str] = []
                for j in order:
                    did = self._int_to_did[int(lab[j])]
                    if did in excl[row]:
                        continue
                    out_scores[start + row, len(ids_row)] = sc[j]
                    ids_row.append(did)
                    if len(ids_row) == k:
                        break
                out_ids.append(ids_row)
        return out_ids, out_scores

    def _flat_storage(self) -> tuple[np.ndarray, np.ndarray]:
        """A Flat index's stored vectors (a view, no copy) and the int id of each row."""
        faiss = _faiss()
        inner = faiss.downcast_index(self._index.index)
        n = inner.ntotal
        pool = faiss.rev_swig_ptr(inner.get_xb(), n * self.dim).reshape(n, self.dim)
        return pool, faiss.vector_to_array(self._index.id_map)

    def _rescored(self, queries: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """``scores`` of the fetched ``labels`` recomputed batch-independently (:func:`exact.rescore`)."""
        pool, id_map = self._flat_storage()
        # ids are handed out in increasing order and removal keeps the order, so id_map is sorted
        rows = np.searchsorted(id_map, np.maximum(labels, 0))
        rows = np.minimum(rows, max(len(id_map) - 1, 0))
        if len(id_map) == 0 or not np.array_equal(id_map[rows][labels >= 0], labels[labels >= 0]):
            return scores  # not the layout this relies on: keep faiss's scores
        return rescore(queries, pool, np.where(labels >= 0, rows, -1))

    def _top(self, queries: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``fetch`` (scores, int ids) per query, unordered among equal scores."""
        if self.factory != "Flat" or len(queries) < NUMPY_MIN_BATCH:
            return self._index.search(queries, fetch)
        pool, id_map = self._flat_storage()
        prepared = None
        if resolve_scan_precision(self.scan_precision) == "bf16":
            # a bf16 copy (+50 % RAM) saves the per-search conversion, about as slow as the bf16 scan itself;
            # not for a memory-mapped index, whose point is not holding the pool in RAM
            if self._bf16 is None and not self._mmap:
                self._bf16 = Bf16Pool.of(pool)
            prepared = self._bf16
        scores, rows = exact_topk(queries, pool, fetch, prepared=prepared)
        labels = np.where(rows >= 0, id_map[np.maximum(rows, 0)], -1)
        return scores, labels

    # ------------------------------------------------------------------------------------- persistence
    def save(self, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the index folder atomically (temporary folder, then swapped with any old index); a folder
        there that is not an index is refused unless ``overwrite``."""
        faiss = _faiss()
        directory = Path(directory)
        with atomic_dir(directory, INDEX_KIND, overwrite=overwrite) as tmp:
            faiss.write_index(self._index, str(tmp / INDEX_FILE))
            with (tmp / ITEMS_FILE).open("w", encoding="utf-8") as handle:
                for n in sorted(self._int_to_did):
                    did = self._int_to_did[n]
                    handle.write(json.dumps([n, did, self._records.get(did)], ensure_ascii=False) + "\n")
            info = {"format": FORMAT_VERSION, "dim": self.dim, "factory": self.factory, "metric": "inner_product",
                    "size": len(self), "next_id": self._next_id, "search_params": self._params, "meta": self.meta}
            (tmp / META_FILE).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, *, mmap: bool = False) -> VectorIndex:
        """Load a folder written by :meth:`save`; a missing or inconsistent folder raises DataError.

        ``mmap=True`` memory-maps the faiss file instead of reading it into RAM (search only: adding to
        or removing from a memory-mapped index is not supported by faiss for every index type).
        """
        faiss = _faiss()
        directory = Path(directory)
        recover_dir(directory)
        meta_path = directory / META_FILE
        if not meta_path.is_file():
            raise DataError(f"not a JFE index folder (no {META_FILE})", path=str(directory))
        info = read_json_object(meta_path, "index metadata")
        if info.get("format") != FORMAT_VERSION:
            raise DataError(f"unsupported index format {info.get('format')!r} (expected {FORMAT_VERSION})",
                            path=str(meta_path))
        index = cls.__new__(cls)
        try:
            index.dim, index.factory = int(info["dim"]), str(info["factory"])
            index._next_id = int(info["next_id"])
            index.meta = dict(info.get("meta") or {})
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"index metadata lacks or mangles a field ({exc})", path=str(meta_path)) from None
        index._did_to_int, index._int_to_did, index._records = {}, {}, {}
        index._mmap, index._bf16 = mmap, None
        if not (directory / INDEX_FILE).is_file():
            raise DataError(f"the index has no {INDEX_FILE}", path=str(directory))
        try:
            flags = faiss.IO_FLAG_MMAP if mmap else 0
            index._index = faiss.read_index(str(directory / INDEX_FILE), flags)
        except RuntimeError as exc:
            raise DataError(f"cannot read faiss index ({str(exc).strip().splitlines()[-1]})",
                            path=str(directory / INDEX_FILE)) from None
        index._read_items(directory / ITEMS_FILE)
        index._params = {}
        params = info.get("search_params") or {}
        if not isinstance(params, dict):
            raise DataError("search_params must be a JSON object", path=str(meta_path))
        for name, value in params.items():
            index.set_search_param(name, value)
        if index._index.ntotal != len(index._did_to_int) or index._index.d != index.dim:
            raise DataError(f"index holds {index._index.ntotal} vectors of dim {index._index.d} but "
                            f"{len(index._did_to_int)} ids of dim {index.dim}", path=str(directory))
        if "size" in info and info["size"] != len(index._did_to_int):
            raise DataError(f"{META_FILE} says {info['size']} vectors but the index holds "
                            f"{len(index._did_to_int)}", path=str(meta_path))
        return index

    def _read_items(self, items_path: Path) -> None:
        """``items.jsonl``: one ``[int id, did, record]`` per line; every fault names the file and line."""
        try:
            handle = items_path.open("rb")
        except FileNotFoundError:
            raise DataError(f"the index has no {ITEMS_FILE}", path=str(items_path.parent)) from None
        except OSError as exc:
            raise DataError(f"cannot read the index items ({exc.strerror})", path=str(items_path)) from None
        with handle:
            for line_no, raw in enumerate(handle, start=1):
                try:
                    n, did, record = json.loads(raw.decode("utf-8"))
                    n = int(n)
                    if not isinstance(did, str) or not (record is None or isinstance(record, dict)):
                        raise TypeError
                except (UnicodeDecodeError, json.JSONDecodeError, ValueError, TypeError, RecursionError):
                    raise DataError("malformed index item line", path=str(items_path), line=line_no) from None
                self._did_to_int[did] = n
                self._int_to_did[n] = did
                if record is not None:
                    self._records[did] = record
