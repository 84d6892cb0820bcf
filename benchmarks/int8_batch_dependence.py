"""How much dynamic int8's batch dependence moves MiniBEIR R@5: one export evaluated at several encode batch sizes.

Dynamic int8 quantises each matrix product's activations with one scale per batch, so an item's int8 vector depends
a little on what it is batched with; an fp32 export (the control) gives the same vectors at any batch size. This
prints R@5 per category for each batch size (local pool, all test queries) and writes JSON.

    python benchmarks/int8_batch_dependence.py --export runs/onnx_parity/exports/jfe-mini-onnx-int8 \\
        --control runs/onnx_parity/exports/jfe-mini-onnx-fp32 --data runs/minibeir --out runs/bench/int8_batch.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", required=True, help="the int8 export folder")
    parser.add_argument("--control", help="an fp32 export of the same model (batch-independent)")
    parser.add_argument("--data", type=Path, required=True, help="MiniBEIR root")
    parser.add_argument("--pool", default="local")
    parser.add_argument("--batch-sizes", default="32,48,64")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    from jfe.eval.evaluator import MBEIREvaluator
    from jfe.hardware import machine_summary
    from jfe.models import load_model

    sizes = [int(b) for b in args.batch_sizes.split(",")]
    result: dict = {"machine": machine_summary(), "pool": args.pool, "runs": {}}
    for label, folder in (("int8", args.export), ("fp32 control", args.control)):
        if not folder:
            continue
        model = load_model(folder)
        for size in sizes:
            evaluated = MBEIREvaluator(args.data, split="test", pool=args.pool, progress=False,
                                       batch_size=size).result(model)
            row = {c: round(100 * v["R@5"], 2) for c, v in evaluated.categories.items()}
            result["runs"][f"{label} b{size}"] = row
            print(f"{label} batch {size}: " + ", ".join(f"{c} {v}" for c, v in row.items()), flush=True)
    if args.out:
        from jfe.paths import write_json

        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
