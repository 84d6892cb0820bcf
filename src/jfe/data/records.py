"""Typed M-BEIR records (UniIR-compatible field names and order) and the task table."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Literal

Modality = Literal["text", "image", "image,text"]
MODALITIES: tuple[str, ...] = ("text", "image", "image,text")

# M-BEIR task id -> (query modality, candidate modality)
TASKS: dict[int, tuple[str, str]] = {
    0: ("text", "image"),
    1: ("text", "text"),
    2: ("text", "image,text"),
    3: ("image", "text"),
    4: ("image", "image"),
    5: ("image", "image,text"),
    6: ("image,text", "text"),
    7: ("image,text", "image"),
    8: ("image,text", "image,text"),
}

# M-BEIR's ten datasets and their ids (UniIR's DATASET_IDS). Other collections should use ids outside 0-9
# (MiniBEIR uses 90 and 91) so that results and ids never clash with the real benchmark's.
MBEIR_DATASET_IDS: dict[str, int] = {
    "visualnews": 0, "fashion200k": 1, "webqa": 2, "edis": 3, "nights": 4,
    "oven": 5, "infoseek": 6, "fashioniq": 7, "cirr": 8, "mscoco": 9,
}
# UniIR turns ids into integers as dataset_id * bound + n, so n must stay below these bounds.
QUERY_ID_BOUND = 500_000
CANDIDATE_ID_BOUND = 10_000_000


def task_of(query_modality: str, cand_modality: str) -> int | None:
    """The M-BEIR task id of a (query modality, candidate modality) pair (UniIR's ``get_mbeir_task_id``)."""
    return next((t for t, pair in TASKS.items() if pair == (query_modality, cand_modality)), None)


def hashed_id(record_id: str, bound: int) -> int:
    """UniIR's integer form of an id (``hash_qid`` with QUERY_ID_BOUND, ``hash_did`` with CANDIDATE_ID_BOUND).

    Raises ValueError when the id is not ``int:int`` or its number reaches the bound (two ids would then
    map to one integer in UniIR's tools)."""
    head, sep, tail = record_id.partition(":")
    if not sep or not head.isdigit() or not tail.isdigit():
        raise ValueError(f"id {record_id!r} is not of UniIR's integer form 'dataset_id:n'")
    if int(tail) >= bound:
        raise ValueError(f"id {record_id!r}: n={int(tail)} reaches UniIR's per-dataset bound {bound:,}")
    return int(head) * bound + int(tail)


# The paper's five categories and whether they need modality fusion.
CATEGORIES: dict[str, tuple[int, ...]] = {
    "single-modal": (1, 4),
    "cross-modal": (0, 3),
    "mixed-modal": (2,),
    "multi-modal": (5, 6, 8),
    "conditional": (7,),
}
FUSION_CATEGORIES: tuple[str, ...] = ("mixed-modal", "multi-modal", "conditional")
TASK_CATEGORY: dict[int, str] = {t: c for c, ts in CATEGORIES.items() for t in ts}


def modality_of(text: str | None, img_path: str | None) -> str | None:
    """The modality implied by which fields are present (None when both are empty)."""
    has_text, has_image = bool(text and text.strip()), bool(img_path)
    if has_text and has_image:
        return "image,text"
    if has_image:
        return "image"
    if has_text:
        return "text"
    return None


def image_path_problem(rel: str | None) -> str | None:
    """Why ``rel`` cannot be an M-BEIR ``img_path`` (None when it can): paths are relative to the dataset root
    and stay inside it, so a record can never make JFE open ``/etc/passwd`` or ``../../secret.png``."""
    if not rel:
        return None
    posix = rel.replace("\\", "/")
    if posix.startswith(("/", "~")) or re.match(r"^[A-Za-z]:", posix):
        return f"image path {rel!r} is absolute; image paths are relative to the dataset root"
    if ".." in PurePosixPath(posix).parts:
        return f"image path {rel!r} leaves the dataset root ('..')"
    if "\x00" in rel:
        return f"image path {rel!r} holds a NUL byte"
    return None


def record_problems(text: str | None, img_path: str | None, modality: str, *, is_query: bool
                    ) -> list[tuple[str, str]]:
    """``(kind, message)`` for what is wrong with a record's content, the one rule both the strict readers
    (which refuse the first) and ``jfe data validate`` (which reports them all) apply: an image path outside
    the root, no content at all, or a declared modality the fields present do not make."""
    problems = []
    path_problem = image_path_problem(img_path)
    if path_problem is not None:
        problems.append(("unsafe-path", path_problem))
    implied = modality_of(text, img_path)
    modality_key = "query_modality" if is_query else "modality"
    if implied is None:
        fields = "query_txt nor query_img_path" if is_query else "txt nor img_path"
        problems.append(("empty-record", f"{'query' if is_query else 'candidate'} has neither {fields}"))
    elif implied != modality:
        problems.append(("modality-mismatch", f"{modality_key} is {modality!r} but the fields present make it "
                                              f"{implied!r}"))
    return problems


def dataset_id_of(record_id: str) -> str:
    """``"9:6"`` -> ``"9"``: M-BEIR ids are ``{dataset_id}:{n}``."""
    head, sep, _ = record_id.partition(":")
    if not sep or not head:
        raise ValueError(f"id {record_id!r} is not of the form 'dataset_id:n'")
    return head


@dataclass(slots=True)
class Query:
    """One line of ``query/{split}/*.jsonl``."""

    qid: str
    query_txt: str | None
    query_img_path: str | None
    query_modality: str
    query_src_content: str | None = None
    pos_cand_list: list[str] = field(default_factory=list)
    neg_cand_list: list[str] = field(default_factory=list)
    task_id: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "qid": self.qid,
            "query_txt": self.query_txt,
            "query_img_path": self.query_img_path,
            "query_modality": self.query_modality,
            "query_src_content": self.query_src_content,
            "pos_cand_list": list(self.pos_cand_list),
            "neg_cand_list": list(self.neg_cand_list),
            "task_id": self.task_id,
        }

    @property
    def src(self) -> dict[str, Any]:
        """``query_src_content`` decoded when it holds JSON (MiniBEIR stores the modification type there)."""
        return _decode_src(self.query_src_content)

    @property
    def excluded_dids(self) -> set[str]:
        """Candidates this query must not retrieve (``exclude_dids`` in ``query_src_content``): a composed
        query's own reference image is not an answer (CIRR's convention). Evaluation and validation both
        remove them from the query's ranking."""
        return {str(d) for d in (self.src.get("exclude_dids") or [])}


@dataclass(slots=True)
class Candidate:
    """One line of ``cand_pool/**/*.jsonl``."""

    did: str
    txt: str | None
    img_path: str | None
    modality: str
    src_content: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "did": self.did,
            "txt": self.txt,
            "img_path": self.img_path,
            "modality": self.modality,
            "src_content": self.src_content,
        }

    @property
    def src(self) -> dict[str, Any]:
        return _decode_src(self.src_content)


@dataclass(slots=True, frozen=True)
class Qrel:
    """One line of ``qrels/{split}/*_qrels.txt``: ``{qid} 0 {did} {relevance} {task_id}``."""

    qid: str
    did: str
    relevance: int = 1
    task_id: int | None = None

    def to_line(self) -> str:
        return f"{self.qid} 0 {self.did} {self.relevance} {self.task_id if self.task_id is not None else ''}".rstrip()


@dataclass(slots=True)
class InstructionSet:
    """The instruction variants for one (dataset id, query modality, candidate modality) key."""

    dataset_id: str
    query_modality: str
    cand_modality: str
    prompts: list[str]
    dataset_name: str = ""

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.dataset_id, self.query_modality, self.cand_modality)


def _decode_src(raw: str | None) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except (TypeError, ValueError):
        return {"raw": raw}
    return value if isinstance(value, dict) else {"raw": value}
