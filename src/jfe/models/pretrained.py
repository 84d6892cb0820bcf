"""The pretrained table, open_clip style: a model name resolves to trained weights and the config they were
trained with.

A trained entry is a folder ``<root>/<name>/`` holding a saved model (``config.json`` +
``model.safetensors``, as ``save_pretrained`` writes it) and ``pretrained.json``: the name, a tag saying
where it came from (``demo``, ``reproduce``, ...), the sha256 of the weights file, the folder it was
registered from and, when known, the training configs of its stages. Two roots are searched, first match
wins:

1. ``$JFE_PRETRAINED`` (default ``$JFE_CACHE/pretrained``): what ``make demo`` / ``make reproduce`` or
   ``jfe models register NAME FOLDER`` wrote;
2. ``jfe/models/weights/`` inside the package: the shipped weights (tag ``shipped``), compact checkpoints
   (:mod:`jfe.models.compact`: what training changed in the pretrained towers, a few MB) that
   ``jfe ship-weights`` trained, measured and installed; they load on the towers of the verified asset cache.

A name without an entry still loads (``load_model`` builds it on the pretrained towers with untrained glue),
but says so with an :class:`UntrainedModelWarning`: such a model ranks near chance. Test encoders registered
with ``needs_training=False`` (``toy``, ``toy-hash``) load silently: they have nothing to learn.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from jfe.errors import ConfigError
from jfe.paths import atomic_dir, cache_dir

META_NAME = "pretrained.json"
CONFIG_NAME = "config.json"  # the same names as jfe.models.base, kept here so this module stays torch-free
WEIGHTS_NAME = "model.safetensors"
PACKAGE_ROOT = Path(__file__).parent / "weights"


class UntrainedModelWarning(UserWarning):
    """A registered name of a learnt architecture was loaded without trained weights: its glue (projector,
    heads) is random. Never emitted for test encoders (``toy``/``toy-hash``), which have nothing to train."""


@dataclass(frozen=True)
class PretrainedEntry:
    """One trained entry of the table."""

    name: str
    tag: str
    folder: Path  # the saved model (config.json + model.safetensors + pretrained.json)
    sha256: str  # of model.safetensors
    source: str = ""  # the folder it was registered from
    registered: str = ""  # ISO time
    trained_with: dict[str, Any] = field(default_factory=dict)  # stage -> training config, when known
    shipped: bool = False  # inside the package rather than the cache
    scores: dict[str, Any] = field(default_factory=dict)  # measured retrieval scores, when recorded

    def describe(self) -> str:
        return f"{self.tag} ({'package' if self.shipped else self.folder})"


def pretrained_root() -> Path:
    """Where registered weights live: ``$JFE_PRETRAINED`` if set, else ``$JFE_CACHE/pretrained``."""
    explicit = os.environ.get("JFE_PRETRAINED")
    return Path(explicit).expanduser() if explicit else cache_dir() / "pretrained"


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _read_entry(folder: Path, shipped: bool) -> PretrainedEntry | None:
    meta_path = folder / META_NAME
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        return PretrainedEntry(name=meta["name"], tag=meta.get("tag", ""), folder=folder, sha256=meta["sha256"],
                               source=meta.get("source", ""), registered=meta.get("registered", ""),
                               trained_with=meta.get("trained_with", {}), shipped=shipped,
                               scores=meta.get("scores", {}))
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ConfigError(f"{meta_path}: damaged pretrained entry ({exc}); re-register it with "
                          f"`jfe models register`") from None


def find_pretrained(name: str) -> PretrainedEntry | None:
    """The trained entry for ``name`` (the cache first, then the package), or None."""
    for root, shipped in ((pretrained_root(), False), (PACKAGE_ROOT, True)):
        entry = _read_entry(root / name, shipped)
        if entry is not None:
            return entry
    return None


def list_pretrained() -> dict[str, PretrainedEntry]:
    """Every trained entry by name (cache entries hide package entries of the same name)."""
    found: dict[str, PretrainedEntry] = {}
    for root, shipped in ((pretrained_root(), False), (PACKAGE_ROOT, True)):
        if not root.is_dir():
            continue
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            entry = _read_entry(folder, shipped)
            if entry is not None and entry.name not in found:
                found[entry.name] = entry
    return found


_VERIFIED: dict[tuple[str, int, int], str] = {}


def verified_folder(entry: PretrainedEntry) -> Path:
    """The entry's model folder, after checking its weights against the recorded sha256."""
    weights = entry.folder / WEIGHTS_NAME
    if not weights.is_file():
        raise ConfigError(f"pretrained {entry.name!r}: {weights} is missing; re-register it with "
                          f"`jfe models register {entry.name} FOLDER`")
    stat = weights.stat()
    key = (str(weights.resolve()), stat.st_mtime_ns, stat.st_size)
    # verified once per process while the file is unchanged: a 100 MB hash on every load_model call cost more
    # than building the model (the file is read again by the load itself)
    actual = _VERIFIED.get(key) or sha256_of(weights)
    if actual != entry.sha256:
        raise ConfigError(f"pretrained {entry.name!r}: {weights} has sha256 {actual[:12]}..., the table records "
                          f"{entry.sha256[:12]}...: the file changed or is damaged; re-register it")
    _VERIFIED[key] = actual
    return entry.folder


def _training_configs(folder: Path) -> dict[str, Any]:
    """The training configs next to a ``final/`` model as ``train`` writes them (``<run>/<stage>/
    train_config.json``), or the one of the run the folder belongs to."""
    found: dict[str, Any] = {}
    for candidate in (folder.parent / "train_config.json", *sorted(folder.parent.glob("*/train_config.json"))):
        if candidate.is_file():
            try:
                config = json.loads(candidate.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                continue
            found[str(config.get("stage") or candidate.parent.name)] = config
    return found


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link where possible (same disk, no copy of ~100 MB); the writers replace files by renaming,
    so a later write to ``src`` never changes ``dst``. A copy otherwise."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def register_pretrained(name: str, folder: str | os.PathLike, tag: str = "local",
                        trained_with: dict[str, Any] | None = None, known_names: dict[str, str] | None = None,
                        root: Path | None = None, scores: dict[str, Any] | None = None,
                        source: str | None = None) -> PretrainedEntry:
    """Record ``folder`` (a ``save_pretrained`` model) as the trained weights of ``name``.

    The model is linked or copied into ``<root>/<name>/`` (``root`` default :func:`pretrained_root`; the
    package's :data:`PACKAGE_ROOT` for shipped weights), replacing an older entry as a whole, with its sha256,
    the training configs found beside it (or ``trained_with``), ``scores`` when measured, and ``source`` (default
    the folder's absolute path). ``known_names`` (name -> arch) is checked when given: the name must be
    registered and the saved model of the same architecture.
    """
    src = Path(folder)
    config_path = src / CONFIG_NAME
    weights = src / WEIGHTS_NAME
    if not config_path.is_file() or not weights.is_file():
        raise ConfigError(f"{src} is not a saved JFE model (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        arch = json.loads(config_path.read_text(encoding="utf-8")).get("arch")
    except (OSError, json.JSONDecodeError, AttributeError) as exc:
        raise ConfigError(f"{config_path}: cannot read the model config ({exc})") from None
    if known_names is not None:
        if name not in known_names:
            raise ConfigError(f"unknown model name {name!r}; registered names: {', '.join(known_names)}")
        if arch != known_names[name]:
            raise ConfigError(f"{src} holds a {arch!r} model, but {name!r} is a {known_names[name]!r}")
    meta = {"name": name, "tag": tag, "arch": arch, "sha256": sha256_of(weights),
            "source": source if source is not None else str(src.resolve()),
            "registered": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "trained_with": trained_with if trained_with is not None else _training_configs(src),
            **({"scores": scores} if scores else {})}
    root = pretrained_root() if root is None else root
    target = root / name
    with atomic_dir(target) as tmp:
        for item in src.iterdir():
            if item.is_file() and item.name != META_NAME:
                _link_or_copy(item, tmp / item.name)
            elif item.is_dir():
                shutil.copytree(item, tmp / item.name)
        (tmp / META_NAME).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    entry = _read_entry(target, shipped=root.resolve() == PACKAGE_ROOT.resolve())
    assert entry is not None  # just written
    return entry


def unregister_pretrained(name: str) -> bool:
    """Remove ``name``'s cache entry; True if there was one (package entries cannot be removed)."""
    target = pretrained_root() / name
    if not (target / META_NAME).is_file():
        return False
    shutil.rmtree(target)
    return True


def warn_untrained(name: str, stacklevel: int = 3) -> None:
    """Say loudly that ``name`` has no trained weights."""
    warnings.warn(f"model {name!r} has no trained weights (see `jfe models list`): its glue (projector / "
                  f"heads) is random and it ranks near chance. Train it (`make demo` registers the demo's "
                  f"models) or register a trained folder with `jfe models register {name} FOLDER`.",
                  UntrainedModelWarning, stacklevel=stacklevel)


def table(known: dict[str, str]) -> list[dict[str, Any]]:
    """One row per registered name (name -> arch): trained or not, and from which tag and folder."""
    entries = list_pretrained()
    rows = []
    for name, arch in known.items():
        entry = entries.get(name)
        rows.append({"name": name, "arch": arch, "trained": entry is not None,
                     "tag": entry.tag if entry else None,
                     "folder": str(entry.folder) if entry else None,
                     "shipped": entry.shipped if entry else False,
                     "sha256": entry.sha256 if entry else None,
                     "scores": entry.scores if entry else {}})
    return rows


def entry_json(entry: PretrainedEntry) -> dict[str, Any]:
    out = asdict(entry)
    out["folder"] = str(entry.folder)
    return out
