"""Property tests of the federated randomized range finder (Halko, Martinsson & Tropp 2011) behind Fed-SB's
sketched init: exact recovery of low-rank sums, and the multi-client protocol = the single-party sketch."""

from __future__ import annotations

import math

import pytest
import torch

from strategies.sketch_math import (
    contraction,
    orthonormal_basis,
    range_finder,
    sketch_factors,
    sketch_width,
    test_matrix,
    uplink_ratio,
)

test_matrix.__test__ = False  # type: ignore[attr-defined]  # a library function, not a pytest test

D_OUT, D_IN, RANK, P = 48, 40, 6, 4


def low_rank(k: int, *, seed: int, d_out: int = D_OUT, d_in: int = D_IN) -> torch.Tensor:
    """An exactly rank-k matrix with well-separated singular values 2^0 .. 2^-(k-1)."""
    gen = torch.Generator().manual_seed(seed)
    u = orthonormal_basis(torch.randn(d_out, k, generator=gen, dtype=torch.float64))
    v = orthonormal_basis(torch.randn(d_in, k, generator=gen, dtype=torch.float64))
    s = torch.tensor([2.0**-i for i in range(k)], dtype=torch.float64)
    return u @ torch.diag(s) @ v.T


def trunc(g: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    return u[:, :r] @ torch.diag(s[:r]) @ vh[:r]


def exchanges(clients: list[dict[str, torch.Tensor]]):  # type: ignore[no-untyped-def]
    """left/right exchanges that sum each client's own release, as the server does."""

    def left(q: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: sum(c[n].T @ q[n] for c in clients) for n in q}  # type: ignore[misc]

    def right(w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: sum(c[n] @ w[n] for c in clients) for n in w}  # type: ignore[misc]

    return left, right


@pytest.mark.parametrize("k", [1, RANK, RANK + P])
def test_an_exactly_rank_k_gradient_is_recovered(k: int) -> None:
    """k ≤ r + p: Q spans range(G), so Q·QᵀG = G and B·R0·A = −c·trunc_r(G) to float tolerance."""
    g = low_rank(k, seed=k)
    omega = test_matrix(D_IN, sketch_width(D_OUT, D_IN, rank=RANK, oversample=P), seed=0, name="m")
    left, right = exchanges([{"m": g}])
    basis, proj = range_finder({"m": g @ omega}, left=left, right=right)
    torch.testing.assert_close(basis["m"] @ proj["m"], g, atol=1e-10, rtol=0)
    lr = 1e-3
    a, b, r0 = sketch_factors(basis["m"], proj["m"], rank=RANK, lr=lr)
    c = lr * math.sqrt(D_OUT * D_IN) / float(g.norm())
    torch.testing.assert_close((b.double() @ r0.double() @ a.double()), -c * trunc(g, RANK), atol=1e-6, rtol=1e-4)
    assert torch.allclose(a.double() @ a.double().T, torch.eye(RANK, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(b.double().T @ b.double(), torch.eye(RANK, dtype=torch.float64), atol=1e-5)
    assert bool((torch.diag(r0) >= 0).all())


@pytest.mark.parametrize("power_iters", [0, 1, 2])
def test_the_multi_client_protocol_equals_the_single_party_randomized_svd(power_iters: int) -> None:
    """Three clients, two modules, full-rank gradients: Σ of releases = the sketch of Σ G_k (Halko Alg. 4.4)."""
    gen = torch.Generator().manual_seed(1)
    shapes = {"q": (D_OUT, D_IN), "ffn": (2 * D_IN, D_IN)}
    clients = [{n: torch.randn(*s, generator=gen, dtype=torch.float64) for n, s in shapes.items()} for _ in range(3)]
    width = {n: sketch_width(*s, rank=RANK, oversample=P) for n, s in shapes.items()}
    omega = {n: test_matrix(s[1], width[n], seed=7, name=n) for n, s in shapes.items()}
    left, right = exchanges(clients)
    first = {n: sum(c[n] @ omega[n] for c in clients) for n in shapes}
    basis, proj = range_finder(first, left=left, right=right, power_iters=power_iters)  # type: ignore[arg-type]
    for n in shapes:
        g = sum(c[n] for c in clients)
        q = torch.linalg.qr(g @ omega[n])[0]  # the single party's randomized SVD, written independently
        for _ in range(power_iters):
            q = torch.linalg.qr(g @ torch.linalg.qr(g.T @ q)[0])[0]
        torch.testing.assert_close(basis[n] @ basis[n].T, q @ q.T, atol=1e-8, rtol=0)  # same subspace
        torch.testing.assert_close(basis[n] @ proj[n], q @ (q.T @ g), atol=1e-8, rtol=0)  # same approximation
        ref = sketch_factors(q, q.T @ g, rank=RANK, lr=1e-3)
        got = sketch_factors(basis[n], proj[n], rank=RANK, lr=1e-3)
        torch.testing.assert_close(got[1] @ got[2] @ got[0], ref[1] @ ref[2] @ ref[0], atol=1e-6, rtol=1e-5)


def test_power_iterations_sharpen_a_slowly_decaying_spectrum() -> None:
    gen = torch.Generator().manual_seed(3)
    u = orthonormal_basis(torch.randn(D_OUT, D_IN, generator=gen, dtype=torch.float64))
    v = orthonormal_basis(torch.randn(D_IN, D_IN, generator=gen, dtype=torch.float64))
    g = u @ torch.diag(torch.linspace(1.0, 0.5, D_IN, dtype=torch.float64)) @ v.T
    omega = test_matrix(D_IN, RANK + P, seed=0, name="m")
    left, right = exchanges([{"m": g}])
    errs = []
    for q in (0, 2):
        basis, proj = range_finder({"m": g @ omega}, left=left, right=right, power_iters=q)
        errs.append(float((g - basis["m"] @ proj["m"]).norm()))
    assert errs[1] < errs[0]


def test_the_test_matrix_is_shared_orthonormal_and_per_module() -> None:
    a, b = test_matrix(40, 12, seed=3, name="layer.0.q"), test_matrix(40, 12, seed=3, name="layer.0.q")
    assert torch.equal(a, b)
    assert not torch.allclose(a, test_matrix(40, 12, seed=3, name="layer.0.k"))
    assert not torch.allclose(a, test_matrix(40, 12, seed=4, name="layer.0.q"))
    torch.testing.assert_close(a.T @ a, torch.eye(12, dtype=torch.float64), atol=1e-12, rtol=0)


def test_contraction_caps_the_spectral_norm_and_keeps_orthonormal_matrices() -> None:
    q = test_matrix(30, 5, seed=0, name="x")
    assert torch.equal(contraction(q), q) or torch.allclose(contraction(q), q, atol=1e-12)
    big = contraction(10 * q + 1.0)
    assert float(torch.linalg.matrix_norm(big, ord=2)) <= 1 + 1e-12


def test_uplink_ratio_and_width() -> None:
    assert sketch_width(384, 384, rank=32, oversample=8) == 40
    assert sketch_width(20, 30, rank=32, oversample=8) == 20  # capped: the sketch is then exact
    assert uplink_ratio(384, 384, rank=32, oversample=8) == pytest.approx(40 * 768 / 384**2)  # 0.208
    assert uplink_ratio(4096, 4096, rank=32, oversample=8) == pytest.approx(40 * 8192 / 4096**2)  # 0.0195
    assert uplink_ratio(384, 384, rank=32, oversample=8, power_iters=1) == pytest.approx(2 * 40 * 768 / 384**2)
    with pytest.raises(ValueError, match="oversample"):
        sketch_width(10, 10, rank=2, oversample=-1)


def test_a_zero_sketch_is_refused() -> None:
    with pytest.raises(ValueError, match="zero or non-finite"):
        sketch_factors(torch.eye(5, 3, dtype=torch.float64), torch.zeros(3, 4), rank=2, lr=1e-3)
