"""Reranking cost: milliseconds per query to rerank its top 20 / 50 / 100 with a reranker, in fp32 and bf16, with the
candidates' visual features cached (the service's steady state: the feature cache holds the pool's images) and cold
(every candidate image decoded and run through MobileNetV2's frozen trunk again).

Queries are MiniBEIR test composed queries (task 7: an image and an edit text), each paired with the first N images
of its pool; the scores do not depend on which candidates they are, the cost does not either. One run measures
every cell on this machine; the CPU flags are printed with the figures.

    python benchmarks/rerank_latency.py --out runs/bench/rerank_latency.json
    python benchmarks/rerank_latency.py --reranker runs/rerank/models/jfe-mini-rerank/seed0/final --queries 10
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def _queries(data: Path, n: int) -> tuple[list, list]:
    from jfe.data.items import candidate_item, query_item
    from jfe.data.mbeir import MBEIRLayout, read_candidates, read_queries

    layout = MBEIRLayout(data)
    path = next(p for p in layout.query_files("test") if "task7" in p.stem)
    pool = layout.local_pool_for(path)
    assert pool is not None, f"no local pool for {path}"
    queries = [query_item(q, data) for q in read_queries(path)[:n]]
    candidates = [candidate_item(c, data) for c in read_candidates(pool) if c.img_path][:1000]
    return queries, candidates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reranker", default="jfe-mini-rerank", help="reranker name or folder")
    parser.add_argument("--data", type=Path, default=Path("runs/minibeir"), help="MiniBEIR (make minibeir)")
    parser.add_argument("--queries", type=int, default=12, help="queries timed per cell")
    parser.add_argument("--ks", type=int, nargs="+", default=[20, 50, 100], help="candidates reranked per query")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--batch-size", type=int, default=64, help="pairs per forward pass")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()

    import torch

    from jfe.hardware import machine_summary, tune_allocator
    from jfe.models import feature_cache, load_model
    from jfe.models.precision import resolve_precision

    tune_allocator()
    reranker = load_model(args.reranker, device="cpu")
    queries, candidates = _queries(args.data, args.queries)
    machine = machine_summary()
    print(f"{args.reranker} on {machine.get('cpu')} ({torch.get_num_threads()} threads; flags "
          f"{machine.get('cpu_flags')})", file=sys.stderr)
    results = []
    for precision in args.precisions:
        if precision == "bf16" and resolve_precision("auto", torch.device("cpu")) != "bf16":
            print("  bf16: skipped (this CPU has no native bf16)", file=sys.stderr)
            continue
        for k in args.ks:
            shortlist = candidates[:k]
            prior = [[0.5] * len(shortlist)]
            for cached in (True, False):
                feature_cache.clear()
                reranker.rerank([queries[0]], [shortlist], prior, precision=precision,
                                batch_size=args.batch_size)  # warm-up; fills the cache for the cached cells
                times = []
                for query in queries:
                    if not cached:
                        feature_cache.clear()
                    t0 = time.perf_counter()
                    reranker.rerank([query], [shortlist], prior, precision=precision, batch_size=args.batch_size)
                    times.append(time.perf_counter() - t0)
                ms = np.array(times) * 1000
                cell = {"precision": precision, "rerank_k": k, "features": "cached" if cached else "cold",
                        "queries": len(times), "mean_ms": round(float(ms.mean()), 1),
                        "p50_ms": round(float(np.percentile(ms, 50)), 1),
                        "p90_ms": round(float(np.percentile(ms, 90)), 1)}
                results.append(cell)
                print(f"  {precision} k={k:<4} {cell['features']:<6} {cell['mean_ms']:8.1f} ms/query "
                      f"(p50 {cell['p50_ms']}, p90 {cell['p90_ms']})", file=sys.stderr)
    report = {"benchmark": "rerank_latency", "reranker": args.reranker, "batch_size": args.batch_size,
              "threads": torch.get_num_threads(), "machine": machine, "results": results}
    print(json.dumps(report, indent=2))
    if args.out:
        from jfe.paths import atomic_write

        args.out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(args.out) as handle:
            json.dump(report, handle, indent=2)
            handle.write("\n")
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
