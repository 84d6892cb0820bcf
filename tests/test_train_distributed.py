"""Two processes (torchrun, gloo on CPU) train exactly like one process on the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from jfe.train import train
from jfe.train.synthetic import write_synthetic_mbeir


def _config(root: Path, out: Path) -> dict:
    # hard negatives, grouping (false-negative masks across shards), GradCache and a learnable temperature
    return {"stage": "stage2", "model": "toy-hash", "data": str(root), "output_dir": str(out), "steps": 4,
            "batch_size": 8, "lr": 0.05, "warmup_steps": 1, "hard_negatives": 1, "group_size": 2,
            "grad_cache_chunk": 5, "checkpoint_every": 2, "log_every": 1, "device": "cpu",
            "precision": "fp32"}  # the 2-process run is a subprocess: it gets the precision as an argument


def _losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_two_process_run_matches_single_process(tmp_path: Path) -> None:
    root = write_synthetic_mbeir(tmp_path / "data")
    config = tmp_path / "ddp.toml"
    config.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in _config(root, tmp_path / "ddp").items()))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    started = time.time()
    # the real entry point on every rank: torchrun -m jfe.train run --config ...
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "jfe.train", "run", "--config", str(config), "--quiet"],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    printed = [line for line in proc.stdout.splitlines() if line.strip()]
    assert printed == [str(tmp_path / "ddp" / "final")] * 2  # both ranks finished
    state = torch.load(tmp_path / "ddp" / "checkpoints" / "step-0000004" / "trainer_state.pt", weights_only=False)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    single = train(_config(root, tmp_path / "single"), progress=False)
    ddp_losses, single_losses = _losses(tmp_path / "ddp"), _losses(tmp_path / "single")
    assert len(ddp_losses) == 4
    # step 1: same weights, same global batch -> the gathered-negative loss equals the one-process loss
    assert ddp_losses == pytest.approx(single_losses, abs=1e-5)
    a, b = load_file(str(single / "model.safetensors")), load_file(str(tmp_path / "ddp" / "final" /
                                                                       "model.safetensors"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-5)
    assert time.time() - started < 200
