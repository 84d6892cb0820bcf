"""A short HF + LoRA + bf16 smoke run for a lent GPU (<= 5 min there; it also runs on CPU, slowly).

It builds a tiny randomly initialised Qwen2-VL in a temporary folder (nothing is downloaded), writes a small
synthetic M-BEIR tree, trains a few LoRA steps through JFE's trainer (GradCache, hard negatives, bf16
weights and autocast on CUDA), then checks save -> load -> identical embeddings both through JFE's loader
and through plain ``peft.PeftModel.from_pretrained``. It prints the figures and writes them as JSON.

    python benchmarks/hf_gpu_smoke.py --out runs/bench/hf_gpu_smoke.json            # cuda if present
    python benchmarks/hf_gpu_smoke.py --device cpu --steps 3                         # this sandbox
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from jfe import hardware

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tiny model builder of the tests


def _machine() -> dict:
    info = hardware.machine_summary()  # CPU model, flags, cores, torch: what every published figure names
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["bf16_supported"] = bool(torch.cuda.is_bf16_supported())
    return info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="auto: bf16 on a CUDA GPU that supports it, else fp32; bf16 on CPU is slow but runs")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/hf_gpu_smoke.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from jfe.models import load_model
    from jfe.models.hf import last_token_index
    from jfe.train import train
    from jfe.train.synthetic import write_synthetic_mbeir
    from test_models_hf import build_tiny_qwen2_vl, mixed_items

    cuda = args.device.startswith("cuda")
    bf16 = args.precision == "bf16" or (args.precision == "auto" and cuda and torch.cuda.is_bf16_supported())
    result: dict = {"machine": _machine(), "device": args.device, "steps": args.steps, "batch_size": args.batch_size,
                    "precision": "bf16" if bf16 else "fp32"}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="jfe-hf-smoke-") as tmp:
        tmp_path = Path(tmp)
        data = write_synthetic_mbeir(tmp_path / "data")
        backbone = build_tiny_qwen2_vl(tmp_path / "qwen")
        # "auto" = bfloat16 weights on CUDA; the adapters stay float32 (peft), autocast runs the matmuls in bf16
        cfg = {"stage": "stage2", "model": f"hf:{backbone}", "data": str(data), "output_dir": str(tmp_path / "run"),
               "model_overrides": {"lora_r": 8, "lora_alpha": 16, "dtype": "bfloat16" if bf16 else "float32",
                                   "gradient_checkpointing": True},
               "steps": args.steps, "batch_size": args.batch_size, "grad_cache_chunk": 8, "lr": 5e-3,
               "warmup_steps": 2, "group_size": 1, "hard_negatives": 1, "checkpoint_every": max(1, args.steps // 2),
               "log_every": 1, "val_every": 0, "val_max_queries": 16, "val_max_pool": 32, "device": args.device,
               "precision": "bf16" if bf16 else "fp32", "learnable_temperature": False}
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        final = train(cfg, progress=False)
        result["train_s"] = round(time.perf_counter() - t0, 2)
        rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in rows if "loss" in r]
        result["loss_first"], result["loss_last"] = losses[0], losses[-1]
        result["pairs_per_s_last"] = [r for r in rows if "pairs_per_s" in r][-1]["pairs_per_s"]
        if cuda:
            result["peak_gpu_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        result["files"] = sorted(p.name for p in final.iterdir())

        items = mixed_items()
        first = load_model(final, device=args.device)
        result["weight_dtype"] = str(next(p for n, p in first.named_parameters() if "lora_" not in n).dtype)
        result["lora_dtype"] = str(next(p for n, p in first.named_parameters() if "lora_" in n).dtype)
        vectors = first.encode(items)
        resaved = first.save_pretrained(tmp_path / "resaved")
        again = load_model(resaved, device=args.device).encode(items)
        result["reload_max_abs_diff"] = float(np.abs(again - vectors).max())
        # plain transformers + peft on the same folder, same dtype and device
        base = AutoModelForImageTextToText.from_pretrained(backbone, dtype=first._dtype).to(args.device)
        peft_model = PeftModel.from_pretrained(base, final).eval()
        batch = {k: v.to(args.device) for k, v in first.prepare(items).items()}
        batch["pixel_values"] = batch["pixel_values"].to(first._dtype)
        with torch.no_grad():
            hidden = peft_model.base_model.model.model(**batch, use_cache=False).last_hidden_state
        pooled = hidden[torch.arange(len(items), device=hidden.device), last_token_index(batch["attention_mask"])]
        peft_vectors = torch.nn.functional.normalize(pooled.float(), dim=-1).cpu().numpy()
        result["peft_max_abs_diff"] = float(np.abs(peft_vectors - vectors).max())
    result["total_s"] = round(time.perf_counter() - started, 2)
    peft_tolerance = 2e-2 if bf16 else 1e-5
    result["ok"] = bool(result["reload_max_abs_diff"] <= 1e-6 and result["peft_max_abs_diff"] <= peft_tolerance
                        and np.isfinite(losses).all())
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
