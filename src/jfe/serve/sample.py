"""A small self-made M-BEIR-layout dataset and index, to try the service without building MiniBEIR.

``jfe serve --demo`` and ``benchmarks/serve_load.py`` use it: shapes x colours drawn with PIL as image,
text and image+text candidates, and an instructions TSV. Nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from jfe.data.mbeir import MBEIRLayout, write_candidates, write_instructions
from jfe.data.records import Candidate, InstructionSet

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 70), "blue": (40, 80, 220), "yellow": (235, 200, 30),
           "purple": (140, 60, 190), "orange": (245, 130, 30)}
SHAPES = ("square", "circle", "triangle", "diamond")
POOL_NAME = "mbeir_sample_cand_pool.jsonl"


def _draw(shape: str, rgb: tuple[int, int, int], size: int = 96) -> Image.Image:
    image = Image.new("RGB", (size, size), (250, 250, 247))
    draw, m = ImageDraw.Draw(image), size // 6
    box = (m, m, size - m, size - m)
    if shape == "square":
        draw.rectangle(box, fill=rgb)
    elif shape == "circle":
        draw.ellipse(box, fill=rgb)
    elif shape == "triangle":
        draw.polygon([(size // 2, m), (size - m, size - m), (m, size - m)], fill=rgb)
    else:
        draw.polygon([(size // 2, m), (size - m, size // 2), (size // 2, size - m), (m, size // 2)], fill=rgb)
    return image


def build_sample_dataset(root: str | os.PathLike) -> Path:
    """Write the sample dataset under ``root`` (images, one candidate pool, instructions); return ``root``."""
    root = Path(root)
    candidates: list[Candidate] = []
    n = 0
    for colour, rgb in COLOURS.items():
        for shape in SHAPES:
            rel = f"images/sample/{colour}_{shape}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            _draw(shape, rgb).save(root / rel)
            caption = f"a {colour} {shape}"
            for txt, img, modality in ((None, rel, "image"), (caption, None, "text"), (caption, rel, "image,text")):
                n += 1
                candidates.append(Candidate(f"90:{n}", txt, img, modality))
    layout = MBEIRLayout(root)
    write_candidates(root / "cand_pool" / "local" / POOL_NAME, candidates)
    write_instructions(layout.instructions_file, [
        InstructionSet("90", "text", "image", ["Find the picture this text describes", "Show me an image of this"],
                       "sample"),
        InstructionSet("90", "image", "text", ["Find a caption for this image"], "sample"),
        InstructionSet("90", "image", "image", ["Find a similar picture"], "sample"),
        InstructionSet("90", "image,text", "image", ["Change the image as the text says"], "sample"),
    ])
    return root


def build_sample_index(root: str | os.PathLike, model: Any | None = None) -> Any:
    """Build the sample dataset under ``root`` if absent and index it (default model: the toy encoder)."""
    from jfe.indexing import build_index

    root = Path(root)
    if not (root / "cand_pool" / "local" / POOL_NAME).is_file():
        build_sample_dataset(root)
    if model is None:
        from jfe.models.toy import ToyEncoder

        model = ToyEncoder()
    return build_index(model, [root / "cand_pool" / "local" / POOL_NAME], root, progress=False)
