"""The encoder interface shared by the one-tower model, the HF MLLM adapter and the baselines.

Every encoder maps a batch of :class:`~jfe.data.items.Item` (text, image, or both) to one
L2-normalised vector each, through the same call for queries and candidates:

* ``embed(items) -> torch.Tensor [n, d]`` — differentiable; what training calls.
* ``encode(items, instruction=None, batch_size=..., progress=...) -> np.ndarray float32 [n, d]`` —
  inference: no grad, batched, optional progress bar.
* ``save_pretrained(dir)`` — ``config.json`` + ``model.safetensors``; ``jfe.models.load_model(dir)`` loads it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from tqdm.auto import tqdm

from jfe.data.folds import HeldOutFold
from jfe.data.items import Item, as_item
from jfe.errors import ConfigError
from jfe.hardware import ComputePrecision
from jfe.models.phases import check_phase
from jfe.paths import ArtefactKind, atomic_dir, fix_modes

FUSION_ROLES = ("one-tower", "two-tower", "late-fusion", "other")
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# a folder holding a config.json is a saved model: save_pretrained replaces only such folders (or empty ones)
MODEL_KIND = ArtefactKind("saved model", (CONFIG_NAME,))


class EncoderConfig(BaseModel):
    """Base config; each architecture subclasses it. ``arch`` selects the class on load."""

    model_config = ConfigDict(extra="forbid")
    arch: str
    embed_dim: int = 384
    #: the prefix lengths a Matryoshka loss trained (``matryoshka_dims`` of the training config; empty: not trained
    #: so): a renormalised prefix of such a model's vector is a usable smaller embedding
    matryoshka_dims: list[int] = []
    #: the fold of a training split this model never trained on (a training config's ``held_out_fold``;
    #: None: no such declaration): ``jfe mine`` lets it rank only that fold's queries (cross-fitting)
    held_out_fold: HeldOutFold | None = None


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Encoder(torch.nn.Module):
    """Abstract base. Subclasses set ``arch``/``config_class`` and implement :meth:`embed`."""

    arch: ClassVar[str] = ""
    config_class: ClassVar[type[EncoderConfig]] = EncoderConfig
    _registry: ClassVar[dict[str, type[Encoder]]] = {}
    # Where this architecture fuses modalities (reports compare by it; declared, never guessed from a name):
    # "one-tower" (one encoder reads image and text tokens together), "two-tower" (separate towers, one vector
    # each, summed), "late-fusion" (separate towers merged by a learned head) or "other".
    fusion_role: ClassVar[str] = "other"
    # "encoder" (embeds items: encode) or "reranker" (scores query-candidate pairs: jfe.models.rerankers)
    kind: ClassVar[str] = "encoder"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # only a class that declares an arch of its own is that arch: a subclass that merely inherits one (a test
        # double, a user's tweak) must not replace the class every load of that arch builds
        if "arch" in cls.__dict__ and cls.arch:
            Encoder._registry[cls.arch] = cls

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config

    @property
    def dim(self) -> int:
        return self.config.embed_dim

    @property
    def image_input_size(self) -> int | None:
        """The side in pixels this model's vision reads (None: it has no fixed one). Image loaders use it to
        decode large photos at a reduced scale that is still at least this size."""
        return None

    @property
    def device(self) -> torch.device:
        try:
            return next(self.parameters()).device
        except StopIteration:
            return torch.device("cpu")

    # --- the one method subclasses must implement -------------------------------------------
    def embed(self, items: Sequence[Item]) -> torch.Tensor:
        """Differentiable ``[len(items), dim]`` L2-normalised embeddings."""
        raise NotImplementedError

    def set_trainable(self, phase: str) -> None:
        """Choose what training updates.

        ``"align"``: only the new glue (projector, modality embeddings, projection heads, fusion layers),
        pretrained towers frozen — LLaVA's feature-alignment step. ``"align+vision"``: the glue and the
        trainable top of the vision tower, the LM still frozen (models that have such a top). ``"full"``:
        everything except towers the config freezes (e.g. a frozen vision tower). Subclasses refine this;
        the default trains all.
        """
        check_phase(phase)
        for param in self.parameters():
            param.requires_grad_(True)

    # --- inference ---------------------------------------------------------------------------
    #: compute precision of :meth:`encode` when the call gives none (``"auto"``/``"fp32"``/``"bf16"``, see
    #: :mod:`jfe.models.precision`): "auto" = bf16 autocast where the hardware has native bf16, else fp32
    precision: str = "auto"
    #: where a vision tower computes when an encode runs in bf16: "fp32" or "follow" (bf16 too); see
    #: :mod:`jfe.models.precision`
    vision_precision: str = "fp32"

    def set_precision(self, precision: str, vision: str | None = None) -> Encoder:
        """Make ``precision`` the default of :meth:`encode` (checked now, resolved per call and device).

        ``vision="follow"`` lets the vision tower run in bf16 too when the encode does (faster cold encodes;
        near-tie rankings move, docs/benchmarks.md); ``"fp32"`` keeps it in fp32; None leaves the setting as is.
        """
        from jfe.models.precision import check_precision, check_vision_precision

        self.precision = check_precision(precision)
        if vision is not None:
            self.vision_precision = check_vision_precision(vision)
        return self

    def vision_follows(self, compute: str) -> bool:
        """Whether an encode computing in ``compute`` runs the vision tower in bf16 as well."""
        return compute == "bf16" and self.vision_precision == "follow"

    def embed_in(self, items: Sequence[Item], vision: ComputePrecision) -> torch.Tensor:
        """:meth:`embed` with the vision tower computing in ``vision`` (resolved by :meth:`encode` and passed
        down as an argument). Models without a separate vision tower run it in the caller's autocast anyway."""
        return self.embed(items)

    @property
    def matryoshka(self) -> bool:
        """Whether the model was trained so that a renormalised prefix of its vectors is an embedding (Matryoshka,
        ``matryoshka_dims`` in its config): the service then honours OpenAI's ``dimensions`` below :attr:`dim`."""
        return bool(self.config.matryoshka_dims)

    #: what computes :meth:`encode`: "torch" here, "onnx" / "openvino" for an exported model
    #: (:mod:`jfe.models.onnx_backend`, :mod:`jfe.models.openvino_backend`)
    backend: ClassVar[str] = "torch"

    def resolve_compute(self, precision: str | None = None) -> tuple[str, ComputePrecision]:
        """``(compute, vision)``: the precision an encode with ``precision`` (default :attr:`precision`) computes
        in on this model's device, and where its vision tower computes."""
        from jfe.models.precision import resolve_precision

        compute = resolve_precision(precision or self.precision, self.device)
        return compute, "bf16" if self.vision_follows(compute) else "fp32"

    def compute_record(self, precision: str | None = None) -> dict[str, str]:
        """How an encode with ``precision`` computes, as an index's ``meta.json`` records it: the backend, the
        resolved precision, and ``vision_precision: bf16`` where the vision tower follows a bf16 encode."""
        compute, vision = self.resolve_compute(precision)
        return {"backend": self.backend, "precision": compute, **({"vision_precision": "bf16"} if vision == "bf16"
                                                                  else {})}

    @torch.no_grad()
    def encode(self, items: Sequence[Any], instruction: str | None = None, batch_size: int = 32,
               progress: bool = False, desc: str = "encode", precision: str | None = None) -> np.ndarray:
        """Embed items (texts, images, image+text pairs, in any mix) as float32 ``[n, dim]``.

        ``instruction`` is prefixed to every item's text (the query side of retrieval). ``precision``
        (default: :attr:`precision`) is the compute precision; vectors come back float32 and unit-norm either way.
        """
        # resolved once for the whole encode; every batch and the vision tower get the resolved values
        compute, vision = self.resolve_compute(precision)
        coerced = [as_item(obj, i) for i, obj in enumerate(items)]
        if instruction:
            coerced = [item.with_instruction(instruction) for item in coerced]
        was_training = self.training
        self.eval()
        out = np.zeros((len(coerced), self.dim), dtype=np.float32)
        # Batches of like items (same modality, similar text length) pad little: on a mixed M-BEIR pool
        # this is ~10-30 % faster; rows are written back in the caller's order.
        try:
            batches = encode_batches(coerced, batch_size)
            for rows in tqdm(batches, desc=desc, unit="batch", disable=not progress or len(coerced) == 0):
                out[rows] = self.encode_batch([coerced[i] for i in rows], compute, vision)
        finally:
            self.train(was_training)
        return out

    def encode_batch(self, items: list[Item], compute: str, vision: ComputePrecision) -> np.ndarray:
        """One batch of :meth:`encode`: float32 unit vectors ``[len(items), dim]`` computed in ``compute``."""
        from jfe.models.precision import autocast

        with autocast(compute, self.device):  # type: ignore[arg-type]  # resolve_compute gives fp32 or bf16
            vectors = self.embed_in(items, vision)
        if compute != "fp32":  # bf16 rounding leaves norms a little off 1: renormalise in fp32
            vectors = l2_normalize(vectors.float())
        return vectors.float().cpu().numpy()

    # --- persistence -------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write ``config.json`` and ``model.safetensors`` atomically (a crash leaves no half folder). An
        existing folder that is not a saved model is refused unless ``overwrite``."""
        return self._save(Path(directory), overwrite)

    def _save(self, directory: Path, overwrite: bool, state: dict[str, torch.Tensor] | None = None,
              metadata: dict[str, str] | None = None) -> Path:
        """:meth:`save_pretrained`, or with ``state`` (a compact form) in place of the state dict and
        ``metadata`` in the weights' header."""
        from safetensors.torch import save_file

        with atomic_dir(directory, MODEL_KIND, overwrite=overwrite) as tmp:
            (tmp / CONFIG_NAME).write_text(json.dumps(self.config.model_dump(), indent=2) + "\n")
            full = state is None  # the model's own weights; a compact form reads its assets from the cache
            if state is None:
                state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={**(metadata or {}), "arch": self.arch})
            fix_modes(tmp, [WEIGHTS_NAME])  # safetensors writes 0600; config.json next to it is 0644
            if full:
                self._save_extra(tmp)
        return directory

    def _save_extra(self, directory: Path) -> None:
        """Hook for files besides config and weights (e.g. a tokenizer)."""

    @classmethod
    def checkpoint_overrides(cls, directory: Path) -> dict[str, Any]:
        """Config values to build this class with when :meth:`load_checkpoint` will then fill it from
        ``directory`` (e.g. skip reading pretrained weights the checkpoint overwrites anyway)."""
        return {}

    def load_checkpoint(self, directory: str | os.PathLike) -> None:
        """Fill this (already built) model from a folder :meth:`save_pretrained` wrote, in place: the one hook
        ``load_model`` and the trainer's resume both use (parameters keep their identity for the optimiser)."""
        load_weights(self, directory, device=self.device)

    def _may_be_missing(self, key: str) -> bool:
        """Keys allowed to be absent from a checkpoint (e.g. non-persistent buffers)."""
        return False


def load_weights(model: torch.nn.Module, folder: str | os.PathLike, device: str | torch.device = "cpu",
                 may_be_missing: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """Load ``folder/model.safetensors`` into ``model`` (every loader's one way to do it); returns the state.

    Keys the checkpoint may leave out (``may_be_missing``, default the model's ``_may_be_missing``: e.g. a
    delta checkpoint's frozen base weights) are allowed; any other missing, unexpected or misshapen weight is
    a :class:`ConfigError` naming the folder.
    """
    from safetensors import safe_open

    from jfe.models.compact import COMPACT_FORMAT, apply_compact

    folder = Path(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.exists():
        raise ConfigError(f"{folder} has a config but no {WEIGHTS_NAME}")
    try:  # one open for the header (the format) and the tensors
        with safe_open(str(weights), "pt", device=str(device)) as handle:
            header = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - not a dict
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise ConfigError(f"{weights}: cannot read the weights ({exc})") from None
    if header.get("format") == COMPACT_FORMAT:
        # what training changed, over the pretrained towers the model was built on (jfe.models.compact)
        if getattr(getattr(model, "config", None), "pretrained", True) is False:
            raise ConfigError(f"{weights} holds compact weights (changes to the pretrained towers), but the model "
                              f"was built without its pretrained towers")
        unexpected, misshapen = apply_compact(model, state)
        if unexpected or misshapen:
            raise ConfigError(f"compact weights in {folder} do not match the config: unexpected={unexpected[:5]}, "
                              f"misshapen={misshapen[:5]}")
        return state
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatch, e.g. an override that changes the architecture
        raise ConfigError(f"weights in {folder} do not fit the config: {str(exc).splitlines()[-1]}") from None
    # `is not None` rather than `or`: mypy keeps None in the type of `optional or <Any>`
    allowed: Callable[[str], bool] = may_be_missing if may_be_missing is not None else \
        getattr(model, "_may_be_missing", lambda key: False)
    missing = [k for k in missing if not allowed(k)]
    if missing or unexpected:
        raise ConfigError(f"weights in {folder} do not match the config: missing={missing[:5]}, "
                          f"unexpected={unexpected[:5]}")
    return state


def l2_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    return torch.nn.functional.normalize(x, p=2, dim=-1, eps=eps)


def compute_of(model: Any) -> dict[str, str]:
    """``model.compute_record()`` at its own precision (backend, resolved precision, vision precision), or {} for
    an encoder-like object without one: what results.json, the eval cache fingerprint and ``/health`` report."""
    record = getattr(model, "compute_record", None)
    return dict(record(getattr(model, "precision", None))) if record is not None else {}


def _length_key(item: Item) -> tuple[bool, bool, int]:
    """Sort key grouping items that pad alike: image or not, text or not, then text length."""
    return item.image is not None, item.text is not None, len(item.text or "")


def encode_batches(items: Sequence[Item], batch_size: int) -> list[list[int]]:
    """The batches :meth:`Encoder.encode` runs ``items`` in, as lists of positions: like items together (modality,
    then text length), ``batch_size`` per batch. Exposed so that an encode split across processes (Ray) can run the
    same batches, and so give the same vectors, under precisions whose results depend on the batch (bf16)."""
    order = sorted(range(len(items)), key=lambda i: _length_key(items[i]))
    return [order[start:start + batch_size] for start in range(0, len(items), batch_size)]
