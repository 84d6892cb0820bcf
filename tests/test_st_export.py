"""`jfe export sentence-transformers`: the real sentence-transformers package loads the folder offline and encodes
texts, images and image+text pairs as JFE does (the shipped, trained jfe-mini; nothing mocked)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import SHIPPED_ROOT, drawn_image
from jfe.cli import app
from jfe.errors import ConfigError, DataError
from jfe.models import load_model

pytestmark = pytest.mark.assets


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("st") / "jfe-mini-st"
    result = CliRunner().invoke(app, ["export", "sentence-transformers", str(SHIPPED_ROOT / "jfe-mini"), str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_sentence_transformers_loads_the_export_and_encodes_like_jfe(exported: Path, tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(exported), trust_remote_code=True, local_files_only=True)
    assert model.get_embedding_dimension() == 384
    drawn_image(3).save(tmp_path / "photo.png")
    inputs = ["a red heart", drawn_image(1), {"text": "the same, but blue", "image": drawn_image(2)},
              str(tmp_path / "photo.png"), np.asarray(drawn_image(4))]
    vectors = model.encode(inputs, batch_size=2)  # batches that mix modalities
    jfe_model = load_model(exported / "jfe_model")
    expected = jfe_model.encode(["a red heart", drawn_image(1), {"text": "the same, but blue", "image": drawn_image(2)},
                                 tmp_path / "photo.png", drawn_image(4)], precision="fp32")
    cosine = (vectors * expected).sum(1)
    assert vectors.shape == (5, 384) and cosine.min() >= 0.999, cosine
    assert (vectors[1] @ vectors[3]) < 0.999  # the path was read as its own image, not as text or as image 1
    # a prompt is the JFE instruction
    prompted = model.encode(["a red heart"], prompt="Find an image of: ")
    np.testing.assert_allclose(prompted, jfe_model.encode(["a red heart"], instruction="Find an image of: ",
                                                          precision="fp32"), atol=1e-5)
    assert not np.allclose(prompted, vectors[:1], atol=1e-3)
    scores = model.similarity(vectors[:1], vectors[1:])  # cosine, as the export's config says
    assert scores.shape == (1, 4)


def test_inputs_jfe_cannot_read_are_refused_by_name(exported: Path) -> None:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(exported), trust_remote_code=True, local_files_only=True)
    with pytest.raises(DataError, match="input #1.*chat messages"):
        model.encode(["a cat", [{"role": "user", "content": "hi"}]])
    with pytest.raises(DataError, match="does not download"):
        model.encode(["https://example.com/cat.jpg"])


def test_export_refuses_foreign_folders_and_onnx_models(tmp_path: Path) -> None:
    from jfe.models.onnx_backend import export_onnx
    from jfe.models.st_export import export_sentence_transformers

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    result = CliRunner().invoke(app, ["export", "sentence-transformers", "toy", str(tmp_path / "mine")])
    assert isinstance(result.exception, ConfigError)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    tower = load_model("two-tower-mini", device="cpu", pretrained=False, image_size=64, grid=1)
    onnx_model = load_model(export_onnx(tower, tmp_path / "onnx", source="two-tower-mini"))
    with pytest.raises(ConfigError, match="export the PyTorch model"):
        export_sentence_transformers(onnx_model, tmp_path / "st", source="onnx")
    assert not (tmp_path / "st").exists()
    # an export is JFE's own folder: exported again, it is replaced as a whole
    export_sentence_transformers(tower, tmp_path / "st", source="two-tower-mini")
    export_sentence_transformers(load_model("toy"), tmp_path / "st", source="toy")
    assert load_model(tmp_path / "st" / "jfe_model").arch.startswith("toy")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "onnx", "st"]  # no temporaries left
