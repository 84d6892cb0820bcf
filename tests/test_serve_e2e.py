"""End to end: `jfe serve` as a real process on a free loopback port, queried over HTTP."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from jfe.data.items import Item
from jfe.index import VectorIndex
from jfe.indexing import build_index
from jfe.models.toy import ToyEncoder
from jfe.serve.server import BackgroundServer, free_port

CLI = "from jfe.cli import main; main()"


@pytest.fixture
def saved_index(tiny_mbeir: Path, tmp_path: Path) -> Path:
    pools = sorted((tiny_mbeir / "cand_pool" / "global").glob("*.jsonl"))
    index = build_index(ToyEncoder(), pools, tiny_mbeir, progress=False)
    assert index.meta["model"] == "toy-hash"  # what `jfe serve` reloads the model by
    return index.save(tmp_path / "index")


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"jfe serve exited with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
        try:
            return httpx.get(f"{url}/health", timeout=1).json()
        except httpx.HTTPError:
            time.sleep(0.2)
    raise AssertionError("jfe serve did not become healthy")


def test_cli_server_answers_text_image_and_image_text_queries(saved_index: Path, tiny_mbeir: Path) -> None:
    port = free_port()
    env = {**os.environ, "JFE_API_KEY": "k3y"}
    proc = subprocess.Popen([sys.executable, "-c", CLI, "serve", "--index", str(saved_index), "--port", str(port),
                             "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        health = wait_healthy(url, proc)
        assert health["index_size"] == 8 and health["model"] == "toy-hash" and health["auth"] is True
        key = {"X-API-Key": "k3y"}
        model, index = ToyEncoder(), VectorIndex.load(saved_index)
        raw = (tiny_mbeir / "images/tiny/blue_square.png").read_bytes()

        text = httpx.post(f"{url}/search", json={"text": "A red circle", "k": 3}, headers=key).json()
        assert text["query_modality"] == "text" and text["results"][0]["text"] == "A red circle"

        image = httpx.post(f"{url}/search", files={"image": ("q.png", raw, "image/png")}, data={"k": "3"},
                           headers=key).json()
        assert image["query_modality"] == "image" and image["results"][0]["did"] == "1:2"

        both = httpx.post(f"{url}/search", headers=key, json={
            "text": "make it a circle", "k": 4, "image": "data:image/png;base64," + base64.b64encode(raw).decode()})
        assert both.json()["query_modality"] == "image,text"
        want, _ = index.search(model.encode([Item(text="make it a circle", image=raw)]), 4)
        assert [h["did"] for h in both.json()["results"]] == want[0]

        thumb = httpx.get(f"{url}{image['results'][0]['image_url']}", headers=key)
        assert thumb.status_code == 200 and thumb.content == raw
        assert httpx.post(f"{url}/search", json={"text": "x"}).status_code == 401
        page = httpx.get(f"{url}/")
        assert page.status_code == 200 and "JFE search" in page.text

        emb = httpx.post(f"{url}/v1/embeddings", json={"input": ["A red circle"]}, headers=key).json()
        np.testing.assert_allclose(emb["data"][0]["embedding"], model.encode(["A red circle"])[0], atol=1e-6)
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_cli_demo_serves_the_sample_dataset(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "JFE_CACHE": str(tmp_path / "cache")}
    env.pop("JFE_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-c", CLI, "serve", "--demo", "--port", str(port), "--no-batching",
                             "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        health = wait_healthy(url, proc)
        assert health["index_size"] == 72 and health["batching"] is False
        hits = httpx.post(f"{url}/search", json={"text": "a purple diamond", "k": 1}).json()["results"]
        assert hits[0]["text"] == "a purple diamond"
        assert len(httpx.get(f"{url}/instructions").json()["instructions"]) == 4
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert (tmp_path / "cache" / "serve-demo" / "cand_pool").is_dir()


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-c", CLI, "serve", "--index", str(tmp_path / "missing")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "error:" in result.stderr and "Traceback" not in result.stderr


def test_background_server_thread(tiny_mbeir: Path) -> None:
    from jfe.serve.app import create_app

    pools = sorted((tiny_mbeir / "cand_pool" / "global").glob("*.jsonl"))
    model = ToyEncoder()
    app = create_app(model, build_index(model, pools, tiny_mbeir, progress=False))
    with BackgroundServer(app) as server:
        assert httpx.get(f"{server.url}/health").json()["index_size"] == 8
        hits = httpx.post(f"{server.url}/search", json={"text": "A blue square", "k": 2}).json()["results"]
        assert hits[0]["text"] == "A blue square"
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/health", timeout=1)
