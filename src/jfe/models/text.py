"""The text tower / language model: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) through ``transformers``.

Loaded offline from the fetched asset (:func:`jfe.data.assets.minilm_dir`). The tokenizer is loaded once
per process and shared; tokenisation is batched (the fast Rust tokenizer), never per item.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # transformers is imported lazily at run time (it is slow to import)
    from transformers import PreTrainedModel

HIDDEN = 384


def _minilm_path(path: str | Path | None) -> str:
    if path is not None:
        return str(path)
    from jfe.data.assets import minilm_dir

    return str(minilm_dir())


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str | None = None):  # noqa: ANN201 - a transformers fast tokenizer
    """The MiniLM WordPiece tokenizer (cached per process)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_minilm_path(path), use_fast=True)


def load_text_model(pretrained: bool = True, path: str | Path | None = None) -> PreTrainedModel:
    """MiniLM as a ``transformers`` ``BertModel`` (no pooler); ``pretrained=False`` gives random weights
    of the same shape (its config still comes from the asset).

    The pretrained model is read from disk once per process and copied for every further model (several
    models in one process -- an evaluation of baselines, the tests -- load in milliseconds, not seconds).
    """
    if pretrained:
        return copy.deepcopy(_pristine_text_model(_minilm_path(path)))
    return _read_text_model(False, path)


@functools.lru_cache(maxsize=2)
def _pristine_text_model(path: str) -> PreTrainedModel:
    return _read_text_model(True, path).eval()


def _read_text_model(pretrained: bool, path: str | Path | None) -> PreTrainedModel:
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging as hf_logging

    where = _minilm_path(path)
    # the checkpoint's unused pooler weights would print a load report and a progress bar on every load
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        if pretrained:
            model = AutoModel.from_pretrained(where, add_pooling_layer=False, attn_implementation="sdpa")
        else:
            config = AutoConfig.from_pretrained(where)
            config._attn_implementation = "sdpa"
            model = AutoModel.from_config(config, add_pooling_layer=False)
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    return model


def tokenize(texts: Sequence[str], max_tokens: int, path: str | None = None) -> list[list[int]]:
    """WordPiece ids of each text, without special tokens, truncated to ``max_tokens`` (one batched call)."""
    if not texts:
        return []
    tokenizer = load_tokenizer(path)
    return tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=max_tokens,
                     return_attention_mask=False, return_token_type_ids=False)["input_ids"]


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden [n, L, d]`` over positions where ``mask [n, L]`` is 1 (sentence-transformers pooling)."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)


class TextTower(nn.Module):
    """MiniLM over ``[CLS] text [SEP]``: per-token states and the mean-pooled sentence vector.

    ``path``: a folder with MiniLM's config and tokenizer (a saved model's ``text/``); default the fetched
    asset. With ``pretrained=False`` only the config and the tokenizer are read from it, so a saved model that
    ships them loads without the asset cache.
    """

    def __init__(self, max_tokens: int = 64, pretrained: bool = True, path: str | Path | None = None) -> None:
        super().__init__()
        self.max_tokens = max_tokens
        self.path = str(path) if path is not None else None
        self.bert = load_text_model(pretrained, self.path)

    @property
    def tokenizer(self):  # noqa: ANN201 - a transformers fast tokenizer
        return load_tokenizer(getattr(self, "path", None))

    @property
    def special_ids(self) -> tuple[int, int, int]:
        """``(cls, sep, pad)`` token ids."""
        tok = self.tokenizer
        return tok.cls_token_id, tok.sep_token_id, tok.pad_token_id

    def tokenize(self, texts: Sequence[str], max_tokens: int | None = None) -> list[list[int]]:
        """WordPiece ids without special tokens, truncated to ``max_tokens`` (default: the tower's)."""
        return tokenize(texts, self.max_tokens if max_tokens is None else max_tokens, self.path)

    def save_assets(self, directory: Path) -> None:
        """MiniLM's config and tokenizer files into ``directory``: all a saved model needs besides its weights."""
        directory.mkdir(parents=True, exist_ok=True)
        self.bert.config.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)

    def batch(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ``(input_ids, attention_mask)`` for ``[CLS] text [SEP]`` sequences."""
        cls, sep, pad = self.special_ids
        rows = [[cls, *ids, sep] for ids in self.tokenize(texts)]
        width = max(len(r) for r in rows)
        embeddings = self.bert.get_input_embeddings()
        assert isinstance(embeddings, nn.Embedding), "BERT's input embeddings are a lookup table"
        device = embeddings.weight.device
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = 1
        return ids.to(device), mask.to(device)

    def forward(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token states ``[n, L, 384]`` and the attention mask ``[n, L]``."""
        ids, mask = self.batch(texts)
        return self.bert(input_ids=ids, attention_mask=mask).last_hidden_state, mask

    def sentence(self, texts: Sequence[str]) -> torch.Tensor:
        """Mean-pooled sentence vectors ``[n, 384]`` (not normalised)."""
        states, mask = self(texts)
        return mean_pool(states, mask)
