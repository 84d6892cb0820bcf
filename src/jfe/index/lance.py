"""A LanceDB table as a JFE index: ``jfe index build --store lancedb`` (the ``lancedb`` extra).

LanceDB is an embedded vector database (no server) over Lance files, on local disk or an object store. A JFE
LanceDB index is a folder::

    lancedb.json    format, dim, index type, search parameters, meta (what meta.json holds for a faiss index)
    lancedb/        the LanceDB database: table ``pool`` with columns id, row (pool order), vector, record (JSON)

so other tools open the table as it is (``lancedb.connect("INDEX/lancedb").open_table("pool")``), and
:func:`jfe.index.shards.load_index` opens the folder for ``jfe search``, ``jfe.search`` and ``jfe serve`` with
the interface of :class:`~jfe.index.vector_index.VectorIndex` (``search``, ``record``, ``in``, ``len``).

Index types (``--factory``): ``Flat`` searches the table exhaustively (exact inner product: the ids of a faiss
Flat index, scores to float rounding); ``IVF_PQ`` and ``IVF_HNSW_SQ`` build LanceDB's own ANN index (search
parameters ``nprobes``, ``refine_factor``, ``ef``). Rankings are score-descending with ties in pool order, as
faiss's are in JFE. Nothing here encodes: that is :mod:`jfe.indexing`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jfe.errors import ConfigError, DataError
from jfe.index.build import RECALL_QUERIES, recall_at_k
from jfe.index.exact import rescore
from jfe.index.vector_index import INDEX_KIND
from jfe.paths import atomic_dir, read_json_object

LANCE_FILE = "lancedb.json"
LANCE_DIR = "lancedb"
TABLE = "pool"
FORMAT = 1
LANCE_FACTORIES: tuple[str, ...] = ("Flat", "IVF_PQ", "IVF_HNSW_SQ")
#: search parameters LanceDB takes, and JFE's defaults for its ANN index types (LanceDB's own probe few lists)
LANCE_SEARCH_PARAMS: tuple[str, ...] = ("nprobes", "refine_factor", "ef")
DEFAULT_LANCE_PARAMS: dict[str, dict[str, float]] = {"IVF_PQ": {"nprobes": 32, "refine_factor": 10},
                                                     "IVF_HNSW_SQ": {"nprobes": 32, "ef": 128}}
# exhaustive search fetches this many more than k, so candidates tied with the k-th are ranked by pool order
TIE_SLACK = 16
# queries per LanceDB call (one call searches a batch: ~30x faster than a call per query)
SEARCH_BATCH = 256


def _lancedb() -> Any:
    try:
        import lancedb
    except ImportError:
        raise ConfigError('--store lancedb needs the optional lancedb extra: pip install "jfe[lancedb]"') from None
    return lancedb


def check_lance_factory(factory: str) -> str:
    """``factory`` as LanceDB spells it (Flat, IVF_PQ, IVF_HNSW_SQ; any case), else a ConfigError."""
    for name in LANCE_FACTORIES:
        if factory.strip().upper() == name.upper():
            return name
    raise ConfigError(f"--store lancedb takes --factory {', '.join(LANCE_FACTORIES)} (LanceDB's index types), "
                      f"got {factory!r}")


def is_lance_index(directory: str | os.PathLike) -> bool:
    return (Path(directory) / LANCE_FILE).is_file()


class LanceIndex:
    """A LanceDB table of a pool's ids, vectors and records, searched like a :class:`VectorIndex`."""

    def __init__(self, table: Any, info: dict[str, Any], path: Path) -> None:
        self.table = table
        self.path = path
        self.dim = int(info["dim"])
        self.factory = str(info["factory"])
        self.meta: dict[str, Any] = dict(info.get("meta") or {})
        self.search_params: dict[str, float] = dict(info.get("search_params") or {})
        ids = table.to_arrow().select(["id", "row"]).sort_by("row")["id"].to_pylist()
        self._row = {did: i for i, did in enumerate(ids)}
        self._ids = ids

    # --------------------------------------------------------------------------------- building
    @classmethod
    def write(cls, directory: str | os.PathLike, ids: Sequence[str], vectors: np.ndarray,
              records: Sequence[dict | None] | None, *, factory: str = "Flat", meta: dict[str, Any] | None = None,
              search_params: dict[str, float] | None = None, overwrite: bool = False,
              recall_queries: int = RECALL_QUERIES, seed: int = 0) -> LanceIndex:
        """Write the table (and its ANN index) under a temporary folder, swapped into place at the end; a folder
        there that is not an index is refused unless ``overwrite``."""
        import pyarrow as pa

        factory = check_lance_factory(factory)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) != len(ids):
            raise DataError(f"{len(ids)} ids but vectors of shape {vectors.shape}")
        if len(set(ids)) != len(ids):
            raise DataError("duplicate ids in the pool")
        params = dict(DEFAULT_LANCE_PARAMS.get(factory, {}) if search_params is None else search_params)
        unknown = set(params) - set(LANCE_SEARCH_PARAMS)
        if unknown:
            raise ConfigError(f"LanceDB search parameters are {', '.join(LANCE_SEARCH_PARAMS)}; got "
                              f"{', '.join(sorted(unknown))}")
        dim = vectors.shape[1]
        rows = records if records is not None else [None] * len(ids)
        data = pa.table({
            "id": pa.array(list(ids), pa.string()),
            "row": pa.array(np.arange(len(ids), dtype=np.int64)),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel(), pa.float32()), dim),
            "record": pa.array([json.dumps(r, ensure_ascii=False) if r is not None else None for r in rows],
                               pa.string()),
        })
        info = {"format": FORMAT, "dim": dim, "factory": factory, "size": len(ids), "metric": "dot",
                "table": TABLE, "search_params": params, "meta": dict(meta or {})}
        directory = Path(directory)
        with atomic_dir(directory, INDEX_KIND, overwrite=overwrite) as tmp:
            table = _lancedb().connect(str(tmp / LANCE_DIR)).create_table(TABLE, data=data)
            if factory != "Flat":
                try:
                    from lancedb.index import HnswSq, IvfPq

                    config = IvfPq(distance_type="dot") if factory == "IVF_PQ" else HnswSq(distance_type="dot")
                    table.create_index("vector", config=config)
                except (ValueError, RuntimeError, OSError) as exc:
                    raise ConfigError(f"LanceDB could not build a {factory} index over {len(ids)} vectors "
                                      f"({str(exc).strip().splitlines()[0][:200]}); --factory Flat searches any "
                                      f"pool exactly") from None
            if recall_queries > 0:  # measured as for a faiss index: the number to check on one's own data
                info["meta"]["recall"] = recall_at_k(cls(table, info, tmp), list(ids), vectors,
                                                     queries=recall_queries, seed=seed)
            (tmp / LANCE_FILE).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return cls.load(directory)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> LanceIndex:
        directory = Path(directory)
        path = directory / LANCE_FILE
        info = read_json_object(path, "LanceDB index manifest")
        if info.get("format") != FORMAT or not isinstance(info.get("dim"), int) or \
                info.get("factory") not in LANCE_FACTORIES:
            raise DataError(f"unsupported LanceDB index manifest (format {info.get('format')!r})", path=str(path))
        try:
            table = _lancedb().connect(str(directory / LANCE_DIR)).open_table(str(info.get("table", TABLE)))
        except (ValueError, FileNotFoundError, OSError, RuntimeError) as exc:
            raise DataError(f"cannot open the LanceDB table ({str(exc).strip().splitlines()[0][:200]})",
                            path=str(directory / LANCE_DIR)) from None
        index = cls(table, info, directory)
        if "size" in info and info["size"] != len(index):
            raise DataError(f"{LANCE_FILE} says {info['size']} vectors but the table holds {len(index)}",
                            path=str(path))
        return index

    # --------------------------------------------------------------------------------- reading
    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, did: object) -> bool:
        return did in self._row

    def __repr__(self) -> str:
        return f"LanceIndex(n={len(self)}, dim={self.dim}, factory={self.factory!r}, path={str(self.path)!r})"

    @property
    def ids(self) -> list[str]:
        return list(self._ids)

    def record(self, did: str) -> dict | None:
        if did not in self._row:
            return None
        found = self.table.search().where(f"row = {self._row[did]}").select(["record"]).limit(1).to_list()
        raw = found[0]["record"] if found else None
        return json.loads(raw) if raw else None

    def search(self, queries: np.ndarray, k: int, exclude: Sequence[Collection[str]] | None = None
               ) -> tuple[list[list[str]], np.ndarray]:
        """Top-``k`` ids and scores (inner product) per query, ties in pool order; ``exclude[i]`` ids never appear
        in query ``i``'s list. Fewer than ``k`` left: a shorter list, scores padded with ``-inf``."""
        if k < 1:
            raise ConfigError(f"k must be >= 1, got {k}")
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise DataError(f"queries must be [n, {self.dim}], got {queries.shape}")
        if exclude is not None and len(exclude) != len(queries):
            raise DataError(f"{len(queries)} queries but {len(exclude)} exclude sets")
        out_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        out_ids: list[list[str]] = []
        skips = [set(e) for e in exclude] if exclude is not None else [set()] * len(queries)
        for start in range(0, len(queries), SEARCH_BATCH):
            rows = range(start, min(len(queries), start + SEARCH_BATCH))
            # excluded ids take at most that many slots: fetching that many more is exact
            fetch = min(len(self), k + TIE_SLACK + max(sum(1 for d in skips[i] if d in self._row) for i in rows))
            found = self._query(queries[rows.start:rows.stop], fetch)
            for i, ranked in zip(rows, found, strict=True):
                ids_row: list[str] = []
                for did, score in ranked:
                    if did in skips[i]:
                        continue
                    out_scores[i, len(ids_row)] = score
                    ids_row.append(did)
                    if len(ids_row) == k:
                        break
                out_ids.append(ids_row)
        return out_ids, out_scores

    def _query(self, queries: np.ndarray, fetch: int) -> list[list[tuple[str, float]]]:
        """Each query's top ``fetch`` (id, score), score descending, ties in pool order: one LanceDB call."""
        if fetch == 0 or len(queries) == 0:
            return [[] for _ in queries]
        builder = self.table.search(queries if len(queries) > 1 else queries[0], vector_column_name="vector")
        builder = builder.distance_type("dot").limit(fetch).select(["id", "row", "vector", "_distance"])
        if self.factory == "Flat":
            builder = builder.bypass_vector_index()
        else:
            if "nprobes" in self.search_params:
                builder = builder.nprobes(int(self.search_params["nprobes"]))
            if "refine_factor" in self.search_params:
                builder = builder.refine_factor(int(self.search_params["refine_factor"]))
            if "ef" in self.search_params:
                builder = builder.ef(int(self.search_params["ef"]))
        found = builder.to_arrow()
        if found.num_rows == 0:
            return [[] for _ in queries]
        which = found["query_index"].to_numpy(zero_copy_only=False) if "query_index" in found.column_names \
            else np.zeros(found.num_rows, dtype=np.int64)
        rows = found["row"].to_numpy(zero_copy_only=False)
        ids = found["id"].to_pylist()
        # LanceDB ranks by its float32 distance (1 - <q, v>), which rounds near-ties apart: the shortlist is scored
        # again exactly as a faiss Flat index scores it (exact.rescore), so both give the same order and scores
        vectors = found["vector"].combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(-1, self.dim)
        scores = rescore(queries[which], vectors, np.arange(len(which))[:, None])[:, 0]  # each row against its own
        order = np.lexsort((rows, -scores, which))  # by query, then score descending, then pool order
        out: list[list[tuple[str, float]]] = [[] for _ in queries]
        for j in order:
            out[int(which[j])].append((ids[j], float(scores[j])))
        return out
