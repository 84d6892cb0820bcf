"""An HF MLLM (tiny random Qwen2-VL) trains with LoRA through the same trainer: it resumes exactly, runs the
shipped stage-1 -> stage-2 recipe end to end, writes PEFT adapter files, and trains identically under a
2-process ``accelerate launch`` (gloo on CPU), with DDP and with FSDP."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from jfe.train import train
from jfe.train.config import load_config
from jfe.train.synthetic import write_synthetic_mbeir
from test_models_hf import build_tiny_qwen2_vl  # the HF tests' tiny model builder (tests/ is on sys.path)

REPO = Path(__file__).resolve().parents[1]
ADAPTER = "adapter_model.safetensors"


def write_union_train(root: Path) -> Path:
    """Re-lay a synthetic M-BEIR tree like the real release's training union: every training query in
    query/union_train/mbeir_union_up_train.jsonl, their candidates in
    cand_pool/global/mbeir_union_train_cand_pool.jsonl (and no per-task train folder)."""
    union = root / "query" / "union_train"
    union.mkdir(parents=True)
    with (union / "mbeir_union_up_train.jsonl").open("w") as out:
        for path in sorted((root / "query" / "train").glob("*.jsonl")):
            out.write(path.read_text())
    shutil.rmtree(root / "query" / "train")
    pool = root / "cand_pool" / "global"
    (pool / "mbeir_union_cand_pool.jsonl").rename(pool / "mbeir_union_train_cand_pool.jsonl")
    return root


def test_lora_training_and_resume(tmp_path: Path) -> None:
    root = write_synthetic_mbeir(tmp_path / "data")
    backbone = build_tiny_qwen2_vl(tmp_path / "qwen")
    cfg = {"stage": "stage2", "model": f"hf:{backbone}", "model_overrides": {"lora_r": 4, "lora_alpha": 8},
           "data": str(root), "steps": 4, "batch_size": 4, "lr": 1e-2, "warmup_steps": 1, "group_size": 1,
           "task_weights": {0: 1.0, 3: 1.0, 7: 1.0}, "checkpoint_every": 2, "log_every": 1, "device": "cpu",
           "val_max_queries": 8, "val_max_pool": 8}
    straight = train({**cfg, "output_dir": str(tmp_path / "a")}, progress=False)
    train({**cfg, "output_dir": str(tmp_path / "b"), "stop_at_step": 3}, progress=False)
    resumed = train({**cfg, "output_dir": str(tmp_path / "b")}, resume=True, progress=False)
    # the adapter lives in peft's file; resuming reloaded it from the step-2 checkpoint's adapter files
    a, b = load_file(str(straight / ADAPTER)), load_file(str(resumed / ADAPTER))
    assert a and a.keys() == b.keys() and all(".lora_" in k for k in a)
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0)
    init = load_file(str(train({**cfg, "output_dir": str(tmp_path / "c"), "steps": 1, "lr": 1e-12},
                               progress=False) / ADAPTER))
    assert any((a[k] - init[k]).abs().max() > 1e-4 for k in a)  # the adapters trained


def _recipe(name: str, **overrides: object) -> dict:
    """A shipped config file, shrunk to the tiny model and the synthetic data (every recipe key kept)."""
    small = {"steps": 3, "batch_size": 4, "grad_cache_chunk": 3, "warmup_steps": 1, "lr": 1e-2, "log_every": 1,
             "val_every": 0, "val_max_queries": 8, "val_max_pool": 8, "val_batch_size": 8, "checkpoint_every": 2,
             "device": "cpu", "precision": "fp32"}
    cfg = load_config(REPO / "configs" / name, {**small, **overrides})
    return cfg.model_dump(mode="json", exclude_unset=True) | {"stage": cfg.stage}


def test_stage1_then_stage2_then_save_and_load(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from jfe.models.hf import HFEncoder, last_token_index
    from jfe.models.registry import load_model

    root = write_union_train(write_synthetic_mbeir(tmp_path / "data"))
    backbone = build_tiny_qwen2_vl(tmp_path / "qwen")
    common = {"model": f"hf:{backbone}", "data": str(root)}
    stage1_cfg = _recipe("hf-qwen2vl-lora-stage1.toml", output_dir=str(tmp_path / "s1"), **common)
    assert stage1_cfg["train_split"] == "union_train" and stage1_cfg["model_overrides"]["lora_r"] == 16
    stage1 = train(stage1_cfg, progress=False)
    stage2_cfg = _recipe("hf-qwen2vl-lora-stage2.toml", output_dir=str(tmp_path / "s2"), data=str(root),
                         model=str(stage1))  # stage 2 starts from the stage-1 folder
    assert stage2_cfg["instructions"] and stage2_cfg["hard_negatives"] == 1
    stage2 = train(stage2_cfg, progress=False)
    first, second = load_file(str(stage1 / ADAPTER)), load_file(str(stage2 / ADAPTER))
    assert first.keys() == second.keys() and len(first) == 2 * 4 * 2  # r=16 LoRA on q/k/v/o of 2 layers
    assert any((first[k] - second[k]).abs().max() > 1e-4 for k in first)  # stage 2 trained the adapter on
    # stage 2 started from the stage-1 adapter (not a fresh one): with a vanishing lr it stays there
    still = load_file(str(train({**stage2_cfg, "output_dir": str(tmp_path / "s2-still"), "steps": 1,
                                 "lr": 1e-12}, progress=False) / ADAPTER))
    for key in first:
        torch.testing.assert_close(still[key], first[key], atol=1e-6, rtol=0)

    items = ["find the red cat", root / "images" / sorted(os.listdir(root / "images"))[0]]
    loaded = load_model(str(stage2), device="cpu")
    assert isinstance(loaded, HFEncoder)
    vectors = loaded.encode(items)
    resaved = loaded.save_pretrained(tmp_path / "resaved")
    np.testing.assert_allclose(load_model(resaved, device="cpu").encode(items), vectors, atol=1e-6)
    # the same vectors from plain transformers + peft reading the stage-2 folder
    peft_model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(backbone), stage2).eval()
    batch = loaded.prepare(_items(items))
    with torch.no_grad():
        hidden = peft_model.base_model.model.model(**batch, use_cache=False).last_hidden_state
    pooled = hidden[torch.arange(len(items)), last_token_index(batch["attention_mask"])]
    np.testing.assert_allclose(torch.nn.functional.normalize(pooled, dim=-1).numpy(), vectors, atol=1e-5)


def _items(raw: list) -> list:
    from jfe.data.items import Item

    return [Item(text=x) if isinstance(x, str) else Item(image=x) for x in raw]


def _losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.parametrize("launch_config", ["ddp.yaml", "fsdp.yaml"])
def test_two_process_accelerate_launch_matches_one_process(tmp_path: Path, launch_config: str) -> None:
    """``accelerate launch`` with the shipped config, 2 CPU processes (gloo), GradCache and hard negatives:
    the negatives of both ranks are gathered, so losses and adapters equal one process on the global batch."""
    root = write_synthetic_mbeir(tmp_path / "data")
    backbone = build_tiny_qwen2_vl(tmp_path / "qwen")
    cfg = {"stage": "stage2", "model": f"hf:{backbone}", "model_overrides": {"lora_r": 4, "lora_alpha": 8},
           "data": str(root), "steps": 2, "batch_size": 4, "lr": 1e-2, "warmup_steps": 1, "group_size": 1,
           "hard_negatives": 1, "grad_cache_chunk": 3, "task_weights": {0: 1.0, 3: 1.0, 7: 1.0},
           "checkpoint_every": 2, "log_every": 1, "device": "cpu", "val_max_queries": 4, "val_max_pool": 8,
           "output_dir": str(tmp_path / "multi"), "precision": "fp32"}
    config = tmp_path / "multi.toml"
    config.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in cfg.items() if not isinstance(v, dict))
                      + "model_overrides = { lora_r = 4, lora_alpha = 8 }\ntask_weights = { 0 = 1.0, 3 = 1.0, "
                      "7 = 1.0 }\n")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(REPO / "configs" / "accelerate" / launch_config), "--num_processes", "2",
                           "--main_process_port", "0", "-m", "jfe.train", "run", "--config", str(config), "--quiet"],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    final = tmp_path / "multi" / "final"
    assert [line for line in proc.stdout.splitlines() if line.strip()] == [str(final)] * 2  # both ranks finished
    single = train({**cfg, "output_dir": str(tmp_path / "single")}, progress=False)
    assert _losses(tmp_path / "multi") == pytest.approx(_losses(tmp_path / "single"), abs=1e-5)
    a, b = load_file(str(single / ADAPTER)), load_file(str(final / ADAPTER))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4)
    assert time.time() - started < 200
