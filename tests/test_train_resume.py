"""Resume: a killed run continued with ``resume=True`` ends with the uninterrupted run's weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from jfe.errors import ConfigError
from jfe.train import train
from jfe.train.synthetic import write_synthetic_mbeir


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_mbeir(tmp_path_factory.mktemp("synth"))


def _config(root: Path, out: Path, **kw) -> dict:
    # stage 2 uses every source of randomness: task mix, grouping, hard negatives, instruction variants
    cfg = {"stage": "stage2", "model": "toy-hash", "data": str(root), "output_dir": str(out), "steps": 8,
           "batch_size": 8, "lr": 0.05, "warmup_steps": 2, "hard_negatives": 2, "group_size": 2,
           "grad_cache_chunk": 6, "checkpoint_every": 3, "log_every": 1, "precision": "fp32",
           "phases": [{"trainable": "align", "fraction": 0.25, "lr": 0.1}, {"trainable": "full"}]}
    cfg.update(kw)
    return cfg


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert len(steps) == len(set(steps)), "a resumed run must not log a step twice"
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0)


def test_stop_then_resume_reproduces_the_uninterrupted_run(root: Path, tmp_path: Path) -> None:
    straight = train(_config(root, tmp_path / "a"), progress=False)
    stopped = train(_config(root, tmp_path / "b", stop_at_step=5), progress=False)
    assert stopped.parent.name == "step-0000003"  # steps 4-5 were lost, as in a kill
    assert not (tmp_path / "b" / "final").exists()
    resumed = train(_config(root, tmp_path / "b"), resume=True, progress=False)
    _assert_same(_weights(straight), _weights(resumed))
    assert _losses(tmp_path / "a") == pytest.approx(_losses(tmp_path / "b"), abs=1e-6)
    # and the weights really moved, so the comparison is not trivially true
    init = train(_config(root, tmp_path / "c", steps=1, lr=1e-9), progress=False)
    assert any((_weights(straight)[k] - _weights(init)[k]).abs().max() > 1e-3 for k in _weights(init))


def test_refuses_to_overwrite_and_returns_a_finished_run(root: Path, tmp_path: Path) -> None:
    cfg = _config(root, tmp_path / "run", steps=3)
    final = train(cfg, progress=False)
    with pytest.raises(ConfigError, match="--resume"):
        train(cfg, progress=False)
    stamp = (final / "model.safetensors").stat().st_mtime_ns
    assert train(cfg, resume=True, progress=False) == final
    assert (final / "model.safetensors").stat().st_mtime_ns == stamp


def test_resume_after_sigkill(root: Path, tmp_path: Path) -> None:
    """A real kill -9 in the middle of a run (possibly while a checkpoint is being written)."""
    cfg = _config(root, tmp_path / "killed", steps=24, checkpoint_every=2, batch_size=16)
    script = ("import json, sys\nfrom jfe.train import train\n"
              "train(json.loads(sys.argv[1]), progress=False)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, "-c", script, json.dumps(cfg)], env=env)
    ckpts = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None and not list(ckpts.glob("step-0000004")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.returncode != -signal.SIGKILL:
        pytest.skip("the run finished before it could be killed")
    assert not (tmp_path / "killed" / "final").exists()
    resumed = train(cfg, resume=True, progress=False)
    straight = train(_config(root, tmp_path / "straight", steps=24, checkpoint_every=2, batch_size=16),
                     progress=False)
    _assert_same(_weights(straight), _weights(resumed))
