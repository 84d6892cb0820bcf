"""Deterministic image writing: every MiniBEIR image is an RGB PNG of a fixed size on white.

PNGs are written with fixed zlib settings and no metadata, so the same input gives the same bytes.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from jfe.data.images import to_rgb
from jfe.errors import DataError

WHITE = (255, 255, 255)


def fit_square(image: Image.Image, size: int, margin: float = 0.0) -> Image.Image:
    """Scale ``image`` (any mode) to fit a ``size`` x ``size`` white square, keeping its aspect ratio."""
    rgb = to_rgb(image)  # composite on white first: resizing RGBA without premultiplying leaves dark fringes
    inner = max(1, round(size * (1 - 2 * margin)))
    scale = inner / max(rgb.width, rgb.height)
    w, h = max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))
    if (w, h) != rgb.size:
        rgb = rgb.resize((w, h), Image.Resampling.BICUBIC if scale > 1 else Image.Resampling.LANCZOS,
                         reducing_gap=None if scale > 1 else 3.0)
    canvas = Image.new("RGB", (size, size), WHITE)
    canvas.paste(rgb, ((size - w) // 2, (size - h) // 2))
    return canvas


def render_svg(path: Path, size: int) -> Image.Image:
    """Render an SVG to an RGB ``size`` x ``size`` image on white (resvg, no system fonts: deterministic)."""
    import resvg_py

    try:
        png = resvg_py.svg_to_bytes(svg_path=str(path), width=size, height=size, background="#ffffff",
                                    skip_system_fonts=True)
    except ValueError as exc:
        raise DataError(f"cannot render SVG ({exc})", path=str(path)) from None
    with Image.open(io.BytesIO(bytes(png))) as image:
        return fit_square(image, size)


def load_raster(path: Path, size: int, margin: float = 0.0) -> Image.Image:
    """Open a PNG, composite it on white and fit it into the square."""
    try:
        with Image.open(path) as image:
            image.load()
            return fit_square(image, size, margin)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read image ({exc})", path=str(path)) from None


def save_png(image: Image.Image, path: Path) -> None:
    """Write a PNG with fixed settings (byte-identical for identical pixels)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", optimize=False, compress_level=6)


class ImageRegistry:
    """Images the dataset needs, keyed by their relative path; rendered only when written."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._makers: dict[str, Callable[[], Image.Image]] = {}

    def svg(self, rel: str, source: Path) -> str:
        self._makers.setdefault(rel, lambda: render_svg(source, self.size))
        return rel

    def raster(self, rel: str, source: Path, margin: float = 0.0) -> str:
        self._makers.setdefault(rel, lambda: load_raster(source, self.size, margin))
        return rel

    def __contains__(self, rel: str) -> bool:
        return rel in self._makers

    def __len__(self) -> int:
        return len(self._makers)

    def write(self, root: Path, only: set[str] | None = None, progress: bool = False) -> int:
        """Render and save the registered images (those in ``only``, when given) under ``root``."""
        names = sorted(n for n in self._makers if only is None or n in only)

        def make(rel: str) -> None:
            save_png(self._makers[rel](), root / rel)

        # PIL's decode/resize/encode release the GIL, so threads use every core; each image is its own
        # file, so the output does not depend on the order they finish in
        with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
            done = pool.map(make, names)
            if progress:
                from tqdm import tqdm

                done = tqdm(done, total=len(names), desc="images", unit="img", leave=False)
            for _ in done:
                pass
        return len(names)
