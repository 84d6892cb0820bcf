"""Load test of `jfe serve`: requests/s and p50/p99 latency of POST /search at several concurrency levels,
with and without micro-batching, in one run.

The server runs as its own process (`jfe serve` on a free loopback port), so the load generator (one
asyncio httpx client) does not share its interpreter. Queries mix text, image and image+text. Each cell
is bounded by --requests and --seconds. Loopback only; nothing leaves the machine.

    python benchmarks/serve_load.py --out runs/bench/serve_load.json               # toy encoder
    python benchmarks/serve_load.py --model jfe-mini --out runs/bench/serve_load_mini.json
    python benchmarks/serve_load.py --model two-tower-mini --rerank jfe-mini-rerank --rerank-k 20 --concurrency 8 \
        --batching on --out runs/bench/serve_load_rerank.json       # /search with reranking
    python benchmarks/serve_load.py --model jfe-mini --precision fp32 --concurrency 32 --batching on    # torch fp32
    python benchmarks/serve_load.py --model runs/onnx/jfe-mini-int8 --concurrency 32 --batching on  # ONNX int8
    python benchmarks/serve_load.py --concurrency 32 --seconds 60 --requests 1000000 --invalid-fraction 0.1 \
        --batching on --out runs/bench/serve_load_invalid.json     # the reliability probe: 0 errors on valid ones

``--invalid-fraction F`` mixes malformed requests (bad Unicode, deep JSON, a huge instruction, an empty body,
bad base64, k=true, unknown fields) into the stream: errors are counted on the valid requests only, and the
invalid ones must all be answered 4xx (a 5xx or a dropped connection counts as ``invalid_5xx``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

CLI = "from jfe.cli import main; main()"


def build_index(model_name: str, workdir: Path) -> tuple[Path, Path, str]:
    """The sample shapes dataset, indexed with ``model_name``; returns (index dir, data root, model to serve).

    A registry name without trained weights builds fresh glue weights on every load, so the model is saved and
    the server loads that folder: the server then embeds queries with exactly the weights that embedded the
    index. A name with trained weights (two-tower-mini) is served by name, as a reranker trained on it expects.
    """
    from jfe.models.pretrained import find_pretrained
    from jfe.models.registry import load_model
    from jfe.serve.sample import build_sample_index

    root = workdir / "sample"
    model = load_model(model_name)
    index = build_sample_index(root, model)
    served = model_name
    if model_name not in ("toy", "toy-hash") and not Path(model_name).is_dir() and find_pretrained(model_name) is None:
        served = str(model.save_pretrained(workdir / "model"))
    return index.save(workdir / "index"), root, served


def payloads(root: Path, rerank: str | None = None, rerank_k: int = 20) -> list[dict]:
    """Text, image and image+text queries over the sample dataset, interleaved (each reranked when ``rerank``)."""
    images = sorted((root / "images" / "sample").glob("*.png"))
    out = []
    for i, path in enumerate(images):
        url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
        colour, shape = path.stem.split("_")
        out.append({"text": f"a {colour} {shape}", "k": 10})
        out.append({"image": url, "k": 10})
        out.append({"image": url, "text": "make it " + ("red" if i % 2 else "a circle"), "k": 10})
    if rerank:
        out = [{**body, "rerank": rerank, "rerank_k": rerank_k} for body in out]
    return out


def invalid_bodies() -> list[bytes]:
    """Malformed /search requests of the kinds a hostile or careless client sends."""
    return [b'{"text": "\\ud800 lone surrogate"}', b'{"text": ' + b"[" * 2000 + b"]" * 2000 + b"}",
            json.dumps({"text": "red", "instruction": "x" * 200_000}).encode(), b"",
            b'{"image": "data:image/png;base64,!!!not-base64"}', b'{"text": "red", "k": true}',
            b'{"text": "red", "unknown": 1}', b'{"text": "red", "k": 1000}', b"[1, 2, 3]"]


def mixed(bodies: list[dict], fraction: float) -> list[tuple[bytes, bool]]:
    """(body, is it valid) in a fixed interleaving with ``fraction`` of them invalid."""
    valid = [json.dumps(b).encode() for b in bodies]
    if fraction <= 0:
        return [(b, True) for b in valid]
    bad = invalid_bodies()
    out, debt = [], 0.0
    for i in range(max(len(valid), int(len(bad) / fraction))):
        debt += fraction
        if debt >= 1.0:
            debt -= 1.0
            out.append((bad[i % len(bad)], False))
        else:
            out.append((valid[i % len(valid)], True))
    return out


def start_server(index_dir: Path, model: str, batching: bool, port: int, max_batch: int, max_wait_ms: float,
                 rerank: str | None = None, backend: str | None = None, precision: str = "auto") -> subprocess.Popen:
    args = [sys.executable, "-c", CLI, "serve", "--index", str(index_dir), "--model", model, "--port", str(port),
            "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms), "--log-level", "warning",
            "--batching" if batching else "--no-batching", *(("--rerank", rerank) if rerank else ()),
            *(("--backend", backend) if backend else ()), "--precision", precision]
    env = {k: v for k, v in os.environ.items() if k != "JFE_API_KEY"}
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"jfe serve exited with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).raise_for_status()
            return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("jfe serve did not start within 120 s")


async def run_cell(url: str, bodies: list[tuple[bytes, bool]], concurrency: int, max_requests: int,
                   max_seconds: float) -> dict:
    """``concurrency`` workers send requests back to back until the request or time budget is spent."""
    latencies: list[float] = []
    errors = invalid = invalid_5xx = 0
    issued = 0
    failures: dict[str, int] = {}  # what the failed valid requests got: status (599: the connection dropped)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"Content-Type": "application/json"}
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        before = (await client.get("/health")).json()["stats"]
        for body, _ in [b for b in bodies if b[1]][:3]:  # warm-up (first requests pay lazy initialisation)
            await client.post("/search", content=body, headers=headers)
        start = time.perf_counter()
        deadline = start + max_seconds

        async def worker() -> None:
            nonlocal issued, errors, invalid, invalid_5xx
            while issued < max_requests and time.perf_counter() < deadline:
                body, valid = bodies[issued % len(bodies)]
                issued += 1
                t0 = time.perf_counter()
                try:
                    response = await client.post("/search", content=body, headers=headers)
                    status = response.status_code
                except httpx.HTTPError as exc:
                    status = 599  # a dropped connection
                    failures[type(exc).__name__] = failures.get(type(exc).__name__, 0) + 1
                if not valid:
                    invalid += 1
                    invalid_5xx += status >= 500 or not 400 <= status < 500
                    continue
                latencies.append(time.perf_counter() - t0)
                if status != 200:
                    errors += 1
                    failures[str(status)] = failures.get(str(status), 0) + 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
        after = (await client.get("/health")).json()["stats"]
    batches = after["batches"] - before["batches"]
    items = after["items"] - before["items"]
    lat = np.array(latencies) * 1000
    return {"concurrency": concurrency, "requests": len(latencies), "errors": errors, "failures": failures,
            "invalid": invalid,
            "invalid_5xx": invalid_5xx, "seconds": round(elapsed, 3), "rps": round(len(latencies) / elapsed, 2),
            "p50_ms": round(float(np.percentile(lat, 50)), 2), "p99_ms": round(float(np.percentile(lat, 99)), 2),
            "mean_batch": round(items / max(batches, 1), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="toy", help="model name or folder (default: the toy encoder)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=300, help="most requests per cell")
    parser.add_argument("--seconds", type=float, default=10.0, help="most seconds per cell")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--invalid-fraction", type=float, default=0.0,
                        help="share of malformed requests mixed in (counted apart; they must all get a 4xx)")
    parser.add_argument("--batching", choices=["both", "on", "off"], default="both")
    parser.add_argument("--rerank", help="serve this reranker and rerank every /search (e.g. jfe-mini-rerank)")
    parser.add_argument("--rerank-k", type=int, default=20, help="first-stage hits reranked per query")
    parser.add_argument("--backend", choices=["torch", "onnx", "openvino"], help="what encodes queries (`jfe serve "
                        "--backend`); an ONNX export folder as --model runs on onnx unless openvino is named")
    parser.add_argument("--precision", default="auto", help="`jfe serve --precision` (torch, openvino: auto, fp32, "
                        "bf16)")
    args = parser.parse_args()
    from jfe.hardware import tune_allocator

    tune_allocator()  # as the jfe command does; JFE_MALLOC_TUNE=0 measures glibc's default

    from jfe.hardware import machine_summary
    from jfe.serve.server import free_port

    results = []
    with tempfile.TemporaryDirectory(prefix="jfe-serve-load-") as tmp:
        index_dir, root, served = build_index(args.model, Path(tmp))
        bodies = mixed(payloads(root, args.rerank, args.rerank_k), args.invalid_fraction)
        for batching in {"both": (True, False), "on": (True,), "off": (False,)}[args.batching]:
            port = args.port or free_port()
            proc = start_server(index_dir, served, batching, port, args.max_batch, args.max_wait_ms, args.rerank,
                                args.backend, args.precision)
            try:
                for concurrency in args.concurrency:
                    cell = asyncio.run(run_cell(f"http://127.0.0.1:{port}", bodies, concurrency, args.requests,
                                                args.seconds))
                    cell["batching"] = batching
                    results.append(cell)
                    print(f"  batching={'on ' if batching else 'off'} c={concurrency:<3} {cell['rps']:8.1f} req/s  "
                          f"p50 {cell['p50_ms']:7.1f} ms  p99 {cell['p99_ms']:7.1f} ms  "
                          f"batch {cell['mean_batch']:5.1f}  errors {cell['errors']}  invalid {cell['invalid']} "
                          f"(non-4xx {cell['invalid_5xx']})", file=sys.stderr)
            finally:
                proc.terminate()
                proc.wait(timeout=30)

    header = (f"{'batching':<9}{'conc':>5}{'requests':>10}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'batch':>7}"
              f"{'errors':>8}{'invalid':>9}{'non-4xx':>9}")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{'on' if r['batching'] else 'off':<9}{r['concurrency']:>5}{r['requests']:>10}{r['rps']:>9.1f}"
              f"{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}{r['mean_batch']:>7.1f}{r['errors']:>8}{r['invalid']:>9}"
              f"{r['invalid_5xx']:>9}")
    report = {"benchmark": "serve_load", "model": args.model, "endpoint": "POST /search (text, image, image+text)",
              "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms, "requests_per_cell": args.requests,
              "seconds_per_cell": args.seconds, "invalid_fraction": args.invalid_fraction,
              "rerank": args.rerank, "rerank_k": args.rerank_k if args.rerank else None,
              "backend": args.backend, "precision": args.precision,
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "python": platform.python_version(), **machine_summary()},
              "results": results}
    if args.out:
        from jfe.paths import atomic_write

        with atomic_write(args.out) as handle:
            json.dump(report, handle, indent=2)
            handle.write("\n")
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
