"""Task instructions: UniIR-style query formatting with a deterministic choice of variant."""

from __future__ import annotations

import hashlib

from jfe.data.records import InstructionSet


def format_text(text: str) -> str:
    """UniIR's ``format_string``: strip, capitalise the first letter, end with a period."""
    text = " ".join(text.strip().split())
    if not text:
        return text
    text = text[0].upper() + text[1:]
    if text[-1] not in ".?!":
        text += "."
    return text


def with_instruction(instruction: str | None, query_text: str | None) -> str | None:
    """Query text = instruction + query text, each formatted as UniIR does."""
    parts = [format_text(p) for p in (instruction, query_text) if p and p.strip()]
    return " ".join(parts) if parts else None


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
