"""The pretraining-corpus builder on tiny synthetic sources written here: an iconify icon set, an emoji set,
Tux Paint stamps, and a MiniBEIR-like folder whose val/test bases must stay out of the corpus.

The ``assets`` test at the end builds from the real fetched packages with a small ``max_pairs``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from jfe.cli import app
from jfe.data import assets
from jfe.data.mbeir import iter_candidates, iter_queries, write_candidates, write_queries
from jfe.data.pretrain import LeakageReference, build_pretrain
from jfe.data.pretrain.build import render_svg_text
from jfe.data.pretrain.leakage import normalise
from jfe.data.pretrain.sources import caption_name, emoji_reason
from jfe.data.records import Candidate, Query
from jfe.data.validate import iter_problems
from jfe.errors import ConfigError, DataError
from jfe.train.data import TrainingData

SQUARE = '<rect x="2" y="2" width="12" height="12" fill="currentColor"/>'
# the held-out MiniBEIR image is this drawing: an icon that renders to it must be dropped as a leak
TEST_DRAWING = '<path fill="currentColor" d="M8 1L15 15H1z"/><circle cx="8" cy="11" r="2" fill="#fff"/>'


def _icon(i: int) -> str:
    """A distinct drawing per index (a bar of its own width and height, and a dot)."""
    w, h = 2 + i % 8, 2 + i // 8
    return f'<rect x="1" y="1" width="{w}" height="{h}" fill="currentColor"/><circle cx="13" cy="13" r="2"/>'


def write_icon_set(root: Path, prefix: str, icons: dict[str, str], *, title: str = "Test Icons",
                   categories: dict[str, list[str]] | None = None, category: str = "Thematic",
                   aliases: dict[str, str] | None = None) -> Path:
    package = root / prefix / "package"
    package.mkdir(parents=True)
    (package / "info.json").write_text(json.dumps({
        "prefix": prefix, "name": title, "total": len(icons), "category": category,
        "license": {"title": "MIT", "spdx": "MIT"}}))
    (package / "package.json").write_text(json.dumps({"name": f"@iconify-json/{prefix}", "version": "1.0.0"}))
    (package / "icons.json").write_text(json.dumps({
        "prefix": prefix, "width": 16, "height": 16,
        "icons": {name: {"body": body} for name, body in icons.items()},
        "aliases": {a: {"parent": p} for a, p in (aliases or {}).items()}}))
    if categories:
        (package / "metadata.json").write_text(json.dumps({"categories": categories}))
    return package


def write_minibeir(root: Path) -> Path:
    """A MiniBEIR-shaped folder: base "emoji:cat" (test, name "cat face", German "Katzengesicht") and its
    image, base "emoji:tri" (val, name "warning sign") drawn as TEST_DRAWING, and a train base "emoji:dog"."""
    (root / "images").mkdir(parents=True)
    svg = f'<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 16 16">' \
          f'{TEST_DRAWING.replace("currentColor", "#000000")}</svg>'
    render_svg_text(svg, 128, "test").save(root / "images" / "tri.png")
    cat = Image.new("RGB", (128, 128), "white")
    for x in range(0, 128, 8):  # vertical stripes: far from every test icon's hash
        ImageDraw.Draw(cat).rectangle((x, 0, x + 3, 127), fill="orange")
    cat.save(root / "images" / "cat.png")
    ImageDraw.Draw(img := Image.new("RGB", (128, 128), "white")).ellipse((20, 20, 100, 100), fill="brown")
    img.save(root / "images" / "dog.png")

    def src(base: str, **extra) -> str:
        return json.dumps({"base": base, **extra})

    write_candidates(root / "cand_pool" / "local" / "mbeir_emoji_task0_cand_pool.jsonl", [
        Candidate("1:1", None, "images/cat.png", "image", src("emoji:cat")),
        Candidate("1:2", None, "images/tri.png", "image", src("emoji:tri")),
        Candidate("1:3", None, "images/dog.png", "image", src("emoji:dog"))])
    write_candidates(root / "cand_pool" / "local" / "mbeir_emoji_task1_cand_pool.jsonl", [
        Candidate("1:4", "cat face", None, "text", src("emoji:cat")),
        Candidate("1:5", "dog", None, "text", src("emoji:dog"))])
    write_queries(root / "query" / "test" / "mbeir_emoji_task0_test.jsonl", [
        Query("1:1000001", "cat face", None, "text", src("emoji:cat", name="cat face"), ["1:1"], [], 0)])
    write_queries(root / "query" / "test" / "mbeir_emoji_task1_test.jsonl", [
        Query("1:1000002", "Katzengesicht", None, "text", src("emoji:cat"), ["1:4"], [], 1)])
    write_queries(root / "query" / "val" / "mbeir_emoji_task0_val.jsonl", [
        Query("1:1000003", "warning sign", None, "text", src("emoji:tri", name="warning sign"), ["1:2"], [], 0)])
    write_queries(root / "query" / "train" / "mbeir_emoji_task0_train.jsonl", [
        Query("1:1000004", "dog", None, "text", src("emoji:dog", name="dog"), ["1:3"], [], 0)])
    (root / ".minibeir.json").write_text(json.dumps({"config": {"seed": 0, "split_fractions": [0.7, 0.1, 0.2]}}))
    return root


def write_stamps(root: Path) -> Path:
    stamps = root / "usr" / "share" / "tuxpaint" / "stamps"
    (stamps / "animals").mkdir(parents=True)
    ImageDraw.Draw(img := Image.new("RGBA", (60, 40), (0, 0, 0, 0))).rectangle((5, 5, 50, 30), fill="orange")
    img.save(stamps / "animals" / "goldfish.png")
    (stamps / "animals" / "goldfish.txt").write_text(
        "A goldfish swims in a bowl.\nde.utf8=Ein Goldfisch schwimmt.\nja.utf8=金魚\nfr.utf8=Un poisson rouge.\n")
    (stamps / "animals" / "cow.svg").write_text(
        '<svg xmlns="http://www.w3.org/2000/svg" width="20" height="20"><circle cx="10" cy="10" r="8" '
        'fill="#884400"/></svg>')
    (stamps / "animals" / "cow.txt").write_text("A brown cow.\n")
    img.save(stamps / "animals" / "goldfish_mirror.png")  # no caption: skipped and counted
    # an SVG without a usable size (as a few real stamps have): its PNG stands in
    (stamps / "animals" / "fox.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="0" height="0"/>')
    ImageDraw.Draw(fox := Image.new("RGB", (40, 40), "white")).polygon([(2, 38), (20, 2), (38, 38)], fill="red")
    fox.save(stamps / "animals" / "fox.png")
    (stamps / "animals" / "fox.txt").write_text("A red fox.\n")
    return stamps


@pytest.fixture
def sources(tmp_path: Path) -> dict:
    icons = {f"thing-{i}": _icon(i) for i in range(40)}
    icons |= {"crossed-swords": SQUARE.replace('x="2"', 'x="3"'), "cat-face-outline": _icon(50),
              "alert-triangle": TEST_DRAWING, "dog-bold": _icon(51)}
    game = write_icon_set(tmp_path / "npm", "game-icons", icons, title="Game Icons",
                          categories={"Weapons": ["crossed-swords"]}, aliases={"swords-crossed": "crossed-swords"})
    emoji = write_icon_set(tmp_path / "npm", "fluent-emoji-flat", {"grinning": SQUARE}, title="Fluent Emoji Flat")
    return {"icon_sets": [game, emoji], "tuxpaint": write_stamps(tmp_path / "deb"),
            "minibeir": write_minibeir(tmp_path / "minibeir")}


def _build(tmp_path: Path, sources: dict, name: str = "corpus", **kwargs):
    out = tmp_path / name
    summary = build_pretrain(out, minibeir=sources["minibeir"], icon_sets=sources["icon_sets"],
                             tuxpaint=sources["tuxpaint"], clipart=False, progress=False, workers=2,
                             log=lambda msg: None, **kwargs)
    return out, summary


def test_caption_names_drop_style_suffixes() -> None:
    assert caption_name("arrow-left-bold") == "arrow left"
    assert caption_name("access-time-24-regular") == "access time"
    assert caption_name("rank-3") == "rank 3"
    assert caption_name("bold") == "bold"  # never empty
    assert normalise("Cat Face!") == normalise("cat-face outline") == "cat face"


def test_emoji_sets_are_recognised_by_name_and_category() -> None:
    for prefix in ("noto", "twemoji", "openmoji", "emojione-v1", "fxemoji", "fluent-emoji", "streamline-emojis"):
        assert emoji_reason(prefix, {}), prefix
    assert emoji_reason("newset", {"name": "Some Emoji Pack"})
    assert emoji_reason("newset", {"category": "Emoji"})
    assert not emoji_reason("game-icons", {"name": "Game Icons", "category": "Thematic"})


def test_builder_writes_a_valid_corpus_that_stage1_reads(tmp_path: Path, sources: dict) -> None:
    out, summary = _build(tmp_path, sources)
    assert not list(iter_problems(out)), list(iter_problems(out))[:3]
    # 40 things, crossed swords and dog (a MiniBEIR *train* base) kept; cat face and the triangle dropped
    assert summary.images == {"game-icons": 42, "tuxpaint": 3}
    crossed = [c for c in iter_candidates(out / "cand_pool/local/mbeir_pretrain_task3_cand_pool.jsonl")
               if "crossed-swords" in c.src["base"]]
    assert [c.txt for c in crossed] == ["crossed swords", "a game icon of crossed swords, from the weapons icons "
                                        "of Game Icons", "swords crossed"]
    assert summary.pairs["game-icons"] == 41 * 2 + 3 and summary.pairs["tuxpaint"] == 3
    # the goldfish's German and French translations (not Japanese) are text pairs
    assert summary.text_pairs["tuxpaint"] == 2
    texts = {q.query_txt for p in (out / "query").rglob("*task1*.jsonl") for q in iter_queries(p)}
    assert {"Ein Goldfisch schwimmt.", "Un poisson rouge."} <= texts and "金魚" not in texts
    # grey icons are stored as one-channel PNGs, colour stamps as RGB
    assert Image.open(out / "images/game-icons/thing-1.png").mode == "L"
    assert Image.open(out / "images/tuxpaint/animals/goldfish.png").mode == "RGB"
    assert Image.open(out / "images/tuxpaint/animals/fox.png").mode == "RGB"  # from fox.png, not the bad SVG
    readme = (out / "README.md").read_text()
    assert "| game-icons | Game Icons | 1.0.0 | MIT |" in readme and "GPL-2.0-or-later" in readme
    assert "excluded: emoji set" in readme
    data = TrainingData.load(out, tasks={0, 1, 3})
    assert len(data.queries) == sum(n for (_, split), n in summary.queries.items() if split == "train")
    assert summary.queries[(0, "val")] >= 1


def test_build_is_deterministic_and_max_pairs_caps_whole_images(tmp_path: Path, sources: dict) -> None:
    a, _ = _build(tmp_path, sources, "a")
    b, _ = _build(tmp_path, sources, "b")
    for path in sorted(a.rglob("*")):
        if path.is_file():
            assert path.read_bytes() == (b / path.relative_to(a)).read_bytes(), path
    _, small = _build(tmp_path, sources, "small", max_pairs=10)
    assert 8 <= small.total_pairs <= 10 and small.total_images < 10


def test_leakage_drops_heldout_names_and_images_and_counts_them(tmp_path: Path, sources: dict) -> None:
    reference = LeakageReference.from_minibeir(sources["minibeir"])
    assert {"cat face", "katzengesicht", "warning sign"} <= reference.texts
    assert "dog" not in reference.texts  # a training base is not held out
    assert reference.text_match(["a cat face sticker"]) == "cat face"
    assert reference.text_match(["cat"]) == ""
    out, summary = _build(tmp_path, sources)
    assert summary.dropped["game-icons"] == {"leak: image": 1, "leak: name": 1}
    bases = {c.src["base"] for c in iter_candidates(out / "cand_pool/local/mbeir_pretrain_task0_cand_pool.jsonl")}
    assert "game-icons/cat-face-outline" not in bases and "game-icons/alert-triangle" not in bases
    assert "game-icons/dog-bold" in bases  # "dog" is a MiniBEIR *train* base
    assert not any(b.startswith("fluent-emoji") for b in bases)
    assert not (out / "images" / "fluent-emoji-flat").exists()


def test_corrupt_icons_json_is_an_error_naming_the_file(tmp_path: Path, sources: dict) -> None:
    (sources["icon_sets"][0] / "icons.json").write_text('{"prefix": "game-icons", "icons": {')
    with pytest.raises(DataError, match=r"game-icons/package/icons\.json.*not valid JSON"):
        _build(tmp_path, sources)
    assert not (tmp_path / "corpus").exists()  # nothing half-written


def test_unrenderable_svg_and_uncaptioned_stamp_are_skipped_counted_and_named(tmp_path: Path,
                                                                              sources: dict) -> None:
    bad = write_icon_set(tmp_path / "npm2", "broken", {"good": _icon(3), "bad": '<path d="M0 0'})
    sources["icon_sets"].append(bad)
    messages: list[str] = []
    out = tmp_path / "corpus"
    summary = build_pretrain(out, minibeir=sources["minibeir"], icon_sets=sources["icon_sets"],
                             tuxpaint=sources["tuxpaint"], clipart=False, progress=False, log=messages.append)
    assert summary.dropped["broken"] == {"unrenderable": 1}
    assert summary.images["broken"] == 1
    assert any("broken/package/icons.json#bad" in m and "cannot render SVG" in m for m in messages)
    tux = next(s for s in summary.sources if s.name == "tuxpaint")
    assert tux.skipped == {"no caption file": 1}
    assert any("goldfish_mirror.png: no caption file" in m for m in messages)
    marker = json.loads((out / ".pretrain.json").read_text())
    assert len(marker["warnings"]) == 2


def test_icon_without_body_and_bad_minibeir_are_errors(tmp_path: Path, sources: dict) -> None:
    package = sources["icon_sets"][0]
    data = json.loads((package / "icons.json").read_text())
    data["icons"]["thing-3"] = {"width": 16}
    (package / "icons.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"icons\.json, record 'thing-3': icon without an SVG 'body'"):
        _build(tmp_path, sources)
    with pytest.raises(DataError, match="not a built MiniBEIR"):
        build_pretrain(tmp_path / "x", minibeir=tmp_path, icon_sets=[], tuxpaint=sources["tuxpaint"],
                       clipart=False, progress=False)


def test_refuses_to_replace_a_foreign_folder(tmp_path: Path, sources: dict) -> None:
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a pretraining-corpus build"):
        _build(tmp_path, sources)
    _, first = _build(tmp_path, sources, "again")
    _, second = _build(tmp_path, sources, "again")  # an earlier build is replaced
    assert first.total_pairs == second.total_pairs


def test_cli_build_pretrain(tmp_path: Path, sources: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    import jfe.data.pretrain.build as build

    monkeypatch.setattr(build, "fetched_sources", lambda: (sources["icon_sets"], sources["tuxpaint"]))
    monkeypatch.setattr(build.assets, "is_fetched", lambda name: False)  # no openclipart here
    result = CliRunner().invoke(app, ["data", "build-pretrain", "--out", str(tmp_path / "cli"), "--minibeir",
                                      str(sources["minibeir"]), "--max-pairs", "20", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "image-text pairs" in result.output
    assert CliRunner().invoke(app, ["data", "validate", str(tmp_path / "cli")]).exit_code == 0


_REAL = assets.PRETRAIN_TEST_ASSETS


@pytest.mark.assets
@pytest.mark.skipif(not all(assets.is_fetched(n) for n in _REAL),
                    reason=f"pretrain test assets not fetched (run `jfe assets fetch {' '.join(_REAL)}`)")
def test_real_icon_sets_build_small_valid_corpus(tmp_path: Path, sources: dict) -> None:
    packages = [assets.asset_dir(n) / "package" for n in _REAL]
    out = tmp_path / "real"
    summary = build_pretrain(out, minibeir=sources["minibeir"], icon_sets=packages, tuxpaint=None, clipart=False,
                             max_pairs=200, progress=False, log=lambda m: None)
    assert 180 <= summary.total_pairs <= 200
    assert summary.images.get("game-icons", 0) > 50
    assert not list(iter_problems(out))
    licences = {s.name: s.licence for s in summary.sources}
    assert licences == {"game-icons": "CC-BY-3.0", "maki": "CC0-1.0"}
