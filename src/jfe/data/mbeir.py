"""Readers and writers for the exact M-BEIR layout (UniIR-compatible).

Readers stream: ``iter_candidates`` yields one record at a time so a 5.6M-line pool never has to sit in
a Python list of dicts. Every parse error names the file and the line. Writers are atomic.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from jfe.data.records import MODALITIES, Candidate, InstructionSet, Qrel, Query, record_problems
from jfe.errors import DataError
from jfe.paths import atomic_write

PathLike = str | os.PathLike

QUERY_FIELDS = ("qid", "query_txt", "query_img_path", "query_modality", "query_src_content",
                "pos_cand_list", "neg_cand_list", "task_id")
CANDIDATE_FIELDS = ("did", "txt", "img_path", "modality", "src_content")


def iter_json_lines(path: PathLike) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSON-lines file; errors name the file and line."""
    path = Path(path)
    try:
        handle = path.open("rb")  # decoded per line, so a bad byte is reported with its line number
    except FileNotFoundError:
        raise DataError("file not found", path=str(path)) from None
    except OSError as exc:  # a folder, no permission...: still one clear line naming the file
        raise DataError(f"cannot read the file ({exc.strerror})", path=str(path)) from None
    with handle:
        for line_no, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"invalid UTF-8 at byte {exc.start}", path=str(path), line=line_no) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"malformed JSON ({exc.msg})", path=str(path), line=line_no) from None
            if not isinstance(obj, dict):
                raise DataError("a line must be a JSON object", path=str(path), line=line_no)
            yield line_no, obj


def _opt_str(obj: dict, key: str, path: PathLike, line: int, record_id: str | None = None) -> str | None:
    value = obj.get(key)
    if value is None or isinstance(value, str):
        return value
    if key.endswith("src_content"):  # UniIR leaves free-form content here; keep it as JSON text
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    raise DataError(f"field {key!r} must be a string or null, got {type(value).__name__}",
                    path=str(path), line=line, record_id=record_id)


def _modality(obj: dict, key: str, path: PathLike, line: int, record_id: str) -> str:
    value = obj.get(key)
    if value not in MODALITIES:
        raise DataError(f"unknown {key} {value!r} (expected one of {', '.join(MODALITIES)})",
                        path=str(path), line=line, record_id=record_id)
    return value


def _refuse_problems(text: str | None, img_path: str | None, modality: str, is_query: bool, path: PathLike,
                     line: int, record_id: str) -> None:
    problems = record_problems(text, img_path, modality, is_query=is_query)
    if problems:
        raise DataError(problems[0][1] + " (see `jfe data validate`)", path=str(path), line=line,
                        record_id=record_id)


def parse_query(obj: dict, path: PathLike = "<memory>", line: int = 0, *, strict: bool = True) -> Query:
    """One query line. ``strict`` (every reader but the validator's) also refuses what ``jfe data validate``
    calls an error in a record's content: an image path outside the root, an empty record, a declared
    modality the fields do not make (an empty ``query_txt`` would otherwise be ranked by its instruction)."""
    qid = obj.get("qid")
    if not isinstance(qid, str) or not qid:
        raise DataError("missing or non-string 'qid'", path=str(path), line=line)
    pos, neg = obj.get("pos_cand_list") or [], obj.get("neg_cand_list") or []
    if not isinstance(pos, list) or not isinstance(neg, list):
        raise DataError("pos_cand_list and neg_cand_list must be lists", path=str(path), line=line,
                        record_id=qid)
    task_id = obj.get("task_id")
    if task_id is not None:
        try:
            task_id = int(task_id)
        except (TypeError, ValueError):
            raise DataError(f"task_id {task_id!r} is not an integer", path=str(path), line=line,
                            record_id=qid) from None
    query = Query(
        qid=qid,
        query_txt=_opt_str(obj, "query_txt", path, line, qid),
        query_img_path=_opt_str(obj, "query_img_path", path, line, qid),
        query_modality=_modality(obj, "query_modality", path, line, qid),
        query_src_content=_opt_str(obj, "query_src_content", path, line, qid),
        pos_cand_list=[str(x) for x in pos],
        neg_cand_list=[str(x) for x in neg],
        task_id=task_id,
    )
    if strict:
        _refuse_problems(query.query_txt, query.query_img_path, query.query_modality, True, path, line, qid)
    return query


def parse_candidate(obj: dict, path: PathLike = "<memory>", line: int = 0, *, strict: bool = True) -> Candidate:
    """One pool line; ``strict`` as for :func:`parse_query` (a candidate declared ``image`` with only a text
    is refused instead of indexed)."""
    did = obj.get("did")
    if not isinstance(did, str) or not did:
        raise DataError("missing or non-string 'did'", path=str(path), line=line)
    candidate = Candidate(
        did=did,
        txt=_opt_str(obj, "txt", path, line, did),
        img_path=_opt_str(obj, "img_path", path, line, did),
        modality=_modality(obj, "modality", path, line, did),
        src_content=_opt_str(obj, "src_content", path, line, did),
    )
    if strict:
        _refuse_problems(candidate.txt, candidate.img_path, candidate.modality, False, path, line, did)
    return candidate


def iter_queries(path: PathLike) -> Iterator[Query]:
    """Stream the queries of one jsonl file; a qid seen twice in it is a DataError naming both lines (it would
    be counted twice by the evaluator and listed twice in a TREC run)."""
    first_line: dict[str, int] = {}
    for line_no, obj in iter_json_lines(path):
        query = parse_query(obj, path, line_no)
        if query.qid in first_line:
            raise DataError(f"duplicate qid (first at line {first_line[query.qid]})", path=str(path), line=line_no,
                            record_id=query.qid)
        first_line[query.qid] = line_no
        yield query


def iter_candidates(path: PathLike) -> Iterator[Candidate]:
    """Stream the candidates of one pool jsonl file."""
    for line_no, obj in iter_json_lines(path):
        yield parse_candidate(obj, path, line_no)


def read_queries(path: PathLike) -> list[Query]:
    return list(iter_queries(path))


def read_candidates(path: PathLike) -> list[Candidate]:
    return list(iter_candidates(path))


def _write_jsonl(path: PathLike, rows: Iterable[dict]) -> int:
    count = 0
    with atomic_write(path) as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def write_queries(path: PathLike, queries: Iterable[Query]) -> int:
    """Write queries atomically; returns the number written."""
    return _write_jsonl(path, (q.to_json() for q in queries))


def write_candidates(path: PathLike, candidates: Iterable[Candidate]) -> int:
    return _write_jsonl(path, (c.to_json() for c in candidates))


def iter_qrels(path: PathLike) -> Iterator[Qrel]:
    path = Path(path)
    if not path.exists():
        raise DataError("file not found", path=str(path))
    with path.open("rb") as handle:  # decoded per line, so a bad byte is reported with its line number
        for line_no, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"invalid UTF-8 at byte {exc.start}", path=str(path), line=line_no) from None
            parts = line.split()
            if not parts:
                continue
            if len(parts) not in (4, 5):
                raise DataError(f"expected 'qid 0 did relevance [task_id]', got {line.strip()!r}",
                                path=str(path), line=line_no)
            try:
                relevance = int(parts[3])
                task_id = int(parts[4]) if len(parts) == 5 else None
            except ValueError:
                raise DataError(f"non-integer relevance or task id in {line.strip()!r}",
                                path=str(path), line=line_no) from None
            yield Qrel(qid=parts[0], did=parts[2], relevance=relevance, task_id=task_id)


def read_qrels(path: PathLike) -> dict[str, set[str]]:
    """qid -> set of relevant dids (relevance > 0)."""
    qrels: dict[str, set[str]] = {}
    for qrel in iter_qrels(path):
        if qrel.relevance > 0:
            qrels.setdefault(qrel.qid, set()).add(qrel.did)
    return qrels


def write_qrels(path: PathLike, qrels: Iterable[Qrel]) -> int:
    count = 0
    with atomic_write(path) as handle:
        for qrel in qrels:
            handle.write(qrel.to_line() + "\n")
            count += 1
    return count


# UniIR's reader ignores the header and reads by position: key = (parts[3], parts[0], parts[1]) =
# (dataset id, query modality, candidate modality), prompts = parts[4:]. So we write that order.
INSTRUCTION_HEADER = ("query_modality", "cand_modality", "dataset", "dataset_id")


@dataclass(frozen=True)
class InstructionColumns:
    """Where the key and prompt cells of an instructions TSV are, by column index."""

    dataset_id: int
    query_modality: int
    cand_modality: int
    dataset_name: int | None
    prompts: list[int]


def instruction_columns(header: list[str], path: PathLike) -> InstructionColumns:
    """Columns by header name (normalised: lower case, spaces as underscores); a header without the key
    names is read by UniIR's positions (query modality, candidate modality, dataset, dataset id, prompts...)."""
    names = [h.strip().lower().replace(" ", "_") for h in header]

    def find(*wanted: str) -> int | None:
        return next((names.index(n) for n in wanted if n in names), None)

    i_ds, i_qm, i_cm = find("dataset_id"), find("query_modality"), find("cand_modality", "candidate_modality")
    if i_ds is None and i_qm is None and i_cm is None:
        if len(names) < 5:
            raise DataError("instructions header names no key columns and has fewer than UniIR's 5 columns "
                            "(query_modality, cand_modality, dataset, dataset_id, prompt...)", path=str(path), line=1)
        return InstructionColumns(3, 0, 1, 2, list(range(4, len(names))))
    for index, name in ((i_ds, "dataset_id"), (i_qm, "query_modality"), (i_cm, "cand_modality")):
        if index is None:
            raise DataError(f"instructions header lacks a {name!r} column", path=str(path), line=1)
    assert i_ds is not None and i_qm is not None and i_cm is not None
    return InstructionColumns(i_ds, i_qm, i_cm, find("dataset", "dataset_name"),
                              [i for i, h in enumerate(names) if h.startswith("prompt")])


def read_pool_files(paths: Iterable[PathLike]) -> tuple[dict[str, Candidate], dict[Path, list[str]]]:
    """Every candidate of the given pool files, each did once, and each file's dids in file order (a did
    repeated inside one file counts once).

    The whole input is parsed before anything is embedded, so a bad line fails fast with its file and line.
    A did that appears twice with different content is an error naming both files (the index would otherwise
    depend on file order); the global pool repeating the local ones is fine.
    """
    candidates: dict[str, Candidate] = {}
    where: dict[str, Path] = {}
    dids_of: dict[Path, list[str]] = {}
    for path in map(Path, paths):
        if not path.is_file():
            raise DataError("candidate pool file not found", path=str(path))
        dids: list[str] = []
        seen: set[str] = set()
        for cand in iter_candidates(path):
            old = candidates.get(cand.did)
            if old is None:
                candidates[cand.did] = cand
                where[cand.did] = path
            elif old.to_json() != cand.to_json():
                raise DataError(f"did appears with different content in {where[cand.did]}", path=str(path),
                                record_id=cand.did)
            if cand.did not in seen:
                seen.add(cand.did)
                dids.append(cand.did)
        dids_of[path] = dids
    return candidates, dids_of


def read_instructions(path: PathLike) -> dict[tuple[str, str, str], InstructionSet]:
    """Read ``query_instructions.tsv``: a header row, then one row per (dataset id, query, candidate
    modality) key with prompt columns ``prompt_1`` .. ``prompt_n``. Columns are found by header name, so the
    real M-BEIR file, ours (written in UniIR's positional order) and older orders all read."""
    path = Path(path)
    if not path.exists():
        raise DataError("instructions file not found", path=str(path))
    out: dict[tuple[str, str, str], InstructionSet] = {}
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[:exc.start].count(b"\n") + 1
        raise DataError(f"invalid UTF-8 at byte {exc.start}", path=str(path), line=line) from None
    with io.StringIO(text, newline="") as handle:
        # QUOTE_NONE: the writer does not quote, so a prompt that starts with '"' must stay literal.
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        try:
            header = next(reader)
        except StopIteration:
            raise DataError("empty instructions file", path=str(path)) from None

        cols = instruction_columns(header, path)
        i_ds, i_qm, i_cm, i_name, prompt_cols = cols.dataset_id, cols.query_modality, cols.cand_modality, \
            cols.dataset_name, cols.prompts
        for line_no, row in enumerate(reader, start=2):
            if not any(cell.strip() for cell in row):
                continue
            try:
                key = (row[i_ds].strip(), row[i_qm].strip(), row[i_cm].strip())
            except IndexError:
                raise DataError("row has fewer columns than the header", path=str(path), line=line_no) from None
            prompts = [row[i].strip() for i in prompt_cols if i < len(row) and row[i].strip()]
            if not prompts:
                raise DataError(f"no prompts for key {key}", path=str(path), line=line_no)
            out[key] = InstructionSet(*key, prompts=prompts,
                                      dataset_name=row[i_name].strip() if i_name is not None else "")
    return out


def write_instructions(path: PathLike, sets: Iterable[InstructionSet]) -> None:
    sets = list(sets)
    width = max((len(s.prompts) for s in sets), default=1)
    with atomic_write(path) as handle:
        handle.write("\t".join([*INSTRUCTION_HEADER, *(f"prompt_{i + 1}" for i in range(width))]) + "\n")
        for s in sets:
            cells = [s.query_modality, s.cand_modality, s.dataset_name, s.dataset_id, *s.prompts]
            handle.write("\t".join(" ".join(c.split()) for c in cells) + "\n")  # no tab/newline inside a cell


class MBEIRLayout:
    """Paths of an M-BEIR-layout dataset root."""

    def __init__(self, root: PathLike) -> None:
        self.root = Path(root)

    def query_files(self, split: str) -> list[Path]:
        return sorted((self.root / "query" / split).glob("*.jsonl"))

    def local_pool_files(self) -> list[Path]:
        return sorted((self.root / "cand_pool" / "local").glob("*.jsonl"))

    def global_pool_files(self) -> list[Path]:
        return sorted((self.root / "cand_pool" / "global").glob("*.jsonl"))

    def qrels_files(self, split: str) -> list[Path]:
        return sorted((self.root / "qrels" / split).glob("*_qrels.txt"))

    @property
    def instructions_file(self) -> Path:
        return self.root / "instructions" / "query_instructions.tsv"

    def required_instructions(self) -> dict[tuple[str, str, str], InstructionSet]:
        """The instruction sets, for a run that asked for instructions: their absence is an error, not a silent
        run without them."""
        if not self.instructions_file.exists():
            raise DataError("instructions are enabled but the dataset has no instructions file",
                            path=str(self.instructions_file))
        return read_instructions(self.instructions_file)

    def local_pool_names(self, query_file: Path) -> list[str]:
        """The local pool file names that may belong to a query file, most specific first. The real
        release has per-split pools for some datasets (``mbeir_mscoco_task0_test.jsonl`` ->
        ``mbeir_mscoco_task0_test_cand_pool.jsonl``) and one pool for all splits for the others
        (``mbeir_cirr_task7_test.jsonl`` -> ``mbeir_cirr_task7_cand_pool.jsonl``)."""
        stem = query_file.stem
        names = [f"{stem}_cand_pool.jsonl"]
        for split in ("_train", "_val", "_test", "_dev"):
            if stem.endswith(split):
                names.append(f"{stem[: -len(split)]}_cand_pool.jsonl")
                break
        return names

    def local_pool_for(self, query_file: Path) -> Path | None:
        """The local pool that belongs to a query file, by M-BEIR's naming (see :meth:`local_pool_names`)."""
        for name in self.local_pool_names(query_file):
            candidate = self.root / "cand_pool" / "local" / name
            if candidate.exists():
                return candidate
        return None

    def resolve_image(self, rel_path: str) -> Path:
        return self.root / rel_path
