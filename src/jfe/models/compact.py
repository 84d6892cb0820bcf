"""Compact weights: a trained model stored as what training changed in its pretrained towers.

A saved jfe-mini holds MiniLM and MobileNetV2 in fp32 (~100 MB), but training moves the towers only a little.
A *compact* checkpoint stores, next to the usual ``config.json``:

* the glue (projector, heads, fusion layers: everything outside the pretrained towers) whole, in fp16;
* each tower tensor that training changed: small ones whole in fp16; a large matrix (MiniLM's linear layers
  and word embeddings, MobileNetV2's 1x1 convolutions) as ``W0 * (1 + s) + R``: ``s`` the uniform shrink that
  AdamW's decoupled weight decay applies to every row (``<key>.delta_scale``, full rank, so a low-rank form could
  not hold it), and the rest ``R`` either as the rows it touches (``<key>.delta_rows`` / ``.delta_values``, exact
  in fp16: the word embeddings of the tokens the training data used) or as a rank-``r`` product ``A @ B``
  (``<key>.delta_a`` / ``.delta_b``, fp16: the truncated SVD, the best rank-``r`` approximation), whichever is
  smaller;
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
DELTA_SCALE, DELTA_ROWS, DELTA_VALUES = ".delta_scale", ".delta_rows", ".delta_values"
_PARTS = (DELTA_A, DELTA_B, DELTA_SCALE, DELTA_ROWS, DELTA_VALUES)
# a row of the remainder counts as untouched below this fraction of the matrix's largest pretrained entry (fp32
# rounding of the repeated decay multiply stays orders of magnitude under it)
ROW_TOLERANCE = 1e-5
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


def _decay_scale(delta: torch.Tensor, ref: torch.Tensor) -> float:
    """The uniform relative change ``s`` with ``delta ~ s * ref`` on most rows (weight decay shrinks every row
    alike; the rows training touched are the minority the median ignores)."""
    norms = (ref * ref).sum(1)
    ratios = (delta * ref).sum(1)[norms > 0] / norms[norms > 0]
    return float(ratios.median()) if len(ratios) else 0.0


def _compact_matrix(key: str, value: torch.Tensor, ref: torch.Tensor, rank: int) -> dict[str, torch.Tensor] | None:
    """The delta form of a changed matrix (scale + rows or low-rank), or None when storing it whole is smaller."""
    rows = value.shape[0]
    cols = value.numel() // rows
    current, pretrained = _as_matrix(value.double()), _as_matrix(ref.cpu().double())
    scale = _decay_scale(current - pretrained, pretrained)
    rest = current - pretrained * (1.0 + scale)
    tolerance = ROW_TOLERANCE * float(pretrained.abs().max())
    touched = torch.nonzero(rest.abs().amax(1) > tolerance).flatten()
    parts = {key + DELTA_SCALE: torch.tensor([scale], dtype=torch.float64)}
    if len(touched) * cols <= rank * (rows + cols):
        parts[key + DELTA_ROWS] = touched.to(torch.int64)
        parts[key + DELTA_VALUES] = rest[touched].half().contiguous()
    elif rank * (rows + cols) * 2 <= value.numel():
        a, b = _low_rank(rest, rank)
        parts[key + DELTA_A], parts[key + DELTA_B] = a.half().contiguous(), b.half().contiguous()
    else:
        return None
    return parts


def compact_state(trained: dict[str, torch.Tensor], base: dict[str, torch.Tensor], tower_prefixes: Iterable[str],
                  rank: int) -> dict[str, torch.Tensor]:
    """The compact form of ``trained`` against ``base`` (the same model built on the pretrained towers).

    Keys under ``tower_prefixes`` that training left equal to ``base`` are dropped; changed matrices of at least
    :data:`MIN_LOWRANK_NUMEL` entries become a decay scale plus touched rows or rank-``rank`` factors (module
    docstring) where that is at most half their size; everything else (the glue included) is kept whole.
    Floating tensors are stored in fp16 (the scale in fp64).
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
            parts = _compact_matrix(key, value, ref, rank)
            if parts is not None:
                out.update(parts)
                continue
        out[key] = value.half().contiguous() if floating else value.contiguous()
    return out


def _delta_of(name: str, compact: dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor | None:
    """The change to add to ``target`` (the pretrained matrix) from its stored parts; None when they do not fit."""
    matrix = _as_matrix(target).double()
    delta = matrix * float(compact[name + DELTA_SCALE].reshape(-1)[0]) if name + DELTA_SCALE in compact \
        else torch.zeros_like(matrix)
    if name + DELTA_A in compact:
        factor_b = compact.get(name + DELTA_B)
        if factor_b is None:
            return None
        product = compact[name + DELTA_A].double() @ factor_b.double()
        if product.shape != delta.shape:
            return None
        delta += product
    if name + DELTA_ROWS in compact:
        rows, values = compact[name + DELTA_ROWS], compact.get(name + DELTA_VALUES)
        if values is None or values.shape != (len(rows), delta.shape[1]) or (len(rows) and
                                                                          int(rows.max()) >= delta.shape[0]):
            return None
        delta[rows.long()] += values.double()
    return delta.reshape(target.shape)


def apply_compact(model: torch.nn.Module, compact: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Fill ``model`` (built on its pretrained towers) from a compact state, in place.

    Returns ``(unexpected, misshapen)``: keys the model does not have, and keys whose stored shape does not fit;
    the caller turns them into an error naming the file.
    """
    state = model.state_dict()
    unexpected: list[str] = []
    misshapen: list[str] = []
    deltas = sorted({key[:-len(part)] for key in compact for part in _PARTS if key.endswith(part)})
    with torch.no_grad():
        for name in deltas:
            if name not in state:
                unexpected.append(name)
                continue
            delta = _delta_of(name, compact, state[name])
            if delta is None:
                misshapen.append(name)
                continue
            state[name].add_(delta.to(state[name].device, state[name].dtype))
        for key, value in compact.items():
            if key.endswith(_PARTS):
                continue
            if key not in state:
                unexpected.append(key)
            elif state[key].shape != value.shape:
                misshapen.append(key)
            else:
                state[key].copy_(value.to(state[key].device, state[key].dtype))
    return unexpected, misshapen


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    """The tensor bytes of a state dict, full or compact (a safetensors file adds a small JSON header)."""
    return sum(t.numel() * t.element_size() for t in state.values())


def is_compact(weights: str | os.PathLike) -> bool:
    """Whether a ``model.safetensors`` file holds compact weights (False when absent or unreadable: the loader
    then reports it)."""
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(weights), "pt") as handle:
            return (handle.metadata() or {}).get("format") == COMPACT_FORMAT
    except Exception:  # a damaged or missing file: load_weights names it
        return False
