"""Search at scale: exact and approximate methods on random-but-clustered 384-d vectors, in one run.

For each pool size and method it reports queries/s (one batch of ``--queries`` queries, median of
``--repeats``), recall@10 against exact fp32 search, build time and the peak RSS of the process while the
method was built and searched (sampled every 20 ms). Methods:

* ``numpy``: fp32 ``Q @ P.T`` + ``argpartition`` (the baseline);
* ``faiss-flat``: ``faiss.IndexFlatIP``;
* ``jfe-exact``: :func:`jfe.index.exact.exact_topk` (blocked BLAS + running top-k; bf16 scan with fp32
  rescoring only where the CPU has avx512_bf16/amx_bf16, over a bf16 copy made once - its build time - as
  ``VectorIndex`` keeps one; on such CPUs ``jfe-exact-fp32`` is measured beside it);
* ``hnsw``: ``HNSW{--hnsw-m}`` (efConstruction ``--ef-construction``; efSearch swept over ``--ef-search``);
* ``ivf`` / ``ivfsq8`` / ``ivfpq``: ``IVF{lists},Flat`` / ``,SQ8`` / ``,PQ{m}`` trained on a seeded sample
  (nprobe swept over ``--nprobe``).

The approximate indexes are built through :class:`jfe.index.VectorIndex` (string ids, chunked adds) and
saved; each swept value is then measured in a fresh process that loads the saved folder, whose peak RSS
(``search_rss_mb``) is the RAM serving that index costs.

Vectors: ``--clusters`` unit centres, each vector a centre plus Gaussian noise, L2-normalised; queries are
fresh draws from the same mixture. Ground truth is a streamed exact scan (``exact_topk`` over the pool).
Pools over ``--ram-limit`` vectors are generated in chunks into a float32 file that is memory-mapped
(never the whole pool in RAM as one array); there only jfe-exact, ivfsq8 and ivfpq run.

    nice python benchmarks/search_scale.py --sizes 1000000 --out runs/bench/search_scale.json

Prints the CPU flags that matter (avx2 / avx512* / amx*); figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from jfe import hardware
from jfe.index.vector_index import VectorIndex


def cpu_flags() -> list[str]:
    return sorted(f for f in hardware.cpu_flags() if f.startswith(("avx", "amx", "fma", "f16c")))


def rss_mb(field: str = "VmRSS") -> float:
    """This process's resident memory (``VmRSS``), or its peak so far (``VmHWM``), in MiB."""
    with open("/proc/self/status", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class PeakRSS:
    """Samples VmRSS in a thread: the peak while the ``with`` block ran."""

    def __enter__(self) -> PeakRSS:
        self.peak, self._stop = rss_mb(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_mb())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


def clustered(rng: np.random.Generator, centres: np.ndarray, n: int, noise: float, out: np.ndarray,
              chunk: int = 100_000) -> np.ndarray:
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        block = centres[rng.integers(0, len(centres), m)] + noise * rng.standard_normal((m, centres.shape[1]),
                                                                                        dtype=np.float32)
        out[start:start + m] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def numpy_topk(pool: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    scores = queries @ pool.T
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return np.take_along_axis(part, np.argsort(-np.take_along_axis(scores, part, 1), axis=1), 1)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / truth.shape[1]
                          for a, b in zip(found, truth, strict=True)]))


def timed(search: Callable[[], np.ndarray], repeats: int) -> tuple[float, np.ndarray]:
    found = search()  # warm-up (page-in, thread pools)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        found = search()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), found


def bench_size(n: int, args: argparse.Namespace, workdir: Path) -> list[dict]:
    import faiss

    from jfe.index.exact import Bf16Pool, exact_topk, resolve_scan_precision

    rng = np.random.default_rng(args.seed)
    d, k = args.dim, 10
    centres = rng.standard_normal((args.clusters, d), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    t0 = time.perf_counter()
    in_ram = n <= args.ram_limit
    if in_ram:
        pool = clustered(rng, centres, n, args.noise, np.empty((n, d), dtype=np.float32))
    else:
        path = workdir / f"pool_{n}.f32"
        pool = clustered(rng, centres, n, args.noise, np.lib.format.open_memmap(path, "w+", np.float32, (n, d)))
        pool.flush()
        pool = np.load(path, mmap_mode="r")
    queries = clustered(rng, centres, args.queries, args.noise, np.empty((args.queries, d), dtype=np.float32))
    gen_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, truth = exact_topk(queries, pool, k, precision="fp32")
    truth_s = time.perf_counter() - t0
    print(f"n={n}: generated in {gen_s:.0f}s, ground truth (streamed exact scan) in {truth_s:.0f}s", flush=True)

    def train_sample() -> np.ndarray:
        rows = np.sort(np.random.default_rng(args.seed).choice(n, size=min(n, args.train_sample), replace=False))
        return np.ascontiguousarray(pool[rows])

    rows: list[dict] = []
    base = {"n": n, "dim": d, "queries": args.queries, "pool_in_ram": in_ram}
    def faiss_flat() -> Callable[[], np.ndarray]:
        flat = faiss.IndexFlatIP(d)
        flat.add(pool)
        return lambda: flat.search(queries, k)[1]

    # name -> builds the index (if any) and returns the timed search; the pool must be in RAM but for jfe-exact
    def jfe_exact() -> Callable[[], np.ndarray]:
        # as VectorIndex does: a bf16 copy made once (the build) where the scan runs in bf16, for a pool in RAM
        prepared = Bf16Pool.of(pool) if in_ram and resolve_scan_precision("auto") == "bf16" else None
        return lambda: exact_topk(queries, pool, k, prepared=prepared)[1]

    exact: dict[str, Callable[[], Callable[[], np.ndarray]]] = {"jfe-exact": jfe_exact}
    if resolve_scan_precision("auto") == "bf16":  # the fp32 scan beside it, on the same machine
        exact["jfe-exact-fp32"] = lambda: lambda: exact_topk(queries, pool, k, precision="fp32")[1]
    if in_ram:
        exact["numpy"] = lambda: lambda: numpy_topk(pool, queries, k)
        exact["faiss-flat"] = faiss_flat
    wanted = args.methods.split(",")
    if "jfe-exact" in wanted and "jfe-exact-fp32" in exact:
        wanted.insert(wanted.index("jfe-exact") + 1, "jfe-exact-fp32")
    for name in [m for m in dict.fromkeys(wanted) if m in exact]:
        with PeakRSS() as peak:
            t0 = time.perf_counter()
            search = exact[name]()
            build_s = time.perf_counter() - t0
            seconds, found = timed(search, args.repeats)
        del search  # frees faiss-flat's copy of the pool before the next method
        row = {**base, "method": name, "qps": args.queries / seconds, "recall@10": recall(found, truth),
               "build_s": build_s, "peak_rss_mb": peak.peak}
        if name.startswith("jfe-exact"):
            row["precision"] = "fp32" if name.endswith("fp32") else resolve_scan_precision("auto")
        rows.append(_print_row(row))

    for name in [m for m in args.methods.split(",") if m in ANN_METHODS]:
        factory, param, values = ANN_METHODS[name](args)
        if name in ("hnsw", "ivf") and not in_ram:
            continue  # both keep every fp32 vector in RAM: out of the memory-mapped (larger than RAM) regime
        t0 = time.perf_counter()
        with PeakRSS() as peak:
            index = VectorIndex(d, factory)
            if name == "hnsw":
                faiss.downcast_index(index._index.index).hnsw.efConstruction = args.ef_construction
            index.train(train_sample())
            for start in range(0, n, 200_000):  # chunked: a memory-mapped pool is never read whole
                index.add([str(i) for i in range(start, min(n, start + 200_000))],
                          np.ascontiguousarray(pool[start:start + 200_000]))
        build_s = time.perf_counter() - t0
        folder = workdir / f"{name}_{n}"
        index.save(folder)
        del index
        qfile = workdir / "queries.npy"
        np.save(qfile, queries)
        for value in values:
            served = _search_in_fresh_process(folder, qfile, k, param, value, args.repeats)
            found = np.array([[int(i) for i in ids] + [-1] * (k - len(ids)) for ids in served["ids"]])
            row = {**base, "method": name, "factory": factory, param: value, "qps": served["qps"],
                   "recall@10": recall(found, truth), "build_s": build_s, "peak_rss_mb": peak.peak,
                   "search_rss_mb": served["peak_rss_mb"], "index_mb": _folder_mb(folder)}
            if name == "hnsw":
                row["ef_construction"] = args.ef_construction
            if name.startswith("ivf"):
                row["train_sample"] = args.train_sample
            rows.append(_print_row(row))
        shutil.rmtree(folder, ignore_errors=True)
    return rows


# name -> (faiss factory, the search parameter swept, its values); built through jfe's VectorIndex, so the
# figures include its id mapping and tie rule, as `jfe index build --factory ...` would build it.
ANN_METHODS: dict[str, Callable[[argparse.Namespace], tuple[str, str, list[int]]]] = {
    "hnsw": lambda a: (f"HNSW{a.hnsw_m}", "efSearch", _ints(a.ef_search)),
    "ivf": lambda a: (f"IVF{a.lists},Flat", "nprobe", _ints(a.nprobe)),
    "ivfsq8": lambda a: (f"IVF{a.lists},SQ8", "nprobe", _ints(a.nprobe)),
    "ivfpq": lambda a: (f"IVF{a.lists},PQ{a.pq}", "nprobe", _ints(a.nprobe)),
}


def _ints(text: str) -> list[int]:
    return [int(v) for v in str(text).split(",") if v.strip()]


def _folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.iterdir()) / 2**20


def _print_row(row: dict) -> dict:
    param = next((f"{p}={row[p]}" for p in ("efSearch", "nprobe") if p in row), "")
    extra = f"  searchable in {row['search_rss_mb']:>6.0f} MB" if "search_rss_mb" in row else ""
    print(f"  {row['method']:<10} {param:<12} {row['qps']:>8.0f} q/s  recall@10 {row['recall@10']:.3f}  "
          f"build {row['build_s']:>6.0f}s  peak RSS {row['peak_rss_mb']:>6.0f} MB{extra}", flush=True)
    return row


def _search_in_fresh_process(folder: Path, qfile: Path, k: int, param: str, value: int, repeats: int) -> dict:
    """Load the saved index in a new process and search it there: its peak RSS (VmHWM) is what serving
    the index costs, free of the pool and build memory of this process."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import search_scale; "
            f"search_scale._serve_probe({str(folder)!r}, {str(qfile)!r}, {k}, {param!r}, {value}, {repeats})")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"search process failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _serve_probe(folder: str, qfile: str, k: int, param: str, value: int, repeats: int) -> None:
    index = VectorIndex.load(folder)
    index.set_search_param(param, value)
    queries = np.load(qfile)
    seconds, _ = timed(lambda: index.search(queries, k)[1], repeats)
    ids, _ = index.search(queries, k)
    print(json.dumps({"qps": len(queries) / seconds, "peak_rss_mb": rss_mb("VmHWM"), "ids": ids}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000000", help="comma-separated pool sizes (e.g. 1000000,10000000)")
    parser.add_argument("--methods", default="numpy,faiss-flat,jfe-exact,hnsw,ivf,ivfsq8,ivfpq")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=256, help="query batch (also the ground-truth queries)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--noise", type=float, default=0.06, help="per-coordinate Gaussian noise around a centre")
    parser.add_argument("--ef-search", default="64,128,256", help="HNSW efSearch values to sweep")
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--ef-construction", type=int, default=40)
    parser.add_argument("--lists", type=int, default=1024)
    parser.add_argument("--pq", type=int, default=32)
    parser.add_argument("--nprobe", default="1,2,4,8,16", help="IVF nprobe values to sweep")
    parser.add_argument("--train-sample", type=int, default=131_072)
    parser.add_argument("--ram-limit", type=int, default=2_000_000, help="bigger pools are memory-mapped files")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-precision", action="store_true",
                        help="skip the fp32-vs-bf16 encode and training throughput (precision_throughput.py)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from jfe.hardware import tune_allocator

    tune_allocator()  # as the jfe command does; JFE_MALLOC_TUNE=0 measures glibc's default
    import faiss

    env = {"machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count(),
           "cpu_flags": cpu_flags(), "faiss": faiss.__version__, "numpy": np.__version__,
           "faiss_threads": faiss.omp_get_max_threads(), "load_avg_start": os.getloadavg()}
    print("CPU flags:", " ".join(env["cpu_flags"]) or "(unknown)", flush=True)
    rows: list[dict] = []
    result: dict = {"env": env, "args": {k: str(v) for k, v in vars(args).items()}, "results": rows}

    def save() -> None:
        if args.out:
            env["load_avg_end"] = os.getloadavg()
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")

    with tempfile.TemporaryDirectory(prefix="jfe_search_scale_") as workdir:
        for n in (int(s) for s in args.sizes.split(",") if s.strip()):
            rows.extend(bench_size(n, args, Path(workdir)))
            save()  # after every size: a long run killed half way keeps what it measured
    if not args.no_precision:  # encode and training throughput, fp32 vs bf16, in the same run (issue 12)
        import precision_throughput

        precision_throughput._print(precision_throughput.run(result)["precision"])
    save()
    if args.out:
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
