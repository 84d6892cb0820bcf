"""Compute precision for encoding and training: ``"auto" | "fp32" | "bf16"``.

bf16 is worth it only where the hardware multiplies in bf16: CPUs with AMX-BF16 or AVX512-BF16 (Intel
Sapphire Rapids and later, AMD Zen 4 and later) and CUDA GPUs that report ``torch.cuda.is_bf16_supported()``.
Elsewhere PyTorch emulates bf16 matmuls through fp32 conversions, which gives the same numbers but is
*slower* than plain fp32, so

* ``"auto"`` picks bf16 where the hardware has it and fp32 everywhere else;
* ``"fp32"`` never uses bf16;
* ``"bf16"`` always does; on hardware without native bf16 it still works (emulated) and logs a warning
  that it will be slower than fp32.

The value is an argument everywhere (``Encoder.encode(precision=...)``/``set_precision``, ``--precision`` on
every command, ``precision`` in a training config), resolved once per encode or training run into ``fp32`` or
``bf16`` and passed down from there; no environment variable or context changes it behind the caller's back.
``--precision fp32`` gives the same numbers on every machine, whatever its CPU has.

bf16 is applied as ``torch.autocast(device_type, dtype=torch.bfloat16)`` around the forward pass: weights stay
fp32 (so training updates and checkpoints are fp32), matmuls and convolutions run in bf16. Encoders return
float32 L2-normalised vectors whatever the compute precision, and loss/temperature math stays fp32.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch

from jfe.hardware import PRECISIONS, ComputePrecision, Precision, bf16_support, check_precision

__all__ = ["PRECISIONS", "VISION_PRECISIONS", "ComputePrecision", "Precision", "autocast", "check_precision",
           "check_vision_precision", "resolve_precision"]

# Where the vision tower computes when an encode runs in bf16: "fp32" (default: cosine >= 0.9999 to an fp32
# encode) or "follow" (bf16 too: faster, the same retrieval quality on MiniBEIR, but near-tie rankings move).
VISION_PRECISIONS: tuple[str, ...] = ("fp32", "follow")

logger = logging.getLogger(__name__)
_warned: set[str] = set()


def resolve_precision(precision: str, device: str | torch.device = "cpu") -> ComputePrecision:
    """``auto`` -> ``bf16`` where ``device`` has native bf16, else ``fp32``; ``fp32``/``bf16`` as given.

    An explicit ``bf16`` without native support is honoured (PyTorch emulates it) with a one-time warning.
    """
    value = check_precision(precision)
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


def check_vision_precision(vision: str) -> str:
    """``"fp32"`` or ``"follow"`` (checked): where a vision tower computes when an encode runs in bf16."""
    value = str(vision).strip().lower()
    if value not in VISION_PRECISIONS:
        from jfe.errors import ConfigError

        raise ConfigError(f"vision precision must be one of {', '.join(VISION_PRECISIONS)}, got {vision!r}")
    return value


def autocast(compute: ComputePrecision, device: str | torch.device = "cpu") -> contextlib.AbstractContextManager[None]:
    """A context running its forward passes in ``compute`` (a resolved precision, :func:`resolve_precision`) on
    ``device``: a no-op for fp32.

    Inside it, PyTorch's autocast lists decide per op: matmuls/linear/convolutions run in bf16, reductions
    that need range (softmax, layer norm, losses) stay fp32.
    """
    if compute == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


@contextlib.contextmanager
def fp32_region(device: str | torch.device = "cpu") -> Iterator[None]:
    """Turn autocast off for a block (ops that bf16 would cost precision: pooling, normalisation)."""
    with torch.autocast(torch.device(device).type, enabled=False):
        yield
