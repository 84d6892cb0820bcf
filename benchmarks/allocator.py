"""What glibc's mmap threshold costs a CPU batch, and what ``jfe.hardware.tune_allocator`` gives back.

glibc serves an allocation above its mmap threshold (adaptive, at most 32 MB by default) with a fresh
``mmap`` and unmaps it on free, so a batch whose activations exceed it page-faults them in again every time.
Each measurement runs twice, in child processes: with glibc's default (``JFE_MALLOC_TUNE=0``) and with the
allocator tuned as the ``jfe`` command tunes it. It times

* one 1x1 convolution of MobileNetV2 (16 -> 96 channels at 112 x 112) over 8 images: a 38 MB output;
* the BN-folded, channels-last MobileNetV2 trunk over 64 random 224-px images, in chunks of 4, 6, 8, 16 and 64.

    python benchmarks/allocator.py --out runs/bench/allocator.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

_CHILD = r"""
import json, sys, time
import torch
from jfe.hardware import machine_summary, tune_allocator
tune_allocator()
threads = int(sys.argv[1])
if threads:
    torch.set_num_threads(threads)
from jfe.models.vision import VisionTower, fold_batchnorm

def best(fn, repeats=5):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter(); fn(); times.append(time.perf_counter() - start)
    return min(times)

result = {"machine": machine_summary()}
with torch.no_grad():
    conv = torch.nn.Conv2d(16, 96, 1).eval().to(memory_format=torch.channels_last)
    x = torch.randn(8, 16, 112, 112).contiguous(memory_format=torch.channels_last)
    result["conv1x1_8_images_ms"] = round(1e3 * best(lambda: conv(x)), 2)
    trunk = fold_batchnorm(VisionTower(224).features)
    images = torch.randn(64, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    result["trunk_64_images_s"] = {str(chunk): round(best(lambda: [trunk(c) for c in images.split(chunk)], 3), 3)
                                   for chunk in (4, 6, 8, 16, 64)}
print(json.dumps(result))
"""


def measure(tuned: bool, threads: int) -> dict[str, Any]:
    env = {**os.environ, "JFE_MALLOC_TUNE": "1" if tuned else "0"}
    done = subprocess.run([sys.executable, "-c", _CHILD, str(threads)], env=env, capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    runs = {"glibc default": measure(False, args.threads), "tuned": measure(True, args.threads)}
    machine = runs["tuned"]["machine"]
    print(f"CPU: {machine['cpu']} ({machine['cpu_count']} cores); flags: {' '.join(machine['cpu_flags']) or '-'}")
    for name, run in runs.items():
        chunks = ", ".join(f"chunk {c}: {s:.3f} s" for c, s in run["trunk_64_images_s"].items())
        print(f"{name:>14} (malloc tuned: {run['machine']['malloc_tuned']}): 1x1 conv {run['conv1x1_8_images_ms']} ms; "
              f"MobileNetV2 x 64 images, {chunks}")
    if args.out:
        from jfe.paths import atomic_write

        with atomic_write(args.out) as handle:
            handle.write(json.dumps({"machine": machine, "runs": runs}, indent=2) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
