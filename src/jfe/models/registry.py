"""Named models, open_clip style: a name maps to an architecture and a config; ``load_model`` resolves

* a registered name (``"jfe-mini"``, ``"two-tower-mini"``, ``"late-fusion-sf-mini"``, ``"late-fusion-ff-mini"``
  and their variants, see :func:`list_models`): its trained weights from the pretrained table
  (:mod:`jfe.models.pretrained`, ``jfe models list``) when it has them, else a fresh model on the
  pretrained towers (glue untrained) with an ``UntrainedModelWarning`` (not for ``toy``/``toy-hash``: a test
  encoder with nothing to train);
* ``"hf:<path>"``: a ``transformers`` MLLM folder through :class:`jfe.models.hf.HFEncoder` (imported lazily);
  ``"hf-rerank:<path>"``: the same MLLM as a yes/no reranker (:class:`jfe.models.hf_rerank.HFReranker`);
* a folder written by ``save_pretrained`` (``config.json`` + ``model.safetensors``).

Keyword overrides change config fields (``load_model("jfe-mini", grid=7, pooling="cls")``); for a saved
folder they may only change what does not alter the weights' shapes.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from pydantic_core import PydanticUndefined

from jfe.errors import ConfigError
from jfe.models.base import CONFIG_NAME, WEIGHTS_NAME, Encoder, default_device

HF_PREFIX = "hf:"
HF_ARCH = "hf-mllm"
HF_RERANK_PREFIX = "hf-rerank:"
HF_RERANK_ARCH = "hf-mllm-rerank"
# arch -> (module, class) of the HF models, imported only when asked for (transformers is heavy)
_HF_CLASSES = {HF_ARCH: ("jfe.models.hf", "HFEncoder"), HF_RERANK_ARCH: ("jfe.models.hf_rerank", "HFReranker")}
_HF_PREFIXES = {HF_PREFIX: HF_ARCH, HF_RERANK_PREFIX: HF_RERANK_ARCH}


def _hf_class(arch: str) -> Any:
    """The HF model class of ``arch`` (its module imported now)."""
    import importlib

    module, name = _HF_CLASSES[arch]
    return getattr(importlib.import_module(module), name)


def _hf_spec(spec: str) -> tuple[str, str] | None:
    """``(arch, model path)`` of a ``hf:`` / ``hf-rerank:`` spec (None: not such a spec)."""
    return next(((arch, spec[len(prefix):]) for prefix, arch in _HF_PREFIXES.items() if spec.startswith(prefix)),
                None)


@dataclass(frozen=True)
class ModelInfo:
    """One registered model name."""

    name: str
    arch: str
    description: str
    config: dict[str, Any] = field(default_factory=dict)
    # False for test encoders (toy-hash): built fresh they are what they are meant to be, so loading one
    # without trained weights is not worth an UntrainedModelWarning
    needs_training: bool = True

    @property
    def embed_dim(self) -> int:
        return int(self.config.get("embed_dim", 384))

    @property
    def fusion_role(self) -> str:
        """Where the model fuses modalities, as its architecture declares (``Encoder.fusion_role``)."""
        return _arch_class(self.arch, f"model {self.name!r}").fusion_role


_MODELS: dict[str, ModelInfo] = {}


def register_model(name: str, arch: str, description: str, *, needs_training: bool = True,
                   **config: Any) -> ModelInfo:
    """Add (or replace) a named config. ``config`` fields override the architecture's defaults;
    ``needs_training=False`` marks a name that is complete untrained (no warning when it loads so)."""
    info = ModelInfo(name, arch, description, dict(config), needs_training=needs_training)
    _MODELS[name] = info
    return info


register_model("jfe-mini", "jfe-mini", "one tower: MobileNetV2 4x4+global visual tokens -> MLP projector -> "
               "MiniLM-L6 over [visual; text] from layer 1, mean pooled")
register_model("jfe-mini-7x7", "jfe-mini", "jfe-mini with the full 7x7 feature map + global token (50 visual tokens)",
               grid=7)
register_model("jfe-mini-2x2", "jfe-mini", "jfe-mini with 2x2 + global visual tokens (fastest)", grid=2)
register_model("jfe-mini-attnpool", "jfe-mini", "jfe-mini with learned attention pooling (starts as the mean)",
               pooling="attention")
register_model("jfe-mini-cls", "jfe-mini", "jfe-mini pooled at the [CLS] token instead of the mean", pooling="cls")
register_model("two-tower-mini", "two-tower-mini", "CLIP-style two towers (MobileNetV2 pool / MiniLM mean) with "
               "projection heads; image+text = normalised sum")
register_model("late-fusion-sf-mini", "late-fusion-sf-mini", "UniIR score fusion: learned weighted sum of the "
               "unimodal embeddings")
register_model("late-fusion-ff-mini", "late-fusion-ff-mini", "UniIR feature fusion: 2-layer transformer over "
               "both towers' output tokens")
register_model("late-fusion-ff-mini-2x2", "late-fusion-ff-mini", "late-fusion-ff-mini over 2x2 + global visual "
               "tokens (the grid the shipped training configs use)", grid=2)
register_model("jfe-mini-rerank", "jfe-mini-rerank", "reranker: query and candidate in ONE sequence through "
               "jfe-mini's towers (early fusion across the pair), correcting a retriever's score")
register_model("late-fusion-rerank-mini", "late-fusion-rerank-mini", "reranker at the same budget with late fusion: an "
               "MLP over the two-tower's query and candidate vectors, correcting its score")
register_model("toy-hash", "toy-hash", "test encoder: hashed bag of words + 4x4 colour thumbnail (no pretrained "
               "weights; fast, weak)", needs_training=False, embed_dim=32)
register_model("toy", "toy-hash", "alias of toy-hash", needs_training=False, embed_dim=32)


def _register_archs() -> None:
    """Import the modules whose classes register themselves with :class:`Encoder`."""
    import jfe.models.baselines  # noqa: F401
    import jfe.models.jfe_mini  # noqa: F401
    import jfe.models.rerankers  # noqa: F401
    import jfe.models.toy  # noqa: F401


def list_models() -> list[ModelInfo]:
    """The registered names (``hf:<path>`` and saved folders are accepted besides these)."""
    return list(_MODELS.values())


def _arch_class(arch: str, what: str) -> type[Encoder]:
    _register_archs()
    if arch in _HF_CLASSES:
        _hf_class(arch)  # its module registers the class
    klass = Encoder._registry.get(arch)
    if klass is None:
        raise ConfigError(f"{what}: unknown model arch {arch!r}; known: {sorted(Encoder._registry)}")
    return klass


def _make_config(klass: type[Encoder], arch: str, config: dict[str, Any], what: str) -> Any:
    try:
        return klass.config_class(**{**config, "arch": arch})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"{what}: invalid config for arch {arch!r}: {problems}") from None


def _build(arch: str, config: dict[str, Any], what: str) -> Encoder:
    klass = _arch_class(arch, what)
    return klass(_make_config(klass, arch, config, what))


def _saved_arch(directory: Path) -> str | None:
    try:
        config = json.loads((directory / CONFIG_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return None  # load_model reports an unreadable config with its own clear error
    return config.get("arch") if isinstance(config, dict) else None


def check_overrides(name_or_path: str | os.PathLike, overrides: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` naming the key and the arch when an override is not a setting of the
    model's config class (for a registered name: or not a valid value), without building the model.

    A folder that does not exist yet (a stage-2 config naming the stage-1 output) cannot be checked here;
    :func:`load_model` checks it when the run starts.
    """
    spec = os.fspath(name_or_path)
    # a saved folder may name no arch; only a registered name has a base config to validate values against
    arch: str | None
    base: dict[str, Any] | None
    hf = _hf_spec(spec)
    if hf:
        arch, base = hf[0], None
    elif spec in _MODELS:
        arch, base = _MODELS[spec].arch, _MODELS[spec].config
    elif (Path(spec) / CONFIG_NAME).is_file():
        arch, base = _saved_arch(Path(spec)), None
    else:
        return
    if arch is None:
        return
    what = f"model_overrides of {spec!r}"
    klass = _arch_class(arch, what)
    fields = set(klass.config_class.model_fields) - {"arch"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(f"{what}: {unknown[0]!r} is not a setting of arch {arch!r} "
                          f"(its settings: {', '.join(sorted(fields))})")
    if base is not None:
        _make_config(klass, arch, {**base, **overrides}, what)


def _load_saved(directory: Path, overrides: dict[str, Any]) -> Encoder:
    try:
        config = json.loads((directory / CONFIG_NAME).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{directory / CONFIG_NAME}: cannot read the model config ({exc})") from None
    if not isinstance(config, dict) or "arch" not in config:
        raise ConfigError(f"{directory / CONFIG_NAME}: not a JFE model config (no 'arch')")
    arch = config.pop("arch")
    if arch in _HF_CLASSES:  # the HF adapter knows how to rebuild its backbone (and adapters) from a folder
        return _hf_class(arch)._from_saved(directory, **overrides)  # type: ignore[no-any-return]
    klass = _arch_class(arch, str(directory))
    build_only = {k: v for k, v in klass.checkpoint_overrides(directory).items() if k not in overrides}
    model = _build(arch, {**config, **build_only, **overrides}, str(directory))
    model.load_checkpoint(directory)
    # how the model was built is not what it is: its config stays the saved one (saved again unchanged)
    model.config = model.config.model_copy(update={k: config.get(k, type(model.config).model_fields[k].default)
                                                  for k in build_only})
    return model


def load_model(name_or_path: str | os.PathLike, device: str | torch.device | None = None,
               pretrained: bool | None = None, *, backend: str | None = None, **config_overrides: Any) -> Encoder:
    """A ready-to-use encoder (in eval mode, on ``device`` or the default device) from a name or a path.

    For a registered name, ``pretrained`` chooses the weights (:mod:`jfe.models.pretrained`): ``None``
    loads the trained entry when the table has one, else builds it untrained and warns (unless the name
    does not need training: ``toy``/``toy-hash``); ``True`` requires the trained entry; ``False`` builds it
    untrained on purpose (training from scratch), without warning.

    ``backend`` (:mod:`jfe.models.onnx_backend`): None runs what the spec is (an ONNX export folder on ONNX
    Runtime, anything else on PyTorch); ``"onnx"`` with a PyTorch model exports it once (fp32, cached) and runs
    that; ``"openvino"`` runs an fp32 export (made the same way from a PyTorch model) with OpenVINO Runtime
    (:mod:`jfe.models.openvino_backend`); ``"torch"`` refuses an ONNX folder.
    """
    from jfe.models.onnx_backend import (
        EXPORT_BACKENDS,
        cached_export,
        check_backend,
        export_cached,
        is_onnx_export,
        load_onnx,
        read_manifest,
    )

    spec = os.fspath(name_or_path)
    backend = check_backend(backend)
    if is_onnx_export(spec):
        if backend == "torch":
            raise ConfigError(f"{spec} is an ONNX export: it runs with backend onnx or openvino (or load the PyTorch "
                              f"model it was exported from, {read_manifest(Path(spec)).source!r})")
        if config_overrides:
            raise ConfigError(f"{spec} is an ONNX export: its settings were fixed at export "
                              f"(got {', '.join(sorted(config_overrides))})")
        manifest = read_manifest(Path(spec))
        runtime = None
        if backend == "openvino":
            from jfe.models.openvino_backend import OpenVinoEncoder

            runtime = OpenVinoEncoder
        return load_onnx(spec, manifest, _arch_class(manifest.arch, spec), runtime=runtime)
    if backend in EXPORT_BACKENDS:
        if _hf_spec(spec):
            raise ConfigError(f"{spec}: the {backend} backend covers the tower models (jfe-mini and the baselines); "
                              f"export an hf: MLLM with Hugging Face optimum, outside JFE")
        # a trained name or a saved folder is identified by its files: a cached export loads without PyTorch weights
        digest = None if config_overrides or pretrained is False else _weights_digest(spec)
        folder = cached_export(spec, digest) if digest else None
        if folder is None:
            folder = export_cached(spec, load_model(spec, "cpu", pretrained, **config_overrides), digest)
        return load_model(folder, backend=backend)
    hf = _hf_spec(spec)
    if hf:
        model: Encoder = _hf_class(hf[0])._from_path(hf[1], device=device, **config_overrides)
    elif spec in _MODELS:
        from jfe.models import pretrained as table

        entry = table.find_pretrained(spec) if pretrained is not False else None
        if entry is not None:
            try:
                model = _load_saved(table.verified_folder(entry), config_overrides)
            except ConfigError as exc:
                raise ConfigError(f"{exc} (model {spec!r} loads its trained weights, {entry.describe()}; "
                                  f"pretrained=False builds it untrained with any overrides)") from None
        elif pretrained:
            raise ConfigError(f"model {spec!r} has no trained weights; trained: "
                              f"{', '.join(table.list_pretrained()) or 'none'} (see `jfe models list`)")
        else:
            info = _MODELS[spec]
            if pretrained is None and info.needs_training:
                table.warn_untrained(spec)
            model = _build(info.arch, {**info.config, **config_overrides}, f"model {spec!r}")
    elif (Path(spec) / CONFIG_NAME).is_file():
        model = _load_saved(Path(spec), config_overrides)
    elif Path(spec).exists():
        raise ConfigError(f"{spec} is not a saved JFE model (no {CONFIG_NAME})")
    else:
        raise ConfigError(f"unknown model {spec!r}: not a registered name ({', '.join(_MODELS)}), "
                          f"not 'hf:<path>', not a saved model folder")
    # an inference model, every weight frozen until training calls set_trainable (as the HF models always were):
    # a vision tower with a trained top is then frozen whole, and the feature cache keeps the whole trunk's output
    # (keyed by all its weights) instead of rerunning the top for every image
    model.requires_grad_(False)
    model.eval()
    return model.to(device or default_device())


def _weights_digest(spec: str) -> str | None:
    """sha256 of what ``spec`` loads, read from files without building it: a trained name's table entry, a saved
    folder's config + weights; None for a name built untrained (only a build can tell)."""
    from jfe.models import pretrained as table

    if spec in _MODELS:
        entry = table.find_pretrained(spec)
        return entry.sha256 if entry is not None else None
    folder = Path(spec)
    if (folder / CONFIG_NAME).is_file() and (folder / WEIGHTS_NAME).is_file():
        digest = hashlib.sha256((folder / CONFIG_NAME).read_bytes())
        digest.update(table.sha256_of(folder / WEIGHTS_NAME).encode())
        return digest.hexdigest()
    return None


def load_reranker(name_or_path: str | os.PathLike, what: str | None = None, **kwargs: Any) -> Any:
    """:func:`load_model` for a place that needs a reranker (``jfe eval --rerank``, ``jfe serve --rerank``, a
    reranker's training run): anything else is a ConfigError naming ``what`` asked for it."""
    from jfe.models.rerankers import require_reranker

    return require_reranker(load_model(name_or_path, **kwargs), what or repr(os.fspath(name_or_path)))


def model_name_of(model: Encoder) -> str:
    """The best available name to reload ``model`` with (``load_model`` accepts it), else its arch."""
    for attr in ("name_or_path", "source", "name"):
        value = getattr(model, attr, None)
        if isinstance(value, (str, os.PathLike)) and str(value):
            return str(value)
    return model.arch or type(model).__name__


def fusion_role_of(spec: str | os.PathLike) -> str:
    """The declared fusion role of a registered name, an arch, ``hf:<path>`` or a saved folder; ``"other"``
    when none of these (reports then treat the run as neither ours nor a baseline)."""
    spec = os.fspath(spec)
    hf = _hf_spec(spec)
    if hf:
        return _arch_class(hf[0], spec).fusion_role
    if spec in _MODELS:
        return _MODELS[spec].fusion_role
    arch = _saved_arch(Path(spec)) if (Path(spec) / CONFIG_NAME).is_file() else spec
    try:
        return _arch_class(arch, spec).fusion_role if arch else "other"
    except ConfigError:
        return "other"


def default_config(arch: str) -> dict[str, Any]:
    """The config an arch gets when nothing overrides it (``{}`` for an unknown arch)."""
    try:
        klass = _arch_class(arch, arch)
    except ConfigError:
        return {}
    return {name: f.default for name, f in klass.config_class.model_fields.items()
            if not f.exclude and f.default is not PydanticUndefined}
