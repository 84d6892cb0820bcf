"""The built-in models (jfe-mini and the three baselines) on the real offline towers, at 64 px for speed.

Needs the fetched MiniLM and MobileNetV2 assets (``jfe assets fetch minilm mobilenet_v2``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from jfe.data import assets
from jfe.data.items import Item
from jfe.errors import ConfigError, DataError
from jfe.models import feature_cache, load_model
from jfe.models.base import Encoder

pytestmark = [
    pytest.mark.assets,
    pytest.mark.skipif(not (assets.is_fetched("minilm") and assets.is_fetched("mobilenet_v2")),
                       reason="needs the minilm and mobilenet_v2 assets (jfe assets fetch)"),
]

MODELS = ("jfe-mini", "two-tower-mini", "late-fusion-sf-mini", "late-fusion-ff-mini")
SMALL = {"image_size": 64, "grid": 2}


def _shape_image(colour: tuple[int, int, int], shape: str, size: tuple[int, int] = (48, 48)) -> Image.Image:
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    box = (6, 6, size[0] - 7, size[1] - 7)
    (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=colour)
    return image


def _photo_like(seed: int = 0, size: int = 224) -> Image.Image:
    """Smooth colour gradients plus texture noise: natural-image statistics, unlike a flat colour."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([np.sin(6 * x + 1) * 0.5 + 0.5, y, (x * y) ** 0.5], axis=-1)
    pixels = np.clip(base * 200 + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: one thread avoids inter-thread waits, which dominate on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path):
    """Each test starts with an empty in-memory cache and a private disk folder."""
    feature_cache.clear()
    with feature_cache.overridden(mode="memory", directory=tmp_path / "features", dtype="float16"):
        yield
    feature_cache.clear()


@pytest.fixture(scope="module")
def models() -> dict[str, Encoder]:
    return {name: load_model(name, device="cpu", **SMALL) for name in MODELS}


@pytest.fixture
def image_files(tmp_path: Path) -> dict[str, Path]:
    files = {}
    for colour_name, colour in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
        for shape in ("square", "circle"):
            path = tmp_path / f"{colour_name}_{shape}.png"
            _shape_image(colour, shape).save(path)
            files[f"{colour_name}_{shape}"] = path
    return files


def _mixed_items(files: dict[str, Path]) -> list[Item]:
    """Every modality in one batch, texts of different lengths, an odd-sized PIL image, a repeated image."""
    return [
        Item(text="a red square", id="t1"),
        Item(image=files["red_square"], id="i1"),
        Item(text="make it blue", image=files["red_square"], id="it1"),
        Item(text="a much longer description of a blue circle drawn on a white background, centred", id="t2"),
        Item(image=_shape_image((30, 200, 30), "circle", (70, 40)), id="i2"),
        Item(text="x", image=files["blue_circle"], id="it2"),
        Item(image=files["blue_circle"], id="i3"),
    ]


# --------------------------------------------------------------------------------------------- vision tower


def test_mobilenet_state_dict_keys_all_match() -> None:
    from jfe.models.vision import MobileNetV2, load_mobilenet_v2_state

    state = load_mobilenet_v2_state()
    ours = MobileNetV2().state_dict()
    assert set(state) == set(ours)
    assert all(state[k].shape == ours[k].shape for k in ours)
    MobileNetV2().load_state_dict(state, strict=True)


def test_mobilenet_features_are_sensible() -> None:
    from jfe.models.vision import VisionTower, fold_batchnorm, grid_tokens, preprocess

    tower = VisionTower(224).requires_grad_(False)
    images = [Image.new("RGB", (224, 224), (255, 0, 0)), _photo_like(0), _photo_like(0)]
    pixels = preprocess(images, 224)
    with torch.no_grad():
        maps = tower(pixels)
        reference = tower.features(pixels)  # the unfolded network in eval mode
    assert maps.shape == (3, 1280, 7, 7)
    assert torch.allclose(maps, reference, atol=1e-3), "BN folding changed the features"
    pooled = torch.nn.functional.normalize(maps.mean((2, 3)), dim=-1)
    assert float(pooled[0] @ pooled[1]) < 0.9  # a flat red image and a textured one look different
    assert torch.allclose(pooled[1], pooled[2], atol=1e-6)
    assert (maps >= 0).all() and (maps <= 6).all()  # ReLU6 output
    # pretrained weights differ from a random init: the ImageNet classifier is confident on something
    assert not torch.allclose(maps, VisionTower(224, pretrained=False).requires_grad_(False)(pixels))
    tokens = grid_tokens(maps, 4, global_token=True)
    assert tokens.shape == (3, 17, 1280)
    assert torch.allclose(tokens[:, -1], maps.mean((2, 3)))
    assert torch.equal(grid_tokens(maps, 7), maps.flatten(2).transpose(1, 2))
    assert fold_batchnorm(tower.features) is not tower.features


def test_preprocess_reduces_very_large_images_first_and_leaves_the_rest_exact() -> None:
    from jfe.models.vision import REDUCING_GAP, preprocess

    rng = np.random.default_rng(1)
    photo = Image.fromarray((rng.random((30, 40, 3)) * 255).astype(np.uint8)).resize((2400, 1800))

    def direct(image: Image.Image, size: int) -> torch.Tensor:  # pad on white, one bicubic resize
        side = max(image.size)
        canvas = Image.new("RGB", (side, side), (255, 255, 255))
        canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        return preprocess([canvas.resize((size, size), Image.Resampling.BICUBIC)], size)

    exact = photo.resize((2 * REDUCING_GAP * 64 - 1, 300))  # just under the reduction threshold at size 64
    assert torch.equal(preprocess([exact], 64), direct(exact, 64))
    fast, slow = preprocess([photo], 64), direct(photo, 64)  # 2400 px: box-reduced 12x (to 200 px) before the resize
    assert not torch.equal(fast, slow)
    assert (fast - slow).abs().mean() < 0.02 and (fast - slow).abs().max() < 0.2  # normalised units


# --------------------------------------------------------------------------------------------- every model


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("cache", ["memory", "off"])
def test_batch_equals_one_by_one(models: dict[str, Encoder], image_files: dict[str, Path], name: str,
                                 cache: str) -> None:
    model = models[name]
    items = _mixed_items(image_files)
    with feature_cache.overridden(mode=cache):
        batch = model.encode(items, batch_size=len(items))
        single = np.stack([model.encode([item])[0] for item in items])
        reversed_batch = model.encode(items[::-1], batch_size=3)[::-1]
    assert batch.shape == (len(items), model.dim) and batch.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(batch, single, atol=1e-5)
    np.testing.assert_allclose(batch, reversed_batch, atol=1e-5)


def test_bf16_batch_and_one_by_one_agree_to_bf16_precision(models: dict[str, Encoder],
                                                          image_files: dict[str, Path]) -> None:
    """What a CPU with native bf16 gives by default: padding changes bf16 rounding, so rows move slightly
    with the batch (the fp32 test above holds them to 1e-5); they must stay the same vectors."""
    model = models["jfe-mini"]
    items = _mixed_items(image_files)
    batch = model.encode(items, batch_size=len(items), precision="bf16")
    single = np.stack([model.encode([item], precision="bf16")[0] for item in items])
    assert batch.dtype == np.float32 and np.allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    assert (batch * single).sum(1).min() >= 0.999


def test_encode_batches_like_items_together(models: dict[str, Encoder], image_files: dict[str, Path],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches group one modality (little padding) yet the rows come back in the caller's order."""
    model = models["jfe-mini"]
    items = _mixed_items(image_files)
    seen: list[list[str]] = []
    embed = model.embed
    monkeypatch.setattr(model, "embed", lambda batch, *vision: seen.append([i.modality for i in batch])
                        or embed(batch, *vision))
    vecs = model.encode(items, batch_size=2)
    flat = [m for batch in seen for m in batch]
    assert sorted(flat) == sorted(item.modality for item in items)
    changes = sum(a != b for a, b in zip(flat, flat[1:], strict=False))
    assert changes == len(set(flat)) - 1  # each modality in one run: 3 kinds, 2 boundaries
    assert flat != [item.modality for item in items]  # the input order (alternating) was not kept
    for item, vec in zip(items, vecs, strict=True):
        np.testing.assert_allclose(vec, model.encode([item])[0], atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_each_modality_is_used(models: dict[str, Encoder], image_files: dict[str, Path], name: str) -> None:
    model = models[name]
    image, text = image_files["red_square"], "make it a blue circle"
    vecs = model.encode([Item(image=image), Item(text=text), Item(image=image, text=text),
                         Item(image=image_files["blue_circle"], text=text), Item(image=image, text="a cat")])
    cos = vecs @ vecs.T
    assert cos[2, 0] < 1 - 1e-4 and cos[2, 1] < 1 - 1e-4  # image+text is neither part alone
    assert cos[2, 3] < 1 - 1e-4  # the image changes the fused vector
    assert cos[2, 4] < 1 - 1e-4  # the text changes the fused vector
    assert np.all(np.isfinite(vecs))


@pytest.mark.parametrize("name", MODELS)
def test_save_load_gives_identical_vectors(image_files: dict[str, Path], tmp_path: Path, name: str) -> None:
    model = load_model(name, device="cpu", seed=3, **SMALL)
    with torch.no_grad():  # make the glue non-default so a silent re-initialisation would be caught
        for pname, param in model.named_parameters():
            if not pname.startswith(("vision.", "text.")):
                param.add_(0.01)
    items = _mixed_items(image_files)
    before = model.encode(items)
    saved = model.save_pretrained(tmp_path / name)
    # text/ is MiniLM's config and tokenizer: with them the folder needs nothing from the asset cache
    assert sorted(p.name for p in saved.iterdir()) == ["config.json", "model.safetensors", "text"]
    loaded = load_model(saved, device="cpu")
    assert type(loaded) is type(model) and loaded.config == model.config
    np.testing.assert_allclose(loaded.encode(items), before, atol=1e-6)
    np.testing.assert_allclose(load_model(saved, device="cpu").encode(items), before, atol=1e-6)


@pytest.mark.parametrize("name", ["jfe-mini", "two-tower-mini"])
def test_a_saved_model_loads_with_an_empty_asset_cache(image_files: dict[str, Path], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """model.safetensors holds every weight and text/ MiniLM's config and tokenizer: a saved folder copied to
    a machine without `jfe assets fetch` loads and encodes the same vectors."""
    from jfe.models import text as text_module

    model = load_model(name, device="cpu", seed=5, pretrained=False, **SMALL)
    items = _mixed_items(image_files)
    before = model.encode(items)
    saved = model.save_pretrained(tmp_path / name)
    empty = tmp_path / "empty-cache"
    empty.mkdir()
    monkeypatch.setenv("JFE_CACHE", str(empty))
    for cached in (text_module.load_tokenizer, text_module._pristine_text_model):
        cached.cache_clear()  # nothing read before may help
    feature_cache.clear()

    def no_assets(*args: object, **kwargs: object) -> None:
        raise AssertionError("the asset cache was read")

    monkeypatch.setattr(assets, "minilm_dir", no_assets)
    monkeypatch.setattr(assets, "mobilenet_v2_weights", no_assets)
    loaded = load_model(saved, device="cpu")
    np.testing.assert_allclose(loaded.encode(items), before, atol=1e-6)
    assert list(empty.iterdir()) in ([], [empty / "features"])  # nothing fetched into it
    text_module.load_tokenizer.cache_clear()  # later tests read the asset's tokenizer again


@pytest.mark.parametrize("name", MODELS)
def test_bad_inputs_raise_clear_errors(models: dict[str, Encoder], tmp_path: Path, name: str) -> None:
    model = models[name]
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(DataError, match=r"corrupt\.png.*'q7'.*corrupt or unsupported"):
        model.encode([Item(text="fine"), Item(image=corrupt, id="q7")])
    with pytest.raises(DataError, match=r"missing\.png.*'d3'.*not found"):
        model.encode([Item(image=tmp_path / "missing.png", id="d3")])
    with pytest.raises(DataError, match=r"'e1'.*neither text nor image"):
        model.embed([Item(text="ok", id="e0"), Item(text="   ", id="e1")])
    with pytest.raises(DataError, match=r"item #1.*int"):
        model.encode(["fine", 42])
    with pytest.raises(DataError, match=r"item #0.*expected an Item"):
        model.embed(["raw strings go through encode()"])
    assert feature_cache.stats().entries == 0  # nothing half-computed was cached


@pytest.mark.parametrize("name", MODELS)
def test_set_trainable_freezes_what_it_says(name: str) -> None:
    model = load_model(name, device="cpu", **SMALL)
    model.set_trainable("align")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "align must train the glue"
    assert not any(n.startswith(("vision.", "text.")) for n in trainable), "towers must be frozen in align"
    glue = {n for n, p in model.named_parameters() if not n.startswith(("vision.", "text."))}
    assert trainable == glue
    model.set_trainable("full")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("vision.") for n in trainable), "freeze_vision keeps MobileNetV2 frozen"
    assert trainable == {n for n, _ in model.named_parameters() if not n.startswith("vision.")}
    with pytest.raises(ConfigError):
        model.set_trainable("everything")
    # a training step through the frozen tower reaches the glue and the LM, never the vision weights
    model.train()
    model.embed([Item(text="a", image=_shape_image((1, 2, 3), "square")), Item(text="b")]).sum().backward()
    assert all(p.grad is None for p in model.vision.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.text.parameters())


def test_unfrozen_vision_trains_and_bypasses_cache(image_files: dict[str, Path]) -> None:
    model = load_model("jfe-mini", device="cpu", freeze_vision=False, **SMALL)
    model.set_trainable("full")
    assert all(p.requires_grad for p in model.vision.parameters())
    model.train()
    model.embed([Item(image=image_files["red_square"])]).sum().backward()
    assert any(p.grad is not None for p in model.vision.parameters())
    assert feature_cache.stats().entries == 0


@pytest.mark.parametrize("name", ["jfe-mini", "two-tower-mini"])
def test_vision_top_trains_and_the_trunk_below_stays_cached(name: str, image_files: dict[str, Path],
                                                           tmp_path: Path) -> None:
    from jfe.models.vision import TRUNK_MODULES, preprocess

    model = load_model(name, device="cpu", vision_trainable_modules=3, **SMALL)
    model.set_trainable("align")
    assert model.vision.frozen and model.vision.split == TRUNK_MODULES, "align trains only the glue"
    model.set_trainable("full")
    trained = {n for n, p in model.vision.named_parameters() if p.requires_grad}
    assert trained and all(int(n.split(".")[1]) >= TRUNK_MODULES - 3 for n in trained)
    assert model.vision.split == TRUNK_MODULES - 3

    items = [Item(image=image_files["red_square"]), Item(image=image_files["blue_circle"], text="blue")]
    frozen_key = load_model(name, device="cpu", **SMALL).vision.cache_key(torch.float32)
    with feature_cache.overridden(dtype="float32"):
        feature_cache.clear()
        model.train()
        maps = model.image_features(items)
        # the cache holds the frozen part's output (the input of module 16), one entry per image
        stats = feature_cache.stats()
        assert stats.misses == 2 and stats.entries == 2
        assert model.vision.cache_key(torch.float32) != frozen_key
        pixels = preprocess([Image.open(image_files["red_square"]).convert("RGB")], 64)
        with torch.no_grad():
            np.testing.assert_allclose(maps[0].detach().numpy(), model.vision.features(pixels)[0].numpy(),
                                       atol=1e-4)
        model.embed(items).sum().backward()
        assert feature_cache.stats().hits == 2, "the second pass reads the frozen part from the cache"
    grads = {n: p.grad for n, p in model.vision.named_parameters()}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n in trained)
    assert all(g is None for n, g in grads.items() if n not in trained)

    # one optimiser step moves the top; the saved model gives back the same vectors
    before = model.encode(items)
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    after = model.encode(items)
    assert float(np.abs(after - before).max()) > 1e-4, "trained top weights must change the embeddings"
    model.save_pretrained(tmp_path / "m")
    np.testing.assert_allclose(load_model(tmp_path / "m", device="cpu").encode(items), after, atol=1e-5)
    # frozen again, the tower is refolded from the trained weights (no stale copy of the pre-training top)
    model.set_trainable("align")
    np.testing.assert_allclose(model.encode(items), after, atol=1e-5)


def test_a_loaded_model_caches_the_output_of_its_trained_vision_top(image_files: dict[str, Path],
                                                                     tmp_path: Path) -> None:
    """At inference every weight is frozen, so the trained top's output is cached too (keyed by all the trunk's
    weights): a second encode of the same images runs no MobileNetV2 module at all."""
    from jfe.models.vision import TRUNK_MODULES

    model = load_model("jfe-mini", device="cpu", vision_trainable_modules=3, **SMALL)
    model.set_trainable("full")  # a model being trained: its top is computed on the frozen part's cached output
    items = [Item(image=image_files["red_square"]), Item(image=image_files["blue_circle"], text="blue")]
    training_vectors = model.encode(items)
    loaded = load_model(model.save_pretrained(tmp_path / "m"), device="cpu")
    assert loaded.vision.frozen and loaded.vision.split == TRUNK_MODULES
    assert loaded.vision.cache_key(torch.float16) != model.vision.cache_key(torch.float16)
    calls: list[str] = []
    hooks = [m.register_forward_hook(lambda *_: calls.append("run")) for m in loaded.vision.features]
    feature_cache.clear()
    first = loaded.encode(items)
    ran = len(calls)
    again = loaded.encode(items)
    for hook in hooks:
        hook.remove()
    assert ran > 0 and len(calls) == ran, "the second encode read the whole trunk's output from the cache"
    np.testing.assert_array_equal(first, again)
    np.testing.assert_allclose(first, training_vectors, atol=2e-3)  # the same model; only fp16 storage differs
    # a frozen weight changed in place (no load_state_dict) is seen at once: no stale fingerprint or folded copy
    with torch.no_grad():
        [m for m in loaded.vision.modules() if isinstance(m, torch.nn.BatchNorm2d)][-1].running_mean.add_(0.5)
    changed = loaded.encode(items)
    assert np.abs(changed - first).max() > 1e-3
    with feature_cache.disabled():
        np.testing.assert_allclose(loaded.encode(items), changed, atol=2e-3)
    # set to train again, the top is computed (with autograd) on the frozen part's cached output
    loaded.set_trainable("full")
    assert loaded.vision.split == TRUNK_MODULES - 3


def test_vision_trainable_modules_is_checked() -> None:
    with pytest.raises(ConfigError, match="freeze_vision"):
        load_model("jfe-mini", device="cpu", freeze_vision=False, vision_trainable_modules=3, **SMALL)
    with pytest.raises(ConfigError):
        load_model("jfe-mini", device="cpu", vision_trainable_modules=20, **SMALL)


def test_align_vision_phase_trains_glue_and_vision_top_with_the_lm_frozen() -> None:
    model = load_model("jfe-mini", device="cpu", vision_trainable_modules=2, **SMALL)
    model.set_trainable("align+vision")

    def trains(module: torch.nn.Module) -> set[bool]:
        return {p.requires_grad for p in module.parameters()}

    assert trains(model.projector) == {True} and model.visual_position.requires_grad
    assert trains(model.text) == {False}
    assert model.vision.split == 19 - 2 and trains(model.vision.features[-2:]) == {True}
    assert trains(model.vision.features[:-2]) == {False}
    model.set_trainable("align")
    assert model.vision.frozen and trains(model.projector) == {True}
    with pytest.raises(ConfigError, match="vision_trainable_modules"):
        load_model("jfe-mini", device="cpu", **SMALL).set_trainable("align+vision")
    with pytest.raises(ConfigError, match="'align', 'align\\+vision', 'full'"):
        model.set_trainable("lm-only")


# --------------------------------------------------------------------------------------------- jfe-mini


def test_jfe_mini_text_only_is_minilm_sentence_embedding(models: dict[str, Encoder]) -> None:
    """Before training, a text-only input is exactly all-MiniLM-L6-v2's (mean-pooled) sentence embedding."""
    from jfe.models.text import load_text_model, load_tokenizer

    texts = ["a red square", "Find the picture this text describes. A much longer sentence, with punctuation!"]
    bert = load_text_model().eval()
    with torch.no_grad():
        batch = load_tokenizer()(texts, return_tensors="pt", padding=True)
        states = bert(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        expected = torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    np.testing.assert_allclose(models["jfe-mini"].encode(texts), expected, atol=1e-5)


def test_jfe_mini_sequence_layout(image_files: dict[str, Path]) -> None:
    model = load_model("jfe-mini", device="cpu", grid=2, global_token=False, image_size=64, pooling="cls")
    assert model.config.n_visual == 4
    items = _mixed_items(image_files)
    np.testing.assert_allclose(model.encode(items), np.stack([model.encode([i])[0] for i in items]), atol=1e-5)
    # instructions reach image-only queries as text tokens
    plain = model.encode([Item(image=image_files["red_square"])])
    instructed = model.encode([Item(image=image_files["red_square"])], instruction="Find a caption")
    assert float(plain[0] @ instructed[0]) < 1 - 1e-4


def test_jfe_mini_attention_pooling_starts_as_the_mean_and_learns(models: dict[str, Encoder],
                                                                   image_files: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    """Untrained, attention pooling is mean pooling (same vectors); it pads like it, trains in the glue
    phase, and once its queries move it weighs tokens unevenly (other vectors), surviving save/load."""
    model = load_model("jfe-mini-attnpool", device="cpu", **SMALL)
    assert model.config.pooling == "attention"
    items = _mixed_items(image_files)
    np.testing.assert_allclose(model.encode(items), models["jfe-mini"].encode(items), atol=1e-5)
    model.set_trainable("align")
    assert {n for n, p in model.named_parameters() if p.requires_grad} >= {"pool.query", "pool.key.weight"}
    model.train()
    model.embed(items[:3]).sum().backward()
    assert model.pool is not None and model.pool.query.grad is not None and model.pool.query.grad.abs().sum() > 0
    with torch.no_grad():
        model.pool.query.normal_(0, 1, generator=torch.Generator().manual_seed(0))
    moved = model.encode(items)
    assert (moved * models["jfe-mini"].encode(items)).sum(1).min() < 1 - 1e-4
    np.testing.assert_allclose(moved, np.stack([model.encode([i])[0] for i in items]), atol=1e-5)  # padding-free
    loaded = load_model(model.save_pretrained(tmp_path / "attnpool"), device="cpu")
    assert loaded.config.pooling == "attention"
    np.testing.assert_allclose(loaded.encode(items), moved, atol=1e-6)
    with pytest.raises(ConfigError, match="pool_heads"):
        load_model("jfe-mini", device="cpu", pooling="attention", pool_heads=5, **SMALL)


def test_max_text_tokens_truncates(models: dict[str, Encoder]) -> None:
    model = load_model("jfe-mini", device="cpu", max_text_tokens=4, **SMALL)
    a, b = model.encode(["one two three four five six", "one two three four seven eight"])
    np.testing.assert_allclose(a, b, atol=1e-6)


# --------------------------------------------------------------------------------------------- feature cache


def test_cache_hits_by_content_and_is_shared(models: dict[str, Encoder], image_files: dict[str, Path],
                                             tmp_path: Path) -> None:
    copy = tmp_path / "copy_of_red.png"
    copy.write_bytes(image_files["red_square"].read_bytes())
    models["jfe-mini"].encode([Item(image=image_files["red_square"])])
    assert feature_cache.stats().misses == 1 and feature_cache.stats().hits == 0
    # same bytes under another name, in another model with the same vision tower: no recomputation
    models["two-tower-mini"].encode([Item(image=copy, text="hi")])
    models["late-fusion-ff-mini"].encode([Item(image=image_files["red_square"])])
    stats = feature_cache.stats()
    assert (stats.misses, stats.hits, stats.entries) == (1, 2, 1)
    models["jfe-mini"].encode([Item(image=image_files["blue_square"])])
    assert feature_cache.stats().misses == 2


def test_vision_chunks_stay_under_glibcs_mmap_threshold_and_do_not_change_features() -> None:
    from jfe.models.vision import VisionTower

    for size in (64, 96, 128, 224, 384, 1024):
        chunk = feature_cache.vision_chunk(size)
        largest = chunk * 96 * ((size + 1) // 2) ** 2 * 4  # bytes: 96 channels at half the side, fp32
        assert chunk >= 1 and (largest <= 30 << 20 or chunk == 1), (size, chunk)
    assert feature_cache.vision_chunk(224) == 6 and feature_cache.vision_chunk(128) == 20
    assert feature_cache.vision_chunk(224, "cuda") == 64
    tower = VisionTower(64, pretrained=False)
    images = [Image.new("RGB", (64, 64), (20 * i, 255 - 20 * i, 7 * i)) for i in range(7)]
    with feature_cache.disabled():
        whole = feature_cache.feature_maps(tower, images, batch_size=7)
        chunked = feature_cache.feature_maps(tower, images)  # vision_chunk(64) = 32: one call, so force 3
        in_threes = feature_cache.feature_maps(tower, images, batch_size=3)
    torch.testing.assert_close(chunked, whole)
    torch.testing.assert_close(in_threes, whole, rtol=1e-4, atol=1e-5)


def test_cache_key_follows_vision_config(image_files: dict[str, Path]) -> None:
    from jfe.models.vision import VisionTower

    small, large = VisionTower(64), VisionTower(96)
    assert small.cache_key(torch.float16) != large.cache_key(torch.float16)
    assert small.cache_key(torch.float16) != small.cache_key(torch.float32)
    random = VisionTower(64, pretrained=False)
    assert random.cache_key(torch.float16) != small.cache_key(torch.float16)
    before = random.cache_key(torch.float16)
    random.load_state_dict(small.state_dict())
    assert random.cache_key(torch.float16) == small.cache_key(torch.float16) != before


def test_disk_cache_survives_memory_and_ignores_damaged_files(models: dict[str, Encoder],
                                                             image_files: dict[str, Path], tmp_path: Path) -> None:
    model = models["jfe-mini"]
    items = [Item(image=image_files["red_square"]), Item(image=image_files["blue_circle"], text="a circle")]
    with feature_cache.overridden(mode="disk", directory=tmp_path / "disk"):
        first = model.encode(items)
        files = sorted((tmp_path / "disk").rglob("*.npy"))
        assert len(files) == 2 and not list((tmp_path / "disk").rglob("*.tmp"))
        feature_cache.clear()  # a new process: memory empty, disk kept
        np.testing.assert_allclose(model.encode(items), first, atol=1e-6)
        assert feature_cache.stats().disk_hits == 2 and feature_cache.stats().misses == 0
        feature_cache.clear()
        files[0].write_bytes(b"garbage")  # a damaged entry is recomputed, not trusted
        # (recomputed in a batch of one: float16 storage may round a last bit differently, hence 1e-4)
        np.testing.assert_allclose(model.encode(items), first, atol=1e-4)
        assert feature_cache.stats().misses == 1


def test_memory_budget_evicts_least_recently_used(models: dict[str, Encoder],
                                                  image_files: dict[str, Path]) -> None:
    one_map_mb = 1280 * 2 * 2 * 2 / 2**20  # float16 [1280, 2, 2] at 64 px
    with feature_cache.overridden(memory_mb=one_map_mb * 2.5):
        for key in ("red_square", "blue_square", "red_circle"):
            models["jfe-mini"].encode([Item(image=image_files[key])])
        stats = feature_cache.stats()
        assert stats.entries == 2 and stats.evictions == 1


def test_cache_settings_validate() -> None:
    with pytest.raises(ConfigError):
        feature_cache.configure(mode="sometimes")
    with pytest.raises(ConfigError):
        feature_cache.configure(dtype="int8")


# --------------------------------------------------------------------------------------------- registry + CLI


def test_registry_names_overrides_and_errors(tmp_path: Path) -> None:
    from jfe.models import list_models

    names = {info.name for info in list_models()}
    assert set(MODELS) <= names
    with pytest.raises(ConfigError, match="unknown model 'no-such-model'"):
        load_model("no-such-model")
    with pytest.raises(ConfigError, match="grid"):
        load_model("jfe-mini", image_size=64, grid=3)  # 64 px gives a 2x2 map
    with pytest.raises(ConfigError, match="embed_dim"):
        load_model("jfe-mini", embed_dim=128)
    with pytest.raises(ConfigError, match="not a saved JFE model"):
        load_model(tmp_path)
    saved = load_model("late-fusion-ff-mini", device="cpu", **SMALL).save_pretrained(tmp_path / "ff")
    with pytest.raises(ConfigError, match="do not (fit|match)"):
        load_model(saved, fusion_layers=3)
    assert load_model(saved, device="cpu", dropout=0.0).config.dropout == 0.0


def test_cli_models_list_and_encode(image_files: dict[str, Path], tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from jfe.cli import app

    runner = CliRunner()
    listed = runner.invoke(app, ["models", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    assert set(MODELS) <= {row["name"] for row in json.loads(listed.output)}
    roles = {row["name"]: row["fusion_role"] for row in json.loads(listed.output)}
    assert roles["jfe-mini"] == "one-tower" and roles["late-fusion-sf-mini"] == "late-fusion"

    saved = load_model("jfe-mini", device="cpu", **SMALL).save_pretrained(tmp_path / "m")
    out = tmp_path / "vectors.npy"
    result = runner.invoke(app, ["encode", "--model", str(saved), "--text", "make it blue", "--text", "a circle",
                                 "--image", str(image_files["red_square"]), "--image", str(image_files["red_circle"]),
                                 "--instruction", "Apply the edit", "--out", str(out)])
    assert result.exit_code == 0, result.output
    vectors = np.load(out)
    model = load_model(saved, device="cpu")
    expected = model.encode([Item(text="make it blue", image=image_files["red_square"]),
                             Item(text="a circle", image=image_files["red_circle"])], instruction="Apply the edit")
    np.testing.assert_allclose(vectors, expected, atol=1e-6)

    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"text": "hello"}) + "\n" + json.dumps({"image": "red_square.png"}) + "\n")
    result = runner.invoke(app, ["encode", "--model", str(saved), "--items", str(items), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert np.load(out).shape == (2, 384)

    bad = runner.invoke(app, ["encode", "--text", "a", "--image", "x.png", "--image", "y.png", "--out", str(out)])
    assert isinstance(bad.exception, ConfigError)


def test_hf_prefix_resolves_lazily_to_the_hf_adapter(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``hf:<path>`` goes to ``jfe.models.hf.HFEncoder._from_path`` (faked here: no MLLM is built)."""
    import sys
    import types

    from jfe.models.toy import ToyEncoder

    calls = []

    class FakeHF:
        @classmethod
        def _from_path(cls, path, device=None, **overrides):  # noqa: ANN001, ANN206
            calls.append((str(path), overrides))
            return ToyEncoder()

    monkeypatch.setitem(sys.modules, "jfe.models.hf", types.SimpleNamespace(HFEncoder=FakeHF))
    model = load_model(f"hf:{tmp_path}/qwen", device="cpu", pooling="last")
    assert isinstance(model, ToyEncoder) and not model.training
    assert calls == [(f"{tmp_path}/qwen", {"pooling": "last"})]


@pytest.mark.parametrize("name", MODELS)
def test_embed_under_bf16_autocast(models: dict[str, Encoder], image_files: dict[str, Path], name: str) -> None:
    """Training may wrap embed() in autocast; mixed-precision outputs must still assemble and stay close."""
    items = _mixed_items(image_files)[:3]
    reference = models[name].encode(items)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = models[name].embed(items).float().numpy()
    assert np.all(np.isfinite(mixed))
    assert np.all(np.sum(mixed * reference, axis=1) > 0.95)


def test_a_subclass_without_an_arch_of_its_own_does_not_replace_its_parent() -> None:
    from jfe.models.base import Encoder
    from jfe.models.toy import ToyEncoder

    class Double(ToyEncoder):  # a test double, as tests and users write them
        def __init__(self) -> None:
            super().__init__()

    assert Encoder._registry["toy-hash"] is ToyEncoder and Double.arch == "toy-hash"
    assert type(load_model("toy")) is ToyEncoder


def test_models_list_describes_trained_weights_by_their_saved_config(tmp_path: Path) -> None:
    """`make demo` registers a 2x2 model under `jfe-mini`, whose name's description says 4x4: the list says
    what the weights are, from their config.json."""
    import json

    from typer.testing import CliRunner

    from jfe.cli import app

    saved = load_model("jfe-mini-2x2", device="cpu", pretrained=False).save_pretrained(tmp_path / "m")
    runner = CliRunner()
    assert runner.invoke(app, ["models", "register", "jfe-mini", str(saved), "--tag", "demo"]).exit_code == 0
    listed = runner.invoke(app, ["models", "list"])
    line = next(row for row in listed.output.splitlines() if row.startswith("jfe-mini "))
    assert "trained: demo" in line and "its weights are grid=2" in line
    rows = {row["name"]: row for row in json.loads(runner.invoke(app, ["models", "list", "--json"]).output)}
    assert rows["jfe-mini"]["differs"] == {"grid": 2} and rows["jfe-mini-2x2"]["differs"] == {}
