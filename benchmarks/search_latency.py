"""Exact top-k search speed: ``jfe.index.VectorIndex`` (faiss Flat, inner product) vs plain numpy.

For each pool size (random L2-normalised float32 vectors, default 384-d) it measures

* batch throughput: queries/s for batches of ``--batch`` queries, and the per-batch latency;
* single-query latency: p50 / p99 over ``--singles`` one-query searches (and the resulting queries/s);

for three methods in the same run: ``VectorIndex.search`` (what JFE users get: faiss + string ids + tie
rule), raw ``faiss.IndexFlatIP`` (to show the wrapper's cost) and a numpy baseline (matrix product, then
``argpartition`` for the top k and a sort of those k). It checks that all three return the same top-k
(up to float ties) and prints a table; ``--out`` writes JSON.

    python benchmarks/search_latency.py --out runs/bench/search_latency.json
    python benchmarks/search_latency.py --sizes 10000 --singles 50          # quick

The numbers depend on the machine and on its load; record both with them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def _unit(rng: np.random.Generator, n: int, d: int, chunk: int = 200_000) -> np.ndarray:
    out = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, chunk):
        block = rng.standard_normal((min(chunk, n - start), d), dtype=np.float32)
        out[start:start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def numpy_topk(pool: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The baseline: scores = Q @ P^T, argpartition for the top k, then sort those k."""
    scores = queries @ pool.T
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    top = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-top, axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1), np.take_along_axis(part, order, axis=1)


def _time(fn: Callable[[], object], repeats: int) -> list[float]:
    fn()  # warm-up (page-in, thread pool start)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def bench_size(n: int, dim: int, k: int, batch: int, batches: int, singles: int, seed: int) -> list[dict]:
    import faiss

    from jfe.index import VectorIndex

    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    pool = _unit(rng, n, dim)
    queries = _unit(rng, max(batch, singles), dim)
    ids = [str(i) for i in range(n)]
    index = VectorIndex(dim)
    index.add(ids, pool)
    flat = faiss.IndexFlatIP(dim)
    flat.add(pool)
    build_s = time.perf_counter() - t0

    # agreement: same top-k ids (compare as sets of ints; random floats make exact ties unlikely)
    ref_scores, ref_idx = numpy_topk(pool, queries[:batch], k)
    got_ids, got_scores = index.search(queries[:batch], k)
    agree = np.mean([set(map(int, row)) == set(map(int, ref)) for row, ref in zip(got_ids, ref_idx, strict=True)])
    max_score_diff = float(np.abs(got_scores - ref_scores).max())

    methods: dict[str, Callable[[np.ndarray], object]] = {
        "VectorIndex": lambda q: index.search(q, k),
        "faiss IndexFlatIP": lambda q: flat.search(q, k),
        "numpy matmul+argpartition": lambda q: numpy_topk(pool, q, k),
    }
    rows = []
    for name, fn in methods.items():
        batch_times = _time(lambda fn=fn: fn(queries[:batch]), batches)
        single_times = []
        fn(queries[:1])
        for i in range(singles):
            q = queries[i:i + 1]
            t0 = time.perf_counter()
            fn(q)
            single_times.append(time.perf_counter() - t0)
        single = np.array(single_times) * 1000
        rows.append({
            "n": n, "dim": dim, "k": k, "method": name, "batch": batch,
            "batch_qps": batch / float(np.median(batch_times)),
            "batch_ms_p50": 1000 * float(np.median(batch_times)),
            "single_ms_p50": float(np.percentile(single, 50)), "single_ms_p99": float(np.percentile(single, 99)),
            "single_qps": 1000 / float(np.mean(single)), "singles": singles, "batches": batches,
            "topk_agreement_vs_numpy": float(agree), "max_score_diff": max_score_diff, "setup_s": build_s,
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated pool sizes")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--batch", type=int, default=256, help="queries per batch")
    parser.add_argument("--batches", type=int, default=5, help="timed batches per method")
    parser.add_argument("--singles", type=int, default=200, help="timed single-query searches per method")
    parser.add_argument("--threads", type=int, default=0, help="faiss/BLAS threads (0: library default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    from jfe.hardware import tune_allocator

    tune_allocator()  # as the jfe command does; JFE_MALLOC_TUNE=0 measures glibc's default
    if args.threads:
        import faiss

        faiss.omp_set_num_threads(args.threads)

    def write_json() -> None:
        import faiss

        args.out.parent.mkdir(parents=True, exist_ok=True)
        env = {"machine": platform.machine(), "python": platform.python_version(), "cpus": os.cpu_count(),
               "faiss": faiss.__version__, "numpy": np.__version__, "load_avg": os.getloadavg(),
               "faiss_threads": faiss.omp_get_max_threads()}
        args.out.write_text(json.dumps({"env": env, "args": {k: str(v) for k, v in vars(args).items()},
                                        "results": rows}, indent=2) + "\n")

    rows: list[dict] = []
    for n in (int(s) for s in args.sizes.split(",") if s.strip()):
        # fewer single queries on big pools keeps the run short; p99 over >= 50 still means something
        singles = args.singles if n <= 100_000 else max(50, args.singles // 4)
        rows.extend(bench_size(n, args.dim, args.k, args.batch, args.batches, singles, args.seed))
        summary = ", ".join(f"{x['method']} {x['batch_qps']:.0f} q/s" for x in rows[-3:])
        print(f"n={n}: done ({summary})", flush=True)
        if args.out:  # after every size, so a long run killed half way keeps what it measured
            write_json()

    head = f"{'n':>9} {'method':<27} {'batch q/s':>10} {'batch ms':>9} {'1q p50 ms':>10} {'1q p99 ms':>10} " \
           f"{'1q q/s':>8} {'agree':>6}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['n']:>9} {r['method']:<27} {r['batch_qps']:>10.0f} {r['batch_ms_p50']:>9.1f} "
              f"{r['single_ms_p50']:>10.2f} {r['single_ms_p99']:>10.2f} {r['single_qps']:>8.0f} "
              f"{r['topk_agreement_vs_numpy']:>6.3f}")
    if args.out:
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
