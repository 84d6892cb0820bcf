"""``jfe.models.preprocess(model)``: the model's image preparation as a transform for users' own DataLoaders, as
open_clip hands out ``preprocess`` beside a model.

    from torch.utils.data import DataLoader, Dataset
    from jfe.models import load_model, preprocess

    model = load_model("jfe-mini")
    prepare = preprocess(model)

    class Photos(Dataset):
        def __init__(self, paths): self.paths = paths
        def __len__(self): return len(self.paths)
        def __getitem__(self, i): return prepare(Path(self.paths[i]))   # runs in a worker

    for batch in DataLoader(Photos(paths), batch_size=64, num_workers=4, collate_fn=list):
        vectors = model.encode(batch)

The transform takes what ``encode`` takes (a text, a ``Path`` or PIL image, an ``{"text", "image"}`` dict, an
Item) and returns an :class:`~jfe.data.items.Item` whose image is decoded (EXIF-upright RGB, large JPEGs at a
reduced scale) and, for models with a fixed input size, padded to a square and resized to it: the work that
otherwise happens inside ``encode``, now in the DataLoader's worker processes. ``encode`` then finds the image at
its size and leaves it as it is, so the vectors are those of the raw items. It is picklable (workers are spawned
or forked with it).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jfe.data.images import load_image
from jfe.data.items import Item, as_item
from jfe.models.base import Encoder
from jfe.models.vision import square_resize


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """What :func:`preprocess` returns: item-like -> Item with its image prepared for a model of input size
    ``image_size`` (None: decoded only, for models that take any size, e.g. ``hf:`` MLLMs)."""

    image_size: int | None

    def __call__(self, obj: Any) -> Item:
        item = as_item(obj)
        if item.image is None:
            return item
        image = load_image(item.image, item_id=item.id, min_side=self.image_size)
        if self.image_size:
            image = square_resize(image, self.image_size)
        return dataclasses.replace(item, image=image)


def preprocess(model: Encoder) -> Preprocess:
    """The transform that prepares items' images for ``model`` (see the module docstring)."""
    return Preprocess(model.image_input_size)
