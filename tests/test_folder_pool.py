"""A plain folder of images becomes a candidate pool, then an index that search finds its photos in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from jfe.cli import app
from jfe.data.folder import pool_from_folder
from jfe.data.mbeir import read_candidates
from jfe.errors import DataError

runner = CliRunner()


def _photos(root: Path) -> Path:
    (root / "trip" / "day1").mkdir(parents=True)
    (root / ".thumbnails").mkdir()
    Image.new("RGB", (40, 30), (250, 10, 10)).save(root / "trip" / "day1" / "red.jpg")
    Image.new("RGB", (30, 40), (10, 10, 250)).save(root / "trip" / "blue.PNG")
    (root / "trip" / "blue.txt").write_text("  a blue\\nwall  \n")
    Image.new("RGB", (8, 8)).save(root / ".thumbnails" / "red.jpg")  # hidden: not part of the collection
    (root / "trip" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (root / "notes.md").write_text("not an image")
    return root


def test_pool_from_folder_writes_one_record_per_readable_image(tmp_path: Path) -> None:
    root = _photos(tmp_path / "photos")
    pool = pool_from_folder(root, tmp_path / "pool.jsonl", dataset_id=7)
    assert (pool.candidates, pool.with_captions) == (2, 1)
    assert [s[0] for s in pool.skipped] == ["trip/broken.jpg"] and "Error" in pool.skipped[0][1]
    records = read_candidates(tmp_path / "pool.jsonl")  # the strict M-BEIR reader accepts it
    assert [(r.did, r.img_path, r.modality, r.txt) for r in records] == [
        ("7:1", "trip/blue.PNG", "image,text", "a blue\\nwall"),
        ("7:2", "trip/day1/red.jpg", "image", None),
    ]
    plain = pool_from_folder(root, tmp_path / "plain.jsonl", captions=False)
    assert plain.with_captions == 0 and {r.modality for r in read_candidates(plain.path)} == {"image"}


def test_pool_from_folder_errors_name_the_folder_and_leave_no_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a folder"):
        pool_from_folder(tmp_path / "missing", tmp_path / "pool.jsonl")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "bad.png").write_bytes(b"nope")
    huge = tmp_path / "huge"
    huge.mkdir()
    Image.new("1", (8000, 6000)).save(huge / "scan.png")  # 48 MP: over load_image's limit, so not pooled
    with pytest.raises(DataError, match=r"no readable image .*\(1 unreadable\)"):
        pool_from_folder(huge, tmp_path / "pool.jsonl")
    with pytest.raises(DataError, match=r"no readable image .*\(1 unreadable\)"):
        pool_from_folder(empty, tmp_path / "pool.jsonl")
    assert not (tmp_path / "pool.jsonl").exists()


def test_cli_folder_to_index_to_search(tmp_path: Path) -> None:
    from jfe.models.toy import ToyEncoder

    root = _photos(tmp_path / "photos")
    pool = tmp_path / "pool.jsonl"
    result = runner.invoke(app, ["data", "pool-from-folder", str(root), "--out", str(pool)])
    assert result.exit_code == 0, result.output
    assert "wrote 2 candidates (1 with a caption)" in result.output and "broken.jpg" in result.output
    assert "jfe index build" in result.output
    model = ToyEncoder().save_pretrained(tmp_path / "toy")
    index = tmp_path / "index"
    built = runner.invoke(app, ["index", "build", "--model", str(model), "--pool", str(pool), "--data-root",
                                str(root), "--out", str(index), "--no-progress"])
    assert built.exit_code == 0, built.output
    query = tmp_path / "q.png"
    Image.new("RGB", (40, 30), (250, 10, 10)).save(query)
    found = runner.invoke(app, ["search", "--index", str(index), "--model", str(model), "--image", str(query),
                                "--top-k", "1", "--json"])
    assert found.exit_code == 0, found.output
    assert json.loads(found.output.strip().splitlines()[-1])["hits"][0]["did"] == "1:2"  # the red photo
    missing = runner.invoke(app, ["data", "pool-from-folder", str(tmp_path / "nope"), "--out", str(pool)])
    assert isinstance(missing.exception, DataError) and "nope: not a folder" in str(missing.exception)
