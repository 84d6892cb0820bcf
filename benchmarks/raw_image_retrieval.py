"""Image -> image retrieval with no training at all: the frozen MobileNetV2's pooled feature and a cosine.

A floor for MiniBEIR's task 4 (an emoji in one vendor's style -> the same emoji in another's): the ImageNet
feature map (224 px, the package's preprocessing), mean-pooled to 1,280 numbers and L2-normalised, ranks the
task's local candidate pool on the test split. A trained model's image->image R@5 can be read against it.

    python benchmarks/raw_image_retrieval.py --out runs/bench/raw_image_retrieval.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from jfe.data.images import load_image
from jfe.data.mbeir import read_candidates, read_qrels, read_queries
from jfe.hardware import machine_summary
from jfe.models.vision import VisionTower, preprocess


def _pooled(tower: VisionTower, root: Path, paths: list[str], batch: int = 32) -> np.ndarray:
    out = []
    with torch.inference_mode():
        for start in range(0, len(paths), batch):
            pixels = preprocess([load_image(root / p, min_side=tower.image_size) for p in paths[start:start + batch]],
                                tower.image_size)
            out.append(torch.nn.functional.normalize(tower(pixels).mean((2, 3)), dim=-1))
    return torch.cat(out).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minibeir", type=Path, default=Path("runs/minibeir"))
    parser.add_argument("--dataset", default="emoji")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    root = args.minibeir
    queries = read_queries(root / "query" / "test" / f"mbeir_{args.dataset}_task4_test.jsonl")
    candidates = read_candidates(root / "cand_pool" / "local" / f"mbeir_{args.dataset}_task4_cand_pool.jsonl")
    qrels = read_qrels(root / "qrels" / "test" / f"mbeir_{args.dataset}_task4_test_qrels.txt")
    tower = VisionTower(224).eval()
    scores = _pooled(tower, root, [q.query_img_path for q in queries]) @ \
        _pooled(tower, root, [c.img_path for c in candidates]).T
    ids = [c.did for c in candidates]
    recall = {}
    for k in (1, 5, 10):
        hits = [bool(set(qrels[q.qid]) & {ids[j] for j in np.argsort(-scores[i])[:k]}) for i, q in enumerate(queries)]
        recall[f"R@{k}"] = round(100 * float(np.mean(hits)), 1)
    result = {"machine": machine_summary(), "dataset": args.dataset, "task": 4, "split": "test", "pool": "local",
              "queries": len(queries), "candidates": len(candidates), "recall": recall}
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
