"""A few small images shipped with the package (OpenMoji, CC BY-SA 4.0; see README.md here), so that
examples such as the README quick start run right after install, before any asset is fetched."""

from __future__ import annotations

from pathlib import Path

SAMPLES_DIR = Path(__file__).parent


def sample(name: str) -> Path:
    """The path of a shipped sample image by name (``"red_heart"``, ``"cat"``, ...)."""
    path = SAMPLES_DIR / f"{name}.png"
    if not path.is_file():
        known = sorted(p.stem for p in SAMPLES_DIR.glob("*.png"))
        raise FileNotFoundError(f"no sample image {name!r}; shipped: {', '.join(known)}")
    return path
