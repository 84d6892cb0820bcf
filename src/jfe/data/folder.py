"""A candidate pool from a plain folder of images: the shortest way from a photo collection to an index.

``pool_from_folder(folder, out)`` walks ``folder`` (recursively, in sorted order, hidden files and folders
skipped), checks each image's header, and writes an M-BEIR candidate pool: one record per readable image,
``did`` ``"{dataset_id}:{n}"``, ``img_path`` relative to ``folder`` (so ``folder`` is the data root). A caption
in a sidecar text file with the same stem (``beach.jpg`` + ``beach.txt``) makes the record ``image,text``.
Unreadable files are skipped and reported, never written; the pool is written atomically.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from jfe.data.images import MAX_PIXELS, bomb_message
from jfe.data.mbeir import iter_candidates, write_candidates
from jfe.data.records import Candidate
from jfe.errors import ConfigError, DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


@dataclass
class FolderPool:
    """What :func:`pool_from_folder` wrote."""

    path: Path
    candidates: int
    with_captions: int
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, why)


def _image_files(folder: Path) -> list[Path]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(root) / f for f in sorted(files)
                  if not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES)]
    return found


def _unreadable(path: Path) -> str | None:
    """Why the image cannot be used, from its header (nothing decoded), or None: the loader's own limits, so
    nothing in the pool is refused later by ``load_image`` for its size. A file corrupt past its header is only
    found when it is decoded (``jfe index build`` then names it)."""
    try:
        with Image.open(path) as probe:
            if probe.width < 1 or probe.height < 1:
                return "empty image"
            if probe.width * probe.height > MAX_PIXELS:
                return f"{probe.width}x{probe.height} pixels, over the loader's limit of {MAX_PIXELS}"
    except Image.DecompressionBombError as exc:
        return bomb_message(exc, MAX_PIXELS)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _caption(image: Path) -> str | None:
    sidecar = image.with_suffix(".txt")
    if not sidecar.is_file():
        return None
    try:
        text = sidecar.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"caption file is unreadable ({type(exc).__name__}: {exc})", path=str(sidecar)) from None
    return " ".join(text.split()) or None


def _check_out_file(out: Path, overwrite: bool) -> None:
    """``out`` must be a file path; an existing file is replaced only when it is a candidate pool (or when
    ``overwrite``), so a mistyped ``--out`` never clobbers a file JFE did not write."""
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give the path of the pool file to write, "
                          f"e.g. {out / 'pool.jsonl'}")
    if not out.exists() or overwrite or out.stat().st_size == 0:
        return
    try:
        first = next(iter_candidates(out), None)
    except DataError:
        first = None
    if first is None:
        raise ConfigError(f"--out {out} exists and is not a candidate pool; choose another path or pass --overwrite")


def pool_from_folder(folder: str | os.PathLike, out: str | os.PathLike, dataset_id: int = 1,
                     captions: bool = True, progress: bool = False, overwrite: bool = False) -> FolderPool:
    """Write a candidate pool of every readable image under ``folder`` to ``out`` (see the module docstring)."""
    from tqdm.auto import tqdm

    folder, out = Path(folder), Path(out)
    if not folder.is_dir():
        raise DataError("not a folder", path=str(folder))
    _check_out_file(out, overwrite)
    if dataset_id < 0:
        raise DataError(f"dataset_id must be >= 0, got {dataset_id}")
    candidates: list[Candidate] = []
    skipped: list[tuple[str, str]] = []
    for image in tqdm(_image_files(folder), desc="images", unit="img", disable=not progress):
        relative = image.relative_to(folder).as_posix()
        reason = _unreadable(image)
        if reason is not None:
            skipped.append((relative, reason))
            continue
        text = _caption(image) if captions else None
        candidates.append(Candidate(did=f"{dataset_id}:{len(candidates) + 1}", txt=text, img_path=relative,
                                    modality="image,text" if text else "image"))
    if not candidates:
        detail = f" ({len(skipped)} unreadable)" if skipped else ""
        raise DataError(f"no readable image ({', '.join(IMAGE_SUFFIXES)}) under the folder{detail}",
                        path=str(folder))
    write_candidates(out, candidates)
    return FolderPool(path=out, candidates=len(candidates), with_captions=sum(c.txt is not None for c in candidates),
                      skipped=skipped)
