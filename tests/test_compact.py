"""Compact weights (jfe.models.compact): what training changed in the pretrained towers, low-rank and fp16."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from jfe.data.items import Item
from jfe.errors import ConfigError
from jfe.models import load_model
from jfe.models.compact import (
    DELTA_A,
    DELTA_B,
    DELTA_ROWS,
    DELTA_SCALE,
    DELTA_VALUES,
    apply_compact,
    compact_state,
    is_compact,
)
from jfe.models.towers import TowerEncoder

SMALL = {"image_size": 64, "grid": 2, "vision_trainable_modules": 2}


def _items(tmp_path: Path) -> list[Item]:
    from PIL import Image

    paths = []
    for colour in ["red", "green", "blue"]:
        path = tmp_path / f"{colour}.png"
        Image.new("RGB", (64, 64), colour).save(path)
        paths.append(path)
    return [Item(text="a red square"), Item(image=paths[0]), Item(text="the same in green", image=paths[1]),
            Item(text="blue", image=paths[2])]


def _train_a_little(model: TowerEncoder, rank: int, seed: int = 0) -> None:
    """Change the model as training would: the glue anywhere, two tower matrices by a rank-``rank`` update, one
    vision conv and a BatchNorm statistic whole; every other tower tensor stays pretrained."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.projector.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.05)
        query = model.text.bert.encoder.layer[0].attention.self.query.weight
        query.add_(torch.randn(query.shape[0], rank, generator=gen) @ torch.randn(rank, query.shape[1], generator=gen)
                   * 0.01)
        words = model.text.bert.get_input_embeddings().weight
        words.add_(torch.randn(words.shape[0], rank, generator=gen) @ torch.randn(rank, words.shape[1], generator=gen)
                   * 0.01)
        top = [m for m in model.vision.modules() if isinstance(m, torch.nn.BatchNorm2d)][-1]
        top.running_mean.add_(0.1)


def test_a_compact_folder_loads_the_trained_model(tmp_path: Path) -> None:
    model = load_model("jfe-mini", device="cpu", pretrained=False, **SMALL)
    assert isinstance(model, TowerEncoder)
    items = _items(tmp_path)
    pretrained_vectors = model.encode(items, precision="fp32")
    _train_a_little(model, rank=4)
    trained = model.encode(items, precision="fp32")
    assert np.abs(trained - pretrained_vectors).max() > 1e-3  # the change matters to the vectors

    folder = model.save_compact(tmp_path / "compact", rank=8)
    assert is_compact(folder / "model.safetensors")
    full = model.save_pretrained(tmp_path / "full")
    assert not is_compact(full / "model.safetensors")
    # far smaller than the full checkpoint: the untouched tower tensors are not stored at all
    assert (folder / "model.safetensors").stat().st_size * 5 < (full / "model.safetensors").stat().st_size

    loaded = load_model(folder, device="cpu")
    assert loaded.config == model.config
    # fp16 storage: close to the trained model, far from the pretrained one
    np.testing.assert_allclose(loaded.encode(items, precision="fp32"), trained, atol=5e-3)
    cosine = (loaded.encode(items, precision="fp32") * trained).sum(axis=1)
    assert cosine.min() > 0.9999


def _module_of(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    module = torch.nn.Module()
    for key, value in state.items():
        module.register_buffer(key.split(".", 1)[1], value.clone())
    return module


def _strip(compact: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The compact state's keys without the tower prefix (the buffers of :func:`_module_of`)."""
    return {k.split(".", 1)[1]: v for k, v in compact.items()}


def test_compact_state_stores_only_changes() -> None:
    gen = torch.Generator().manual_seed(1)
    base = {"vision.w": torch.randn(512, 256, generator=gen), "vision.same": torch.randn(512, 256, generator=gen),
            "vision.small": torch.randn(8, 8, generator=gen), "vision.steps": torch.tensor(3),
            "glue.w": torch.randn(4, 4, generator=gen)}
    low = torch.randn(512, 2, generator=gen) @ torch.randn(2, 256, generator=gen)
    trained = {"vision.w": base["vision.w"] * (1 - 5e-4) + low, "vision.same": base["vision.same"].clone(),
               "vision.small": base["vision.small"] + 1, "vision.steps": torch.tensor(7),
               "glue.w": base["glue.w"].clone()}
    compact = compact_state(trained, base, ("vision.",), rank=2)
    assert set(compact) == {"vision.w" + DELTA_A, "vision.w" + DELTA_B, "vision.w" + DELTA_SCALE, "vision.small",
                            "vision.steps", "glue.w"}
    assert compact["vision.w" + DELTA_A].shape == (512, 2) and compact["vision.w" + DELTA_A].dtype == torch.float16
    assert compact["vision.steps"].dtype == torch.int64  # integers are kept as they are

    module = _module_of({k: v for k, v in base.items() if k != "glue.w"})
    assert apply_compact(module, _strip({k: v for k, v in compact.items() if k != "glue.w"})) == ([], [])
    # a uniform decay plus a rank-2 change: the scale holds the first, rank-2 factors the second (fp16 precision)
    torch.testing.assert_close(module.w, trained["vision.w"], atol=2e-2, rtol=1e-3)
    assert int(module.steps) == 7
    assert apply_compact(module, {"nope": torch.zeros(1), "small": torch.zeros(3)}) == (["nope"], ["small"])
    with pytest.raises(ValueError, match="rank"):
        compact_state(trained, base, ("vision.",), rank=0)


def test_an_embedding_table_keeps_its_touched_rows_exactly() -> None:
    """Weight decay shrinks every row of a word-embedding table alike and training moves only the rows of the
    tokens it saw: a scale and those rows, not a low-rank guess (whose rank-64 form kept 43 % of such a change)."""
    gen = torch.Generator().manual_seed(2)
    table = torch.randn(3000, 64, generator=gen)
    touched = torch.tensor([3, 17, 2999])
    trained = table * (1 - 4.8e-4)
    trained[touched] += torch.randn(3, 64, generator=gen) * 0.01
    compact = compact_state({"text.emb": trained}, {"text.emb": table}, ("text.",), rank=8)
    assert set(compact) == {"text.emb" + DELTA_SCALE, "text.emb" + DELTA_ROWS, "text.emb" + DELTA_VALUES}
    assert compact["text.emb" + DELTA_ROWS].tolist() == touched.tolist()
    module = _module_of({"text.emb": table})
    assert apply_compact(module, _strip(compact)) == ([], [])
    error = (module.emb - trained).abs()
    assert error.max() < 1e-5  # fp16 holds the small changes of the touched rows; the scale is exact
    bad = {**_strip(compact), "emb" + DELTA_ROWS: torch.tensor([5000])}
    assert apply_compact(_module_of({"text.emb": table}), bad) == ([], ["emb"])


def test_compact_weights_refuse_a_model_without_its_pretrained_towers(tmp_path: Path) -> None:
    from jfe.models.base import load_weights

    model = load_model("two-tower-mini", device="cpu", pretrained=False, **SMALL)
    folder = model.save_compact(tmp_path / "compact")
    bare = type(model)(model.config.model_copy(update={"pretrained": False}))
    with pytest.raises(ConfigError, match="compact weights.*without its pretrained towers"):
        load_weights(bare, folder)


def test_cli_compacts_a_saved_model_and_refuses_what_it_cannot(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from jfe.cli import app

    model = load_model("jfe-mini", device="cpu", pretrained=False, **SMALL)
    assert isinstance(model, TowerEncoder)
    _train_a_little(model, rank=2)
    full = model.save_pretrained(tmp_path / "full")
    runner = CliRunner()
    result = runner.invoke(app, ["models", "compact", str(full), str(tmp_path / "compact"), "--rank", "4"])
    assert result.exit_code == 0, result.output
    assert "MB (the full fp32 weights are" in result.output
    assert is_compact(tmp_path / "compact" / "model.safetensors")
    assert not (tmp_path / "compact" / "text").exists()  # the towers' files come from the asset cache
    items = _items(tmp_path)
    cosine = (load_model(tmp_path / "compact", device="cpu").encode(items, precision="fp32")
              * model.encode(items, precision="fp32")).sum(axis=1)
    assert cosine.min() > 0.9999
    toy = load_model("toy", device="cpu").save_pretrained(tmp_path / "toy")
    refused = runner.invoke(app, ["models", "compact", str(toy), str(tmp_path / "toy-compact")])
    assert isinstance(refused.exception, ConfigError) and "compact form" in str(refused.exception)
    assert not (tmp_path / "toy-compact").exists()
