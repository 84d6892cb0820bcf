"""A tiny synthetic M-BEIR dataset for smoke tests, examples and the toy throughput benchmark.

Each base item is a colour: a level (0-3) for each of red, green and blue. Its image is a solid 8x8
swatch; its caption names the three levels (``"red_2 green_0 blue_3"``); its alias uses other words
(``"crimson_2 lime_0 navy_3"``). Splits hold disjoint colours, so validation measures whether a model
learned the *composition* (a linear encoder such as ``ToyEncoder`` can), not memorised names.

Tasks: 0 (caption -> image), 3 (image -> caption), 1 (alias -> caption), 7 (image + "more red" -> the
image with red one level up). Hard negatives are the colours one level away in one channel.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from jfe.data.mbeir import write_candidates, write_instructions, write_qrels, write_queries
from jfe.data.records import Candidate, InstructionSet, Qrel, Query

LEVELS = (20, 90, 160, 235)
CHANNELS = ("red", "green", "blue")
ALIASES = ("crimson", "lime", "navy")
DATASET = "1"
Levels = tuple[int, int, int]  # one level (0-3) per channel: a colour


def _caption(levels: tuple[int, int, int]) -> str:
    return " ".join(f"{c}_{lv}" for c, lv in zip(CHANNELS, levels, strict=True))


def _alias(levels: tuple[int, int, int]) -> str:
    return " ".join(f"{a}_{lv}" for a, lv in zip(ALIASES, levels, strict=True))


def _key(levels: tuple[int, int, int]) -> str:
    return "".join(map(str, levels))


def _neighbours(combo: Levels) -> list[Levels]:
    """The colours one level away in one channel: the hard negatives."""
    out: list[Levels] = []
    for ch in range(3):
        for step in (-1, 1):
            lv = combo[ch] + step
            if 0 <= lv < 4:
                r, g, b = (lv if i == ch else v for i, v in enumerate(combo))
                out.append((r, g, b))
    return out


def _write_swatches(root: Path, combos: list[Levels], image_did: dict[Levels, str], text_did: dict[Levels, str]
                    ) -> list[Candidate]:
    """Every colour's swatch image on disk, and its image and caption candidates (sorted colour order)."""
    candidates = []
    for combo in sorted(combos):
        path = f"images/{_key(combo)}.png"
        Image.new("RGB", (8, 8), tuple(LEVELS[lv] for lv in combo)).save(root / path)
        src = json.dumps({"base": _key(combo)})
        candidates.append(Candidate(image_did[combo], None, path, "image", src))
        candidates.append(Candidate(text_did[combo], _caption(combo), None, "text", src))
    return candidates


def _split_queries(split_combos: list[Levels], image_did: dict[Levels, str], text_did: dict[Levels, str],
                   qn: Iterator[int]) -> dict[int, list[Query]]:
    """One split's queries per task; ``qn`` numbers queries across splits, so it is shared."""
    by_task: dict[int, list[Query]] = {0: [], 3: [], 1: [], 7: []}
    for combo in split_combos:
        src = json.dumps({"base": _key(combo)})
        img = f"images/{_key(combo)}.png"
        nb = _neighbours(combo)
        by_task[0].append(Query(f"{DATASET}:q{next(qn)}", _caption(combo), None, "text", src,
                                [image_did[combo]], [image_did[n] for n in nb], 0))
        by_task[3].append(Query(f"{DATASET}:q{next(qn)}", None, img, "image", src,
                                [text_did[combo]], [text_did[n] for n in nb], 3))
        by_task[1].append(Query(f"{DATASET}:q{next(qn)}", _alias(combo), None, "text", src,
                                [text_did[combo]], [text_did[n] for n in nb], 1))
        if combo[0] < 3:
            target = (combo[0] + 1, combo[1], combo[2])
            mod = json.dumps({"base": _key(combo), "modification": "more red", "non_additive": False,
                              "exclude_dids": [image_did[combo]]})
            by_task[7].append(Query(f"{DATASET}:q{next(qn)}", "more red", img, "image,text", mod,
                                    [image_did[target]], [image_did[combo]], 7))
    return by_task


def write_synthetic_mbeir(root: str | Path, seed: int = 0, val_fraction: float = 0.25) -> Path:
    """Write the dataset under ``root`` (M-BEIR layout); returns ``root``."""
    root = Path(root)
    combos: list[Levels] = [(r, g, b) for r, g, b in itertools.product(range(4), repeat=3)]
    random.Random(seed).shuffle(combos)
    n_val = max(4, int(len(combos) * val_fraction))
    splits = {"val": combos[:n_val], "train": combos[n_val:]}
    (root / "images").mkdir(parents=True, exist_ok=True)
    image_did = {c: f"{DATASET}:{i}" for i, c in enumerate(sorted(combos))}
    text_did = {c: f"{DATASET}:{100 + i}" for i, c in enumerate(sorted(combos))}
    candidates = _write_swatches(root, combos, image_did, text_did)
    qn = itertools.count()
    for split, split_combos in splits.items():
        for task, queries in _split_queries(split_combos, image_did, text_did, qn).items():
            write_queries(root / "query" / split / f"mbeir_synth_task{task}_{split}.jsonl", queries)
            write_qrels(root / "qrels" / split / f"mbeir_synth_task{task}_{split}_qrels.txt",
                        [Qrel(q.qid, d, 1, task) for q in queries for d in q.pos_cand_list])
    for task, modality in ((0, "image"), (3, "text"), (1, "text"), (7, "image")):
        pool = [c for c in candidates if c.modality == modality]
        write_candidates(root / "cand_pool" / "local" / f"mbeir_synth_task{task}_cand_pool.jsonl", pool)
    write_candidates(root / "cand_pool" / "global" / "mbeir_union_cand_pool.jsonl", candidates)
    write_instructions(root / "instructions" / "query_instructions.tsv", [
        InstructionSet(DATASET, "text", "image", ["Find the swatch of this colour", "Show this colour"], "synth"),
        InstructionSet(DATASET, "image", "text", ["Name this colour"], "synth"),
        InstructionSet(DATASET, "text", "text", ["Translate the colour name"], "synth"),
        InstructionSet(DATASET, "image,text", "image", ["Apply the change to the colour"], "synth"),
    ])
    return root
