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


def load_index(directory: str | os.PathLike, *, mmap: bool = False) -> VectorIndex | ShardedIndex:
    """A :class:`ShardedIndex` where ``shards.json`` exists, else a plain :class:`VectorIndex`."""
    directory = Path(directory)
    recover_dir(directory)
    if (directory / SHARDS_FILE).is_file():
        return ShardedIndex.load(directory, mmap=mmap)
    return VectorIndex.load(directory, mmap=mmap)


def split_rows(n: int, shards: int) -> list[tuple[int, int]]:
    """``shards`` contiguous, near-equal [start, stop) slices of ``range(n)`` (empty ones dropped)."""
    bounds = np.linspace(0, n, shards + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


def encode_with_ray(model: str, candidates: Sequence[Any], data_root: Path, *, address: str, workers: int,
                    batch_size: int, precision: str = "auto") -> np.ndarray:
    """Encode ``candidates`` (pool order) with Ray Data across ``workers`` actors; returns [n, dim] float32."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise ConfigError('--ray needs the optional Ray extra: pip install "jfe[ray]" (ray[data]>=2.9)') from None

    class _Encode:
        def __init__(self) -> None:
            from jfe.models.registry import load_model

            self.encoder = load_model(model).set_precision(precision)

        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            from jfe.data.items import candidate_item
            from jfe.data.records import Candidate

            items = [candidate_item(Candidate(**json.loads(r)), Path(root))
                     for r, root in zip(batch["record"], batch["root"], strict=True)]
            vectors = np.asarray(self.encoder.encode(items, batch_size=batch_size, progress=False), dtype=np.float32)
            return {"row": batch["row"], "vector": vectors}

    started_here = False
    if not ray.is_initialized():
        ray.init(address=None if address == "local" else address, ignore_reinit_error=True, log_to_driver=False)
        started_here = True
    try:
        rows = [{"row": i, "record": json.dumps(c.to_json()), "root": str(data_root)}
                for i, c in enumerate(candidates)]
        dataset = ray.data.from_items(rows, override_num_blocks=max(workers, 1) * 2)
        encoded = dataset.map_batches(_Encode, batch_size=batch_size, concurrency=workers, batch_format="numpy")
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


def build_sharded(out: Path, model: str, pool_files: Sequence[Path], data_root: Path, *, factory: str,
                  search_params: dict[str, float] | None, batch_size: int, progress: bool, shards: int,
                  ray_address: str | None, seed: int = 0, precision: str = "auto",
                  overwrite: bool = False) -> ShardedIndex:
    """Encode the pools (locally or with Ray), cut them into ``shards`` contiguous shards, write atomically."""
    from jfe.data.items import candidate_item
    from jfe.index.build import index_vectors, pool_meta, precision_meta, read_pools

    data_root = Path(data_root).resolve()
    candidates = read_pools(pool_files)
    if not candidates:
        raise DataError("no candidates in the pool file(s): " + ", ".join(str(p) for p in pool_files))
    if ray_address:
        vectors = encode_with_ray(model, candidates, data_root, address=ray_address, workers=shards,
                                  batch_size=batch_size, precision=precision)
        arch, precision_info = None, {"precision": precision}  # resolved on each worker's own hardware
    else:
        from jfe.models.registry import load_model

        encoder = load_model(model)
        arch, precision_info = encoder.arch, precision_meta(encoder, precision)
        vectors = np.asarray(encoder.encode([candidate_item(c, data_root) for c in candidates], batch_size=batch_size,
                                            progress=progress, desc="embed candidates", precision=precision),
                             dtype=np.float32)
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
