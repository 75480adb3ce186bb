"""Property tests of the aggregation maths with random factors (strategies/lora_math.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies.lora_math import (
    combine_residuals,
    fair_correction_closed_form,
    fair_correction_sgd,
    fedsb_init_factors,
    ideal_update,
    relative_residual,
    weighted_average,
)

dims = st.tuples(st.integers(2, 12), st.integers(2, 12), st.integers(1, 4), st.integers(2, 5), st.integers(0, 10_000))


def _factors(d_out: int, d_in: int, r: int, k: int, seed: int):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    As = [torch.randn(r, d_in, generator=g) for _ in range(k)]
    Bs = [torch.randn(d_out, r, generator=g) for _ in range(k)]
    w = (torch.rand(k, generator=g) + 0.1).tolist()
    return As, Bs, w, g


@settings(max_examples=60, deadline=None, derandomize=True)
@given(dims)
def test_ffa_aggregation_is_exact(d) -> None:  # type: ignore[no-untyped-def]
    d_out, d_in, r, k, seed = d
    As, Bs, w, _ = _factors(d_out, d_in, r, k, seed)
    A = As[0]  # FFA: one frozen A shared by all
    b_bar = weighted_average([{"b": b} for b in Bs], w)["b"]
    dw = ideal_update([A] * k, Bs, w)
    assert torch.allclose(b_bar @ A, dw, atol=1e-4)
    assert combine_residuals([relative_residual(dw, b_bar, A)]) < 1e-5


@settings(max_examples=60, deadline=None, derandomize=True)
@given(dims)
def test_fedsb_aggregation_is_exact(d) -> None:  # type: ignore[no-untyped-def]
    d_out, d_in, r, k, seed = d
    As, Bs, w, g = _factors(d_out, d_in, r, k, seed)
    A, B = As[0], Bs[0]
    Rs = [torch.randn(r, r, generator=g) for _ in range(k)]
    r_bar = weighted_average([{"r": x} for x in Rs], w)["r"]
    dw = ideal_update([A] * k, [B @ x for x in Rs], w)
    assert combine_residuals([relative_residual(dw, B, A, r_bar)]) < 1e-5


def test_fedit_is_inexact() -> None:
    As, Bs, w, _ = _factors(16, 12, 4, 3, 0)
    a_bar = weighted_average([{"a": a} for a in As], w)["a"]
    b_bar = weighted_average([{"b": b} for b in Bs], w)["b"]
    assert combine_residuals([relative_residual(ideal_update(As, Bs, w), b_bar, a_bar)]) > 1e-3


@pytest.mark.parametrize("lam", [0.0, 0.01, 1.0])
def test_fair_closed_form_equals_brute_force_least_squares(lam: float) -> None:
    As, Bs, w, _ = _factors(20, 15, 4, 3, 1)
    dw = ideal_update(As, Bs, w).double()
    a_bar = weighted_average([{"a": a} for a in As], w)["a"].double()
    b_bar = weighted_average([{"b": b} for b in Bs], w)["b"].double()
    ours = fair_correction_closed_form(dw, a_bar, b_bar, lam=lam).double()
    # min ||dW - B'A||^2 + lam ||B' - B_bar||^2 is a least-squares problem on a stacked system:
    # [A^T; sqrt(lam) I] B'^T = [dW^T; sqrt(lam) B_bar^T]
    lhs = torch.cat([a_bar.T, (lam**0.5) * torch.eye(4, dtype=torch.float64)])
    rhs = torch.cat([dw.T, (lam**0.5) * b_bar.T])
    brute = torch.linalg.lstsq(lhs, rhs).solution.T
    assert torch.allclose(ours, brute, atol=1e-5)
    before = combine_residuals([relative_residual(dw, b_bar, a_bar)])
    after = combine_residuals([relative_residual(dw, ours, a_bar)])
    assert after <= before + 1e-9


@pytest.mark.parametrize("scale", [1e-3, 1e-1])
def test_fair_gradient_descent_improves_similarity_and_closed_form_is_no_worse(scale: float) -> None:
    As, Bs, w, _ = _factors(24, 18, 4, 4, 2)
    Bs = [b * scale for b in Bs]
    dw = ideal_update(As, Bs, w)
    a_bar = weighted_average([{"a": a} for a in As], w)["a"]
    b_bar = weighted_average([{"b": b} for b in Bs], w)["b"]

    def cos(b: torch.Tensor) -> float:
        return float(torch.nn.functional.cosine_similarity((b @ a_bar).flatten(), dw.flatten(), dim=0))

    sgd = fair_correction_sgd(dw, a_bar, b_bar, lam=0.01, lr=1e-2, steps=1000)
    closed = fair_correction_closed_form(dw, a_bar, b_bar, lam=0.01)
    assert cos(sgd) > cos(b_bar)
    res = {name: combine_residuals([relative_residual(dw, b, a_bar)]) for name, b in [("sgd", sgd), ("closed", closed)]}
    assert res["closed"] <= res["sgd"] + 1e-6


@pytest.mark.parametrize(("d_out", "d_in", "rank"), [(12, 8, 3), (8, 12, 8), (6, 6, 6)])
def test_fedsb_init_is_the_rank_r_truncation_of_minus_eta_sign(d_out: int, d_in: int, rank: int) -> None:
    g = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(d_out * d_in))
    eta = 1e-3
    A, B, R0 = fedsb_init_factors(g, rank=rank, lr=eta)
    assert A.shape == (rank, d_in) and B.shape == (d_out, rank) and R0.shape == (rank, rank)
    target = -eta * np.sign(g.numpy().astype(np.float64))
    u, s, vt = np.linalg.svd(target)
    truncation = (u[:, :rank] * s[:rank]) @ vt[:rank]  # Eckart-Young
    assert np.allclose((B @ R0 @ A).double().numpy(), truncation, atol=1e-6)
    if rank == min(d_out, d_in):
        assert np.allclose((B @ R0 @ A).double().numpy(), target, atol=1e-6)


def test_bad_input_names_the_problem() -> None:
    with pytest.raises(ValueError, match="rank"):
        fedsb_init_factors(torch.randn(4, 4), rank=0, lr=1e-3)
    with pytest.raises(ValueError, match="shape"):
        fair_correction_closed_form(torch.randn(4, 5), torch.randn(2, 6), torch.randn(4, 2))
    with pytest.raises(ValueError, match="weights"):
        weighted_average([{"a": torch.zeros(2)}], [0.0])
    with pytest.raises(ValueError, match="keys"):
        weighted_average([{"a": torch.zeros(2)}, {"b": torch.zeros(2)}], [1.0, 1.0])
    with pytest.raises(ValueError, match="shapes"):
        weighted_average([{"a": torch.zeros(2)}, {"a": torch.zeros(3)}], [1.0, 1.0])
