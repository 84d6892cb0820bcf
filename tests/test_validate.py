"""The M-BEIR validator (one test per class of bad input) and the `jfe data` commands."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import TINY_TEST_QUERIES, TINY_TRAIN_QUERIES
from jfe.cli import app
from jfe.data.validate import KINDS, Problem, dataset_stats, validate_dataset
from jfe.errors import DataError

T0 = Path("query/test/mbeir_tiny_task0_test.jsonl")
T3 = Path("query/test/mbeir_tiny_task3_test.jsonl")
T7 = Path("query/test/mbeir_tiny_task7_test.jsonl")
POOL0 = Path("cand_pool/local/mbeir_tiny_task0_cand_pool.jsonl")
GLOBAL = Path("cand_pool/global/mbeir_union_test_cand_pool.jsonl")
QRELS0 = Path("qrels/test/mbeir_tiny_task0_test_qrels.txt")
TSV = Path("instructions/query_instructions.tsv")


def edit(root: Path, rel: Path, index: int, **changes: object) -> dict:
    """Change fields of the JSON record on line ``index`` (0-based) of a jsonl file; returns the record."""
    path = root / rel
    lines = path.read_text(encoding="utf-8").splitlines()
    record = json.loads(lines[index])
    record.update(changes)
    lines[index] = json.dumps(record)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return record


def append(root: Path, rel: Path, line: str) -> int:
    """Append a raw line; returns its 1-based line number."""
    path = root / rel
    lines = path.read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join([*lines, line]) + "\n", encoding="utf-8")
    return len(lines) + 1


def only(problems: list[Problem], kind: str) -> list[Problem]:
    return [p for p in problems if p.kind == kind]


def test_tiny_dataset_is_valid(tiny_mbeir: Path) -> None:
    assert validate_dataset(tiny_mbeir) == []


def test_missing_root_raises(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        validate_dataset(tmp_path / "nope")


def test_empty_folder_reports_layout(tmp_path: Path) -> None:
    problems = validate_dataset(tmp_path)
    assert {p.kind for p in problems} == {"layout"}
    assert any("instructions" in p.message for p in problems)
    assert any("query" in p.message for p in problems)


def test_malformed_json_reports_every_line_and_goes_on(tiny_mbeir: Path) -> None:
    first = append(tiny_mbeir, T0, "{not json")
    second = append(tiny_mbeir, T0, "[1, 2]")
    # A later good-looking record with a real problem is still checked after the bad lines.
    third = append(tiny_mbeir, T0, json.dumps({"qid": "1:199", "query_txt": "x", "query_img_path": None,
                                               "query_modality": "text", "pos_cand_list": ["1:1"],
                                               "neg_cand_list": [], "task_id": 99}))
    pool_line = append(tiny_mbeir, POOL0, '{"did": "1:50",')
    problems = validate_dataset(tiny_mbeir)
    bad = only(problems, "malformed-json")
    assert {(Path(p.path).name, p.line) for p in bad} == {(T0.name, first), (T0.name, second),
                                                          (POOL0.name, pool_line)}
    assert [(p.line, p.record) for p in only(problems, "unknown-task")] == [(third, "1:199")]


def test_invalid_utf8_line(tiny_mbeir: Path) -> None:
    path = tiny_mbeir / T3
    path.write_bytes(path.read_bytes() + b'{"qid": "\xff\xfe"}\n')
    problems = validate_dataset(tiny_mbeir)
    assert [(p.kind, p.line) for p in problems] == [("encoding", 5)]


def test_unknown_modality(tiny_mbeir: Path) -> None:
    edit(tiny_mbeir, T0, 1, query_modality="video")
    edit(tiny_mbeir, POOL0, 2, modality="audio")
    problems = validate_dataset(tiny_mbeir)
    found = {(Path(p.path).name, p.line, p.record) for p in only(problems, "unknown-modality")}
    assert found == {(T0.name, 2, "1:102"), (POOL0.name, 3, "1:3")}
    assert all("video" in p.message or "audio" in p.message for p in only(problems, "unknown-modality"))
    # The bad record's id still counts as present: no dangling-id noise for 1:3.
    assert not only(problems, "dangling-id")


def test_modality_disagrees_with_fields(tiny_mbeir: Path) -> None:
    edit(tiny_mbeir, T0, 0, query_img_path="images/tiny/red_square.png")  # text + image, says "text"
    edit(tiny_mbeir, GLOBAL, 5, modality="image")  # a text candidate that claims to be an image
    problems = only(validate_dataset(tiny_mbeir), "modality-mismatch")
    assert {(Path(p.path).name, p.record) for p in problems} == {(T0.name, "1:101"), (GLOBAL.name, "1:6")}
    assert any("'image,text'" in p.message for p in problems)


def test_query_modality_disagrees_with_task(tiny_mbeir: Path) -> None:
    edit(tiny_mbeir, T3, 0, task_id=0)  # an image query in a text -> image task
    problems = validate_dataset(tiny_mbeir)
    mismatch = only(problems, "modality-mismatch")
    assert [(p.record, p.line) for p in mismatch] == [("1:201", 1)]
    assert "task 0" in mismatch[0].message


def test_empty_record(tiny_mbeir: Path) -> None:
    edit(tiny_mbeir, T0, 3, query_txt="   ")
    problems = validate_dataset(tiny_mbeir)
    assert [(p.kind, p.record) for p in problems] == [("empty-record", "1:104")]


def test_dangling_ids(tiny_mbeir: Path) -> None:
    edit(tiny_mbeir, T7, 0, pos_cand_list=["1:2", "1:999"], neg_cand_list=["7:1"])
    # 1:5 is a text candidate: not in task 0's local pool but in the global pool, so it is not dangling.
    edit(tiny_mbeir, T0, 0, neg_cand_list=["1:5"])
    problems = validate_dataset(tiny_mbeir)
    dangling = only(problems, "dangling-id")
    assert sorted(p.message.split("'")[1] for p in dangling) == ["1:999", "7:1"]
    assert {p.record for p in dangling} == {"1:301"}
    # The extra positive also disagrees with the qrels.
    assert [p.record for p in only(problems, "qrels-mismatch")] == ["1:301"]


def test_dangling_ids_without_global_pool(tiny_mbeir: Path) -> None:
    (tiny_mbeir / GLOBAL).unlink()
    edit(tiny_mbeir, T0, 0, neg_cand_list=["1:5"])  # only the global pool held 1:5
    problems = validate_dataset(tiny_mbeir)
    assert [(p.kind, p.record) for p in problems] == [("dangling-id", "1:101")]


def test_missing_images(tiny_mbeir: Path) -> None:
    edit(tiny_mbeir, T3, 2, query_img_path="images/tiny/gone.png")
    (tiny_mbeir / "images/tiny/blue_square.png").unlink()  # candidate 1:2 in 3 pools, and query 1:202
    problems = validate_dataset(tiny_mbeir)
    missing = only(problems, "missing-image")
    assert {p.record for p in missing} == {"1:203", "1:2", "1:202", "1:302"}
    assert len([p for p in missing if p.record == "1:2"]) == 3  # task0, task7 local pools and the global pool
    assert validate_dataset(tiny_mbeir, check_images=False) == []


def test_qrels_disagree_with_positive_lists(tiny_mbeir: Path) -> None:
    path = tiny_mbeir / QRELS0
    lines = path.read_text().splitlines()
    lines[1] = lines[1].replace("1:2", "1:3")  # 1:102's positive changed
    lines[2] = lines[2].rsplit(" ", 1)[0] + " 3"  # 1:103 with the wrong task id
    lines.append("1:777 0 1:1 1 0")  # qrels for a query that does not exist
    lines.append("1:101 0")  # malformed
    del lines[3]  # 1:104 loses its qrels
    path.write_text("\n".join(lines) + "\n")
    problems = validate_dataset(tiny_mbeir)
    assert {p.record for p in only(problems, "qrels-mismatch")} == {"1:102", "1:103", "1:104", "1:777"}
    fmt = only(problems, "qrels-format")
    assert [(Path(p.path).name, p.line) for p in fmt] == [(QRELS0.name, 5)]


def test_unknown_task_ids(tiny_mbeir: Path) -> None:
    edit(tiny_mbeir, T0, 0, task_id=12)
    edit(tiny_mbeir, T0, 1, task_id=None)
    edit(tiny_mbeir, T0, 2, task_id="x")  # not even an integer: a schema problem
    problems = validate_dataset(tiny_mbeir)
    assert [p.record for p in only(problems, "unknown-task")] == ["1:101", "1:102"]
    assert [p.record for p in only(problems, "schema")] == ["1:103"]


def test_missing_instruction_key(tiny_mbeir: Path) -> None:
    path = tiny_mbeir / TSV
    # UniIR column order: query modality, candidate modality, dataset, dataset id, prompts
    lines = [ln for ln in path.read_text().splitlines() if not ln.startswith("image\ttext\t")]
    path.write_text("\n".join(lines) + "\n")
    problems = validate_dataset(tiny_mbeir)
    assert [p.kind for p in problems] == ["missing-instruction"] * 4
    assert {p.record for p in problems} == {"1:201", "1:202", "1:203", "1:204"}
    assert "image -> text" in problems[0].message


def test_bad_instruction_rows(tiny_mbeir: Path) -> None:
    append(tiny_mbeir, TSV, "1\ttiny\tsmell\ttext\tSniff it")
    append(tiny_mbeir, TSV, "1\ttiny\ttext\timage")  # no prompts (and a duplicate key)
    append(tiny_mbeir, TSV, "2")
    problems = only(validate_dataset(tiny_mbeir), "instructions-format")
    assert [p.line for p in problems] == [5, 6, 6, 7]


def test_missing_instructions_file(tiny_mbeir: Path) -> None:
    (tiny_mbeir / TSV).unlink()
    problems = validate_dataset(tiny_mbeir)
    assert [(p.kind, Path(p.path).name) for p in problems] == [("layout", TSV.name)]


def test_duplicate_ids(tiny_mbeir: Path) -> None:
    line = (tiny_mbeir / POOL0).read_text().splitlines()[0]
    dup_line = append(tiny_mbeir, POOL0, line)
    # the same qid in another file of the same split
    q = json.loads((tiny_mbeir / T0).read_text().splitlines()[0])
    q_line = append(tiny_mbeir, T3, json.dumps({**q, "task_id": 0}))
    problems = only(validate_dataset(tiny_mbeir), "duplicate-id")
    assert {(Path(p.path).name, p.line, p.record) for p in problems} == {(POOL0.name, dup_line, "1:1"),
                                                                         (T3.name, q_line, "1:101")}


def test_schema_errors_name_record(tiny_mbeir: Path) -> None:
    edit(tiny_mbeir, T0, 0, pos_cand_list="1:1")
    edit(tiny_mbeir, POOL0, 0, txt=5)
    problems = only(validate_dataset(tiny_mbeir), "schema")
    assert {(p.record, p.line) for p in problems} == {("1:101", 1), ("1:1", 1)}
    assert all(p.path not in p.message for p in problems)  # bare messages; the location is in the fields


def test_no_positive(tiny_mbeir: Path) -> None:
    edit(tiny_mbeir, T0, 0, pos_cand_list=[])
    problems = validate_dataset(tiny_mbeir)
    assert {(p.kind, p.record) for p in problems} == {("no-positive", "1:101"), ("qrels-mismatch", "1:101")}


def test_every_kind_is_documented(tiny_mbeir: Path) -> None:
    (tiny_mbeir / TSV).unlink()
    append(tiny_mbeir, T0, "{")
    edit(tiny_mbeir, T3, 0, task_id=77)
    assert {p.kind for p in validate_dataset(tiny_mbeir)} <= set(KINDS)


def test_problem_str() -> None:
    assert str(Problem("a/b.jsonl", 3, "1:2", "schema", "bad")) == "a/b.jsonl:3: 1:2: bad"
    assert str(Problem("a/b.tsv", None, None, "layout", "gone")) == "a/b.tsv: gone"


def test_stats_counts(tiny_mbeir: Path) -> None:
    append(tiny_mbeir, T0, "{")
    stats = dataset_stats(tiny_mbeir)
    rows = {(r["split"], r["task_id"]): r for r in stats.per_task()}
    assert set(rows) == {("test", 0), ("test", 3), ("test", 7), ("train", 0)}
    assert sum(r["queries"] for r in rows.values() if r["split"] == "test") == TINY_TEST_QUERIES
    assert rows[("train", 0)]["queries"] == TINY_TRAIN_QUERIES
    assert rows[("test", 7)]["query_modalities"] == {"image,text": 4}
    assert rows[("test", 7)]["category"] == "conditional"
    assert rows[("test", 3)]["local_pool"] == 4
    assert [f.records for f in stats.global_pools] == [8]
    assert dict(stats.global_pools[0].modalities) == {"image": 4, "text": 4}
    assert sum(f.bad_lines for f in stats.query_files) == 1
    assert stats.instruction_keys == 3


# ----------------------------------------------------------------------------------------------- CLI

runner = CliRunner()


def test_cli_validate_ok(tiny_mbeir: Path) -> None:
    result = runner.invoke(app, ["data", "validate", str(tiny_mbeir)])
    assert result.exit_code == 0, result.output
    assert "valid" in result.output


def test_cli_validate_reports_and_fails(tiny_mbeir: Path) -> None:
    edit(tiny_mbeir, T0, 1, task_id=42)
    line = append(tiny_mbeir, T3, "{oops")
    result = runner.invoke(app, ["data", "validate", str(tiny_mbeir)])
    assert result.exit_code == 1
    assert f"{tiny_mbeir / T0}:2: 1:102: task_id 42" in result.output
    assert f"{tiny_mbeir / T3}:{line}: malformed JSON" in result.output
    assert "3 problem(s)" in result.output and "unknown-task 1" in result.output  # + qrels task id

    limited = runner.invoke(app, ["data", "validate", str(tiny_mbeir), "--limit", "1", "--json"])
    assert limited.exit_code == 1
    printed = [json.loads(ln) for ln in limited.stdout.splitlines() if ln.startswith("{")]
    assert len(printed) == 1 and printed[0]["kind"] in {"unknown-task", "malformed-json"}
    assert "(1 shown)" in limited.output


def test_cli_stats(tiny_mbeir: Path) -> None:
    result = runner.invoke(app, ["data", "stats", str(tiny_mbeir), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert sum(r["queries"] for r in data["per_task"]) == TINY_TEST_QUERIES + TINY_TRAIN_QUERIES
    table = runner.invoke(app, ["data", "stats", str(tiny_mbeir)])
    assert table.exit_code == 0, table.output
    assert "image,text -> image" in table.output and "conditional" in table.output
    assert "mbeir_union_test_cand_pool.jsonl" in table.output.replace("\n", "").replace("│", "").replace(" ", "")


def test_cli_build_minibeir_forwards_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    class Summary:
        def to_markdown(self) -> str:
            return "| task | queries |\n|---|---|\n| 0 | 3 |"

    def build_minibeir(out: Path, **kwargs: object) -> Summary:
        calls.append((out, kwargs))
        return Summary()

    fake = types.ModuleType("jfe.data.minibeir")
    fake.build_minibeir = build_minibeir
    monkeypatch.setitem(sys.modules, "jfe.data.minibeir", fake)
    result = runner.invoke(app, ["data", "build-minibeir", "--out", str(tmp_path / "mb"), "--seed", "3",
                                 "--max-bases", "10", "--image-size", "64", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert calls == [(tmp_path / "mb", {"seed": 3, "max_bases": 10, "image_size": 64, "progress": False,
                                          "overwrite": False})]
    assert "| 0 | 3 |" in result.output
