"""Two-stage training: losses, configs, data sampling, the trainer, DDP helpers and the ``jfe train`` CLI.

``from jfe.train import train`` is the entry point; the names below load lazily so ``jfe --help`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "train": "jfe.train.run",
    "RerankTrainer": "jfe.train.rerank",
    "Trainer": "jfe.train.trainer",
    "TrainConfig": "jfe.train.config",
    "Phase": "jfe.train.config",
    "load_config": "jfe.train.config",
    "InfoNCELoss": "jfe.train.losses",
    "ContrastiveObjective": "jfe.train.losses",
    "ContrastiveBatch": "jfe.train.losses",
    "false_negative_mask": "jfe.train.losses",
    "STAGE_PRESETS": "jfe.train.recipes",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'jfe.train' has no attribute {name!r}")
