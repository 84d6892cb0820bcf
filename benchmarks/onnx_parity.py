"""Parity as retrieval quality: MiniBEIR test R@5 per category for each engine against torch fp32, in one run.

For each model (default: the shipped jfe-mini and two-tower-mini) it exports three ONNX folders (fp32; int8 =
MiniLM + glue dynamic int8; int8 + int8 vision = MobileNetV2 static int8 too, calibrated on 128 seeded images of
the local candidate pools), then evaluates torch fp32, torch bf16 (where the CPU has native bf16), ONNX fp32,
ONNX int8, ONNX int8 + int8 vision, and OpenVINO fp32 and bf16 (the fp32 export; bf16 where the CPU has it) with
the M-BEIR protocol on the local and global pools. It also reports
each engine's cosine to torch fp32 per embedding over a seeded sample of the test queries and pool candidates.

    python benchmarks/onnx_parity.py --data runs/minibeir --out runs/onnx_parity
    python benchmarks/onnx_parity.py --data runs/minibeir --models jfe-mini --pools local

The rule (issue 30): every category's R@5 within 1.0 point of torch fp32, and cosine >= 0.999 (fp32 engines) /
>= 0.98 (int8) per embedding. Writes ``OUT/parity.json`` and prints a markdown table per model and pool.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ENGINES = ("torch-fp32", "torch-bf16", "onnx-fp32", "onnx-int8", "onnx-int8-vision", "openvino-fp32", "openvino-bf16")
BF16_ENGINES = ("torch-bf16", "openvino-bf16")  # run only where the CPU multiplies bf16 natively
COSINE_RULE = {"fp32": 0.999, "bf16": 0.999, "int8": 0.98}
R5 = "R@5"


def _calibration_images(data: Path, n: int = 128, seed: int = 0) -> list[Path]:
    from jfe.data.mbeir import read_pool_files

    pools = sorted((data / "cand_pool" / "local").glob("*.jsonl"))
    with_image = [c for c in read_pool_files(pools)[0].values() if c.img_path]
    return [data / c.img_path for c in random.Random(seed).sample(with_image, min(n, len(with_image))) if c.img_path]


def _sample_items(data: Path, n: int = 256, seed: int = 0) -> list[Any]:
    from jfe.data.items import candidate_item, query_item
    from jfe.data.mbeir import read_pool_files, read_queries

    queries = [q for f in sorted((data / "query" / "test").glob("*.jsonl")) for q in read_queries(f)]
    pools = sorted((data / "cand_pool" / "local").glob("*.jsonl"))
    candidates = list(read_pool_files(pools)[0].values())
    rng = random.Random(seed)
    return [query_item(q, data) for q in rng.sample(queries, min(n, len(queries)))] + \
        [candidate_item(c, data) for c in rng.sample(candidates, min(n, len(candidates)))]


def _engine_model(engine: str, model: str, exports: dict[str, Path]) -> Any:
    from jfe.models import load_model

    if engine.startswith("torch"):
        return load_model(model, device="cpu").set_precision(engine.split("-")[1])
    if engine.startswith("openvino"):
        return load_model(exports["onnx-fp32"], backend="openvino").set_precision(engine.split("-")[1])
    return load_model(exports[engine])


def run(data: Path, out: Path, models: list[str], pools: list[str], engines: list[str]) -> dict[str, Any]:
    from jfe.eval.evaluator import MBEIREvaluator
    from jfe.hardware import bf16_support, machine_summary
    from jfe.models import feature_cache, load_model
    from jfe.models.onnx_backend import export_onnx

    if not bf16_support("cpu").native:
        engines = [e for e in engines if e not in BF16_ENGINES]
    result: dict[str, Any] = {"machine": machine_summary(), "data": str(data), "engines": engines, "models": {}}
    calibration = _calibration_images(data)
    sample = _sample_items(data)
    for model in models:
        torch_model = load_model(model, device="cpu")
        exports = {}
        for engine, precision, vision_int8 in (("onnx-fp32", "fp32", False), ("onnx-int8", "int8", False),
                                               ("onnx-int8-vision", "int8", True)):
            if engine in engines or (engine == "onnx-fp32" and any(e.startswith("openvino") for e in engines)):
                exports[engine] = export_onnx(torch_model, out / "exports" / f"{model}-{engine}", source=model,
                                              precision=precision, vision_int8=vision_int8,
                                              calibration=calibration if vision_int8 else None, overwrite=True)
        entry: dict[str, Any] = {"cosine": {}, "pools": {}}
        vectors = {}
        with feature_cache.overridden(mode="off"):
            for engine in engines:
                vectors[engine] = _engine_model(engine, model, exports).encode(sample, batch_size=64)
        for engine in engines:
            cosine = np.sum(vectors[engine] * vectors["torch-fp32"], axis=1)
            rule = COSINE_RULE["int8" if "int8" in engine else engine.split("-")[1]]
            entry["cosine"][engine] = {"min": round(float(cosine.min()), 5), "mean": round(float(cosine.mean()), 5),
                                       "items": len(sample), "rule": rule, "pass": bool(cosine.min() >= rule)}
        for pool in pools:
            per_engine = {}
            for engine in engines:
                started = time.perf_counter()
                evaluator = MBEIREvaluator(data, split="test", pool=pool, progress=False)
                evaluated = evaluator.result(_engine_model(engine, model, exports))
                per_engine[engine] = {"categories": {c: round(100 * v[R5], 2) for c, v in evaluated.categories.items()},
                                      "average": round(100 * evaluated.average[R5], 2),
                                      "seconds": round(time.perf_counter() - started, 1)}
                print(f"{model} {pool} {engine}: average R@5 {per_engine[engine]['average']}", file=sys.stderr)
            reference = per_engine["torch-fp32"]["categories"]
            for values in per_engine.values():
                deltas = {c: round(values["categories"][c] - reference[c], 2) for c in reference}
                values["delta_vs_torch_fp32"] = deltas
                values["within_1_point"] = all(abs(d) <= 1.0 for d in deltas.values())
            entry["pools"][pool] = per_engine
        result["models"][model] = entry
    return result


def _print(result: dict[str, Any]) -> None:
    machine = result["machine"]
    print(f"CPU: {machine['cpu']}; flags: {' '.join(machine['cpu_flags'])}\n")
    for model, entry in result["models"].items():
        print(f"### {model}\n\ncosine to torch fp32 per embedding (min / mean): " + "; ".join(
            f"{e} {c['min']} / {c['mean']}{'' if c['pass'] else ' (below ' + str(c['rule']) + ')'}"
            for e, c in entry["cosine"].items()) + "\n")
        for pool, per_engine in entry["pools"].items():
            engines = list(per_engine)
            print(f"{pool} pool, R@5 (delta vs torch fp32):\n")
            print("| category | " + " | ".join(engines) + " |")
            print("|---|" + "---:|" * len(engines))
            for category in per_engine["torch-fp32"]["categories"]:
                cells = [f"{per_engine[e]['categories'][category]:.1f}"
                         + (f" ({per_engine[e]['delta_vs_torch_fp32'][category]:+.1f})" if e != "torch-fp32" else "")
                         for e in engines]
                print(f"| {category} | " + " | ".join(cells) + " |")
            print("| within 1.0 everywhere | " + " | ".join("yes" if per_engine[e]["within_1_point"] else "**no**"
                                                         for e in engines) + " |\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="MiniBEIR root (make minibeir)")
    parser.add_argument("--out", type=Path, default=Path("runs/onnx_parity"), help="exports and parity.json go here")
    parser.add_argument("--models", default="jfe-mini,two-tower-mini")
    parser.add_argument("--pools", default="local,global")
    parser.add_argument("--engines", default=",".join(ENGINES))
    args = parser.parse_args(argv)
    split = [m.strip() for m in args.models.split(",") if m.strip()]
    result = run(args.data, args.out, split, [p.strip() for p in args.pools.split(",") if p.strip()],
                 [e.strip() for e in args.engines.split(",") if e.strip()])
    _print(result)
    from jfe.paths import atomic_write

    with atomic_write(args.out / "parity.json") as handle:
        handle.write(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out / 'parity.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
