"""Validation and statistics for an M-BEIR-layout dataset.

:func:`validate_dataset` streams over every query file, pool file, qrels file and the instructions TSV
and reports *every* bad line as a :class:`Problem` instead of stopping at the first one. Only sets of
ids (and, per split, the qrels) are held in memory, so a 5.6M-line global pool is never turned into a
list of records. :func:`dataset_stats` counts queries, pools and modality mixes the same streaming way.

The record-level parsing is :mod:`jfe.data.mbeir`'s own (``parse_query``, ``parse_candidate``); the
readers here differ only in that they report a bad line and go on.
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from collections.abc import Generator, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from jfe.data.instructions import instruction_key
from jfe.data.mbeir import MBEIRLayout, instruction_columns, parse_candidate, parse_query
from jfe.data.records import (
    CANDIDATE_ID_BOUND,
    MODALITIES,
    QUERY_ID_BOUND,
    TASK_CATEGORY,
    TASKS,
    Candidate,
    Query,
    dataset_id_of,
    hashed_id,
    record_problems,
)
from jfe.errors import DataError

PathLike = str | os.PathLike

# Problem kinds, in the order a reader meets them. The CLI summary counts problems per kind.
KINDS: dict[str, str] = {
    "layout": "a folder or file the layout requires is missing",
    "encoding": "a line is not valid UTF-8",
    "malformed-json": "a line is not a JSON object",
    "schema": "a field is missing or has the wrong type",
    "unknown-modality": "a modality that is not text, image or image,text",
    "modality-mismatch": "the modality disagrees with the fields present or with the task",
    "empty-record": "a record with neither text nor image",
    "unknown-task": "a task id that M-BEIR does not define",
    "duplicate-id": "an id seen twice in one pool or one split",
    "dangling-id": "a candidate id in a query that no pool holds",
    "no-positive": "a query without positive candidates",
    "missing-image": "an image path that does not exist under the dataset root",
    "unsafe-path": "an image path that is absolute or leaves the dataset root ('..'); never opened",
    "qrels-format": "a qrels line that is not 'qid 0 did relevance [task_id]'",
    "qrels-mismatch": "qrels that disagree with the queries' positive lists",
    "instructions-format": "a bad row in the instructions TSV",
    "missing-instruction": "a query whose (dataset, query modality, candidate modality) key has no instruction",
    "uniir-id": "an id that UniIR's tools cannot turn into an integer (not 'int:int', or n over its bound)",
}


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a dataset, located as precisely as possible."""

    path: str
    line: int | None
    record: str | None
    kind: str
    message: str

    def __str__(self) -> str:
        where = self.path + (f":{self.line}" if self.line is not None else "")
        return f"{where}: {self.record}: {self.message}" if self.record else f"{where}: {self.message}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class _Sink:
    """Collects problems; ``add`` keeps call sites short."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def add(self, path: Path | str, line: int | None, record: str | None, kind: str, message: str) -> None:
        self.problems.append(Problem(str(path), line, record, kind, message))

    def drain(self) -> list[Problem]:
        out, self.problems = self.problems, []
        return out


def iter_json_lines_reporting(path: Path, sink: _Sink) -> Iterator[tuple[int, dict]]:
    """Like ``mbeir.iter_json_lines`` but a bad line becomes a problem and reading goes on.

    The file is read as bytes and decoded line by line, so one bad byte costs one line, not the file.
    """
    try:
        handle = path.open("rb")
    except OSError as exc:
        sink.add(path, None, None, "layout", f"cannot open file ({exc.strerror})")
        return
    with handle:
        for line_no, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                sink.add(path, line_no, None, "encoding", f"invalid UTF-8 at byte {exc.start}")
                continue
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                sink.add(path, line_no, None, "malformed-json", f"malformed JSON ({exc.msg} at column {exc.colno})")
                continue
            if not isinstance(obj, dict):
                sink.add(path, line_no, None, "malformed-json", f"a line must be a JSON object, got "
                         f"{type(obj).__name__}")
                continue
            yield line_no, obj


def _image_ok(root: Path, rel: str | None, check: bool) -> bool:
    return not check or not rel or (root / rel).is_file()


def _record_fields(record: Query | Candidate) -> tuple[str, str | None, str | None, str]:
    """``(id, text, image path, modality)`` of a query or a candidate, whose fields are named differently."""
    if isinstance(record, Query):
        return record.qid, record.query_txt, record.query_img_path, record.query_modality
    return record.did, record.txt, record.img_path, record.modality


def _checked_records(path: Path, root: Path, sink: _Sink, seen: set[str], kind: str, check_images: bool
                     ) -> Iterator[tuple[int, Any]]:
    """The well-formed records of one query (``kind="query"``) or pool (``"candidate"``) file, after the
    checks both share: duplicate id (every id, even of a bad record, joins ``seen``), known modality,
    schema, modality matching the fields present, image present. Problems go to ``sink``."""
    is_query = kind == "query"
    id_key, modality_key = ("qid", "query_modality") if is_query else ("did", "modality")
    duplicate = "duplicate query id in this split" if is_query else "duplicate candidate id"
    for line_no, obj in iter_json_lines_reporting(path, sink):
        rid = obj.get(id_key) if isinstance(obj.get(id_key), str) else None
        if rid is not None:
            if rid in seen:
                sink.add(path, line_no, rid, "duplicate-id", duplicate)
            seen.add(rid)
        if obj.get(modality_key) not in MODALITIES:
            sink.add(path, line_no, rid, "unknown-modality", f"unknown {modality_key} {obj.get(modality_key)!r} "
                     f"(expected one of {', '.join(MODALITIES)})")
            continue
        try:
            record = parse_query(obj, path, line_no, strict=False) if is_query else \
                parse_candidate(obj, path, line_no, strict=False)
        except DataError as exc:
            sink.add(path, line_no, rid, "schema", exc.message)
            continue
        rid, text, image, modality = _record_fields(record)
        try:
            hashed_id(rid, QUERY_ID_BOUND if is_query else CANDIDATE_ID_BOUND)
        except ValueError as exc:
            sink.add(path, line_no, rid, "uniir-id", str(exc))
        problems = record_problems(text, image, modality, is_query=is_query)
        for problem_kind, message in problems:
            sink.add(path, line_no, rid, problem_kind, message)
        if all(k != "unsafe-path" for k, _ in problems) and not _image_ok(root, image, check_images):
            sink.add(path, line_no, rid, "missing-image", f"image {image!r} not found under {root}")
        yield line_no, record


def _check_candidate_file(path: Path, root: Path, sink: _Sink, seen: set[str], check_images: bool) -> None:
    """Validate one pool file, adding every did (even of a bad record) to ``seen``."""
    for _ in _checked_records(path, root, sink, seen, "candidate", check_images):
        pass


@dataclass(slots=True)
class _QrelEntry:
    dids: set[str]
    task_id: int | None
    path: str
    line: int


def _read_qrels_reporting(path: Path, sink: _Sink, into: dict[str, _QrelEntry]) -> None:
    try:
        handle = path.open("r", encoding="utf-8", errors="replace")
    except OSError as exc:
        sink.add(path, None, None, "layout", f"cannot open file ({exc.strerror})")
        return
    with handle:
        for line_no, line in enumerate(handle, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) not in (4, 5):
                sink.add(path, line_no, None, "qrels-format",
                         f"expected 'qid 0 did relevance [task_id]', got {line.strip()!r}")
                continue
            try:
                relevance = int(parts[3])
                task_id = int(parts[4]) if len(parts) == 5 else None
            except ValueError:
                sink.add(path, line_no, parts[0], "qrels-format",
                         f"non-integer relevance or task id in {line.strip()!r}")
                continue
            if relevance <= 0:
                continue
            entry = into.get(parts[0])
            if entry is None:
                into[parts[0]] = _QrelEntry({parts[2]}, task_id, str(path), line_no)
            else:
                entry.dids.add(parts[2])
                if task_id is not None and entry.task_id is not None and task_id != entry.task_id:
                    sink.add(path, line_no, parts[0], "qrels-mismatch",
                             f"task id {task_id} differs from {entry.task_id} on {entry.path}:{entry.line}")


def _read_instruction_keys(path: Path, sink: _Sink) -> set[tuple[str, str, str]] | None:
    """The (dataset id, query modality, candidate modality) keys of the TSV; None when it is unusable."""
    if not path.is_file():
        sink.add(path, None, None, "layout", "instructions file not found")
        return None
    keys: set[tuple[str, str, str]] = set()
    with path.open(encoding="utf-8", errors="replace", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)  # as mbeir.read_instructions
        try:
            header = next(reader)
        except StopIteration:
            sink.add(path, None, None, "instructions-format", "empty instructions file")
            return None
        try:
            found = instruction_columns(header, path)
        except DataError as exc:
            sink.add(path, 1, None, "instructions-format", exc.message)
            return None
        cols = {"ds": found.dataset_id, "qm": found.query_modality, "cm": found.cand_modality}
        prompt_cols = found.prompts
        for line_no, row in enumerate(reader, start=2):
            if not any(cell.strip() for cell in row):
                continue
            if len(row) <= max(cols.values()):
                sink.add(path, line_no, None, "instructions-format", "row has fewer columns than the header")
                continue
            key = (row[cols["ds"]].strip(), row[cols["qm"]].strip(), row[cols["cm"]].strip())
            label = "/".join(key)
            bad = [m for m in key[1:] if m not in MODALITIES]
            if bad:
                sink.add(path, line_no, label, "instructions-format", f"unknown modality {bad[0]!r} in key")
            if not any(i < len(row) and row[i].strip() for i in prompt_cols):
                sink.add(path, line_no, label, "instructions-format", "no prompts for this key")
            if key in keys:
                sink.add(path, line_no, label, "instructions-format", "duplicate key (the later row wins)")
            keys.add(key)
    return keys


def _splits(layout: MBEIRLayout) -> list[str]:
    query_root = layout.root / "query"
    return sorted(p.name for p in query_root.iterdir() if p.is_dir()) if query_root.is_dir() else []


def _check_pools(layout: MBEIRLayout, sink: _Sink, check_images: bool
                 ) -> Generator[Problem, None, tuple[set[str], dict[Path, set[str]]]]:
    """Check every pool file, yielding its problems; returns (the union of the global pools' ids, each
    local pool's ids)."""
    # Union pools are per split (train / val / test) and overlap by design, so duplicates are checked
    # within each file and membership against their union.
    global_ids: set[str] = set()
    for path in layout.global_pool_files():
        file_ids: set[str] = set()
        _check_candidate_file(path, layout.root, sink, file_ids, check_images)
        global_ids |= file_ids
        yield from sink.drain()

    local_ids: dict[Path, set[str]] = {}
    for path in layout.local_pool_files():
        local_ids[path] = set()
        _check_candidate_file(path, layout.root, sink, local_ids[path], check_images)
        yield from sink.drain()
    return global_ids, local_ids


def _check_split(layout: MBEIRLayout, split: str, sink: _Sink, global_ids: set[str],
                 local_ids: dict[Path, set[str]], instruction_keys: set[tuple[str, str, str]] | None,
                 check_images: bool) -> Iterator[Problem]:
    """The problems of one split's qrels and query files (each against its local and the global pools)."""
    qrels: dict[str, _QrelEntry] = {}
    qrels_files = layout.qrels_files(split)
    for path in qrels_files:
        _read_qrels_reporting(path, sink, qrels)
    yield from sink.drain()
    seen_qids: set[str] = set()
    for path in layout.query_files(split):
        local_path = layout.local_pool_for(path)
        local = local_ids.get(local_path, set()) if local_path else set()
        pools_exist = bool(local_path) or bool(global_ids)
        expected = " or ".join(f"cand_pool/local/{n}" for n in layout.local_pool_names(path))
        if not pools_exist:
            sink.add(path, None, None, "layout", f"no local pool ({expected}) and no global pool for this "
                     "query file")
        elif local_path is None and "train" not in split:
            # training reads the global pool, but `jfe eval --pool local` needs a query file's own pool
            sink.add(path, None, None, "layout", f"no local pool for this query file ({expected}): "
                     "`jfe eval --pool local` cannot evaluate it")
        _check_query_file(path, layout.root, sink, seen_qids, local, global_ids if pools_exist else None,
                          qrels if qrels_files else None, instruction_keys, check_images)
        yield from sink.drain()
    # Qrels whose query never appeared in this split.
    for qid, entry in qrels.items():
        if qid not in seen_qids:
            sink.add(entry.path, entry.line, qid, "qrels-mismatch", f"qrels for a query not in query/{split}/")
    yield from sink.drain()


def iter_problems(root: PathLike, *, check_images: bool = True) -> Iterator[Problem]:
    """Yield the problems of an M-BEIR-layout dataset, file by file (see :func:`validate_dataset`)."""
    layout = MBEIRLayout(root)
    root = layout.root
    if not root.is_dir():
        raise DataError("dataset folder not found", path=str(root))
    sink = _Sink()

    instruction_keys = _read_instruction_keys(layout.instructions_file, sink)
    yield from sink.drain()

    global_ids, local_ids = yield from _check_pools(layout, sink, check_images)

    splits = _splits(layout)
    if not splits:
        sink.add(root / "query", None, None, "layout", "no query/<split>/ folders with query files")
    if not global_ids and not local_ids:
        sink.add(root / "cand_pool", None, None, "layout", "no candidate pool files under cand_pool/local or "
                 "cand_pool/global")
    yield from sink.drain()

    for split in splits:
        yield from _check_split(layout, split, sink, global_ids, local_ids, instruction_keys, check_images)


def _check_query_file(path: Path, root: Path, sink: _Sink, seen: set[str], local: set[str],
                      global_ids: set[str] | None, qrels: dict[str, _QrelEntry] | None,
                      instruction_keys: set[tuple[str, str, str]] | None, check_images: bool) -> None:
    for line_no, query in _checked_records(path, root, sink, seen, "query", check_images):
        qid = query.qid
        task = TASKS.get(query.task_id) if query.task_id is not None else None
        if task is None:
            sink.add(path, line_no, qid, "unknown-task",
                     f"task_id {query.task_id!r} is not an M-BEIR task (expected one of {sorted(TASKS)})")
        elif task[0] != query.query_modality:
            sink.add(path, line_no, qid, "modality-mismatch", f"task {query.task_id} expects query modality "
                     f"{task[0]!r}, got {query.query_modality!r}")

        if not query.pos_cand_list:
            sink.add(path, line_no, qid, "no-positive", "pos_cand_list is empty")
        if global_ids is not None:
            for listed, name in ((query.pos_cand_list, "pos_cand_list"), (query.neg_cand_list, "neg_cand_list")):
                for did in listed:
                    if did not in local and did not in global_ids:
                        sink.add(path, line_no, qid, "dangling-id",
                                 f"{name} id {did!r} is in neither the local nor the global pool")

        if qrels is not None:
            entry = qrels.get(qid)
            pos = set(query.pos_cand_list)
            if entry is None:
                if pos:
                    sink.add(path, line_no, qid, "qrels-mismatch", "query has positives but no qrels lines")
            else:
                if entry.dids != pos:
                    only_q, only_r = sorted(pos - entry.dids), sorted(entry.dids - pos)
                    sink.add(path, line_no, qid, "qrels-mismatch", f"pos_cand_list and qrels differ (only in "
                             f"pos_cand_list: {only_q}; only in qrels {entry.path}: {only_r})")
                if entry.task_id is not None and query.task_id is not None and entry.task_id != query.task_id:
                    sink.add(path, line_no, qid, "qrels-mismatch",
                             f"task_id {query.task_id} but qrels say {entry.task_id} ({entry.path}:{entry.line})")

        if instruction_keys is not None and task is not None:
            try:
                dataset_id_of(qid)  # a qid without a dataset id has no instruction key
            except ValueError as exc:
                sink.add(path, line_no, qid, "schema", str(exc))
            else:
                # only id sets are held here, no candidate records: the key comes from the task alone
                key = instruction_key(query)
                if key not in instruction_keys:
                    sink.add(path, line_no, qid, "missing-instruction",
                             f"no instruction for key (dataset {key[0]}, {key[1]} -> {key[2]})")


def validate_dataset(root: PathLike, *, check_images: bool = True) -> list[Problem]:
    """Every problem of the M-BEIR-layout dataset at ``root`` (an empty list means it is valid).

    Checks: malformed JSON or UTF-8, field types, unknown modalities, modalities that disagree with the
    fields present or with the task, unknown task ids, duplicate ids (per pool file, across the global
    pool files, per query split), ids in ``pos_cand_list``/``neg_cand_list`` found in neither the query
    file's local pool nor the global pool, missing image files, qrels that disagree with the positive
    lists (and qrels of queries that do not exist), and queries whose instruction key is missing from
    ``instructions/query_instructions.tsv``. Raises :class:`DataError` only when ``root`` is not a folder.
    """
    return list(iter_problems(root, check_images=check_images))


# --------------------------------------------------------------------------------------------- stats


@dataclass
class FileStats:
    """Counts for one query or pool file."""

    path: str
    split: str | None
    records: int = 0
    bad_lines: int = 0
    modalities: Counter = field(default_factory=Counter)
    task_modalities: Counter = field(default_factory=Counter)  # (task id, query modality) -> count

    @property
    def tasks(self) -> Counter:
        out: Counter = Counter()
        for (task, _), count in self.task_modalities.items():
            out[task] += count
        return out

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "split": self.split, "records": self.records, "bad_lines": self.bad_lines,
                "tasks": {str(k): v for k, v in sorted(self.tasks.items(), key=lambda kv: str(kv[0]))},
                "modalities": dict(sorted(self.modalities.items()))}


@dataclass
class DatasetStats:
    """What :func:`dataset_stats` counts: per query file, per pool file, and per (split, task)."""

    root: str
    query_files: list[FileStats]
    local_pools: list[FileStats]
    global_pools: list[FileStats]
    instruction_keys: int | None

    def per_task(self) -> list[dict[str, Any]]:
        """One row per (split, task id): queries, their modality mix, files, and the local pool size."""
        pool_size = {Path(p.path).name: p.records for p in self.local_pools}
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        for qf in self.query_files:
            path = Path(qf.path)
            local = pool_size.get(f"{_strip_split(path.stem)}_cand_pool.jsonl")
            for (task, modality), count in qf.task_modalities.items():
                row = rows.setdefault((qf.split or "", str(task)), {
                    "split": qf.split, "task_id": task, "task": _task_label(task),
                    "category": TASK_CATEGORY.get(task) if isinstance(task, int) else None,
                    "queries": 0, "query_modalities": {}, "files": [], "local_pool": 0})
                row["queries"] += count
                row["query_modalities"][modality] = row["query_modalities"].get(modality, 0) + count
                if path.name not in row["files"]:
                    row["files"].append(path.name)
                    row["local_pool"] += local or 0
        return [rows[k] for k in sorted(rows)]

    def to_json(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "per_task": self.per_task(),
            "query_files": [f.to_json() for f in self.query_files],
            "local_pools": [f.to_json() for f in self.local_pools],
            "global_pools": [f.to_json() for f in self.global_pools],
            "instruction_keys": self.instruction_keys,
        }


def _strip_split(stem: str) -> str:
    for suffix in ("_train", "_val", "_test", "_dev"):
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def _task_label(task: Any) -> str:
    if isinstance(task, int) and task in TASKS:
        q, c = TASKS[task]
        return f"{q} -> {c}"
    return "unknown"


def _count_bad(path: Path, split: str | None, is_query: bool) -> FileStats:
    sink = _Sink()
    stats = FileStats(str(path), split)
    modality_key = "query_modality" if is_query else "modality"
    for _, obj in iter_json_lines_reporting(path, sink):
        stats.records += 1
        stats.modalities[str(obj.get(modality_key))] += 1
        if is_query:
            task = obj.get("task_id")
            stats.task_modalities[(task if isinstance(task, int) else str(task), str(obj.get(modality_key)))] += 1
    stats.bad_lines = len(sink.problems)
    return stats


def dataset_stats(root: PathLike) -> DatasetStats:
    """Stream the dataset once and count queries per split and task, pool sizes and modality mixes.

    Bad lines are counted (``bad_lines``), not reported: run :func:`validate_dataset` for that.
    """
    layout = MBEIRLayout(root)
    if not layout.root.is_dir():
        raise DataError("dataset folder not found", path=str(layout.root))
    query_files = [_count_bad(p, split, True) for split in _splits(layout) for p in layout.query_files(split)]
    local = [_count_bad(p, None, False) for p in layout.local_pool_files()]
    global_ = [_count_bad(p, None, False) for p in layout.global_pool_files()]
    keys = None
    if layout.instructions_file.is_file():
        keys = len(_read_instruction_keys(layout.instructions_file, _Sink()) or ())
    return DatasetStats(str(layout.root), query_files, local, global_, keys)
