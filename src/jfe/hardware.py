"""What this machine can compute fast: CPU flags, native bf16 (CPU or CUDA), and the facts every published
figure names.

The lowest layer of the package: the model side (:mod:`jfe.models.precision`, autocast) and the index side
(:mod:`jfe.index.exact`, the bf16 scan) both ask here, so "does this CPU multiply bf16 natively" has one
answer. ``torch`` is imported only where a question needs it, so the index can ask without loading it.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

from jfe.errors import ConfigError

# the precisions users name (--precision, `precision` config keys); "auto" resolves per device
Precision = Literal["auto", "fp32", "bf16"]
ComputePrecision = Literal["fp32", "bf16"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")

# /proc/cpuinfo flags meaning "this CPU multiplies bf16 natively" (AMX tiles, or AVX512 dot products). Without
# them PyTorch emulates bf16 through fp32 conversions: the same numbers, but slower than plain fp32.
BF16_CPU_FLAGS: tuple[str, ...] = ("amx_bf16", "avx512_bf16")
# flags worth naming next to any published figure
REPORTED_CPU_FLAGS: tuple[str, ...] = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16",
                                       "amx_int8")


def check_precision(precision: str) -> Precision:
    """``precision`` itself when it is one of ``auto``/``fp32``/``bf16`` (case-insensitive), else a ConfigError.

    One check for the encoders, training and the exact index, so every ``--precision`` accepts the same
    spellings and fails with the same message.
    """
    value = str(precision).strip().lower()
    if value not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    return cast(Precision, value)


def parse_cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The ``flags`` of the first processor in a ``/proc/cpuinfo`` text (every core has the same set)."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):  # x86 / ARM spelling
            return frozenset(value.split())
    return frozenset()


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """This machine's CPU flags (empty where ``/proc/cpuinfo`` does not exist, e.g. macOS)."""
    return parse_cpu_flags(_cpuinfo())


def cpu_model_name() -> str:
    for line in _cpuinfo().splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "model name":
            return value.strip()
    return platform.processor() or platform.machine()


def cpu_bf16_flags(flags: frozenset[str] | None = None) -> list[str]:
    """Which of :data:`BF16_CPU_FLAGS` the CPU has (empty: bf16 would be emulated)."""
    flags = cpu_flags() if flags is None else flags
    found = [flag for flag in BF16_CPU_FLAGS if flag in flags]
    if not found and not flags:
        # no /proc/cpuinfo: ask PyTorch's own cpuinfo (private helpers, so guarded)
        if _torch_cpu_check("_is_amx_tile_supported"):
            found.append("amx_bf16")
        if _torch_cpu_check("_is_avx512_bf16_supported"):
            found.append("avx512_bf16")
    return found


def _torch_cpu_check(name: str) -> bool:
    try:
        import torch

        check = getattr(torch.cpu, name, None)
        return bool(check()) if callable(check) else False
    except (ImportError, RuntimeError):
        return False


@dataclass(frozen=True)
class Bf16Support:
    """Whether ``device_type`` computes bf16 natively, and why we think so."""

    device_type: str
    native: bool
    detail: str


def bf16_support(device: object = "cpu") -> Bf16Support:
    """Run-time bf16 detection: CPU flags for ``cpu``, ``torch.cuda.is_bf16_supported()`` for ``cuda``.

    ``device`` is a ``torch.device`` or its name (``"cpu"``, ``"cuda:0"``).
    """
    device_type = str(getattr(device, "type", device)).split(":")[0]
    if device_type == "cuda":
        import torch

        native = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        return Bf16Support("cuda", native, "torch.cuda.is_bf16_supported()" if native else "no bf16 on this GPU")
    if device_type == "cpu":
        found = cpu_bf16_flags()
        capability = _torch_cpu_capability()
        if found:
            return Bf16Support("cpu", True, f"CPU flags {' '.join(found)} (torch capability {capability})")
        return Bf16Support("cpu", False, f"no {'/'.join(BF16_CPU_FLAGS)} CPU flag (torch capability {capability})")
    return Bf16Support(device_type, False, f"bf16 detection is not implemented for {device_type!r}")


def _torch_cpu_capability() -> str:
    try:
        import torch

        return str(torch.backends.cpu.get_cpu_capability())
    except (ImportError, AttributeError):
        return "unknown"


# glibc's malloc serves a request above its mmap threshold (adaptive, at most 32 MB by default) with a fresh
# mmap() and unmaps it on free, so every batch page-faults its large activations in again: one 1x1 convolution
# of MobileNetV2 over 8 images (a 38 MB output) took 11 ms that way and 3 ms into reused memory (docs/models.md).
# Above these thresholds, freed blocks stay in the heap and the next batch reuses them.
MALLOC_MMAP_THRESHOLD = 256 << 20
MALLOC_TRIM_THRESHOLD = 512 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt() parameter numbers, from glibc's malloc.h
_allocator_state = {"tuned": False}


def tune_allocator() -> bool:
    """Let glibc reuse freed large blocks instead of mapping fresh pages for each batch; True if applied.

    The ``jfe`` command calls it at start; Python users may call it once in a long-running encode, train or
    serve process. It changes this process's malloc settings only. A no-op (False) off glibc Linux, or when
    ``JFE_MALLOC_TUNE=0``. The price: the process keeps up to ``MALLOC_TRIM_THRESHOLD`` of freed memory
    mapped instead of returning it to the system at once.
    """
    if os.environ.get("JFE_MALLOC_TUNE", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if _allocator_state["tuned"]:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    # older glibc refuses a threshold above 32 MB (HEAP_MAX_SIZE / 2): take 32 MB there
    if not (libc.mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD) or libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)):
        return False
    libc.mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD)
    _allocator_state["tuned"] = True
    return True


def allocator_tuned() -> bool:
    """Whether :func:`tune_allocator` changed this process's malloc settings."""
    return _allocator_state["tuned"]


def runtime_versions() -> dict[str, str | None]:
    """The installed inference runtimes besides torch (None: not installed): the ``--backend`` choices this machine
    has, and what every ONNX Runtime / OpenVINO figure must name."""
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for package in ("onnxruntime", "openvino"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def machine_summary() -> dict[str, object]:
    """The machine facts every published speed figure names: CPU model, its flags, torch's view of it."""
    import torch

    flags = cpu_flags()
    return {"cpu": cpu_model_name(), "cpu_count": os.cpu_count(),
            "cpu_flags": [flag for flag in REPORTED_CPU_FLAGS if flag in flags],
            "cpu_flags_absent": [flag for flag in REPORTED_CPU_FLAGS if flag not in flags],
            "torch_cpu_capability": _torch_cpu_capability(),
            "bf16_native_cpu": bool(cpu_bf16_flags()), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
            "malloc_tuned": allocator_tuned()}
