"""Items -> the tensors a tower model's fusion step reads: the one loader every backend shares.

A model on the MobileNetV2 + MiniLM towers embeds a batch in two steps:

1. :func:`pack` (this module, no weights needed): tokenise the texts, lay out each item's sequence and say
   where every visual token goes. It returns :class:`Packed`: integer tensors (token ids, masks, index maps)
   and the items whose images the vision tower must read, in order.
2. ``model.fuse(features, **packed.inputs)``: pure tensor arithmetic from the vision tower's feature maps and
   those tensors to the ``[n, d]`` unit vectors.

PyTorch runs both in :meth:`~jfe.models.towers.TowerEncoder.embed`; the ONNX backend (:mod:`jfe.models.onnx`)
runs the same :func:`pack` and exported graphs of the vision tower and of ``fuse``, so image decoding, resizing
and tokenising are the same code for both. Index maps (``-1`` = nothing) replace boolean scatters, which keeps
``fuse`` exportable with dynamic batch and sequence sizes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from jfe.data.items import Item
from jfe.errors import DataError

if TYPE_CHECKING:
    from jfe.models.towers import TowerConfig

# the tensors each kind of fusion reads, in the order the exported graph takes them (after ``features``)
FUSION_INPUTS: dict[str, tuple[str, ...]] = {
    "joint": ("input_ids", "attention_mask", "visual_index"),
    "towers": ("input_ids", "attention_mask", "image_of", "text_of"),
    "features": ("input_ids", "attention_mask", "image_of", "source"),
}


@dataclass
class Packed:
    """What ``fuse`` reads besides the feature maps: named integer tensors (CPU) and the image items, in order."""

    inputs: dict[str, torch.Tensor]
    images: list[Item]


def check_items(items: Sequence[Item]) -> list[str]:
    """Each item's modality; a clear :class:`DataError` for wrong types and empty items."""
    modalities = []
    for i, item in enumerate(items):
        if not isinstance(item, Item):
            raise DataError(f"expected an Item, got {type(item).__name__} (use encode() for raw inputs)",
                            record_id=f"item #{i}")
        modalities.append(item.modality)  # raises DataError naming the item when it is empty
    if not items:
        raise DataError("no items to embed")
    return modalities


def _padded(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(ids, mask)`` int64 tensors of the rows."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, :len(row)] = 1
    return ids, mask


def pack(kind: str, items: Sequence[Item], config: TowerConfig, text_path: str | None = None) -> Packed:
    """The fusion inputs of ``items`` for a model of fusion ``kind`` (:data:`FUSION_INPUTS`).

    ``"joint"`` (jfe-mini): one sequence per item, ``[CLS] visual tokens, text tokens [SEP]``; ``visual_index``
    says which visual token (row-major over the image items) fills each visual slot. ``"towers"`` (two-tower,
    score fusion): the texts as ``[CLS] text [SEP]`` rows, and per item the row of its image / text (or -1).
    ``"features"`` (feature fusion): the texts' rows, and per item and slot the row of a table of visual tokens
    then text token states that fills it (or -1 = padding). Batches without any text get one two-token row and
    fusion never reads it, so every graph sees at least one row of each input.
    """
    from jfe.models.text import load_tokenizer, tokenize

    if kind not in FUSION_INPUTS:
        raise ValueError(f"unknown fusion kind {kind!r}: one of {', '.join(FUSION_INPUTS)}")
    modalities = check_items(items)
    tokenizer = load_tokenizer(text_path)
    cls, sep, pad = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
    texts = [item.required_text for item, m in zip(items, modalities, strict=True) if "text" in m]
    text_ids = tokenize(texts, config.max_text_tokens, text_path)
    images = [item for item, m in zip(items, modalities, strict=True) if "image" in m]
    n_visual = config.n_visual
    if kind == "joint":
        rows, starts = [], []
        text_iter, image = iter(text_ids), 0
        for m in modalities:
            visual = n_visual if "image" in m else 0
            rows.append([cls, *([pad] * visual), *(next(text_iter) if "text" in m else []), sep])
            starts.append(image * n_visual if visual else -1)
            image += bool(visual)
        ids, mask = _padded(rows, pad)
        visual_index = torch.full(ids.shape, -1, dtype=torch.long)
        for i, start in enumerate(starts):
            if start >= 0:
                visual_index[i, 1:1 + n_visual] = torch.arange(start, start + n_visual)
        return Packed({"input_ids": ids, "attention_mask": mask, "visual_index": visual_index}, images)

    ids, mask = _padded([[cls, *row, sep] for row in text_ids] or [[cls, sep]], pad)
    image_of, text_of, n_images, n_texts = [], [], 0, 0
    for m in modalities:
        image_of.append(n_images if "image" in m else -1)
        text_of.append(n_texts if "text" in m else -1)
        n_images, n_texts = n_images + ("image" in m), n_texts + ("text" in m)
    inputs = {"input_ids": ids, "attention_mask": mask, "image_of": torch.tensor(image_of, dtype=torch.long)}
    if kind == "towers":
        return Packed({**inputs, "text_of": torch.tensor(text_of, dtype=torch.long)}, images)
    # feature fusion: slots = the item's visual tokens, then its text's real tokens; table rows = the image items'
    # visual tokens (row-major), then every text row's token states (row-major, padding included)
    # (a batch without images gets one placeholder feature map, whose K tokens still head the table)
    text_width, visual_rows = ids.shape[1], max(len(images), 1) * n_visual
    lengths = [len(row) + 2 for row in text_ids]
    slots = [(n_visual if "image" in m else 0) + (lengths[t] if t >= 0 else 0)
             for m, t in zip(modalities, text_of, strict=True)]
    source = torch.full((len(items), max(slots)), -1, dtype=torch.long)
    for i, (m, image, text) in enumerate(zip(modalities, image_of, text_of, strict=True)):
        visual = n_visual if "image" in m else 0
        if visual:
            source[i, :visual] = torch.arange(image * n_visual, (image + 1) * n_visual)
        if text >= 0:
            start = visual_rows + text * text_width
            source[i, visual:visual + lengths[text]] = torch.arange(start, start + lengths[text])
    return Packed({**inputs, "source": source}, images)


def pack_pairs(queries: Sequence[Item], candidates: Sequence[Item], query_of: Sequence[int], config: TowerConfig,
               text_path: str | None = None) -> Packed:
    """A reranker's pairs as one sequence each: ``[CLS] query visual tokens, query text [SEP] candidate visual
    tokens, candidate text [SEP]`` for ``(queries[query_of[j]], candidates[j])``, with ``token_type_ids`` 0 for the
    query's segment and 1 for the candidate's. ``images`` holds each query image once (however many candidates it
    is paired with), then the candidate images; ``visual_index`` says which of their visual tokens (row-major)
    fills each visual slot, as :func:`pack` does for ``"joint"``."""
    from jfe.models.text import load_tokenizer, tokenize

    q_mod, c_mod = check_items(queries), check_items(candidates)
    tokenizer = load_tokenizer(text_path)
    cls, sep, pad = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id

    def text_ids(items: Sequence[Item], modalities: Sequence[str]) -> list[list[int]]:
        ids = iter(tokenize([item.required_text for item, m in zip(items, modalities, strict=True) if "text" in m],
                            config.max_text_tokens, text_path))
        return [next(ids) if "text" in m else [] for m in modalities]

    q_text, c_text = text_ids(queries, q_mod), text_ids(candidates, c_mod)
    n_visual = config.n_visual
    q_image = {q: i for i, q in enumerate(q for q, m in enumerate(q_mod) if "image" in m)}
    c_image = {j: len(q_image) + i for i, j in enumerate(j for j, m in enumerate(c_mod) if "image" in m)}
    rows, slots = [], []  # slots: (position, first visual token) of each image in the row
    for j, q in enumerate(query_of):
        head = [cls, *([pad] * (n_visual if q in q_image else 0)), *q_text[q], sep]
        tail = [*([pad] * (n_visual if j in c_image else 0)), *c_text[j], sep]
        rows.append((head, tail))
        row_slots = [(1, q_image[q] * n_visual)] if q in q_image else []
        slots.append(row_slots + ([(len(head), c_image[j] * n_visual)] if j in c_image else []))
    ids, mask = _padded([head + tail for head, tail in rows], pad)
    types = torch.zeros_like(ids)
    visual_index = torch.full(ids.shape, -1, dtype=torch.long)
    for j, ((head, tail), row_slots) in enumerate(zip(rows, slots, strict=True)):
        types[j, len(head):len(head) + len(tail)] = 1
        for position, first in row_slots:
            visual_index[j, position:position + n_visual] = torch.arange(first, first + n_visual)
    images = [queries[q] for q in q_image] + [candidates[j] for j in c_image]
    return Packed({"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "visual_index": visual_index},
                  images)


def gather_rows(table: torch.Tensor, index: torch.Tensor, fill: torch.Tensor | None = None) -> torch.Tensor:
    """``table[index]`` where ``index >= 0``, else ``fill`` (zeros by default): a scatter written as a gather,
    which exports to ONNX with dynamic sizes."""
    gathered = table[index.clamp(min=0)]
    keep = (index >= 0).unsqueeze(-1)
    return torch.where(keep, gathered, fill if fill is not None else torch.zeros((), dtype=table.dtype,
                                                                                  device=table.device))
