"""Build a :class:`VectorIndex` from M-BEIR candidate pool files with an encoder."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jfe.data.items import candidate_item
from jfe.data.mbeir import iter_candidates
from jfe.data.records import Candidate
from jfe.errors import DataError
from jfe.index.vector_index import VectorIndex
from jfe.models.base import Encoder


def read_pools(pool_files: Sequence[str | os.PathLike]) -> list[Candidate]:
    """All candidates of the given pool files, each did once (the global pool repeats the local ones).

    The whole input is parsed before anything is embedded, so a bad line fails fast with its file and
    line number. A did that appears twice with different content is an error (it would make the index
    depend on file order).
    """
    seen: dict[str, Candidate] = {}
    where: dict[str, str] = {}
    for path in pool_files:
        path = Path(path)
        if not path.is_file():
            raise DataError("candidate pool file not found", path=str(path))
        for cand in iter_candidates(path):
            old = seen.get(cand.did)
            if old is None:
                seen[cand.did] = cand
                where[cand.did] = str(path)
            elif old.to_json() != cand.to_json():
                raise DataError(f"did appears with different content in {where[cand.did]}", path=str(path),
                                record_id=cand.did)
    return list(seen.values())


def model_name_of(model: Encoder) -> str:
    """The best available name to reload ``model`` with (``load_model`` accepts it), else its arch."""
    for attr in ("name_or_path", "source", "name"):
        value = getattr(model, attr, None)
        if isinstance(value, (str, os.PathLike)) and str(value):
            return str(value)
    return model.arch or type(model).__name__


def build_index(model: Encoder, pool_files: Sequence[Path], data_root: Path, *, factory: str = "Flat",
                batch_size: int = 64, progress: bool = True, model_name: str | None = None,
                meta: dict[str, Any] | None = None) -> VectorIndex:
    """Embed every candidate of ``pool_files`` (no instruction) and index it with its M-BEIR record.

    Image paths in the records stay relative to ``data_root`` (stored absolute in ``index.meta``), as
    M-BEIR keeps them. ``model_name`` is what ``jfe search`` reloads the model by (default: guessed from
    the model). Nothing is written here; call :meth:`VectorIndex.save` (atomic).
    """
    data_root = Path(data_root).resolve()
    candidates = read_pools(pool_files)
    if not candidates:
        raise DataError("no candidates in the pool file(s): " + ", ".join(str(p) for p in pool_files))
    items = [candidate_item(c, data_root) for c in candidates]
    vectors = model.encode(items, batch_size=batch_size, progress=progress, desc="embed candidates")
    vectors = np.asarray(vectors, dtype=np.float32)
    info = {"model": model_name or model_name_of(model), "arch": model.arch, "data_root": str(data_root),
            "pool_files": [str(Path(p).resolve()) for p in pool_files], "factory": factory}
    info.update(meta or {})
    index = VectorIndex(vectors.shape[1], factory=factory, meta=info)
    index.add([c.did for c in candidates], vectors, [c.to_json() for c in candidates])
    return index
