"""One TOML file per training run, validated with pydantic.

``stage = "stage1"`` or ``"stage2"`` fills in that stage's recipe (see :mod:`jfe.train.recipes`); any key
the file sets explicitly wins. Overrides (``--set key=value`` on the command line, or the ``overrides``
dict of :func:`jfe.train.train`) use dotted keys for nested tables (``task_weights.7=2``).
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from jfe.data.folds import HeldOutFold
from jfe.errors import ConfigError
from jfe.models.phases import TrainablePhase

VAL_PREFIX = "val/"  # the trainer's validation scores in metrics.jsonl: "val/R@5", "val/R@5/task7", ...

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


class Phase(BaseModel):
    """A span of steps with one ``set_trainable`` setting. Give ``steps`` or ``fraction`` (of the run's
    steps); the last phase may give neither and takes the remaining steps."""

    model_config = ConfigDict(extra="forbid")
    trainable: TrainablePhase
    steps: int | None = Field(default=None, ge=0)
    fraction: float | None = Field(default=None, ge=0.0, le=1.0)
    lr: float | None = Field(default=None, gt=0, description="peak learning rate in this phase (default: lr)")

    @model_validator(mode="after")
    def _one_length(self) -> Phase:
        if self.steps is not None and self.fraction is not None:
            raise ValueError("a phase takes 'steps' or 'fraction', not both")
        return self


class TrainConfig(BaseModel):
    """Everything one training run needs. Sizes are global (summed over processes)."""

    model_config = ConfigDict(extra="forbid")

    stage: Literal["stage1", "stage2", "rerank", "custom"] = "custom"
    # what to train
    model: str = Field(description="what the run starts from: a registered name, hf:<path>, or a saved model "
                       "folder (e.g. the stage-1 output) -- anything jfe.models.load_model takes")
    model_overrides: dict[str, Any] = Field(default_factory=dict, description="config fields for load_model, "
                                            "checked against the model's arch when the config loads")
    # data
    data: Path = Field(description="M-BEIR-layout dataset root")
    train_split: str = Field(default="train", description="query/<split>/ to train on (M-BEIR's union training "
                             "set: union_train, i.e. query/union_train/mbeir_union_up_train.jsonl)")
    train_pool: list[str] = Field(default_factory=list, description="pool files (relative to data) holding the "
                                  "training candidates; empty = every local then global pool (M-BEIR union "
                                  "training: cand_pool/global/mbeir_union_train_cand_pool.jsonl)")
    val_split: str = "val"
    text_mode: Literal["jfe", "uniir"] = Field(default="jfe", description="query/candidate text formatting: "
                                               "JFE's, or UniIR's exact format_string (to reproduce UniIR)")
    task_weights: dict[int, float] = Field(default_factory=dict,
                                           description="task id -> sampling weight; empty = every task in data")
    instructions: bool = False
    hard_negatives: int = Field(default=0, ge=0, description="negatives per query: from neg_cand_list, or from "
                                "the mined lists when `mined` is set (always for stage rerank)")
    mined: Path | None = Field(default=None, description="the lists `jfe mine` wrote for train_split (hard "
                               "negatives with the retriever's scores): stage rerank trains on them; an encoder "
                               "stage draws its hard_negatives from them instead of neg_cand_list (a query "
                               "without a list keeps its neg_cand_list)")
    # reranking (stage = "rerank", jfe.train.rerank)
    rerank_from: str | None = Field(default=None, description="stage rerank: the trained encoder the reranker "
                                    "`model` (an arch: jfe-mini-rerank, late-fusion-rerank-mini) starts from; "
                                    "None: `model` is a saved reranker to go on training")
    rerank_loss: Literal["listwise", "pointwise"] = Field(default="listwise", description="stage rerank: softmax "
                                                          "over positive + negatives, or per-pair BCE")
    mined_depth: int | None = Field(default=None, ge=1, description="with `mined`: draw negatives from the "
                                    "first N of each mined list (None: all of it)")
    shortlisted_only: bool = Field(default=True, description="stage rerank: train only on queries whose positive "
                                   "the retriever ranks within mined_depth: the lists a reranker reading the top "
                                   "mined_depth will see (a positive the retriever ranked 300th never reaches it)")
    group_size: int = Field(default=1, ge=1, description="queries per base item in a batch (1 = no grouping)")
    single_task_batches: bool = Field(default=False, description="draw every batch from one task (picked by "
                                      "task_weights): in-batch negatives then share the positive's modality, "
                                      "as in M-BEIR's local pools, instead of being told apart by modality alone")
    max_train_queries: int | None = Field(default=None, ge=1)
    held_out_fold: HeldOutFold | None = Field(default=None, description="cross-fitting: leave this fold of "
                                              "train_split's queries out, e.g. { fold = 0, folds = 2 } (folds are cut "
                                              "by base item); recorded in the saved model, so that `jfe mine` lets "
                                              "it rank only that fold")
    # output
    output_dir: Path
    # optimisation
    steps: int = Field(default=200, ge=1)
    batch_size: int = Field(default=32, ge=2)
    lr: float = Field(default=2e-4, gt=0)
    glue_lr: float | None = Field(default=None, gt=0, description="peak lr of the model's new glue weights "
                                  "(projector, heads, fusion layers) in every phase; default: the phase's lr")
    weight_decay: float = Field(default=0.01, ge=0)
    warmup_steps: int = Field(default=10, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    temperature: float = Field(default=0.05, gt=0)
    learnable_temperature: bool = True
    min_temperature: float = Field(default=0.01, gt=0)
    max_temperature: float = Field(default=1.0, gt=0)
    symmetric: bool = True
    matryoshka_dims: list[int] = Field(default_factory=list, description="Matryoshka training: the loss is "
                                       "averaged over these prefix lengths of the vectors (and the full one), each "
                                       "renormalised, so a prefix is a smaller embedding (the service's OpenAI "
                                       "`dimensions`); recorded in the saved model's config. Empty: off")
    phases: list[Phase] = Field(default_factory=lambda: [Phase(trainable="full")])
    grad_cache_chunk: int = Field(default=0, ge=0, description="0 = plain backprop; >0 = GradCache chunk size")
    seed: int = 0
    device: str | None = None
    precision: Literal["auto", "fp32", "bf16"] = Field(default="auto", description="compute precision: bf16 autocast "
                                                      "where the CPU/GPU has native bf16 (auto), or always/never")
    # bookkeeping
    log_every: int = Field(default=10, ge=1)
    val_every: int = Field(default=0, ge=0, description="0 = only at the end")
    val_max_queries: int = Field(default=200, ge=1)
    val_max_pool: int = Field(default=1000, ge=1)
    val_batch_size: int = Field(default=64, ge=1)
    checkpoint_every: int = Field(default=50, ge=1)
    keep_checkpoints: int = Field(default=1, ge=1)
    stop_at_step: int | None = Field(default=None, ge=1,
                                     description="stop after this step as if killed (tests, time boxes)")

    @model_validator(mode="before")
    @classmethod
    def _apply_stage_preset(cls, values: Any) -> Any:
        from jfe.train.recipes import STAGE_PRESETS

        if isinstance(values, dict) and values.get("stage") in STAGE_PRESETS:
            return {**STAGE_PRESETS[values["stage"]], **values}
        return values

    @model_validator(mode="before")
    @classmethod
    def _merge_init(cls, values: Any) -> Any:
        """``init`` (deprecated) once named the checkpoint to start from besides ``model``; both now say
        what the run starts from, so a non-empty ``init`` becomes ``model`` (with a warning)."""
        if not isinstance(values, dict) or "init" not in values:
            return values
        values = dict(values)
        init = values.pop("init")
        if init:
            warnings.warn(f"training config key 'init' is deprecated: write model = {str(init)!r} instead "
                          f"(one field says what the run starts from)", FutureWarning, stacklevel=2)
            values["model"] = init
        return values

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.model_overrides:
            from jfe.models.registry import check_overrides

            check_overrides(self.model, self.model_overrides)  # a ConfigError is a ValueError: pydantic reports it
        if not self.min_temperature <= self.temperature <= self.max_temperature:
            raise ValueError("temperature must lie in [min_temperature, max_temperature]")
        if any(w < 0 for w in self.task_weights.values()) or (self.task_weights and
                                                             sum(self.task_weights.values()) <= 0):
            raise ValueError("task_weights must be non-negative with a positive sum")
        if not self.phases:
            raise ValueError("at least one phase is needed")
        if self.stage == "rerank" and (self.mined is None or self.hard_negatives < 1):
            raise ValueError("stage rerank needs `mined` (from `jfe mine`) and hard_negatives >= 1")
        if self.mined is not None and self.hard_negatives < 1:
            raise ValueError("`mined` lists give hard negatives: set hard_negatives >= 1 (how many per query)")
        return self

    @property
    def start_from(self) -> str:
        """What the run starts from (``model``; kept for callers of the days of a separate ``init``)."""
        return self.model

    def phase_lr(self, index: int) -> float:
        """Peak learning rate of the ``index``-th phase of :meth:`phase_plan`."""
        kept = [p for p, (_, start, end) in zip(self.phases, self._spans(), strict=True) if end > start]
        return kept[index].lr or self.lr

    def _spans(self) -> list[tuple[str, int, int]]:
        spans: list[tuple[str, int, int]] = []
        start = 0
        for i, phase in enumerate(self.phases):
            if i == len(self.phases) - 1:
                end = self.steps
            elif phase.steps is not None:
                end = min(self.steps, start + phase.steps)
            elif phase.fraction is not None:
                end = min(self.steps, start + round(phase.fraction * self.steps))
            else:
                end = self.steps
            spans.append((phase.trainable, start, max(start, end)))
            start = max(start, end)
        return spans

    def phase_plan(self) -> list[tuple[str, int, int]]:
        """``[(trainable, first_step, end_step)]`` with 0-based, end-exclusive steps covering the run
        (phases that get no steps are dropped)."""
        return [span for span in self._spans() if span[2] > span[1]]


def _parse_value(raw: str) -> Any:
    """A ``--set`` value: a TOML literal when it parses as one (numbers, booleans, arrays), else a string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """``["steps=10", "task_weights.7=2"]`` -> ``{"steps": 10, "task_weights.7": 2}``."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        out[key.strip()] = _parse_value(value.strip())
    return out


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """Merge dotted-key overrides into a nested config dict (a new dict; ``raw`` is untouched)."""
    merged = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for key, value in (overrides or {}).items():
        parts = key.split(".")
        node = merged
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = str(value) if isinstance(value, os.PathLike) else value
    return merged


def _read_toml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A TOML config; ``extends = "other.toml"`` (relative to this file) inherits that file's keys, so
    baseline configs can say "the jfe-mini recipe, another model" in two lines."""
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'extends' loops back to itself")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML ({exc})") from None
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: 'extends' must be a file name")
    base = _read_toml(path.parent / parent, (*seen, path.resolve()))
    return {**base, **raw}


def load_config(config: TrainConfig | str | os.PathLike | dict[str, Any],
                overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read and validate a config (a TOML path, a dict or a TrainConfig), applying overrides.

    Relative ``data``/``output_dir``/``model`` paths in a TOML file are taken relative to the
    current directory (where ``jfe`` is run), like every other CLI path.
    """
    source = "<dict>"
    if isinstance(config, TrainConfig):
        raw = config.model_dump(exclude_unset=True)
        raw.setdefault("stage", config.stage)
    elif isinstance(config, dict):
        raw = config
    else:
        path = Path(config)
        source = str(path)
        if not path.exists():
            raise ConfigError(f"config file not found: {path}")
        raw = _read_toml(path)
    raw = apply_overrides(raw, overrides)
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(x) for x in err['loc']) or '<root>'}: {err['msg']}"
                             for err in exc.errors())
        raise ConfigError(f"{source}: invalid training config: {problems}") from None
