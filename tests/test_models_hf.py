"""HFEncoder over a tiny, randomly initialised Qwen2-VL built here (nothing is downloaded)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from jfe.data.items import Item
from jfe.errors import ConfigError, DataError
from jfe.models.hf import HFEncoder, last_token_index
from jfe.models.registry import load_model

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>"]
_WORD_TEXT = ("system user assistant you are a helpful find the image of cat dog red blue green with hat "
         "smiling face moon clock one hour later next phase in german what is her job farmer summarize "
         "above word : . , yes no does candidate match query answer or")
WORDS = _WORD_TEXT.split()
# The layout of Qwen2-VL's own template (system turn optional, list or string content).
TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _word_tokenizer(special: list[str], **tokens: str) -> tuple[dict[str, int], Any]:
    """A word-level fast tokenizer over WORDS with ``special`` tokens first (``tokens``: its named ones)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(special + ["[UNK]"] + sorted(set(WORDS)))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                       pre_tokenizers.Punctuation()])
    tokenizer.add_special_tokens(special)
    return vocab, PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", **tokens)


def build_tiny_qwen2_vl(folder: Path) -> Path:
    """A 2-layer Qwen2-VL (hidden 32) with a word-level tokenizer and a small-image processor."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    vocab, fast = _word_tokenizer(SPECIAL, pad_token="<|endoftext|>", eos_token="<|im_end|>")
    fast.chat_template = TEMPLATE
    config = Qwen2VLConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 512,
                     "bos_token_id": None, "eos_token_id": vocab["<|im_end|>"],
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}},
        vision_config={"depth": 1, "embed_dim": 32, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
        image_token_id=vocab["<|image_pad|>"], video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"], vision_end_token_id=vocab["<|vision_end|>"],
    )
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 56).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen2_vl(tmp_path_factory.mktemp("tiny-qwen2-vl"))


@pytest.fixture(scope="module")
def encoder(tiny_dir: Path) -> HFEncoder:
    return load_model(f"hf:{tiny_dir}", device="cpu")


def _image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def mixed_items() -> list[Item]:
    """Every modality, with text and image-token lengths that differ, so batches need padding."""
    return [
        Item(text="find the red cat", id="t1"),
        Item(image=_image(40, 30, 1), id="i1"),                                  # 2 image tokens
        Item(text="the cat with a hat in german", image=_image(60, 60, 2), id="it1"),  # 4 image tokens
        Item(text="moon", id="t2"),
        Item(text="what is her job", image=_image(30, 40, 3), id="it2"),
        Item(image=_image(64, 64, 4), id="i2"),
    ]


def test_dtype_and_dim(encoder: HFEncoder) -> None:
    assert encoder.dim == 32  # the tiny backbone's hidden size
    assert next(encoder.parameters()).dtype == torch.float32  # "auto" on CPU
    assert not any(p.requires_grad for p in encoder.parameters())  # inference model until set_trainable


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_equals_one_by_one(tiny_dir: Path, side: str) -> None:
    model = load_model(f"hf:{tiny_dir}", device="cpu", padding_side=side)
    assert model.tokenizer.padding_side == side
    items = mixed_items()
    batch = model.encode(items, batch_size=len(items))
    single = np.concatenate([model.encode([item]) for item in items])
    assert batch.shape == (len(items), 32)
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(batch, single, atol=1e-5)
    # Distinct inputs give distinct vectors (the pooling does not collapse onto a shared pad/suffix).
    sims = batch @ batch.T
    assert (sims[~np.eye(len(items), dtype=bool)] < 0.9999).all()


def test_left_and_right_padding_agree(tiny_dir: Path) -> None:
    items = mixed_items()
    left = load_model(f"hf:{tiny_dir}", device="cpu", padding_side="left")
    right = load_model(f"hf:{tiny_dir}", device="cpu", padding_side="right")
    batch_left, batch_right = left.prepare(items), right.prepare(items)
    mask_left, mask_right = batch_left["attention_mask"], batch_right["attention_mask"]
    assert (mask_left[:, 0] == 0).any() and (mask_right[:, -1] == 0).any()  # both really pad
    np.testing.assert_allclose(left.encode(items), right.encode(items), atol=1e-5)


def test_last_token_index_under_both_paddings() -> None:
    lengths = [3, 5, 1]
    width = 6
    right = torch.tensor([[1] * n + [0] * (width - n) for n in lengths])
    left = torch.tensor([[0] * (width - n) + [1] * n for n in lengths])
    assert last_token_index(right).tolist() == [n - 1 for n in lengths]
    assert last_token_index(left).tolist() == [width - 1] * len(lengths)


def test_last_token_pooling_matches_manual_forward(tiny_dir: Path, encoder: HFEncoder) -> None:
    """The vector equals the last layer's state at the final real token of a hand-built, unpadded prompt."""
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    image = _image(60, 60, 2)
    text = "the cat with a hat in german"
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    processor = AutoImageProcessor.from_pretrained(tiny_dir)
    pixels = processor(images=[image], return_tensors="pt")
    n_tokens = int(pixels["image_grid_thw"][0].prod()) // 4
    prompt = ("<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * n_tokens + "<|vision_end|>" + text
              + "<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir).eval()
    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    with torch.no_grad():
        out = model.model(**ids, **pixels, mm_token_type_ids=(ids["input_ids"] == image_id).int())
    expected = torch.nn.functional.normalize(out.last_hidden_state[0, -1], dim=-1).numpy()

    # In a padded batch beside a longer item, under right padding (the pads come after the real tokens).
    right = load_model(f"hf:{tiny_dir}", device="cpu", padding_side="right")
    long_item = Item(text="find the red cat " * 20, image=_image(64, 64, 9), id="long")
    vectors = right.encode([Item(text=text, image=image, id="q"), long_item])
    np.testing.assert_allclose(vectors[0], expected, atol=1e-5)
    # The prompt JFE builds is the one built by hand here, before image-token expansion.
    assert encoder.build_prompt(Item(text=text, image=image)).replace("<|image_pad|>", "") == \
        prompt.replace("<|image_pad|>", "")


def test_embed_and_system_prompts(tiny_dir: Path, encoder: HFEncoder) -> None:
    suffixed = load_model(f"hf:{tiny_dir}", device="cpu", embed_prompt="summarize above in one word :",
                                   system_prompt="you are a helpful cat")
    prompt = suffixed.build_prompt(Item(text="moon"))
    assert prompt.startswith("<|im_start|>system\nyou are a helpful cat<|im_end|>")
    assert "moon" + "summarize above in one word :" in prompt
    items = [Item(text="moon"), Item(image=_image(40, 30, 1))]
    assert not np.allclose(suffixed.encode(items), encoder.encode(items), atol=1e-4)


def test_long_text_is_truncated(tiny_dir: Path) -> None:
    model = load_model(f"hf:{tiny_dir}", device="cpu", max_text_tokens=4)
    long_text = "find the red cat with a hat"
    assert model._truncate(long_text) == "find the red cat"
    np.testing.assert_allclose(model.encode([long_text]), model.encode(["find the red cat"]), atol=1e-6)


def _perturb(params: list[torch.nn.Parameter], seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in params:
            param.add_(torch.randn(param.shape, generator=generator) * 0.5)


def test_lora_adds_params_and_only_they_train_in_align(tiny_dir: Path, encoder: HFEncoder) -> None:
    model = load_model(f"hf:{tiny_dir}", device="cpu", lora_r=4, lora_alpha=8)
    n_base = sum(p.numel() for p in encoder.parameters())
    assert sum(p.numel() for p in model.parameters()) > n_base
    # lora_B starts at zero: before training, the adapter leaves the base model's vectors unchanged.
    np.testing.assert_allclose(model.encode(mixed_items()), encoder.encode(mixed_items()), atol=1e-6)
    model.set_trainable("align")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all("language_model" in n for n in trainable)  # default targets are the LM's attention projections
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for _ in range(2):  # lora_B starts at zero, so lora_A only moves on the second step
        vectors = model.embed(mixed_items()[:3])
        loss = -(vectors[0] @ vectors[2]) + (vectors[0] @ vectors[1])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed == trainable


def test_align_without_lora_trains_the_projector(tiny_dir: Path) -> None:
    model = load_model(f"hf:{tiny_dir}", device="cpu")
    model.set_trainable("align")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".merger." in n for n in trainable)
    model.set_trainable("full")
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ConfigError, match="phase"):
        model.set_trainable("stage3")


def _trained_lora(tiny_dir: Path, seed: int = 1, **overrides) -> HFEncoder:
    model = load_model(f"hf:{tiny_dir}", device="cpu", lora_r=4, lora_alpha=8, **overrides)
    model.set_trainable("align")
    _perturb([p for p in model.parameters() if p.requires_grad], seed=seed)
    return model


def test_save_load_lora_as_peft_adapter(tmp_path: Path, tiny_dir: Path) -> None:
    from safetensors import safe_open

    model = _trained_lora(tiny_dir)
    items = mixed_items()
    expected = model.encode(items)
    saved = model.save_pretrained(tmp_path / "lora")
    # peft's standard pair, keyed for the full ForConditionalGeneration model
    adapter_config = json.loads((saved / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["r"] == 4 and adapter_config["lora_alpha"] == 8
    assert adapter_config["base_model_name_or_path"] == str(tiny_dir)
    with safe_open(str(saved / "adapter_model.safetensors"), "pt") as handle:
        adapter_keys = set(handle.keys())
    assert adapter_keys and all(k.startswith("base_model.model.model.language_model.") and ".lora_" in k
                                for k in adapter_keys)
    assert len(adapter_keys) == len(model._lora_names)
    with safe_open(str(saved / "model.safetensors"), "pt") as handle:
        assert set(handle.keys()) == set()  # a LoRA-only run: nothing else changed, nothing else is saved
    assert json.loads((saved / "config.json").read_text())["weights"] == "delta"
    for spec in (saved, f"hf:{saved}"):  # a saved folder, named as such or as an hf: path
        loaded = load_model(spec, device="cpu")
        assert isinstance(loaded, HFEncoder)
        assert not any(p.requires_grad for p in loaded.parameters())  # an inference model again
        np.testing.assert_allclose(loaded.encode(items), expected, atol=1e-6)


def test_peft_loads_the_adapter_files(tmp_path: Path, tiny_dir: Path) -> None:
    """Plain peft + transformers (no JFE code) reproduce JFE's vectors from the saved folder."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    model = _trained_lora(tiny_dir, seed=4)
    items = mixed_items()
    expected = model.encode(items)
    saved = model.save_pretrained(tmp_path / "lora")
    base = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    peft_model = PeftModel.from_pretrained(base, saved).eval()
    batch = model.prepare(items)  # JFE's inputs; the model that consumes them is peft's

    def pooled(net: torch.nn.Module) -> np.ndarray:
        with torch.no_grad():
            hidden = net(**batch, use_cache=False).last_hidden_state
        rows = torch.arange(hidden.shape[0])
        return torch.nn.functional.normalize(hidden[rows, last_token_index(batch["attention_mask"])], dim=-1).numpy()

    np.testing.assert_allclose(pooled(peft_model.base_model.model.model), expected, atol=1e-5)
    merged = peft_model.merge_and_unload()  # the adapter really is in the weights peft loaded
    np.testing.assert_allclose(pooled(merged.model), expected, atol=1e-5)
    assert not np.allclose(pooled(AutoModelForImageTextToText.from_pretrained(tiny_dir).model), expected, atol=1e-3)


def test_older_checkpoints_with_lora_in_model_safetensors_still_load(tmp_path: Path, tiny_dir: Path) -> None:
    from safetensors.torch import save_file

    model = _trained_lora(tiny_dir, seed=5)
    items = mixed_items()
    expected = model.encode(items)
    saved = model.save_pretrained(tmp_path / "old")
    # rewrite it in the pre-PEFT layout: LoRA weights under JFE's own names in model.safetensors
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
        (saved / name).unlink(missing_ok=True)
    lora = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}
    save_file(lora, str(saved / "model.safetensors"), metadata={"arch": "hf-mllm", "weights": "delta"})
    loaded = load_model(saved, device="cpu")
    np.testing.assert_allclose(loaded.encode(items), expected, atol=1e-6)
    resaved = loaded.save_pretrained(tmp_path / "new")  # and it is written back in the standard layout
    assert (resaved / "adapter_model.safetensors").is_file()
    np.testing.assert_allclose(load_model(resaved, device="cpu").encode(items), expected, atol=1e-6)


def test_broken_adapter_folders_are_refused(tmp_path: Path, tiny_dir: Path) -> None:
    saved = _trained_lora(tiny_dir).save_pretrained(tmp_path / "lora")
    with pytest.raises(ConfigError, match="cannot be overridden"):
        load_model(saved, device="cpu", lora_r=8)
    shutil.copytree(saved, tmp_path / "half")
    (tmp_path / "half" / "adapter_config.json").unlink()
    with pytest.raises(ConfigError, match="incomplete"):
        load_model(tmp_path / "half", device="cpu")
    (tmp_path / "half" / "adapter_model.safetensors").unlink()
    with pytest.raises(ConfigError, match="no LoRA adapter"):
        load_model(tmp_path / "half", device="cpu")


def test_lora_added_on_top_of_a_saved_projector_delta(tmp_path: Path, tiny_dir: Path) -> None:
    """Stage 1 without LoRA (projector only), stage 2 adds a fresh adapter: both deltas survive a save."""
    stage1 = load_model(f"hf:{tiny_dir}", device="cpu")
    stage1.set_trainable("align")
    _perturb([p for p in stage1.parameters() if p.requires_grad], seed=6)
    first = stage1.save_pretrained(tmp_path / "stage1")
    stage2 = load_model(first, device="cpu", lora_r=4, lora_alpha=8)
    items = mixed_items()
    np.testing.assert_allclose(stage2.encode(items), stage1.encode(items), atol=1e-6)  # lora_B = 0
    stage2.set_trainable("full")
    _perturb([p for p in stage2.parameters() if p.requires_grad], seed=7)
    expected = stage2.encode(items)
    second = stage2.save_pretrained(tmp_path / "stage2")
    from safetensors import safe_open

    with safe_open(str(second / "model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
    assert keys and all(".merger." in k for k in keys)  # the stage-1 projector, next to the adapter files
    np.testing.assert_allclose(load_model(second, device="cpu").encode(items), expected, atol=1e-6)


def test_save_load_full_is_self_contained(tmp_path: Path, tiny_dir: Path) -> None:
    base = shutil.copytree(tiny_dir, tmp_path / "base")
    model = load_model(f"hf:{base}", device="cpu")
    model.set_trainable("full")
    _perturb([model.backbone.language_model.norm.weight, model.backbone.visual.merger.mlp[0].weight], seed=2)
    items = mixed_items()
    expected = model.encode(items)
    saved = model.save_pretrained(tmp_path / "full")
    assert json.loads((saved / "config.json").read_text())["weights"] == "full"
    shutil.rmtree(base)  # the checkpoint must not need the base folder any more
    loaded = load_model(saved, device="cpu")
    np.testing.assert_allclose(loaded.encode(items), expected, atol=1e-6)
    # backbone/ is a complete Hugging Face checkpoint: transformers loads it, LM head included, to the same states
    from transformers import AutoModelForImageTextToText

    hf_model, info = AutoModelForImageTextToText.from_pretrained(saved / "backbone", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    from safetensors import safe_open

    with safe_open(str(tiny_dir / "model.safetensors"), "pt") as original:  # the head JFE dropped, restored as it was
        torch.testing.assert_close(hf_model.lm_head.weight.detach(), original.get_tensor("lm_head.weight"))
    batch = loaded.prepare(items)
    with torch.no_grad():
        states = hf_model.model(**batch, use_cache=False).last_hidden_state
    np.testing.assert_allclose(torch.nn.functional.normalize(loaded.pool(states, batch["attention_mask"]), dim=-1),
                               expected, atol=1e-5)
    # Saving over an existing checkpoint replaces it whole (the head now comes from the checkpoint itself).
    loaded.save_pretrained(saved)
    np.testing.assert_allclose(load_model(saved, device="cpu").encode(items), expected, atol=1e-6)
    # a full checkpoint of the older layout (every weight in model.safetensors, none in backbone/) still loads
    from safetensors.torch import save_file

    older = shutil.copytree(saved, tmp_path / "older")
    (older / "backbone" / "model.safetensors").unlink()
    save_file({k: v.contiguous() for k, v in loaded.state_dict().items()}, str(older / "model.safetensors"),
              metadata={"arch": "hf-mllm", "weights": "full"})
    np.testing.assert_allclose(load_model(older, device="cpu").encode(items), expected, atol=1e-6)


def test_untrained_save_is_tiny_delta(tmp_path: Path, encoder: HFEncoder) -> None:
    saved = encoder.save_pretrained(tmp_path / "plain")
    assert (saved / "model.safetensors").stat().st_size < 1024
    assert (saved / "backbone" / "config.json").exists() and (saved / "backbone" / "chat_template.jinja").exists()
    np.testing.assert_allclose(load_model(saved, device="cpu").encode(["moon"]),
                               encoder.encode(["moon"]), atol=1e-6)


def test_bad_inputs_name_the_item(tmp_path: Path, encoder: HFEncoder) -> None:
    with pytest.raises(DataError, match="'empty'"):
        encoder.encode([Item(text="moon", id="ok"), Item(text="  ", id="empty")])
    with pytest.raises(DataError, match="'missing'") as info:
        encoder.encode([Item(text="moon"), Item(image=tmp_path / "nope.png", id="missing")])
    assert "nope.png" in str(info.value)
    with pytest.raises(DataError, match="'sneaky'.*reserved"):
        encoder.encode([Item(text="a <|image_pad|> here", id="sneaky")])
    with pytest.raises(DataError, match="'thin'.*aspect ratio"):
        encoder.encode([Item(text="moon", id="ok"), Item(image=Image.new("RGB", (600, 2)), id="thin")])
    with pytest.raises(DataError, match="item #1"):
        encoder.encode(["moon", 42])


def test_bad_paths_and_options(tmp_path: Path, tiny_dir: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_model(f"hf:{tmp_path / 'no-such-model'}", device="cpu")
    with pytest.raises(ConfigError, match="bad options"):
        load_model(f"hf:{tiny_dir}", device="cpu", lora_rank=4)
    with pytest.raises(ConfigError, match="match nothing"):
        load_model(f"hf:{tiny_dir}", device="cpu", lora_r=2, target_modules=["no_such_proj"])


def build_tiny_llava(folder: Path) -> Path:
    """A tiny LLaVA (CLIP vision + Llama) with its own processor: the generic, processor-driven adapter."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    special = ["<pad>", "<s>", "</s>", "<image>"]
    vocab, fast = _word_tokenizer(special, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    template = ("{% for m in messages %}{{ m['role'] }} : {% for c in m['content'] %}{% if c['type'] == 'image' %}"
                "<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %} .{% endfor %}"
                "{% if add_generation_prompt %}assistant :{% endif %}")
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}),
        tokenizer=fast, patch_size=14, vision_feature_select_strategy="full", chat_template=template,
        image_token="<image>", num_additional_image_tokens=1)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=28, patch_size=14),
        text_config=LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=1, pad_token_id=0),
        image_token_index=vocab["<image>"], vision_feature_select_strategy="full", vision_feature_layer=-1)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def build_tiny_qwen2_5_vl(folder: Path) -> Path:
    """A 2-layer Qwen2.5-VL (windowed vision attention, one full-attention block), the tiny Qwen2-VL's tokenizer."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    vocab, fast = _word_tokenizer(SPECIAL, pad_token="<|endoftext|>", eos_token="<|im_end|>")
    fast.chat_template = TEMPLATE
    config = Qwen2_5_VLConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 512,
                     "bos_token_id": None, "eos_token_id": vocab["<|im_end|>"],
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}},
        vision_config={"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 32,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 56,
                       "fullatt_block_indexes": [1]},
        image_token_id=vocab["<|image_pad|>"], video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"], vision_end_token_id=vocab["<|vision_end|>"])
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 56).save_pretrained(folder)
    return folder


def build_tiny_qwen3_vl(folder: Path) -> Path:
    """A 2-layer Qwen3-VL (hidden 32, deepstack on its second vision block), the tokenizer and processor of the tiny
    Qwen2-VL (Qwen3-VL's own processor class needs torchvision)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    vocab, fast = _word_tokenizer(SPECIAL, pad_token="<|endoftext|>", eos_token="<|im_end|>")
    fast.chat_template = TEMPLATE
    config = Qwen3VLConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
                     "max_position_embeddings": 512, "bos_token_id": None, "eos_token_id": vocab["<|im_end|>"],
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                         "mrope_interleaved": True}},
        vision_config={"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 32,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                       "num_position_embeddings": 64, "deepstack_visual_indexes": [1]},
        image_token_id=vocab["<|image_pad|>"], video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"], vision_end_token_id=vocab["<|vision_end|>"],
    )
    torch.manual_seed(0)
    Qwen3VLForConditionalGeneration(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 56).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("side", ["left", "right"])
def test_qwen3_vl_goes_through_the_qwen2_vl_adapter(tmp_path: Path, side: str) -> None:
    folder = build_tiny_qwen3_vl(tmp_path / "tiny-qwen3-vl")
    model = load_model(f"hf:{folder}", device="cpu", padding_side=side)
    assert model.adapter.name == "qwen2-vl" and model.dim == 32
    items = mixed_items()
    batch = model.encode(items, batch_size=len(items))
    np.testing.assert_allclose(batch, np.concatenate([model.encode([item]) for item in items]), atol=1e-5)
    assert (batch @ batch.T)[~np.eye(len(items), dtype=bool)].max() < 0.9999
    model.set_trainable("align")  # the projector (visual.merger) is found by the adapter's pattern
    assert {n for n, p in model.named_parameters() if p.requires_grad}
    saved = model.save_pretrained(tmp_path / "saved")
    np.testing.assert_allclose(load_model(saved, device="cpu").encode(items), batch, atol=1e-6)


def _template(image: str, turn_end: str) -> str:
    return ("{% for m in messages %}{{ m['role'] }} : {% for c in m['content'] %}{% if c['type'] == 'image' %}"
            + image + "{% else %}{{ c['text'] }}{% endif %}{% endfor %} " + turn_end + "{% endfor %}"
            "{% if add_generation_prompt %}assistant :{% endif %}")


def build_tiny_gemma3(folder: Path) -> Path:
    """A tiny Gemma3 (SigLIP + Gemma3 text) with its own processor, which takes one list of images per prompt."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    special = ["<pad>", "<bos>", "<eos>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
    vocab, tokenizer = _word_tokenizer(special, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                       extra_special_tokens={"boi_token": "<start_of_image>",
                                                             "eoi_token": "<end_of_image>",
                                                             "image_token": "<image_soft_token>"})
    processor = Gemma3Processor(image_processor=Gemma3ImageProcessorPil(size={"height": 28, "width": 28}),
                                tokenizer=tokenizer, chat_template=_template("<start_of_image>", "<end_of_turn>"),
                                image_seq_length=4)
    config = Gemma3Config(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "sliding_window": 16,
                     "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 28, "patch_size": 7},
        mm_tokens_per_image=4, boi_token_index=vocab["<start_of_image>"], eoi_token_index=vocab["<end_of_image>"],
        image_token_index=vocab["<image_soft_token>"])
    torch.manual_seed(0)
    Gemma3ForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def build_tiny_mllama(folder: Path) -> Path:
    """A tiny mllama (Llama 3.2 Vision: cross-attention layers, image tiles), one list of images per prompt."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaProcessor
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    special = ["<pad>", "<|begin_of_text|>", "<|eot_id|>", "<|image|>", "<|python_tag|>"]
    vocab, tokenizer = _word_tokenizer(special, pad_token="<pad>", bos_token="<|begin_of_text|>",
                                       eos_token="<|eot_id|>")
    processor = MllamaProcessor(
        image_processor=MllamaImageProcessorPil(size={"height": 28, "width": 28}, max_image_tiles=2),
        tokenizer=tokenizer, chat_template=_template("<|image|>", "<|eot_id|>"))
    config = MllamaConfig(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_global_layers": 1,
                       "attention_heads": 2, "image_size": 28, "patch_size": 14, "max_num_tiles": 2,
                       "intermediate_layers_indices": [0], "vision_output_dim": 64,
                       "supported_aspect_ratios": [[1, 1], [1, 2], [2, 1]]},
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "num_key_value_heads": 1, "cross_attention_layers": [1],
                     "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
        image_token_index=vocab["<|image|>"])
    torch.manual_seed(0)
    MllamaForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def build_tiny_paligemma(folder: Path) -> Path:
    """A tiny PaliGemma (SigLIP + Gemma), whose processor takes an image with every prompt."""
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    vocab, tokenizer = _word_tokenizer(["<pad>", "<bos>", "<eos>", "<image>"], pad_token="<pad>", bos_token="<bos>",
                                       eos_token="<eos>")
    image_processor = SiglipImageProcessorPil(size={"height": 28, "width": 28})
    image_processor.image_seq_length = 16  # (28 / 7)^2 patches
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                   chat_template=_template("<image>", "<eos>"))
    config = PaliGemmaConfig(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 28, "patch_size": 7, "projection_dim": 32},
        text_config={"model_type": "gemma", "vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
                     "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
        image_token_index=vocab["<image>"], projection_dim=32)
    torch.manual_seed(0)
    PaliGemmaForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_paligemma_encodes_images_and_refuses_text_only_items_by_name(tmp_path: Path) -> None:
    model = load_model(f"hf:{build_tiny_paligemma(tmp_path / 'tiny')}", device="cpu")
    with_images = [item for item in mixed_items() if item.image is not None]
    batch = model.encode(with_images, batch_size=len(with_images))
    np.testing.assert_allclose(batch, np.concatenate([model.encode([item]) for item in with_images]), atol=1e-5)
    with pytest.raises(ConfigError, match=r"item t\d is text-only.*paligemma.*image with every prompt"):
        model.encode(mixed_items())  # the processor's own error blamed the data


@pytest.mark.parametrize("build", [build_tiny_gemma3, build_tiny_mllama], ids=["gemma3", "mllama"])
def test_processors_that_take_images_per_prompt_encode_mixed_batches(tmp_path: Path, build: Any) -> None:
    """Gemma3's and mllama's processors need one list of images per prompt: a batch mixing text-only and image
    items failed (reported as bad data) while each item alone worked."""
    model = load_model(f"hf:{build(tmp_path / 'tiny')}", device="cpu")
    assert model.adapter.images_per_prompt
    model.set_trainable("align")  # the projector is found by name
    assert {n for n, p in model.named_parameters() if p.requires_grad}
    # random inits leave the image path shut (Gemma3's projection and mllama's cross-attention gates start at
    # zero, so every image-only item would get one vector): open it as training would
    model.set_trainable("full")
    _perturb(list(model.parameters()), seed=4)
    items = mixed_items()
    batch = model.encode(items, batch_size=len(items))
    np.testing.assert_allclose(batch, np.concatenate([model.encode([item]) for item in items]), atol=1e-5)
    assert (batch @ batch.T)[~np.eye(len(items), dtype=bool)].max() < 0.9999
    saved = model.save_pretrained(tmp_path / "saved")
    np.testing.assert_allclose(load_model(saved, device="cpu").encode(items), batch, atol=1e-6)


def test_generic_adapter_with_a_processor(tmp_path: Path) -> None:
    folder = build_tiny_llava(tmp_path / "tiny-llava")
    items = [Item(text="find the red cat"), Item(image=_image(40, 40, 5)), Item(text="moon", image=_image(50, 30, 6))]
    left = load_model(f"hf:{folder}", device="cpu", padding_side="left")
    assert left.adapter.name == "generic"
    vectors = left.encode(items)
    np.testing.assert_allclose(vectors, np.concatenate([left.encode([item]) for item in items]), atol=1e-5)
    right = load_model(f"hf:{folder}", device="cpu", padding_side="right")
    np.testing.assert_allclose(right.encode(items), vectors, atol=1e-5)
    with pytest.raises(DataError, match="'bad'.*reserved"):
        left.encode([Item(text="moon <image>", id="bad")])
    left.set_trainable("align")
    trainable = {n for n, p in left.named_parameters() if p.requires_grad}
    assert trainable and all("multi_modal_projector" in n for n in trainable)
    _perturb([p for p in left.parameters() if p.requires_grad], seed=3)
    saved = left.save_pretrained(tmp_path / "saved")
    np.testing.assert_allclose(load_model(saved, device="cpu").encode(items), left.encode(items),
                               atol=1e-6)


def test_a_processor_that_needs_torchvision_is_named_as_unsupported(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """SmolVLM's and InternVL's processors import torchvision, which does not import beside this torch: the
    user is told that, not handed an ImportError from inside transformers (here the tiny LLaVA's processor is
    made to fail as theirs do)."""
    import transformers

    folder = build_tiny_llava(tmp_path / "tiny-llava")

    def needs_torchvision(*args: object, **kwargs: object) -> None:
        raise ImportError("SmolVLMProcessor requires the Torchvision library but it was not found")

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", needs_torchvision)
    with pytest.raises(ConfigError, match=r"not supported here: its processor needs torchvision.*qwen2_vl"):
        load_model(f"hf:{folder}", device="cpu")
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("no processor files")))
    with pytest.raises(ConfigError, match="cannot load the processor.*no processor files"):
        load_model(f"hf:{folder}", device="cpu")


# --- the support table of docs/hf.md: one row per family this test runs ------------------------------------------

FAMILIES = {"Qwen2-VL": build_tiny_qwen2_vl, "Qwen2.5-VL": build_tiny_qwen2_5_vl, "Qwen3-VL": build_tiny_qwen3_vl,
            "LLaVA": build_tiny_llava, "Gemma3": build_tiny_gemma3, "mllama (Llama 3.2 Vision)": build_tiny_mllama}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_supported_family_encodes_trains_and_reloads(tmp_path: Path, family: str) -> None:
    """What each row of the support table claims, on a tiny random model of the family: text, image, image+text
    and mixed batches equal to one-by-one encoding; one LoRA training step that moves the vectors; save -> load to
    identical vectors."""
    from transformers import AutoModelForImageTextToText

    folder = FAMILIES[family](tmp_path / "tiny")
    # random inits leave some image paths shut (Gemma3's projection, mllama's cross-attention gates start at zero,
    # so every image-only item would get one vector): the base model is perturbed as pretraining would have
    base = AutoModelForImageTextToText.from_pretrained(folder)
    _perturb(list(base.parameters()), seed=5)
    base.save_pretrained(folder)
    model = load_model(f"hf:{folder}", device="cpu", lora_r=4, lora_alpha=8)
    model.set_trainable("full")  # LoRA only (it has LoRA)
    items = mixed_items()
    before = model.encode(items, batch_size=len(items))
    np.testing.assert_allclose(before, np.concatenate([model.encode([item]) for item in items]), atol=1e-5)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    model.train()
    vectors = model.embed(items)
    loss = -(vectors[::2] * vectors[1::2]).sum()  # pull pairs together: any loss that reaches LoRA will do
    loss.backward()
    optimizer.step()
    model.eval()
    after = model.encode(items)
    assert np.abs(after - before).max() > 1e-4
    saved = model.save_pretrained(tmp_path / "saved")
    np.testing.assert_allclose(load_model(saved, device="cpu").encode(items), after, atol=1e-5)


def test_the_support_table_lists_what_the_test_runs() -> None:
    text = (Path(__file__).resolve().parents[1] / "docs" / "hf.md").read_text()
    table = text[text.index("<!-- support table -->"):text.index("<!-- /support table -->")]
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[1:] == list(FAMILIES)  # the header, then exactly the families tested above, in order
