"""Cross-fitting: folds of a split by base item, training without a fold, mining each fold with the model that
never saw it (``held_out_fold``, ``jfe mine`` with one ``--model`` per fold)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from jfe.cli import app
from jfe.data.folds import HeldOutFold, base_of, fold_of
from jfe.data.mbeir import MBEIRLayout, read_queries
from jfe.data.records import Query
from jfe.errors import ConfigError
from jfe.models import load_model
from jfe.models.toy import ToyEncoder
from jfe.train import train
from jfe.train.data import BatchSampler, TrainingData
from jfe.train.mine import mine, mine_cross_fitted, mined_negatives, read_mined, write_mined
from jfe.train.synthetic import write_synthetic_mbeir


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_mbeir(tmp_path_factory.mktemp("synth"))


def _train_queries(root: Path) -> list[Query]:
    layout = MBEIRLayout(root)
    return [q for path in layout.query_files("train") for q in read_queries(path)]


def test_folds_keep_a_base_item_together_and_split_evenly(root: Path) -> None:
    queries = _train_queries(root)
    by_base: dict[str, set[int]] = {}
    for query in queries:
        by_base.setdefault(base_of(query), set()).add(fold_of(query, 2))
    assert len(by_base) > 10 and all(len(folds) == 1 for folds in by_base.values())
    sizes = [sum(fold_of(q, 3) == f for q in queries) for f in range(3)]
    assert sum(sizes) == len(queries) and min(sizes) > len(queries) / 6  # no fold close to empty
    assert [fold_of(q, 2) for q in queries] == [fold_of(q, 2) for q in queries]  # no state, no randomness
    with pytest.raises(ValidationError, match="not one of 0 .. 1"):
        HeldOutFold(fold=2, folds=2)
    with pytest.raises(ValidationError):
        HeldOutFold(fold=0, folds=1)


def test_training_data_leaves_the_held_out_fold_out(root: Path) -> None:
    queries = _train_queries(root)
    held = HeldOutFold(fold=1, folds=2)
    data = TrainingData.load(root, "train", held_out=held)
    assert {q.qid for q in data.queries} == {q.qid for q in queries if fold_of(q, 2) == 0}
    with pytest.raises(ConfigError, match="cuts split 'val'"):
        TrainingData.load(root, "train", held_out=HeldOutFold(fold=0, folds=2, split="val"))


def _stage2(root: Path, out: Path, model: str = "toy-hash", **extra: object) -> dict:
    return {"stage": "stage2", "model": model, "data": str(root), "output_dir": str(out), "steps": 2,
            "batch_size": 8, "lr": 0.05, "warmup_steps": 0, "log_every": 1, "precision": "fp32",
            "val_every": 0, "val_max_queries": 8, "val_max_pool": 16, **extra}


def test_a_model_trained_without_a_fold_mines_only_that_fold(root: Path, tmp_path: Path) -> None:
    queries = _train_queries(root)
    folders = [train(_stage2(root, tmp_path / f"fold{f}", held_out_fold={"fold": f, "folds": 2}), progress=False)
               for f in range(2)]
    models = [load_model(f) for f in folders]
    assert [m.config.held_out_fold for m in models] == [HeldOutFold(fold=0, folds=2), HeldOutFold(fold=1, folds=2)]
    alone = mine(models[1], root, split="train", k=3, progress=False)
    assert set(alone.queries) == {q.qid for q in queries if fold_of(q, 2) == 1}
    assert alone.meta["held_out_fold"] == {"fold": 1, "folds": 2, "split": "train"}
    # one model per fold: every query, each ranked by the model that never trained on it
    both = mine_cross_fitted(models[::-1], root, split="train", k=3, progress=False, model_names=["b", "a"])
    assert set(both.queries) == {q.qid for q in queries}
    assert [(p["retriever"], p["fold"]) for p in both.meta["cross_fit"]] == [("a", 0), ("b", 1)]
    fold1 = next(q for q in queries if fold_of(q, 2) == 1)
    assert both.queries[fold1.qid].negatives == alone.queries[fold1.qid].negatives
    # a model on the other split is not cut: mining val with it ranks every val query
    val = mine(models[0], root, split="val", k=3, progress=False)
    assert "held_out_fold" not in val.meta and len(val.queries) == len(
        [q for p in MBEIRLayout(root).query_files("val") for q in read_queries(p)])


def test_cross_fitted_mining_refuses_models_that_do_not_cover_the_folds(root: Path, tmp_path: Path) -> None:
    fold0 = train(_stage2(root, tmp_path / "fold0", held_out_fold={"fold": 0, "folds": 2}), progress=False)
    model = load_model(fold0)
    with pytest.raises(ConfigError, match="declares no held-out fold"):
        mine_cross_fitted([model, ToyEncoder()], root, k=2, progress=False, model_names=["fold0", "toy"])
    with pytest.raises(ConfigError, match="both hold out fold 0"):
        mine_cross_fitted([model, model], root, k=2, progress=False, model_names=["x", "y"])
    with pytest.raises(ConfigError, match="3 models were given"):
        mine_cross_fitted([model, model, model], root, k=2, progress=False)
    # going on training a fold-0 model on every fold (or on another fold) would break its declaration
    with pytest.raises(ConfigError, match="trains on every fold"):
        train(_stage2(root, tmp_path / "more", model=str(fold0)), progress=False)
    with pytest.raises(ConfigError, match="holds out fold 1/2"):
        train(_stage2(root, tmp_path / "more", model=str(fold0), held_out_fold={"fold": 1, "folds": 2}),
              progress=False)


def test_jfe_mine_takes_one_model_per_fold(root: Path, tmp_path: Path) -> None:
    folders = [train(_stage2(root, tmp_path / f"fold{f}", held_out_fold={"fold": f, "folds": 2}), progress=False)
               for f in range(2)]
    out = tmp_path / "mined.jsonl"
    args = ["mine", "--data", str(root), "--k", "2", "--out", str(out), "--quiet", "--precision", "fp32"]
    result = CliRunner().invoke(app, [*args, "--model", str(folders[0]), "--model", str(folders[1])])
    assert result.exit_code == 0, result.output
    mined = read_mined(out, split="train")
    assert len(mined.queries) == len(_train_queries(root)) and len(mined.meta["cross_fit"]) == 2
    result = CliRunner().invoke(app, [*args, "--model", str(folders[0])])
    assert result.exit_code == 0 and "only that fold's queries were mined" in result.output


def test_mined_lists_are_an_encoder_stages_hard_negatives(root: Path, tmp_path: Path) -> None:
    """`mined` in a stage-1/2 config: each query's hard negatives come from its mined list (not neg_cand_list),
    never a positive; lists mined on another split, or `mined` without hard_negatives, are refused."""
    out = write_mined(tmp_path / "mined.jsonl", mine(load_model("toy-hash"), root, split="train", k=4,
                                                     progress=False))
    lists = mined_negatives(out, "train", depth=3)
    assert all(len(dids) == 3 for dids in lists.values())
    data = TrainingData.load(root, "train", hard_negatives=True, mined=lists)
    assert set(data.mined) == {q.qid for q in data.queries}
    sampler = BatchSampler(data, 8, hard_negatives=2, seed=0)
    outside_neg_cand_list = 0
    for _ in range(10):
        for draw in sampler.next_batch():
            query = data.queries[draw.index]
            assert set(draw.negatives) <= set(lists[query.qid])
            assert not set(draw.negatives) & set(query.pos_cand_list)
            outside_neg_cand_list += len(set(draw.negatives) - set(query.neg_cand_list))
    assert outside_neg_cand_list > 0  # the retriever's negatives, not the dataset's
    folder = train(_stage2(root, tmp_path / "run", mined=str(out), hard_negatives=2), progress=False)
    assert (folder / "model.safetensors").is_file()
    on_val = write_mined(tmp_path / "val.jsonl", mine(load_model("toy-hash"), root, split="val", k=4,
                                                      progress=False))
    with pytest.raises(ConfigError, match="mined on split 'val'"):
        train(_stage2(root, tmp_path / "r2", mined=str(on_val), hard_negatives=2), progress=False)
    with pytest.raises(ConfigError, match="hard_negatives >= 1"):
        train(_stage2(root, tmp_path / "r3", mined=str(out), hard_negatives=0), progress=False)
