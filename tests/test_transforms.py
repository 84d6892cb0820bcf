"""`jfe.models.preprocess(model)`: image preparation in DataLoader workers gives the vectors of raw items."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from torch.utils.data import DataLoader, Dataset

from conftest import SHIPPED_ROOT, drawn_image
from jfe.data.items import Item
from jfe.models import feature_cache, load_model, preprocess
from jfe.models.transforms import Preprocess


class _Items(Dataset):
    def __init__(self, raw: list, prepare: Preprocess) -> None:
        self.raw, self.prepare = raw, prepare

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, index: int) -> Item:
        return self.prepare(self.raw[index])


@pytest.mark.assets
def test_items_prepared_in_dataloader_workers_encode_as_raw_items(tmp_path: Path) -> None:
    model = load_model(SHIPPED_ROOT / "jfe-mini", device="cpu")
    drawn_image(1, (96, 96)).save(tmp_path / "square.png")
    drawn_image(2, (300, 120)).save(tmp_path / "wide.png")                     # padded to a square
    drawn_image(3, (2400, 1800)).save(tmp_path / "large.jpg", quality=90)    # decoded at a reduced scale
    raw = ["a red heart", tmp_path / "square.png", {"text": "the same, but blue", "image": tmp_path / "wide.png"},
           Path(tmp_path / "large.jpg"), drawn_image(4, (50, 70))]
    prepare = preprocess(model)
    assert prepare.image_size == 224
    prepared = prepare(raw[3])
    assert prepared.image.size == (224, 224)  # the worker did the decoding and resizing
    loader = DataLoader(_Items(raw, prepare), batch_size=2, num_workers=2, collate_fn=list)
    with feature_cache.disabled():
        from_workers = np.concatenate([model.encode(batch, precision="fp32") for batch in loader])
        direct = model.encode(raw, precision="fp32")
    np.testing.assert_allclose(from_workers, direct, atol=1e-6)


def test_text_items_pass_through_and_free_size_models_only_decode(tmp_path: Path) -> None:
    drawn_image(5, (90, 40)).save(tmp_path / "a.png")
    free = Preprocess(None)  # hf: MLLMs take any size
    assert free("a cat") == Item(text="a cat")
    item = free({"image": tmp_path / "a.png", "text": "x"})
    assert item.image.size == (90, 40) and item.image.mode == "RGB" and item.text == "x"
