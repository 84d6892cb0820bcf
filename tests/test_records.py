"""Records, readers/writers, instructions, images and items: the data layer below the validator."""

from __future__ import annotations

import json
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from jfe.data.images import load_image, to_rgb
from jfe.data.instructions import (
    format_text,
    instruction_key,
    instruction_set_for,
    pick_instruction,
    with_instruction,
)
from jfe.data.items import Item, as_item, candidate_item, query_item, read_items
from jfe.data.mbeir import (
    iter_candidates,
    iter_qrels,
    iter_queries,
    read_candidates,
    read_instructions,
    read_qrels,
    read_queries,
    write_candidates,
    write_instructions,
    write_qrels,
    write_queries,
)
from jfe.data.records import (
    CATEGORIES,
    TASK_CATEGORY,
    TASKS,
    Candidate,
    InstructionSet,
    Qrel,
    Query,
    dataset_id_of,
    modality_of,
    record_problems,
)
from jfe.errors import DataError

# ------------------------------------------------------------------------------------------ round trips


def test_query_round_trip_keeps_every_field_in_uniir_order(tmp_path: Path) -> None:
    queries = [
        Query("9:1", "a dog", None, "text", None, ["9:2", "9:3"], ["9:4"], 0),
        Query("9:2", None, "images/a.png", "image", '{"modification": "flip"}', ["9:5"], [], 3),
        Query("9:3", "make it red", "images/b.png", "image,text", None, ["9:6"], [], 7),
    ]
    path = tmp_path / "q.jsonl"
    assert write_queries(path, queries) == 3
    assert read_queries(path) == queries
    first = json.loads(path.read_text().splitlines()[0])
    assert list(first) == ["qid", "query_txt", "query_img_path", "query_modality", "query_src_content",
                           "pos_cand_list", "neg_cand_list", "task_id"]
    assert queries[1].src == {"modification": "flip"}


def test_candidate_round_trip(tmp_path: Path) -> None:
    cands = [Candidate("9:1", None, "images/a.png", "image"), Candidate("9:2", "a cat", None, "text", "x"),
             Candidate("9:3", "a cat", "images/c.png", "image,text", '{"base": 3}')]
    path = tmp_path / "pool.jsonl"
    write_candidates(path, cands)
    assert list(iter_candidates(path)) == cands
    assert list(json.loads(path.read_text().splitlines()[0])) == ["did", "txt", "img_path", "modality",
                                                                  "src_content"]
    assert cands[2].src == {"base": 3} and cands[1].src == {"raw": "x"}


def test_qrels_round_trip(tmp_path: Path) -> None:
    qrels = [Qrel("9:1", "9:2", 1, 0), Qrel("9:1", "9:3", 1, 0), Qrel("9:2", "9:4", 0, 3), Qrel("9:3", "9:5")]
    path = tmp_path / "x_qrels.txt"
    write_qrels(path, qrels)
    assert list(iter_qrels(path)) == qrels
    assert path.read_text().splitlines()[0] == "9:1 0 9:2 1 0"
    # read_qrels keeps relevant pairs only
    assert read_qrels(path) == {"9:1": {"9:2", "9:3"}, "9:3": {"9:5"}}


def test_instructions_round_trip(tmp_path: Path) -> None:
    sets = [InstructionSet("9", "text", "image", ["Find the image.", '"Quoted" words, commas']),
            InstructionSet("10", "image,text", "image", ["Edit it", "Apply the change", "Third"], "cirr")]
    path = tmp_path / "query_instructions.tsv"
    write_instructions(path, sets)
    assert read_instructions(path) == {s.key: s for s in sets}


def test_instructions_writer_never_splits_a_row(tmp_path: Path) -> None:
    path = tmp_path / "query_instructions.tsv"
    write_instructions(path, [InstructionSet("1", "text", "text", ["two\nlines\tand a tab"])])
    assert read_instructions(path)[("1", "text", "text")].prompts == ["two lines and a tab"]


def test_reads_uniir_style_header(tmp_path: Path) -> None:
    path = tmp_path / "query_instructions.tsv"
    path.write_text("dataset_id\tDataset\tquery_modality\tcandidate_modality\tprompt_1\tprompt_2\n"
                    "0\tVisualNews\ttext\timage\tIdentify the news photo.\t\n")
    sets = read_instructions(path)
    assert sets[("0", "text", "image")].prompts == ["Identify the news photo."]
    assert sets[("0", "text", "image")].dataset_name == "VisualNews"


ids = st.from_regex(r"[0-9]{1,3}:[0-9]{1,6}", fullmatch=True)
texts = st.one_of(st.none(), st.text(max_size=40))


@settings(max_examples=60, deadline=None)
@given(qid=ids, txt=texts, img=st.one_of(st.none(), st.text(min_size=1, max_size=20)), src=texts,
       modality=st.sampled_from(["text", "image", "image,text"]), pos=st.lists(ids, max_size=3),
       neg=st.lists(ids, max_size=3), task=st.one_of(st.none(), st.sampled_from(sorted(TASKS))))
def test_query_round_trip_property(qid: str, txt: str | None, img: str | None, src: str | None, modality: str,
                                   pos: list[str], neg: list[str], task: int | None) -> None:
    query = Query(qid, txt, img, modality, src, pos, neg, task)
    other = Query(qid + "0", txt, img, modality, src, pos, neg, task)  # qids are unique within a file
    problems = record_problems(txt, img, modality, is_query=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "q.jsonl"
        write_queries(path, [query, other])
        if not problems:
            assert read_queries(path) == [query, other]
            return
        # the strict reader refuses, at the first line, what validate reports as the first problem
        with pytest.raises(DataError) as info:
            read_queries(path)
        assert info.value.line == 1 and info.value.record_id == qid
        assert problems[0][1] in info.value.message


@settings(max_examples=60, deadline=None)
@given(did=ids, txt=texts, img=st.one_of(st.none(), st.text(min_size=1, max_size=20)), src=texts,
       modality=st.sampled_from(["text", "image", "image,text"]))
def test_candidate_round_trip_property(did: str, txt: str | None, img: str | None, src: str | None,
                                       modality: str) -> None:
    cand = Candidate(did, txt, img, modality, src)
    problems = record_problems(txt, img, modality, is_query=False)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pool.jsonl"
        write_candidates(path, [cand])
        if not problems:
            assert read_candidates(path) == [cand]
            return
        with pytest.raises(DataError) as info:
            read_candidates(path)
        assert info.value.line == 1 and info.value.record_id == did
        assert problems[0][1] in info.value.message


def test_writers_are_atomic(tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl"
    write_queries(path, [Query("1:1", "a", None, "text")])
    before = path.read_text()

    def broken():
        yield Query("1:2", "b", None, "text")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        write_queries(path, broken())
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["q.jsonl"]


def test_task_table() -> None:
    assert set(TASK_CATEGORY) == set(TASKS)
    assert sorted(t for ts in CATEGORIES.values() for t in ts) == sorted(TASKS)
    assert modality_of("  ", None) is None and modality_of("a", "x.png") == "image,text"
    assert modality_of(None, "x.png") == "image" and modality_of("a", None) == "text"
    assert dataset_id_of("12:345") == "12"
    with pytest.raises(ValueError, match="dataset_id:n"):
        dataset_id_of("12345")


# ----------------------------------------------------------------------------------- reader errors


def _lines(path: Path, *lines: str) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD_Q = json.dumps(Query("1:1", "a", None, "text", None, ["1:2"], [], 1).to_json())


@pytest.mark.parametrize(("bad", "match"), [
    ("{broken", "malformed JSON"),
    ("[1, 2]", "JSON object"),
    (json.dumps({"query_txt": "a"}), "'qid'"),
    (GOOD_Q.replace('"text"', '"video"'), "unknown query_modality 'video'"),
    (GOOD_Q.replace('["1:2"]', '"1:2"'), "must be lists"),
    (GOOD_Q.replace('"task_id": 1', '"task_id": "one"'), "not an integer"),
    (GOOD_Q.replace('"a"', "3"), "must be a string"),
])
def test_query_reader_errors_name_file_and_line(tmp_path: Path, bad: str, match: str) -> None:
    path = _lines(tmp_path / "q.jsonl", GOOD_Q, "", bad)
    with pytest.raises(DataError, match=match) as info:
        list(iter_queries(path))
    assert info.value.path == str(path) and info.value.line == 3
    assert f"{path}:3" in str(info.value)


def test_reader_reports_bad_utf8_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl"
    path.write_bytes((GOOD_Q + "\n" + GOOD_Q.replace('"1:1"', '"1:3"') + "\n").encode() + b'{"qid": "\xff"}\n')
    with pytest.raises(DataError, match="UTF-8") as info:
        read_queries(path)
    assert info.value.line == 3


def test_field_type_error_names_record(tmp_path: Path) -> None:
    path = _lines(tmp_path / "q.jsonl", GOOD_Q.replace('"a"', "3"))
    with pytest.raises(DataError, match="query_txt") as info:
        read_queries(path)
    assert info.value.record_id == "1:1"


def test_candidate_reader_error_names_record(tmp_path: Path) -> None:
    path = _lines(tmp_path / "pool.jsonl", json.dumps({"did": "1:7", "txt": "x", "img_path": None,
                                                       "modality": "texts"}))
    with pytest.raises(DataError, match="record '1:7'") as info:
        read_candidates(path)
    assert info.value.line == 1 and info.value.record_id == "1:7"


def test_missing_files_name_the_path(tmp_path: Path) -> None:
    for reader in (read_queries, read_candidates, read_qrels, read_instructions):
        with pytest.raises(DataError, match="not found") as info:
            reader(tmp_path / "nope.txt")
        assert info.value.path == str(tmp_path / "nope.txt")


@pytest.mark.parametrize("bad", ["1:1 0 1:2", "1:1 0 1:2 yes 0", "1:1 0 1:2 1 0 extra"])
def test_qrels_errors(tmp_path: Path, bad: str) -> None:
    path = _lines(tmp_path / "x_qrels.txt", "1:1 0 1:3 1 0", bad)
    with pytest.raises(DataError) as info:
        read_qrels(path)
    assert info.value.line == 2


def test_instruction_errors(tmp_path: Path) -> None:
    no_col = _lines(tmp_path / "a.tsv", "dataset_id\tquery_modality\tprompt_1", "1\ttext\thello")
    with pytest.raises(DataError, match="cand_modality"):
        read_instructions(no_col)
    no_prompt = _lines(tmp_path / "b.tsv", "dataset_id\tquery_modality\tcand_modality\tprompt_1",
                       "1\ttext\timage\t")
    with pytest.raises(DataError, match="no prompts") as info:
        read_instructions(no_prompt)
    assert info.value.line == 2


# -------------------------------------------------------------------------------------- instructions


def test_format_text() -> None:
    assert format_text("  find   the\nimage ") == "Find the image."
    assert format_text("is it red?") == "Is it red?"
    assert format_text("Done!") == "Done!"
    assert format_text("   ") == ""
    assert with_instruction("retrieve an image", "a red car") == "Retrieve an image. A red car."
    assert with_instruction("retrieve an image", None) == "Retrieve an image."
    assert with_instruction(None, "  ") is None


def test_pick_instruction_is_deterministic_and_uses_every_variant() -> None:
    instruction_set = InstructionSet("1", "text", "image", ["p1", "p2", "p3"])
    picks = [pick_instruction(f"1:{i}", instruction_set) for i in range(300)]
    assert picks == [pick_instruction(f"1:{i}", instruction_set) for i in range(300)]
    assert set(picks) == {"p1", "p2", "p3"}
    assert pick_instruction("1:5", instruction_set, mode="first") == "p1"
    assert pick_instruction("1:5", None) is None
    assert pick_instruction("1:5", InstructionSet("1", "text", "image", [])) is None



def test_instruction_key_takes_the_task_then_the_first_positive_in_the_pool() -> None:
    image, text = Candidate("1:1", None, "a.png", "image"), Candidate("1:5", "A red square", None, "text")
    pool = {c.did: c for c in (image, text)}
    query = Query("1:101", "a red square", None, "text", None, ["1:5", "1:1"], [], 0)
    # an M-BEIR task decides, whatever the pool holds and whatever modality its first positive has
    assert instruction_key(query) == ("1", "text", "image")
    assert instruction_key(query, pool) == ("1", "text", "image")
    assert instruction_key(query, {}, positives=["1:5"]) == ("1", "text", "image")
    # no M-BEIR task: the first positive (pos_cand_list order) that the candidate pool holds
    for task in (None, 42):
        query.task_id = task
        assert instruction_key(query, pool) == ("1", "text", "text")
        assert instruction_key(query, {"1:1": image}) == ("1", "text", "image")  # 1:5 is not in this pool
        assert instruction_key(query, pool, positives=["1:1", "1:5"]) == ("1", "text", "image")
        assert instruction_key(query) == ("1", "text", None)  # no pool, no candidate modality
        assert instruction_key(query, {"9:9": image}) == ("1", "text", None)
    # the dataset id is the qid's part before ':'
    assert instruction_key(Query("91:7", None, "x.png", "image", task_id=3)) == ("91", "image", "text")
    assert instruction_key(Query("abc", "x", None, "text", task_id=1)) == ("abc", "text", "text")
    sets = {("1", "text", "image"): InstructionSet("1", "text", "image", ["p1"])}
    assert instruction_set_for(sets, ("1", "text", "image")) is sets[("1", "text", "image")]
    assert instruction_set_for(sets, ("1", "text", "text")) is None
    assert instruction_set_for(sets, ("1", "text", None)) is None


# --------------------------------------------------------------------------------------------- images


def _png(path: Path, mode: str = "RGB", colour: tuple = (10, 200, 30), size: tuple[int, int] = (8, 6)) -> Path:
    Image.new(mode, size, colour).save(path)
    return path


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` but holds no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_load_image_from_path_bytes_and_pil(tmp_path: Path) -> None:
    path = _png(tmp_path / "a.png")
    for source in (path, str(path), path.read_bytes(), Image.open(path)):
        image = load_image(source)
        assert image.mode == "RGB" and image.size == (8, 6) and image.getpixel((0, 0)) == (10, 200, 30)


def test_load_image_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found") as info:
        load_image(tmp_path / "gone.png", item_id="1:9")
    assert info.value.record_id == "1:9" and info.value.path == str(tmp_path / "gone.png")


def test_load_image_corrupt(tmp_path: Path) -> None:
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not an image at all")
    with pytest.raises(DataError, match="corrupt") as info:
        load_image(junk, item_id="1:3")
    assert info.value.path == str(junk) and "1:3" in str(info.value)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(_png(tmp_path / "full.png", size=(64, 64)).read_bytes()[:60])
    with pytest.raises(DataError, match="corrupt"):
        load_image(truncated)
    with pytest.raises(DataError, match="corrupt"):
        load_image(b"\x00\x01\x02")


def test_load_image_decompression_bomb(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header_only(100_000, 100_000))  # 10 gigapixels claimed in 45 bytes
    with pytest.raises(DataError, match="too large|over the limit") as info:
        load_image(bomb)
    assert info.value.path == str(bomb)
    with pytest.raises(DataError, match="over the limit"):
        load_image(_png_header_only(7_000, 7_000))  # 49 MP: under PIL's own limit, over ours...
    with pytest.raises(DataError, match="over the limit"):
        load_image(_png(tmp_path / "small.png"), max_pixels=20)  # ...and a real image over a tiny limit
    with pytest.raises(DataError, match="over the limit"):
        load_image(Image.new("RGB", (10, 10)), max_pixels=20)


def test_load_image_rgba_on_white(tmp_path: Path) -> None:
    image = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    image.putpixel((1, 0), (200, 0, 0, 255))
    path = tmp_path / "alpha.png"
    image.save(path)
    rgb = load_image(path)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (255, 255, 255) and rgb.getpixel((1, 0)) == (200, 0, 0)
    palette = Image.new("P", (1, 1), 0)
    palette.info["transparency"] = 0
    assert to_rgb(palette).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(_png(tmp_path / "grey.png", mode="L", colour=128)).getpixel((0, 0)) == (128, 128, 128)


def test_load_image_scales_16_bit_and_float_images_instead_of_clipping(tmp_path: Path) -> None:
    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    path = tmp_path / "scan16.png"
    Image.fromarray(ramp).save(path)  # PIL opens it as I;16: a plain convert("RGB") is 99 % white
    grey = np.asarray(load_image(path))[..., 0].astype(int)
    assert grey.min() == 0 and grey.max() == 255 and 120 < grey.mean() < 136
    assert np.abs(grey.ravel() - np.round(ramp.ravel() / 257)).max() <= 1
    unit = Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32), mode="F")
    assert load_image(unit).getpixel((0, 0)) == (128, 128, 128)
    eight_bit_in_32 = Image.fromarray(np.full((4, 4), 200, dtype=np.int32), mode="I")  # e.g. from a TIFF
    assert load_image(eight_bit_in_32).getpixel((0, 0)) == (200, 200, 200)


def _jpeg_with_orientation(path: Path, size: tuple[int, int], orientation: int) -> Path:
    image = Image.new("RGB", size, (255, 255, 255))
    image.paste((200, 0, 0), (0, 0, size[0] // 4, size[1]))  # a red band on the stored image's left
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, quality=95, exif=exif)
    return path


def test_load_image_applies_the_exif_orientation(tmp_path: Path) -> None:
    # orientation 6: the camera stored the photo turned; viewers rotate it 90 degrees clockwise
    path = _jpeg_with_orientation(tmp_path / "phone.jpg", (40, 20), 6)
    upright = load_image(path)
    assert upright.size == (20, 40)
    assert upright.getpixel((10, 2))[1] < 60 and upright.getpixel((10, 37))[1] > 200  # the band is on top now
    with Image.open(path) as opened:  # the same photo handed over as a PIL image comes out the same
        assert load_image(opened).tobytes() == upright.tobytes()
    assert load_image(path.read_bytes()).tobytes() == upright.tobytes()


def test_load_image_decodes_a_large_jpeg_at_reduced_scale_only_when_asked(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    photo = Image.fromarray((rng.random((60, 80, 3)) * 255).astype(np.uint8)).resize((1600, 1200))
    big = tmp_path / "big.jpg"
    photo.save(big, quality=90)
    assert load_image(big).size == (1600, 1200)
    reduced = load_image(big, min_side=224)
    assert reduced.size == (400, 300)  # 1/4: the smallest decoder scale that keeps both sides >= 224
    assert load_image(big.read_bytes(), min_side=224).size == (400, 300)
    small = tmp_path / "small.jpg"
    photo.resize((300, 240)).save(small, quality=90)  # under 2x min_side: decoded exactly
    assert load_image(small, min_side=224).tobytes() == load_image(small).tobytes()
    mpo = tmp_path / "phone.jpg"
    photo.save(mpo, format="MPO", save_all=True, append_images=[photo.resize((160, 120))])  # as phones write
    with Image.open(mpo) as opened:
        assert opened.format == "MPO"
    assert load_image(mpo, min_side=224).size == (400, 300)
    png = tmp_path / "big.png"
    photo.save(png)  # not a JPEG: no decoder scaling
    assert load_image(png, min_side=224).size == (1600, 1200)


# ---------------------------------------------------------------------------------------------- items


def test_as_item_accepts_the_documented_forms(tmp_path: Path) -> None:
    path = _png(tmp_path / "a.png")
    assert as_item("a red car").modality == "text"
    assert as_item(path).modality == "image"
    assert as_item({"image": str(path), "text": "x"}).modality == "image,text"
    assert as_item((path, "make it blue")) == Item(text="make it blue", image=path)
    item = Item(text="t", id="q")
    assert as_item(item) is item
    assert as_item(path).load_image().size == (8, 6)
    assert as_item("text").load_image() is None


@pytest.mark.parametrize(("obj", "match"), [
    ("", "neither text nor image"),
    ("   ", "neither text nor image"),
    ({}, "neither text nor image"),
    (42, "cannot use a int"),
    (None, "cannot use a NoneType"),
    ({"txt": "typo"}, "unknown item keys"),
    ({"text": 5}, "text must be a string"),
    ({"image": 3.5}, "image must be a path"),
])
def test_as_item_errors_name_the_item(obj: object, match: str) -> None:
    with pytest.raises(DataError, match=match) as info:
        as_item(obj, index=4)
    assert info.value.record_id == "item #4"


def test_query_and_candidate_items(tmp_path: Path) -> None:
    query = Query("1:1", "make it blue", "images/a.png", "image,text", None, ["1:2"], [], 7)
    item = query_item(query, tmp_path, instruction="apply the change")
    assert item.text == "Apply the change. Make it blue." and item.image == tmp_path / "images/a.png"
    assert item.id == "1:1"
    image_only = query_item(Query("1:3", None, "images/a.png", "image"), tmp_path, instruction="find it")
    assert image_only.modality == "image,text" and image_only.text == "Find it."
    cand = candidate_item(Candidate("1:2", "a blue square", None, "text"), tmp_path)
    assert cand == Item(text="a blue square", image=None, id="1:2")
    with pytest.raises(DataError, match="1:9"):
        candidate_item(Candidate("1:9", None, "images/none.png", "image"), tmp_path).load_image()


# ------------------------------------------------------------------------------------------ items files
def test_items_file_reads_text_image_and_pairs_relative_to_the_file(tmp_path: Path) -> None:
    absolute = tmp_path / "elsewhere" / "b.png"
    (tmp_path / "sub").mkdir()
    path = _lines(tmp_path / "sub" / "items.jsonl",
                  json.dumps({"text": "hello"}), "", json.dumps({"image": "a.png", "id": "mine"}),
                  json.dumps({"text": "edit", "image": str(absolute)}))
    assert read_items(path) == [Item(text="hello", id="line 1"), Item(image=tmp_path / "sub" / "a.png", id="mine"),
                                Item(text="edit", image=absolute, id="line 4")]
    assert read_items(_lines(tmp_path / "empty.jsonl", "")) == []


@pytest.mark.parametrize(("bad", "match"), [
    ("{broken", "malformed JSON"),
    ("[1, 2]", "JSON object"),
    (json.dumps({"text": "a", "caption": "b"}), "unknown item keys.*caption"),
    (json.dumps({"id": "x"}), "neither text nor image"),
    (json.dumps({"text": 3}), "text must be a string"),
    (json.dumps({"image": 3}), "'image' must be a path string"),
])
def test_items_file_errors_name_file_and_line(tmp_path: Path, bad: str, match: str) -> None:
    path = _lines(tmp_path / "items.jsonl", json.dumps({"text": "fine"}), "", bad)
    with pytest.raises(DataError, match=match) as info:
        read_items(path)
    assert info.value.path == str(path) and info.value.line == 3
    assert f"{path}:3" in str(info.value)


def test_items_file_that_cannot_be_read_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="file not found") as info:
        read_items(tmp_path / "missing.jsonl")
    assert info.value.path == str(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="cannot read the file") as info:
        read_items(tmp_path)  # a folder
    assert info.value.path == str(tmp_path)
