"""Image loading with clear errors: missing, corrupt, oversized (decompression bombs), odd modes."""

from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from jfe.errors import DataError

# 40 megapixels: far above any retrieval input, far below what would exhaust memory when decoded.
MAX_PIXELS = 40_000_000


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """RGB with transparent areas composited onto a white background (emoji have alpha)."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, background)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def load_image(source: str | os.PathLike | bytes | Image.Image, *, item_id: str | None = None,
               max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open an image from a path, raw bytes or a PIL image and return it as RGB.

    Raises :class:`DataError` naming the item and the file when the image is missing, unreadable,
    or larger than ``max_pixels``.
    """
    if isinstance(source, Image.Image):
        if source.width * source.height > max_pixels:
            raise DataError(f"image has {source.width}x{source.height} pixels, over the limit of "
                            f"{max_pixels}", record_id=item_id)
        return to_rgb(source)
    where = None if isinstance(source, bytes) else str(source)
    try:
        handle = io.BytesIO(source) if isinstance(source, bytes) else Path(source).open("rb")  # noqa: SIM115
    except FileNotFoundError:
        raise DataError("image file not found", path=where, record_id=item_id) from None
    except OSError as exc:
        raise DataError(f"cannot open image ({exc.strerror})", path=where, record_id=item_id) from None
    with handle:
        try:
            with Image.open(handle) as probe:
                if probe.width * probe.height > max_pixels:
                    raise DataError(f"image has {probe.width}x{probe.height} pixels, over the limit of "
                                    f"{max_pixels}", path=where, record_id=item_id)
                probe.load()
                return to_rgb(probe)
        except DataError:
            raise
        except Image.DecompressionBombError as exc:
            raise DataError(f"image too large ({exc})", path=where, record_id=item_id) from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            raise DataError(f"corrupt or unsupported image ({type(exc).__name__}: {exc})", path=where,
                            record_id=item_id) from None
