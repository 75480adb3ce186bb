"""Heterogeneous-rank maths as properties: FLoRA's stack is exact, FlexLoRA's factors are the best rank-r
approximation (Eckart–Young, against torch.linalg.svd), HetLoRA's padding and truncation round-trip."""

from __future__ import annotations

import pytest
import torch

from strategies import hetero_math as hm

RANKS = [2, 4, 8, 3]
D_OUT, D_IN = 24, 20


def _clients(seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor], list[float], list[float]]:
    g = torch.Generator().manual_seed(seed)
    As = [torch.randn(r, D_IN, generator=g) for r in RANKS]
    Bs = [torch.randn(D_OUT, r, generator=g) for r in RANKS]
    weights = [float(w) for w in torch.rand(len(RANKS), generator=g) + 0.1]
    scalings = [16.0 / r for r in RANKS]
    return As, Bs, weights, scalings


@pytest.mark.parametrize("seed", range(5))
def test_flora_stacked_product_is_the_weighted_sum(seed: int) -> None:
    As, Bs, w, s = _clients(seed)
    B, A = hm.flora_stack(As, Bs, w, s)
    assert B.shape == (D_OUT, sum(RANKS)) and A.shape == (sum(RANKS), D_IN)
    p = [x / sum(w) for x in w]
    want = sum(pk * sk * (b.double() @ a.double()) for a, b, pk, sk in zip(As, Bs, p, s, strict=True))
    torch.testing.assert_close((B.double() @ A.double()), torch.as_tensor(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("rank", [1, 2, 4, 8])
def test_flexlora_factors_are_the_best_rank_r_approximation(seed: int, rank: int) -> None:
    As, Bs, w, s = _clients(seed)
    dw = hm.weighted_product(As, Bs, w, s)
    scaling = 16.0 / rank
    B, A = hm.truncated_factors(dw, rank, scaling=scaling)
    assert B.shape == (D_OUT, rank) and A.shape == (rank, D_IN)
    approx = scaling * (B.double() @ A.double())
    S = torch.linalg.svd(dw, full_matrices=False).S
    err = float((dw - approx).norm())
    assert err == pytest.approx(float(S[rank:].square().sum().sqrt()), rel=1e-5)  # Eckart–Young: the optimum
    g = torch.Generator().manual_seed(100 + seed)  # no other rank-r matrix does better: perturbed factors
    for _ in range(5):
        pb = B.double() + 1e-2 * torch.randn(D_OUT, rank, generator=g, dtype=torch.float64)
        pa = A.double() + 1e-2 * torch.randn(rank, D_IN, generator=g, dtype=torch.float64)
        other = scaling * (pb @ pa)
        assert float((dw - other).norm()) >= err - 1e-6


def test_truncated_factors_refuse_a_rank_wider_than_the_matrix() -> None:
    with pytest.raises(ValueError, match="rank=21"):
        hm.truncated_factors(torch.randn(D_OUT, D_IN), 21)


@pytest.mark.parametrize("seed", range(3))
def test_hetlora_padding_and_truncation_round_trip(seed: int) -> None:
    As, Bs, _, _ = _clients(seed)
    r_max = max(RANKS)
    for a, b in zip(As, Bs, strict=True):
        pb, pa = hm.zero_pad(b, a, r_max)
        assert pb.shape == (D_OUT, r_max) and pa.shape == (r_max, D_IN)
        torch.testing.assert_close(pb @ pa, b @ a)  # padding keeps the product
        tb, ta = hm.truncate(pb, pa, a.shape[0])
        assert torch.equal(tb, b) and torch.equal(ta, a)  # and truncation gives the factors back
    with pytest.raises(ValueError, match="cannot pad"):
        hm.zero_pad(Bs[2], As[2], 2)
    with pytest.raises(ValueError, match="cannot truncate"):
        hm.truncate(Bs[0], As[0], 4)


def test_hetlora_sparsity_weighted_aggregate() -> None:
    As, Bs, _, _ = _clients(0)
    w = hm.sparsity_weights(As, Bs)
    norms = [float((b @ a).norm()) for a, b in zip(As, Bs, strict=True)]
    assert w == pytest.approx([n / sum(norms) for n in norms]) and sum(w) == pytest.approx(1.0)
    B, A = hm.hetlora_aggregate(As, Bs, w, max(RANKS))
    # column j of B̄ averages only the clients that have component j (others contribute zeros)
    j = 5  # only the rank-8 client (index 2) has component 5
    torch.testing.assert_close(B[:, j], w[2] * Bs[2][:, j])
    torch.testing.assert_close(A[j], w[2] * As[2][j])
    assert hm.sparsity_weights([torch.zeros(2, 3)] * 2, [torch.zeros(4, 2)] * 2) == [0.5, 0.5]


def test_self_pruning_drops_a_shrinking_tail() -> None:
    g = torch.Generator().manual_seed(0)
    B, A = torch.randn(D_OUT, 8, generator=g), torch.randn(8, D_IN, generator=g)
    tail = hm.tail_norm(B, A, 7)
    assert hm.self_prune_rank(B, A, 8, gamma=0.9, previous=None) == 8  # first round: nothing to compare with
    assert hm.self_prune_rank(B, A, 8, gamma=0.9, previous=tail * 2) == 7  # tail shrank: prune to floor(0.9*8)
    assert hm.self_prune_rank(B, A, 8, gamma=0.9, previous=tail / 2) == 8  # tail grew: keep
    assert hm.self_prune_rank(B, A, 1, gamma=0.5, previous=1e9) == 1  # never below 1
    with pytest.raises(ValueError, match="gamma"):
        hm.self_prune_rank(B, A, 8, gamma=0.0, previous=None)
