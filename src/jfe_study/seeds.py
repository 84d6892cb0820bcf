"""Reports over repeated runs (seeds) of the paper study: per-category mean ± sd, the fusion margin seed by
seed and how often the paper's pattern holds (``seeds.md``, ``seeds.json``, a chart with every seed as a dot).

Built from the library's report blocks (:mod:`jfe.eval.report`); ``jfe seeds-report`` and the reproduce job
write it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jfe.data.records import FUSION_CATEGORIES
from jfe.errors import ConfigError
from jfe.eval.metrics import PRIMARY_METRIC
from jfe.eval.protocol import EvalResult
from jfe.eval.report import (
    backticked,
    bar_chart,
    fusion_flag,
    margin_summary,
    present_categories,
    resolve_roles,
    role_of,
    signed_or_dash,
    write_json,
    write_lines,
)

SEEDS_REPORT_FILE = "seeds.md"
SEEDS_CHART_FILE = "categories_r5_seeds.png"


def mean_sd(values: Sequence[float]) -> str:
    """``"m ± sd"`` in % (sample sd; just the mean for a single value)."""
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * float(np.mean(values)):.1f} ± {100 * float(np.std(values, ddof=1)):.1f}"


def seed_category_table(groups: Mapping[str, Sequence[EvalResult]], *, average: bool = False) -> list[str]:
    """Markdown table of R@5 per category, mean ± sd over each run's repeats; ``average`` adds the runs'
    overall average as a last row."""
    names = list(groups)
    lines = ["| category | fusion | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
    for category in present_categories(r for rs in groups.values() for r in rs):
        cells = [mean_sd([r.categories.get(category, {}).get(PRIMARY_METRIC, np.nan) for r in groups[n]])
                 for n in names]
        lines.append(f"| {category} | {fusion_flag(category)} | " + " | ".join(cells) + " |")
    if average:
        lines.append("| **average** | | " + " | ".join(
            mean_sd([r.average.get(PRIMARY_METRIC, np.nan) for r in groups[n]]) for n in names) + " |")
    return lines


def seed_chart(groups: dict[str, list[EvalResult]], categories: list[str], path: Path,
                metric: str = PRIMARY_METRIC) -> None:
    bars = {name: (f"{name} ({role_of(rs[0])})",
                   np.array([[100 * r.categories.get(c, {}).get(metric, np.nan) for c in categories] for r in rs]))
            for name, rs in groups.items()}
    first = next(iter(groups.values()))
    bar_chart(bars, categories, f"{metric} per category, mean of {len(first)} seeds, dots = seeds "
                                 f"({first[0].pool} pool)", path, metric)


def _load_repeats(groups: Mapping[str, Sequence[EvalResult | str | os.PathLike]]) -> dict[str, list[EvalResult]]:
    """Every run's repeats loaded; all runs must have the same (non-zero) number of them."""
    loaded = {name: [r if isinstance(r, EvalResult) else EvalResult.load(r) for r in repeats]
              for name, repeats in groups.items()}
    if not loaded:
        raise ConfigError("no evaluation results to report")
    counts = {name: len(rs) for name, rs in loaded.items()}
    if len(set(counts.values())) != 1 or 0 in counts.values():
        raise ConfigError(f"every run needs the same number of repeats (seeds), got {counts}")
    return loaded


def _seed_pattern(seed_runs: dict[str, EvalResult], ours: str, baselines: Sequence[str],
                  categories: list[str]) -> dict[str, Any]:
    """One seed's R@5 fusion margins and the categories where ours is at least every other run."""
    margins = margin_summary(seed_runs, ours, baselines, metrics=(PRIMARY_METRIC,))["metrics"][PRIMARY_METRIC]
    others = [n for n in seed_runs if n != ours]
    led = [c for c in categories if all(
        seed_runs[ours].categories.get(c, {}).get(PRIMARY_METRIC, -1.0) >= seed_runs[o].categories.get(c, {}).get(
            PRIMARY_METRIC, -1.0) for o in others)]
    return {"fusion": margins["fusion"], "non_fusion": margins["non_fusion"], "gap": margins["gap"],
            "per_category": margins["per_category"], "categories_led": led,
            "leads_everywhere": len(led) == len(categories)}


def _seed_pattern_section(loaded: dict[str, list[EvalResult]], ours: str, baselines: Sequence[str],
                          categories: list[str], summary: dict[str, Any]) -> list[str]:
    """The paper's pattern seed by seed (R@5); fills ``summary["per_seed"]`` and ``summary["pattern_held"]``."""
    n_seeds = summary["seeds"]
    lines = ["", f"## The paper's pattern, seed by seed ({PRIMARY_METRIC})", "",
             f"Margin = `{ours}` minus the best of {backticked(baselines)}, averaged over "
             f"the fusion categories ({', '.join(FUSION_CATEGORIES)}) and over the others; "
             f"'leads everywhere' = `{ours}` ≥ every other run in every category.", "",
             "| seed | fusion margin | non-fusion margin | gap | leads everywhere | categories led |",
             "|---:|---:|---:|---:|---|---:|"]
    for i in range(n_seeds):
        entry = _seed_pattern({n: rs[i] for n, rs in loaded.items()}, ours, baselines, categories)
        summary["per_seed"].append(entry)
        cells = [signed_or_dash(entry[k]) for k in ("fusion", "non_fusion", "gap")]
        lines.append(f"| {i} | " + " | ".join(cells) + f" | {'yes' if entry['leads_everywhere'] else 'no'} | "
                     f"{len(entry['categories_led'])}/{len(categories)} |")
    gaps = [e["gap"] for e in summary["per_seed"] if e["gap"] is not None]
    held = sum(1 for e in summary["per_seed"] if e["leads_everywhere"] and (e["gap"] or 0) > 0)
    summary["pattern_held"] = held
    lines += ["", f"Gap (fusion minus non-fusion margin) over seeds: {mean_sd(gaps) if gaps else '–'} points; "
                  f"the full pattern (leads everywhere **and** gap > 0) held in **{held} of {n_seeds}** seeds."]
    return lines


def write_seed_report(groups: Mapping[str, Sequence[EvalResult | str | os.PathLike]], out_dir: str | os.PathLike,
                      *, ours: str | None = None, baselines: Sequence[str] | None = None,
                      title: str | None = None) -> Path:
    """Repeated runs (e.g. seeds) of each model: ``seeds.md`` (per-category mean ± sd, the fusion margin per
    seed and how often the paper's pattern holds), ``seeds.json`` and a chart with every seed as a dot.

    ``groups``: run name -> its repeats; repeat *i* of every run is taken as one seed, so all runs need the
    same number of repeats (the margins compare runs within a seed).
    """
    loaded = _load_repeats(groups)
    names = list(loaded)
    n_seeds = len(loaded[names[0]])
    _, ours, baselines = resolve_roles({n: rs[0] for n, rs in loaded.items()}, ours, baselines)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    first = loaded[names[0]][0]
    categories = present_categories(r for rs in loaded.values() for r in rs)
    lines = [f"# {title or 'JFE evaluation across seeds'}", "",
             f"{n_seeds} repeats per run; split `{first.split}`, `{first.pool}` pool(s). Recall in %, "
             "mean ± sample standard deviation over the repeats.", "",
             f"## Per category ({PRIMARY_METRIC})", ""]
    lines += seed_category_table(loaded, average=True)
    lines += ["", f"![{PRIMARY_METRIC} per category across seeds]({SEEDS_CHART_FILE})"]
    summary: dict[str, Any] = {"ours": ours, "baselines": list(baselines), "runs": names, "seeds": n_seeds,
                               "per_seed": []}
    if ours and baselines:
        lines += _seed_pattern_section(loaded, ours, baselines, categories, summary)
    seed_chart(loaded, categories, out / SEEDS_CHART_FILE)
    path = write_lines(out / SEEDS_REPORT_FILE, lines)
    write_json(out / "seeds.json", summary)
    return path
