"""fp32 vs bf16, side by side in one run: jfe-mini image+text encode at batch 64 and one training step.

* encode: ``--items`` image+text items (224-px PNGs decoded from disk, a text of 6-16 words each) through
  ``model.encode(batch_size=64, precision=...)``, "cold" (vision feature cache off: MobileNetV2 runs for every
  image) and "warm" (features cached, as in training and repeated evaluation); items/s, plus the bf16/fp32
  cosine of the same vectors. One more cold row runs MobileNetV2 in bf16 as well (``vision="follow"``, off by
  default: it moves near-tie rankings): the most bf16 can give a cold encode on this CPU.
* train: the trainer's own step (BatchSampler -> ContrastiveObjective under the precision's autocast ->
  backward -> AdamW) on the synthetic M-BEIR set, stage-1 recipe, batch ``--train-batch``; pairs/s.

It prints the CPU flags that decide the outcome (amx_bf16 / avx512_bf16). Without them bf16 is emulated and
slower than fp32: there ``precision="auto"`` picks fp32 and only the explicit bf16 column is slow.

    python benchmarks/precision_throughput.py --out runs/bench/precision_throughput.json
    python benchmarks/precision_throughput.py --threads 2 --items 128 --train-steps 3

``run(out)`` does the same from Python (``benchmarks/search_scale.py`` calls it) and fills ``out["precision"]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmarks, run from anywhere

PRECISIONS = ("fp32", "bf16")


def _encode_rows(items: int, batch: int, precisions: tuple[str, ...],
                 tower_bound: bool = True) -> tuple[list[dict], dict[str, float]]:
    from encode_throughput import _make_images, _texts

    from jfe.data.items import Item
    from jfe.models import feature_cache, load_model

    model = load_model("jfe-mini", device="cpu")
    rows, vectors = [], {}
    cases = [(precision, cache, False) for precision in precisions for cache in ("cold", "warm")]
    if tower_bound and "bf16" in precisions:
        cases.append(("bf16", "cold", True))
    with tempfile.TemporaryDirectory() as tmp:
        images = _make_images(Path(tmp), items, 224, seed=0)
        data = [Item(image=p, text=t) for p, t in zip(images, _texts(items, seed=0), strict=True)]
        for precision, cache, tower_bf16 in cases:
            settings = {"mode": "off"} if cache == "cold" else {"mode": "memory"}
            model.set_precision(precision, vision="follow" if tower_bf16 else "fp32")
            with feature_cache.overridden(**settings):
                model.encode(data[:batch], batch_size=batch, precision=precision)  # warm-up (and cache fill)
                if cache == "warm":
                    model.encode(data, batch_size=batch, precision=precision)
                start = time.perf_counter()
                vecs = model.encode(data, batch_size=batch, precision=precision)
                seconds = time.perf_counter() - start
            vectors[(precision, cache, tower_bf16)] = vecs
            what = "encode jfe-mini image+text" + (" [vision follow: MobileNetV2 in bf16 too]" if tower_bf16 else "")
            rows.append({"what": what, "precision": precision, "cache": cache,
                         "batch": batch, "items": items, "seconds": round(seconds, 3),
                         "items_per_s": round(items / seconds, 1)})
            print(f"{what} {precision} {cache}: {items / seconds:.1f} items/s", file=sys.stderr)
    parity = {}
    if "fp32" in precisions and "bf16" in precisions:
        reference = vectors[("fp32", "cold", False)]
        cosine = np.sum(reference * vectors[("bf16", "cold", False)], axis=1)
        parity = {"min_cosine_bf16_vs_fp32": float(cosine.min()), "mean_cosine_bf16_vs_fp32": float(cosine.mean())}
        if ("bf16", "cold", True) in vectors:
            bound = np.sum(reference * vectors[("bf16", "cold", True)], axis=1)
            parity["min_cosine_bf16_tower_too_vs_fp32"] = float(bound.min())
    return rows, parity


def _train_rows(batch: int, steps: int, warmup: int, precisions: tuple[str, ...]) -> list[dict]:
    from train_throughput import measure

    from jfe.train.synthetic import write_synthetic_mbeir

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = write_synthetic_mbeir(Path(tmp) / "synthetic")
        for precision in precisions:
            row = measure("jfe-mini", "stage1", root, batch, steps, warmup, 0, "cpu", precision)
            rows.append({"what": "train step jfe-mini stage1 (forward+backward+AdamW)", "precision": precision,
                         "batch": batch, "steps_timed": steps, "s_per_step": round(row["s_per_step"], 3),
                         "pairs_per_s": round(row["pairs_per_s"], 1)})
            print(f"train {precision}: {row['pairs_per_s']:.1f} pairs/s", file=sys.stderr)
    return rows


def _ratios(rows: list[dict], key: str) -> dict[str, float]:
    """bf16 / fp32 throughput per (what, cache)."""
    out = {}
    for row in rows:
        if row["precision"] != "bf16":
            continue
        for ref in rows:
            same_case = row["what"].startswith(ref["what"]) and ref.get("cache") == row.get("cache")
            if ref["precision"] == "fp32" and same_case:
                label = row["what"] + (f" ({row['cache']})" if row.get("cache") else "")
                out[label] = round(row[key] / ref[key], 2)
    return out


def run(out: dict[str, Any], items: int = 128, batch: int = 64, train_batch: int = 16, train_steps: int = 2,
        train_warmup: int = 1, threads: int | None = None,
        precisions: tuple[str, ...] = PRECISIONS) -> dict[str, Any]:
    """Measure encode and training throughput in each precision; the results go to ``out["precision"]``."""
    from jfe.hardware import bf16_support, machine_summary
    from jfe.models.precision import resolve_precision

    if threads:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    encode, parity = _encode_rows(items, batch, precisions)
    train = _train_rows(train_batch, train_steps, train_warmup, precisions)
    support = bf16_support("cpu")
    out["precision"] = {
        "machine": machine_summary(),
        "bf16_native": support.native, "bf16_detail": support.detail, "auto_picks": resolve_precision("auto", "cpu"),
        "encode": encode, "train": train, "parity": parity,
        "speedup_bf16_over_fp32": {**_ratios(encode, "items_per_s"), **_ratios(train, "pairs_per_s")},
        "wall_seconds": round(time.perf_counter() - started, 1),
        "notes": "untrained glue weights (speed does not depend on them); bf16 = torch.autocast(bfloat16) around "
                 "the forward, weights fp32, loss fp32; the frozen MobileNetV2 stays fp32 in both (bf16 there "
                 "cost top-10 agreement, see docs/models.md); the [vision follow] row runs it in bf16 too "
                 "(set_precision(..., vision=\"follow\")), the most bf16 gives a cold encode on this CPU",
    }
    return out


def _print(result: dict[str, Any]) -> None:
    machine = result["machine"]
    print(f"CPU: {machine['cpu']} ({machine['cpu_count']} cores, torch threads {machine['torch_threads']})")
    print(f"CPU flags: {' '.join(machine['cpu_flags']) or '-'}; absent: {' '.join(machine['cpu_flags_absent']) or '-'}")
    print(f"malloc tuned (jfe.hardware.tune_allocator): {machine.get('malloc_tuned')}")
    print(f"bf16 native: {result['bf16_native']} ({result['bf16_detail']}); "
          f"precision=auto picks {result['auto_picks']}")
    print(f"\n{'measurement':<58}{'precision':>10}{'throughput':>16}")
    for row in result["encode"]:
        print(f"{row['what'] + ' b' + str(row['batch']) + ' ' + row['cache']:<58}{row['precision']:>10}"
              f"{row['items_per_s']:>10} it/s")
    for row in result["train"]:
        print(f"{row['what'][:50] + ' b' + str(row['batch']):<58}{row['precision']:>10}"
              f"{row['pairs_per_s']:>8} pairs/s")
    for label, ratio in result["speedup_bf16_over_fp32"].items():
        print(f"bf16/fp32 {label}: {ratio}x")
    if result["parity"]:
        print(f"bf16 vs fp32 cosine: min {result['parity']['min_cosine_bf16_vs_fp32']:.6f}")
        if "min_cosine_bf16_tower_too_vs_fp32" in result["parity"]:
            bound = result["parity"]["min_cosine_bf16_tower_too_vs_fp32"]
            print(f"  [vision follow] with MobileNetV2 in bf16 too: min {bound:.6f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=128, help="image+text items per encode measurement")
    parser.add_argument("--batch", type=int, default=64, help="encode batch size")
    parser.add_argument("--train-batch", type=int, default=16)
    parser.add_argument("--train-steps", type=int, default=2, help="timed training steps per precision")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated, measured in this order")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    from jfe.hardware import tune_allocator

    tune_allocator()  # as the jfe command does; JFE_MALLOC_TUNE=0 measures glibc's default
    precisions = tuple(p.strip() for p in args.precisions.split(",") if p.strip())
    result = run({}, items=args.items, batch=args.batch, train_batch=args.train_batch, train_steps=args.train_steps,
                 threads=args.threads or None, precisions=precisions)["precision"]
    _print(result)
    if args.out:
        from jfe.paths import atomic_write

        with atomic_write(args.out) as handle:
            handle.write(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
