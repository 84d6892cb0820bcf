"""The names of what a training phase unfreezes, in one torch-free place: the encoders act on them
(:meth:`jfe.models.base.Encoder.set_phase`) and the training config validates against them without
loading torch.

* ``align``: the glue only (projector, heads): LLaVA's feature alignment, LM and vision frozen;
* ``align+vision``: the glue and the top of the vision tower (``vision_trainable_modules``), LM frozen;
* ``full``: everything the model lets train.
"""

from __future__ import annotations

from typing import Literal, get_args

from jfe.errors import ConfigError

TrainablePhase = Literal["align", "align+vision", "full"]
PHASES: tuple[str, ...] = get_args(TrainablePhase)


def check_phase(phase: str) -> str:
    """``phase`` when it is one of :data:`PHASES`, else a ConfigError listing them."""
    if phase not in PHASES:
        raise ConfigError(f"unknown training phase {phase!r} (expected one of {', '.join(map(repr, PHASES))})")
    return phase
