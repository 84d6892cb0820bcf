"""InfoNCE against a hand computation, the false-negative mask, and GradCache against full-batch gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from jfe.data.items import Item
from jfe.models.toy import ToyConfig, ToyEncoder
from jfe.train.losses import ContrastiveBatch, ContrastiveObjective, InfoNCELoss, false_negative_mask


def _unit_rows(rows: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(rows, dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _hand_infonce(q: np.ndarray, p: np.ndarray, n: np.ndarray | None, tau: float, symmetric: bool,
                  mask: np.ndarray | None = None) -> float:
    """-log softmax of the target column, written out with explicit loops."""
    cols = list(p) + (list(n) if n is not None else [])
    b = len(q)

    def row_loss(vec: np.ndarray, columns: list[np.ndarray], target: int, masked: set[int]) -> float:
        logits = [sum(float(a) * float(c) for a, c in zip(vec, col, strict=True)) / tau for col in columns]
        denom = sum(math.exp(v) for j, v in enumerate(logits) if j not in masked)
        return -(logits[target] - math.log(denom))

    forward = 0.0
    for i in range(b):
        masked = {j for j in range(len(cols)) if mask is not None and mask[i][j] and j != i}
        forward += row_loss(q[i], cols, i, masked)
    forward /= b
    if not symmetric:
        return forward
    backward = 0.0
    for i in range(b):
        masked = {j for j in range(b) if mask is not None and mask[j][i] and j != i}
        backward += row_loss(p[i], list(q), i, masked)
    return (forward + backward / b) / 2


@pytest.mark.parametrize("symmetric", [False, True])
def test_infonce_matches_hand_computation_with_hard_negatives(symmetric: bool) -> None:
    q, p, n = _unit_rows(3, 4, 0), _unit_rows(3, 4, 1), _unit_rows(2, 4, 2)
    loss = InfoNCELoss(temperature=0.1, learnable=False, symmetric=symmetric)
    got = loss(torch.tensor(q, dtype=torch.float32), torch.tensor(p, dtype=torch.float32),
               torch.tensor(n, dtype=torch.float32))
    assert got.item() == pytest.approx(_hand_infonce(q, p, n, 0.1, symmetric), rel=1e-5)


def test_infonce_mask_removes_false_negatives() -> None:
    q, p = _unit_rows(3, 5, 3), _unit_rows(3, 5, 4)
    mask = np.zeros((3, 3), dtype=bool)
    mask[0, 2] = True  # candidate 2 also answers query 0
    loss = InfoNCELoss(temperature=0.2, learnable=False, symmetric=True)
    got = loss(torch.tensor(q, dtype=torch.float32), torch.tensor(p, dtype=torch.float32), None,
               torch.tensor(mask))
    assert got.item() == pytest.approx(_hand_infonce(q, p, None, 0.2, True, mask), rel=1e-5)
    unmasked = loss(torch.tensor(q, dtype=torch.float32), torch.tensor(p, dtype=torch.float32))
    assert unmasked.item() != pytest.approx(got.item(), rel=1e-4)


def test_false_negative_mask_marks_shared_positives_but_not_targets() -> None:
    mask = false_negative_mask([{"a", "c"}, {"b"}, {"c"}], ["a", "b", "c", "a"])
    assert mask.tolist() == [[False, False, True, True], [False, False, False, False],
                             [False, False, False, False]]


def test_learnable_temperature_is_clamped_and_trained() -> None:
    loss = InfoNCELoss(temperature=0.05, learnable=True, min_temperature=0.02, max_temperature=0.5)
    with torch.no_grad():
        loss.log_scale.fill_(math.log(1 / 0.001))  # far beyond the clamp
    assert loss.temperature == pytest.approx(0.02, rel=1e-5)
    loss2 = InfoNCELoss(temperature=0.05, learnable=True)
    q, p = torch.tensor(_unit_rows(4, 6, 5), dtype=torch.float32), torch.tensor(_unit_rows(4, 6, 6),
                                                                                 dtype=torch.float32)
    loss2(q, p).backward()
    assert loss2.log_scale.grad is not None and loss2.log_scale.grad.abs().item() > 0
    with pytest.raises(ValueError):
        InfoNCELoss(temperature=2.0, max_temperature=1.0)


def _batch(k_neg: int, mixed: bool = True) -> ContrastiveBatch:
    words = ["red", "green", "blue", "small", "large", "round", "square", "bright", "dark", "soft"]
    rng = np.random.default_rng(7)

    def text(i: int) -> str:
        return " ".join(words[j] for j in rng.choice(len(words), size=3, replace=False)) + f" w{i}"

    def image(i: int) -> Image.Image | None:
        if not mixed:
            return None
        return Image.new("RGB", (4, 4), tuple(int(v) for v in rng.integers(0, 256, size=3)))

    # every modality mixed in one batch
    queries = [Item(text=text(i), image=image(i) if i % 3 == 0 else None) for i in range(6)]
    positives = [Item(image=image(i)) if i % 2 and mixed else Item(text=text(i + 10)) for i in range(6)]
    negatives = [Item(text=text(i + 20), image=image(i) if i % 2 else None) for i in range(6 * k_neg)]
    mask = torch.zeros(6, 6 + 6 * k_neg, dtype=torch.bool)
    mask[1, 3] = True
    return ContrastiveBatch(queries, positives, negatives, mask)


def _grads(chunk: int, scale: float = 1.0) -> tuple[float, list[torch.Tensor]]:
    model = ToyEncoder(ToyConfig(embed_dim=16, vocab_buckets=64, seed=3))
    loss = InfoNCELoss(temperature=0.07, learnable=True)
    objective = ContrastiveObjective(model, loss, chunk_size=chunk)
    value = objective(_batch(k_neg=1))
    (value * scale).backward()
    params = [*model.parameters(), *loss.parameters()]
    return value.item(), [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]


@pytest.mark.parametrize("chunk", [1, 4, 5])
def test_grad_cache_matches_full_batch_gradients(chunk: int) -> None:
    full_loss, full = _grads(chunk=0, scale=0.5)
    cached_loss, cached = _grads(chunk=chunk, scale=0.5)
    assert cached_loss == pytest.approx(full_loss, abs=1e-6)
    assert any(g.abs().sum() > 0 for g in full)
    for a, b in zip(full, cached, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_grad_cache_replays_dropout_masks() -> None:
    """With dropout, the re-embedding pass must see the same masks as the no-grad pass."""

    class DropoutToy(ToyEncoder):
        arch = ""  # not registered

        def __init__(self) -> None:
            super().__init__(ToyConfig(embed_dim=16, vocab_buckets=64, seed=1))
            self.drop = torch.nn.Dropout(0.5)

        def embed(self, items):  # type: ignore[override]
            return torch.nn.functional.normalize(self.drop(super().embed(items)), dim=-1)

    model = DropoutToy().train()
    loss = InfoNCELoss(temperature=0.1, learnable=False)
    batch = _batch(k_neg=0, mixed=False)
    torch.manual_seed(0)
    out = ContrastiveObjective(model, loss, chunk_size=4)(batch)
    out.backward()
    cached = [p.grad for p in model.parameters()]
    # reference: recompute with exactly the masks the chunks drew (same seed, same chunking, with grad)
    model.zero_grad()
    torch.manual_seed(0)
    items = [*batch.queries, *batch.positives]
    reps = torch.cat([model.embed(items[i:i + 4]) for i in range(0, len(items), 4)])
    ref = loss(reps[:6], reps[6:], None, batch.mask)
    ref.backward()
    assert out.item() == pytest.approx(ref.item(), abs=1e-6)
    for a, b in zip([p.grad for p in model.parameters()], cached, strict=True):
        if a is None or b is None:
            assert a is None and b is None
            continue
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)



def test_matryoshka_loss_is_the_mean_over_renormalised_prefixes() -> None:
    from jfe.train.losses import MatryoshkaLoss

    q, p, n = _unit_rows(3, 8, 3), _unit_rows(3, 8, 4), _unit_rows(2, 8, 5)
    inner = InfoNCELoss(temperature=0.1, learnable=False, symmetric=True)
    loss = MatryoshkaLoss(inner, [2, 4, 8, 4])  # duplicates and the full dim are taken once
    tensors = [torch.tensor(x, dtype=torch.float32, requires_grad=True) for x in (q, p, n)]
    got = loss(*tensors)

    def unit(x: np.ndarray, d: int) -> np.ndarray:
        return x[:, :d] / np.linalg.norm(x[:, :d], axis=1, keepdims=True)

    expected = np.mean([_hand_infonce(unit(q, d), unit(p, d), unit(n, d), 0.1, True) for d in (2, 4, 8)])
    assert got.item() == pytest.approx(expected, rel=1e-5)
    got.backward()
    assert tensors[0].grad is not None and tensors[0].grad[:, 2:4].abs().sum() > 0  # every prefix is trained
    assert loss.temperature == pytest.approx(0.1)
