"""The M-BEIR protocol end to end on the tiny M-BEIR-layout fixture (UniIR file naming)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from jfe.data.items import Item
from jfe.data.mbeir import read_qrels, read_queries, write_instructions, write_qrels, write_queries
from jfe.data.records import InstructionSet, Qrel
from jfe.errors import DataError
from jfe.eval import EvalResult, evaluate
from jfe.eval.metrics import hit_rate_at_k
from jfe.eval.runfiles import read_trec_run, read_tsv
from jfe.models.base import Encoder, EncoderConfig
from jfe.models.toy import ToyEncoder


class ConstantConfig(EncoderConfig):
    arch: str = "test-constant"
    embed_dim: int = 4


class ConstantEncoder(Encoder):
    """Every item gets the same vector: all scores tie, so rankings follow the pool-file order."""

    arch = "test-constant"
    config_class = ConstantConfig

    def __init__(self, config: ConstantConfig | None = None) -> None:
        super().__init__(config or ConstantConfig())
        self.seen: list[Item] = []

    def embed(self, items: Sequence[Item]) -> torch.Tensor:
        self.seen.extend(items)
        return torch.full((len(items), self.dim), 0.5)


class CountingToy(ToyEncoder):
    arch = "test-counting-toy"

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self.calls = 0

    def embed(self, items: Sequence[Item]) -> torch.Tensor:
        self.calls += len(items)
        return super().embed(items)


def _edit_task7(root: Path, exclude_reference: bool = True, missing_positive: bool = False) -> None:
    """Give the tiny fixture's composed queries MiniBEIR's src fields (exclude_dids, non_additive)."""
    path = root / "query" / "test" / "mbeir_tiny_task7_test.jsonl"
    queries = read_queries(path)
    for q in queries:
        mod = q.src["modification"]
        src = {"base": "x", "modification": mod, "non_additive": mod == "shape"}
        if exclude_reference:
            src["exclude_dids"] = list(q.neg_cand_list)  # the reference image
        q.query_src_content = json.dumps(src)
    if missing_positive:
        queries[3].pos_cand_list = ["1:999"]
    write_queries(path, queries)
    write_qrels(root / "qrels" / "test" / "mbeir_tiny_task7_test_qrels.txt",
                [Qrel(q.qid, d, 1, 7) for q in queries for d in q.pos_cand_list])


def test_ties_follow_pool_order_and_exclusion(tiny_mbeir: Path) -> None:
    """With all scores tied the ranking is each pool file's order, so every number is hand-computable."""
    _edit_task7(tiny_mbeir, missing_positive=True)
    result = evaluate(ConstantEncoder(), tiny_mbeir, progress=False, ks=(1, 2, 5))
    rows = {r["task"]: r for r in result.rows}
    # tasks 0 and 3: pools list the four candidates in the order of the four queries' positives
    for task in (0, 3):
        assert (rows[task]["R@1"], rows[task]["R@2"], rows[task]["R@5"]) == (0.25, 0.5, 1.0)
    # task 7 pool order 1:1..1:4, reference excluded. q301 (ref 1:1 -> 1:2): [1:2,1:3,1:4] rank 1;
    # q302 (1:2 -> 1:4): [1:1,1:3,1:4] rank 3; q303 (1:3 -> 1:4): [1:1,1:2,1:4] rank 3; q304: positive missing
    assert (rows[7]["R@1"], rows[7]["R@2"], rows[7]["R@5"]) == (0.25, 0.25, 0.75)
    assert rows[7]["missing_positives"] == 1 and result.missing_positives == {"count": 1, "qids": ["1:304"]}
    assert result.categories["cross-modal"]["R@1"] == 0.25 and result.categories["conditional"]["fusion"]
    assert result.average["R@5"] == pytest.approx((1 + 1 + 0.75) / 3)
    # breakdowns: colour = q301 + q303 (additive), shape = q302 + q304 (non-additive)
    mods = {m["modification"]: m for m in result.modifications}
    assert mods["colour"]["R@1"] == 0.5 and mods["colour"]["non_additive"] is False
    assert mods["shape"]["R@5"] == 0.5 and mods["shape"]["non_additive"] is True
    assert {(f["non_additive"], f["R@5"]) for f in result.non_additive} == {(False, 1.0), (True, 0.5)}
    assert any("CIRR" in note for note in result.notes)


def test_without_exclusion_reference_takes_rank_one(tiny_mbeir: Path) -> None:
    _edit_task7(tiny_mbeir, exclude_reference=False)
    rows = {r["task"]: r for r in evaluate(ConstantEncoder(), tiny_mbeir, progress=False, ks=(1,)).rows}
    assert rows[7]["R@1"] == 0.0  # q301's reference 1:1 now ranks first


def test_instructions_are_applied_deterministically(tiny_mbeir: Path) -> None:
    model = ConstantEncoder()
    evaluate(model, tiny_mbeir, progress=False)
    texts = {item.id: item.text for item in model.seen}
    prompts = {"1:101": ("Find the picture this text describes.", "Retrieve a matching image.")}
    assert texts["1:101"].startswith(prompts["1:101"]) and texts["1:101"].endswith("A red square.")
    assert texts["1:201"] in ("Find a caption for this image.", "Describe the shape.")  # image-only query
    assert texts["1:5"] == "A red square"  # candidates carry no instruction
    again = ConstantEncoder()
    evaluate(again, tiny_mbeir, progress=False)
    assert {item.id: item.text for item in again.seen} == texts

    write_instructions(tiny_mbeir / "instructions" / "heldout_instructions.tsv",
                       [InstructionSet("1", "text", "image", ["Held out wording"], "tiny")])
    held = ConstantEncoder()
    evaluate(held, tiny_mbeir, progress=False, instructions="heldout")
    held_texts = {item.id: item.text for item in held.seen}
    assert held_texts["1:101"] == "Held out wording. A red square."
    # no held-out key for image->text: the image-only query carries no instruction, so it is the same input
    # as candidate 1:1 and is embedded once, under the candidate
    assert "1:201" not in held_texts and held_texts["1:1"] is None


def test_eval_validation_and_training_share_one_instruction_key(tiny_mbeir: Path) -> None:
    """A task-0 query whose first positive is a text candidate still gets the task's text->image instruction:
    in evaluation, in the training validation sets and in every training draw, whichever positive is drawn
    (``jfe.data.instructions.instruction_key`` is the one rule)."""
    from jfe.eval.evaluator import Sample, sample_groups
    from jfe.train.data import BatchSampler, TrainingData

    for split in ("test", "train"):
        path = tiny_mbeir / "query" / split / f"mbeir_tiny_task0_{split}.jsonl"
        queries = read_queries(path)
        queries[0].pos_cand_list = ["1:5", *queries[0].pos_cand_list]  # 1:5 is a text candidate
        write_queries(path, queries)
        write_qrels(tiny_mbeir / "qrels" / split / f"{path.stem}_qrels.txt",
                    [Qrel(q.qid, d, 1, 0) for q in queries for d in q.pos_cand_list])
    prompts = ("Find the picture this text describes", "Retrieve a matching image")
    model = ConstantEncoder()
    evaluate(model, tiny_mbeir, pool="global", progress=False)
    eval_texts = {item.id: item.text for item in model.seen}
    assert eval_texts["1:101"].startswith(prompts)
    val_texts = {q.id: q.text for g in sample_groups(tiny_mbeir, "test", Sample(), instructions=True)
                 for q in g.queries}
    assert val_texts["1:101"] == eval_texts["1:101"]
    assert {qid: val_texts[qid] for qid in eval_texts if qid in val_texts} == \
        {qid: eval_texts[qid] for qid in val_texts}

    data = TrainingData.load(tiny_mbeir, "train", instructions=True)
    mixed = next(i for i, q in enumerate(data.queries) if "1:5" in q.pos_cand_list)
    assert data.instruction_set(data.queries[mixed]).cand_modality == "image"
    sampler = BatchSampler(data, 2, instructions=True, seed=0)
    draws = [d for _ in range(20) for d in sampler.next_batch() if d.index == mixed]
    assert {d.positive for d in draws} == {"1:1", "1:5"}  # both positives get drawn ...
    assert all(d.instruction in prompts for d in draws)  # ... and each draw has a text->image instruction


def test_end_to_end_files_and_cache(tiny_mbeir: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    model = CountingToy()
    result = evaluate(model, tiny_mbeir, out_dir=out, progress=False, run_name="toy run")
    # 8 unique candidates (1:1-1:4 sit in two local pools but are embedded once) + 12 queries
    assert model.calls == 20

    # TREC run: qid Q0 did rank score run_id task_id; ranks from 1; scores non-increasing
    lines = (out / "run.trec").read_text().splitlines()
    parts = [line.split() for line in lines]
    assert all(len(p) == 7 and p[1] == "Q0" and p[5] == "toy_run" for p in parts)
    assert {p[6] for p in parts} == {"0", "3", "7"}
    run = read_trec_run(out / "run.trec")
    assert len(run) == 12 and all(len(hits) == 4 for hits in run.values())  # pools of 4, k=50
    for hits in run.values():
        scores = [s for _, s in hits]
        assert scores == sorted(scores, reverse=True)
    # the numbers recompute from the run file and the qrels
    for row in result.rows:
        stem = row["file"]
        qrels = read_qrels(tiny_mbeir / "qrels" / "test" / f"{stem}_qrels.txt")
        qids = sorted(qrels)
        ranked = [[d for d, _ in run[q]] for q in qids]
        for k in (1, 5):
            assert row[f"R@{k}"] == pytest.approx(hit_rate_at_k(ranked, [qrels[q] for q in qids], k))

    # TSV in UniIR's layout: dataset, task, ..., R@1 R@5 R@10 R@20 R@50; one row per (dataset, task) + average
    table = read_tsv(out / "results.tsv")
    assert list(table[0])[:2] == ["dataset", "task"] and list(table[0])[-5:] == ["R@1", "R@5", "R@10", "R@20", "R@50"]
    assert [(r["dataset"], r["task"]) for r in table] == [("tiny", "0"), ("tiny", "3"), ("tiny", "7"),
                                                          ("average", "all")]
    assert float(table[0]["R@5"]) == pytest.approx(result.rows[0]["R@5"], abs=1e-4)
    loaded = EvalResult.load(out)
    assert loaded.rows == result.rows and loaded.categories == result.categories
    per_query = [json.loads(x) for x in (out / "per_query.jsonl").read_text().splitlines()]
    assert len(per_query) == 12

    # a rerun embeds nothing and gives the same numbers
    again = CountingToy()
    rerun = evaluate(again, tiny_mbeir, out_dir=out, progress=False, run_name="toy run")
    assert again.calls == 0 and rerun.rows == result.rows
    # the global pool reuses the same cache (candidates identical, queries identical)
    glob = CountingToy()
    global_result = evaluate(glob, tiny_mbeir, pool="global", out_dir=tmp_path / "g", progress=False,
                             cache_dir=out / "embeddings")
    assert glob.calls == 0 and global_result.pool == "global" and global_result.n_candidates == 8
    assert all(len(hits) == 8 for hits in read_trec_run(tmp_path / "g" / "run.trec").values())
    # a different model must not reuse the cache
    other = CountingToy(ToyEncoder().config.model_copy(update={"seed": 1}))
    evaluate(other, tiny_mbeir, out_dir=out, progress=False)
    assert other.calls == 20


def test_global_scores_match_brute_force(tiny_mbeir: Path) -> None:
    model = ToyEncoder()
    result = evaluate(model, tiny_mbeir, pool="global", progress=False, ks=(1, 3))
    # recompute task 0 by hand with numpy over the union pool
    from jfe.data.instructions import pick_instruction
    from jfe.data.items import candidate_item, query_item
    from jfe.data.mbeir import read_candidates, read_instructions

    cands = read_candidates(tiny_mbeir / "cand_pool" / "global" / "mbeir_union_test_cand_pool.jsonl")
    instr = read_instructions(tiny_mbeir / "instructions" / "query_instructions.tsv")[("1", "text", "image")]
    queries = read_queries(tiny_mbeir / "query" / "test" / "mbeir_tiny_task0_test.jsonl")
    q = model.encode([query_item(x, tiny_mbeir, pick_instruction(x.qid, instr)) for x in queries])
    c = model.encode([candidate_item(x, tiny_mbeir) for x in cands])
    order = np.argsort(-(q @ c.T), axis=1, kind="stable")
    ranked = [[cands[j].did for j in row] for row in order]
    expected = hit_rate_at_k(ranked, [set(x.pos_cand_list) for x in queries], 3)
    assert {r["task"]: r for r in result.rows}[0]["R@3"] == pytest.approx(expected)


def test_missing_local_pool_is_a_clear_error(tiny_mbeir: Path) -> None:
    (tiny_mbeir / "cand_pool" / "local" / "mbeir_tiny_task3_cand_pool.jsonl").unlink()
    with pytest.raises(DataError, match=r"mbeir_tiny_task3_test\.jsonl.*mbeir_tiny_task3_cand_pool\.jsonl"):
        evaluate(ConstantEncoder(), tiny_mbeir, progress=False)
    with pytest.raises(DataError, match="no query files"):
        evaluate(ConstantEncoder(), tiny_mbeir, split="val", progress=False)


def test_cli_eval(tiny_mbeir: Path, tmp_path: Path) -> None:
    from jfe.cli import app

    model_dir = ToyEncoder().save_pretrained(tmp_path / "toy-model")
    result = CliRunner().invoke(app, ["eval", "--model", str(model_dir), "--data", str(tiny_mbeir),
                                      "--out", str(tmp_path / "out"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "conditional" in result.stdout and "average" in result.stdout
    saved = EvalResult.load(tmp_path / "out")
    assert saved.run_name == "toy-model" and saved.n_queries == 12
