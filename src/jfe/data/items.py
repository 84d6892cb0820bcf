"""Model inputs: an :class:`Item` is text, an image, or both. Records (and items files) become items here.

This is the "records -> inputs" step of the data flow; every encoder takes items, never records.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from jfe.data.images import load_image
from jfe.data.instructions import TextMode, candidate_text, with_instruction
from jfe.data.mbeir import iter_json_lines
from jfe.data.records import Candidate, Query
from jfe.errors import DataError

ImageLike = str | os.PathLike | Image.Image | bytes


@dataclass(frozen=True)
class Item:
    """One thing to embed. ``id`` only serves error messages (a qid or did)."""

    text: str | None = None
    image: ImageLike | None = None
    id: str | None = None

    @property
    def modality(self) -> str:
        has_text = bool(self.text and self.text.strip())
        if has_text and self.image is not None:
            return "image,text"
        if self.image is not None:
            return "image"
        if has_text:
            return "text"
        raise DataError("item has neither text nor image", record_id=self.id)

    @property
    def required_text(self) -> str:
        """``text``, typed ``str``: for callers that know the item has text (its modality includes it)."""
        if self.text is None:
            raise DataError("item has no text", record_id=self.id)
        return self.text

    @property
    def required_image(self) -> ImageLike:
        """``image``, typed not-None: for callers that know the item has one (its modality includes it)."""
        if self.image is None:
            raise DataError("item has no image", record_id=self.id)
        return self.image

    def load_image(self) -> Image.Image | None:
        """The item's image as RGB PIL (None for text-only items); clear errors for bad files."""
        if self.image is None:
            return None
        return load_image(self.image, item_id=self.id)

    def with_instruction(self, instruction: str | None, text_mode: TextMode = "jfe") -> Item:
        """The query form: instruction prefixed to the text (an image-only query gains instruction text).
        In ``"uniir"`` text mode the text is UniIR-formatted even without an instruction."""
        if not instruction and text_mode == "jfe":
            return self
        text = with_instruction(instruction, self.text, text_mode)
        return self if text == self.text else Item(text=text, image=self.image, id=self.id)


def as_item(obj: Any, index: int | None = None) -> Item:
    """Coerce what users pass to ``encode`` into an :class:`Item`.

    Accepted: an Item; a str (text); a PIL image or a ``pathlib.Path`` (image); a dict with ``text``
    and/or ``image``; a ``(image, text)`` tuple. Strings are always text: pass ``Path(...)`` or
    ``{"image": "file.png"}`` for an image path.
    """
    label = f"item #{index}" if index is not None else None
    if isinstance(obj, Item):
        item = obj
    elif isinstance(obj, str):
        item = Item(text=obj, id=label)
    elif isinstance(obj, (Image.Image, Path, bytes)):
        item = Item(image=obj, id=label)
    elif isinstance(obj, dict):
        unknown = set(obj) - {"text", "image", "id"}
        if unknown:
            raise DataError(f"unknown item keys {sorted(unknown)} (expected 'text', 'image', 'id')",
                            record_id=label)
        item = Item(text=obj.get("text"), image=obj.get("image"), id=obj.get("id", label))
    elif isinstance(obj, tuple) and len(obj) == 2:
        item = Item(image=obj[0], text=obj[1], id=label)
    else:
        raise DataError(f"cannot use a {type(obj).__name__} as an item (expected str, Path, PIL image, "
                        f"dict or Item)", record_id=label)
    if item.text is not None and not isinstance(item.text, str):
        raise DataError(f"item text must be a string, got {type(item.text).__name__}", record_id=item.id)
    if item.image is not None and not isinstance(item.image, (str, os.PathLike, Image.Image, bytes)):
        raise DataError(f"item image must be a path, bytes or PIL image, got {type(item.image).__name__}",
                        record_id=item.id)
    _ = item.modality  # raises on empty items
    return item


def read_items(path: str | os.PathLike) -> list[Item]:
    """The items of a JSON-lines file: ``{"text": ..., "image": "relative/or/absolute.png", "id": ...}`` per
    line, ``image`` relative to the file's folder, ``id`` ``"line N"`` unless given. Every error (unreadable
    file, bad JSON or UTF-8, unknown keys, an empty item) names the file and the line."""
    path = Path(path)
    items = []
    for line_no, record in iter_json_lines(path):
        record.setdefault("id", f"line {line_no}")
        image = record.get("image")
        if image and not isinstance(image, str):
            raise DataError(f"'image' must be a path string, got {type(image).__name__}", path=str(path),
                            line=line_no)
        if image:
            record["image"] = Path(image) if Path(image).is_absolute() else path.parent / image
        try:
            items.append(as_item(record))
        except DataError as exc:  # as_item knows the item, not where it came from
            raise DataError(exc.message, path=str(path), line=line_no, record_id=exc.record_id) from None
    return items


def query_item(query: Query, root: str | os.PathLike, instruction: str | None = None,
               text_mode: TextMode = "jfe", text: str | None = None) -> Item:
    """The model input for an M-BEIR query: its image and its (instruction-prefixed) text; ``text``
    replaces the query's own text (e.g. a held-out rewording)."""
    image = Path(root) / query.query_img_path if query.query_img_path else None
    item = Item(text=query.query_txt if text is None else text, image=image, id=query.qid)
    return item.with_instruction(instruction, text_mode)


def candidate_item(candidate: Candidate, root: str | os.PathLike, text_mode: TextMode = "jfe") -> Item:
    """The model input for an M-BEIR candidate (candidates carry no instruction)."""
    image = Path(root) / candidate.img_path if candidate.img_path else None
    return Item(text=candidate_text(candidate.txt, text_mode), image=image, id=candidate.did)
