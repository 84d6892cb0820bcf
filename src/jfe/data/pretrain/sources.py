"""Read the pretraining sources into :class:`Item` records: one image (not yet rendered) with its captions.

- Iconify icon sets (npm ``@iconify-json/<set>``): ``package/icons.json`` maps icon names to SVG bodies;
  ``info.json`` holds the set's title and licence; ``metadata.json`` (when present) its categories.
  Captions come from the icon name ("arrow-left-bold" -> "arrow left"; style and size suffixes such as
  ``-bold``, ``-outline``, ``-24-regular`` are dropped because they describe the drawing style, not its
  content), its aliases, and a sentence naming the set's category.
- Tux Paint stamps (Debian ``tuxpaint-stamps-default``): each PNG or SVG stamp has a ``.txt`` whose first
  line is an English sentence and whose ``<lang>.utf8=`` lines are translations.
- openclipart's MiniBEIR *training* split (titles, keywords, descriptions with the pre-rendered PNGs).

Emoji sets are refused here by name and by the set's own category: they would hand the model MiniBEIR's
own test concepts in nearly the same drawings.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from jfe.errors import DataError

if TYPE_CHECKING:
    from PIL.Image import Image

# Names (and substrings) of iconify sets that are emoji: MiniBEIR is built from emoji, so every one of them
# is left out, whatever else the set claims to be.
EMOJI_SET_PREFIXES = frozenset({
    "noto", "noto-v1", "twemoji", "openmoji", "emojione", "emojione-v1", "emojione-monotone", "fxemoji",
    "fluent-emoji", "fluent-emoji-flat", "fluent-emoji-high-contrast", "streamline-emojis",
})
EMOJI_MARKERS = ("emoji", "moji")

# Trailing name tokens that describe the drawing style or the grid size, not what is drawn.
STYLE_TOKENS = frozenset({
    "outline", "outlined", "outlines", "filled", "fill", "solid", "bold", "line", "linear", "light", "thin",
    "duotone", "twotone", "two", "tone", "sharp", "round", "rounded", "regular", "broken", "alt", "o",
    "sm", "md", "lg", "small", "large", "16", "20", "24", "28", "32", "48", "12", "10",
})
SET_KIND = {"game-icons": "game", "healthicons": "health", "wi": "weather", "maki": "map"}


@dataclass
class Item:
    """One image with its captions; ``render`` makes the RGB image (the builder sizes it)."""

    source: str  # asset / set name, e.g. "game-icons", "tuxpaint", "openclipart"
    key: str  # unique id across the corpus, e.g. "game-icons/crossed-swords"
    captions: list[str]  # the first is the primary caption
    names: list[str]  # the short names checked for leakage (icon name + aliases, stamp caption, title)
    render: Callable[[int], Image] = field(repr=False)  # size -> RGB PIL image
    origin: str = ""  # the file the item comes from (for error messages)
    translations: list[str] = field(default_factory=list)  # other-language captions (text<->text pairs)


@dataclass
class SourceReport:
    """What one source gave: items read, skipped (with why), and its provenance."""

    name: str
    title: str
    version: str
    licence: str
    items: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    excluded: str = ""  # why the whole source was left out ("" = used)

    def skip(self, why: str) -> None:
        self.skipped[why] = self.skipped.get(why, 0) + 1


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError("file not found", path=str(path)) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"not valid JSON ({exc})", path=str(path)) from None
    if not isinstance(data, dict):
        raise DataError(f"expected a JSON object, got {type(data).__name__}", path=str(path))
    return data


def emoji_reason(prefix: str, info: dict) -> str:
    """Why an icon set counts as emoji ("" when it does not)."""
    if prefix in EMOJI_SET_PREFIXES:
        return f"emoji set {prefix!r} (listed)"
    title = str(info.get("name", ""))
    for marker in EMOJI_MARKERS:
        if marker in prefix.lower() or marker in title.lower():
            return f"emoji set {prefix!r} ({title!r} names emoji)"
    if str(info.get("category", "")).lower().startswith("emoji"):
        return f"emoji set {prefix!r} (category {info.get('category')!r})"
    return ""


def caption_name(icon_name: str) -> str:
    """"arrow-left-bold" -> "arrow left"; "access-time-24-regular" -> "access time" (at least one token kept)."""
    tokens = [t for t in re.split(r"[-_\s]+", icon_name.lower()) if t]
    while len(tokens) > 1 and tokens[-1] in STYLE_TOKENS:
        tokens.pop()
    return " ".join(tokens)


def icon_svg(body: str, left: float, top: float, width: float, height: float) -> str:
    """A standalone SVG of an iconify body, drawn black (``currentColor`` is the page's text colour)."""
    body = body.replace("currentColor", "#000000")
    return (f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
            f'width="{width}" height="{height}" viewBox="{left} {top} {width} {height}">{body}</svg>')


def _render_text(render: Callable[[str, int, str], Image], svg: str, origin: str, size: int) -> Image:
    return render(svg, size, origin)


def _render_first(render: Callable[[Path, int], Image], paths: tuple[Path, ...], size: int) -> Image:
    """The first of ``paths`` that renders; the error of the last one when none does."""
    for i, path in enumerate(paths):
        try:
            return render(path, size)
        except DataError:
            if i == len(paths) - 1:
                raise
    raise DataError("no image file", path=str(paths[0]) if paths else None)


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def read_icon_set(package: Path, render_svg_text: Callable[[str, int, str], Image]) \
        -> tuple[list[Item], SourceReport]:
    """The icons of one ``@iconify-json`` package folder (``.../package``); corrupt JSON is a DataError."""
    info = _read_json(package / "info.json")
    icons_path = package / "icons.json"
    data = _read_json(icons_path)
    prefix = str(data.get("prefix") or info.get("prefix") or package.parent.name)
    licence = info.get("license") or {}
    report = SourceReport(prefix, str(info.get("name", prefix)), str(info.get("version", "")),
                          str(licence.get("spdx") or licence.get("title") or "unknown"))
    pkg_json = package / "package.json"
    if pkg_json.exists():
        report.version = str(_read_json(pkg_json).get("version", report.version))
    reason = emoji_reason(prefix, info)
    if reason:
        report.excluded = reason
        return [], report
    icons = data.get("icons")
    if not isinstance(icons, dict):
        raise DataError("no 'icons' object", path=str(icons_path))
    categories: dict[str, str] = {}
    meta_path = package / "metadata.json"
    if meta_path.exists():
        for category, names in (_read_json(meta_path).get("categories") or {}).items():
            for name in names if isinstance(names, list) else []:
                categories.setdefault(str(name), str(category))
    aliases: dict[str, list[str]] = {}
    for alias, spec in (data.get("aliases") or {}).items():
        if isinstance(spec, dict) and isinstance(spec.get("parent"), str) and len(spec) == 1:  # plain renames
            aliases.setdefault(spec["parent"], []).append(alias)
    default_w, default_h = data.get("width", 16), data.get("height", 16)
    kind = SET_KIND.get(prefix, "")
    items: list[Item] = []
    for name in sorted(icons):
        spec = icons[name]
        if not isinstance(spec, dict) or not isinstance(spec.get("body"), str):
            raise DataError("icon without an SVG 'body' string", path=str(icons_path), record_id=name)
        if spec.get("hidden"):
            report.skip("hidden (deprecated) icon")
            continue
        w, h = spec.get("width", default_w), spec.get("height", default_h)
        svg = icon_svg(spec["body"], spec.get("left", 0), spec.get("top", 0), w, h)
        label = caption_name(name)
        names = list(dict.fromkeys([label, *(caption_name(a) for a in aliases.get(name, []))]))
        category = categories.get(name, "")
        what = f"{kind} icon" if kind else "icon"
        sentence = f"{_article(what)} {what} of {label}"
        if category:
            sentence += f", from the {category.lower()} icons of {report.title}"
        else:
            sentence += f" from {report.title}"
        origin = f"{icons_path}#{name}"
        items.append(Item(prefix, f"{prefix}/{name}", [label, sentence, *names[1:]], names,
                          render=partial(_render_text, render_svg_text, svg, origin),
                          origin=origin))
    report.items = len(items)
    return items, report


# MiniBEIR's text->text task translates names from these languages; the others would only add noise for an
# English language model
TRANSLATION_LANGUAGES = ("de", "fr", "es", "it", "nl", "pt")
_TRANSLATION = re.compile(r"^([A-Za-z_@]+)\.utf8=(.*)$")


def read_tuxpaint(stamps: Path, render_file: Callable[[Path, int], Image],
                  warn: Callable[[str], None]) -> tuple[list[Item], SourceReport]:
    """Every stamp image with a caption under ``usr/share/tuxpaint/stamps``; a stamp without one is skipped,
    counted and warned about (the package has a few: they are not worth failing the build for)."""
    report = SourceReport("tuxpaint", "Tux Paint stamps", "", "GPL-2.0-or-later")
    if not stamps.is_dir():
        raise DataError("Tux Paint stamps folder not found", path=str(stamps))
    files: dict[Path, list[Path]] = {}
    for path in sorted(stamps.rglob("*")):
        if path.suffix.lower() in (".png", ".svg") and path.is_file():
            files.setdefault(path.with_suffix(""), []).append(path)
    items: list[Item] = []
    for stem, paths in sorted(files.items()):
        # Tux Paint prefers the SVG when a stamp has both; its PNG is a raster of the same drawing, used
        # when the SVG does not render (a few have no usable size)
        paths.sort(key=lambda p: p.suffix.lower() != ".svg")
        image = paths[0]
        txt = stem.with_suffix(".txt")
        rel = stem.relative_to(stamps).as_posix()
        if not txt.exists():
            report.skip("no caption file")
            warn(f"tuxpaint: {image}: no caption file {txt.name}; stamp skipped")
            continue
        try:
            lines = txt.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            report.skip("unreadable caption file")
            warn(f"tuxpaint: {txt}: unreadable caption ({exc}); stamp skipped")
            continue
        english = next((ln.strip() for ln in lines if ln.strip() and not _TRANSLATION.match(ln.strip())), "")
        if not english:
            report.skip("empty caption")
            warn(f"tuxpaint: {txt}: no English caption line; stamp skipped")
            continue
        translations = [m.group(2).strip() for ln in lines if (m := _TRANSLATION.match(ln.strip()))
                        and m.group(1).split("_")[0].lower() in TRANSLATION_LANGUAGES
                        and m.group(2).strip() and m.group(2).strip() != english]
        label = " ".join(stem.name.replace("_", " ").replace("-", " ").split())
        captions = [english] + ([label] if label and label.lower() not in english.lower() else [])
        items.append(Item("tuxpaint", f"tuxpaint/{rel}", captions, [english, label],
                          render=partial(_render_first, render_file, tuple(paths)), origin=str(image),
                          translations=sorted(dict.fromkeys(translations))))
    report.items = len(items)
    return items, report
