"""A JFE encoder as a sentence-transformers input module: what ``SentenceTransformer(folder)`` runs for a folder
written by ``jfe export sentence-transformers`` (:func:`jfe.models.st_export.export_sentence_transformers`).

The module takes sentence-transformers' inputs — texts, images (PIL, numpy ``HxWx3`` uint8, or a path to a local
image file, as sentence-transformers detects them) and ``{"text", "image"}`` dicts, mixed in any batch — turns them
into JFE items, and returns the model's unit vectors as ``sentence_embedding``. A prompt (``encode(...,
prompt=...)`` or a named prompt) becomes the JFE instruction. The vectors are computed in fp32 through the model's
``embed`` (what ``jfe.encode(..., precision="fp32")`` returns, to float rounding). Imported by sentence-transformers
itself (``trust_remote_code=True`` lets it import a class outside its own package); needs ``jfe`` installed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sentence_transformers.base.modality import infer_modality
from sentence_transformers.base.modules.input_module import InputModule
from typing_extensions import Self

from jfe.data.items import Item, as_item
from jfe.errors import ConfigError, DataError
from jfe.models.base import Encoder

#: the JFE model's folder inside an export (a saved model: config.json + model.safetensors)
MODEL_SUBDIR = "jfe_model"
MODALITIES: tuple[Any, ...] = ("text", "image", ("image", "text"), "message")


class JFEModule(InputModule):
    """A JFE encoder (any saved JFE model) as a sentence-transformers input module."""

    config_file_name = "jfe_sentence_transformers.json"
    config_keys = ["model_subdir"]
    save_in_root = True

    @property
    def modalities(self) -> list[Any]:
        # ("image", "text") is sentence-transformers' name for {"text", "image"} dicts; "message" what it calls a
        # batch mixing modalities (chat-message dicts themselves are refused in preprocess, by name)
        return list(MODALITIES)

    def __init__(self, model: Encoder | str | os.PathLike, model_subdir: str = MODEL_SUBDIR) -> None:
        """``model``: a loaded JFE encoder, or the folder of a saved one."""
        from jfe.models.registry import load_model

        super().__init__()
        self.model_subdir = model_subdir
        self.model = model if isinstance(model, Encoder) else load_model(Path(model), device="cpu")

    def preprocess(self, inputs: Sequence[Any], prompt: str | None = None, **kwargs: Any) -> dict[str, Any]:
        items = [_item(sample, i) for i, sample in enumerate(inputs)]
        if prompt:
            items = [item.with_instruction(prompt) for item in items]
        # not tensors: sentence-transformers moves only tensors to the device, the model reads the items
        return {"jfe_items": items}

    def forward(self, features: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        features["sentence_embedding"] = self.model.embed(features["jfe_items"]).float()
        return features

    def get_sentence_embedding_dimension(self) -> int:
        return int(self.model.dim)

    def get_embedding_dimension(self) -> int:
        return int(self.model.dim)

    def save(self, output_path: str, *args: Any, safe_serialization: bool = True, **kwargs: Any) -> None:
        self.save_config(output_path)
        self.model.save_pretrained(Path(output_path) / self.model_subdir, overwrite=True)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", token: bool | str | None = None,
             cache_folder: str | None = None, revision: str | None = None, local_files_only: bool = False,
             init_defaults: dict[str, Any] | None = None, **kwargs: Any) -> Self:
        where: dict[str, Any] = {"subfolder": subfolder, "token": token, "cache_folder": cache_folder,
                                 "revision": revision, "local_files_only": local_files_only}
        config = cls.load_config(model_name_or_path, **where)
        folder = cls.load_dir_path(model_name_or_path, **where)
        if folder is None:
            raise ConfigError(f"{model_name_or_path}: no folder found for the JFE module")
        subdir = config.get("model_subdir", MODEL_SUBDIR)
        return cls(Path(folder) / subdir, model_subdir=subdir)


def _item(sample: Any, index: int) -> Item:
    """One sentence-transformers input as a JFE item, following sentence-transformers' reading of it (a string
    naming an existing image file is an image there, where JFE's own ``encode`` reads every string as text)."""
    label = f"input #{index}"
    if isinstance(sample, np.ndarray):
        if sample.ndim != 3 or sample.shape[-1] not in (1, 3, 4):
            raise DataError(f"an image array must be HxWxC (C = 1, 3 or 4), got shape {sample.shape}",
                            record_id=label)
        return Item(image=Image.fromarray(np.asarray(sample, dtype=np.uint8)), id=label)
    modality = infer_modality(sample, supported_modalities=list(MODALITIES))
    if modality == "message":
        raise DataError("chat messages are not an input of a JFE model: pass texts, images or {'text', 'image'} "
                        "dicts", record_id=label)
    if modality == "image" and isinstance(sample, str):
        if not Path(sample).is_file():  # a URL or a data URI: JFE reads local files and never downloads
            raise DataError(f"{sample[:80]!r} is not a local image file (JFE does not download images)",
                            record_id=label)
        return Item(image=Path(sample), id=label)
    return as_item(sample, index)
