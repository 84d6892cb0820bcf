"""MiniBEIR builder: layout, splits, pools, fusion-task difficulty, determinism.

Tests marked ``assets`` build a small but real MiniBEIR (``max_bases`` small) from the fetched emoji and
clip-art packages, once per module. The others are unit tests of the parsing and splitting helpers.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from PIL import Image

from jfe.data import assets
from jfe.data.mbeir import MBEIRLayout, read_candidates, read_instructions, read_qrels, read_queries
from jfe.data.minibeir import SPLITS, build_minibeir, split_of_base
from jfe.data.minibeir.build import MARKER, BuildConfig
from jfe.data.minibeir.sources import _family, parse_emoji_code
from jfe.data.records import CANDIDATE_ID_BOUND, QUERY_ID_BOUND, TASKS, hashed_id
from jfe.errors import ConfigError

MAX_BASES = 30
IMAGE_SIZE = 64
FUSION_EDIT_TASKS = (6, 7, 8)
_NEEDED = ("openmoji", "emoji_google", "emoji_twitter", "emojibase", "openclipart")
needs_assets = pytest.mark.skipif(not all(assets.is_fetched(n) for n in _NEEDED),
                                  reason="MiniBEIR sources not fetched (run `jfe assets fetch`)")
_FILE = re.compile(r"^mbeir_(?P<ds>[a-z]+)_task(?P<task>\d)_(?P<split>train|val|test)$")


# ------------------------------------------------------------------------------------------ unit tests


def test_parse_emoji_code_strips_variant_attributes() -> None:
    base, attrs = parse_emoji_code("1F469-1F3FD-200D-1F33E")  # woman farmer: medium skin tone
    assert base == "1F9D1-200D-1F33E"
    assert attrs == {"skin": 3, "gender": "woman", "hair": "", "direction": ""}
    base, attrs = parse_emoji_code("1F3C3-1F3FF-200D-2642-200D-27A1")  # man running facing right: dark
    assert (base, attrs["skin"], attrs["gender"], attrs["direction"]) == ("1F3C3", 5, "man", "right")
    base, attrs = parse_emoji_code("1F468-200D-1F9B0")  # man: red hair -> same base as "person"
    assert (base, attrs["gender"], attrs["hair"]) == ("1F9D1", "man", "red hair")
    assert parse_emoji_code("1F9D1-1F3FB-200D-1F91D-200D-1F9D1-1F3FF") is None  # two people, two tones


def test_family_values() -> None:
    assert _family("three-thirty") == ("clock", (210,))
    assert _family("twelve o’clock") == ("clock", (0,))
    assert _family("full moon") == ("moon", (4,))
    assert _family("keycap: 7") == ("keycap", (7,))
    assert _family("green heart") == ("colour", ("green", "heart"))
    assert _family("black large square") == ("colour", ("black", "square"))
    assert _family("large orange diamond") is None
    assert _family("down-left arrow") == ("arrow", (5,))


def test_split_of_base_is_stable_and_follows_fractions() -> None:
    bases = [f"emoji:{i}" for i in range(6000)]
    first = [split_of_base(b, 0, (0.7, 0.1, 0.2)) for b in bases]
    assert first == [split_of_base(b, 0, (0.7, 0.1, 0.2)) for b in bases]
    shares = Counter(first)
    assert abs(shares["train"] / 6000 - 0.7) < 0.03 and abs(shares["test"] / 6000 - 0.2) < 0.03
    assert first != [split_of_base(b, 1, (0.7, 0.1, 0.2)) for b in bases]  # the seed matters


def test_refuses_to_replace_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a MiniBEIR build"):
        build_minibeir(tmp_path, max_bases=1, progress=False)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_config_validation() -> None:
    with pytest.raises(ConfigError):
        BuildConfig(image_size=4)
    with pytest.raises(ConfigError):
        BuildConfig(split_fractions=(0.5, 0.5, 0.5))


# ------------------------------------------------------------------------------ built-dataset tests


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory):
    if not all(assets.is_fetched(n) for n in _NEEDED):
        pytest.skip("MiniBEIR sources not fetched")
    root = tmp_path_factory.mktemp("minibeir") / "mb"
    summary = build_minibeir(root, seed=0, max_bases=MAX_BASES, image_size=IMAGE_SIZE, progress=False)
    return root, summary


def _query_files(root: Path) -> list[tuple[str, int, str, Path]]:
    out = []
    for split in SPLITS:
        for path in MBEIRLayout(root).query_files(split):
            m = _FILE.match(path.stem)
            assert m, f"unexpected query file name {path.name}"
            assert m["split"] == split
            out.append((m["ds"], int(m["task"]), split, path))
    return out


@pytest.mark.assets
@needs_assets
def test_all_eight_tasks_present_with_modalities(built) -> None:
    root, summary = built
    files = _query_files(root)
    assert {t for _, t, _, _ in files} == {0, 1, 2, 3, 4, 6, 7, 8}
    assert {s for _, _, s, _ in files} == set(SPLITS)
    for _, task, _, path in files:
        pool = read_candidates(MBEIRLayout(root).local_pool_for(path))
        for q in read_queries(path):
            assert q.task_id == task and q.query_modality == TASKS[task][0], q.qid
        assert {c.modality for c in pool} == {TASKS[task][1]}, path.name
    assert summary.total_queries == sum(len(read_queries(p)) for *_, p in files)
    assert (root / "README.md").read_text().count("| emoji | 7 |") == 1


@pytest.mark.assets
@needs_assets
def test_no_base_in_two_splits(built) -> None:
    root, _ = built
    bases: dict[str, set[str]] = defaultdict(set)
    cand_base = {c.did: c.src["base"] for p in MBEIRLayout(root).local_pool_files() for c in read_candidates(p)}
    for _, _, split, path in _query_files(root):
        for q in read_queries(path):
            bases[split].add(q.src["base"])
            for did in q.pos_cand_list:  # positives belong to the query's split too (or are shared vocabulary)
                b = cand_base[did]
                assert b.startswith("vocab:") or split_of_base(b, 0, (0.7, 0.1, 0.2)) == split, (q.qid, did)
    assert not bases["train"] & bases["test"]
    assert not bases["train"] & bases["val"]
    assert not bases["val"] & bases["test"]


@pytest.mark.assets
@needs_assets
def test_positives_in_local_and_global_pools(built) -> None:
    root, _ = built
    layout = MBEIRLayout(root)
    union = {s: {c.did for c in read_candidates(root / "cand_pool" / "global" / f"mbeir_union_{s}_cand_pool.jsonl")}
             for s in SPLITS}
    every = {c.did for p in layout.local_pool_files() for c in read_candidates(p)}
    assert union["test"] == every
    for _, task, split, path in _query_files(root):
        local = {c.did for c in read_candidates(layout.local_pool_for(path))}
        qrels = read_qrels(root / "qrels" / split / f"{path.stem}_qrels.txt")
        for q in read_queries(path):
            assert q.pos_cand_list and set(q.pos_cand_list) <= local, q.qid
            assert set(q.pos_cand_list) <= union[split], q.qid
            assert set(q.neg_cand_list) <= local and not set(q.neg_cand_list) & set(q.pos_cand_list), q.qid
            assert qrels[q.qid] == set(q.pos_cand_list)
            excluded = set(q.src.get("exclude_dids", []))
            assert excluded <= local and not excluded & set(q.pos_cand_list), q.qid
            if task in (7, 8):
                assert len(excluded) == 1, f"{q.qid}: composed queries exclude their reference"


@pytest.mark.assets
@needs_assets
def test_fusion_tasks_have_hard_distractors(built) -> None:
    root, _ = built
    layout = MBEIRLayout(root)
    for task in (7, 8):
        counts = []
        for _, t, _, path in _query_files(root):
            if t != task:
                continue
            pool = read_candidates(layout.local_pool_for(path))
            by_group = Counter(c.src["group"] for c in pool)
            group_of = {c.did: c.src["group"] for c in pool}
            for q in read_queries(path):
                assert group_of[q.pos_cand_list[0]] == q.src["group"]  # the target is a variant of the reference
                counts.append(by_group[q.src["group"]] - len(q.pos_cand_list) - len(q.src["exclude_dids"]))
        assert counts and sum(counts) / len(counts) >= 5, f"task {task}: {sum(counts) / len(counts):.1f}"


@pytest.mark.assets
@needs_assets
def test_modification_types_and_non_additive_share(built) -> None:
    root, _ = built
    for task in FUSION_EDIT_TASKS:
        flags, kinds = [], Counter()
        for _, t, _, path in _query_files(root):
            if t != task:
                continue
            for q in read_queries(path):
                src = q.src
                assert isinstance(src.get("modification"), str) and src["modification"], q.qid
                assert isinstance(src.get("non_additive"), bool), q.qid
                assert src.get("query_txt_heldout") and src["query_txt_heldout"] != q.query_txt or \
                    src["modification"] in ("category",), q.qid
                flags.append(src["non_additive"])
                kinds[src["modification"]] += 1
        share = sum(flags) / len(flags)
        assert share >= 1 / 3, f"task {task}: only {share:.2f} non-additive"
        assert share < 1, f"task {task}: additive modifications must stay too"
        assert len(kinds) >= 4, f"task {task}: {kinds}"


@pytest.mark.assets
@needs_assets
def test_images_and_instructions(built) -> None:
    root, summary = built
    pngs = sorted((root / "images").rglob("*.png"))
    assert len(pngs) == summary.images > 0
    for path in pngs[:: max(1, len(pngs) // 60)]:
        with Image.open(path) as im:
            assert im.size == (IMAGE_SIZE, IMAGE_SIZE) and im.mode == "RGB", path
            assert im.getpixel((0, 0)) == (255, 255, 255), path  # white background
    main = read_instructions(root / "instructions" / "query_instructions.tsv")
    held = read_instructions(root / "instructions" / "heldout_instructions.tsv")
    assert main.keys() == held.keys()
    for key in main:
        assert len(main[key].prompts) >= 2 and not set(main[key].prompts) & set(held[key].prompts)
    for _ds, task, _, path in _query_files(root):
        q = read_queries(path)[0]
        assert (q.qid.split(":")[0], *TASKS[task]) in main, path.name
        assert (root / (q.query_img_path or "README.md")).exists()


@pytest.mark.assets
@needs_assets
def test_build_is_deterministic(built, tmp_path: Path) -> None:
    root, _ = built
    again = tmp_path / "again"
    build_minibeir(again, seed=0, max_bases=MAX_BASES, image_size=IMAGE_SIZE, progress=False)

    def hashes(r: Path) -> dict[str, str]:
        return {str(p.relative_to(r)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(r.rglob("*")) if p.is_file()}

    first, second = hashes(root), hashes(again)
    assert MARKER in first and len(first) > 50
    assert first == second
    # rebuilding over an earlier build is allowed and replaces it whole
    build_minibeir(again, seed=1, max_bases=MAX_BASES, image_size=IMAGE_SIZE, progress=False)
    assert hashes(again) != second


@pytest.mark.assets
@needs_assets
def test_ids_never_clash_with_mbeir_and_fit_uniir_bounds(built) -> None:
    root, _ = built
    layout = MBEIRLayout(root)
    for split in ("train", "val", "test"):
        for path in layout.query_files(split):
            for q in read_queries(path):
                assert q.qid.split(":")[0] in {"90", "91"}, (path.name, q.qid)  # M-BEIR uses 0-9
                hashed_id(q.qid, QUERY_ID_BOUND)  # raises over the bound
    for path in layout.local_pool_files():
        for cand in read_candidates(path):
            hashed_id(cand.did, CANDIDATE_ID_BOUND)
