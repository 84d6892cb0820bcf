"""Would torch.compile speed up the frozen MobileNetV2 (the cold encode's bottleneck)? Eager vs inductor.

The BN-folded, channels-last trunk as the package runs it, ``--images`` random 224-px images in the feature
cache's CPU chunks (6 at 224 px), fp32: best of 3 for eager and for ``torch.compile`` with inductor's weight
freezing, the first compiled call's time, and the largest output difference.

    python benchmarks/vision_compile.py --out runs/bench/vision_compile.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from jfe.hardware import machine_summary
from jfe.models.feature_cache import vision_chunk
from jfe.models.vision import VisionTower


def _best_of(fn: Callable[[torch.Tensor], torch.Tensor], batches: list[torch.Tensor],
             repeats: int = 3) -> tuple[float, list[torch.Tensor]]:
    with torch.inference_mode():
        fn(batches[0])  # warm-up
        best, outputs = float("inf"), []
        for _ in range(repeats):
            started = time.perf_counter()
            outputs = [fn(x) for x in batches]
            best = min(best, time.perf_counter() - started)
    return best, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    import torch._inductor.config as inductor_config

    torch.manual_seed(0)
    tower = VisionTower(224, pretrained=True).eval()
    eager = tower._folded_part(tower.split, torch.device("cpu"))
    chunk = vision_chunk(224)
    batches = [torch.randn(chunk, 3, 224, 224).contiguous(memory_format=torch.channels_last)
               for _ in range(max(1, args.images // chunk))]
    eager_s, reference = _best_of(eager, batches)
    inductor_config.freezing = True  # constant-fold and prepack the (frozen) weights
    compiled = torch.compile(eager)
    started = time.perf_counter()
    with torch.inference_mode():
        compiled(batches[0])
    first_call_s = time.perf_counter() - started
    compiled_s, outputs = _best_of(compiled, batches)
    diff = max(float((a - b).abs().max()) for a, b in zip(reference, outputs, strict=True))
    result = {"machine": machine_summary(), "images": len(batches) * chunk, "eager_s": round(eager_s, 3),
              "compiled_s": round(compiled_s, 3), "speedup": round(eager_s / compiled_s, 2),
              "first_compiled_call_s": round(first_call_s, 1), "max_abs_diff": diff}
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
