"""Rerankers (jfe.models.rerankers), mining (jfe.train.mine), reranker training (stage rerank) and reranking in
eval, the Python API, the CLI and the service."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from typer.testing import CliRunner

import jfe
from jfe.cli import app
from jfe.data.items import Item
from jfe.errors import ConfigError, DataError
from jfe.eval import evaluate
from jfe.indexing import build_index
from jfe.models import load_model
from jfe.models.baselines import TwoTowerConfig, TwoTowerMini
from jfe.models.jfe_mini import JFEMini, JFEMiniConfig
from jfe.models.rerankers import JointRerankConfig, JointReranker, LateReranker, Reranker
from jfe.models.toy import ToyEncoder
from jfe.serve.app import create_app
from jfe.serve.schemas import ServeSettings
from jfe.train.mine import mine, read_mined, write_mined
from jfe.train.run import train

TINY = {"red_square": "images/tiny/red_square.png", "blue_square": "images/tiny/blue_square.png",
        "red_circle": "images/tiny/red_circle.png", "blue_circle": "images/tiny/blue_circle.png"}


@pytest.fixture(scope="module")
def joint() -> JointReranker:
    """jfe-mini-rerank on the pretrained towers with a score head that is no longer zero (as after training)."""
    model = JointReranker(JointRerankConfig(grid=2, retriever="toy")).eval()
    with torch.no_grad():
        last = model.head[-1]
        assert isinstance(last, torch.nn.Linear)
        last.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
    return model


def _items(root: Path) -> dict[str, Item]:
    return {name: Item(image=root / rel, id=name) for name, rel in TINY.items()}


# ---------------------------------------------------------------------------------------------- the models
def test_untrained_reranker_ranks_exactly_as_the_first_stage(tiny_mbeir: Path) -> None:
    model = JointReranker(JointRerankConfig(grid=2)).eval()
    items = _items(tiny_mbeir)
    prior = torch.tensor([0.3, 0.9, -0.2, 0.5])
    scores = model.score_pairs([Item(text="make it blue", image=items["red_square"].image)], list(items.values()),
                               [0, 0, 0, 0], prior)
    assert torch.equal(scores, 20.0 * prior)  # the zero-initialised head adds nothing: the retriever's order


def test_joint_score_fuses_query_and_candidate(joint: JointReranker, tiny_mbeir: Path) -> None:
    """Changing only the candidate's image changes the score, and the effect of the candidate depends on the query:
    score(q1,c1) - score(q1,c2) != score(q2,c1) - score(q2,c2), which no sum of a query part and a candidate part
    can give. Query and candidate meet inside the one sequence."""
    items = _items(tiny_mbeir)
    q1 = Item(text="make it blue", image=items["red_square"].image)
    q2 = Item(text="make it a circle", image=items["blue_square"].image)
    c1, c2 = items["blue_square"], items["red_circle"]
    prior = torch.zeros(4)
    with torch.no_grad():
        s = joint.score_pairs([q1, q2], [c1, c2, c1, c2], [0, 0, 1, 1], prior)
    assert abs(float(s[0] - s[1])) > 1e-4
    interaction = float((s[0] - s[1]) - (s[2] - s[3]))
    assert abs(interaction) > 1e-4


def test_pairs_are_packed_as_one_sequence_each(tiny_mbeir: Path) -> None:
    from jfe.models.packing import pack_pairs

    images = _items(tiny_mbeir)
    image = next(iter(images.values()))
    queries = [Item(text="a red square", image=image.image, id="q0"), Item(text="a circle", id="q1")]
    candidates = [Item(text="red", image=image.image, id="c0"), Item(text="blue", id="c1"),
                  Item(image=image.image, id="c2")]
    config = JointRerankConfig(grid=2)
    packed = pack_pairs(queries, candidates, [0, 1, 0], config)
    k = config.n_visual
    ids, mask, types, where = (packed.inputs[n] for n in ("input_ids", "attention_mask", "token_type_ids",
                                                          "visual_index"))
    # the query image once, then the candidates' images: q0, c0, c2
    assert [item.id for item in packed.images] == ["q0", "c0", "c2"]
    for row in range(3):
        length = int(mask[row].sum())
        segment = types[row, :length].tolist()
        query_len = segment.index(1)
        assert segment == [0] * query_len + [1] * (length - query_len) and types[row, length:].eq(0).all()
        sep = ids[row, query_len - 1]
        assert ids[row, length - 1] == sep  # each segment ends with [SEP]
    assert where[0, 1:1 + k].tolist() == list(range(0, k))            # q0's tokens after [CLS]
    row0_candidate = types[0].tolist().index(1)
    assert where[0, row0_candidate:row0_candidate + k].tolist() == list(range(k, 2 * k))  # c0's
    assert (where[1] < 0).all()                                          # text-only pair: no visual slot
    row2_candidate = types[2].tolist().index(1)
    assert where[2, 1:1 + k].tolist() == list(range(0, k))            # q0 again, the same tokens
    assert where[2, row2_candidate:row2_candidate + k].tolist() == list(range(2 * k, 3 * k))  # c2's
    assert int((where >= 0).sum()) == 4 * k


def test_reranking_is_deterministic_and_batch_independent(joint: JointReranker, tiny_mbeir: Path) -> None:
    items = list(_items(tiny_mbeir).values())
    queries = [Item(text="make it red", image=items[1].image), "a blue circle"]
    lists = [items, items[:3]]
    priors = [[0.1, 0.2, 0.3, 0.4], [0.5, 0.1, 0.0]]
    one = joint.rerank(queries, lists, priors, batch_size=1)
    again = joint.rerank(queries, lists, priors, batch_size=64)
    for a, b in zip(one, again, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert [len(a) for a in one] == [4, 3]
    np.testing.assert_array_equal(one[0], joint.rerank(queries, lists, priors, batch_size=1)[0])


def test_reranker_refuses_to_embed_and_needs_a_first_stage(joint: JointReranker) -> None:
    with pytest.raises(ConfigError, match="reranker"):
        joint.encode(["a red square"])
    with pytest.raises(ConfigError, match="first stage"):
        joint.rerank(["q"], [["a", "b"]])
    with pytest.raises(ConfigError, match="2 candidates but 1"):
        joint.rerank(["q"], [["a", "b"]], [[0.5]])


def test_start_from_a_trained_encoder_copies_it() -> None:
    encoder = JFEMini(JFEMiniConfig(grid=2, seed=3))
    reranker = JointReranker.from_encoder(encoder)
    for name, tensor in encoder.state_dict().items():
        assert torch.equal(reranker.state_dict()[name], tensor), name
    assert reranker.config.grid == 2 and reranker.config.pretrained
    late = LateReranker.from_encoder(TwoTowerMini(TwoTowerConfig(seed=1)))
    assert torch.equal(late.image_proj.weight, TwoTowerMini(TwoTowerConfig(seed=1)).image_proj.weight)
    with pytest.raises(ConfigError, match="starts from a trained jfe-mini"):
        JointReranker.from_encoder(TwoTowerMini())


def test_late_reranker_starts_at_the_first_stage_and_reads_both_vectors(tiny_mbeir: Path) -> None:
    model = LateReranker.from_encoder(TwoTowerMini()).eval()
    items = list(_items(tiny_mbeir).values())
    prior = torch.tensor([0.1, 0.4, 0.2, 0.3])
    with torch.no_grad():
        assert torch.equal(model.score_pairs([Item(text="red")], items, [0] * 4, prior), 20.0 * prior)
        model.head[-1].weight.normal_()  # type: ignore[operator]
        moved = model.score_pairs([Item(text="red")], items, [0] * 4, prior)
    assert not torch.allclose(moved, 20.0 * prior)


def test_saved_reranker_reloads_to_identical_scores(joint: JointReranker, tmp_path: Path, tiny_mbeir: Path) -> None:
    joint.save_pretrained(tmp_path / "rr")
    again = load_model(tmp_path / "rr")
    assert isinstance(again, JointReranker) and again.config.retriever == "toy"
    items = list(_items(tiny_mbeir).values())
    prior = [[0.2, 0.1, 0.0, 0.3]]
    np.testing.assert_allclose(joint.rerank(["blue"], [items], prior)[0], again.rerank(["blue"], [items], prior)[0],
                               atol=1e-6)


# ---------------------------------------------------------------------------------------------- mining
def _hide_test_split(root: Path) -> None:
    """Make every test-split file unreadable garbage: mining the train split must not open them."""
    for folder in (root / "query" / "test", root / "qrels" / "test"):
        for path in folder.iterdir():
            path.write_bytes(b"\xff\xfe not json")


def test_mined_negatives_exclude_positives_and_never_read_test(tiny_mbeir: Path, tmp_path: Path) -> None:
    _hide_test_split(tiny_mbeir)
    mined = mine(ToyEncoder(), tiny_mbeir, split="train", k=3, progress=False)
    assert mined.meta["split"] == "train" and len(mined.queries) == 2
    qrels = {line.split()[0]: line.split()[2] for line in
             (tiny_mbeir / "qrels" / "train" / "mbeir_tiny_task0_train_qrels.txt").read_text().splitlines()}
    for qid, entry in mined.queries.items():
        dids = [d for d, _ in entry.negatives]
        assert qrels[qid] in entry.positives and qrels[qid] not in dids
        assert len(dids) == 3 and len(set(dids)) == 3
        scores = [s for _, s in entry.negatives]
        assert scores == sorted(scores, reverse=True)
    out = write_mined(tmp_path / "mined.jsonl", mined)
    back = read_mined(out, split="train")
    assert back.queries.keys() == mined.queries.keys() and back.meta["k"] == 3
    with pytest.raises(ConfigError, match="mined on split 'train'"):
        read_mined(out, split="test")


def test_mining_refuses_an_unknown_pool(tiny_mbeir: Path) -> None:
    with pytest.raises(ConfigError, match="pool must be 'local' or 'global'"):
        mine(ToyEncoder(), tiny_mbeir, split="train", k=3, pool="lokal", progress=False)


def test_margin_drops_likely_false_negatives(tiny_mbeir: Path) -> None:
    loose = mine(ToyEncoder(), tiny_mbeir, split="train", k=3, progress=False)
    strict = mine(ToyEncoder(), tiny_mbeir, split="train", k=3, margin=0.0, progress=False)
    for qid, entry in strict.queries.items():
        best = max(entry.positives.values())
        assert all(score <= best for _, score in entry.negatives)
        assert len(entry.negatives) <= len(loose.queries[qid].negatives)


def test_mined_file_is_checked_and_never_overwrites_foreign_files(tiny_mbeir: Path, tmp_path: Path) -> None:
    mined = mine(ToyEncoder(), tiny_mbeir, split="train", k=2, progress=False)
    precious = tmp_path / "notes.jsonl"
    precious.write_text("my own data\n")
    with pytest.raises(ConfigError, match="not a mined-negatives file"):
        write_mined(precious, mined)
    assert precious.read_text() == "my own data\n"
    bad = tmp_path / "bad.jsonl"
    first = next(iter(mined.queries.values()))
    pos = next(iter(first.positives))
    bad.write_text(json.dumps({"jfe_mined": mined.meta}) + "\n" + json.dumps(
        {"qid": first.qid, "task_id": 0, "positives": {pos: 0.5}, "negatives": [[pos, 0.4]]}) + "\n")
    with pytest.raises(DataError, match="negatives include positives") as info:
        read_mined(bad)
    assert first.qid in str(info.value) and "bad.jsonl" in str(info.value)


def test_jfe_mine_command(tiny_mbeir: Path, tmp_path: Path) -> None:
    out = tmp_path / "mined.jsonl"
    result = CliRunner().invoke(app, ["mine", "--model", "toy", "--data", str(tiny_mbeir), "--k", "2",
                                      "--out", str(out), "--quiet", "--precision", "fp32"])
    assert result.exit_code == 0, result.output
    assert "2 queries" in result.output and read_mined(out).meta["retriever"] == "toy"


# ---------------------------------------------------------------------------------------------- training
def _config(tiny_mbeir: Path, mined: Path, out: Path, **extra: object) -> dict:
    return {"stage": "rerank", "model": "jfe-mini-rerank", "model_overrides": {"grid": 2, "retriever": "toy"},
            "data": str(tiny_mbeir), "mined": str(mined), "output_dir": str(out), "steps": 4, "batch_size": 2,
            "hard_negatives": 2, "lr": 1e-4, "glue_lr": 1e-2, "warmup_steps": 1, "log_every": 1,
            "checkpoint_every": 2, "precision": "fp32", "instructions": False, **extra}


def test_train_rerank_learns_and_resumes_exactly(tiny_mbeir: Path, tmp_path: Path) -> None:
    mined = write_mined(tmp_path / "mined.jsonl", mine(ToyEncoder(), tiny_mbeir, split="train", k=3, progress=False))
    whole = train(_config(tiny_mbeir, mined, tmp_path / "whole"), progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and all(np.isfinite(losses))
    model = load_model(whole)
    assert isinstance(model, JointReranker)
    assert float(model.head[-1].weight.detach().abs().sum()) > 0  # type: ignore[union-attr]  # the head has learned
    # a run killed after step 2 and resumed ends with the very weights of the uninterrupted run
    cfg = _config(tiny_mbeir, mined, tmp_path / "split", stop_at_step=2)
    train(cfg, progress=False)
    resumed = train({**cfg, "stop_at_step": None}, resume=True, progress=False)
    for (name, a), b in zip(model.state_dict().items(), load_model(resumed).state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name


def test_train_rerank_refuses_lists_mined_on_test(tiny_mbeir: Path, tmp_path: Path) -> None:
    mined = write_mined(tmp_path / "mined.jsonl", mine(ToyEncoder(), tiny_mbeir, split="test", k=2, progress=False))
    with pytest.raises(ConfigError, match="mined on split 'test'"):
        train(_config(tiny_mbeir, mined, tmp_path / "run"), progress=False)
    with pytest.raises(ConfigError, match="needs `mined`"):
        train({**_config(tiny_mbeir, mined, tmp_path / "run"), "mined": None}, progress=False)


# ---------------------------------------------------------------------------------------------- eval, API, service
def test_eval_with_untrained_reranker_scores_as_the_first_stage(tiny_mbeir: Path, tmp_path: Path) -> None:
    untrained = JointReranker(JointRerankConfig(grid=2, retriever="toy"))
    plain = evaluate(ToyEncoder(), tiny_mbeir, progress=False)
    reranked = evaluate(ToyEncoder(), tiny_mbeir, progress=False, reranker=untrained, rerank_k=4,
                        out_dir=tmp_path / "out", model_name="toy", reranker_name="untrained")
    assert reranked.rows == plain.rows and reranked.reranker == "untrained" and reranked.rerank_k == 4
    assert (tmp_path / "out" / "run.first_stage.trec").is_file() and "rerank" in reranked.timings


def test_eval_reranks_the_shortlist(joint: JointReranker, tiny_mbeir: Path, tmp_path: Path) -> None:
    from jfe.eval.runfiles import read_trec_run

    evaluate(ToyEncoder(), tiny_mbeir, progress=False, reranker=joint, rerank_k=3, out_dir=tmp_path / "out",
             model_name="toy")
    first = read_trec_run(tmp_path / "out" / "run.first_stage.trec")
    final = read_trec_run(tmp_path / "out" / "run.trec")
    assert first.keys() == final.keys()
    moved = 0
    for qid, hits in final.items():
        top3 = [d for d, _ in hits[:3]]
        assert sorted(top3) == sorted(d for d, _ in first[qid][:3])  # the same shortlist, reordered
        assert [d for d, _ in hits[3:]] == [d for d, _ in first[qid][3:]]  # below it: the first stage's order
        moved += top3 != [d for d, _ in first[qid][:3]]
        scores = [s for _, s in hits]
        assert scores == sorted(scores, reverse=True)  # sorted by score, as trec_eval reads a run
    assert moved > 0


def test_search_with_rerank_api_and_cli(joint: JointReranker, tiny_mbeir: Path, tmp_path: Path) -> None:
    pools = sorted((tiny_mbeir / "cand_pool" / "global").glob("*.jsonl"))
    index = build_index(ToyEncoder(), pools, tiny_mbeir, progress=False, model_name="toy")
    hits = jfe.search(index, "a red square", model=ToyEncoder(), k=5, rerank=joint, rerank_k=6)
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    deep = jfe.search(index, "a red square", model=ToyEncoder(), k=8, rerank=joint, rerank_k=3)
    assert [h["score"] for h in deep] == sorted((h["score"] for h in deep), reverse=True)
    assert [h["first_stage_rank"] for h in deep[3:]] == [4, 5, 6, 7, 8]
    assert sorted(h["first_stage_rank"] for h in hits) != [None] * 5
    first = jfe.search(index, "a red square", model=ToyEncoder(), k=6)
    shortlist = [h["did"] for h in first]
    assert all(h["did"] in shortlist for h in hits)
    assert all(shortlist[h["first_stage_rank"] - 1] == h["did"] for h in hits)
    with pytest.raises(ConfigError, match="not a reranker"):
        jfe.search(index, "a red square", model=ToyEncoder(), rerank=ToyEncoder())
    index.save(tmp_path / "index")
    joint.save_pretrained(tmp_path / "rr")
    result = CliRunner().invoke(app, ["search", "--index", str(tmp_path / "index"), "--text", "a red square",
                                      "--rerank", str(tmp_path / "rr"), "--rerank-k", "4", "-k", "3", "--json"])
    assert result.exit_code == 0, result.output
    body = json.loads(result.output)
    assert body["rerank_k"] == 4 and len(body["hits"]) == 3 and body["hits"][0]["first_stage_rank"] is not None


def test_jfe_rerank_command_prints_candidates_best_first(joint: JointReranker, tiny_mbeir: Path,
                                                         tmp_path: Path) -> None:
    items = _items(tiny_mbeir)
    joint.save_pretrained(tmp_path / "rr")
    (tmp_path / "cands.jsonl").write_text("\n".join(json.dumps({"image": str(tiny_mbeir / TINY[n])}) for n in items))
    args = ["rerank", "--model", str(tmp_path / "rr"), "--query-text", "make it blue", "--query-image",
            str(tiny_mbeir / TINY["red_square"]), "--text", "a blue square", "--items", str(tmp_path / "cands.jsonl"),
            "--precision", "fp32"]
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    expected = jfe.rerank(Item(text="make it blue", image=items["red_square"].image),
                          ["a blue square", *items.values()], model=joint, precision="fp32")
    assert [r["index"] for r in rows] == sorted(range(5), key=lambda i: -float(expected[i]))
    np.testing.assert_allclose([r["score"] for r in rows], sorted(expected, reverse=True), atol=1e-5)
    assert rows[[r["index"] for r in rows].index(0)]["text"] == "a blue square"
    table = CliRunner().invoke(app, [*args, "--top", "2"])
    assert table.exit_code == 0 and len(table.output.strip().splitlines()) == 3  # header + 2
    no_query = CliRunner().invoke(app, ["rerank", "--model", str(tmp_path / "rr"), "--text", "x"])
    assert isinstance(no_query.exception, ConfigError) and "no query" in str(no_query.exception)
    not_a_reranker = CliRunner().invoke(app, ["rerank", "--model", "toy", "-q", "x", "--text", "y"])
    assert isinstance(not_a_reranker.exception, ConfigError) and "not a reranker" in str(not_a_reranker.exception)


def test_rerank_api_scores_candidates(joint: JointReranker, tiny_mbeir: Path) -> None:
    items = list(_items(tiny_mbeir).values())
    given = jfe.rerank("a blue square", items, model=joint, scores=[0.1, 0.2, 0.3, 0.4])
    assert given.shape == (4,) and given.dtype == np.float32
    # without scores, the reranker's own retriever (config.retriever = toy) scores the first stage
    toy = ToyEncoder()
    cos = toy.encode(items) @ toy.encode(["a blue square"])[0]
    np.testing.assert_allclose(jfe.rerank("a blue square", items, model=joint), jfe.rerank(
        "a blue square", items, model=joint, scores=cos.tolist()), atol=1e-5)


def test_record_missing_from_the_index_is_named(joint: JointReranker, tiny_mbeir: Path) -> None:
    from jfe.index import VectorIndex

    index = VectorIndex(32, meta={"model": "toy"})
    vectors = ToyEncoder().encode(["a", "b"])
    index.add(["rec:1", "bare:2"], vectors, records=[{"did": "rec:1", "txt": "a", "img_path": None,
                                                      "modality": "text"}, {}])
    with pytest.raises(DataError, match="bare:2"):
        jfe.search(index, "b", model=ToyEncoder(), k=2, rerank=joint, rerank_k=2)


def test_service_search_with_reranker(joint: JointReranker, tiny_mbeir: Path) -> None:
    pools = sorted((tiny_mbeir / "cand_pool" / "global").glob("*.jsonl"))
    toy = ToyEncoder()
    index = build_index(toy, pools, tiny_mbeir, progress=False, model_name="toy")
    with TestClient(create_app(toy, index, ServeSettings(), {"jfe-mini-rerank": joint})) as client:
        plain = client.post("/search", json={"text": "a red square", "k": 6}).json()
        body = client.post("/search", json={"text": "a red square", "k": 3, "rerank": "jfe-mini-rerank",
                                            "rerank_k": 6}).json()
        assert body["reranked_by"] == "jfe-mini-rerank" and body["rerank_k"] == 6
        shortlist = [h["did"] for h in plain["results"]]
        assert all(shortlist[h["first_stage_rank"] - 1] == h["did"] for h in body["results"])
        unknown = client.post("/search", json={"text": "a red square", "rerank": "nope"})
        assert unknown.status_code == 404
        assert unknown.json()["error"]["param"] == "rerank" and "jfe-mini-rerank" in unknown.json()["error"]["message"]
        too_deep = client.post("/search", json={"text": "x", "rerank": "jfe-mini-rerank", "rerank_k": 5000})
        assert too_deep.status_code == 422
        form = client.post("/search", data={"text": "a red square", "k": "2", "rerank": "jfe-mini-rerank",
                                            "rerank_k": "4"})
        assert form.status_code == 200 and form.json()["rerank_k"] == 4


def _data_url(path: Path) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def test_service_rerank_endpoint_scores_documents_as_the_python_api(joint: JointReranker, tiny_mbeir: Path) -> None:
    """POST /v1/rerank (the Jina / Cohere shape, with images): the scores of jfe.rerank, best first, top_n,
    documents echoed; strings, {"text", "image"} objects and content parts read alike."""
    items = _items(tiny_mbeir)
    toy = ToyEncoder()
    index = build_index(toy, sorted((tiny_mbeir / "cand_pool" / "global").glob("*.jsonl")), tiny_mbeir,
                        progress=False, model_name="toy")
    names = list(items)
    query_image = _data_url(tiny_mbeir / TINY["red_square"])
    documents = [{"image": _data_url(tiny_mbeir / TINY[n])} for n in names] + ["a blue square", [
        {"type": "text", "text": "a green"}, {"type": "text", "text": "circle"}]]
    expected = jfe.rerank(Item(text="make it blue", image=items["red_square"].image), [
        *(items[n] for n in names), "a blue square", "a green circle"], model=joint)
    with TestClient(create_app(toy, index, ServeSettings(), {"jfe-mini-rerank": joint})) as client:
        body = client.post("/v1/rerank", json={"query": {"text": "make it blue", "image": query_image},
                                               "documents": documents}).json()
        assert body["model"] == "jfe-mini-rerank"
        order = [r["index"] for r in body["results"]]
        assert order == list(np.argsort(-expected, kind="stable"))
        np.testing.assert_allclose([r["relevance_score"] for r in body["results"]], expected[order], atol=1e-5)
        by_index = {r["index"]: r for r in body["results"]}
        assert by_index[0]["document"] == {"text": None, "image": documents[0]["image"]}
        assert by_index[5]["document"] == {"text": "a green circle", "image": None}
        assert body["usage"]["images"] == 5 and body["usage"]["total_tokens"] > 0
        top = client.post("/v1/rerank", json={"model": "jfe-mini-rerank", "query": "a blue square",
                                              "documents": ["a red square", "a blue square", "a green circle"],
                                              "top_n": 2, "return_documents": False}).json()
        assert len(top["results"]) == 2 and all(r["document"] is None for r in top["results"])
        alone = jfe.rerank("a blue square", ["a red square", "a blue square", "a green circle"], model=joint)
        assert [r["index"] for r in top["results"]] == list(np.argsort(-alone, kind="stable")[:2])
        with_instruction = client.post("/v1/rerank", json={"query": "a blue square", "instruction": "Find it.",
                                                           "documents": ["a blue square"]}).json()
        instructed = jfe.rerank("a blue square", ["a blue square"], model=joint, instruction="Find it.")
        assert with_instruction["results"][0]["relevance_score"] == pytest.approx(float(instructed[0]), abs=1e-5)


def test_service_rerank_endpoint_refuses_what_it_cannot_score(joint: JointReranker, tiny_mbeir: Path) -> None:
    from jfe.serve.schemas import RERANK_K_MAX

    toy = ToyEncoder()
    index = build_index(toy, sorted((tiny_mbeir / "cand_pool" / "global").glob("*.jsonl")), tiny_mbeir,
                        progress=False, model_name="toy")
    with TestClient(create_app(toy, index, ServeSettings(), {"a": joint, "b": joint})) as client:
        def error(payload: dict, status: int) -> dict:
            response = client.post("/v1/rerank", json=payload)
            assert response.status_code == status, response.text
            return response.json()["error"]

        assert "'a', 'b'" in error({"query": "x", "documents": ["y"]}, 400)["message"]  # two served: name one
        assert error({"model": "nope", "query": "x", "documents": ["y"]}, 404)["param"] == "model"
        assert error({"model": "a", "query": "x", "documents": []}, 400)["param"] == "documents"
        assert "documents[1]" in error({"model": "a", "query": "x", "documents": ["y", {"text": " "}]}, 400)["message"]
        assert "query" in error({"model": "a", "query": "", "documents": ["y"]}, 400)["message"]
        assert error({"model": "a", "query": "x", "documents": ["y"] * (RERANK_K_MAX + 1)}, 413)["code"] == 413
        assert error({"model": "a", "query": "x", "documents": ["y"], "top_n": 0}, 400)["param"] == "top_n"
        assert error({"model": "a", "query": "x", "documents": [{"image": "https://example.com/a.png"}]},
                     400)["message"].startswith("documents[0]")  # /v1/ answers 400 as OpenAI does, not 422
        assert client.post("/v1/rerank", data={"query": "x"}).status_code == 415
    with TestClient(create_app(toy, index, ServeSettings())) as client:
        response = client.post("/v1/rerank", json={"query": "x", "documents": ["y"]})
        assert response.status_code == 404 and "--rerank" in response.json()["error"]["message"]
        spec = client.get("/openapi.json").json()
        assert "/v1/rerank" in spec["paths"] and "RerankRequest" in spec["components"]["schemas"]
    with TestClient(create_app(toy, index, ServeSettings(api_key="s3cret"), {"a": joint})) as client:
        assert client.post("/v1/rerank", json={"query": "x", "documents": ["y"]}).status_code == 401
        assert client.post("/v1/rerank", json={"query": "x", "documents": ["y"]},
                           headers={"X-API-Key": "s3cret"}).status_code == 200


def test_registry_lists_the_rerankers() -> None:
    names = {info.name: info for info in jfe.list_models()}
    assert names["jfe-mini-rerank"].fusion_role == "one-tower"
    assert names["late-fusion-rerank-mini"].fusion_role == "late-fusion"
    with pytest.warns(UserWarning):
        model = load_model("jfe-mini-rerank", grid=2)
    assert isinstance(model, Reranker)


def test_shortlisted_keeps_the_positives_a_reranker_would_see() -> None:
    from jfe.train.mine import MinedQuery

    entry = MinedQuery("q", 7, {"p1": 0.80, "p2": 0.40}, [("n1", 0.90), ("n2", 0.70), ("n3", 0.50), ("n4", 0.30)])
    assert entry.shortlisted(2).positives == {"p1": 0.80}  # p1 ranks 2nd, p2 5th
    assert entry.shortlisted(5).positives == {"p1": 0.80, "p2": 0.40}
    assert entry.shortlisted(1).positives == {}
    assert entry.shortlisted(1).negatives == entry.negatives


def test_train_rerank_with_two_processes(tiny_mbeir: Path, tmp_path: Path) -> None:
    """torchrun with 2 processes (gloo): each scores its half of the queries, gradients are summed, the logged loss
    is the global one, and both ranks finish on one checkpoint (BERT's dropout differs per rank, so the weights are
    not compared with a one-process run)."""
    import os
    import subprocess
    import sys

    mined = write_mined(tmp_path / "mined.jsonl", mine(ToyEncoder(), tiny_mbeir, split="train", k=3, progress=False))
    cfg = _config(tiny_mbeir, mined, tmp_path / "ddp", steps=2, checkpoint_every=2, device="cpu")
    config = tmp_path / "ddp.toml"
    config.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in cfg.items() if k != "model_overrides")
                      + "model_overrides = { grid = 2, retriever = \"toy\" }\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "jfe.train", "rerank", "--config", str(config), "--quiet"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert [line for line in proc.stdout.splitlines() if line.strip()] == [str(tmp_path / "ddp" / "final")] * 2
    state = torch.load(tmp_path / "ddp" / "checkpoints" / "step-0000002" / "trainer_state.pt", weights_only=False)
    assert state["world_size"] == 2
    def first_loss(out: Path) -> float:
        return float(json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"])

    # step 1 starts from the same weights on the same global batch: the logged loss is the global one (dropout
    # masks differ a little), not one process's half of it
    train({**cfg, "output_dir": str(tmp_path / "single")}, progress=False)
    assert first_loss(tmp_path / "ddp") == pytest.approx(first_loss(tmp_path / "single"), rel=0.2)
    assert isinstance(load_model(tmp_path / "ddp" / "final"), JointReranker)
