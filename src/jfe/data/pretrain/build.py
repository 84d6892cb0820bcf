"""Build the pretraining corpus in the M-BEIR layout that stage 1 reads.

One dataset, ``pretrain`` (dataset id ``9``): every image is a candidate of task 0 (caption -> image), every
caption a candidate of task 3 (image -> caption); a second caption or a translation of an image is a
task-1 query (text -> its primary caption). Queries carry ``{"base": <item key>, "source": ...}`` so the
trainer's false-negative mask treats captions of one image as one item. 1 % of the images (at least one)
form a small val split for stage 1's end-of-run check; the rest are train.

Determinism: items are ranked by a hash of (seed, key); ids are assigned in that order; images are
rendered in a thread pool but each to its own file, and duplicates and leaks are decided afterwards in
rank order. The build goes to a temporary folder renamed into place at the end.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from jfe.data import assets
from jfe.data.mbeir import write_candidates, write_instructions, write_qrels, write_queries
from jfe.data.minibeir.render import fit_square, load_raster
from jfe.data.pretrain.leakage import LeakageReference, dhash, minibeir_config
from jfe.data.pretrain.sources import Item, SourceReport, read_icon_set, read_tuxpaint
from jfe.data.records import QUERY_ID_BOUND, Candidate, InstructionSet, Qrel, Query
from jfe.errors import ConfigError, DataError
from jfe.paths import ArtefactKind, atomic_dir, atomic_write, check_out_dir

DATASET = "pretrain"
# Outside M-BEIR's 0-9 and MiniBEIR's 90-91. Query ids and candidate ids are separate namespaces (as in the real
# M-BEIR, where "9:1" is both a query and a candidate), numbered from 1 so they stay under UniIR's bounds.
DATASET_ID = "92"
MARKER = ".pretrain.json"
VAL_FRACTION = 0.01


@dataclass
class PretrainSummary:
    """What a build produced, per source: items read, skipped, dropped for leakage, images and pairs kept."""

    out: Path
    sources: list[SourceReport]
    images: dict[str, int] = field(default_factory=dict)  # source -> images kept
    pairs: dict[str, int] = field(default_factory=dict)  # source -> (image, caption) pairs kept
    text_pairs: dict[str, int] = field(default_factory=dict)  # source -> (caption, caption) pairs kept
    dropped: dict[str, dict[str, int]] = field(default_factory=dict)  # source -> reason -> items
    queries: dict[tuple[int, str], int] = field(default_factory=dict)
    leakage: dict = field(default_factory=dict)
    seconds: float = 0.0
    config: dict = field(default_factory=dict)

    @property
    def total_images(self) -> int:
        return sum(self.images.values())

    @property
    def total_pairs(self) -> int:
        return sum(self.pairs.values())

    def to_markdown(self) -> str:
        reasons = sorted({r for d in self.dropped.values() for r in d})
        head = "| source | title | version | licence | read | skipped | " + " | ".join(
            f"dropped: {r}" for r in reasons) + " | images | image-text pairs | text pairs |"
        lines = [head, "|" + "---|" * 4 + "---:|" * (5 + len(reasons))]
        for s in self.sources:
            if s.excluded:
                lines.append(f"| {s.name} | {s.title} | {s.version} | {s.licence} | excluded: {s.excluded} |"
                             + " |" * (4 + len(reasons)))
                continue
            drop = self.dropped.get(s.name, {})
            lines.append(f"| {s.name} | {s.title} | {s.version} | {s.licence} | {s.items} | "
                         f"{sum(s.skipped.values())} | " + " | ".join(str(drop.get(r, 0)) for r in reasons)
                         + f" | {self.images.get(s.name, 0)} | {self.pairs.get(s.name, 0)} | "
                         f"{self.text_pairs.get(s.name, 0)} |")
        total_drop = [sum(d.get(r, 0) for d in self.dropped.values()) for r in reasons]
        lines.append(f"| **all** | | | | {sum(s.items for s in self.sources)} | "
                     f"{sum(sum(s.skipped.values()) for s in self.sources)} | "
                     + " | ".join(map(str, total_drop)) + f" | {self.total_images} | {self.total_pairs} | "
                     f"{sum(self.text_pairs.values())} |")
        return "\n".join(lines)


def render_svg_text(svg: str, size: int, origin: str) -> Image.Image:
    """An SVG document (a string) as an RGB ``size`` square on white; a bad SVG is a DataError naming it."""
    import resvg_py

    try:
        png = resvg_py.svg_to_bytes(svg_string=svg, width=size, height=size, background="#ffffff",
                                    skip_system_fonts=True)
    except (ValueError, RuntimeError) as exc:
        raise DataError(f"cannot render SVG ({exc})", path=origin) from None
    with Image.open(io.BytesIO(bytes(png))) as image:
        return fit_square(image, size)


def render_file(path: Path, size: int) -> Image.Image:
    if path.suffix.lower() == ".svg":
        try:
            return render_svg_text(path.read_text(encoding="utf-8"), size, str(path))
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read SVG ({exc})", path=str(path)) from None
    return load_raster(path, size)


def _raster(path: Path, size: int) -> Image.Image:
    return load_raster(path, size)


def _rank(seed: int, key: str) -> bytes:
    return hashlib.sha1(f"{seed}:pretrain:{key}".encode()).digest()


def _compact_png(image: Image.Image) -> bytes:
    """PNG bytes, grey when the image has no colour (most icons): a third of the size, same pixels."""
    rgb = image.convert("RGB")
    r, g, b = rgb.split()
    if r.tobytes() == g.tobytes() == b.tobytes():
        rgb = r
    buf = io.BytesIO()
    rgb.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def _clipart_items(minibeir: Path, warn: Callable[[str], None]) -> tuple[list[Item], SourceReport]:
    """openclipart drawings of MiniBEIR's *training* split (same seed and fractions as that build)."""
    from jfe.data.minibeir import split_of_base
    from jfe.data.minibeir.sources import load_clipart

    cfg = minibeir_config(minibeir)
    seed, fractions = int(cfg["seed"]), tuple(cfg["split_fractions"])
    drawings, info = load_clipart()
    report = SourceReport("openclipart", "Open Clip Art Library (MiniBEIR train split)",
                          ", ".join(info[0].packages), info[0].licence)
    items = []
    for d in drawings:
        if split_of_base(f"clipart:{d.path}", seed, fractions) != "train":  # type: ignore[arg-type]
            report.skip("MiniBEIR val/test drawing")
            continue
        captions = [d.title, *([", ".join(d.keywords)] if d.keywords else []), *([d.description] if d.description
                                                                                 else [])]
        items.append(Item("openclipart", f"openclipart/{d.path}", captions, [d.title, *d.keywords],
                          render=partial(_raster, d.png), origin=str(d.png)))
    report.items = len(items)
    return items, report


def fetched_sources() -> tuple[list[Path], Path | None]:
    """The fetched icon-set package folders and the Tux Paint stamps folder (None if not fetched)."""
    icon_sets = [assets.asset_dir(n) / "package" for n in assets.group_names("pretrain")
                 if n.startswith("iconify_") and assets.is_fetched(n)]
    tux = assets.asset_dir("tuxpaint_stamps") / "usr" / "share" / "tuxpaint" / "stamps"
    return icon_sets, tux if assets.is_fetched("tuxpaint_stamps") else None


# the build swaps the whole folder: it replaces only an earlier build (its marker) or an empty folder
PRETRAIN_KIND = ArtefactKind("pretraining-corpus build", (MARKER,))


@dataclass
class _Messages:
    """A build's progress lines (to ``log``, else stderr when ``progress``) and its warnings."""

    progress: bool
    log: Callable[[str], None] | None = None
    warnings: list[str] = field(default_factory=list)

    def say(self, message: str) -> None:
        if self.log is not None:
            self.log(message)
        elif self.progress:
            print(f"[pretrain] {message}", file=sys.stderr, flush=True)

    def warn(self, message: str) -> None:
        # always shown (the first 20; all are kept in the marker), whatever the progress setting
        self.warnings.append(message)
        if len(self.warnings) <= 20:
            if self.log is None and not self.progress:
                print(f"[pretrain] warning: {message}", file=sys.stderr, flush=True)
            else:
                self.say(f"warning: {message}")


def _read_sources(icon_sets: list[Path], tuxpaint: Path | None, clipart: bool, minibeir: Path,
                  messages: _Messages) -> tuple[list[Item], list[SourceReport]]:
    """Every item of the icon sets, the Tux Paint stamps and (if fetched) MiniBEIR's training clip-art."""
    items: list[Item] = []
    reports: list[SourceReport] = []
    for package in sorted(icon_sets):
        got, report = read_icon_set(package, render_svg_text)
        if report.excluded:
            messages.say(f"{report.name}: excluded ({report.excluded})")
        items += got
        reports.append(report)
    if tuxpaint is not None:
        got, report = read_tuxpaint(tuxpaint, render_file, messages.warn)
        record = tuxpaint.parents[3] / assets.MARKER if len(tuxpaint.parents) > 3 else None
        if record is not None and record.exists():
            report.version = ", ".join(json.loads(record.read_text(encoding="utf-8")).get("archives_sha256", {}))
        items += got
        reports.append(report)
    if clipart and assets.is_fetched("openclipart"):
        got, report = _clipart_items(minibeir, messages.warn)
        items += got
        reports.append(report)
    if not items:
        raise ConfigError("no pretraining sources: run `jfe assets fetch --pretrain` first")
    keys = Counter(i.key for i in items)
    if (dup := next((k for k, n in keys.items() if n > 1), None)) is not None:
        raise DataError("two items share one key (the same set fetched twice?)", record_id=dup)
    return items, reports


def _rank_candidates(items: list[Item], reference: LeakageReference, seed: int, max_pairs: int | None,
                     dropped: dict[str, Counter]) -> list[Item]:
    """The items whose names do not leak (counted in ``dropped``), in seeded rank order, capped near
    ``max_pairs``."""
    candidates: list[Item] = []
    for item in items:
        match = reference.text_match(item.names)
        if match:
            dropped[item.source]["leak: name"] += 1
        else:
            candidates.append(item)
    candidates.sort(key=lambda i: _rank(seed, i.key))
    if max_pairs is not None:
        # whole images in rank order until the cap; a little extra in case renders are dropped below
        chosen, pairs = [], 0
        for item in candidates:
            if pairs >= max_pairs * 1.1 + 10:
                break
            chosen.append(item)
            pairs += len(item.captions)
        candidates = chosen
    return candidates


def _render_all(tmp: Path, candidates: list[Item], rels: list[str], image_size: int, workers: int | None,
                progress: bool) -> list[tuple[str, np.ndarray] | str]:
    """Render and write every candidate's image in a thread pool; per candidate (pixel sha1, dhash), or the
    error text of a failed render. Each render writes its own file, so the result does not depend on timing."""

    def make(index: int) -> tuple[str, np.ndarray] | str:
        item = candidates[index]
        try:
            image = item.render(image_size)
        except DataError as exc:
            return str(exc)
        data = _compact_png(image)
        path = tmp / rels[index]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return hashlib.sha1(image.convert("RGB").tobytes()).hexdigest(), dhash(image)

    n_workers = workers or max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=n_workers) as pool:
        results_iter = pool.map(make, range(len(candidates)), chunksize=64)
        if progress:
            from tqdm import tqdm

            results_iter = tqdm(results_iter, total=len(candidates), desc="images", unit="img")
        return list(results_iter)


def _keep_rendered(tmp: Path, candidates: list[Item], rels: list[str], results: list[tuple[str, np.ndarray] | str],
                   reference: LeakageReference, max_pairs: int | None, dropped: dict[str, Counter],
                   warn: Callable[[str], None]) -> list[int]:
    """Indices of the rendered images to keep, decided in rank order: not unrenderable, not a leaked image,
    not a pixel duplicate of an earlier one, within ``max_pairs``. The others' files are deleted."""
    ok = [i for i, r in enumerate(results) if not isinstance(r, str)]
    leaks = reference.image_match(np.stack([results[i][1] for i in ok])) if ok else np.zeros(0, bool)
    leak_at = {i for i, leak in zip(ok, leaks, strict=True) if leak}
    kept: list[int] = []
    seen_pixels: set[str] = set()
    pairs = 0
    for index, result in enumerate(results):
        item = candidates[index]
        reason = ""
        if isinstance(result, str):
            reason = "unrenderable"
            warn(f"{item.source}: {result}; skipped")
        elif index in leak_at:
            reason = "leak: image"
        elif result[0] in seen_pixels:
            reason = "duplicate image"
        elif max_pairs is not None and pairs + len(item.captions) > max_pairs and kept:
            reason = "over --max-pairs"
        if reason:
            if reason != "over --max-pairs":
                dropped[item.source][reason] += 1
            (tmp / rels[index]).unlink(missing_ok=True)
            continue
        seen_pixels.add(result[0])
        pairs += len(item.captions)
        kept.append(index)
    return kept


def _write_docs(tmp: Path, summary: PretrainSummary, warnings: list[str]) -> None:
    """README.md and the build marker (config, sources, counts, leakage reference, the first 200 warnings)."""
    with atomic_write(tmp / "README.md") as fh:
        fh.write(_readme(summary, len(warnings)))
    with atomic_write(tmp / MARKER) as fh:
        fh.write(json.dumps({"builder": "jfe.data.pretrain", "config": summary.config,
                             "sources": [asdict(s) for s in summary.sources], "dropped": summary.dropped,
                             "images": summary.images, "pairs": summary.pairs,
                             "text_pairs": summary.text_pairs, "leakage": summary.leakage,
                             "warnings": warnings[:200]}, indent=2, sort_keys=True) + "\n")


def build_pretrain(out: str | Path, *, minibeir: str | Path, icon_sets: list[Path] | None = None,
                   tuxpaint: Path | None = None, clipart: bool = True, max_pairs: int | None = None,
                   seed: int = 0, image_size: int = 128, workers: int | None = None, progress: bool = True,
                   log: Callable[[str], None] | None = None, overwrite: bool = False) -> PretrainSummary:
    """Build the corpus into ``out`` (replaced atomically; a foreign folder refused unless ``overwrite``) from
    the given sources, never leaking ``minibeir``.

    ``icon_sets`` are ``@iconify-json`` ``package`` folders and ``tuxpaint`` a stamps folder; both default to
    the fetched assets (``jfe assets fetch --pretrain``). ``max_pairs`` caps the image-text pairs (a seeded
    choice of whole images), for quick builds.
    """
    start = time.perf_counter()
    out = Path(out)
    messages = _Messages(progress, log)
    if max_pairs is not None and max_pairs < 1:
        raise ConfigError(f"max_pairs must be positive, got {max_pairs}")
    check_out_dir(out, PRETRAIN_KIND, overwrite=overwrite)
    if icon_sets is None and tuxpaint is None:
        icon_sets, tuxpaint = fetched_sources()
    reference = LeakageReference.from_minibeir(minibeir)
    messages.say(f"leakage reference: {reference.describe()}")
    items, reports = _read_sources(list(icon_sets or []), tuxpaint, clipart, Path(minibeir), messages)
    dropped: dict[str, Counter] = defaultdict(Counter)
    candidates = _rank_candidates(items, reference, seed, max_pairs, dropped)
    with atomic_dir(out, PRETRAIN_KIND, overwrite=overwrite) as tmp:
        messages.say(f"rendering {len(candidates)} images from {len(reports)} sources")
        rels = [f"images/{i.key}.png" for i in candidates]
        results = _render_all(tmp, candidates, rels, image_size, workers, progress)
        kept = _keep_rendered(tmp, candidates, rels, results, reference, max_pairs, dropped, messages.warn)
        summary = _write(tmp, [candidates[i] for i in kept], [rels[i] for i in kept], seed)
        summary.out, summary.sources = out, reports
        summary.dropped = {s: dict(sorted(c.items())) for s, c in sorted(dropped.items())}
        summary.leakage = reference.describe()
        summary.config = {"seed": seed, "image_size": image_size, "max_pairs": max_pairs,
                          "val_fraction": VAL_FRACTION, "clipart": clipart}
        _write_docs(tmp, summary, messages.warnings)
    summary.seconds = time.perf_counter() - start
    messages.say(f"done in {summary.seconds:.0f} s: {summary.total_images} images, {summary.total_pairs} pairs")
    return summary


def _write(tmp: Path, items: list[Item], rels: list[str], seed: int) -> PretrainSummary:
    """Ids, pools, queries, qrels and instructions for the kept items (already in rank order)."""
    n_val = max(1, round(len(items) * VAL_FRACTION)) if len(items) > 1 else 0
    image_cands: list[Candidate] = []
    text_cands: list[Candidate] = []
    primary_cands: list[Candidate] = []
    queries: dict[tuple[int, str], list[Query]] = defaultdict(list)
    summary = PretrainSummary(tmp, [])
    next_did = 1
    next_qid = 1

    def did() -> str:
        nonlocal next_did
        next_did += 1
        return f"{DATASET_ID}:{next_did - 1}"

    def query(task: int, split: str, txt: str | None, img: str | None, pos: list[str], src: str) -> None:
        nonlocal next_qid
        if next_qid >= QUERY_ID_BOUND:
            raise ConfigError(f"more than {QUERY_ID_BOUND - 1:,} queries (UniIR's per-dataset id bound): "
                              "lower --max-pairs")
        queries[(task, split)].append(Query(f"{DATASET_ID}:{next_qid}", txt, img, "text" if txt else "image",
                                            src, pos, [], task))
        next_qid += 1

    for index, (item, rel) in enumerate(zip(items, rels, strict=True)):
        split = "val" if index < n_val else "train"
        src = json.dumps({"base": item.key, "source": item.source}, ensure_ascii=False, sort_keys=True)
        image_did = did()
        image_cands.append(Candidate(image_did, None, rel, "image", src))
        caption_dids = []
        for caption in item.captions:
            caption_did = did()
            caption_dids.append(caption_did)
            text_cands.append(Candidate(caption_did, caption, None, "text", src))
            query(0, split, caption, None, [image_did], src)
        primary_cands.append(text_cands[-len(caption_dids)])
        query(3, split, None, rel, caption_dids, src)
        for other in [*item.captions[1:], *item.translations]:
            query(1, split, other, None, [caption_dids[0]], src)
        summary.images[item.source] = summary.images.get(item.source, 0) + 1
        summary.pairs[item.source] = summary.pairs.get(item.source, 0) + len(item.captions)
        summary.text_pairs[item.source] = (summary.text_pairs.get(item.source, 0) + len(item.captions) - 1
                                           + len(item.translations))
    local = tmp / "cand_pool" / "local"
    pools = {0: image_cands, 3: text_cands, 1: primary_cands}
    for task, pool in pools.items():
        write_candidates(local / f"mbeir_{DATASET}_task{task}_cand_pool.jsonl", pool)
    for (task, split), qs in sorted(queries.items()):
        stem = f"mbeir_{DATASET}_task{task}_{split}"
        write_queries(tmp / "query" / split / f"{stem}.jsonl", qs)
        write_qrels(tmp / "qrels" / split / f"{stem}_qrels.txt",
                    (Qrel(q.qid, d, 1, q.task_id) for q in qs for d in q.pos_cand_list))
        summary.queries[(task, split)] = len(qs)
    write_instructions(tmp / "instructions" / "query_instructions.tsv", [
        InstructionSet(DATASET_ID, "text", "image", ["Retrieve the picture this caption describes"], DATASET),
        InstructionSet(DATASET_ID, "image", "text", ["Retrieve the caption of this picture"], DATASET),
        InstructionSet(DATASET_ID, "text", "text", ["Retrieve the main caption of the same picture"], DATASET),
    ])
    return summary


def _readme(summary: PretrainSummary, n_warnings: int) -> str:
    query_rows = "\n".join(f"| {task} | {split} | {n} |" for (task, split), n in sorted(summary.queries.items()))
    return f"""# JFE pretraining corpus

Real image-text pairs for stage 1 (LLaVA-style alignment, then contrastive adaptation), built offline by
`jfe data build-pretrain` (`jfe.data.pretrain.build_pretrain`) from registry packages, in the M-BEIR layout
(dataset `{DATASET}`, id {DATASET_ID}).

{summary.total_images} images ({summary.config.get('image_size')} px, grey PNG when colourless),
{summary.total_pairs} image-text pairs, {sum(summary.text_pairs.values())} text-text pairs.

## Sources, licences and counts

{summary.to_markdown()}

"read": items the source offers; "skipped": hidden icons, stamps without a caption, MiniBEIR val/test
clip-art; "dropped": left out here (a name or image of a MiniBEIR val/test base, a render that failed,
a pixel-identical duplicate of an earlier image). {n_warnings} warning(s) are listed in `{MARKER}`.
Each image keeps its source's licence (see the table); Tux Paint stamps are GPL-2.0-or-later.

## No leakage into MiniBEIR

Every emoji icon set is excluded by name and category. Against the MiniBEIR at `{summary.leakage.get('minibeir')}`
({summary.leakage.get('heldout_bases')} val/test bases, {summary.leakage.get('heldout_texts')} normalised
val/test texts, {summary.leakage.get('heldout_images')} val/test images): an item whose name is, or contains
as whole words, a val/test text of two or more words (or equals a one-word one) is dropped; so is an image
within {summary.leakage.get('max_hamming')} bits of a val/test image's 256-bit difference hash.

## Layout

- `images/<source>/<name>.png`
- `cand_pool/local/mbeir_{DATASET}_task0_cand_pool.jsonl` (images), `..._task3_...` (all captions),
  `..._task1_...` (primary captions)
- `query/{{train,val}}/mbeir_{DATASET}_task{{0,1,3}}_<split>.jsonl`: task 0 caption -> image, task 3 image ->
  its captions, task 1 other caption or translation -> primary caption; `query_src_content` is
  `{{"base": <item>, "source": <source>}}`
- `qrels/<split>/...`, `instructions/query_instructions.tsv`

| task | split | queries |
|---:|---|---:|
{query_rows}

## Configuration

```json
{json.dumps(summary.config, indent=2, sort_keys=True)}
```
"""
