"""Bootstrap confidence intervals over queries, and the fusion margin with its interval.

:func:`stratified_bootstrap` is the general tool: each stratum (one M-BEIR (dataset, task) row) is a
matrix ``[queries, runs]`` of per-query scores of several runs on the *same* queries; a replicate resamples
the queries of every stratum with replacement (within the stratum, so every task keeps its size) and
recomputes a statistic of the strata means. Runs are resampled together (a paired bootstrap), so the
interval of a difference between runs reflects only the query sample, not unpaired noise.

:func:`fusion_margin_ci` applies it to the paper's question, from the ``per_query.jsonl`` files that
``jfe eval`` writes: per category, ours minus the best late-fusion run (best taken inside each replicate);
averaged over the fusion categories and over the others, as :func:`jfe.eval.report.margin_summary`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jfe.data.records import CATEGORIES, FUSION_CATEGORIES
from jfe.errors import DataError
from jfe.eval.metrics import recall_key

PER_QUERY_FILE = "per_query.jsonl"

# statistic(strata means) -> value: a list with one array [B, runs] per stratum in, an array [B] out
Statistic = Callable[[list[np.ndarray]], np.ndarray]


@dataclass(frozen=True)
class Interval:
    """A point estimate with its percentile bootstrap interval."""

    estimate: float
    low: float
    high: float
    level: float
    n_boot: int

    def to_json(self) -> dict[str, float]:
        return asdict(self)


def stratified_bootstrap(strata: Sequence[np.ndarray], statistic: Statistic, n_boot: int = 2000, seed: int = 0,
                         level: float = 0.95) -> Interval:
    """Percentile bootstrap interval of ``statistic`` over queries resampled within each stratum.

    ``strata``: arrays ``[n_i, runs]`` (or ``[n_i]`` for one run), rows = queries. ``statistic`` gets one
    array ``[B, runs]`` of resampled stratum means per stratum and returns ``[B]``; the estimate is the
    statistic of the observed means. Deterministic for a given ``seed``.
    """
    if not strata:
        raise ValueError("no strata to resample")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if any(len(s) == 0 for s in strata):
        raise ValueError("every stratum needs at least one query")
    mats = [np.asarray(s, dtype=np.float64).reshape(len(s), -1) for s in strata]
    rng = np.random.default_rng(seed)
    observed = [m.mean(axis=0, keepdims=True) for m in mats]
    replicates = []
    for m in mats:
        # counts of each query per replicate (multinomial = resampling n of n with replacement): memory
        # O(B * n) instead of O(B * n * runs) for index gathering
        counts = rng.multinomial(len(m), np.full(len(m), 1.0 / len(m)), size=n_boot)
        replicates.append(counts @ m / len(m))
    values = np.asarray(statistic(replicates), dtype=np.float64)
    estimate = float(np.asarray(statistic(observed), dtype=np.float64).reshape(-1)[0])
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(values, [alpha, 1.0 - alpha])
    return Interval(estimate, float(low), float(high), level, n_boot)


# ------------------------------------------------------------------------------------------ per-query input
def read_per_query(path: str | os.PathLike) -> list[dict[str, Any]]:
    """``per_query.jsonl`` of one evaluation (the file or the folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / PER_QUERY_FILE
    if not path.is_file():
        raise DataError("no per-query results here (per_query.jsonl missing; rerun jfe eval)", path=str(path))
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            entries.append({"qid": str(entry["qid"]), "dataset": entry.get("dataset"), "task": entry["task"],
                            "first_hit_rank": entry.get("first_hit_rank"), "modification": entry.get("modification")})
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise DataError(f"malformed per-query line ({exc})", path=str(path), line=number) from None
    return entries


Entries = Sequence[dict[str, Any]]


def _seeds(value: Entries | Sequence[Entries]) -> list[Entries]:
    """One run's per-query entries, or a list of them (one per seed)."""
    if len(value) and isinstance(value[0], dict):
        return [value]  # type: ignore[list-item]
    return list(value)  # type: ignore[arg-type]


def hit_matrix(runs: Mapping[str, Entries | Sequence[Entries]], k: int = 5,
               key: Callable[[dict[str, Any]], Any] | None = None) -> dict[Any, tuple[list[str], np.ndarray]]:
    """Per stratum (default: ``(dataset, task)``), the qids every run scored and a ``[queries, runs]``
    matrix of hits at ``k`` (runs in the mapping's order). A run given as several seeds' entries scores a
    query by its hit rate over the seeds. Queries a run (or seed) lacks are dropped, so the runs stay paired."""
    key = key or (lambda e: (e["dataset"], e["task"]))
    names = list(runs)
    tables = [[{(key(e), e["qid"]): e for e in seed} for seed in _seeds(runs[n])] for n in names]
    every = [t for seeds in tables for t in seeds]
    shared = set(every[0]).intersection(*every[1:]) if every else set()
    strata: dict[Any, list[str]] = {}
    for stratum, qid in sorted(shared, key=lambda sq: (str(sq[0]), sq[1])):
        strata.setdefault(stratum, []).append(qid)

    def hit(entry: dict[str, Any]) -> float:
        rank = entry["first_hit_rank"]
        return 1.0 if rank is not None and rank <= k else 0.0

    out = {}
    for stratum, qids in strata.items():
        hits = np.array([[np.mean([hit(t[(stratum, q)]) for t in seeds]) for seeds in tables] for q in qids])
        out[stratum] = (qids, hits)
    return out


def _margin_statistic(categories: list[list[int]], ours: int, baselines: list[int]) -> Statistic:
    """Mean over the given categories (stratum indices each) of ours minus the best baseline."""
    def statistic(means: list[np.ndarray]) -> np.ndarray:
        margins = []
        for members in categories:
            score = np.mean([means[i] for i in members], axis=0)  # [B, runs]: category = mean of its rows
            margins.append(score[:, ours] - score[:, baselines].max(axis=1))
        return np.mean(margins, axis=0)

    return statistic


def fusion_margin_ci(runs: Mapping[str, Entries | Sequence[Entries]], ours: str, baselines: Sequence[str],
                     k: int = 5, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """Ours minus the best baseline at R@k, averaged over the fusion categories and over the others, with
    bootstrap intervals (queries resampled within each (dataset, task)); also per category. A run may be
    given as several seeds' entries: each query then scores its hit rate over the seeds."""
    if ours not in runs or not baselines or any(b not in runs for b in baselines):
        raise ValueError(f"need per-query results of {ours!r} and of the baselines {list(baselines)}")
    names = [ours, *baselines]
    matrix = hit_matrix({n: runs[n] for n in names}, k)
    keys = list(matrix)
    strata = [matrix[s][1] for s in keys]
    cat_members = {c: [i for i, (_, task) in enumerate(keys) if task in tasks] for c, tasks in CATEGORIES.items()}
    cat_members = {c: m for c, m in cat_members.items() if m}
    out: dict[str, Any] = {"ours": ours, "baselines": list(baselines), "metric": recall_key(k), "per_category": {}}
    for group, wanted in (("fusion", True), ("non_fusion", False)):
        group_members = [m for c, m in cat_members.items() if (c in FUSION_CATEGORIES) == wanted]
        out[group] = (stratified_bootstrap(strata, _margin_statistic(group_members, 0, list(range(1, len(names)))),
                                           n_boot, seed, level).to_json() if group_members else None)
    for category, members in cat_members.items():
        out["per_category"][category] = stratified_bootstrap(
            strata, _margin_statistic([members], 0, list(range(1, len(names)))), n_boot, seed, level).to_json()
    return out


def modification_margin_ci(runs: Mapping[str, Entries | Sequence[Entries]], ours: str, baselines: Sequence[str],
                           k: int = 5, n_boot: int = 2000, seed: int = 0, level: float = 0.95
                           ) -> list[dict[str, Any]]:
    """Per (task, modification type): ours minus the best baseline at R@k, with its bootstrap interval."""
    names = [ours, *baselines]
    with_mod = {n: [[e for e in seed if e.get("modification") is not None] for seed in _seeds(runs[n])]
                for n in names}
    matrix = hit_matrix(with_mod, k, key=lambda e: (e["task"], str(e["modification"])))
    rows = []
    for (task, modification), (qids, hits) in matrix.items():
        interval = stratified_bootstrap([hits], _margin_statistic([[0]], 0, list(range(1, len(names)))),
                                        n_boot, seed, level)
        rows.append({"task": task, "modification": modification, "queries": len(qids),
                     **{f"{n} {recall_key(k)}": float(hits[:, i].mean()) for i, n in enumerate(names)},
                     "margin": interval.to_json()})
    return rows
