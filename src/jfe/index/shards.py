"""Sharded indexes: one folder of :class:`VectorIndex` shards, searched together with a k-way merge.

Layout: ``shards.json`` (format, dim, factory, the shard folder names in pool order, meta) and one
``shard-NNNNN/`` VectorIndex folder per shard. Shards hold contiguous slices of the pool, so "shard number,
then insertion order inside the shard" is the pool's insertion order and the merged ranking (score
descending, ties by that order) is exactly what one index over the whole pool returns.

Encoding with Ray (``ray_address``): the pool rows go through Ray Data ``map_batches`` with one encoder per
worker actor (``concurrency`` = number of shards); rows carry their pool position, so the vectors are put
back in pool order whatever order the workers finish in.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jfe.errors import ConfigError, DataError
from jfe.index.lance import LanceIndex, is_lance_index
from jfe.index.vector_index import INDEX_KIND, META_FILE, VectorIndex
from jfe.paths import atomic_dir, read_json_object, recover_dir

SHARDS_FILE = "shards.json"
SHARDS_FORMAT = 1


class ShardedIndex:
    """Read-side view over shard indexes: ``search`` / ``record`` / ``len`` like a :class:`VectorIndex`."""

    def __init__(self, shards: Sequence[VectorIndex], meta: dict | None = None, factory: str = "Flat") -> None:
        if not shards:
            raise ConfigError("a sharded index needs at least one shard")
        dims = {s.dim for s in shards}
        if len(dims) != 1:
            raise DataError(f"shards have different dimensions: {sorted(dims)}")
        self.shards = list(shards)
        self.dim = dims.pop()
        self.factory = factory
        self.meta: dict = dict(meta or {})

    def __len__(self) -> int:
        return sum(len(s) for s in self.shards)

    def __contains__(self, did: object) -> bool:
        return any(did in s for s in self.shards)

    @property
    def ids(self) -> list[str]:
        return [did for s in self.shards for did in s.ids]

    def record(self, did: str) -> dict | None:
        for shard in self.shards:
            if did in shard:
                return shard.record(did)
        return None

    def search(self, queries: np.ndarray, k: int, exclude: Sequence[Collection[str]] | None = None
               ) -> tuple[list[list[str]], np.ndarray]:
        """Top-``k`` over all shards: each shard's top k, merged by (score desc, shard, rank in shard)."""
        if k < 1:
            raise ConfigError(f"k must be >= 1, got {k}")
        parts = [shard.search(queries, k, exclude=exclude) for shard in self.shards]
        m = len(parts[0][0])
        out_scores = np.full((m, k), -np.inf, dtype=np.float32)
        out_ids: list[list[str]] = []
        for row in range(m):
            ids = [did for part in parts for did in part[0][row]]
            scores = np.concatenate([part[1][row, :len(part[0][row])] for part in parts])
            # np.lexsort is stable on the concatenation order = (shard, rank within shard): the tie rule.
            order = np.lexsort((np.arange(len(ids)), -scores))[:k]
            out_ids.append([ids[j] for j in order])
            out_scores[row, :len(order)] = scores[order]
        return out_ids, out_scores

    def save(self, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write all shards + ``shards.json`` under a temporary folder, swapped into place at the end; a folder
        there that is not an index is refused unless ``overwrite``."""
        directory = Path(directory)
        with atomic_dir(directory, INDEX_KIND, overwrite=overwrite) as tmp:
            write_shards_into(tmp, self.shards, self.meta, self.factory)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, *, mmap: bool = False) -> ShardedIndex:
        """Load every shard named in ``shards.json``; a missing shard is a DataError naming it."""
        directory = Path(directory)
        info = _read_manifest(directory)
        shards = []
        for name in info["shards"]:
            shard_dir = directory / name
            if not (shard_dir / META_FILE).is_file():
                raise DataError(f"shard {name!r} listed in {SHARDS_FILE} is missing", path=str(shard_dir))
            shards.append(VectorIndex.load(shard_dir, mmap=mmap))
        index = cls(shards, meta=info.get("meta") if isinstance(info.get("meta"), dict) else None,
                    factory=str(info.get("factory", "Flat")))
        # a shard missing from the list would load a partial index without a word: the manifest's size says
        if "size" in info and info["size"] != len(index):
            raise DataError(f"{SHARDS_FILE} says the index holds {info['size']} vectors but its listed shards hold "
                            f"{len(index)}: a shard is missing from the list or damaged", path=str(directory))
        return index


def _read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / SHARDS_FILE
    info = read_json_object(path, "shard manifest")
    if info.get("format") != SHARDS_FORMAT or not isinstance(info.get("shards"), list) \
            or not all(isinstance(name, str) and "/" not in name and name not in ("", ".", "..")
                       for name in info["shards"]):
        raise DataError(f"unsupported shard manifest (format {info.get('format')!r})", path=str(path))
    return info


def write_shards_into(folder: Path, shards: Sequence[VectorIndex], meta: dict, factory: str) -> None:
    names = []
    for number, shard in enumerate(shards):
        name = f"shard-{number:05d}"
        shard.save(folder / name)
        names.append(name)
    info = {"format": SHARDS_FORMAT, "dim": shards[0].dim, "factory": factory, "size": sum(len(s) for s in shards),
            "shards": names, "meta": meta}
    (folder / SHARDS_FILE).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def load_index(directory: str | os.PathLike, *, mmap: bool = False) -> VectorIndex | ShardedIndex | LanceIndex:
    """A :class:`ShardedIndex` where ``shards.json`` exists, a :class:`~jfe.index.lance.LanceIndex` where
    ``lancedb.json`` does, else a plain :class:`VectorIndex` (``mmap``: faiss indexes only; LanceDB reads its
    table from disk as it searches)."""
    directory = Path(directory)
    recover_dir(directory)
    if is_lance_index(directory):
        return LanceIndex.load(directory)
    if (directory / SHARDS_FILE).is_file():
        return ShardedIndex.load(directory, mmap=mmap)
    return VectorIndex.load(directory, mmap=mmap)


def split_rows(n: int, shards: int) -> list[tuple[int, int]]:
    """``shards`` contiguous, near-equal [start, stop) slices of ``range(n)`` (empty ones dropped)."""
    bounds = np.linspace(0, n, shards + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
