"""Task instructions and text formatting, with a deterministic choice of instruction variant.

Instruction key: every query's instruction set is looked up under ``(dataset id, query modality, candidate
modality)`` (the key of ``instructions/query_instructions.tsv``), computed by :func:`instruction_key` only.

Two text modes:

* ``"jfe"`` (the default): whitespace is collapsed, the instruction and the query text are each capitalised
  and end with a period, then joined; candidate texts are used as they are.
* ``"uniir"``: exactly UniIR's ``format_string`` (``\\r`` removed, stripped, surrounding ``"`` stripped,
  first letter capitalised, a period added unless the text ends in ``.?!``), applied to
  ``f"{instruction} {query_text}"`` as one string, and to every candidate text too. Use it to reproduce
  scores of UniIR checkpoints.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Literal

from jfe.data.records import TASKS, Candidate, InstructionSet, Query

InstructionKey = tuple[str, str, str | None]

TextMode = Literal["jfe", "uniir"]
TEXT_MODES: tuple[str, ...] = ("jfe", "uniir")


def format_text(text: str) -> str:
    """JFE's formatting: collapse whitespace, capitalise the first letter, end with a period."""
    text = " ".join(text.strip().split())
    if not text:
        return text
    text = text[0].upper() + text[1:]
    if text[-1] not in ".?!":
        text += "."
    return text


def uniir_format_string(text: str | None) -> str:
    """UniIR's ``format_string`` (data/preprocessing/utils.py), character for character."""
    text = (text or "").replace("\r", "").strip().strip('"')
    if text:
        text = text[0].upper() + text[1:]
        text = text + "." if text[-1] not in (".", "?", "!") else text
    return text


def with_instruction(instruction: str | None, query_text: str | None, mode: TextMode = "jfe") -> str | None:
    """The query text with its instruction in front, formatted in the given text mode."""
    if mode == "uniir":
        if not instruction:
            return uniir_format_string(query_text) or None
        return uniir_format_string(f"{uniir_format_string(instruction)} {query_text or ''}") or None
    parts = [format_text(p) for p in (instruction, query_text) if p and p.strip()]
    return " ".join(parts) if parts else None


def candidate_text(text: str | None, mode: TextMode = "jfe") -> str | None:
    """A candidate's text as the model reads it: unchanged in ``"jfe"`` mode, UniIR-formatted in ``"uniir"``."""
    if mode == "uniir":
        return uniir_format_string(text) or None
    return text


def pick_instruction(qid: str, instruction_set: InstructionSet | None, mode: str = "hash") -> str | None:
    """Choose one prompt variant deterministically.

    ``mode="hash"`` picks by a stable hash of the qid (reproducible, yet every variant is used);
    ``mode="first"`` always takes the first. UniIR samples at random, which makes scores irreproducible.
    """
    if instruction_set is None or not instruction_set.prompts:
        return None
    if mode == "first":
        return instruction_set.prompts[0]
    digest = int.from_bytes(hashlib.sha1(qid.encode("utf-8")).digest()[:4], "big")
    return instruction_set.prompts[digest % len(instruction_set.prompts)]


def instruction_key(query: Query, candidates: Mapping[str, Candidate] | None = None,
                    positives: Iterable[str] | None = None) -> InstructionKey:
    """The ``(dataset id, query modality, candidate modality)`` key of a query's instruction set.

    The one rule, used by evaluation, training, validation sets and ``jfe data validate`` alike:

    * dataset id: the qid's part before ``:`` (the whole qid when it has none: such a key matches no
      instruction, and ``jfe data validate`` reports the id);
    * candidate modality: the candidate side of the query's M-BEIR task (``TASKS[task_id][1]``) when
      ``task_id`` is one; otherwise the modality of the first of ``positives`` (default: the query's
      ``pos_cand_list``, in its order) found in ``candidates``, the candidate pool (UniIR's rule: its
      ``pos_cand_list[0]``); ``None`` when none is there.

    Why the task first: a query's instruction must not depend on which pool (local, global, a capped
    validation pool) it is ranked in, nor on which of its positives a training step draws.
    """
    dataset_id = query.qid.partition(":")[0]
    if query.task_id in TASKS:
        return dataset_id, query.query_modality, TASKS[query.task_id][1]
    pool = candidates or {}
    for did in query.pos_cand_list if positives is None else positives:
        if did in pool:
            return dataset_id, query.query_modality, pool[did].modality
    return dataset_id, query.query_modality, None


def instruction_set_for(instruction_sets: Mapping[tuple[str, str, str], InstructionSet], key: InstructionKey
                        ) -> InstructionSet | None:
    """The instruction set filed under ``key`` (from :func:`instruction_key`); None when there is none, or
    when the key has no candidate modality."""
    dataset_id, query_modality, cand_modality = key
    if cand_modality is None:
        return None
    return instruction_sets.get((dataset_id, query_modality, cand_modality))
