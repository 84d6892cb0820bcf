"""Frozen vision features cached by image *content*, shared by every model with the same vision tower.

MobileNetV2 is the slowest part of every model here on CPU, and it is frozen (or, when its top modules
are trained, frozen below them), so the frozen part's output for an image never changes. Feature maps
are keyed by ``sha1(image content)`` plus the tower's cache key (weights
fingerprint, image size, preprocessing version, storage dtype) and kept

* in memory: one process-wide LRU bounded in bytes (all models share it, the baselines too), and
* optionally on disk under ``cache_dir()/features/<tower key>/<aa>/<sha1>.npy`` (written to a temporary
  name and renamed, so a crash never leaves a half file that looks whole; unreadable files count as misses).

Settings come from :func:`configure` or the environment: ``JFE_FEATURE_CACHE`` = ``memory`` (default),
``disk`` (memory + disk) or ``off``; ``JFE_FEATURE_CACHE_MB`` (default 1024); ``JFE_FEATURE_CACHE_DTYPE`` =
``float16`` (default, half the memory) or ``float32``. With the cache on, features are rounded to the storage
dtype every time (computed or cached alike), so a vector never depends on whether its image was a hit.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from jfe.data.images import content_digest, forget_digests, load_image
from jfe.data.items import ImageLike
from jfe.errors import ConfigError
from jfe.hardware import ComputePrecision
from jfe.models.vision import FeatureTower
from jfe.paths import cache_dir

_DTYPES = {"float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class CacheSettings:
    """How features are cached. ``mode``: ``"off"``, ``"memory"`` or ``"disk"`` (memory + disk)."""

    mode: str = "memory"
    memory_mb: float = 1024.0
    dtype: str = "float16"
    directory: Path | None = None  # default: cache_dir()/features

    def __post_init__(self) -> None:
        if self.mode not in ("off", "memory", "disk"):
            raise ConfigError(f"feature cache mode must be 'off', 'memory' or 'disk', not {self.mode!r}")
        if self.dtype not in _DTYPES:
            raise ConfigError(f"feature cache dtype must be one of {sorted(_DTYPES)}, not {self.dtype!r}")
        if self.memory_mb < 0:
            raise ConfigError("feature cache memory_mb must be >= 0")

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    def disk_root(self) -> Path:
        return Path(self.directory) if self.directory is not None else cache_dir() / "features"


def _from_env() -> CacheSettings:
    try:
        return CacheSettings(mode=os.environ.get("JFE_FEATURE_CACHE", "memory").strip().lower(),
                             memory_mb=float(os.environ.get("JFE_FEATURE_CACHE_MB", "1024")),
                             dtype=os.environ.get("JFE_FEATURE_CACHE_DTYPE", "float16").strip().lower())
    except ValueError as exc:
        raise ConfigError(f"bad JFE_FEATURE_CACHE_* environment variable: {exc}") from None


@dataclass
class CacheStats:
    hits: int = 0
    disk_hits: int = 0
    misses: int = 0
    evictions: int = 0
    entries: int = 0
    bytes: int = 0


@dataclass
class _Store:
    """The process-wide LRU: ``(tower key, content sha1) -> CPU tensor``."""

    entries: OrderedDict[tuple[str, str], torch.Tensor] = field(default_factory=OrderedDict)
    nbytes: int = 0
    stats: CacheStats = field(default_factory=CacheStats)
    lock: threading.Lock = field(default_factory=threading.Lock)


_settings: CacheSettings | None = None
_store = _Store()


def settings() -> CacheSettings:
    """The settings in force (read from the environment on first use)."""
    global _settings
    if _settings is None:
        _settings = _from_env()
    return _settings


def configure(mode: str | None = None, memory_mb: float | None = None, dtype: str | None = None,
              directory: str | os.PathLike | None = None) -> CacheSettings:
    """Change the cache settings for this process (unspecified fields keep their value)."""
    global _settings
    current = settings()
    changes: dict[str, Any] = {k: v for k, v in {"mode": mode, "memory_mb": memory_mb, "dtype": dtype,
                                 "directory": Path(directory) if directory is not None else None}.items()
               if v is not None}
    _settings = replace(current, **changes)
    _evict(int(_settings.memory_mb * 2**20))
    return _settings


@contextlib.contextmanager
def overridden(**changes: object) -> Iterator[CacheSettings]:
    """Temporarily change the settings (``mode``, ``memory_mb``, ``dtype``, ``directory``); restored on exit."""
    global _settings
    previous = settings()
    try:
        yield configure(**changes)  # type: ignore[arg-type]
    finally:
        _settings = previous


def disabled() -> contextlib.AbstractContextManager[CacheSettings]:
    """Temporarily turn the cache off (cold measurements)."""
    return overridden(mode="off")


def clear(memory: bool = True, disk: bool = False) -> None:
    """Drop cached features (from memory, and optionally the disk folder)."""
    with _store.lock:
        if memory:
            _store.entries.clear()
            _store.nbytes = 0
            _store.stats = CacheStats()
            forget_digests()
    if disk:
        import shutil

        shutil.rmtree(settings().disk_root(), ignore_errors=True)


def stats() -> CacheStats:
    with _store.lock:
        return replace(_store.stats, entries=len(_store.entries), bytes=_store.nbytes)


def _evict(budget: int) -> None:
    with _store.lock:
        while _store.entries and _store.nbytes > budget:
            _, tensor = _store.entries.popitem(last=False)
            _store.nbytes -= tensor.numel() * tensor.element_size()
            _store.stats.evictions += 1


def _disk_path(root: Path, key: str, sha: str) -> Path:
    return root / key / sha[:2] / f"{sha}.npy"


def _disk_get(path: Path, dtype: torch.dtype) -> torch.Tensor | None:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None  # missing or damaged: recompute (and overwrite)
    tensor = torch.from_numpy(array)
    return tensor if tensor.dtype == dtype else None


def _disk_put(path: Path, tensor: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            np.save(handle, tensor.numpy(), allow_pickle=False)
        os.replace(tmp, path)
    except OSError:  # a full disk must not stop training: the feature stays in memory
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _memory_put(entry_key: tuple[str, str], tensor: torch.Tensor, budget: int) -> None:
    size = tensor.numel() * tensor.element_size()
    if size > budget:
        return
    with _store.lock:
        if entry_key in _store.entries:
            return
        _store.entries[entry_key] = tensor
        _store.nbytes += size
    _evict(budget)


# MobileNetV2 runs fastest on CPU in small batches: activations stay in cache and, below glibc's mmap threshold
# (at most 32 MB unless jfe.hardware.tune_allocator raised it), freed activation memory is reused instead of
# page-faulted in again for each batch. Its largest activation is 96 channels at half the input side: 4.8 MB
# per 224-px image. benchmarks/allocator.py, 2-core EPYC, 64 images at 224 px, glibc's default: 0.31-0.34 s in
# chunks of 6, 0.39-0.42 s of 8, 0.68-0.72 s as one batch.
_CPU_ACTIVATION_BUDGET = 30 << 20
_LARGEST_ACTIVATION_CHANNELS = 96


def vision_chunk(image_size: int, device_type: str = "cpu") -> int:
    """Images per MobileNetV2 call: on CPU as many as keep its largest activation under 30 MB (6 at 224 px,
    20 at 128 px); elsewhere 64."""
    if device_type != "cpu":
        return 64
    half = (image_size + 1) // 2
    per_image = _LARGEST_ACTIVATION_CHANNELS * half * half * 4
    return max(1, min(32, _CPU_ACTIVATION_BUDGET // per_image))


def _decode(tower: FeatureTower, images: Sequence[ImageLike], ids: Sequence[str | None]) -> list[Image.Image]:
    """Decoded RGB images, large JPEGs at a reduced scale no smaller than the tower's input."""
    return [load_image(image, item_id=item_id, min_side=tower.image_size)
            for image, item_id in zip(images, ids, strict=True)]


def feature_maps(tower: FeatureTower, images: Sequence[ImageLike], ids: Sequence[str | None] | None = None,
                 batch_size: int | None = None, compute: ComputePrecision = "fp32") -> torch.Tensor:
    """Last feature maps ``[n, 1280, h, w]`` (float32, on the tower's device) for ``images``.

    The tower's frozen part (all of it, or the trunk below a trained top) goes through the cache: duplicates
    in ``images`` are computed once, hits skip decoding entirely, misses are decoded and run through the
    tower in batches. A trained top then runs on the cached maps with autograd; a wholly trainable tower is
    never cached. Unreadable images raise :class:`DataError` naming the item and file.
    """
    ids = list(ids) if ids is not None else [None] * len(images)
    device = tower.device
    batch_size = batch_size or tower.chunk or vision_chunk(tower.image_size, device.type)
    conf = settings()
    # The vision tower computes in ``compute``, float32 unless the encode asked it to follow a bf16 encode
    # (bf16 through MobileNetV2 moves embeddings below the 0.999 parity, docs/benchmarks.md), whatever autocast
    # the caller runs in; bf16 features are cached under a key of their own, so the two never mix.
    with torch.autocast(device.type, enabled=False):
        if not tower.cacheable:
            pil = _decode(tower, images, ids)
            if not pil:
                return torch.empty(0, device=device)
            with _tower_autocast(device, compute):
                return tower.features_of(pil).float()
        maps = _frozen_feature_maps(tower, images, ids, conf, device, batch_size, compute)
        if not len(maps):
            return maps
        with _tower_autocast(device, compute):
            return tower.trained_part(maps).float()


def _tower_autocast(device: torch.device, compute: str) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast around the tower itself when it follows a bf16 encode; otherwise nothing (fp32)."""
    if compute == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _frozen_feature_maps(tower: FeatureTower, images: Sequence[ImageLike], ids: list[str | None],
                         conf: CacheSettings, device: torch.device, batch_size: int,
                         compute: str = "fp32") -> torch.Tensor:
    if not conf.enabled:
        pil = _decode(tower, images, ids)
        with _tower_autocast(device, compute):
            out = [tower.frozen_part_of(pil[i:i + batch_size]).float() for i in range(0, len(pil), batch_size)]
        return torch.cat(out) if out else torch.empty(0, device=device)

    # fp32 keys stay as they were (existing disk caches remain valid); bf16-computed features get their own
    key = tower.cache_key(conf.torch_dtype) + ("" if compute == "fp32" else f"-c{compute}")
    budget = int(conf.memory_mb * 2**20)
    disk_root = conf.disk_root() if conf.mode == "disk" else None
    digests = [content_digest(image, item_id) for image, item_id in zip(images, ids, strict=True)]
    found: dict[str, torch.Tensor] = {}
    missing: dict[str, int] = {}  # sha -> first index needing it
    with _store.lock:
        for i, sha in enumerate(digests):
            if sha in found or sha in missing:
                continue
            tensor = _store.entries.get((key, sha))
            if tensor is not None:
                _store.entries.move_to_end((key, sha))
                _store.stats.hits += 1
                found[sha] = tensor
            else:
                missing[sha] = i
    if disk_root is not None:
        for sha in list(missing):
            tensor = _disk_get(_disk_path(disk_root, key, sha), conf.torch_dtype)
            if tensor is not None:
                found[sha] = tensor
                del missing[sha]
                _store.stats.disk_hits += 1
                _memory_put((key, sha), tensor, budget)
    todo = list(missing.items())
    _store.stats.misses += len(todo)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        pil = _decode(tower, [images[i] for _, i in chunk], [ids[i] for _, i in chunk])
        with _tower_autocast(device, compute):
            computed = tower.frozen_part_of(pil)
        computed = computed.to("cpu", conf.torch_dtype)
        for (sha, _), tensor in zip(chunk, computed, strict=True):
            tensor = tensor.clone()  # detach from the batch's storage, so eviction frees memory
            found[sha] = tensor
            _memory_put((key, sha), tensor, budget)
            if disk_root is not None:
                _disk_put(_disk_path(disk_root, key, sha), tensor)
    if not digests:
        return torch.empty(0, device=device)
    return torch.stack([found[sha] for sha in digests]).to(device=device, dtype=torch.float32)
