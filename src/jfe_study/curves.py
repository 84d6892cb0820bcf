"""Learning curves from training logs, and where they plateau.

The trainer's periodic validation writes ``val/R@5`` (mean over val query files) and ``val/R@5/task<N>``
lines into ``metrics.jsonl``; :func:`read_curve` turns them into a curve per category of the paper
(mean over the category's tasks) plus the average, and :func:`plateau` finds the budget where the average
stops improving by more than a threshold.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from jfe.data.mbeir import iter_json_lines
from jfe.data.records import CATEGORIES
from jfe.errors import DataError
from jfe.eval.metrics import PRIMARY_METRIC
from jfe.train.config import VAL_PREFIX

_TASK_KEY = re.compile("^" + re.escape(f"{VAL_PREFIX}{PRIMARY_METRIC}/task") + r"(\d+)$")
AVERAGE = "average"


@dataclass
class Curve:
    """Validation R@5 against training steps: ``values[name][i]`` at ``steps[i]`` (name: a category or
    ``"average"``); a category missing from a validation is NaN there."""

    steps: list[int]
    values: dict[str, list[float]] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def read_curve(metrics_path: str | os.PathLike, step_offset: int = 0) -> Curve:
    """The validation points of one ``metrics.jsonl`` (its file or run folder). ``step_offset`` shifts
    the steps (e.g. stage 2's steps after stage 1's)."""
    path = Path(metrics_path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise DataError("no training log here (metrics.jsonl missing)", path=str(path))
    points: dict[int, dict[str, float]] = {}
    for _, record in iter_json_lines(path):
        if VAL_PREFIX + PRIMARY_METRIC in record:
            points[int(record["step"]) + step_offset] = record  # a resumed run's repeat replaces the old one
    steps = sorted(points)
    curve = Curve(steps=steps, values={AVERAGE: [float(points[s][VAL_PREFIX + PRIMARY_METRIC]) for s in steps]})
    for category, tasks in CATEGORIES.items():
        column = []
        for s in steps:
            scores = [float(v) for key, v in points[s].items()
                      if (m := _TASK_KEY.match(key)) and int(m.group(1)) in tasks]
            column.append(float(np.mean(scores)) if scores else float("nan"))
        if not all(np.isnan(column)):
            curve.values[category] = column
    return curve


@dataclass(frozen=True)
class Plateau:
    """Where a curve stops improving: ``step`` (the budget), its value, and whether the plateau was seen
    (``reached``: later points exist and none beats the best-so-far by more than the threshold) or the
    curve was still rising at its last point (then ``step`` is the last step)."""

    step: int
    value: float
    reached: bool
    threshold: float
    smoothing: int

    def to_json(self) -> dict:
        return asdict(self)


def smooth(values: Sequence[float] | np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over ``window`` points (the first points average what exists so far)."""
    arr = np.asarray(values, dtype=np.float64)
    if window <= 1 or len(arr) == 0:
        return arr
    cumsum = np.cumsum(np.insert(arr, 0, 0.0))
    idx = np.arange(1, len(arr) + 1)
    start = np.maximum(0, idx - window)
    return (cumsum[idx] - cumsum[start]) / (idx - start)


def plateau(steps: Sequence[int], values: Sequence[float], threshold: float = 0.005, smoothing: int = 1) -> Plateau:
    """The first step after which the (smoothed) curve never rises more than ``threshold`` above its best
    so far: ``max(values[after]) - max(values[up to and including s]) <= threshold``.

    ``threshold`` is in the curve's units (R@5 as a fraction: 0.005 = half a point). A curve that still
    gains more than ``threshold`` at its last point has no plateau yet (``reached=False``, the last step).
    """
    if len(steps) != len(values) or not len(steps):
        raise ValueError("plateau needs as many values as steps, and at least one")
    if threshold < 0:
        raise ValueError("threshold must be >= 0")
    order = np.argsort(np.asarray(steps), kind="stable")
    s = np.asarray(steps)[order]
    v = smooth(np.asarray(values, dtype=np.float64)[order], smoothing)
    best_so_far = np.maximum.accumulate(v)
    for i in range(len(s) - 1):
        if np.max(v[i + 1:]) - best_so_far[i] <= threshold:
            return Plateau(int(s[i]), float(v[i]), True, threshold, smoothing)
    return Plateau(int(s[-1]), float(v[-1]), False, threshold, smoothing)


def common_budget(plateaus: Sequence[Plateau], steps: Sequence[int]) -> int:
    """One budget for every model: the latest plateau (every model has then stopped improving), as one of
    the validated ``steps``."""
    if not plateaus:
        raise ValueError("no plateaus")
    latest = max(p.step for p in plateaus)
    later = [s for s in sorted(steps) if s >= latest]
    return later[0] if later else latest
