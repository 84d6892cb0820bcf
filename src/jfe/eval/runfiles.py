"""Evaluation output files: TREC run files and UniIR-style TSV tables (both written atomically)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from jfe.errors import DataError
from jfe.eval.metrics import recall_key
from jfe.paths import atomic_write

TSV_HEAD = ("dataset", "task", "modality", "pool", "queries")


def write_trec_run(path: str | os.PathLike, rows: Iterable[tuple[str, Sequence[str], Sequence[float], Any]],
                   run_id: str) -> int:
    """Write ``qid Q0 did rank score run_id task_id`` lines (rank from 1) for ``(qid, dids, scores, task_id)``
    rows; returns the number of lines. Spaces in ``run_id`` become ``_`` so the columns stay parseable."""
    run_id = "_".join(str(run_id).split()) or "jfe"
    count = 0
    with atomic_write(path) as handle:
        for qid, dids, scores, task_id in rows:
            for rank, (did, score) in enumerate(zip(dids, scores, strict=False), start=1):
                handle.write(f"{qid} Q0 {did} {rank} {float(score):.6f} {run_id} "
                             f"{task_id if task_id is not None else '-'}\n")
                count += 1
    return count


def read_trec_run(path: str | os.PathLike) -> dict[str, list[tuple[str, float]]]:
    """qid -> ``[(did, score), ...]`` in rank order, from a run file written by :func:`write_trec_run`
    (the trailing task id column is optional, so plain 6-column TREC runs read too)."""
    path = Path(path)
    if not path.is_file():
        raise DataError("run file not found", path=str(path))
    runs: dict[str, list[tuple[int, str, float]]] = {}
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) not in (6, 7) or parts[1] != "Q0":
                raise DataError(f"expected 'qid Q0 did rank score run_id [task_id]', got {line.strip()!r}",
                                path=str(path), line=line_no)
            try:
                rank, score = int(parts[3]), float(parts[4])
            except ValueError:
                raise DataError(f"non-numeric rank or score in {line.strip()!r}", path=str(path),
                                line=line_no) from None
            runs.setdefault(parts[0], []).append((rank, parts[2], score))
    return {qid: [(did, score) for _, did, score in sorted(hits)] for qid, hits in runs.items()}


def write_tsv(path: str | os.PathLike, rows: Sequence[dict[str, Any]], ks: Sequence[int],
              head: Sequence[str] = TSV_HEAD) -> None:
    """A tab-separated table, one row per (dataset, task) as UniIR prints it: the ``head`` columns, then
    the headline metric (R@10 for Fashion200K and FashionIQ, R@5 elsewhere) when the rows carry it, then
    ``R@k`` for each k (4 decimals, as fractions in [0, 1])."""
    metrics = (["headline"] if any("headline" in row for row in rows) else []) + [recall_key(k) for k in ks]
    with atomic_write(path) as handle:
        handle.write("\t".join([*head, *metrics]) + "\n")
        for row in rows:
            cells = [str(row.get(col, "")) for col in head]
            cells += [f"{row[m]:.4f}" if row.get(m) is not None else "" for m in metrics]
            handle.write("\t".join(c.replace("\t", " ") for c in cells) + "\n")


def read_tsv(path: str | os.PathLike) -> list[dict[str, str]]:
    """Rows of a TSV written by :func:`write_tsv`, as header -> cell strings."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    if not lines:
        raise DataError("empty TSV file", path=str(path))
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"), strict=False)) for line in lines[1:] if line.strip()]
