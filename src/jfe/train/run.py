"""``train(config)``: one training run of any stage, with the trainer its stage needs (encoders:
:class:`jfe.train.trainer.Trainer`; ``stage = "rerank"``: :class:`jfe.train.rerank.RerankTrainer`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jfe.train.config import TrainConfig, load_config
from jfe.train.rerank import RerankTrainer
from jfe.train.trainer import Trainer


def train(config: TrainConfig | str | Path | dict[str, Any], overrides: dict[str, Any] | None = None,
          resume: bool = False, progress: bool = True) -> Path:
    """Run one training stage; returns the final checkpoint folder (a ``save_pretrained`` model).

    ``config`` is a TOML path, a dict or a :class:`TrainConfig`; ``overrides`` uses dotted keys
    (``{"steps": 50, "task_weights.7": 2.0}``). Under torchrun every rank calls this; rank 0 writes.
    """
    cfg = load_config(config, overrides)
    trainer = RerankTrainer(cfg) if cfg.stage == "rerank" else Trainer(cfg)
    try:
        return trainer.run(resume=resume, progress=progress)
    finally:
        trainer.ctx.shutdown()
