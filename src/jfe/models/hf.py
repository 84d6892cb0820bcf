"""A Hugging Face multimodal LM (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, ...) as a one-tower JFE encoder (arch ``hf-mllm``).

Every item — text, image, or image+text — becomes one chat-template prompt::

    [system] user: [<image>] [instruction + text] [embed_prompt]  [assistant header]

and the vector is the last layer's hidden state at the LAST REAL token (found from the attention mask, so
it is right under left and right padding), L2-normalised. Text-only items carry no image tokens.

Model families differ in how an image enters the prompt; :data:`ADAPTERS` holds one small entry per
``model_type``. The Qwen2-VL family (and Qwen3-VL) is handled natively (tokenizer + image processor, image placeholders
expanded here, M-RoPE inputs built here), which also works where ``torchvision`` — needed by their
video processor and hence by ``AutoProcessor`` — is not installed. Other ``AutoModelForImageTextToText``
models go through their ``AutoProcessor``.

Persistence: ``save_pretrained(dir)`` writes ``config.json`` + ``model.safetensors`` (JFE's contract),
``backbone/`` (the HF config, tokenizer, image processor and chat template, no weights) and, with LoRA, the
standard PEFT adapter files ``adapter_config.json`` + ``adapter_model.safetensors`` (written by peft's own
``save_pretrained``, keyed for the full ``...ForConditionalGeneration`` model, so
``peft.PeftModel.from_pretrained(base, dir)`` loads them). ``model.safetensors`` holds either a *delta* —
whatever a phase made trainable besides LoRA (e.g. the projector after an ``align`` phase; empty for a
LoRA-only run), applied on top of the base model at ``model_path``. After full fine-tuning ``backbone/`` holds
every weight as a complete Hugging Face checkpoint (LM head restored), which ``AutoModelForImageTextToText`` loads
too, and ``model.safetensors`` is empty. Checkpoints of the older layout (LoRA weights inside
``model.safetensors``, no adapter files) still load.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import ValidationError

from jfe.data.items import Item
from jfe.errors import ConfigError, DataError
from jfe.models.base import (
    CONFIG_NAME,
    MODEL_KIND,
    WEIGHTS_NAME,
    Encoder,
    EncoderConfig,
    default_device,
    l2_normalize,
)
from jfe.models.phases import check_phase
from jfe.paths import atomic_dir, fix_modes

BACKBONE_DIR = "backbone"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
ADAPTER_CONFIG_NAME = "adapter_config.json"  # peft's file names (peft.utils.constants)
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
LORA_FIELDS = ("lora_r", "lora_alpha", "lora_dropout", "target_modules")


class HFConfig(EncoderConfig):
    """Options of :class:`HFEncoder`. ``embed_dim`` is filled in from the backbone's hidden size."""

    arch: str = "hf-mllm"
    embed_dim: int = 0
    model_path: str
    """A local folder (``/models/Qwen2-VL-2B-Instruct``) or, where the user has network, a hub id."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """``auto``: bfloat16 on CUDA, float32 on CPU."""
    padding_side: Literal["left", "right"] = "left"
    system_prompt: str | None = None
    """None: the chat template's default (Qwen2-VL adds "You are a helpful assistant."); any string, even "",
    is sent as an explicit system turn."""
    embed_prompt: str | None = None
    """Text appended after the item in the user turn, e.g. ``"\\nSummarize the above in one word:"`` (E5-V)."""
    add_generation_prompt: bool = True
    pooling: Literal["last", "mean"] = "last"
    max_text_tokens: int | None = 512
    """Item texts longer than this (in tokens) are cut, so one long document cannot blow up a batch."""
    min_pixels: int | None = None
    max_pixels: int | None = None
    """Qwen-style image budget per image (pixels); None keeps the image processor's setting."""
    lora_r: int = 0
    """0: no LoRA. >0: inject LoRA adapters of this rank (``peft``) into ``target_modules``."""
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: list[str] | str = ["q_proj", "k_proj", "v_proj", "o_proj"]
    """Module-name suffixes, or one regex over full module names (peft semantics)."""
    gradient_checkpointing: bool = False
    attn_implementation: str | None = None
    """e.g. ``"sdpa"`` or ``"flash_attention_2"``; None lets transformers choose."""
    trust_remote_code: bool = False
    local_files_only: bool = False
    weights: Literal["delta", "full"] = "delta"
    """Written by ``save_pretrained``: what ``model.safetensors`` holds (see the module docstring)."""


@dataclass(frozen=True)
class ModelAdapter:
    """What differs between MLLM families: prompt placeholders, image inputs, the projector's name.

    ``native=True``: JFE expands ``image_token`` to one token per merged vision patch itself (Qwen2-VL
    style, using the image processor's ``image_grid_thw`` and ``merge_size``). ``native=False``: the
    model's ``AutoProcessor`` turns prompts + images into inputs.
    """

    name: str
    native: bool
    image_token: str | None = None
    reserved_tokens: tuple[str, ...] = ()
    projector_patterns: tuple[str, ...] = ("multi_modal_projector", "mm_projector", "connector", "projector")
    mm_token_type_ids: bool = False
    #: the processor takes one list of images per prompt (``images=[[], [img]]``), not one flat list: with a flat
    #: list, Gemma3's and mllama's processors cannot tell which prompt an image belongs to in a batch mixing text-only
    #: and image items
    images_per_prompt: bool = False
    #: text-only items run in a forward pass of their own: mllama skips its cross-attention layers when a batch has
    #: no image but runs them (masked, not to the same numbers) for a text row beside images
    text_apart: bool = False
    #: every prompt needs an image (PaliGemma's processor has no text-only form): text-only items are refused by name
    image_required: bool = False


QWEN2_VL = ModelAdapter(
    name="qwen2-vl", native=True, image_token="<|image_pad|>",
    reserved_tokens=("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"),
    projector_patterns=("visual.merger",), mm_token_type_ids=True,
)
GENERIC = ModelAdapter(name="generic", native=False)

#: ``model_type`` -> adapter. Unknown types fall back to :data:`GENERIC` (their own processor).
PER_PROMPT = ModelAdapter(name="images-per-prompt", native=False, images_per_prompt=True)
MLLAMA = ModelAdapter(name="mllama", native=False, images_per_prompt=True, text_apart=True)
PALIGEMMA = ModelAdapter(name="paligemma", native=False, image_required=True)

# Qwen3-VL takes the same inputs (image placeholders expanded per merged patch, M-RoPE from mm_token_type_ids); its
# AutoProcessor would need torchvision, the native path does not
ADAPTERS: dict[str, ModelAdapter] = {"qwen2_vl": QWEN2_VL, "qwen2_5_vl": QWEN2_VL, "qwen3_vl": QWEN2_VL,
                                     "gemma3": PER_PROMPT, "mllama": MLLAMA,
                                     "paligemma": PALIGEMMA}


def adapter_for(model_type: str) -> ModelAdapter:
    return ADAPTERS.get(model_type, GENERIC)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` means bfloat16 on CUDA (where supported) and float32 elsewhere."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token: the highest position whose mask is 1 (any padding side)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * (positions + 1)).argmax(dim=1)


def last_token_states(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Each row's hidden state at its last real token, as float32."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, last_token_index(attention_mask.to(hidden.device))].float()


def _saved_adapter(directory: Path, saved: dict[str, Any], overrides: dict[str, Any],
                   state: dict[str, torch.Tensor]) -> Path | None:
    """The folder to load a PEFT adapter from (``directory`` if it holds one), after checking the layouts.

    * adapter files present: LoRA comes from them; overrides may not change its shape;
    * LoRA keys inside ``model.safetensors`` (the older layout): a fresh adapter is injected from the saved
      ``lora_*`` fields and those keys are loaded into it (None here);
    * neither, although the saved config has ``lora_r > 0``: the checkpoint lost its adapter.
    """
    has_files = (directory / ADAPTER_CONFIG_NAME).is_file()
    if has_files != (directory / ADAPTER_WEIGHTS_NAME).is_file():
        raise ConfigError(f"{directory} has one of {ADAPTER_CONFIG_NAME} / {ADAPTER_WEIGHTS_NAME} but not the "
                          f"other: the LoRA adapter is incomplete")
    legacy = any("lora_" in key for key in state)
    if has_files and legacy:
        raise ConfigError(f"{directory} holds LoRA weights both in {WEIGHTS_NAME} and in {ADAPTER_WEIGHTS_NAME}")
    if not has_files:
        if saved.get("lora_r", 0) > 0 and not legacy:
            raise ConfigError(f"{directory}/{CONFIG_NAME} says lora_r={saved['lora_r']} but the folder holds no "
                              f"LoRA adapter ({ADAPTER_WEIGHTS_NAME} is missing)")
        return None
    changed = [k for k in LORA_FIELDS if k in overrides and overrides[k] != saved.get(k)]
    if changed:
        raise ConfigError(f"{directory} holds a trained LoRA adapter; its {', '.join(changed)} cannot be "
                          f"overridden (train a new adapter from the base model instead)")
    return directory


LM_HEAD_KEY = "lm_head.weight"


def _lm_head_file(folder: str) -> tuple[str, str] | None:
    """The safetensors file of ``folder`` holding the LM head's weight, and its key there (``lm_head.weight``, or a
    prefixed one such as mllama's ``language_model.lm_head.weight``); None: not a local folder, or tied weights,
    which HF checkpoints omit."""
    local = Path(folder).expanduser()
    index = local / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text()).get("weight_map", {})
        found = [key for key in weight_map if key == LM_HEAD_KEY or key.endswith("." + LM_HEAD_KEY)]
        return (str(local / weight_map[found[0]]), found[0]) if found else None
    single = local / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), "pt") as handle:
            keys = list(handle.keys())  # a safetensors handle is not a mapping
        found = [key for key in keys if key == LM_HEAD_KEY or key.endswith("." + LM_HEAD_KEY)]
        return (str(single), found[0]) if found else None
    return None


def _looks_local(path: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else is meant as a folder on disk.
    return path.startswith(("/", ".", "~")) or path.count("/") > 1 or Path(path).expanduser().exists()


class HFEncoder(Encoder):
    """One-tower encoder over a ``transformers`` multimodal LM. Build it with ``jfe.models.load_model("hf:<path>")``.

    Parameters start frozen (an inference model); training code calls :meth:`set_trainable`.
    """

    arch = "hf-mllm"
    fusion_role = "one-tower"
    config_class = HFConfig
    # The config is always an HFConfig (the constructor takes one); declared so its fields type-check.
    config: HFConfig
    # A peft.PeftModel, or None without LoRA. Kept in __dict__, not _modules (see __init__); declared here
    # because torch's Module.__getattr__ would otherwise type it as Tensor | Module.
    _peft: Any | None

    def __init__(self, config: HFConfig, device: str | torch.device | None = None, *,
                 source: str | os.PathLike | None = None, pretrained_weights: bool = True,
                 adapter_from: str | os.PathLike | None = None, weights_from: str | os.PathLike | None = None) -> None:
        """Load the backbone named by ``config.model_path``.

        ``source`` reads the HF config and processor files from another folder (a saved ``backbone/``);
        ``pretrained_weights=False`` builds the architecture without loading weights (a full checkpoint
        is loaded on top afterwards); ``weights_from`` reads the weights from another folder than ``model_path``
        (a full fine-tune's ``backbone/``); ``adapter_from`` loads a saved PEFT LoRA adapter from that folder
        instead of injecting a fresh one.
        """
        super().__init__(config)
        self._device = torch.device(device) if device is not None else default_device()
        self._dtype = resolve_dtype(config.dtype, self._device)
        source = str(source) if source is not None else config.model_path
        hf_config = self._hf_config = self._load_hf_config(source)
        self.adapter = adapter_for(hf_config.model_type)
        self._load_processing(source)
        loaded_from = str(weights_from or config.model_path) if pretrained_weights else None
        full = self._load_backbone(loaded_from, hf_config)
        # Embeddings need hidden states, not logits: the LM head (545M weights on Qwen2-VL-7B) is dropped,
        # but the full model is kept as the root that peft wraps, so adapter files carry its key names; where its
        # weights live is remembered, so a full fine-tune can be saved as a complete HF checkpoint (head restored)
        self._weights_folder = loaded_from
        self._keep_from_lm_head(full)
        if isinstance(getattr(full, "lm_head", None), torch.nn.Module):
            full.lm_head = torch.nn.Identity()
        self.__dict__["_root"] = full  # not a submodule: its modules are the backbone's
        full.requires_grad_(False)
        self._lora_names: set[str] = set()
        # Not a registered submodule: its modules are the backbone's, and state_dict() must not repeat them.
        self.__dict__["_peft"] = self._wrap_lora(full, adapter_from) if (config.lora_r > 0 or adapter_from) \
            else None
        inner = getattr(full, "model", None)
        self.backbone = inner if isinstance(inner, torch.nn.Module) else full
        self._collect_lora_names()
        # Parameters that a training phase has unfrozen are saved in the delta checkpoint.
        self._touched: set[str] = set(self._lora_names)
        hidden = self._hidden_size(hf_config)
        self.config = config.model_copy(update={"embed_dim": hidden})
        self.to(self._device)
        self.eval()

    # --- construction ------------------------------------------------------------------------
    def _keep_from_lm_head(self, full: torch.nn.Module) -> None:
        """Called once before the LM head is dropped: an encoder needs none of it (a reranker keeps two rows)."""

    def _hub_kwargs(self) -> dict[str, Any]:
        return {"trust_remote_code": self.config.trust_remote_code, "local_files_only": self.config.local_files_only}

    def _load_hf_config(self, source: str) -> Any:
        from transformers import AutoConfig

        if _looks_local(source) and not Path(source).expanduser().is_dir():
            raise ConfigError(f"model folder {source} does not exist")
        try:
            return AutoConfig.from_pretrained(os.path.expanduser(source), **self._hub_kwargs())
        except (OSError, ValueError) as exc:
            where = "folder" if _looks_local(source) else "hub model (needs network, or a local folder)"
            raise ConfigError(f"cannot load the {where} {source!r}: {exc}") from exc

    def _load_processing(self, source: str) -> None:
        """Tokenizer, image processor and chat template (natively), or the model's AutoProcessor."""
        from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

        source = os.path.expanduser(source)
        # Non-native adapters use the model's AutoProcessor; native ones a tokenizer + image processor.
        self.processor: Any | None = None
        self.image_processor: Any | None
        self._reserved: tuple[str, ...]
        if not self.adapter.native:
            try:
                self.processor = AutoProcessor.from_pretrained(source, **self._hub_kwargs())
            except Exception as exc:  # noqa: BLE001 - transformers raises many kinds here
                if "torchvision" in str(exc).lower():
                    # SmolVLM, InternVL and other processors import torchvision, which PyPI builds against
                    # another torch than this one: say so, instead of a bare ImportError from deep inside
                    raise ConfigError(
                        f"{source!r} is not supported here: its processor needs torchvision, which does not import "
                        f"beside this torch build (install the torchvision built for it to use this model). "
                        f"Families whose inputs JFE builds itself work without it: "
                        f"{', '.join(sorted(ADAPTERS))}") from exc
                raise ConfigError(f"cannot load the processor of {source!r}: {exc}") from exc
            self.tokenizer = self.processor.tokenizer
            self.image_processor = getattr(self.processor, "image_processor", None)
            self.chat_template = getattr(self.processor, "chat_template", None) or self.tokenizer.chat_template
            image_token = getattr(self.processor, "image_token", None)
            self._reserved = (image_token,) if image_token else ()
        else:
            try:
                self.tokenizer = AutoTokenizer.from_pretrained(source, **self._hub_kwargs())
                self.image_processor = AutoImageProcessor.from_pretrained(source, **self._hub_kwargs())
            except Exception as exc:  # noqa: BLE001
                raise ConfigError(f"cannot load the tokenizer / image processor of {source!r}: {exc}") from exc
            self.chat_template = self.tokenizer.chat_template or self._read_template_file(source)
            self._reserved = self.adapter.reserved_tokens
            self._image_token_id = self.tokenizer.convert_tokens_to_ids(self.adapter.image_token)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = self.config.padding_side

    def _read_template_file(self, source: str) -> str | None:
        from transformers.utils import cached_file

        for name in (CHAT_TEMPLATE_FILE, "chat_template.json"):
            try:
                path = cached_file(source, name, _raise_exceptions_for_missing_entries=False, **self._hub_kwargs())
            except OSError:
                path = None
            if path:
                text = Path(path).read_text()
                return json.loads(text)["chat_template"] if name.endswith(".json") else text
        return None

    def _load_backbone(self, weights_from: str | None, hf_config: Any) -> torch.nn.Module:
        """The full HF model (``...ForConditionalGeneration``, or the bare model if there is none)."""
        from transformers import AutoModel, AutoModelForImageTextToText

        kwargs: dict[str, Any] = {"dtype": self._dtype}
        if self.config.attn_implementation:
            kwargs["attn_implementation"] = self.config.attn_implementation
        try:
            if weights_from is None:
                try:
                    full = AutoModelForImageTextToText.from_config(hf_config, **kwargs)
                except ValueError:
                    full = AutoModel.from_config(hf_config, **kwargs)
            else:
                path = os.path.expanduser(weights_from)
                try:
                    full = AutoModelForImageTextToText.from_pretrained(path, **kwargs, **self._hub_kwargs())
                except ValueError:  # not an image-text-to-text architecture: its bare model may still do
                    full = AutoModel.from_pretrained(path, **kwargs, **self._hub_kwargs())
        except OSError as exc:
            raise ConfigError(f"cannot load the weights of {weights_from!r}: {exc}") from exc
        return full

    @staticmethod
    def _hidden_size(hf_config: Any) -> int:
        text_config = getattr(hf_config, "text_config", None) or hf_config
        return int(text_config.hidden_size)

    def _wrap_lora(self, full: torch.nn.Module, adapter_from: str | os.PathLike | None) -> Any:
        """A ``peft.PeftModel`` around the full model: a fresh adapter from the config, or a saved one."""
        from peft import LoraConfig, PeftModel, get_peft_model

        cfg = self.config
        if adapter_from is not None:
            try:
                return PeftModel.from_pretrained(full, str(adapter_from), is_trainable=True)
            except (OSError, ValueError, KeyError, RuntimeError) as exc:
                raise ConfigError(f"cannot load the LoRA adapter in {adapter_from}: {exc}") from exc
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=cfg.target_modules, bias="none",
                          base_model_name_or_path=cfg.model_path)
        try:
            return get_peft_model(full, lora)
        except ValueError as exc:
            raise ConfigError(f"LoRA target_modules {cfg.target_modules!r} match nothing in the model: {exc}") \
                from exc

    def _collect_lora_names(self) -> None:
        for name, param in self.named_parameters():
            if "lora_" in name:
                # Adapters train in float32 even on a bf16 backbone (peft casts activations to match).
                param.data = param.data.float()
                param.requires_grad_(False)
                self._lora_names.add(name)

    # --- constructors, behind jfe.models.load_model ("hf:<path>" and saved folders) ------------------
    @classmethod
    def _from_path(cls, path: str | os.PathLike, device: str | torch.device | None = None,
                   **overrides: Any) -> HFEncoder:
        """A HF model folder / hub id (``overrides`` are :class:`HFConfig` fields), or a saved JFE folder."""
        local = Path(path).expanduser()
        if (local / CONFIG_NAME).is_file():
            try:
                saved = json.loads((local / CONFIG_NAME).read_text())
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{local / CONFIG_NAME} is not valid JSON: {exc}") from exc
            if saved.get("arch") == cls.arch:
                return cls._from_saved(local, device=device, **overrides)
        try:
            config = cls.config_class(model_path=str(path), **overrides)
        except ValidationError as exc:
            raise ConfigError(f"bad options for {cls.arch} {path}: {exc}") from exc
        assert isinstance(config, HFConfig)  # config_class of every HF arch
        return cls(config, device=device)

    @classmethod
    def _from_saved(cls, directory: str | os.PathLike, device: str | torch.device | None = None,
                    **overrides: Any) -> HFEncoder:
        """Load a folder written by :meth:`save_pretrained`."""
        directory = Path(directory)
        config_path = directory / CONFIG_NAME
        if not config_path.is_file():
            raise ConfigError(f"{directory} is not a saved JFE model (no {CONFIG_NAME})")
        try:
            saved = json.loads(config_path.read_text())
            config = cls.config_class(**{**saved, **overrides})
        except (ValidationError, json.JSONDecodeError) as exc:
            raise ConfigError(f"bad config in {config_path}: {exc}") from exc
        assert isinstance(config, HFConfig)
        backbone_dir = directory / BACKBONE_DIR
        source = backbone_dir if backbone_dir.is_dir() else None
        full = config.weights == "full" and source is not None
        # a full fine-tune saves its weights as a Hugging Face checkpoint in backbone/ (older ones: model.safetensors)
        in_backbone = full and source is not None and ((source / "model.safetensors").is_file()
                                                       or (source / "model.safetensors.index.json").is_file())
        from safetensors.torch import load_file

        state = load_file(str(directory / WEIGHTS_NAME))
        adapter_from = _saved_adapter(directory, saved, overrides, state)
        model = cls(config, device=device, source=source, pretrained_weights=not full or in_backbone,
                    adapter_from=adapter_from, weights_from=source if in_backbone else None)
        missing, unexpected = model.load_state_dict(state, strict=False)
        # LoRA weights come from the adapter files (or are fresh); only the older layout keeps them here.
        in_file = not any("lora_" in k for k in state)
        bad_missing = [k for k in missing if (k in model._lora_names and not in_file)
                       or (k not in model._lora_names and full and not in_backbone)]
        if unexpected or bad_missing:
            raise ConfigError(f"weights in {directory} do not match the config: missing={bad_missing[:5]}, "
                              f"unexpected={unexpected[:5]}")
        model._touched |= set(state)
        if in_backbone:  # every weight came from the checkpoint: saved again, it stays a full checkpoint
            model._touched |= {name for name, _ in model.named_parameters() if name not in model._lora_names}
        model.eval()
        return model

    def _may_be_missing(self, key: str) -> bool:
        # A delta model.safetensors omits the base weights (they come from model_path). LoRA weights are
        # never silently skipped: a loader that reads only model.safetensors must fail on them, because they
        # now live in the adapter files (see load_checkpoint).
        return key not in self._lora_names

    def load_checkpoint(self, directory: str | os.PathLike) -> None:
        """Load a folder written by :meth:`save_pretrained` into this (already built) model, in place: the
        adapter files and ``model.safetensors`` together (the trainer's resume keeps its parameters)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        state = load_file(str(directory / WEIGHTS_NAME), device=str(self.device))
        if (directory / ADAPTER_WEIGHTS_NAME).is_file():
            if self._peft is None:
                raise ConfigError(f"{directory} holds a LoRA adapter but this model has none (lora_r=0)")
            from peft.utils import set_peft_model_state_dict

            adapter = load_file(str(directory / ADAPTER_WEIGHTS_NAME), device=str(self.device))
            # peft annotates the return as `namedtuple` (the factory, not a type); it is torch's _IncompatibleKeys.
            result: Any = set_peft_model_state_dict(self._peft, adapter)
            missing_lora = [k for k in result.missing_keys if "lora_" in k]
            if result.unexpected_keys or missing_lora:
                raise ConfigError(f"the LoRA adapter in {directory} does not match this model: "
                                  f"missing={missing_lora[:3]}, unexpected={list(result.unexpected_keys)[:3]}")
            allowed = self._lora_names
        else:
            allowed = set()
        missing, unexpected = self.load_state_dict(state, strict=False)
        bad_missing = [k for k in missing if k not in allowed and k in self._lora_names]
        if unexpected or bad_missing:
            raise ConfigError(f"weights in {directory} do not match this model: missing={bad_missing[:5]}, "
                              f"unexpected={unexpected[:5]}")
        self._touched |= set(state)

    # --- training ----------------------------------------------------------------------------
    def set_trainable(self, phase: str) -> None:
        """``align``: LoRA weights if any, else the vision->LM projector. ``full``: LoRA weights if any, else all."""
        if check_phase(phase) == "align+vision":
            raise ConfigError("phase 'align+vision' is for the built-in tower models; train an HF model's vision "
                              "tower with 'full' (or LoRA on its modules)")
        names = [name for name, _ in self.named_parameters()]
        if self._lora_names:
            chosen = set(self._lora_names)
        elif phase == "align":
            chosen = {n for n in names if any(p in n for p in self.adapter.projector_patterns)}
            if not chosen:
                raise ConfigError(f"no projector found for 'align' in this {self.adapter.name} model "
                                  f"(looked for {self.adapter.projector_patterns}); use LoRA or 'full'")
        else:
            chosen = set(names)
        for name, param in self.named_parameters():
            param.requires_grad_(name in chosen)
        self._touched |= chosen
        if self.config.gradient_checkpointing and hasattr(self.backbone, "gradient_checkpointing_enable"):
            # An HF PreTrainedModel method; torch's Module.__getattr__ types it as Tensor | Module.
            self.backbone.gradient_checkpointing_enable(  # type: ignore[operator]
                gradient_checkpointing_kwargs={"use_reentrant": False})

    # --- inputs ------------------------------------------------------------------------------
    def _truncate(self, text: str) -> str:
        limit = self.config.max_text_tokens
        if not limit or len(text.encode("utf-8")) <= limit:  # no tokenizer makes more tokens than UTF-8 bytes
            return text
        try:
            offsets = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        except NotImplementedError:  # slow tokenizers have no offsets: cut by decoding the kept ids
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            return text if len(ids) <= limit else self.tokenizer.decode(ids[:limit])
        return text if len(offsets) <= limit else text[:offsets[limit - 1][1]]

    def item_content(self, item: Item, prefix: str = "") -> list[dict[str, Any]]:
        """One item as user-turn content parts (``prefix``: a text label before it), its text truncated; a clear
        error for an empty item or a text holding a reserved model token, naming the item."""
        modality = item.modality  # raises a DataError naming the item when it is empty
        for token in self._reserved:
            if item.text and token in item.text:
                raise DataError(f"text contains the reserved model token {token!r}", record_id=item.id)
        content: list[dict[str, Any]] = [{"type": "text", "text": prefix}] if prefix else []
        if "image" in modality:
            content.append({"type": "image"})
        if item.text and item.text.strip():
            content.append({"type": "text", "text": (" " if prefix else "") + self._truncate(item.text)})
        return content

    def render_prompt(self, content: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        """The chat-template prompt of one user turn holding ``content`` (after the system turn, if configured)."""
        messages: list[dict[str, Any]] = [{"role": "user", "content": content}]
        if self.config.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": self.config.system_prompt}]})
        if self.chat_template is None:
            raise ConfigError(f"{self.config.model_path} has no chat template (tokenizer, processor or "
                              f"{CHAT_TEMPLATE_FILE})")
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def build_prompt(self, item: Item) -> str:
        """The chat-template prompt for one item (image placeholders not yet expanded)."""
        content = self.item_content(item)
        if self.config.embed_prompt:
            content.append({"type": "text", "text": self.config.embed_prompt})
        return self.render_prompt(content, self.config.add_generation_prompt)

    @property
    def _native_image_processor(self) -> Any:
        """The image processor of a native adapter: always loaded there (None only behind an AutoProcessor)."""
        assert self.image_processor is not None, "native adapters load an image processor"
        return self.image_processor

    def _image_kwargs(self) -> dict[str, Any]:
        if self.config.min_pixels is None and self.config.max_pixels is None:
            return {}
        size = dict(self._native_image_processor.size)
        if self.config.min_pixels is not None:
            size["shortest_edge"] = self.config.min_pixels
        if self.config.max_pixels is not None:
            size["longest_edge"] = self.config.max_pixels
        return {"size": {k: v for k, v in size.items() if k in ("shortest_edge", "longest_edge")}}

    def prepare(self, items: Sequence[Item]) -> dict[str, torch.Tensor]:
        """Tokenised, padded model inputs for a batch (on CPU). Errors name the offending item."""
        if self.adapter.image_required:
            for item in items:
                if item.image is None:
                    raise ConfigError(f"item {item.id or '(no id)'} is text-only, and {self.config.model_path} "
                                      f"({self.adapter.name}) takes an image with every prompt: its processor has no "
                                      f"text-only form; encode texts with another model")
        prompts = [self.build_prompt(item) for item in items]
        images = [(i, item.load_image()) for i, item in enumerate(items) if item.image is not None]
        return self.model_inputs([item.id for item in items], prompts, images)

    def model_inputs(self, ids: Sequence[str | None], prompts: list[str],
                     images: list[tuple[int, Any]]) -> dict[str, torch.Tensor]:
        """Model inputs for chat-template ``prompts`` and their ``images`` as ``(prompt index, PIL image)`` in the
        order the prompts name them (a prompt may hold several); ``ids`` name the prompts in errors."""
        if self.adapter.native:
            return self._prepare_native(ids, prompts, images)
        return self._prepare_processor(ids, prompts, images)

    def _prepare_native(self, ids: Sequence[str | None], prompts: list[str],
                        images: list[tuple[int, Any]]) -> dict[str, torch.Tensor]:
        placeholder = self.adapter.image_token
        assert placeholder is not None, "native adapters name their image token"
        image_processor = self._native_image_processor
        pixel_values, grids = [], []
        counts: list[list[int]] = [[] for _ in prompts]
        for index, image in images:
            try:
                out = image_processor(images=[image], return_tensors="pt", **self._image_kwargs())
            except Exception as exc:  # noqa: BLE001 - image processors raise ValueError, TypeError, ...
                raise DataError(f"the image processor rejected the image: {exc}", record_id=ids[index]) from exc
            pixel_values.append(out["pixel_values"])
            grids.append(out["image_grid_thw"])
            # One placeholder per merged patch group: what the vision tower emits for this image.
            counts[index].append(int(out["image_grid_thw"][0].prod()) // image_processor.merge_size ** 2)
        prompts = list(prompts)
        for index, per_image in enumerate(counts):
            parts = prompts[index].split(placeholder)
            if len(parts) - 1 != len(per_image):
                raise ConfigError(f"the chat template of {self.config.model_path} must put exactly one "
                                  f"{placeholder} per image; got {len(parts) - 1} for {len(per_image)} image(s)")
            expanded = parts[0]
            for count, part in zip(per_image, parts[1:], strict=True):
                expanded += placeholder * count + part
            prompts[index] = expanded
        tokens = self.tokenizer(prompts, padding=True, return_tensors="pt", add_special_tokens=False)
        # Only what the model takes: some tokenizers add token_type_ids, which Qwen models reject.
        batch = {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}
        if pixel_values:
            batch["pixel_values"] = torch.cat(pixel_values)
            batch["image_grid_thw"] = torch.cat(grids)
        if self.adapter.mm_token_type_ids:
            batch["mm_token_type_ids"] = (batch["input_ids"] == self._image_token_id).int()
        return batch

    def _prepare_processor(self, ids: Sequence[str | None], prompts: list[str],
                           images: list[tuple[int, Any]]) -> dict[str, torch.Tensor]:
        processor = self.processor
        assert processor is not None, "non-native adapters load an AutoProcessor"
        kwargs: dict[str, Any] = {"text": prompts, "padding": True, "return_tensors": "pt"}
        if images and self.adapter.images_per_prompt:
            by_prompt: list[list[Any]] = [[] for _ in prompts]
            for index, image in images:
                by_prompt[index].append(image)
            kwargs["images"] = by_prompt
        elif images:
            kwargs["images"] = [image for _, image in images]
        try:
            return dict(processor(**kwargs))
        except Exception as exc:  # noqa: BLE001
            per_prompt: dict[int, list[Any]] = {}
            for index, image in images:
                per_prompt.setdefault(index, []).append(image)
            for index, own in per_prompt.items():  # find the prompt at fault, so the error can name it
                try:
                    processor(text=[prompts[index]], images=[own] if self.adapter.images_per_prompt else own,
                              return_tensors="pt")
                except Exception as inner:  # noqa: BLE001
                    raise DataError(f"the processor rejected the item: {inner}", record_id=ids[index]) from inner
            raise DataError(f"the processor rejected the batch: {exc}") from exc

    # --- the encoder -------------------------------------------------------------------------
    def hidden_states(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Last-layer hidden states ``[batch, seq, hidden]`` for prepared inputs."""
        device = self.device
        inputs = {k: v.to(device) for k, v in batch.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self._dtype)
        out = self.backbone(**inputs, use_cache=False, return_dict=True)
        return out.last_hidden_state

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last real token (default) or masked mean, as float32 (not yet normalised)."""
        attention_mask = attention_mask.to(hidden.device)
        if self.config.pooling == "mean":
            weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
            return ((hidden * weights).sum(1) / weights.sum(1).clamp_min(1)).float()
        return last_token_states(hidden, attention_mask)

    def embed(self, items: Sequence[Item]) -> torch.Tensor:
        if len(items) == 0:
            return torch.zeros(0, self.dim, device=self.device)
        if self.adapter.text_apart:
            text = [i for i, item in enumerate(items) if item.image is None]
            if 0 < len(text) < len(items):
                rest = [i for i in range(len(items)) if items[i].image is not None]
                out = torch.empty(len(items), self.dim, device=self.device)
                out[text] = self.embed([items[i] for i in text])
                out[rest] = self.embed([items[i] for i in rest])
                return out
        batch = self.prepare(items)
        hidden = self.hidden_states(batch)
        return l2_normalize(self.pool(hidden, batch["attention_mask"]))

    # --- persistence -------------------------------------------------------------------------
    def _checkpoint_state(self) -> tuple[dict[str, torch.Tensor], bool]:
        """The weights for ``model.safetensors`` (all but LoRA, which peft saves) and whether they are all."""
        state = {k: v for k, v in self.state_dict().items() if k not in self._lora_names}
        keep = self._touched | {n for n, p in self.named_parameters() if p.requires_grad}
        full = all(name in keep for name, _ in self.named_parameters() if name not in self._lora_names)
        chosen = state if full else {k: v for k, v in state.items() if k in keep}
        out, seen = {}, set()
        for key, value in chosen.items():
            tensor = value.detach().cpu().contiguous()
            if tensor.data_ptr() in seen:  # tied weights: safetensors refuses shared storage
                tensor = tensor.clone()
            seen.add(tensor.data_ptr())
            out[key] = tensor
        return out, full

    def save_pretrained(self, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write ``config.json``, ``model.safetensors`` (delta or full), ``backbone/`` and, with LoRA, the PEFT
        adapter files, atomically. An existing folder that is not a saved model is refused unless ``overwrite``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        state, full = self._checkpoint_state()
        config = self.config.model_copy(update={"weights": "full" if full else "delta"})
        as_hf = full and self._peft is None  # a full fine-tune: backbone/ becomes a complete HF checkpoint
        with atomic_dir(directory, MODEL_KIND, overwrite=overwrite) as tmp:
            (tmp / CONFIG_NAME).write_text(json.dumps(config.model_dump(), indent=2) + "\n")
            save_file({} if as_hf else state, str(tmp / WEIGHTS_NAME),
                      metadata={"arch": self.arch, "weights": config.weights,
                                **({"stored_in": BACKBONE_DIR} if as_hf else {})})
            self._save_extra(tmp)
            if as_hf:
                self._save_hf_checkpoint(tmp / BACKBONE_DIR)
            fix_modes(tmp, [WEIGHTS_NAME, "adapter_model.safetensors"])
        self.config = config
        return directory

    def _save_hf_checkpoint(self, target: Path) -> None:
        """The whole model, LM head restored, as ``save_pretrained`` writes it: ``AutoModelForImageTextToText.
        from_pretrained(target)`` loads it (generation included), and so does JFE. The head JFE dropped comes back
        from the file it was loaded from, or from the input embeddings where the weights are tied."""
        root = self.__dict__["_root"]
        text_config = getattr(self._hf_config, "text_config", None) or self._hf_config
        tied = bool(getattr(text_config, "tie_word_embeddings", False) or
                    getattr(self._hf_config, "tie_word_embeddings", False))
        embeddings = root.get_input_embeddings().weight
        # on the meta device: its weight is replaced at once, so a random one (545M values on a 7B model) never exists
        head = torch.nn.Linear(self.dim, int(text_config.vocab_size), bias=False, device="meta")
        found = _lm_head_file(self._weights_folder) if self._weights_folder and not tied else None
        if tied:
            head.weight = embeddings
        elif found is not None:
            from safetensors import safe_open

            path, key = found
            with safe_open(path, "pt") as handle:
                head.weight = torch.nn.Parameter(handle.get_tensor(key).to(embeddings.dtype), requires_grad=False)
        else:
            raise ConfigError(f"cannot save {self.config.model_path} as a complete checkpoint: its LM head (dropped "
                              f"for embedding) is in no local weights file to restore it from")
        dropped, root.lm_head = root.lm_head, head
        try:
            root.save_pretrained(str(target), safe_serialization=True)
        finally:
            root.lm_head = dropped

    def _save_extra(self, directory: Path) -> None:
        """``backbone/``: the HF config and processing files, so a full checkpoint needs nothing else."""
        target = directory / BACKBONE_DIR
        target.mkdir()
        self._hf_config.save_pretrained(target)
        if self._peft is not None:
            # peft's own writer: adapter_config.json + adapter_model.safetensors keyed for the full model
            # (the model card it also writes is peft's README.md). The main process of a multi-process run
            # is the only caller (the trainer saves on rank 0).
            self._peft.save_pretrained(str(directory), safe_serialization=True, is_main_process=True)
        if self.processor is not None:
            self.processor.save_pretrained(target)
        else:
            self.tokenizer.save_pretrained(target)
            self._native_image_processor.save_pretrained(target)
        if self.chat_template:
            (target / CHAT_TEMPLATE_FILE).write_text(self.chat_template)
