"""Large photos: what decoding and resizing cost per image, and what the fast path changes, in one run.

Real collections hold camera photos (12 MP JPEGs) and large PNG scans, far above the 224 px the vision tower
reads. For synthetic photo-like images of each kind (smooth colour fields with fine noise, so JPEG and PNG
compress them like photos), it times per image

* exact: a full decode (``load_image``) then padding to a square and one bicubic resize, the package's
  preprocessing up to ``PREPROCESS_VERSION`` 1;
* fast: what the package does now — JPEGs decoded at the decoder's reduced scale (``min_side``), images over
  ``2 x REDUCING_GAP x`` the input size box-reduced before the bicubic resize;

and compares the two: mean and max absolute pixel difference (ImageNet-normalised units) and the cosine of
untrained jfe-mini image embeddings (``--model`` for a trained folder), plus the decoded image's memory.

    python benchmarks/photo_images.py --out runs/bench/photo_images.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from jfe.data.images import load_image
from jfe.data.items import Item
from jfe.hardware import machine_summary
from jfe.models.vision import preprocess

KINDS = {"jpeg_12mp": ((4032, 3024), "JPEG"), "jpeg_2mp": ((1600, 1200), "JPEG"),
         "png_12mp": ((4000, 3000), "PNG")}


def _photo_like(size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray((rng.random((12, 16, 3)) * 255).astype(np.uint8)).resize(size, Image.Resampling.BICUBIC)
    noise = rng.normal(0, 6, (size[1], size[0], 3))
    return Image.fromarray(np.clip(np.asarray(coarse, dtype=np.float64) + noise, 0, 255).astype(np.uint8))


def _exact_image(path: Path, size: int) -> Image.Image:
    image = load_image(path)
    side = max(image.size)
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return canvas.resize((size, size), Image.Resampling.BICUBIC)


def _timed_pixels(paths: list[Path], size: int, fast: bool) -> tuple[float, torch.Tensor]:
    def one(path: Path) -> torch.Tensor:
        return preprocess([load_image(path, min_side=size) if fast else _exact_image(path, size)], size)

    one(paths[0])  # warm-up
    started = time.perf_counter()
    out = torch.cat([one(p) for p in paths])
    return (time.perf_counter() - started) / len(paths), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=6, help="images per kind")
    parser.add_argument("--model", default="jfe-mini", help="a model name or trained folder, for the cosine")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from jfe.models import load_model

    torch.manual_seed(0)
    model = load_model(args.model, device="cpu", pretrained=False) if args.model == "jfe-mini" else \
        load_model(args.model, device="cpu")
    size = 224
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind, (dims, fmt) in KINDS.items():
            paths = []
            for i in range(args.images):
                path = Path(tmp) / f"{kind}_{i}.{fmt.lower()}"
                _photo_like(dims, i).save(path, **({"quality": 90} if fmt == "JPEG" else {}))
                paths.append(path)
            exact_s, exact = _timed_pixels(paths, size, fast=False)
            fast_s, fast = _timed_pixels(paths, size, fast=True)
            diff = (fast - exact).abs()
            # the model reads the exact 224-px image as is (its own resize is a no-op) and the file the fast way
            old = model.encode([_exact_image(p, size) for p in paths], batch_size=8, precision="fp32")
            new = model.encode([Item(image=str(p)) for p in paths], batch_size=8, precision="fp32")
            results[kind] = {
                "width": dims[0], "height": dims[1],
                "file_mb": round(float(np.mean([p.stat().st_size for p in paths])) / 2**20, 2),
                "exact_ms_per_image": round(1000 * exact_s, 1), "fast_ms_per_image": round(1000 * fast_s, 1),
                "speedup": round(exact_s / fast_s, 2),
                "decoded_mb_exact": round(dims[0] * dims[1] * 3 / 2**20, 1),
                "decoded_mb_fast": round(float(np.prod(load_image(paths[0], min_side=size).size)) * 3 / 2**20, 2),
                "pixel_diff_mean": round(float(diff.mean()), 4), "pixel_diff_max": round(float(diff.max()), 4),
                "embedding_cosine_min": round(float((old * new).sum(1).min()), 6),
            }
            print(kind, results[kind], flush=True)
    report = {"machine": machine_summary(), "model": args.model, "input_size": size,
              "images_per_kind": args.images, "kinds": results}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["machine"]))


if __name__ == "__main__":
    main()
