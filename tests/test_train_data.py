"""Training data: the resumable batch sampler, grouping, hard negatives, instructions, bad input."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from jfe.data.mbeir import read_instructions
from jfe.errors import ConfigError, DataError
from jfe.eval.evaluator import Sample, sample_groups
from jfe.train.data import BatchSampler, TrainingData, base_of
from jfe.train.synthetic import write_synthetic_mbeir


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_mbeir(tmp_path_factory.mktemp("synth"))


def _data(root: Path, **kw) -> TrainingData:
    return TrainingData.load(root, "train", tasks=kw.pop("tasks", None), instructions=kw.pop("instructions", True),
                             hard_negatives=True, **kw)


def test_sampler_is_deterministic_and_resumes_mid_stream(root: Path) -> None:
    data = _data(root)
    a = BatchSampler(data, 8, group_size=3, hard_negatives=2, instructions=True, seed=5)
    for _ in range(7):  # past one epoch of the smallest task
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # the state survives serialisation
    expected = [a.next_batch() for _ in range(5)]
    b = BatchSampler(data, 8, group_size=3, hard_negatives=2, instructions=True, seed=5)
    b.load_state_dict(state)
    assert [b.next_batch() for _ in range(5)] == expected
    c = BatchSampler(data, 8, group_size=3, hard_negatives=2, instructions=True, seed=6)
    assert [c.next_batch() for _ in range(5)] != expected


def test_task_weights_and_grouping(root: Path) -> None:
    data = _data(root)
    sampler = BatchSampler(data, 12, task_weights={0: 3.0, 1: 1.0, 7: 0.0}, group_size=1, seed=0)
    tasks = Counter(data.queries[d.index].task_id for _ in range(40) for d in sampler.next_batch())
    assert set(tasks) == {0, 1}
    assert tasks[0] > 2 * tasks[1]
    grouped = BatchSampler(data, 12, task_weights={0: 1.0, 1: 1.0, 3: 1.0}, group_size=3, seed=0)
    batch = grouped.next_batch()
    bases = Counter(base_of(data.queries[d.index]) for d in batch)
    assert len(batch) == 12 and len({d.index for d in batch}) == 12
    assert max(bases.values()) >= 2  # several queries about one base item: hard in-batch negatives


def test_single_task_batches_keep_one_task_and_still_group(root: Path) -> None:
    data = _data(root)
    weights = {0: 1.0, 1: 1.0, 3: 1.0}
    sampler = BatchSampler(data, 12, task_weights=weights, group_size=3, seed=0, single_task=True)
    seen_tasks = set()
    for _ in range(30):
        batch = sampler.next_batch()
        tasks = {data.queries[d.index].task_id for d in batch}
        assert len(tasks) == 1 and len({d.index for d in batch}) == 12
        seen_tasks |= tasks
    assert seen_tasks == set(weights)  # every task still gets batches, by weight
    mixed = BatchSampler(data, 12, task_weights=weights, seed=0)
    assert any(len({data.queries[d.index].task_id for d in mixed.next_batch()}) > 1 for _ in range(5))
    with pytest.raises(ConfigError, match="single_task batches need"):
        BatchSampler(data, len(data.by_task[0]) + 1, task_weights={0: 1.0, 1: 1.0}, single_task=True)


def test_hard_negatives_instructions_and_mask(root: Path) -> None:
    data = _data(root)
    sampler = BatchSampler(data, 8, task_weights={0: 1.0, 7: 1.0}, hard_negatives=2, instructions=True, seed=1)
    prompts = {p for s in read_instructions(root / "instructions" / "query_instructions.tsv").values()
               for p in s.prompts}
    for _ in range(5):
        draws = sampler.next_batch()
        for d in draws:
            query = data.queries[d.index]
            assert len(d.negatives) == 2 and d.positive in query.pos_cand_list
            assert not set(d.negatives) & set(query.pos_cand_list)
            assert d.instruction in prompts
        batch = sampler.to_batch(draws, rank=1, world_size=2)
        assert len(batch.queries) == 4 and len(batch.negatives) == 8
        # the rank-1 shard is the second half of the global batch, instruction-prefixed
        assert batch.queries[0].id == data.queries[draws[4].index].qid
        assert batch.queries[0].text.startswith(draws[4].instruction.split()[0])
    with pytest.raises(ConfigError, match="divisible"):
        sampler.to_batch(sampler.next_batch(), rank=0, world_size=3)


def test_bad_requests_fail_clearly(root: Path, tmp_path: Path) -> None:
    data = _data(root)
    with pytest.raises(ConfigError, match="no training queries"):
        BatchSampler(data, 4, task_weights={5: 1.0})
    with pytest.raises(ConfigError, match="exceeds"):
        BatchSampler(data, 10_000)
    broken = write_synthetic_mbeir(tmp_path / "broken")
    qfile = broken / "query" / "train" / "mbeir_synth_task0_train.jsonl"
    lines = qfile.read_text().splitlines()
    row = json.loads(lines[2])
    row["pos_cand_list"] = ["1:99999"]
    lines[2] = json.dumps(row)
    qfile.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"mbeir_synth_task0_train\.jsonl.*{row['qid']}"):
        TrainingData.load(broken, "train")


def test_val_groups_are_capped_and_exclude_reference(root: Path) -> None:
    groups = sample_groups(root, "val", Sample(max_queries=6, max_pool=10), tasks={0, 7}, instructions=True)
    assert {g.name for g in groups} == {"mbeir_synth_task0_val", "mbeir_synth_task7_val"}
    for g in groups:
        assert len(g.queries) <= 3 and len(g.pool) <= max(10, len(set().union(*g.positives)))
        assert all(p <= set(g.pool_ids) for p in g.positives)
    composed = next(g for g in groups if g.name.endswith("task7_val"))
    assert all(len(ex) == 1 for ex in composed.excluded)
