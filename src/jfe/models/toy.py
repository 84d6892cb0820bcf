"""A tiny, fast, deterministic encoder for tests and examples (no pretrained weights).

Text: hashed bag of words; image: a 4x4 colour thumbnail; both through small linear layers and summed
(so it handles every modality). It is a real trainable :class:`Encoder`, just a weak one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch

from jfe.data.images import load_image
from jfe.data.items import Item
from jfe.models.base import Encoder, EncoderConfig, l2_normalize


class ToyConfig(EncoderConfig):
    arch: str = "toy-hash"
    embed_dim: int = 32
    vocab_buckets: int = 1024
    seed: int = 0


def _bucket(token: str, buckets: int) -> int:
    return int.from_bytes(hashlib.md5(token.encode("utf-8")).digest()[:4], "little") % buckets


class ToyEncoder(Encoder):
    arch = "toy-hash"
    config_class = ToyConfig
    config: ToyConfig

    def __init__(self, config: ToyConfig | None = None) -> None:
        config = config or ToyConfig()
        super().__init__(config)
        generator = torch.Generator().manual_seed(config.seed)
        self.text_table = torch.nn.Parameter(torch.randn(config.vocab_buckets, config.embed_dim,
                                                         generator=generator) * 0.5)
        self.image_proj = torch.nn.Parameter(torch.randn(48, config.embed_dim, generator=generator) * 0.5)

    def _text_features(self, text: str) -> torch.Tensor:
        ids = [_bucket(tok, self.config.vocab_buckets) for tok in text.lower().split()]
        return self.text_table[torch.tensor(ids, device=self.text_table.device)].mean(0)

    def _image_features(self, item: Item) -> torch.Tensor:
        image = load_image(item.required_image, item_id=item.id).resize((4, 4))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).reshape(-1) / 255.0 - 0.5)
        return pixels.to(self.image_proj.device) @ self.image_proj

    def embed(self, items: Sequence[Item]) -> torch.Tensor:
        rows = []
        for item in items:
            modality = item.modality  # raises a clear error on empty items
            vec = torch.zeros(self.config.embed_dim, device=self.text_table.device)
            if "text" in modality:
                vec = vec + self._text_features(item.required_text)
            if "image" in modality:
                vec = vec + self._image_features(item)
            rows.append(vec)
        return l2_normalize(torch.stack(rows))
