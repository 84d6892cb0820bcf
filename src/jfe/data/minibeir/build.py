"""Assemble MiniBEIR: choose bases, split them, build the tasks, assign ids, write the M-BEIR layout.

Determinism: every random choice comes from a ``random.Random`` seeded with a string that names the
seed, the dataset and the task; splits come from a hash of (seed, base id); ids are assigned after
sorting; PNGs and jsonl are written with fixed settings. Building twice gives byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from jfe.data.mbeir import write_candidates, write_instructions, write_qrels, write_queries
from jfe.data.minibeir import templates as T
from jfe.data.minibeir.render import ImageRegistry
from jfe.data.minibeir.sources import ClipArt, Emoji, SourceInfo, load_clipart, load_emoji
from jfe.data.minibeir.tasks import Cand, ClipArtTasks, EmojiTasks, QSpec, SplitFn, TaskData
from jfe.data.records import QUERY_ID_BOUND, TASK_CATEGORY, TASKS, Candidate, InstructionSet, Qrel, Query
from jfe.errors import ConfigError
from jfe.paths import ArtefactKind, atomic_dir, atomic_write, check_out_dir

SPLITS = ("train", "val", "test")
# Outside M-BEIR's 0-9 (its ten datasets), so MiniBEIR ids, instructions and results never clash with them.
DATASET_IDS = {"emoji": "90", "clipart": "91"}
MARKER = ".minibeir.json"
# Query ids "90:200001"... never collide with candidate ids "90:1"... and stay under UniIR's per-dataset
# query bound (QUERY_ID_BOUND = 500,000), which its integer id hashing needs.
QUERY_ID_OFFSET = 200_000


@dataclass(frozen=True)
class BuildConfig:
    """Everything that determines the built dataset (recorded in ``.minibeir.json``)."""

    seed: int = 0
    max_bases: int | None = None
    image_size: int = 128
    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)
    emoji_caps: dict[int, int | None] = field(default_factory=lambda: {
        0: 1500, 1: 1500, 2: 1500, 3: 1500, 4: 1500, 6: 3000, 7: 3000, 8: 2000})
    clipart_caps: dict[int, int | None] = field(default_factory=lambda: {0: 1200, 1: 1200, 2: 1200, 3: 1200})
    max_negs: int = 10

    def __post_init__(self) -> None:
        if self.image_size < 16 or self.image_size > 1024:
            raise ConfigError(f"image_size must be within 16..1024, got {self.image_size}")
        if self.max_bases is not None and self.max_bases < 1:
            raise ConfigError(f"max_bases must be positive, got {self.max_bases}")
        if abs(sum(self.split_fractions) - 1) > 1e-9 or min(self.split_fractions) <= 0:
            raise ConfigError(f"split_fractions must be positive and sum to 1, got {self.split_fractions}")


@dataclass
class MiniBEIRSummary:
    """What a build produced: counts per (dataset, task, split), pool sizes and quality statistics."""

    out: Path
    queries: dict[tuple[str, int, str], int]
    pools: dict[tuple[str, int], int]
    global_pools: dict[str, int]
    images: int
    non_additive: dict[tuple[str, int], float]  # share of non-additive queries per (dataset, task)
    distractors: dict[tuple[str, int], float]  # mean same-group distractors per query in the local pool
    modifications: dict[tuple[str, int], dict[str, int]]
    seconds: float
    config: BuildConfig
    sources: list[SourceInfo] = field(default_factory=list)
    dropped: int = 0  # queries left out because their positive's content also belongs to another base

    @property
    def total_queries(self) -> int:
        return sum(self.queries.values())

    def task_ids(self) -> list[int]:
        return sorted({t for _, t, _ in self.queries})

    def to_markdown(self) -> str:
        lines = ["| dataset | task | category | query → candidate | train | val | test | local pool | "
                 "non-additive | distractors/query |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for ds, task in sorted(self.pools, key=lambda k: (k[1], k[0])):
            q, c = TASKS[task]
            counts = [self.queries.get((ds, task, s), 0) for s in SPLITS]
            lines.append(f"| {ds} | {task} | {TASK_CATEGORY[task]} | {q} → {c} | " + " | ".join(map(str, counts))
                         + f" | {self.pools[(ds, task)]} | {self.non_additive.get((ds, task), 0):.2f} | "
                         f"{self.distractors.get((ds, task), 0):.1f} |")
        per_split = [sum(n for (_, _, s), n in self.queries.items() if s == split) for split in SPLITS]
        lines.append(f"| **all** | | | | {' | '.join(map(str, per_split))} | | | |")
        lines.append("")
        lines.append(f"{self.total_queries} queries, {self.images} images ({self.config.image_size} px), global "
                     "pools: " + ", ".join(f"{s} {n}" for s, n in self.global_pools.items())
                     + f"; built in {self.seconds:.0f} s (seed {self.config.seed}, max_bases "
                     f"{self.config.max_bases}).")
        return "\n".join(lines)


def split_of_base(base: str, seed: int, fractions: tuple[float, float, float]) -> str:
    """The split of a base item: a stable hash of (seed, base), independent of what else is built."""
    digest = hashlib.sha1(f"{seed}:{base}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < fractions[0]:
        return "train"
    return "val" if u < fractions[0] + fractions[1] else "test"


def _rank(seed: int, name: str) -> bytes:
    return hashlib.sha1(f"{seed}:select:{name}".encode()).digest()


def select_emoji(emoji: list[Emoji], max_groups: int | None, seed: int) -> list[Emoji]:
    """Keep at most ``max_groups`` distractor groups (a base with its variants, or a whole sequence family),
    taken round-robin from four strata so that a small build still has every kind of edit."""
    if max_groups is None:
        return emoji
    groups: dict[str, list[Emoji]] = defaultdict(list)
    for e in emoji:
        groups[e.group].append(e)

    def stratum(g: str) -> int:
        n = len(groups[g])
        return 0 if g.startswith("family:") else 1 if n >= 7 else 2 if n >= 2 else 3

    strata: list[list[str]] = [[], [], [], []]
    for g in sorted(groups, key=lambda g: _rank(seed, g)):
        strata[stratum(g)].append(g)
    chosen: list[str] = []
    while len(chosen) < max_groups and any(strata):
        for s in strata:
            if s and len(chosen) < max_groups:
                chosen.append(s.pop(0))
    keep = set(chosen)
    return [e for e in emoji if e.group in keep]


def select_clipart(drawings: list[ClipArt], max_bases: int | None, seed: int) -> list[ClipArt]:
    if max_bases is None:
        return drawings
    keep = {d.path for d in sorted(drawings, key=lambda d: _rank(seed, d.path))[:max_bases]}
    return [d for d in drawings if d.path in keep]


def _log(progress: bool, message: str) -> None:
    if progress:
        print(f"[minibeir] {message}", file=sys.stderr, flush=True)


# the build swaps the whole folder: it replaces only an earlier build (its marker) or an empty folder
MINIBEIR_KIND = ArtefactKind("MiniBEIR build", (MARKER,))


class _Writer:
    """Assigns ids for one dataset and turns specs into records."""

    def __init__(self, name: str, tasks: dict[int, TaskData], split_of) -> None:
        self.name, self.ds_id, self.tasks, self.split_of = name, DATASET_IDS[name], tasks, split_of
        owner: dict[tuple, Cand] = {}
        for data in tasks.values():
            for key, cand in data.pool.items():
                if key not in owner or cand.base < owner[key].base:
                    owner[key] = cand
        if len(owner) >= QUERY_ID_OFFSET:
            raise ConfigError(f"{name}: too many candidates ({len(owner)}) for the id scheme")
        self.cands = {key: owner[key] for key in sorted(owner)}
        self.did = {key: f"{self.ds_id}:{i}" for i, key in enumerate(self.cands, start=1)}
        self.dropped = 0

    def candidate(self, key: tuple) -> Candidate:
        c = self.cands[key]
        return Candidate(self.did[key], c.txt, c.img, c.modality,
                         json.dumps({"base": c.base, "group": c.group}, ensure_ascii=False, sort_keys=True))

    def queries(self) -> dict[tuple[int, str], list[Query]]:
        """(task, split) -> queries, ids assigned in sorted order."""
        specs: list[tuple[str, QSpec]] = []
        for task in sorted(self.tasks):
            for q in self.tasks[task].queries:
                # a positive shared with another base (identical content) would be ambiguous: leave it out
                if self.cands[q.pos.key].base != q.pos.base:
                    self.dropped += 1
                    continue
                specs.append((self.split_of(q.base), q))
        specs.sort(key=lambda sq: (sq[1].task, SPLITS.index(sq[0]), sq[1].sort_key))
        out: dict[tuple[int, str], list[Query]] = defaultdict(list)
        if QUERY_ID_OFFSET + len(specs) >= QUERY_ID_BOUND:
            raise ConfigError(f"{self.name}: too many queries ({len(specs)}) for UniIR's id bound {QUERY_ID_BOUND:,}")
        for i, (split, q) in enumerate(specs, start=1):
            src = dict(q.src)
            if q.exclude:
                src["exclude_dids"] = sorted(self.did[c.key] for c in q.exclude)
            negs = [self.did[c.key] for c in q.negs if c.key != q.pos.key]
            out[(q.task, split)].append(Query(
                qid=f"{self.ds_id}:{QUERY_ID_OFFSET + i}", query_txt=q.txt, query_img_path=q.img,
                query_modality=q.modality, query_src_content=json.dumps(src, ensure_ascii=False, sort_keys=True),
                pos_cand_list=[self.did[q.pos.key]], neg_cand_list=negs, task_id=q.task))
        return out


def _distractors(queries: list[Query], pool: list[Candidate]) -> float:
    """Mean number of pool candidates in the query's distractor group that are neither positive nor excluded."""
    by_group: Counter[str | None] = Counter(c.src.get("group") for c in pool)
    total = 0
    for q in queries:
        src = q.src
        total += by_group[src.get("group")] - len(q.pos_cand_list) - len(src.get("exclude_dids", []))
    return total / len(queries) if queries else 0.0


def _instruction_sets(names: list[str], tasks_by_ds: dict[str, list[int]], heldout: bool) -> list[InstructionSet]:
    sets = []
    for name in names:
        for task in tasks_by_ds[name]:
            q, c = TASKS[task]
            main, held = T.INSTRUCTIONS[(name, task)]
            sets.append(InstructionSet(DATASET_IDS[name], q, c, list(held if heldout else main), name))
    return sets


def _readme(summary: MiniBEIRSummary) -> str:
    return f"""# MiniBEIR

A small universal multimodal retrieval benchmark in the exact M-BEIR layout (UniIR-compatible), built
offline by `jfe.data.minibeir.build_minibeir` from real emoji and clip-art data that ship in registry packages.

## Counts

{summary.to_markdown()}

Datasets: `emoji` (dataset id 90), `clipart` (dataset id 91), outside M-BEIR's 0-9. Ids are
`{{dataset_id}}:{{n}}`; candidate ids count from 1, query ids from {QUERY_ID_OFFSET + 1}.

## Layout

- `query/{{train,val,test}}/mbeir_<dataset>_task<k>_<split>.jsonl`
- `cand_pool/local/mbeir_<dataset>_task<k>_cand_pool.jsonl`: one local pool per dataset and task, holding
  the candidates of all splits, including every variant of every base (hard distractors).
- `cand_pool/global/mbeir_union_{{train,val,test}}_cand_pool.jsonl`: val and test hold every candidate;
  train holds the candidates of training bases and the shared answer vocabulary.
- `qrels/<split>/mbeir_<dataset>_task<k>_<split>_qrels.txt`: `qid 0 did 1 task_id`.
- `instructions/query_instructions.tsv` (used in training and evaluation) and
  `instructions/heldout_instructions.tsv` (other wordings of the same keys, never used in queries: for
  testing generalisation to new instructions).
- `images/`: RGB PNGs, {summary.config.image_size}×{summary.config.image_size}, white background. Emoji in
  the OpenMoji style are rendered from SVG at this size; Google / Twitter emoji (task 4 queries) are 64-px
  sources scaled up; clip-art comes from Debian's pre-rendered PNGs.

{_README_CONVENTIONS}
{_readme_provenance(summary)}"""


# static: what the fields of the built files mean (the README's "Conventions" section)
_README_CONVENTIONS = """## Conventions

- `query_src_content` is a JSON object: `base` (base item id), `group` (distractor group), `modification`
  (edit, question or query type), `non_additive` (true for edits and questions whose answer depends on
  combining the image with the text: direction flips, shade shifts, gender flips, two changes at once,
  clock / moon / keycap / arrow sequence operations, colour and shape swaps, per-image attribute
  questions), `query_txt_heldout` (a held-out rewording of the modification or question, tasks 6-8), and for
  composed tasks `exclude_dids`: the reference image's own candidate, which evaluation must drop from that
  query's ranking (CIRR's convention).
- Candidates' `src_content` is `{"base": ..., "group": ...}`; answers shared across images (skin tones,
  genders, roles, categories) have bases `vocab:<kind>`.
- `neg_cand_list` holds hard negatives for training: other variants of the same base / family.
- Splits are by base item (an emoji with all its skin-tone, gender, hair and direction variants; a clip-art
  drawing with all its texts), from a hash of (seed, base). Sequence families (clock faces, moon phases,
  keycaps, coloured shapes, arrows) split per member, and their edits only link members of one split.
"""


def _readme_provenance(summary: MiniBEIRSummary) -> str:
    """The README's tail: sources with their licences, and the build configuration."""
    src_rows = "\n".join(f"| {s.name} | {', '.join(s.packages)} | {s.licence} | {s.used_for} |"
                         for s in summary.sources)
    return f"""## Sources and licences

| source | package | licence | used for |
|---|---|---|---|
{src_rows}

Emoji images: OpenMoji CC-BY-SA-4.0 (https://openmoji.org), Google Noto emoji Apache-2.0, Twemoji CC-BY-4.0.
Emoji names: Unicode CLDR (Unicode licence) via OpenMoji and emojibase (MIT). Clip-art: public domain.
This derived dataset inherits CC-BY-SA-4.0 from OpenMoji for its OpenMoji images.

## Configuration

```json
{json.dumps(asdict(summary.config), indent=2, sort_keys=True)}
```
"""


@dataclass
class _Tally:
    """What the writing steps accumulate across datasets and tasks, for the summary and the global pools."""

    counts: dict[tuple[str, int, str], int] = field(default_factory=dict)
    pools: dict[tuple[str, int], int] = field(default_factory=dict)
    non_additive: dict[tuple[str, int], float] = field(default_factory=dict)
    distractors: dict[tuple[str, int], float] = field(default_factory=dict)
    modifications: dict[tuple[str, int], dict[str, int]] = field(default_factory=dict)
    used_images: set[str] = field(default_factory=set)
    global_rows: dict[str, list[Candidate]] = field(default_factory=lambda: {s: [] for s in SPLITS})
    tasks_by_ds: dict[str, list[int]] = field(default_factory=dict)
    dropped: int = 0


def _build_tasks(cfg: BuildConfig, split_of: SplitFn, progress: bool
                 ) -> tuple[dict[str, dict[int, TaskData]], ImageRegistry, list[SourceInfo]]:
    """Read and select the sources, then build every task in memory: (datasets, images, sources)."""
    _log(progress, "reading sources")
    emoji, emoji_info = load_emoji()
    drawings, clip_info = load_clipart()
    emoji = select_emoji(emoji, cfg.max_bases, cfg.seed)
    drawings = select_clipart(drawings, cfg.max_bases, cfg.seed)
    images = ImageRegistry(cfg.image_size)
    _log(progress, f"building tasks from {len(emoji)} emoji and {len(drawings)} drawings")
    datasets = {
        "emoji": EmojiTasks(emoji, images, split_of, cfg.seed, cfg.emoji_caps, cfg.max_negs).build(),
        "clipart": ClipArtTasks(drawings, images, cfg.seed, cfg.clipart_caps, cfg.max_negs).build(),
    }
    return datasets, images, emoji_info + clip_info


def _write_task(tmp: Path, writer: _Writer, task: int, by_split: dict[tuple[int, str], list[Query]],
                tally: _Tally) -> None:
    """One (dataset, task): its local pool, its queries and qrels per split, and its statistics."""
    name, tasks = writer.name, writer.tasks
    pool = [writer.candidate(k) for k in sorted(tasks[task].pool, key=lambda k: writer.did[k])]
    pool.sort(key=lambda c: int(c.did.split(":")[1]))
    stem = f"mbeir_{name}_task{task}"
    write_candidates(tmp / "cand_pool" / "local" / f"{stem}_cand_pool.jsonl", pool)
    tally.pools[(name, task)] = len(pool)
    tally.used_images.update(c.img_path for c in pool if c.img_path)
    all_q: list[Query] = []
    for split in SPLITS:
        qs = by_split.get((task, split), [])
        if not qs:
            continue
        all_q += qs
        tally.counts[(name, task, split)] = len(qs)
        write_queries(tmp / "query" / split / f"{stem}_{split}.jsonl", qs)
        write_qrels(tmp / "qrels" / split / f"{stem}_{split}_qrels.txt",
                    (Qrel(q.qid, d, 1, q.task_id) for q in qs for d in q.pos_cand_list))
        tally.used_images.update(q.query_img_path for q in qs if q.query_img_path)
    tally.non_additive[(name, task)] = sum(q.src.get("non_additive", False) for q in all_q) / max(1, len(all_q))
    tally.distractors[(name, task)] = _distractors(all_q, pool)
    tally.modifications[(name, task)] = dict(sorted(Counter(q.src["modification"] for q in all_q).items()))


def _write_dataset(tmp: Path, name: str, tasks: dict[int, TaskData], split_of: SplitFn, tally: _Tally) -> None:
    """One dataset's ids, tasks (those with queries) and its rows of the global pools."""
    writer = _Writer(name, tasks, split_of)
    by_split = writer.queries()
    tally.dropped += writer.dropped
    tally.tasks_by_ds[name] = sorted(t for t in tasks if any(by_split.get((t, s)) for s in SPLITS))
    for task in tally.tasks_by_ds[name]:
        _write_task(tmp, writer, task, by_split, tally)
    for key in writer.cands:
        cand = writer.candidate(key)
        base = writer.cands[key].base
        for split in SPLITS:
            # train's global pool leaves out val/test bases; the shared answer vocabulary is in every split
            if split != "train" or base.startswith("vocab:") or split_of(base) == "train":
                tally.global_rows[split].append(cand)


def _write_docs(tmp: Path, summary: MiniBEIRSummary) -> None:
    """README.md and the build marker; neither holds timings, so that two builds are byte-identical."""
    timed = summary.seconds
    summary.seconds = 0.0
    readme = _readme(summary).replace("; built in 0 s", "")
    summary.seconds = timed
    with atomic_write(tmp / "README.md") as fh:
        fh.write(readme)
    with atomic_write(tmp / MARKER) as fh:
        fh.write(json.dumps({"builder": "jfe.data.minibeir", "config": asdict(summary.config),
                             "modifications": {f"{d}:task{t}": m for (d, t), m in summary.modifications.items()}},
                            indent=2, sort_keys=True) + "\n")


def build_minibeir(out: Path, *, seed: int = 0, max_bases: int | None = None, image_size: int = 128,
                   progress: bool = True, config: BuildConfig | None = None, overwrite: bool = False
                   ) -> MiniBEIRSummary:
    """Build MiniBEIR into ``out`` (replaced atomically; an existing non-MiniBEIR folder is refused unless
    ``overwrite``).

    ``max_bases`` caps the number of base groups per source (an emoji with its variants, a sequence family,
    one clip-art drawing), for small but real builds in tests. ``config`` overrides the other knobs.
    """
    start = time.perf_counter()
    out = Path(out)
    cfg = config or BuildConfig(seed=seed, max_bases=max_bases, image_size=image_size)
    check_out_dir(out, MINIBEIR_KIND, overwrite=overwrite)

    def split_of(base: str) -> str:
        return split_of_base(base, cfg.seed, cfg.split_fractions)

    datasets, images, sources = _build_tasks(cfg, split_of, progress)
    tally = _Tally()
    with atomic_dir(out, MINIBEIR_KIND, overwrite=overwrite) as tmp:
        for name, tasks in datasets.items():
            _write_dataset(tmp, name, tasks, split_of, tally)
        for split in SPLITS:
            write_candidates(tmp / "cand_pool" / "global" / f"mbeir_union_{split}_cand_pool.jsonl",
                             tally.global_rows[split])
        names = list(datasets)
        write_instructions(tmp / "instructions" / "query_instructions.tsv",
                           _instruction_sets(names, tally.tasks_by_ds, heldout=False))
        write_instructions(tmp / "instructions" / "heldout_instructions.tsv",
                           _instruction_sets(names, tally.tasks_by_ds, heldout=True))
        _log(progress, f"writing {len(tally.used_images)} images")
        n_images = images.write(tmp, only=tally.used_images, progress=progress)
        summary = MiniBEIRSummary(
            out=out, queries=tally.counts, pools=tally.pools,
            global_pools={s: len(r) for s, r in tally.global_rows.items()}, images=n_images,
            non_additive=tally.non_additive, distractors=tally.distractors, modifications=tally.modifications,
            seconds=time.perf_counter() - start, config=cfg, sources=sources, dropped=tally.dropped)
        _write_docs(tmp, summary)
    summary.seconds = time.perf_counter() - start
    _log(progress, f"done in {summary.seconds:.0f} s: {summary.total_queries} queries")
    return summary
