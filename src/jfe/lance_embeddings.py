"""JFE models in LanceDB's embedding registry: a LanceDB table that embeds its own rows and queries.

    import lancedb
    from lancedb.embeddings import get_registry
    from lancedb.pydantic import LanceModel, Vector

    import jfe.lance_embeddings  # registers "jfe"

    embed = get_registry().get("jfe").create(model="jfe-mini", source="image")

    class Photo(LanceModel):
        image: str = embed.SourceField()               # image paths (source="text": texts)
        vector: Vector(embed.ndims()) = embed.VectorField()

    table = lancedb.connect("runs/photos.lancedb").create_table("photos", schema=Photo)
    table.add([{"image": "cat.png"}, {"image": "dog.png"}])  # embedded by JFE on the way in
    table.search("a cat wearing a hat").limit(5).to_list()   # the query too (text, a PIL image, or a dict)

The source column's modality is declared (``source``), not guessed: a string there is a text or an image path as
declared. Queries are read as ``jfe.encode`` reads items (a string is text, a PIL image or ``Path`` an image,
``{"text", "image"}`` both), with ``instruction`` prefixed. The model (any name or folder ``load_model`` takes,
``backend`` and ``precision`` as everywhere) loads once per process, at the first embedding. LanceDB stores these
settings in the table's schema, so a table reopened later embeds its queries the same way (after
``import jfe.lance_embeddings``). Needs the ``lancedb`` extra.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
from lancedb.embeddings import EmbeddingFunction, register
from pydantic import PrivateAttr

from jfe.data.items import Item, as_item
from jfe.models.base import Encoder

REGISTRY_NAME = "jfe"


@cache
def _encoder(model: str, backend: str | None) -> Encoder:
    from jfe.models.registry import load_model

    return load_model(model, backend=backend)


@register(REGISTRY_NAME)
class JFEEmbeddings(EmbeddingFunction):
    """A JFE encoder as a LanceDB embedding function (see the module docstring)."""

    model: str = "jfe-mini"
    source: Literal["text", "image"] = "text"
    instruction: str | None = None
    backend: str | None = None
    precision: str = "auto"
    batch_size: int = 64
    max_retries: int = 0  # LanceDB retries API calls with back-off; a local model's errors are final
    _dim: int | None = PrivateAttr(default=None)

    @property
    def encoder(self) -> Encoder:
        return _encoder(self.model, self.backend)

    def ndims(self) -> int:
        if self._dim is None:
            self._dim = int(self.encoder.dim)
        return self._dim

    # LanceDB declares these as (*args, **kwargs) and calls them with the column / the query first, as here
    def compute_source_embeddings(self, inputs: Any, *args: Any, **kwargs: Any  # type: ignore[override]
                                  ) -> list[np.ndarray]:
        values = self.sanitize_input(inputs)
        if self.source == "image":  # a path (or the image's bytes)
            items = [Item(image=Path(v) if isinstance(v, str) else v, id=f"added row #{i}")
                     for i, v in enumerate(values)]
        else:
            items = [Item(text=v, id=f"added row #{i}") for i, v in enumerate(values)]
        return list(self._encode(items, instruction=None))

    def compute_query_embeddings(self, query: Any, *args: Any, **kwargs: Any  # type: ignore[override]
                                 ) -> list[np.ndarray]:
        return list(self._encode([as_item(query, 0)], instruction=self.instruction))

    def _encode(self, items: list[Item], instruction: str | None) -> np.ndarray:
        return self.encoder.encode(items, instruction=instruction, batch_size=self.batch_size,
                                   precision=self.precision)
