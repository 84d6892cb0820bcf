"""Compact weights: a trained model stored as what training changed in its pretrained towers.

A saved jfe-mini holds MiniLM and MobileNetV2 in fp32 (~100 MB), but training moves the towers only a little.
A *compact* checkpoint stores, next to the usual ``config.json``:

* the glue (projector, heads, fusion layers: everything outside the pretrained towers) whole, in fp16;
* each tower tensor that training changed: small ones whole in fp16, large matrices (MiniLM's linear layers
  and word embeddings, MobileNetV2's 1x1 convolutions) as a rank-``r`` delta ``A @ B`` from the pretrained
  value (``<key>.delta_a`` / ``<key>.delta_b``, fp16: the truncated SVD of the change, the best rank-r
  approximation of it);
* nothing for the tower tensors training left as they were.

Loading builds the model on the pretrained towers (from the verified asset cache) and applies the file. How
close a compact model ranks to the model it came from is measured, not assumed: ``jfe ship-weights`` evaluates
both on MiniBEIR (docs/results/shipped_weights.md). The safetensors header records the format, so
:func:`jfe.models.base.load_weights` recognises such a file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

COMPACT_FORMAT = "jfe-compact-v1"
DELTA_A, DELTA_B = ".delta_a", ".delta_b"
# a matrix smaller than this is stored whole: its factors would save little and cost precision
MIN_LOWRANK_NUMEL = 1 << 16


def _as_matrix(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(tensor.shape[0], -1)


def _low_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``A [m, r]``, ``B [r, n]`` with ``A @ B`` the best rank-``r`` approximation of ``delta [m, n]``."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    rank = min(rank, s.numel())
    # the singular values split evenly between the factors, so both stay in fp16's comfortable range
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).float(), (root[:, None] * vh[:rank]).float()


def compact_state(trained: dict[str, torch.Tensor], base: dict[str, torch.Tensor], tower_prefixes: Iterable[str],
                  rank: int) -> dict[str, torch.Tensor]:
    """The compact form of ``trained`` against ``base`` (the same model built on the pretrained towers).

    Keys under ``tower_prefixes`` that training left equal to ``base`` are dropped; changed matrices of at least
    :data:`MIN_LOWRANK_NUMEL` entries whose rank-``rank`` factors are at most half their size become deltas;
    everything else (the glue included) is kept whole. Floating tensors are stored in fp16.
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    prefixes = tuple(tower_prefixes)
    out: dict[str, torch.Tensor] = {}
    for key, value in trained.items():
        value = value.detach().cpu()
        ref = base.get(key) if key.startswith(prefixes) else None
        if ref is not None and ref.shape == value.shape and torch.equal(ref.cpu(), value):
            continue
        floating = value.is_floating_point()
        if ref is not None and floating and value.dim() >= 2 and value.numel() >= MIN_LOWRANK_NUMEL:
            rows = value.shape[0]
            cols = value.numel() // rows
            if rank * (rows + cols) * 2 <= value.numel():
                a, b = _low_rank(_as_matrix(value.double() - ref.cpu().double()), rank)
                out[key + DELTA_A], out[key + DELTA_B] = a.half().contiguous(), b.half().contiguous()
                continue
        out[key] = value.half().contiguous() if floating else value.contiguous()
    return out


def apply_compact(model: torch.nn.Module, compact: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Fill ``model`` (built on its pretrained towers) from a compact state, in place.

    Returns ``(unexpected, misshapen)``: keys the model does not have, and keys whose stored shape does not fit;
    the caller turns them into an error naming the file.
    """
    state = model.state_dict()
    unexpected: list[str] = []
    misshapen: list[str] = []
    with torch.no_grad():
        for key, value in compact.items():
            if key.endswith(DELTA_B):
                continue
            if key.endswith(DELTA_A):
                name = key[:-len(DELTA_A)]
                factor_b = compact.get(name + DELTA_B)
                if name not in state or factor_b is None:
                    unexpected.append(key)
                    continue
                target = state[name]
                delta = value.float() @ factor_b.float()
                if delta.numel() != target.numel() or delta.shape[0] != target.shape[0]:
                    misshapen.append(name)
                    continue
                target.add_(delta.reshape(target.shape).to(target.device, target.dtype))
            elif key not in state:
                unexpected.append(key)
            elif state[key].shape != value.shape:
                misshapen.append(key)
            else:
                state[key].copy_(value.to(state[key].device, state[key].dtype))
    return unexpected, misshapen


def compact_bytes(compact: dict[str, torch.Tensor]) -> int:
    """The tensor bytes of a compact state (the file adds a small JSON header)."""
    return sum(t.numel() * t.element_size() for t in compact.values())


def is_compact(weights: str | os.PathLike) -> bool:
    """Whether a ``model.safetensors`` file holds compact weights (False when absent or unreadable: the loader
    then reports it)."""
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(weights), "pt") as handle:
            return (handle.metadata() or {}).get("format") == COMPACT_FORMAT
    except Exception:  # a damaged or missing file: load_weights names it
        return False
