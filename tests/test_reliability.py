"""What an adversarial probe found (issue: "Nothing lost, nobody in"), one test per finding.

Each test runs what a careless or hostile user would: the ``jfe`` command as typed (``main()``: JFE's errors as
one line and exit 2, anything else a traceback that fails the test), the library calls behind it, and the
service's ASGI app. The numbers in the names follow the issue's list.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import stat
import sys
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from jfe.data.mbeir import read_queries, write_candidates, write_queries
from jfe.data.records import Candidate
from jfe.data.validate import validate_dataset
from jfe.errors import ConfigError, DataError
from jfe.index import VectorIndex
from jfe.index.build import index_vectors
from jfe.index.shards import SHARDS_FILE, load_index
from jfe.indexing import build_index
from jfe.models.toy import ToyEncoder
from jfe.paths import atomic_dir
from jfe.serve.app import create_app
from jfe.serve.schemas import ServeSettings

SRC = Path(__file__).resolve().parents[1] / "src"


def jfe(*args: str) -> tuple[int, str]:
    """Run ``jfe ARGS`` as a user types it, in-process; returns (exit code, stdout + stderr)."""
    from jfe.cli import main

    out, err = io.StringIO(), io.StringIO()
    with mock.patch.object(sys, "argv", ["jfe", *args]), contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err):
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return code, out.getvalue() + err.getvalue()


def one_line_error(code: int, output: str, *needles: str) -> None:
    """Exit 2 with a single ``error:`` line that says what it should, and no traceback."""
    assert code == 2, output
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    for needle in needles:
        assert needle in errors[0], errors[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def pool_of(root: Path) -> Path:
    return root / "cand_pool" / "global" / "mbeir_union_test_cand_pool.jsonl"


def build_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["index", "build", "--model", "toy", "--pool", str(pool_of(root)), "--data-root", str(root),
            "--out", str(out), "--no-progress", *extra]


# ------------------------------------------------------------------------------------------ 1. data loss
def test_1_index_build_never_removes_a_folder_it_did_not_write(tiny_mbeir: Path, tmp_path: Path) -> None:
    before = snapshot(tiny_mbeir)
    one_line_error(*jfe(*build_args(tiny_mbeir, tiny_mbeir)), "is not a JFE index", "--overwrite")
    assert snapshot(tiny_mbeir) == before  # the dataset pointed at as --out is whole

    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("keep me")
    one_line_error(*jfe(*build_args(tiny_mbeir, foreign)), "is not a JFE index")
    for builder in ("build-minibeir", "build-pretrain"):  # every command that writes a folder
        one_line_error(*jfe("data", builder, "--out", str(foreign), "--no-progress"), "--overwrite")
    assert (foreign / "todo.txt").read_text() == "keep me"
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    one_line_error(*jfe(*build_args(tiny_mbeir, a_file)), "not a folder")
    assert a_file.read_text() == "x"

    # what may be replaced: nothing, an empty folder, an index; and a foreign folder only when told to
    empty = tmp_path / "empty"
    empty.mkdir()
    assert jfe(*build_args(tiny_mbeir, empty))[0] == 0
    assert jfe(*build_args(tiny_mbeir, empty))[0] == 0  # an index over an index
    assert len(load_index(empty)) == 8
    assert jfe(*build_args(tiny_mbeir, foreign, "--overwrite"))[0] == 0
    assert not (foreign / "todo.txt").exists() and len(load_index(foreign)) == 8
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left behind


def test_1_saving_a_model_or_a_pool_refuses_foreign_targets(tmp_path: Path, tiny_mbeir: Path) -> None:
    model = ToyEncoder()
    with pytest.raises(ConfigError, match="is not a saved model"):
        model.save_pretrained(tiny_mbeir)
    assert (tiny_mbeir / "images").is_dir()
    folder = model.save_pretrained(tmp_path / "m")
    model.save_pretrained(folder)  # its own kind: replaced
    # 9. pool-from-folder --out EXISTING_DIR was a traceback
    one_line_error(*jfe("data", "pool-from-folder", str(tiny_mbeir / "images"), "--out", str(tmp_path)),
                   "is a folder")
    readme = tmp_path / "README.md"
    readme.write_text("# mine\n")
    one_line_error(*jfe("data", "pool-from-folder", str(tiny_mbeir / "images"), "--out", str(readme)),
                   "not a candidate pool")
    assert readme.read_text() == "# mine\n"
    pool = tmp_path / "pool.jsonl"
    for _ in range(2):  # a pool is replaced by a pool
        assert jfe("data", "pool-from-folder", str(tiny_mbeir / "images"), "--out", str(pool),
                   "--no-progress")[0] == 0


# ------------------------------------------------------------------------------------------ 2. code execution
class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 - what a crafted pickle does: call a function on load
        return (Path.touch, (self.marker,))


def _trained_checkpoint(tmp_path: Path, steps: int = 4) -> tuple[dict, Path]:
    from jfe.train import train
    from jfe.train.synthetic import write_synthetic_mbeir

    root = write_synthetic_mbeir(tmp_path / "synth")
    cfg = {"stage": "stage2", "model": "toy-hash", "data": str(root), "output_dir": str(tmp_path / "run"),
           "steps": steps, "batch_size": 8, "lr": 0.05, "warmup_steps": 1, "checkpoint_every": 2, "log_every": 1,
           "keep_checkpoints": 3}
    train(cfg, progress=False)
    return cfg, tmp_path / "run"


def test_2_resume_never_runs_code_from_a_checkpoint(tmp_path: Path) -> None:
    from jfe.train import train
    from jfe.train.trainer import STATE_NAME, read_trainer_state

    assert not [p for p in SRC.rglob("*.py") if "weights_only=False" in p.read_text()]
    cfg, run = _trained_checkpoint(tmp_path)
    newest = sorted((run / "checkpoints").glob("step-*"))[-1]
    marker = tmp_path / "pwned"
    torch.save({"step": 4, "payload": _Exploit(marker)}, newest / STATE_NAME)
    with pytest.raises(ConfigError, match=STATE_NAME):
        read_trainer_state(newest)
    assert not marker.exists()
    # a resume skips the crafted newest checkpoint (warning names it) and goes on from the one before
    (run / "train_done.json").unlink()
    shutil.rmtree(run / "final")
    with pytest.warns(UserWarning, match=str(newest / STATE_NAME)):
        final = train({**cfg, "steps": 6}, resume=True, progress=False)
    assert not marker.exists() and (final / "model.safetensors").is_file()


def test_9_truncated_trainer_state_falls_back_to_the_previous_checkpoint(tmp_path: Path) -> None:
    from jfe.train import train
    from jfe.train.trainer import STATE_NAME

    cfg, run = _trained_checkpoint(tmp_path)
    (run / "train_done.json").unlink()
    shutil.rmtree(run / "final")
    older, newest = sorted((run / "checkpoints").glob("step-*"))[-2:]
    state = newest / STATE_NAME
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    # 7. a killed writer's temporary checkpoint folder (its pid is gone) must not survive the resume
    stale = run / "checkpoints" / ".step-0000006.pid999999999.x1.tmp"
    stale.mkdir()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train({**cfg, "steps": 6}, resume=True, progress=False)
    messages = [str(w.message) for w in caught]
    assert any(str(state) in m and "damaged" in m for m in messages), messages
    assert not stale.exists()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert int(older.name.split("-")[1]) + 1 in steps  # it continued from the older checkpoint


# ------------------------------------------------------------------------------------------ 3, 4, 11. service
@pytest.fixture
def served(tiny_mbeir: Path) -> tuple[ToyEncoder, VectorIndex]:
    model = ToyEncoder()
    return model, build_index(model, [pool_of(tiny_mbeir)], tiny_mbeir, progress=False)


def test_3_instruction_is_limited_and_refused_before_any_encoding(served: tuple) -> None:
    model, index = served
    with TestClient(create_app(model, index, ServeSettings(max_text_chars=1000))) as client:
        long = "x" * 5000
        # 422 on /search, 400 on OpenAI's route (as OpenAI answers)
        for path, body, status in (("/search", {"text": "red", "instruction": long}, 422),
                                   ("/v1/embeddings", {"input": ["red"], "instruction": long}, 400)):
            response = client.post(path, json=body)
            assert response.status_code == status and "instruction" in response.json()["error"]["message"]
        assert client.get("/health").json()["stats"]["items"] == 0  # the model never saw them
        for field in ("model", "user"):
            response = client.post("/v1/embeddings", json={"input": "a", field: "m" * 300})
            assert response.status_code == 400 and response.json()["error"]["param"] == field


async def _drive(app, headers: list[tuple[bytes, bytes]], body_size: int) -> tuple[int, int]:  # noqa: ANN001
    """Send one POST through an ASGI app by hand; returns (status, bytes of the body the app read)."""
    read = 0
    chunk = b"x" * 65536
    sent = {"status": 0}

    async def receive() -> dict:
        nonlocal read
        read += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": read < body_size}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            sent["status"] = message["status"]

    scope = {"type": "http", "method": "POST", "path": "/search", "headers": headers, "query_string": b"",
             "http_version": "1.1", "scheme": "http", "server": ("t", 80), "client": ("c", 1), "root_path": ""}
    await app(scope, receive, send)
    return sent["status"], read


def test_3_unauthenticated_bodies_are_refused_before_they_are_read(served: tuple) -> None:
    import asyncio

    model, index = served
    app = create_app(model, index, ServeSettings(api_key="s3cret"))
    size = 12 * 1024 * 1024
    status, read = asyncio.run(_drive(app, [(b"content-type", b"application/json")], size))
    assert status == 401 and read == 0
    status, read = asyncio.run(_drive(app, [(b"x-api-key", b"wrong"), (b"content-length", str(size).encode())],
                                      size))
    assert status == 401 and read == 0
    with TestClient(app) as client:  # the right key still works, and public pages stay public
        assert client.post("/search", json={"text": "red"}, headers={"X-API-Key": "s3cret"}).status_code == 200
        assert client.get("/health").status_code == 200 and client.get("/openapi.json").status_code == 200
        assert client.get("/instructions").status_code == 401


def test_4_bad_unicode_and_deep_json_are_400_and_the_connection_lives_on(served: tuple) -> None:
    from jfe.serve.server import BackgroundServer
    from test_serve import TokenizedToy  # its tokenizer, like MiniLM's, cannot encode a lone surrogate

    _, index = served
    model = TokenizedToy()
    bad = [('{"text": "\\ud800"}', "/search"), ('{"text": "red", "instruction": "\\udfff x"}', "/search"),
           ('{"input": "a \\ud83d"}', "/v1/embeddings"), ('{"input": [[{"type": "text", "text": "\\ud800"}]]}',
                                                           "/v1/embeddings"),
           ('{"text": ' + "[" * 1000 + "]" * 1000 + "}", "/search"), ("[" * 100_000 + "]" * 100_000, "/search")]
    import http.client

    with BackgroundServer(create_app(model, index, ServeSettings())) as server:
        host, port = server.url.split("//")[1].rstrip("/").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        for body, path in bad:
            conn.request("POST", path, body=body.encode(), headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            payload = json.loads(response.read())
            assert response.status == 400, (body[:40], payload)
            assert payload["error"]["code"] == 400
            # the next request on the same keep-alive connection is answered
            conn.request("POST", "/search", body=b'{"text": "a red square", "k": 2}',
                         headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            assert response.status == 200 and len(json.loads(response.read())["results"]) == 2
        conn.close()


def test_11_documented_status_codes(served: tuple, tiny_mbeir: Path) -> None:
    model, index = served

    with TestClient(create_app(model, index, ServeSettings())) as client:
        empty = client.post("/search", content=b"", headers={"Content-Type": "application/json"})
        assert empty.status_code == 400 and "empty" in empty.json()["error"]["message"]
        png = (tiny_mbeir / "images/tiny/red_square.png").read_bytes()
        two = client.post("/search", data={"text": "x"}, files=[("image", ("a.png", png, "image/png")),
                                                                ("image", ("b.png", png, "image/png"))])
        assert two.status_code == 422 and "one image" in two.json()["error"]["message"]
        assert client.post("/search", json={"text": "red", "k": True}).status_code == 422
        assert client.post("/search", json={"text": "red", "k": "3"}).status_code == 422
        assert client.post("/search", data={"text": "red", "k": "3"}).status_code == 200  # forms send text
    from test_serve import TokenizedToy  # the toy with a tokenizer, as HF models hold one

    with TestClient(create_app(TokenizedToy(), index, ServeSettings())) as client:
        response = client.post("/v1/embeddings", json={"input": [5, -1, 7]})
        message = response.json()["error"]["message"]
        assert response.status_code == 400 and "-1" in message and len(message) < 200


def test_11_serve_warns_on_a_public_address_without_a_key(tiny_mbeir: Path, tmp_path: Path) -> None:
    assert jfe(*build_args(tiny_mbeir, tmp_path / "idx"))[0] == 0
    with mock.patch("uvicorn.run") as run:
        code, output = jfe("serve", "--index", str(tmp_path / "idx"), "--host", "0.0.0.0")
        assert code == 0 and run.called and "without an API key" in output
        # idle connections outlive common clients' own keep-alive expiry (httpx: 5 s = uvicorn's default,
        # which raced: a reused connection was closed under the client, "connection reset")
        assert run.call_args.kwargs["timeout_keep_alive"] == 75
        code, output = jfe("serve", "--index", str(tmp_path / "idx"), "--host", "0.0.0.0", "--api-key", "k")
        assert code == 0 and "without an API key" not in output
        code, output = jfe("serve", "--index", str(tmp_path / "idx"))
        assert code == 0 and "without an API key" not in output  # loopback: nobody else can reach it


# ------------------------------------------------------------------------------------------ 5. partial index
def test_5_a_shard_missing_from_the_manifest_is_an_error_not_a_smaller_index(tiny_mbeir: Path,
                                                                             tmp_path: Path) -> None:
    out = tmp_path / "sharded"
    assert jfe(*build_args(tiny_mbeir, out, "--shards", "2"))[0] == 0
    manifest = json.loads((out / SHARDS_FILE).read_text())
    manifest["shards"] = manifest["shards"][:1]
    (out / SHARDS_FILE).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="says the index holds 8 vectors"):
        load_index(out)
    one_line_error(*jfe("search", "--index", str(out), "--text", "red"), "shard")


# ------------------------------------------------------------------------------------------ 6. stale cache
def test_6_eval_cache_follows_image_content_not_paths(tiny_mbeir: Path, tmp_path: Path) -> None:
    from jfe.eval import evaluate

    model = ToyEncoder()
    first = evaluate(model, tiny_mbeir, split="test", pool="local", out_dir=tmp_path / "eval", progress=False)
    a, b = tiny_mbeir / "images/tiny/red_square.png", tiny_mbeir / "images/tiny/blue_circle.png"
    swap = a.with_suffix(".swap")
    a.rename(swap)
    b.rename(a)
    swap.rename(b)
    again = evaluate(model, tiny_mbeir, split="test", pool="local", out_dir=tmp_path / "eval", progress=False)
    fresh = evaluate(model, tiny_mbeir, split="test", pool="local", out_dir=tmp_path / "fresh", progress=False)
    assert again.rows == fresh.rows
    assert first.rows != fresh.rows  # the swap matters, so the test can tell a stale cache


# ------------------------------------------------------------------------------------------ 7. crash window
def test_7_a_kill_between_the_two_renames_is_recovered(tmp_path: Path) -> None:
    """Where the platform has no atomic exchange, a swap is two renames: killed between them, the old index
    sits at .NAME.old and nothing is at NAME; the next load puts it back."""
    out = tmp_path / "idx"
    old = VectorIndex(4)
    old.add(["1:1"], np.eye(4, dtype=np.float32)[:1])
    old.save(out)
    new = VectorIndex(4)
    new.add(["1:2", "1:3"], np.eye(4, dtype=np.float32)[:2])
    renames = []

    def killed_after_first(src: str, dst: str) -> None:
        renames.append((src, dst))
        if len(renames) == 2:
            raise KeyboardInterrupt("killed")  # the process dies here
        os.replace(src, dst)

    with mock.patch("jfe.paths.exchange", return_value=False), mock.patch("jfe.paths.os.rename", killed_after_first), \
            pytest.raises(KeyboardInterrupt):
        new.save(out)
    from jfe.paths import recover_dir

    assert not out.exists() and (tmp_path / ".idx.old").is_dir()
    assert load_index(out).ids == ["1:1"]  # recovered: the old index
    assert not recover_dir(out)
    new.save(out)
    assert load_index(out).ids == ["1:2", "1:3"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


def test_7_stale_temporaries_of_dead_writers_are_cleaned(tmp_path: Path) -> None:
    out = tmp_path / "idx"
    dead = tmp_path / ".idx.pid999999999.abc.tmp"
    dead.mkdir()
    live = tmp_path / f".idx.pid{os.getppid()}.def.tmp"  # a live process's build in progress
    live.mkdir()
    other = tmp_path / ".other.pid999999999.ghi.tmp"  # another path's: not ours to judge here
    other.mkdir()
    with atomic_dir(out) as tmp:
        (tmp / "x").write_text("1")
    assert not dead.exists() and live.exists() and other.exists()


KILL_SCRIPT = """
import sys, numpy as np
from jfe.index import VectorIndex
out, n = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(n)
i = 0
while True:
    i += 1
    index = VectorIndex(32)
    index.add([f"{n}:{j}" for j in range(2000)], rng.standard_normal((2000, 32)).astype(np.float32))
    index.meta["generation"] = i
    index.save(out)
    print(i, flush=True)
"""


def test_7_kill_9_during_rebuilds_always_leaves_a_loadable_index(tmp_path: Path) -> None:
    """``kill -9`` a loop of index rebuilds at spread-out moments: the folder at --out always loads, as the old
    index or the new one, and the next build cleans what the killed one left."""
    import signal
    import subprocess

    out = tmp_path / "idx"
    seed = VectorIndex(32)
    seed.add(["0:0"], np.ones((1, 32), dtype=np.float32))
    seed.save(out)
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    rng = np.random.default_rng(0)
    kills = mid_write = 0
    for round_ in range(8):
        proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(out), str(round_ + 1)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert proc.stdout is not None
        proc.stdout.readline()  # it has finished one rebuild: now kill it at a random moment of later ones
        import time

        time.sleep(float(rng.uniform(0.0, 0.25)))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        kills += 1
        mid_write += any(p.name.startswith(".idx.") for p in tmp_path.iterdir())
        index = load_index(out)
        assert len(index) in (1, 2000)
        assert len(index) == 1 or index.ids[0].split(":")[0] in {str(r + 1) for r in range(round_ + 1)}
    assert kills == 8
    print(f"{mid_write} of {kills} kills landed inside a write")
    VectorIndex.load(out).save(out)  # the next write cleans every temporary of the dead writers
    assert [p.name for p in tmp_path.iterdir()] == ["idx"]


# ------------------------------------------------------------------------------------------ 8. paths
def test_8_image_paths_outside_the_dataset_are_refused_everywhere(tiny_mbeir: Path, tmp_path: Path) -> None:
    pool = pool_of(tiny_mbeir)
    bad = [Candidate("1:90", None, "../outside.png", "image"), Candidate("1:91", None, "/etc/hostname", "image"),
           Candidate("1:92", "x", "../../../../etc/passwd", "image,text")]
    (tiny_mbeir.parent / "outside.png").write_bytes((tiny_mbeir / "images/tiny/red_square.png").read_bytes())
    write_candidates(pool, [*(Candidate(f"1:{i}", f"t{i}", None, "text") for i in range(1, 3)), *bad])
    problems = [p for p in validate_dataset(tiny_mbeir) if p.kind == "unsafe-path"]
    assert sorted(p.record for p in problems if p.record) == ["1:90", "1:91", "1:92"]
    with mock.patch("jfe.data.images.Image.open", side_effect=AssertionError("opened")):
        one_line_error(*jfe(*build_args(tiny_mbeir, tmp_path / "idx")), f"{pool}:3", "1:90", "leaves the dataset root")
    code, output = jfe("data", "validate", str(tiny_mbeir))
    assert code == 1 and "unsafe-path" in output


# ------------------------------------------------------------------------------------------ 9. tracebacks
@pytest.mark.parametrize("damage", ["list", "latin1", "no-items", "deep"])
def test_9_a_damaged_index_is_one_line_for_search_and_serve(tiny_mbeir: Path, tmp_path: Path, damage: str) -> None:
    out = tmp_path / "idx"
    assert jfe(*build_args(tiny_mbeir, out))[0] == 0
    if damage == "list":
        (out / "meta.json").write_text("[1, 2]")
    elif damage == "latin1":
        (out / "meta.json").write_bytes('{"format": 1, "note": "caf\xe9"}'.encode("latin-1"))
    elif damage == "deep":
        (out / "meta.json").write_text("[" * 100_000 + "]" * 100_000)
    else:
        (out / "items.jsonl").unlink()
    for command in (["search", "--index", str(out), "--text", "red"], ["serve", "--index", str(out)]):
        with mock.patch("uvicorn.run"):
            one_line_error(*jfe(*command), str(out))


@pytest.mark.parametrize("factory", ["IDMap,Flat", "IDMap2,HNSW32", "HNSW0", "IVF0,Flat", "PQ0"])
def test_9_bad_factories_are_refused_before_any_encoding(tiny_mbeir: Path, tmp_path: Path, factory: str) -> None:
    with mock.patch("jfe.models.toy.ToyEncoder.embed", side_effect=AssertionError("encoded")):
        one_line_error(*jfe(*build_args(tiny_mbeir, tmp_path / "idx", "--factory", factory)), factory)


# ------------------------------------------------------------------------------------------ 10. eval vs validate
def _rewrite_queries(root: Path, name: str, change) -> Path:  # noqa: ANN001
    path = root / "query" / "test" / name
    write_queries(path, change(read_queries(path)))
    return path


def test_10_eval_and_build_refuse_what_validate_rejects(tiny_mbeir: Path, tmp_path: Path) -> None:
    model = ToyEncoder()
    from jfe.eval import evaluate

    original = read_queries(tiny_mbeir / "query" / "test" / "mbeir_tiny_task0_test.jsonl")
    path = _rewrite_queries(tiny_mbeir, "mbeir_tiny_task0_test.jsonl", lambda qs: [*qs, qs[0]])
    with pytest.raises(DataError, match="duplicate qid") as info:
        evaluate(model, tiny_mbeir, split="test", pool="local", progress=False)
    assert info.value.path == str(path) and info.value.line == 5
    assert any(p.kind == "duplicate-id" for p in validate_dataset(tiny_mbeir))

    original[1].query_txt = ""
    write_queries(path, original)
    with pytest.raises(DataError, match="query has neither query_txt nor query_img_path") as info:
        evaluate(model, tiny_mbeir, split="test", pool="local", progress=False)
    assert info.value.path == str(path) and info.value.line == 2 and info.value.record_id == "1:102"

    pool = pool_of(tiny_mbeir)
    write_candidates(pool, [Candidate("1:1", "only text", None, "image")])
    one_line_error(*jfe(*build_args(tiny_mbeir, tmp_path / "idx")), f"{pool}:1", "1:1", "'image'")


# ------------------------------------------------------------------------------------------ 11. the rest
def test_11_saved_weights_are_as_readable_as_their_config(tmp_path: Path) -> None:
    folder = ToyEncoder().save_pretrained(tmp_path / "m")
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"], modes


def test_11_the_bomb_message_quotes_jfes_limit(tmp_path: Path) -> None:
    import struct
    import zlib

    from jfe.data.images import MAX_PIXELS, load_image

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 20_000, 20_000, 8, 2, 0, 0, 0)  # 400 MP: past PIL's own 179 MP refusal
    path = tmp_path / "bomb.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    with pytest.raises(DataError) as info:
        load_image(path)
    assert f"{MAX_PIXELS:,}" in str(info.value) and "400,000,000" in str(info.value)
    assert "178956970" not in str(info.value)


def test_11_exact_search_ranks_duplicates_alike_in_batches_and_alone() -> None:
    rng = np.random.default_rng(0)
    base = rng.standard_normal((300, 64)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    vectors = np.concatenate([base] * 4)  # every vector four times: ties everywhere
    index = index_vectors([f"1:{i}" for i in range(len(vectors))], vectors, None, factory="Flat")
    assert index.meta["recall"]["value"] == 1.0
    queries = vectors[:40] + rng.normal(0, 0.01, (40, 64)).astype(np.float32)
    batched, batched_scores = index.search(queries, 10)
    for i in range(40):
        alone, alone_scores = index.search(queries[i:i + 1], 10)
        assert alone[0] == batched[i]
        np.testing.assert_array_equal(alone_scores[0], batched_scores[i])
    # ties follow insertion order: the four copies of a vector come in the order they were added
    first = [int(did.split(":")[1]) for did in batched[0][:4]]
    assert first == sorted(first)


def test_11_every_validate_kind_is_documented() -> None:
    from jfe.data.validate import KINDS

    docs = (Path(__file__).resolve().parents[1] / "docs" / "data.md").read_text()
    assert [kind for kind in KINDS if f"`{kind}`" not in docs] == []
    assert "1:q{i}" not in docs  # the recipe's ids pass validate's uniir-id check


def test_check_out_dir_refuses_symlinks_and_accepts_empty(tmp_path: Path) -> None:
    from jfe.paths import ArtefactKind, check_out_dir

    kind = ArtefactKind("thing", ("thing.json",))
    target = tmp_path / "real"
    target.mkdir()
    (target / "data.bin").write_bytes(b"1")
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(ConfigError, match="not a folder"):
        check_out_dir(link, kind, overwrite=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    check_out_dir(empty, kind)
    check_out_dir(tmp_path / "absent", kind)
    with pytest.raises(ConfigError, match="is not a thing"):
        check_out_dir(target, kind)
    (target / "thing.json").write_text("{}")
    check_out_dir(target, kind)


def test_9_output_paths_that_cannot_be_written_are_one_line(tiny_mbeir: Path, tmp_path: Path) -> None:
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    with mock.patch("jfe.models.toy.ToyEncoder.embed", side_effect=AssertionError("encoded")):
        one_line_error(*jfe("eval", "--model", "toy", "--data", str(tiny_mbeir), "--out", str(a_file),
                            "--no-progress"), "is a file")
        one_line_error(*jfe("encode", "--model", "toy", "--text", "hi", "--out", str(a_file / "v.npy")),
                       "is a file, not a folder")
    assert a_file.read_text() == "x"
    # whatever the file system refuses later (a full disk, a read-only mount) is one line too, not a traceback
    full = OSError(28, "No space left on device", str(tmp_path / "idx"))
    with mock.patch("jfe.indexing.write_index", side_effect=full):
        one_line_error(*jfe(*build_args(tiny_mbeir, tmp_path / "idx")), "No space left on device", "idx")


def test_eval_says_when_it_runs_without_the_instructions_validate_requires(tiny_mbeir: Path, tmp_path: Path) -> None:
    (tiny_mbeir / "instructions" / "query_instructions.tsv").unlink()
    assert any(p.kind == "layout" for p in validate_dataset(tiny_mbeir))  # validate refuses such a folder
    code, output = jfe("eval", "--model", "toy", "--data", str(tiny_mbeir), "--no-progress")
    assert code == 0 and "note: No instructions file" in output  # eval runs, and says so out loud
