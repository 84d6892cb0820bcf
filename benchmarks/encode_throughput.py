"""Encoding throughput of the built-in models: items/s for text, image and image+text inputs at batch 1 and 64.

Each model runs in its own subprocess so that its peak memory (``ru_maxrss``) is its own. Images are
224-px PNG files written to a temporary folder (decoding is part of the cost). "Cold" numbers run with the
vision feature cache OFF (every image goes through MobileNetV2); "warm" numbers (image inputs, batch 64
only) are a second pass with the cache on, i.e. what training and repeated evaluation see.

    .venv/bin/python benchmarks/encode_throughput.py --out runs/bench/encode_throughput.json
    .venv/bin/python benchmarks/encode_throughput.py --models jfe-mini --threads 2 --items 128
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = ("jfe-mini", "two-tower-mini", "late-fusion-sf-mini", "late-fusion-ff-mini")
MODALITIES = ("text", "image", "image+text")
WORDS = ("red", "blue", "green", "small", "large", "round", "square", "emoji", "drawing", "of", "a", "cat", "dog",
         "house", "tree", "with", "hat", "face", "smiling", "woman", "man", "person", "holding", "flag", "in", "the",
         "left", "right", "hand")


def _make_images(folder: Path, n: int, size: int, seed: int) -> list[Path]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    paths = []
    for i in range(n):  # distinct photo-like images: smooth colour fields + noise
        phase = rng.uniform(0, 6, 3)
        base = np.stack([np.sin(5 * x + phase[0]), np.cos(4 * y + phase[1]), np.sin(3 * (x + y) + phase[2])], -1)
        pixels = np.clip(base * 90 + 128 + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        path = folder / f"img_{i:04d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def _texts(n: int, seed: int) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 16))) for _ in range(n)]


def worker(args: argparse.Namespace) -> dict:
    """Measure one model (runs in a subprocess); returns its rows and peak memory."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from jfe.data.items import Item
    from jfe.models import feature_cache, load_model

    started = time.perf_counter()
    overrides = {"image_size": args.image_size, **({"grid": args.grid} if args.grid else {})}
    model = load_model(args.worker, device="cpu", **overrides)
    load_s = time.perf_counter() - started
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        images = _make_images(Path(tmp), args.items, args.image_size, seed=0)
        texts = _texts(args.items, seed=0)
        inputs = {"text": [Item(text=t) for t in texts],
                  "image": [Item(image=p) for p in images],
                  "image+text": [Item(image=p, text=t) for p, t in zip(images, texts, strict=True)]}
        for modality in MODALITIES:
            for batch in args.batch_sizes:
                n = min(args.items, max(batch * 2, args.min_items_batch1)) if batch == 1 else args.items
                items = inputs[modality][:n]
                with feature_cache.disabled():
                    model.encode(items[:batch], batch_size=batch)  # warm-up (allocator, tokenizer, kernels)
                    t0 = time.perf_counter()
                    model.encode(items, batch_size=batch)
                    elapsed = time.perf_counter() - t0
                rows.append({"model": args.worker, "modality": modality, "batch": batch, "cache": "cold",
                             "items": n, "seconds": round(elapsed, 3), "items_per_s": round(n / elapsed, 1)})
            if modality != "text":  # warm: features already cached (as in training / repeated evaluation)
                batch = max(args.batch_sizes)
                items = inputs[modality]
                feature_cache.clear()
                model.encode(items, batch_size=batch)
                t0 = time.perf_counter()
                model.encode(items, batch_size=batch)
                elapsed = time.perf_counter() - t0
                rows.append({"model": args.worker, "modality": modality, "batch": batch, "cache": "warm",
                             "items": len(items), "seconds": round(elapsed, 3),
                             "items_per_s": round(len(items) / elapsed, 1)})
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    return {"model": args.worker, "load_seconds": round(load_s, 2), "peak_rss_mb": round(peak_mb, 1),
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2), "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--items", type=int, default=128, help="items per measurement at batch > 1")
    parser.add_argument("--min-items-batch1", type=int, default=16, help="items per measurement at batch 1")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--grid", type=int, default=0, help="visual tokens per side (0: each model's default)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    from jfe.hardware import tune_allocator

    tune_allocator()  # as the jfe command does; JFE_MALLOC_TUNE=0 measures glibc's default

    if args.worker:
        print(json.dumps(worker(args)))
        return

    results = []
    for name in args.models:
        cmd = [sys.executable, __file__, "--worker", name, "--items", str(args.items),
               "--min-items-batch1", str(args.min_items_batch1), "--image-size", str(args.image_size),
               "--grid", str(args.grid),
               "--threads", str(args.threads), "--batch-sizes", *map(str, args.batch_sizes)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"measured {name}", file=sys.stderr)

    print(f"{'model':<21}{'input':<12}{'batch':>6}{'cache':>7}{'items/s':>10}")
    for result in results:
        for row in result["rows"]:
            print(f"{row['model']:<21}{row['modality']:<12}{row['batch']:>6}{row['cache']:>7}{row['items_per_s']:>10}")
    print(f"\n{'model':<21}{'params (M)':>11}{'load (s)':>10}{'peak RSS (MB)':>15}")
    for result in results:
        print(f"{result['model']:<21}{result['params_m']:>11}{result['load_seconds']:>10}{result['peak_rss_mb']:>15}")

    import torch

    report = {"machine": {"cpu_count": os.cpu_count(), "torch_threads": args.threads or torch.get_num_threads(),
                          "torch": torch.__version__, "python": platform.python_version(),
                          "load_average_at_end": os.getloadavg()},
              "notes": "cold = vision feature cache off (MobileNetV2 runs for every image); warm = second pass "
                       "with the cache on; 224-px PNG inputs decoded from disk; untrained glue weights",
              "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "out")}, "results": results}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(f".{args.out.name}.tmp")
        tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
        os.replace(tmp, args.out)
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
