"""Shared test fixtures.

``tiny_mbeir`` (function scope) writes a small but complete, *valid* M-BEIR-layout dataset into
``tmp_path / "tiny_mbeir"`` and returns its root :class:`~pathlib.Path`. Everything is built here with
PIL and ``jfe.data.mbeir`` writers; nothing is downloaded. Layout (dataset id ``"1"``, ids ``"1:<n>"``)::

    images/tiny/{red,blue}_{square,circle}.png      4 RGB images, 32x32 (blue_circle.png is RGBA)
    cand_pool/local/mbeir_tiny_task0_cand_pool.jsonl  1:1-1:4  the four images        (modality "image")
    cand_pool/local/mbeir_tiny_task3_cand_pool.jsonl  1:5-1:8  "A red square", ...    (modality "text")
    cand_pool/local/mbeir_tiny_task7_cand_pool.jsonl  1:1-1:4  the four images
    cand_pool/global/mbeir_union_test_cand_pool.jsonl 1:1-1:8  union of the local pools
    query/test/mbeir_tiny_task0_test.jsonl   1:101-1:104  text "a red square"       -> image 1:1 ...  (task 0)
    query/test/mbeir_tiny_task3_test.jsonl   1:201-1:204  image red_square          -> text 1:5 ...   (task 3)
    query/test/mbeir_tiny_task7_test.jsonl   1:301-1:304  image + "make it blue" / "make it a circle"
                                                          -> the changed image (task 7, neg = reference image,
                                                          query_src_content = {"modification": "colour"|"shape"})
    query/train/mbeir_tiny_task0_train.jsonl 1:111-1:112  two task-0 training queries
    qrels/{test,train}/<query file stem>_qrels.txt      one ``qid 0 did 1 task_id`` line per positive
    instructions/query_instructions.tsv                  keys (1,text,image) (1,image,text) (1,image,text,image),
                                                          two prompts each

The ``TINY_*`` constants below describe it for assertions (counts, colours, file names).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from jfe import hardware
from jfe.data.mbeir import write_candidates, write_instructions, write_qrels, write_queries
from jfe.data.records import Candidate, InstructionSet, Qrel, Query
from jfe.models import precision as precision_module
from jfe.models import pretrained as pretrained_module


def _auto_is_fp32(device: object = "cpu") -> hardware.Bf16Support:
    """bf16 detection as on a CPU without native bf16, so ``precision="auto"`` resolves to fp32 in-process."""
    real = hardware.bf16_support(device)
    return hardware.Bf16Support(real.device_type, False, f"pinned to fp32 by the test suite ({real.detail})")


@pytest.fixture(scope="session", autouse=True)
def _auto_precision_is_fp32() -> Iterator[None]:
    """The suite compares code paths number for number (batch vs one by one, CLI vs API): ``precision="auto"``
    resolves to fp32 in every test, so a CPU with native bf16 gives the same numbers as one without. bf16 is
    tested where a test asks for it by argument, or restores the real detection (``real_bf16_detection``); a
    test that starts a subprocess passes its precision as an argument (a config key, ``--precision``)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(precision_module, "bf16_support", _auto_is_fp32)
        yield


@pytest.fixture
def real_bf16_detection(monkeypatch: pytest.MonkeyPatch) -> None:
    """``precision="auto"`` as the machine really resolves it."""
    monkeypatch.setattr(precision_module, "bf16_support", hardware.bf16_support)

SHIPPED_ROOT = pretrained_module.PACKAGE_ROOT  # before any fixture hides it

TINY_COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220)}
TINY_SHAPES = ("square", "circle")
# (colour, shape) -> (image did, text did)
TINY_IDS = {("red", "square"): ("1:1", "1:5"), ("blue", "square"): ("1:2", "1:6"),
            ("red", "circle"): ("1:3", "1:7"), ("blue", "circle"): ("1:4", "1:8")}
TINY_TASKS = (0, 3, 7)
TINY_TEST_QUERIES = 12
TINY_TRAIN_QUERIES = 2


def _draw(colour: str, shape: str, path: Path, rgba: bool = False) -> None:
    image = Image.new("RGBA" if rgba else "RGB", (32, 32), (0, 0, 0, 0) if rgba else (255, 255, 255))
    draw = ImageDraw.Draw(image)
    box = (6, 6, 25, 25)
    fill = TINY_COLOURS[colour] + ((255,) if rgba else ())
    (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=fill)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def drawn_image(seed: int, size: tuple[int, int] = (96, 96)) -> Image.Image:
    """A seeded picture: four coloured discs on a coloured ground (distinct per seed, no assets needed)."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", size, tuple(int(c) for c in rng.integers(0, 255, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x, y = (int(v) for v in rng.integers(0, 70, 2))
        draw.ellipse((x, y, x + 25, y + 25), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return image


def _qrels(queries: list[Query]) -> list[Qrel]:
    return [Qrel(q.qid, did, 1, q.task_id) for q in queries for did in q.pos_cand_list]


def build_tiny_mbeir(root: Path) -> Path:
    """Write the dataset described in the module docstring under ``root`` and return ``root``."""
    img = {}
    for (colour, shape) in TINY_IDS:
        rel = f"images/tiny/{colour}_{shape}.png"
        _draw(colour, shape, root / rel, rgba=(colour, shape) == ("blue", "circle"))
        img[(colour, shape)] = rel

    image_cands = [Candidate(TINY_IDS[k][0], None, img[k], "image") for k in TINY_IDS]
    text_cands = [Candidate(TINY_IDS[k][1], f"A {k[0]} {k[1]}", None, "text") for k in TINY_IDS]
    local = root / "cand_pool" / "local"
    write_candidates(local / "mbeir_tiny_task0_cand_pool.jsonl", image_cands)
    write_candidates(local / "mbeir_tiny_task3_cand_pool.jsonl", text_cands)
    write_candidates(local / "mbeir_tiny_task7_cand_pool.jsonl", image_cands)
    write_candidates(root / "cand_pool" / "global" / "mbeir_union_test_cand_pool.jsonl", image_cands + text_cands)

    keys = list(TINY_IDS)
    t0 = [Query(f"1:{101 + i}", f"a {c} {s}", None, "text", None, [TINY_IDS[(c, s)][0]], [], 0)
          for i, (c, s) in enumerate(keys)]
    t3 = [Query(f"1:{201 + i}", None, img[(c, s)], "image", None, [TINY_IDS[(c, s)][1]], [], 3)
          for i, (c, s) in enumerate(keys)]
    t7 = []
    for i, (c, s) in enumerate([("red", "square"), ("blue", "square"), ("red", "circle"), ("blue", "circle")]):
        if i % 2 == 0:  # colour change
            target, text, mod = ("blue" if c == "red" else "red", s), f"make it {'blue' if c == 'red' else 'red'}", \
                "colour"
        else:  # shape change
            target, text, mod = (c, "circle" if s == "square" else "square"), \
                f"make it a {'circle' if s == 'square' else 'square'}", "shape"
        t7.append(Query(f"1:{301 + i}", text, img[(c, s)], "image,text", f'{{"modification": "{mod}"}}',
                        [TINY_IDS[target][0]], [TINY_IDS[(c, s)][0]], 7))
    train = [Query(f"1:{111 + i}", f"the {c} {s}", None, "text", None, [TINY_IDS[(c, s)][0]], [], 0)
             for i, (c, s) in enumerate(keys[:2])]

    for name, queries, split in (("mbeir_tiny_task0_test", t0, "test"), ("mbeir_tiny_task3_test", t3, "test"),
                                 ("mbeir_tiny_task7_test", t7, "test"), ("mbeir_tiny_task0_train", train, "train")):
        write_queries(root / "query" / split / f"{name}.jsonl", queries)
        write_qrels(root / "qrels" / split / f"{name}_qrels.txt", _qrels(queries))

    write_instructions(root / "instructions" / "query_instructions.tsv", [
        InstructionSet("1", "text", "image", ["Find the picture this text describes", "Retrieve a matching image"],
                       "tiny"),
        InstructionSet("1", "image", "text", ["Find a caption for this image", "Describe the shape"], "tiny"),
        InstructionSet("1", "image,text", "image", ["Change the image as the text says", "Apply the edit"],
                       "tiny"),
    ])
    return root


@pytest.fixture
def tiny_mbeir(tmp_path: Path) -> Path:
    """A valid tiny M-BEIR-layout dataset (3 tasks, 2 splits, 4 images); see the module docstring."""
    return build_tiny_mbeir(tmp_path / "tiny_mbeir")


@pytest.fixture(scope="session", autouse=True)
def _no_user_pretrained_table(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Session-wide, so it is in place before module-scoped fixtures load models: a table filled by the user's
    ``make demo`` / ``make reproduce``, and the package's shipped weights, must never reach a test unasked (the
    per-test table below then empties it)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JFE_PRETRAINED", str(tmp_path_factory.mktemp("pretrained-session")))
        patch.setattr(pretrained_module, "PACKAGE_ROOT", tmp_path_factory.mktemp("no-shipped-weights-session"))
        yield


@pytest.fixture(autouse=True)
def _empty_pretrained_table(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts with an empty pretrained table: weights a user registered (``make demo``) must not
    change what ``load_model("jfe-mini")`` means inside the tests."""
    monkeypatch.setenv("JFE_PRETRAINED", str(tmp_path_factory.mktemp("pretrained")))
    # the package's shipped weights too: a test asks for them by name (the `shipped_weights` fixture)
    monkeypatch.setattr(pretrained_module, "PACKAGE_ROOT", tmp_path_factory.mktemp("no-shipped-weights"))


@pytest.fixture
def shipped_weights(monkeypatch: pytest.MonkeyPatch) -> Path:
    """The package's shipped weights, visible again (what a user gets right after install)."""
    monkeypatch.setattr(pretrained_module, "PACKAGE_ROOT", SHIPPED_ROOT)
    return SHIPPED_ROOT
