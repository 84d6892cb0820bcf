"""Exact inner-product top-k over a float32 matrix (in RAM or a numpy memmap), faster than matmul + argpartition.

Why the plain numpy baseline (and the index's old numpy path) is slow at 1M x 384: about a third of its time
is ``argpartition`` over the full ``[queries, pool]`` score matrix (1.08 s of 3.4 s for 256 x 200k here), plus
a negated copy of that matrix and a fresh 1 GB score allocation per batch. Here the pool is scanned in chunks
into one reused score buffer; ``torch.topk`` takes each chunk's k best (4x cheaper than argpartition) and a
``[queries, k]`` running buffer merges them with the tie rule.

Reduced-precision scan (``precision="bf16"``): where the CPU has bf16 matrix instructions (AVX512-BF16 or
AMX-BF16; :func:`jfe.hardware.cpu_bf16_flags`), the chunk scores are computed in bf16 with torch (from a
bf16 copy of the pool made once, :class:`Bf16Pool`, where the caller keeps one), and every candidate that
*could* beat the running k-th best given a proven error bound is rescored in fp32 - so the result equals fp32
exact search (same ids, fp32 scores). On CPUs without those instructions bf16 is emulated and slower than
fp32 (measured: 2.5x slower here), so ``precision="auto"`` picks fp32 there.

Ties: equal scores rank by row (the lower row first), the index's insertion-order rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from jfe.hardware import ComputePrecision, Precision, check_precision, cpu_bf16_flags

# Pool rows per chunk: a [256, 32768] fp32 score block is 32 MB, reused across chunks; 16k-64k measured
# alike on the 2-core EPYC (docs/index_eval.md), smaller chunks pay more per-chunk merge overhead.
CHUNK_ROWS = 32768
# bf16 scan: columns per query and chunk taken from the bf16 scores and rescored in fp32 (see _scan_bf16).
BF16_CANDIDATES = 32
# bf16 has an 8-bit significand: each rounding errs by at most 2^-8 relative. Two inputs rounded, products
# summed exactly-ish in fp32, one output rounding: |bf16(q.x) - q.x| <= (2*2^-8 + 2^-8 + 2^-16) * |q| |x|
# (Cauchy-Schwarz bounds sum |q_i x_i| by |q||x|). A factor of 2 on top covers fp32 accumulation.
BF16_REL_ERROR = 2 * (3 * 2.0 ** -8 + 2.0 ** -16)


def resolve_scan_precision(precision: Precision | str) -> ComputePrecision:
    """The arithmetic of an exact scan (results are fp32-exact either way): ``auto`` -> ``bf16`` where the CPU
    has native bf16, else ``fp32``. Not the encoders' compute precision, though it takes the same spellings and
    raises the same error (:func:`jfe.hardware.check_precision`)."""
    value = check_precision(precision)
    if value == "auto":
        return "bf16" if cpu_bf16_flags() else "fp32"
    return value


@dataclass(frozen=True)
class Bf16Pool:
    """A bf16 copy of a pool (half its size) and its fp32 row norms, made once and reused by every search.

    Converting the pool on every search costs about as much as the bf16 product itself (0.15 s per 200k x 384
    here), which is why :class:`jfe.index.VectorIndex` keeps one of these next to its fp32 vectors.
    """

    data: Any  # torch.Tensor [n, d] bfloat16
    norms: np.ndarray  # [n] float32

    @classmethod
    def of(cls, pool: np.ndarray, chunk_rows: int = CHUNK_ROWS) -> Bf16Pool:
        """Convert ``pool`` (an array or memmap) chunk by chunk: never a second fp32 copy in RAM."""
        import torch

        data = torch.empty((len(pool), pool.shape[1]), dtype=torch.bfloat16)
        norms = np.empty(len(pool), dtype=np.float32)
        for start in range(0, len(pool), chunk_rows):
            block = np.ascontiguousarray(pool[start:start + chunk_rows], dtype=np.float32)
            data[start:start + len(block)] = torch.from_numpy(block)
            norms[start:start + len(block)] = np.linalg.norm(block, axis=1)
        return cls(data, norms)

    def __len__(self) -> int:
        return len(self.norms)


class _TopK:
    """Running top-k per query: scores descending, ties by lower row; empty slots are (-inf, sentinel)."""

    EMPTY = np.iinfo(np.int64).max

    def __init__(self, m: int, k: int) -> None:
        self.k = k
        self.scores = np.full((m, k), -np.inf, dtype=np.float32)
        self.rows = np.full((m, k), self.EMPTY, dtype=np.int64)

    @property
    def threshold(self) -> np.ndarray:
        """The k-th best score so far (-inf until k candidates were seen): only scores >= it can enter."""
        return self.scores[:, -1]

    def merge(self, qrows: np.ndarray, rows: np.ndarray, scores: np.ndarray) -> None:
        """Merge candidates (query row, pool row, exact score) into the buffer."""
        if len(qrows) == 0:
            return
        m, k = self.scores.shape
        all_q = np.concatenate([np.repeat(np.arange(m), k), qrows])
        all_r = np.concatenate([self.rows.ravel(), rows])
        all_s = np.concatenate([self.scores.ravel(), scores.astype(np.float32, copy=False)])
        order = np.lexsort((all_r, -all_s, all_q))
        all_q, all_r, all_s = all_q[order], all_r[order], all_s[order]
        start = np.searchsorted(all_q, np.arange(m))
        rank = np.arange(len(all_q)) - start[all_q]
        keep = rank < k
        self.scores[all_q[keep], rank[keep]] = all_s[keep]
        self.rows[all_q[keep], rank[keep]] = all_r[keep]


def exact_topk(queries: np.ndarray, pool: np.ndarray, k: int, *, precision: Precision | str = "auto",
               chunk_rows: int = CHUNK_ROWS, prepared: Bf16Pool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (scores ``[m, k]`` float32 descending, pool rows ``[m, k]`` int64) by inner product.

    ``pool`` may be a numpy memmap: it is read chunk by chunk. Where the pool has fewer than ``k`` rows the
    tail is padded with score ``-inf`` and row ``-1``. Scores are fp32 exact whatever ``precision`` is.
    ``prepared`` (:meth:`Bf16Pool.of` of this very pool) saves the bf16 scan its per-search conversion.
    """
    if prepared is not None and len(prepared) != len(pool):
        raise ValueError(f"prepared bf16 pool has {len(prepared)} rows, the pool {len(pool)}")
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    m, n = len(queries), len(pool)
    top = _TopK(m, k)
    if m and n:
        mode = resolve_scan_precision(precision)
        if mode == "bf16":
            _scan_bf16(queries, pool, top, chunk_rows, prepared)
        else:
            _scan_fp32(queries, pool, top, chunk_rows)
    rows = top.rows
    rows[rows == _TopK.EMPTY] = -1
    return top.scores, rows


def _heavy_topk(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(row-in-block, column) of each row's top k (ties at the k-th place may be cut either way - they are
    all >= the k-th score and the final merge orders them)."""
    kk = min(k, scores.shape[1])
    cols = np.argpartition(scores, scores.shape[1] - kk, axis=1)[:, -kk:]
    return np.repeat(np.arange(len(scores)), kk), cols.ravel()


def _scan_fp32(queries: np.ndarray, pool: np.ndarray, top: _TopK, chunk_rows: int) -> None:
    """Blocked fp32 scan: one BLAS product per chunk into a reused buffer, then ``torch.topk`` of that chunk.

    ``torch.topk`` on a [256, 64k] block is ~4x cheaper than numpy's ``argpartition`` on it (measured
    0.24 s vs 1.08 s for 256 x 200k here), and the reused buffer avoids a fresh score matrix per chunk.
    Ties at a chunk's k-th place: every column equal to that chunk's k-th score is kept, so the lower row
    can still win the final merge (the insertion-order tie rule stays exact).
    """
    import torch

    k = top.k
    buf = np.empty((len(queries), chunk_rows), dtype=np.float32)
    for start in range(0, len(pool), chunk_rows):
        block = np.asarray(pool[start:start + chunk_rows], dtype=np.float32)
        # numpy's BLAS (OpenBLAS) measured faster than torch.mm for this shape here; out= reuses the buffer
        scores_np = np.matmul(queries, block.T, out=buf[:, :len(block)]) if len(block) == chunk_rows else \
            queries @ block.T
        scores = torch.from_numpy(scores_np)
        kk = min(k, len(block))
        vals, cols = torch.topk(scores, kk, dim=1, sorted=False)
        kth = vals.min(dim=1).values
        # Any column tied with the k-th value that topk dropped: add it (rare; exact ties only).
        ties = (scores == kth[:, None]).sum(dim=1) - (vals == kth[:, None]).sum(dim=1)
        qrows = np.repeat(np.arange(len(queries)), kk)
        cols_np = cols.numpy().ravel()
        vals_np = vals.numpy().ravel()
        tied = torch.nonzero(ties > 0).flatten().numpy()
        if len(tied):
            # for those rows, replace topk's arbitrary pick among the k-th-score ties by all of them
            kth_np = kth.numpy()
            drop = np.zeros(len(queries), dtype=bool)
            drop[tied] = True
            keep = ~(drop[qrows] & (vals_np == kth_np[qrows]))
            qrows, cols_np, vals_np = qrows[keep], cols_np[keep], vals_np[keep]
            tq, tc = np.nonzero(scores_np[tied] == kth_np[tied][:, None])
            qrows = np.concatenate([qrows, tied[tq]])
            cols_np = np.concatenate([cols_np, tc])
            vals_np = np.concatenate([vals_np, scores_np[tied[tq], tc]])
        top.merge(qrows, cols_np + start, vals_np)


def _scan_bf16(queries: np.ndarray, pool: np.ndarray, top: _TopK, chunk_rows: int,
               prepared: Bf16Pool | None) -> None:
    """bf16 scan with a proof of exactness, per chunk:

    1. bf16 scores of the chunk (from the prepared bf16 copy, else converted here);
    2. the bf16 top :data:`BF16_CANDIDATES` columns of each query are rescored in fp32 and merged;
    3. a column outside that top has a bf16 score <= the last one kept, so its exact score is at most that plus
       ``margin`` (the bf16 error bound). Where that can still reach the running k-th best ("unsure" rows:
       many near-ties, or the first chunk before a threshold exists), the row's whole chunk is scored in fp32.

    Selecting with ``torch.topk`` costs a fraction of masking the whole score block (``nonzero`` over a
    [256, 32k] mask measured 1.5 s per 1M candidates here, the bf16 product itself 0.64 s).
    """
    import torch

    k, m = top.k, len(queries)
    q16 = torch.from_numpy(queries).to(torch.bfloat16)
    q_norm = np.linalg.norm(queries, axis=1)
    for start in range(0, len(pool), chunk_rows):
        block = np.asarray(pool[start:start + chunk_rows], dtype=np.float32)
        if prepared is not None:
            b16 = prepared.data[start:start + len(block)]
            block_norm = float(prepared.norms[start:start + len(block)].max())
        else:
            b16 = torch.from_numpy(np.ascontiguousarray(block)).to(torch.bfloat16)
            block_norm = float(np.linalg.norm(block, axis=1).max())
        approx = q16 @ b16.T
        margin = BF16_REL_ERROR * q_norm * block_norm  # |bf16 score - exact| <= margin, per query row
        kk = min(BF16_CANDIDATES, len(block))
        last_kept, kept = torch.topk(approx, kk, dim=1, sorted=True)
        cols = kept.numpy()  # [m, kk]
        qrows, flat = np.repeat(np.arange(m), kk), cols.ravel()
        top.merge(qrows, flat + start, np.einsum("ij,ij->i", queries[qrows], block[flat]))
        if kk == len(block):
            continue  # every column of this chunk was rescored
        unsure = np.flatnonzero(last_kept[:, -1].float().numpy() + margin >= top.threshold)
        if len(unsure):
            exact = queries[unsure] @ block.T
            # the columns merged above are in the buffer already: a second copy would take two of its k slots
            exact[np.arange(len(unsure))[:, None], cols[unsure]] = -np.inf
            hq, hc = _heavy_topk(exact, k)
            kth = exact[hq, hc].reshape(len(unsure), -1).min(axis=1)
            # tie-inclusive (the merge applies the row rule), never an excluded column
            tq, tc = np.nonzero((exact >= kth[:, None]) & (exact > -np.inf))
            top.merge(unsure[tq], tc + start, exact[tq, tc])


def rescore(queries: np.ndarray, pool: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Scores ``[m, c]`` of each query against its shortlisted pool ``rows`` (``-1``: none, scored ``-inf``),
    computed the same way whatever the batch: float64 products summed per pair by one einsum loop, rounded to
    float32. BLAS kernels differ between a single query (gemv) and a batch (gemm) in the last bit, so equal
    vectors could score one ulp apart and swap places; rescored, they tie exactly and the tie rule decides."""
    valid = rows >= 0
    vectors = np.asarray(pool[np.where(valid, rows, 0).ravel()], dtype=np.float64).reshape(*rows.shape, -1)
    scores = np.einsum("mcd,md->mc", vectors, np.asarray(queries, dtype=np.float64)).astype(np.float32)
    scores[~valid] = -np.inf
    return scores
