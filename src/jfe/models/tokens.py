"""What an encoder exposes about its text side to the service: its tokenizer, and Matryoshka support.

The HTTP layer needs both for OpenAI ``/v1/embeddings`` parity (token-array inputs, real token counts,
``dimensions``) without knowing each architecture: HF models hold ``model.tokenizer``; the tower models
(jfe-mini and the baselines) hold a :class:`~jfe.models.text.TextTower` whose tokenizer is MiniLM's (the
asset's, or a saved model's ``text/``).
"""

from __future__ import annotations

from typing import Any


def tokenizer_of(model: Any) -> Any | None:
    """The model's HF tokenizer (``PreTrainedTokenizerBase``), or ``None`` when it has none (e.g. the toy)."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        return tokenizer
    from jfe.models.text import TextTower

    text = getattr(model, "text", None)
    return text.tokenizer if isinstance(text, TextTower) else None


def supports_matryoshka(model: Any) -> bool:
    """Whether the model was trained so that a prefix of its embedding, renormalised, is itself an embedding."""
    return bool(getattr(model, "matryoshka", False))
