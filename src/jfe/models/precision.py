"""Compute precision for encoding and training: ``"auto" | "fp32" | "bf16"``.

bf16 is worth it only where the hardware multiplies in bf16: CPUs with AMX-BF16 or AVX512-BF16 (Intel
Sapphire Rapids and later, AMD Zen 4 and later) and CUDA GPUs that report ``torch.cuda.is_bf16_supported()``.
Elsewhere PyTorch emulates bf16 matmuls through fp32 conversions, which gives the same numbers but is
*slower* than plain fp32, so

* ``"auto"`` picks bf16 where the hardware has it and fp32 everywhere else (``JFE_PRECISION=fp32`` or ``bf16``
  in the environment overrides that choice);
* ``"fp32"`` never uses bf16;
* ``"bf16"`` always does; on hardware without native bf16 it still works (emulated) and logs a warning
  that it will be slower than fp32.

bf16 is applied as ``torch.autocast(device_type, dtype=torch.bfloat16)`` around the forward pass: weights stay
fp32 (so training updates and checkpoints are fp32), matmuls and convolutions run in bf16. Encoders return
float32 L2-normalised vectors whatever the compute precision, and loss/temperature math stays fp32.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import platform
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

import torch

from jfe.errors import ConfigError

Precision = Literal["auto", "fp32", "bf16"]
ComputePrecision = Literal["fp32", "bf16"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")
# /proc/cpuinfo flags meaning "this CPU multiplies bf16 natively" (AMX tiles, or AVX512 dot products)
BF16_CPU_FLAGS: tuple[str, ...] = ("amx_bf16", "avx512_bf16")
# flags worth naming next to any published figure
REPORTED_CPU_FLAGS: tuple[str, ...] = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16",
                                       "amx_int8")

logger = logging.getLogger(__name__)
_warned: set[str] = set()


def check_precision(precision: str) -> Precision:
    """``precision`` itself when it is one of ``auto``/``fp32``/``bf16`` (case-insensitive), else a ConfigError."""
    value = str(precision).strip().lower()
    if value not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    return cast(Precision, value)


# --- detection ---------------------------------------------------------------------------------------
def parse_cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The ``flags`` of the first processor in a ``/proc/cpuinfo`` text (every core has the same set)."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):  # x86 / ARM spelling
            return frozenset(value.split())
    return frozenset()


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """This machine's CPU flags (empty where ``/proc/cpuinfo`` does not exist, e.g. macOS)."""
    try:
        return parse_cpu_flags(Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return frozenset()


def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() == "model name":
                return value.strip()
    except OSError:
        pass
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
    check = getattr(torch.cpu, name, None)
    try:
        return bool(check()) if callable(check) else False
    except RuntimeError:
        return False


@dataclass(frozen=True)
class Bf16Support:
    """Whether ``device_type`` computes bf16 natively, and why we think so."""

    device_type: str
    native: bool
    detail: str


def bf16_support(device: str | torch.device = "cpu") -> Bf16Support:
    """Run-time bf16 detection: CPU flags for ``cpu``, ``torch.cuda.is_bf16_supported()`` for ``cuda``."""
    device_type = torch.device(device).type
    if device_type == "cuda":
        native = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        return Bf16Support("cuda", native, "torch.cuda.is_bf16_supported()" if native else "no bf16 on this GPU")
    if device_type == "cpu":
        found = cpu_bf16_flags()
        capability = torch.backends.cpu.get_cpu_capability()
        if found:
            return Bf16Support("cpu", True, f"CPU flags {' '.join(found)} (torch capability {capability})")
        return Bf16Support("cpu", False, f"no {'/'.join(BF16_CPU_FLAGS)} CPU flag (torch capability {capability})")
    return Bf16Support(device_type, False, f"bf16 detection is not implemented for {device_type!r}")


def resolve_precision(precision: str, device: str | torch.device = "cpu") -> ComputePrecision:
    """``auto`` -> ``bf16`` where ``device`` has native bf16, else ``fp32``; ``fp32``/``bf16`` as given.

    An explicit ``bf16`` without native support is honoured (PyTorch emulates it) with a one-time warning.
    ``JFE_PRECISION=fp32|bf16`` in the environment replaces ``auto`` everywhere (encode, eval, serve,
    training): ``fp32`` gives the same numbers on every machine, whatever its CPU has.
    """
    value = check_precision(precision)
    if value == "auto":
        value = check_precision(os.environ.get("JFE_PRECISION", "auto") or "auto")
    if value == "fp32":
        return "fp32"
    support = bf16_support(device)
    if value == "auto":
        return "bf16" if support.native else "fp32"
    if not support.native:
        key = support.device_type
        if key not in _warned:
            _warned.add(key)
            logger.warning("precision bf16 on %s without native bf16 (%s): it is emulated and will be slower "
                           "than fp32", support.device_type, support.detail)
    return "bf16"


def autocast(precision: str, device: str | torch.device = "cpu") -> contextlib.AbstractContextManager[None]:
    """A context running its forward passes in ``precision`` on ``device`` (a no-op for fp32).

    Inside it, PyTorch's autocast lists decide per op: matmuls/linear/convolutions run in bf16, reductions
    that need range (softmax, layer norm, losses) stay fp32.
    """
    device_type = torch.device(device).type
    if resolve_precision(precision, device) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)


@contextlib.contextmanager
def fp32_region(device: str | torch.device = "cpu") -> Iterator[None]:
    """Turn autocast off for a block (ops that bf16 would cost precision: pooling, normalisation)."""
    with torch.autocast(torch.device(device).type, enabled=False):
        yield


def machine_summary() -> dict[str, object]:
    """The machine facts every published speed figure names: CPU model, its flags, torch's view of it."""
    flags = cpu_flags()
    return {"cpu": cpu_model_name(), "cpu_count": os.cpu_count(),
            "cpu_flags": [flag for flag in REPORTED_CPU_FLAGS if flag in flags],
            "cpu_flags_absent": [flag for flag in REPORTED_CPU_FLAGS if flag not in flags],
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "bf16_native_cpu": bool(cpu_bf16_flags()), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}
