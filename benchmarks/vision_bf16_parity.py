"""Why MobileNetV2 stays fp32 under bf16: its speed-up and what it costs jfe-mini's embeddings, in one run.

On ``--items`` real MiniBEIR images (task-0 candidates of the local pools, shuffled with seed 0; the last
quarter also carry a text, as composed queries do) with the pretrained towers at 224 px, it measures

* MobileNetV2 alone (BN-folded, channels-last, as the package runs it): seconds per batch in fp32 and bf16
  autocast, and the cosine of the pooled features;
* jfe-mini's embeddings (``--model``, default the untrained ``jfe-mini``; a trained folder is better) with the
  language model in bf16 and the tower in fp32 (the package's bf16 path), and with the tower in bf16 too:
  cosine to fp32 and the share of image queries whose top-10 in a pool of the other items is unchanged,
  with bf16's score noise and the fp32 gap between ranks 10 and 11 of the queries whose top-10 changed;
* with ``--probe-parts``, where in the language model that noise comes from: the package's bf16 again with one
  part kept in fp32 at a time (the projector, the feed-forward layers, self-attention, the last layer, the
  last two layers).

    python benchmarks/vision_bf16_parity.py --out runs/bench/vision_bf16_parity.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from jfe.data.items import Item
from jfe.data.mbeir import read_candidates
from jfe.hardware import machine_summary
from jfe.models import feature_cache, load_model
from jfe.models.vision import VisionTower, fold_batchnorm, preprocess

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmarks, run from anywhere
from search_latency import _time  # noqa: E402  (warm-up, then timed repeats)


def _top10_same(vectors: np.ndarray, reference: np.ndarray, queries: int) -> float:
    ranked = [np.argsort(-(v[:queries] @ v[queries:].T), axis=1)[:, :10] for v in (reference, vectors)]
    return float(np.mean([set(a) == set(b) for a, b in zip(*ranked, strict=True)]))


def _near_ties(vectors: np.ndarray, reference: np.ndarray, queries: int) -> dict[str, object]:
    """Is a lost top-10 a near-tie? bf16's score noise against the fp32 gap between ranks 10 and 11."""
    ref_scores, scores = (v[:queries] @ v[queries:].T for v in (reference, vectors))
    noise = np.abs(ref_scores - scores)
    order = np.argsort(-ref_scores, axis=1)
    tenth, eleventh = (np.take_along_axis(ref_scores, order[:, r:r + 1], 1)[:, 0] for r in (9, 10))
    gaps = tenth - eleventh
    changed = [set(a[:10]) != set(b) for a, b in zip(order, np.argsort(-scores, axis=1)[:, :10], strict=True)]
    return {"score_noise_median": float(np.median(noise)), "score_noise_p99": float(np.quantile(noise, 0.99)),
            "score_noise_max": float(noise.max()), "rank10_11_gap_median": float(np.median(gaps)),
            "rank10_11_gap_of_changed": sorted(round(float(g), 6) for g, c in zip(gaps, changed, strict=True) if c)}


@contextlib.contextmanager
def _in_fp32(modules: list[torch.nn.Module]) -> Iterator[None]:
    """Run ``modules`` with autocast off (their float inputs cast to fp32) inside a bf16 encode."""
    originals = [module.forward for module in modules]

    def fp32_forward(forward):  # noqa: ANN001, ANN202
        def run(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            with torch.autocast("cpu", enabled=False):
                args = tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
                return forward(*args, **kwargs)
        return run

    for module, forward in zip(modules, originals, strict=True):
        module.forward = fp32_forward(forward)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for module, forward in zip(modules, originals, strict=True):
            module.forward = forward  # type: ignore[method-assign]


def _parts(model: torch.nn.Module) -> dict[str, list[torch.nn.Module]]:
    """jfe-mini's language-model parts that ``--probe-parts`` keeps in fp32, one at a time."""
    layers = list(model.text.bert.encoder.layer)  # type: ignore[union-attr]
    return {"projector": [model.projector],  # type: ignore[list-item]
            "feed-forward": [m for layer in layers for m in (layer.intermediate, layer.output)],
            "self-attention": [layer.attention.self for layer in layers],
            "last layer": layers[-1:], "last two layers": layers[-2:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minibeir", type=Path, default=Path("runs/minibeir"))
    parser.add_argument("--model", default="jfe-mini")
    parser.add_argument("--items", type=int, default=400)
    parser.add_argument("--probe-parts", action="store_true",
                        help="also encode with one language-model part at a time in fp32 (jfe-mini only)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from jfe.hardware import tune_allocator

    tune_allocator()  # as the jfe command does; JFE_MALLOC_TUNE=0 measures glibc's default
    from PIL import Image

    pools = sorted((args.minibeir / "cand_pool" / "local").glob("*task0_cand_pool.jsonl"))
    if not pools:
        parser.error(f"no task-0 candidate pools under {args.minibeir} (build MiniBEIR: make minibeir)")
    candidates = [c for p in pools for c in read_candidates(p) if c.img_path]
    random.Random(0).shuffle(candidates)
    paths = [str(args.minibeir / c.img_path) for c in candidates[:args.items]]
    composed = len(paths) * 3 // 4
    items = [Item(image=p) for p in paths[:composed]] + [Item(image=p, text="the same but in red")
                                                         for p in paths[composed:]]

    folded = fold_batchnorm(VisionTower(224).features)
    pixels = preprocess([Image.open(p).convert("RGB") for p in paths[:128]], 224)
    pixels = pixels.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = folded(pixels).float().mean((2, 3))
        fp32_s = min(_time(lambda: folded(pixels), 3))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = folded(pixels).float().mean((2, 3))
            bf16_s = min(_time(lambda: folded(pixels), 3))
    tower = {"images": len(pixels), "fp32_s": round(fp32_s, 3), "bf16_s": round(bf16_s, 3),
             "speedup": round(fp32_s / bf16_s, 2),
             "pooled_cosine_min": round(float(torch.nn.functional.cosine_similarity(ref, low).min()), 5)}
    print(f"MobileNetV2, {len(pixels)} images: fp32 {fp32_s:.2f} s, bf16 {bf16_s:.2f} s "
          f"({tower['speedup']}x), pooled-feature cosine min {tower['pooled_cosine_min']}")

    model = load_model(args.model, device="cpu")
    rows = {}
    with feature_cache.overridden(mode="off"):
        reference = model.set_precision("fp32", vision="fp32").encode(items, batch_size=64)
        variants = {"lm bf16, tower fp32 (the package's bf16)": model.encode(items, batch_size=64, precision="bf16")}
        model.set_precision("fp32", vision="follow")  # the tower follows the bf16 encode
        variants["lm bf16, tower bf16"] = model.encode(items, batch_size=64, precision="bf16")
        model.set_precision("fp32", vision="fp32")
        if args.probe_parts:
            if not hasattr(model, "projector") or not hasattr(model, "text"):
                parser.error("--probe-parts needs a jfe-mini model")
            for part, modules in _parts(model).items():
                with _in_fp32(modules):
                    variants[f"package's bf16 with the {part} in fp32"] = model.encode(items, batch_size=64,
                                                                                      precision="bf16")
    queries = len(items) // 4
    for name, vectors in variants.items():
        cosine = (reference * vectors).sum(1)
        rows[name] = {"cosine_min": round(float(cosine.min()), 5), "cosine_median": round(float(np.median(cosine)), 5),
                      "top10_same": round(_top10_same(vectors, reference, queries), 3),
                      "near_ties": _near_ties(vectors, reference, queries)}
        print(f"{name}: cosine min {rows[name]['cosine_min']}, median {rows[name]['cosine_median']}, "
              f"same image->image top-10 for {100 * rows[name]['top10_same']:.0f} % of {queries} queries")
        ties = rows[name]["near_ties"]
        print(f"  score noise median {ties['score_noise_median']:.1e}, p99 {ties['score_noise_p99']:.1e}; fp32 gap "
              f"between ranks 10 and 11: median {ties['rank10_11_gap_median']:.1e}, of the changed queries "
              f"{ties['rank10_11_gap_of_changed']}")
    result = {"machine": machine_summary(), "model": args.model, "items": len(items), "tower": tower,
              "embeddings": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
