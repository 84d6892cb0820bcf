"""Image loading with clear errors: missing, corrupt, oversized (decompression bombs), odd modes."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from jfe.errors import DataError

# path -> (mtime_ns, size, sha1): avoids re-reading a file whose content hash is already known
_path_digests: dict[str, tuple[int, int, str]] = {}

# 40 megapixels: far above any retrieval input, far below what would exhaust memory when decoded.
MAX_PIXELS = 40_000_000


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    """8-bit grey from a 16/32-bit integer or float image, scaled rather than clipped: PIL's own
    ``convert("RGB")`` clips at 255, which turns a 16-bit scan or microscope image almost all white."""
    values = np.asarray(image).astype(np.float64)
    if image.mode == "F":  # float images come as [0, 1] or as 8-bit-range values
        scale = 1.0 if values.size and np.nanmax(values) <= 1.0 else 255.0
    elif image.mode.startswith("I;16"):
        scale = 65535.0
    else:  # "I" is a 32-bit container: 16-bit PNGs open as it, some TIFFs hold 8-bit values in it
        peak = float(values.max()) if values.size else 0.0
        scale = 255.0 if peak <= 255 else 65535.0 if peak <= 65535 else peak
    grey = np.clip(np.nan_to_num(values / scale * 255.0), 0, 255).round().astype(np.uint8)
    return Image.fromarray(grey, mode="L")


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """RGB with transparent areas composited onto a white background (emoji have alpha); 16-bit and
    float images are scaled to 8 bits."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _high_depth_to_l(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, background)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def upright(image: Image.Image) -> Image.Image:
    """The image as it is meant to be seen: phone photos are often stored sideways with an EXIF
    orientation tag, which viewers (and other retrieval stacks) apply."""
    try:
        if image.getexif().get(0x0112, 1) in (0, 1):  # no turn needed: skip exif_transpose's copy
            return image
        return ImageOps.exif_transpose(image)
    except Exception:  # a malformed EXIF block must not make a readable image unreadable
        return image


def bomb_message(exc: Exception, max_pixels: int) -> str:
    """PIL refuses images over twice its own bomb threshold before JFE can look: say JFE's limit, not PIL's."""
    import re

    found = re.search(r"\((\d+) pixels\)", str(exc))
    size = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
    return f"image has {size}, over the limit of {max_pixels:,} pixels"


def load_image(source: str | os.PathLike | bytes | Image.Image, *, item_id: str | None = None,
               max_pixels: int = MAX_PIXELS, min_side: int | None = None) -> Image.Image:
    """Open an image from a path, raw bytes or a PIL image and return it upright (EXIF orientation) as RGB.

    ``min_side``: the smallest size the caller needs on each side. A JPEG far larger than that is decoded
    at a reduced scale (1/2, 1/4 or 1/8, never below ``min_side``): a 12-megapixel photo then decodes
    several times faster and takes a fraction of the memory, while anything smaller is decoded exactly.

    Raises :class:`DataError` naming the item and the file when the image is missing, unreadable,
    or larger than ``max_pixels``.
    """
    if isinstance(source, Image.Image):
        if source.width * source.height > max_pixels:
            raise DataError(f"image has {source.width}x{source.height} pixels, over the limit of "
                            f"{max_pixels}", record_id=item_id)
        return to_rgb(upright(source))
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
                if min_side is not None and probe.format in ("JPEG", "MPO"):  # MPO: phone photos
                    probe.draft("RGB", (min_side, min_side))  # the decoder's own downscaling, >= min_side
                probe.load()
                return to_rgb(upright(probe))
        except DataError:
            raise
        except Image.DecompressionBombError as exc:
            raise DataError(bomb_message(exc, max_pixels), path=where, record_id=item_id) from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            raise DataError(f"corrupt or unsupported image ({type(exc).__name__}: {exc})", path=where,
                            record_id=item_id) from None


def content_digest(image: str | os.PathLike | bytes | Image.Image, item_id: str | None = None) -> str:
    """sha1 of an image's content: the file's bytes, the raw bytes, or a PIL image's mode, size and pixels.

    What every cache keyed by an image uses (the feature cache, the evaluator's embedding cache), so swapping
    two files never serves the other's vector. A file is re-read only when its mtime or size changed.
    """
    if isinstance(image, Image.Image):
        digest = hashlib.sha1(f"pil:{image.mode}:{image.size}:".encode())
        digest.update(image.tobytes())
        return digest.hexdigest()
    if isinstance(image, bytes):
        return hashlib.sha1(image).hexdigest()
    path = os.fspath(image)
    try:
        stat = os.stat(path)
        known = _path_digests.get(path)
        if known is not None and known[:2] == (stat.st_mtime_ns, stat.st_size):
            return known[2]
        with open(path, "rb") as handle:
            sha = hashlib.sha1(handle.read()).hexdigest()
    except FileNotFoundError:
        raise DataError("image file not found", path=path, record_id=item_id) from None
    except OSError as exc:
        raise DataError(f"cannot open image ({exc.strerror})", path=path, record_id=item_id) from None
    _path_digests[path] = (stat.st_mtime_ns, stat.st_size, sha)
    return sha


def forget_digests() -> None:
    """Drop the remembered file digests (tests that rewrite files within one mtime tick)."""
    _path_digests.clear()
