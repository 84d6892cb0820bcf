"""The two training stages as presets of :class:`~jfe.train.config.TrainConfig`.

A config with ``stage = "stage1"`` or ``"stage2"`` starts from these values; anything the file sets wins.
Baselines use the very same presets (only ``model`` differs), so every model gets the same recipe and
budget.

* **Stage 1, post-training adaptation** (docs/training.md): contrastive image<->caption pairs (M-BEIR tasks 0
  and 3) and text<->text pairs (task 1), no instructions, in-batch negatives, symmetric loss, all through
  the one tower. It opens with a feature-alignment phase (``set_trainable("align")``: projector / heads
  trained, pretrained towers frozen, LLaVA's first step), then trains everything (``"full"``).
* **Stage 2, instruction tuning**: every task type in the data, instruction-prefixed queries (a random
  variant per draw, from the seeded sampler), one hard negative per query from ``neg_cand_list``, batches
  grouped by base item so in-batch negatives are hard, starting from the stage-1 checkpoint.

Both stages draw each batch from a single task, so in-batch negatives share the positive's modality (mixed
batches let the one tower lower the loss by separating modalities, which collapsed its image embeddings).
"""

from __future__ import annotations

from typing import Any

STAGE1_TASKS: dict[int, float] = {0: 1.0, 3: 1.0, 1: 1.0}

STAGE_PRESETS: dict[str, dict[str, Any]] = {
    "stage1": {
        "task_weights": dict(STAGE1_TASKS),
        "instructions": False,
        "hard_negatives": 0,
        "group_size": 1,
        "single_task_batches": True,
        "symmetric": True,
        "phases": [{"trainable": "align", "fraction": 0.3}, {"trainable": "full"}],
    },
    "stage2": {
        "task_weights": {},  # every task found in the training split, equally
        "instructions": True,
        "hard_negatives": 1,
        "group_size": 4,
        "single_task_batches": True,
        "symmetric": True,
        "phases": [{"trainable": "full"}],
    },
    # a reranker (jfe.train.rerank): each query's positive against 7 negatives drawn from its mined list,
    # instruction-prefixed as the retriever's queries were
    "rerank": {
        "instructions": True,
        "hard_negatives": 7,
        "group_size": 1,
        "single_task_batches": False,
        "learnable_temperature": False,
        "phases": [{"trainable": "full"}],
    },
}


def describe(stage: str) -> str:
    """One line per preset key, for ``jfe train --help``-style listings and docs."""
    preset = STAGE_PRESETS.get(stage)
    if preset is None:
        return f"{stage}: no preset (every key comes from the config)"
    return "\n".join(f"{stage}.{key} = {value!r}" for key, value in preset.items())
