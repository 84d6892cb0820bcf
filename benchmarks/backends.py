"""PyTorch vs ONNX Runtime, side by side in one run: cold jfe-mini encodes and peak memory per engine.

Engines: torch fp32 (eager), torch bf16 (autocast; only where the CPU multiplies bf16 natively), ONNX fp32, ONNX
int8 (MiniLM + glue dynamic int8, MobileNetV2 fp32: what ``jfe export onnx --quantize int8`` makes) and ONNX
int8 + int8 vision (MobileNetV2 static int8 too, calibrated on images of the same kind; ``--int8-vision``),
OpenVINO fp32 and bf16 (``--backend openvino`` on the fp32 export; bf16 only where the CPU has native bf16).
Workloads "cold" (feature cache off: MobileNetV2 runs for every image): image+text at batch 1 and 64, text-only at
batch 64, image-only at batch 64 (224-px PNGs decoded from disk, texts of 6-16 words); and "warm": image+text at
batch 64 with every image's features already in the feature cache (the steady state of repeated encodes of a
pool: re-indexing, evaluation, training epochs), which times the fusion graph and the cache lookups. Each engine
runs in its own process, so its peak RSS is its own; every engine encodes the same items, and its vectors' cosine
to torch fp32 is reported (min over items), and, as information (parity is R@5: ``benchmarks/onnx_parity.py``),
how many text queries keep torch fp32's top-10 set among the image+text items. The exports are made first, in a
temporary folder.

    python benchmarks/backends.py --out runs/bench/backends.json
    python benchmarks/backends.py --items 128 --model runs/ship/jfe-mini-seed0

Ratios are against torch fp32 in the same run; the printout names the CPU and its flags.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmarks, run from anywhere

WORKLOADS = (("image+text", 1), ("image+text", 64), ("text", 64), ("image", 64))
WARM = "image+text warm"  # the batch-64 image+text items again, their image features cached
ENGINES = ("torch-fp32", "torch-bf16", "onnx-fp32", "onnx-int8", "onnx-int8-vision", "openvino-fp32",
           "openvino-bf16")


def _items(folder: Path, n: int, kind: str, seed: int) -> list[Any]:
    from encode_throughput import _make_images, _texts

    from jfe.data.items import Item

    if kind == "text":
        return [Item(text=t) for t in _texts(n, seed)]
    folder.mkdir(parents=True, exist_ok=True)
    images = _make_images(folder, n, 224, seed)
    if kind == "image":
        return [Item(image=p) for p in images]
    return [Item(image=p, text=t) for p, t in zip(images, _texts(n, seed), strict=True)]


def _engine(spec: dict[str, Any]) -> dict[str, Any]:
    """One engine in its own process: load, warm up, time each workload; vectors saved for the parity check."""
    import torch

    from jfe.models import feature_cache, load_model

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    started = time.perf_counter()
    model = load_model(spec["model"], device="cpu", backend=spec["backend"])
    load_seconds = time.perf_counter() - started
    rows = []

    def timed(workload: str, batch: int, items: list[Any]) -> None:
        begin = time.perf_counter()
        vectors = model.encode(items, batch_size=batch, precision=spec["precision"])
        seconds = time.perf_counter() - begin
        np.save(Path(spec["vectors"]) / f"{spec['label']}-{workload}-{batch}.npy", vectors)
        rows.append({"workload": workload, "batch": batch, "items": len(items), "seconds": round(seconds, 3),
                     "items_per_s": round(len(items) / seconds, 1)})

    made: dict[tuple[str, int], list[Any]] = {}
    with tempfile.TemporaryDirectory() as tmp, feature_cache.overridden(mode="off"):
        for kind, batch in WORKLOADS:
            items = made[kind, batch] = _items(Path(tmp) / f"{kind}-{batch}", spec["items"], kind, seed=0) \
                if batch > 1 else _items(Path(tmp) / f"{kind}-{batch}", spec["single"], kind, seed=1)
            model.encode(items[:batch], batch_size=batch, precision=spec["precision"])  # warm-up
            timed(kind, batch, items)
        with feature_cache.overridden(mode="memory"):  # warm: the same image+text items, their features cached
            model.encode(made["image+text", 64], batch_size=64, precision=spec["precision"])  # fills the cache
            timed(WARM, 64, made["image+text", 64])
    return {"engine": spec["label"], "rows": rows, "load_seconds": round(load_seconds, 2),
            "peak_rss_mb": _peak_rss_mb()}


def _peak_rss_mb() -> int:
    """This process's peak resident memory. VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across
    fork + exec, so a spawned worker would report its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def _run_engine(spec: dict[str, Any]) -> dict[str, Any]:
    """``_engine`` in a fresh interpreter (spawned: nothing of this process's memory or thread pools carries over)."""
    pool = multiprocessing.get_context("spawn").Pool(1)
    try:
        result: dict[str, Any] = pool.apply(_engine, (spec,))
    finally:
        pool.close()
        pool.join()
    return result


def run(model: str, items: int = 128, single: int = 16, threads: int | None = None,
        engines: tuple[str, ...] = ENGINES) -> dict[str, Any]:
    from jfe.hardware import bf16_support, machine_summary, runtime_versions
    from jfe.models import load_model
    from jfe.models.onnx_backend import export_onnx

    native_bf16 = bf16_support("cpu").native
    engines = tuple(e for e in engines if e not in ("torch-bf16", "openvino-bf16") or native_bf16)
    results: dict[str, Any] = {"machine": machine_summary(), "model": model, "runtimes": runtime_versions(),
                               "engines": {}, "export_seconds": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        torch_model = load_model(model, device="cpu")
        calibration = _items(folder / "calibration", 64, "image", seed=7)
        specs = []
        for engine in engines:
            spec = {"label": engine, "items": items, "single": single, "threads": threads, "vectors": tmp,
                    "model": model, "backend": None,
                    "precision": engine.split("-")[1] if not engine.startswith("onnx") else "auto"}
            if engine.startswith("openvino"):  # the fp32 export, run by OpenVINO (export time: the onnx-fp32 row)
                spec.update(model=str(export_onnx(torch_model, folder / "openvino", source=model)),
                            backend="openvino")
            if engine.startswith("onnx"):
                begin = time.perf_counter()
                spec["model"] = str(export_onnx(
                    torch_model, folder / engine, source=model, precision="fp32" if engine == "onnx-fp32" else "int8",
                    vision_int8=engine == "onnx-int8-vision",
                    calibration=[item.image for item in calibration] if engine == "onnx-int8-vision" else None))
                results["export_seconds"][engine] = round(time.perf_counter() - begin, 1)
            specs.append(spec)
        del torch_model
        for spec in specs:
            result = _run_engine(spec)
            results["engines"][spec["label"]] = result
            print(f"{spec['label']}: " + ", ".join(f"{r['workload']} b{r['batch']} {r['items_per_s']} it/s"
                                                  for r in result["rows"]) + f"; peak RSS {result['peak_rss_mb']} MB",
                  file=sys.stderr)
        reference = "torch-fp32"
        for engine, result in results["engines"].items():
            base = results["engines"].get(reference)
            for row in result["rows"]:
                name = f"{row['workload']}-{row['batch']}.npy"
                if base is not None:
                    ref_row = next(r for r in base["rows"] if (r["workload"], r["batch"]) == (row["workload"],
                                                                                            row["batch"]))
                    row["speedup_vs_torch_fp32"] = round(row["items_per_s"] / ref_row["items_per_s"], 2)
                    cosine = np.sum(np.load(folder / f"{engine}-{name}") * np.load(folder / f"{reference}-{name}"),
                                    axis=1)
                    row["min_cosine_vs_torch_fp32"] = round(float(cosine.min()), 5)
                    row["mean_cosine_vs_torch_fp32"] = round(float(cosine.mean()), 5)
            if base is not None:  # information, not a rule (parity is R@5: benchmarks/onnx_parity.py)
                result["same_top10_as_torch_fp32"] = _same_top10(folder, engine, reference)
    return results


def _same_top10(folder: Path, engine: str, reference: str) -> float:
    """Share of the text queries whose top 10 among the image+text items is the same set as torch fp32's."""
    def top10(label: str) -> np.ndarray:
        queries, pool = (np.load(folder / f"{label}-{name}.npy") for name in ("text-64", "image+text-64"))
        return np.argsort(-(queries @ pool.T), axis=1)[:, :10]

    ours, theirs = top10(engine), top10(reference)
    return round(float(np.mean([set(a) == set(b) for a, b in zip(ours, theirs, strict=True)])), 3)


def _print(result: dict[str, Any]) -> None:
    machine = result["machine"]
    print(f"CPU: {machine['cpu']} ({machine['cpu_count']} cores, torch threads {machine['torch_threads']})")
    print(f"CPU flags: {' '.join(machine['cpu_flags']) or '-'}; absent: {' '.join(machine['cpu_flags_absent']) or '-'}")
    print(f"model: {result['model']}; " + ", ".join(f"{k} {v}" for k, v in result["runtimes"].items()) + "\n")
    print(f"{'engine':<18}{'workload':<16}{'items/s':>10}{'vs torch fp32':>15}{'min cos':>10}{'peak RSS':>11}")
    for engine, data in result["engines"].items():
        if "same_top10_as_torch_fp32" in data:
            print(f"{engine:<18}same top-10 as torch fp32 (text queries over image+text items): "
                  f"{data['same_top10_as_torch_fp32']:.1%}")
        for row in data["rows"]:
            print(f"{engine:<18}{row['workload'] + ' b' + str(row['batch']):<16}{row['items_per_s']:>10}"
                  f"{str(row.get('speedup_vs_torch_fp32', '')) + 'x':>15}{row.get('min_cosine_vs_torch_fp32', ''):>10}"
                  f"{str(data['peak_rss_mb']) + ' MB':>11}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="jfe-mini", help="model name or folder (exported here for ONNX)")
    parser.add_argument("--items", type=int, default=128, help="items per batch-64 workload")
    parser.add_argument("--single", type=int, default=16, help="items of the batch-1 workload")
    parser.add_argument("--threads", type=int, default=0, help="torch and ONNX Runtime threads (0: torch's default)")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    from jfe.hardware import tune_allocator

    tune_allocator()
    engines = tuple(e.strip() for e in args.engines.split(",") if e.strip())
    result = run(args.model, items=args.items, single=args.single, threads=args.threads or None, engines=engines)
    _print(result)
    if args.out:
        from jfe.paths import atomic_write

        with atomic_write(args.out) as handle:
            handle.write(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
