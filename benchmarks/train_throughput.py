"""Training throughput (pairs/s) of jfe-mini and the baselines, with the real training step.

Each measurement runs the trainer's own pieces (BatchSampler -> ContrastiveObjective -> AdamW step) on
MiniBEIR (``--data``) or, without it, on the small synthetic M-BEIR set, for the stage-1 recipe
(image<->caption / text<->text pairs, no negatives) and the stage-2 recipe (every task, instructions, one
hard negative per pair, grouped batches). A pair = one query + its positive (+ its hard negatives).

    python benchmarks/train_throughput.py --out runs/bench/train_throughput.json
    python benchmarks/train_throughput.py --models toy-hash --steps 5          # no pretrained weights needed
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from jfe.train.config import TrainConfig
from jfe.train.data import BatchSampler, TrainingData
from jfe.train.losses import ContrastiveObjective, InfoNCELoss
from jfe.train.recipes import STAGE_PRESETS
from jfe.train.synthetic import write_synthetic_mbeir
from jfe.train.trainer import _param_groups, adamw, build_model

DEFAULT_MODELS = ("jfe-mini", "two-tower-mini", "late-fusion-sf-mini", "late-fusion-ff-mini")


def _registry_available() -> bool:
    try:
        import jfe.models.registry  # noqa: F401
    except ModuleNotFoundError as exc:
        if exc.name != "jfe.models.registry":
            raise
        return False
    return True


def measure(model_name: str, stage: str, data_root: Path, batch_size: int, steps: int, warmup: int,
            chunk: int, device: str, precision: str = "fp32") -> dict:
    preset = STAGE_PRESETS[stage]
    cfg = TrainConfig(model=model_name, data=data_root, output_dir=Path(tempfile.gettempdir()), stage=stage,
                      batch_size=batch_size, device=device, grad_cache_chunk=chunk)
    torch.manual_seed(0)
    model = build_model(cfg, torch.device(device))
    model.set_trainable("full")
    tasks = set(preset["task_weights"]) or None
    data = TrainingData.load(data_root, "train", tasks=tasks, instructions=cfg.instructions,
                             hard_negatives=cfg.hard_negatives > 0)
    sampler = BatchSampler(data, batch_size, preset["task_weights"], cfg.group_size, cfg.hard_negatives,
                           cfg.instructions, seed=0)
    loss = InfoNCELoss(cfg.temperature).to(device)
    from jfe.models.precision import resolve_precision

    compute = resolve_precision(precision, device)  # as the trainer does: autocast the forward, fp32 loss
    objective = ContrastiveObjective(model, loss, chunk, autocast_dtype=torch.bfloat16 if compute == "bf16" else None)
    optimizer = adamw(_param_groups(model.named_parameters(), 0.01) + _param_groups(loss.named_parameters(), 0.0),
                      1e-5, 0.01, device)  # the trainer's own (fused) AdamW
    model.train()
    timings = []
    for i in range(warmup + steps):
        batch = sampler.to_batch(sampler.next_batch())
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        objective(batch).backward()
        optimizer.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= warmup:
            timings.append(time.perf_counter() - start)
    per_step = sum(timings) / len(timings)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"model": model_name, "stage": stage, "batch_size": batch_size, "hard_negatives": cfg.hard_negatives,
            "grad_cache_chunk": chunk, "precision": compute, "steps_timed": steps, "s_per_step": per_step,
            "pairs_per_s": batch_size / per_step, "trainable_params": trainable}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated model names")
    parser.add_argument("--stages", default="stage1,stage2")
    parser.add_argument("--data", type=Path, default=None, help="M-BEIR-layout root (default: synthetic set)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--grad-cache-chunk", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32", choices=("auto", "fp32", "bf16"),
                        help="compute precision of the forward pass (see benchmarks/precision_throughput.py)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    from jfe.hardware import tune_allocator

    tune_allocator()  # as the jfe command does; JFE_MALLOC_TUNE=0 measures glibc's default

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    needs_registry = [m for m in models if m not in ("toy", "toy-hash") and not (Path(m) / "config.json").exists()]
    if needs_registry and not _registry_available():
        print(f"error: jfe.models.registry is not available yet, so {', '.join(needs_registry)} cannot be built. "
              f"Run with --models toy-hash to benchmark the training loop alone.", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        data_root = args.data or write_synthetic_mbeir(Path(tmp) / "synthetic")
        rows = []
        for model_name in models:
            for stage in [s.strip() for s in args.stages.split(",") if s.strip()]:
                row = measure(model_name, stage, data_root, args.batch_size, args.steps, args.warmup,
                              args.grad_cache_chunk, args.device, args.precision)
                rows.append(row)
                print(f"{row['model']:<22} {row['stage']:<7} {row['pairs_per_s']:>9.1f} pairs/s "
                      f"({row['s_per_step']:.2f} s/step)", file=sys.stderr)
    header = "| model | stage | batch | hard neg | pairs/s | s/step |\n|---|---|---|---|---|---|"
    print(header)
    for r in rows:
        print(f"| {r['model']} | {r['stage']} | {r['batch_size']} | {r['hard_negatives']} | "
              f"{r['pairs_per_s']:.1f} | {r['s_per_step']:.2f} |")
    if args.out:
        from jfe.paths import atomic_write

        result = {"benchmark": "train_throughput", "device": args.device, "torch_threads": torch.get_num_threads(),
                  "machine": platform.platform(), "data": str(args.data or "synthetic"), "results": rows}
        with atomic_write(args.out) as handle:
            handle.write(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
