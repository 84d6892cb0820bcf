"""Compatibility with the real M-BEIR release and UniIR's protocol, on a tiny tree with the release's exact names.

The tree reproduces the release's naming quirks: MSCOCO has one local pool per split
(``mbeir_mscoco_task0_test_cand_pool.jsonl``), the other datasets one pool for all splits
(``mbeir_cirr_task7_cand_pool.jsonl``); UniIR trains on ``query/union_train/mbeir_union_up_train.jsonl``
against ``cand_pool/global/mbeir_union_train_cand_pool.jsonl``; the instructions TSV is read by position.
The UniIR functions re-implemented below follow TIGER-AI-Lab/UniIR: ``src/data/preprocessing/utils.py``
(``format_string``, ``hash_qid``), ``src/data/mbeir_dataset.py`` (``_load_query_instructions``) and
``src/common/mbeir_retriever.py`` (``load_qrel``, ``compute_recall_at_k`` and the per-task averaging).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest
from PIL import Image

from jfe.data.instructions import uniir_format_string, with_instruction
from jfe.data.items import candidate_item, query_item
from jfe.data.mbeir import (
    MBEIRLayout,
    read_instructions,
    write_candidates,
    write_instructions,
    write_qrels,
    write_queries,
)
from jfe.data.records import QUERY_ID_BOUND, Candidate, InstructionSet, Qrel, Query, hashed_id
from jfe.data.validate import validate_dataset
from jfe.errors import DataError
from jfe.eval import evaluate
from jfe.eval.metrics import headline_k
from jfe.models.toy import ToyEncoder
from jfe.train.data import TrainingData

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "black": (10, 10, 10)}
# (dataset name, dataset id, task, per-split local pool?)
FILES = [("mscoco", 9, 0, True), ("mscoco", 9, 3, True), ("cirr", 8, 7, False), ("fashioniq", 7, 7, False)]


def _uniir_instructions(path: Path) -> dict[str, list[str]]:
    """UniIR's ``_load_query_instructions``: skip the header, key = f"{parts[3]}, {parts[0]}, {parts[1]}"."""
    prompts: dict[str, list[str]] = {}
    with path.open() as handle:
        next(handle)
        for line in handle.readlines():
            parts = line.strip().split("\t")
            prompts[f"{parts[3]}, {parts[0]}, {parts[1]}"] = [p for p in parts[4:] if p]
    return prompts


def _uniir_recall(run_file: Path, qrels_file: Path, k: int) -> dict[str, float]:
    """UniIR's retriever scoring: hit@k per query of the run (``compute_recall_at_k``), averaged per task id
    taken from the qrels (``load_qrel``)."""
    qrel: dict[str, list[str]] = {}
    task_of: dict[str, str] = {}
    for line in qrels_file.read_text().splitlines():
        query_id, _, doc_id, relevance, task_id = line.strip().split()
        if int(relevance) > 0:
            qrel.setdefault(query_id, []).append(doc_id)
            task_of.setdefault(query_id, task_id)
    retrieved: dict[str, list[str]] = defaultdict(list)
    for line in run_file.read_text().splitlines():
        qid, _, did, rank, *_ = line.split()
        if qid in qrel:
            retrieved[qid].append((int(rank), did))  # type: ignore[arg-type]
    per_task: dict[str, list[float]] = defaultdict(list)
    for qid, hits in retrieved.items():
        top = {did for _, did in sorted(hits)[:k]}  # type: ignore[misc]
        per_task[task_of[qid]].append(1.0 if set(qrel[qid]) & top else 0.0)
    return {task: sum(v) / len(v) for task, v in per_task.items()}


def _image(root: Path, name: str) -> str:
    rel = f"mbeir_images/{name}.jpg"
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 24), COLOURS[name.split("_")[0]]).save(root / rel)
    return rel


def build_release_tree(root: Path) -> Path:
    """A tiny tree named exactly like the M-BEIR release (see the module docstring)."""
    names = list(COLOURS)
    local = root / "cand_pool" / "local"
    union_test: list[Candidate] = []
    instruction_sets = []
    for dataset, ds_id, task, per_split in FILES:
        images = [_image(root, f"{c}_{dataset}") for c in names]
        if task == 3:
            pool = [Candidate(f"{ds_id}:{100 + i}", f"A {c} square photo", None, "text") for i, c in enumerate(names)]
            queries = [Query(f"{ds_id}:{300 + i}", None, images[i], "image", None, [pool[i].did], [], 3)
                       for i in range(len(names))]
        elif task == 0:
            pool = [Candidate(f"{ds_id}:{i + 1}", None, images[i], "image") for i in range(len(names))]
            queries = [Query(f"{ds_id}:{200 + i}", f"a {c} square", None, "text", None, [pool[i].did], [], 0)
                       for i, c in enumerate(names)]
        else:  # composed: reference colour -> next colour
            pool = [Candidate(f"{ds_id}:{i + 1}", None, images[i], "image") for i in range(len(names))]
            queries = [Query(f"{ds_id}:{400 + i}", f"make it {names[(i + 1) % 4]}", images[i], "image,text",
                             None, [pool[(i + 1) % 4].did], [pool[i].did], 7) for i in range(len(names))]
        stem = f"mbeir_{dataset}_task{task}"
        pool_name = f"{stem}_test_cand_pool.jsonl" if per_split else f"{stem}_cand_pool.jsonl"
        write_candidates(local / pool_name, pool)
        union_test += [c for c in pool if c.did not in {u.did for u in union_test}]
        write_queries(root / "query" / "test" / f"{stem}_test.jsonl", queries)
        write_qrels(root / "qrels" / "test" / f"{stem}_test_qrels.txt",
                    [Qrel(q.qid, d, 1, q.task_id) for q in queries for d in q.pos_cand_list])
        pair = {0: ("text", "image"), 3: ("image", "text"), 7: ("image,text", "image")}[task]
        instruction_sets.append(InstructionSet(str(ds_id), *pair, [f"Find it for {dataset}", "Retrieve it"], dataset))
    write_candidates(root / "cand_pool" / "global" / "mbeir_union_test_cand_pool.jsonl", union_test)
    # union training: queries of several datasets against one global training pool
    train_pool = [Candidate(f"9:{1000 + i}", f"a {c} thing", None, "text") for i, c in enumerate(names)]
    write_candidates(root / "cand_pool" / "global" / "mbeir_union_train_cand_pool.jsonl", train_pool)
    write_queries(root / "query" / "union_train" / "mbeir_union_up_train.jsonl",
                  [Query(f"9:{2000 + i}", f"{c}", None, "text", None, [train_pool[i].did], [], 1)
                   for i, c in enumerate(names)])
    instruction_sets.append(InstructionSet("9", "text", "text", ["Find the matching text"], "mscoco"))
    write_instructions(root / "instructions" / "query_instructions.tsv", instruction_sets)
    return root


@pytest.fixture
def release(tmp_path: Path) -> Path:
    return build_release_tree(tmp_path / "M-BEIR")


def test_release_tree_is_valid_and_every_query_file_finds_its_local_pool(release: Path) -> None:
    assert validate_dataset(release) == []
    layout = MBEIRLayout(release)
    pools = {q.name: layout.local_pool_for(q).name for q in layout.query_files("test")}
    assert pools == {
        "mbeir_mscoco_task0_test.jsonl": "mbeir_mscoco_task0_test_cand_pool.jsonl",
        "mbeir_mscoco_task3_test.jsonl": "mbeir_mscoco_task3_test_cand_pool.jsonl",
        "mbeir_cirr_task7_test.jsonl": "mbeir_cirr_task7_cand_pool.jsonl",
        "mbeir_fashioniq_task7_test.jsonl": "mbeir_fashioniq_task7_cand_pool.jsonl",
    }


def test_validate_flags_a_query_file_that_local_eval_cannot_read(release: Path) -> None:
    (release / "cand_pool" / "local" / "mbeir_mscoco_task0_test_cand_pool.jsonl").unlink()
    problems = [p for p in validate_dataset(release) if p.kind == "layout"]
    assert len(problems) == 1 and problems[0].path.endswith("mbeir_mscoco_task0_test.jsonl")
    assert "mbeir_mscoco_task0_test_cand_pool.jsonl" in problems[0].message
    with pytest.raises(DataError, match="mbeir_mscoco_task0_test_cand_pool.jsonl"):
        evaluate(ToyEncoder(), release, pool="local", progress=False)


def test_uniir_reads_our_instructions_file_by_position(release: Path, tmp_path: Path) -> None:
    path = release / "instructions" / "query_instructions.tsv"
    ours = read_instructions(path)
    assert _uniir_instructions(path) == {f"{k[0]}, {k[1]}, {k[2]}": s.prompts for k, s in ours.items()}
    # and we read a headerless-positional file (UniIR's own order, unfamiliar header names) the same way
    foreign = tmp_path / "foreign.tsv"
    lines = path.read_text().splitlines()
    foreign.write_text("\n".join(["Q\tC\tName\tId\tP1\tP2", *lines[1:]]) + "\n")
    assert read_instructions(foreign) == ours


def test_uniir_text_mode_formats_like_format_string(tmp_path: Path) -> None:
    assert uniir_format_string('  "a red\r car"  ') == "A red car."
    assert uniir_format_string("Is it red?") == "Is it red?"
    assert uniir_format_string(None) == ""
    # prompt and query formatted together (UniIR), vs each part on its own (ours)
    assert with_instruction("find the image", '"a  cat"', "uniir") == 'Find the image. "a  cat.'
    assert with_instruction("find the image", '"a  cat"', "jfe") == 'Find the image. "a cat".'
    query = Query("9:1", "a dog\r", None, "text", None, ["9:2"], [], 0)
    assert query_item(query, tmp_path, None, "uniir").text == "A dog."
    assert query_item(query, tmp_path, None, "jfe").text == "a dog\r"
    cand = Candidate("9:2", '"a red car"', None, "text")
    assert candidate_item(cand, tmp_path, "uniir").text == "A red car."
    assert candidate_item(cand, tmp_path).text == '"a red car"'


def test_eval_scores_equal_uniir_recall_rule_and_headline_is_per_dataset(release: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    result = evaluate(ToyEncoder(), release, pool="local", out_dir=out, progress=False, ks=(1, 5, 10))
    run = out / "run.trec"
    for row in result.rows:
        qrels = release / "qrels" / "test" / f"mbeir_{row['dataset']}_task{row['task']}_test_qrels.txt"
        for k in (1, 5, 10):
            uniir = _uniir_recall(run, qrels, k)
            assert uniir == {str(row["task"]): pytest.approx(row[f"R@{k}"], abs=1e-12)}, (row["dataset"], k)
        assert row["headline_k"] == headline_k(row["dataset"]) == (10 if row["dataset"] == "fashioniq" else 5)
        assert row["headline"] == row[f"R@{row['headline_k']}"]
    conditional = result.categories["conditional"]
    members = [r for r in result.rows if r["task"] == 7]
    assert conditional["headline"] == pytest.approx(sum(r["headline"] for r in members) / len(members))
    assert "headline" in (out / "results.tsv").read_text().splitlines()[0].split("\t")


def test_eval_in_uniir_text_mode_embeds_uniir_formatted_text(release: Path) -> None:
    seen: list[str | None] = []

    class Recording(ToyEncoder):
        def embed(self, items):  # noqa: ANN001, ANN202 - test double
            seen.extend(i.text for i in items)
            return super().embed(items)

    evaluate(Recording(), release, pool="local", progress=False, text_mode="uniir", instructions="none")
    assert "A red square photo." in seen and "A red square." in seen and "a red square" not in seen


def test_union_train_reads_its_own_pool_only(release: Path) -> None:
    data = TrainingData.load(release, "union_train",
                             pool_files=["cand_pool/global/mbeir_union_train_cand_pool.jsonl"])
    assert len(data.queries) == 4 and set(data.candidates) == {f"9:{1000 + i}" for i in range(4)}
    with pytest.raises(DataError, match="mbeir_union_nope_cand_pool.jsonl"):
        TrainingData.load(release, "union_train", pool_files=["cand_pool/global/mbeir_union_nope_cand_pool.jsonl"])


def test_ids_over_uniir_bound_are_flagged(release: Path) -> None:
    assert hashed_id("9:12", QUERY_ID_BOUND) == 9 * QUERY_ID_BOUND + 12
    with pytest.raises(ValueError, match="bound"):
        hashed_id(f"9:{QUERY_ID_BOUND}", QUERY_ID_BOUND)
    path = release / "query" / "test" / "mbeir_cirr_task7_test.jsonl"
    path.write_text(path.read_text().replace('"8:400"', f'"8:{QUERY_ID_BOUND + 1}"'))
    qrels = release / "qrels" / "test" / "mbeir_cirr_task7_test_qrels.txt"
    qrels.write_text(qrels.read_text().replace("8:400 ", f"8:{QUERY_ID_BOUND + 1} "))
    problems = validate_dataset(release)
    assert [(p.kind, p.record) for p in problems] == [("uniir-id", f"8:{QUERY_ID_BOUND + 1}")]
