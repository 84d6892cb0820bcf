"""An HF MLLM (tiny random Qwen2-VL) trains with LoRA through the same trainer, and resumes exactly."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from jfe.train import train
from jfe.train.synthetic import write_synthetic_mbeir
from test_models_hf import build_tiny_qwen2_vl  # the HF tests' tiny model builder (tests/ is on sys.path)


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
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    lora = [k for k in a if "lora_" in k]
    assert lora and a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0)
    init = load_file(str(train({**cfg, "output_dir": str(tmp_path / "c"), "steps": 1, "lr": 1e-12},
                               progress=False) / "model.safetensors"))
    assert any((a[k] - init[k]).abs().max() > 1e-4 for k in lora)  # the adapters trained
