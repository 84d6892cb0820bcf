"""Task instructions and text formatting, with a deterministic choice of instruction variant.

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
from typing import Literal

from jfe.data.records import InstructionSet

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
