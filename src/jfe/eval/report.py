"""Comparison reports over several evaluation results: one Markdown file and one PNG bar chart.

The report answers the paper's question: does the one-tower (joint fusion) encoder gain more over the
late-fusion baselines on tasks that need modality fusion than on tasks that do not? Its *margin summary*
takes, per category, ours minus the best late-fusion run (SF or FF), and averages those margins over the
fusion categories and over the others.

Roles come from run names (or the model arch): names with ``late-fusion``/``-sf``/``-ff``/``fusion`` are
late fusion, ``two-tower``/``clip`` two-tower, and ``jfe``/``one-tower`` ours (the first such, unless
``ours=`` says otherwise).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jfe.data.records import CATEGORIES, FUSION_CATEGORIES
from jfe.errors import ConfigError
from jfe.eval.metrics import DEFAULT_HEADLINE_K, HEADLINE_K, PRIMARY_METRIC, headline_label, recall_key
from jfe.eval.protocol import EXCLUSION_NOTE, EvalResult
from jfe.paths import atomic_write

REPORTED = (recall_key(1), PRIMARY_METRIC)  # the metrics of the breakdown tables

REPORT_FILE = "report.md"
CHART_FILE = "categories_r5.png"


def role_of(result: EvalResult) -> str:
    """A run's fusion role as declared: recorded in its results (the model's ``Encoder.fusion_role``, or the
    study's role for the run), else the declared role of the arch it records; never guessed from a name."""
    if result.fusion_role:
        return result.fusion_role
    from jfe.models.registry import fusion_role_of

    return fusion_role_of(result.arch) if result.arch else "other"


def _load(results: Mapping[str, EvalResult | str | os.PathLike]) -> dict[str, EvalResult]:
    loaded = {}
    for name, value in results.items():
        loaded[str(name)] = value if isinstance(value, EvalResult) else EvalResult.load(value)
    if not loaded:
        raise ConfigError("no evaluation results to report")
    return loaded


def resolve_roles(runs: Mapping[str, EvalResult], ours: str | None, baselines: Sequence[str] | None
                   ) -> tuple[dict[str, str], str | None, list[str]]:
    """Each run's role, then ``ours`` (default: ``jfe-mini``, else the first one-tower run) and the baselines
    (default: the late-fusion runs)."""
    roles = {n: role_of(r) for n, r in runs.items()}
    if ours is None:
        ones = [n for n in runs if roles[n] == "one-tower"]
        ours = next((n for n in ones if n == "jfe-mini"), ones[0] if ones else None)
    elif ours not in runs:
        raise ConfigError(f"--ours {ours!r} is not one of the runs: {', '.join(runs)}")
    if baselines is None:
        baselines = [n for n in runs if roles[n] == "late-fusion"]
    return roles, ours, list(baselines)


def present_categories(results: Iterable[EvalResult]) -> list[str]:
    """The paper's categories that any of ``results`` scored, in the paper's order."""
    present = {c for r in results for c in r.categories}
    return [c for c in CATEGORIES if c in present]


def _fmt(value: float | None, best: float | None) -> str:
    if value is None:
        return "–"
    text = f"{100 * value:.1f}"
    # equal to the best at the shown precision counts as best (ties for best are all bold)
    return f"**{text}**" if best is not None and f"{100 * best:.1f}" == text else text


def _signed(value: float) -> str:
    """A fraction as signed percentage points, one decimal; never "-0.0"."""
    return f"{round(100 * value, 1) + 0.0:+.1f}"


def _table(head: list[str], names: list[str], metrics: Sequence[str],
           rows: list[tuple[list[str], dict[str, dict[str, float | None]]]]) -> list[str]:
    """Markdown table: ``head`` columns, then one column per (run, metric); best per row and metric in bold."""
    cols = head + [f"{n} {m}" for n in names for m in metrics]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] * len(head) + ["---:"] * (len(cols) - len(head)))
             + "|"]
    for cells, values in rows:
        best: dict[str, float | None] = {}
        for m in metrics:
            present = [v for n in names if (v := values.get(n, {}).get(m)) is not None]
            # nothing to single out when fewer than two runs have a value or all show the same number
            distinct = {f"{100 * v:.1f}" for v in present}
            best[m] = max(present) if len(present) > 1 and len(distinct) > 1 else None
        out = list(cells) + [_fmt(values.get(n, {}).get(m), best[m]) for n in names for m in metrics]
        lines.append("| " + " | ".join(out) + " |")
    return lines


def category_scores(result: EvalResult, metric: str) -> dict[str, float]:
    return {c: v[metric] for c, v in result.categories.items() if metric in v}


def margin_summary(runs: dict[str, EvalResult], ours: str, baselines: Sequence[str],
                   metrics: Sequence[str] = REPORTED) -> dict[str, Any]:
    """Per category: ours minus the best of ``baselines``; then the mean over fusion categories and over
    the others, and their difference (positive = ours gains more where fusion is needed)."""
    out: dict[str, Any] = {"ours": ours, "baselines": list(baselines), "metrics": {}}
    for metric in metrics:
        per_cat = {}
        for category in CATEGORIES:
            mine = runs[ours].categories.get(category, {}).get(metric)
            theirs = [t for b in baselines if (t := runs[b].categories.get(category, {}).get(metric)) is not None]
            if mine is None or not theirs:
                continue
            per_cat[category] = mine - max(theirs)
        fusion = [v for c, v in per_cat.items() if c in FUSION_CATEGORIES]
        other = [v for c, v in per_cat.items() if c not in FUSION_CATEGORIES]
        entry: dict[str, Any] = {"per_category": per_cat,
                                 "fusion": float(np.mean(fusion)) if fusion else None,
                                 "non_fusion": float(np.mean(other)) if other else None}
        entry["gap"] = entry["fusion"] - entry["non_fusion"] if fusion and other else None
        out["metrics"][metric] = entry
    return out


def bar_chart(bars: dict[str, tuple[str, np.ndarray]], categories: list[str], title: str, path: Path,
               metric: str = PRIMARY_METRIC) -> None:
    """Grouped bars per category: ``bars`` = name -> (legend label, values ``[n_categories]`` or, for
    repeats, ``[n_repeats, n_categories]``: the bar is their mean and every repeat a dot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.8 / max(1, len(bars))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(categories) + 2), 4.2), dpi=110)
    x = np.arange(len(categories))
    for i, (label, values) in enumerate(bars.values()):
        offset = x + (i - (len(bars) - 1) / 2) * width
        drawn = ax.bar(offset, values if values.ndim == 1 else values.mean(0), width, label=label)
        if values.ndim == 1:
            ax.bar_label(drawn, fmt="%.0f", fontsize=7, padding=1)
        else:  # with 2-3 repeats the spread itself is the information
            for row in values:
                ax.scatter(offset, row, s=6, color="black", zorder=3)
    ax.set_xticks(x, [c + ("\n(fusion)" if c in FUSION_CATEGORIES else "") for c in categories])
    ax.set_ylabel(f"{metric} (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    with atomic_write(path, mode="wb") as handle:
        fig.savefig(handle, format="png")
    plt.close(fig)


def _chart(runs: dict[str, EvalResult], path: Path, metric: str = PRIMARY_METRIC) -> None:
    categories = present_categories(runs.values())
    bars = {name: (f"{name} ({role_of(r)})",
                   np.array([100 * r.categories.get(c, {}).get(metric, np.nan) for c in categories]))
            for name, r in runs.items()}
    first = next(iter(runs.values()))
    bar_chart(bars, categories, f"{metric} per category ({first.pool} pool, {first.split} split)", path, metric)


HEADLINE_NOTE = (f"M-BEIR's per-dataset headline Recall, {recall_key(HEADLINE_K['fashioniq'])} for Fashion200K and "
                 f"FashionIQ and {recall_key(DEFAULT_HEADLINE_K)} for every other dataset; category averages and "
                 "margins use it.")


def headline_metric(results: Iterable[EvalResult]) -> str:
    """The metric key for headline columns: ``"R@5"`` when every (dataset, task) row's headline is R@5 (so
    MiniBEIR's reports read as before), else ``"headline"`` (each row's own headline k)."""
    return headline_label(r.get("headline_k", DEFAULT_HEADLINE_K) for res in results for r in res.rows)


def write_lines(path: Path, lines: list[str]) -> Path:
    """A Markdown file from its lines (newline-terminated); returns ``path``."""
    with atomic_write(path) as handle:
        handle.write("\n".join(lines) + "\n")
    return path


def write_json(path: Path, obj: Any) -> None:
    with atomic_write(path) as handle:
        handle.write(json.dumps(obj, indent=2) + "\n")


def signed_or_dash(value: float | None) -> str:
    return _signed(value) if value is not None else "–"


def backticked(names: Iterable[str]) -> str:
    """Run names as inline code, comma-separated (how reports list the baselines)."""
    return ", ".join(f"`{n}`" for n in names)


def fusion_flag(category: str) -> str:
    return "yes" if category in FUSION_CATEGORIES else "no"


def _report_header(runs: dict[str, EvalResult], roles: dict[str, str], title: str | None) -> list[str]:
    """Title, what the scores are, one line per run, and a warning when runs disagree on split or pool."""
    names = list(runs)
    first = runs[names[0]]
    lines = [f"# {title or 'JFE evaluation report'}", "",
             f"Split `{first.split}`, `{first.pool}` candidate pool(s), instructions `{first.instructions}`. "
             "Scores are M-BEIR Recall@k in % (hit rate: 1 if any positive is in the top k), averaged per "
             "(dataset, task); categories average their (dataset, task) rows. Best per row in **bold**. "
             f"Headline metric: {HEADLINE_NOTE}", "",
             f"_{EXCLUSION_NOTE}_", "", "| run | role | model | queries |", "|---|---|---|---:|"]
    lines += [f"| {n} | {roles[n]} | `{runs[n].model}` | {runs[n].n_queries} |" for n in names]
    mismatched = [n for n in names if (runs[n].split, runs[n].pool) != (first.split, first.pool)]
    if mismatched:
        lines += ["", f"**Warning:** runs {', '.join(mismatched)} used a different split or pool."]
    return lines


def _category_section(runs: dict[str, EvalResult], metrics: Sequence[str]) -> list[str]:
    """Per category (and the average) for every run, then the chart; ``metrics[1]`` is the headline."""
    names = list(runs)
    rows = []
    for category in present_categories(runs.values()):
        tasks = sorted({t for r in runs.values() for t in r.categories.get(category, {}).get("tasks", [])})
        values = {n: {m: runs[n].categories.get(category, {}).get(m) for m in metrics} for n in names}
        rows.append(([category, fusion_flag(category), ",".join(map(str, tasks))], values))
    avg = {n: {m: runs[n].average.get(m) for m in metrics} for n in names}
    rows.append((["**average**", "", ""], avg))
    return (["", "## Per category", ""] + _table(["category", "fusion", "tasks"], names, metrics, rows)
            + ["", f"![{metrics[1]} per category]({CHART_FILE})"])


def _task_section(runs: dict[str, EvalResult], metrics: Sequence[str]) -> list[str]:
    """One row per (dataset, task) any run scored; rows without a task sort last (as task 99)."""
    names = list(runs)

    def task_of(row: dict[str, Any]) -> Any:
        return row["task"] if row["task"] is not None else 99

    keys = sorted({(task_of(r), r["dataset"], r["modality"]) for res in runs.values() for r in res.rows})
    rows = []
    for task, dataset, modality in keys:
        values = {}
        for n in names:
            row = next((r for r in runs[n].rows if r["dataset"] == dataset and task_of(r) == task), None)
            values[n] = {m: row.get(m) if row else None for m in metrics}
        rows.append(([dataset, str(task), modality], values))
    return ["", "## Per task (dataset, task)", ""] + _table(["dataset", "task", "query→candidate"], names, metrics,
                                                            rows)


def _modification_section(runs: dict[str, EvalResult]) -> list[str]:
    """R@1/R@5 per (task, modification type); empty when no run has modification types."""
    names = list(runs)
    keys = sorted({(str(m["task"]), m["modification"], str(m.get("non_additive")))
                   for res in runs.values() for m in res.modifications})
    if not keys:
        return []
    rows = []
    for task, mod, flag in keys:
        values, count = {}, 0
        for n in names:
            entry = next((m for m in runs[n].modifications if str(m["task"]) == task
                          and m["modification"] == mod), None)
            values[n] = {k: entry.get(k) if entry else None for k in REPORTED}
            count = max(count, entry["queries"] if entry else 0)
        rows.append(([task, mod, {"True": "yes", "False": "no"}.get(flag, "?"), str(count)], values))
    return (["", "## Per modification type", "",
             "Composed and question tasks broken down by the kind of modification the query text asks for; "
             "`non-additive` ones need the image and the text combined (late score fusion cannot add them).", ""]
            + _table(["task", "modification", "non-additive", "queries"], names, REPORTED, rows))


def _additive_section(runs: dict[str, EvalResult]) -> list[str]:
    """R@1/R@5 of additive vs non-additive queries per task; empty when no run split them."""
    names = list(runs)
    keys = sorted({(str(f["task"]), bool(f["non_additive"])) for res in runs.values() for f in res.non_additive})
    if not keys:
        return []
    rows = []
    for task, flag in keys:
        values = {}
        for n in names:
            entry = next((f for f in runs[n].non_additive if str(f["task"]) == task
                          and bool(f["non_additive"]) == flag), None)
            values[n] = {k: entry.get(k) if entry else None for k in REPORTED}
        rows.append(([task, "non-additive" if flag else "additive"], values))
    return ["", "### Additive vs non-additive", ""] + _table(["task", "kind"], names, REPORTED, rows)


def _margin_section(runs: dict[str, EvalResult], ours: str | None, baselines: Sequence[str],
                    metrics: Sequence[str]) -> tuple[list[str], dict[str, Any] | None]:
    """The paper's claim: ours minus the best late-fusion baseline per category, the fusion / non-fusion
    means and the verdict on the headline ``metrics[1]``; the summary is None without ours or baselines."""
    lines = ["", "## Fusion vs non-fusion margin", ""]
    if not (ours and baselines):
        lines.append("Needs one one-tower run and at least one late-fusion run (name them e.g. `jfe-mini`, "
                     "`late-fusion-sf`, `late-fusion-ff`, or pass ours=/baselines=).")
        return lines, None
    summary = margin_summary(runs, ours, baselines, metrics)
    lines += [f"`{ours}` minus the best of {backticked(baselines)} per category "
              "(points of Recall@k); then the mean over fusion categories "
              f"({', '.join(FUSION_CATEGORIES)}) and over the others.", "",
              "| metric | " + " | ".join(CATEGORIES) + " | fusion mean | non-fusion mean | gap |",
              "|---|" + "---:|" * (len(CATEGORIES) + 3)]
    for metric, entry in summary["metrics"].items():
        cells = [signed_or_dash(entry["per_category"].get(c)) for c in CATEGORIES]
        cells += [signed_or_dash(entry[k]) for k in ("fusion", "non_fusion", "gap")]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    hl = metrics[1]
    gap = summary["metrics"][hl]["gap"]
    if gap is not None:
        verdict = "larger" if gap > 0 else "not larger"
        lines += ["", f"On {hl} the one-tower's margin over late fusion is **{verdict}** on fusion categories "
                      f"({_signed(gap)} points fusion minus non-fusion)."]
    return lines, summary


def _report_footer(runs: dict[str, EvalResult]) -> list[str]:
    """Queries scored as misses for want of a positive in the pool, then the runs' notes."""
    lines: list[str] = []
    missing = {n: r.missing_positives.get("count", 0) for n, r in runs.items() if r.missing_positives.get("count")}
    if missing:
        lines += ["", "Queries with no positive in the pool (scored as misses): " +
                  ", ".join(f"{n}: {c}" for n, c in missing.items())]
    notes = sorted({note for r in runs.values() for note in r.notes if note != EXCLUSION_NOTE})
    if notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in notes]
    return lines


def write_report(results: Mapping[str, EvalResult | str | os.PathLike], out_dir: str | os.PathLike, *,
                 ours: str | None = None, baselines: Sequence[str] | None = None, title: str | None = None) -> Path:
    """Write ``report.md`` and ``categories_r5.png`` comparing runs (name -> EvalResult or result folder);
    returns the Markdown path. ``ours`` / ``baselines`` override the roles the runs declare (:func:`role_of`)."""
    runs = _load(results)
    roles, ours, baselines = resolve_roles(runs, ours, baselines)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hl = headline_metric(runs.values())
    metrics = (recall_key(1), hl)
    lines = _report_header(runs, roles, title)
    lines += _category_section(runs, metrics)
    lines += _task_section(runs, metrics)
    lines += _modification_section(runs) + _additive_section(runs)
    margin_lines, summary = _margin_section(runs, ours, baselines, metrics)
    lines += margin_lines + _report_footer(runs)
    _chart(runs, out / CHART_FILE, hl)
    path = write_lines(out / REPORT_FILE, lines)
    if summary is not None:
        write_json(out / "margins.json", summary)
    return path
