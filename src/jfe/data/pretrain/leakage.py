"""No leakage into MiniBEIR: what a built MiniBEIR evaluates on, and whether a corpus item touches it.

The reference is read from a *built* MiniBEIR (whatever its seed), so it is exactly what evaluation sees:
the bases of every val/test query; their texts (names, titles, keywords, translations: the text queries
of tasks 0 and 1, the names recorded in ``query_src_content`` and the text candidates of those bases); and
a perceptual hash of every image of those bases. A corpus item is dropped when

- one of its names, normalised, *is* a val/test text, or contains a val/test text of two or more words
  as a run of whole words ("red apple" inside "a shiny red apple"), or
- its rendered image is within ``max_hamming`` bits of a val/test image's 256-bit difference hash.

Both are deliberately conservative: an innocent icon named "cat" is lost when "cat" is a test emoji.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from jfe.data.mbeir import MBEIRLayout, iter_candidates, iter_queries
from jfe.data.pretrain.sources import STYLE_TOKENS
from jfe.errors import DataError

HELDOUT_SPLITS = ("val", "test")
TEXT_TASKS = (0, 1, 3)  # tasks whose texts name the base (the others hold edits and questions)
MAX_NGRAM = 6


def normalise(text: str) -> str:
    """Lower case, letters and digits only, single spaces, trailing style words dropped."""
    tokens = re.sub(r"[^0-9a-zà-ÿ]+", " ", text.lower()).split()
    while len(tokens) > 1 and tokens[-1] in STYLE_TOKENS:
        tokens.pop()
    return " ".join(tokens)


def dhash(image: Image.Image, side: int = 16) -> np.ndarray:
    """256-bit difference hash (grey, 17x16, left-right gradients) as four uint64 words."""
    grey = np.asarray(image.convert("L").resize((side + 1, side), Image.Resampling.BILINEAR), dtype=np.int16)
    bits = (grey[:, 1:] > grey[:, :-1]).reshape(-1)
    return np.packbits(bits).view(">u8").astype(np.uint64)


@dataclass
class LeakageReference:
    """Normalised val/test texts and image hashes of one built MiniBEIR."""

    root: Path
    texts: set[str] = field(default_factory=set)
    hashes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), dtype=np.uint64))
    bases: int = 0
    max_hamming: int = 12

    @classmethod
    def from_minibeir(cls, root: str | Path, max_hamming: int = 12) -> LeakageReference:
        layout = MBEIRLayout(root)
        if not layout.root.is_dir():
            raise DataError("MiniBEIR folder not found (build it with `jfe data build-minibeir`)",
                            path=str(layout.root))
        bases: set[str] = set()
        texts: set[str] = set()
        images: set[str] = set()
        found = False
        for split in HELDOUT_SPLITS:
            for path in layout.query_files(split):
                found = True
                for q in iter_queries(path):
                    src = q.src
                    base = src.get("base")
                    if base:
                        bases.add(str(base))
                    if q.task_id in TEXT_TASKS and q.query_txt:
                        texts.add(q.query_txt)
                    for key in ("name", "title"):
                        if isinstance(src.get(key), str):
                            texts.add(src[key])
                    if q.query_img_path:
                        images.add(q.query_img_path)
        if not found:
            raise DataError("no val/test query files: not a built MiniBEIR", path=str(layout.root))
        for pool in layout.local_pool_files():
            task = re.search(r"_task(\d+)_", pool.name)
            for cand in iter_candidates(pool):
                if str(cand.src.get("base")) not in bases:
                    continue
                if cand.txt and task and int(task.group(1)) in TEXT_TASKS:
                    texts.add(cand.txt)
                if cand.img_path:
                    images.add(cand.img_path)
        hashes = []
        for rel in sorted(images):
            path = layout.root / rel
            try:
                with Image.open(path) as image:
                    hashes.append(dhash(image))
            except (OSError, ValueError) as exc:
                raise DataError(f"cannot read MiniBEIR image ({exc})", path=str(path)) from None
        normalised = {n for n in (normalise(t) for t in texts) if n}
        return cls(layout.root, normalised,
                   np.stack(hashes) if hashes else np.zeros((0, 4), dtype=np.uint64), len(bases), max_hamming)

    def text_match(self, names: list[str]) -> str:
        """The val/test text one of ``names`` matches ("" if none)."""
        for name in names:
            norm = normalise(name)
            if not norm:
                continue
            if norm in self.texts:
                return norm
            tokens = norm.split()
            for n in range(2, min(MAX_NGRAM, len(tokens)) + 1):
                for i in range(len(tokens) - n + 1):
                    gram = " ".join(tokens[i:i + n])
                    if gram in self.texts:
                        return gram
        return ""

    def image_match(self, hashes: np.ndarray) -> np.ndarray:
        """For each row of ``hashes`` (n x 4 uint64), whether a val/test image is within ``max_hamming`` bits."""
        if not len(self.hashes) or not len(hashes):
            return np.zeros(len(hashes), dtype=bool)
        out = np.zeros(len(hashes), dtype=bool)
        for start in range(0, len(hashes), 256):
            chunk = hashes[start:start + 256]
            distance = np.bitwise_count(chunk[:, None, :] ^ self.hashes[None, :, :]).sum(axis=2)
            out[start:start + 256] = distance.min(axis=1) <= self.max_hamming
        return out

    def describe(self) -> dict:
        return {"minibeir": str(self.root), "heldout_bases": self.bases, "heldout_texts": len(self.texts),
                "heldout_images": int(len(self.hashes)), "max_hamming": self.max_hamming}


def minibeir_config(root: Path) -> dict:
    """The build config of a MiniBEIR folder (seed, split fractions), from its marker."""
    marker = Path(root) / ".minibeir.json"
    try:
        return json.loads(marker.read_text(encoding="utf-8"))["config"]
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"not a MiniBEIR build marker ({exc})", path=str(marker)) from None
