"""The HF MLLM reranker (``hf-rerank:<path>``) over a tiny, randomly initialised Qwen2-VL built here: the pair is
read in one prompt, scores are yes/no logit margins, it trains with LoRA through ``jfe train rerank`` and reloads
as a standard PEFT adapter to identical scores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import jfe
from jfe.data.items import Item
from jfe.errors import ConfigError
from jfe.models import load_model
from jfe.models.hf_rerank import HFReranker
from jfe.models.toy import ToyEncoder
from jfe.train import train
from jfe.train.config import load_config
from jfe.train.mine import mine, write_mined
from jfe.train.synthetic import write_synthetic_mbeir
from test_models_hf import _image, build_tiny_qwen2_vl  # the HF tests' tiny model builder (tests/ is on sys.path)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen2_vl(tmp_path_factory.mktemp("tiny-qwen2-vl"))


@pytest.fixture(scope="module")
def reranker(tiny_dir: Path) -> HFReranker:
    model = load_model(f"hf-rerank:{tiny_dir}", device="cpu")
    assert isinstance(model, HFReranker)
    return model


def _scores(model: HFReranker, query: Item, candidates: list[Item]) -> np.ndarray:
    return model.rerank([query], [candidates], precision="fp32")[0]


def test_the_score_is_the_yes_no_margin_of_the_lm_head(reranker: HFReranker, tiny_dir: Path) -> None:
    from transformers import AutoModelForImageTextToText

    query, candidate = Item(text="find the red cat", id="q"), Item(text="a cat with a hat", id="c")
    full = AutoModelForImageTextToText.from_pretrained(tiny_dir).eval()
    inputs = reranker.model_inputs(["q/c"], [reranker.pair_prompt(query, candidate)], [])
    with torch.no_grad():
        logits = full(**inputs).logits[0, -1]
    yes, no = (reranker.tokenizer.convert_tokens_to_ids(t) for t in ("yes", "no"))
    np.testing.assert_allclose(_scores(reranker, query, [candidate]), [float(logits[yes] - logits[no])], atol=1e-5)
    assert reranker.answer_head.shape == (2, reranker.dim) and not reranker.reads_first_stage


def test_pairs_are_read_together(reranker: HFReranker) -> None:
    q1 = Item(text="find the red cat", image=_image(40, 30, 1), id="q1")
    q2 = Item(text="the moon one hour later", image=_image(30, 40, 2), id="q2")
    c1, c2 = Item(text="a cat", image=_image(60, 60, 3), id="c1"), Item(text="a cat", image=_image(60, 60, 4), id="c2")
    a, b = _scores(reranker, q1, [c1, c2]), _scores(reranker, q2, [c1, c2])
    assert abs(a[0] - a[1]) > 1e-6  # only the candidate's image differs: the score moves
    # fusion across the pair: how much c1 beats c2 depends on the query (a sum of separate terms could not)
    assert abs((a[0] - a[1]) - (b[0] - b[1])) > 1e-6
    # batched = one pair at a time, and deterministic
    mixed = [c1, Item(text="moon", id="t"), Item(image=_image(50, 50, 5), id="i"), c2]
    together = _scores(reranker, q1, mixed)
    np.testing.assert_allclose(together, [_scores(reranker, q1, [c])[0] for c in mixed], atol=1e-5)
    np.testing.assert_array_equal(together, _scores(reranker, q1, mixed))


def test_api_needs_no_first_stage_and_names_bad_answer_tokens(reranker: HFReranker, tiny_dir: Path) -> None:
    scores = jfe.rerank("find the red cat", ["a cat", "moon"], model=reranker, precision="fp32")
    np.testing.assert_allclose(scores, _scores(reranker, Item(text="find the red cat"),
                                               [Item(text="a cat"), Item(text="moon")]), atol=1e-6)
    with pytest.raises(ConfigError, match="'maybe so' is 2 tokens"):
        load_model(f"hf-rerank:{tiny_dir}", device="cpu", yes_token="maybe so")
    with pytest.raises(ConfigError, match="not a reranker"):
        jfe.rerank("x", ["y"], model=f"hf:{tiny_dir}")


def test_lora_training_step_and_reload_as_a_peft_adapter(tiny_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    root = write_synthetic_mbeir(tmp_path / "data")
    mined = write_mined(tmp_path / "mined.jsonl", mine(ToyEncoder(), root, split="train", k=4, progress=False))
    # the shipped config, every key kept but the placeholders and the sizes
    cfg = load_config(REPO / "configs" / "rerank" / "hf-qwen2vl-rerank.toml", {
        "model": f"hf-rerank:{tiny_dir}", "model_overrides.lora_r": 4, "model_overrides.lora_alpha": 8,
        "data": str(root), "train_split": "train", "train_pool": [], "mined": str(mined),
        "output_dir": str(tmp_path / "run"), "steps": 2, "batch_size": 2, "hard_negatives": 2, "grad_cache_chunk": 1,
        "lr": 1e-2, "glue_lr": 1e-2, "warmup_steps": 0, "log_every": 1, "precision": "fp32", "device": "cpu",
        "task_weights": {0: 1.0, 7: 1.0}})
    folder = train(cfg, progress=False)
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    trained = load_model(folder, device="cpu")
    assert isinstance(trained, HFReranker) and trained.config.lora_r == 4
    query = Item(text="find the red cat", image=_image(40, 30, 1), id="q")
    candidates = [Item(text="a cat", image=_image(60, 60, 3), id="c1"), Item(text="moon", id="c2")]
    before = _scores(load_model(f"hf-rerank:{tiny_dir}", device="cpu"), query, candidates)  # type: ignore[arg-type]
    after = _scores(trained, query, candidates)
    assert np.abs(after - before).max() > 1e-4  # the step moved the scores
    # peft's own loader on the plain transformers model + the two answer rows JFE saved = the same scores
    base = AutoModelForImageTextToText.from_pretrained(tiny_dir).eval()
    peft_model = PeftModel.from_pretrained(base, str(folder)).eval()
    rows = load_file(str(folder / "model.safetensors"))
    prompts = [trained.pair_prompt(query, c) for c in candidates]
    images = [(0, query.load_image()), (0, candidates[0].load_image()), (1, query.load_image())]
    inputs = trained.model_inputs(["c1", "c2"], prompts, images)
    with torch.no_grad():
        hidden = peft_model.base_model.model.model(**inputs, use_cache=False).last_hidden_state
    last = hidden[torch.arange(2), inputs["attention_mask"].sum(1) - 1] if trained.tokenizer.padding_side == "right" \
        else hidden[:, -1]
    logits = last @ rows["answer_head"].t()
    np.testing.assert_allclose(after, (logits[:, 0] - logits[:, 1]).numpy(), atol=1e-5)
    assert json.loads((folder / "config.json").read_text())["arch"] == "hf-mllm-rerank"


def test_eval_and_service_rerank_with_the_mllm(reranker: HFReranker, tiny_mbeir: Path, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from jfe.eval import evaluate
    from jfe.eval.runfiles import read_trec_run
    from jfe.indexing import build_index
    from jfe.serve.app import create_app
    from jfe.serve.schemas import ServeSettings

    evaluate(ToyEncoder(), tiny_mbeir, progress=False, reranker=reranker, rerank_k=3, out_dir=tmp_path / "out",
             model_name="toy")
    first, final = (read_trec_run(tmp_path / "out" / name) for name in ("run.first_stage.trec", "run.trec"))
    assert first.keys() == final.keys()
    assert any([d for d, _ in final[q][:3]] != [d for d, _ in first[q][:3]] for q in final)  # the MLLM reordered
    pools = sorted((tiny_mbeir / "cand_pool" / "global").glob("*.jsonl"))
    toy = ToyEncoder()
    index = build_index(toy, pools, tiny_mbeir, progress=False, model_name="toy")
    with TestClient(create_app(toy, index, ServeSettings(), {"mllm": reranker})) as client:
        plain = client.post("/search", json={"text": "a red square", "k": 4}).json()
        body = client.post("/search", json={"text": "a red square", "k": 3, "rerank": "mllm", "rerank_k": 4}).json()
        assert body["reranked_by"] == "mllm" and len(body["results"]) == 3
        shortlist = [h["did"] for h in plain["results"]]
        assert all(shortlist[h["first_stage_rank"] - 1] == h["did"] for h in body["results"])
        # /v1/rerank: image documents scored by the MLLM alone (no first stage), as jfe.rerank scores them
        import base64

        images = sorted((tiny_mbeir / "images" / "tiny").glob("*.png"))[:3]
        urls = ["data:image/png;base64," + base64.b64encode(p.read_bytes()).decode() for p in images]
        ranked = client.post("/v1/rerank", json={"query": "a red square", "documents": [{"image": u} for u in urls],
                                                 "return_documents": False}).json()
        expected = _scores(reranker, Item(text="a red square"), [Item(image=p) for p in images])
        assert [r["index"] for r in ranked["results"]] == list(np.argsort(-expected, kind="stable"))
        np.testing.assert_allclose(sorted(r["relevance_score"] for r in ranked["results"]), sorted(expected),
                                   atol=1e-4)


@pytest.mark.parametrize("family", ["LLaVA", "Gemma3", "mllama (Llama 3.2 Vision)", "Qwen3-VL"])
def test_other_families_read_two_images_per_pair(tmp_path: Path, family: str) -> None:
    """A pair prompt holds up to two images (the query's and the candidate's): every family's inputs take them, and
    a batch mixing text-only, one-image and two-image pairs scores as the pairs one by one."""
    from test_models_hf import FAMILIES

    model = load_model(f"hf-rerank:{FAMILIES[family](tmp_path / 'tiny')}", device="cpu")
    assert isinstance(model, HFReranker)
    query = Item(text="find the red cat", image=_image(40, 40, 1), id="q")
    candidates = [Item(text="a cat", image=_image(48, 48, 3), id="c1"), Item(text="moon", id="c2"),
                  Item(image=_image(40, 40, 4), id="c3")]
    together = _scores(model, query, candidates)
    np.testing.assert_allclose(together, [_scores(model, query, [c])[0] for c in candidates], atol=1e-4)
    text_query = _scores(model, Item(text="moon", id="t"), candidates)
    np.testing.assert_allclose(text_query, [_scores(model, Item(text="moon"), [c])[0] for c in candidates], atol=1e-4)
