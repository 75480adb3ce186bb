"""Pure maths of FedSVD's server step (`strategies.fedsvd`): the SVD re-factorisation of B·A, and the fixed
orthonormal frame a server optimizer steps B in (see tests/test_fedsvd.py for the property tests).

Notation: A is r × d_in (rows: the adapter's input directions), B is d_out × r; the adapter's update is s·B·A.
Every function computes in float64 and returns the dtype of its main input.
"""

from __future__ import annotations

import torch


def _check(B: torch.Tensor, A: torch.Tensor) -> tuple[int, int, int]:
    """(d_out, r, d_in), or a ValueError naming the shapes."""
    if A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(f"shape mismatch: B {tuple(B.shape)} must be d_out x r and A {tuple(A.shape)} r x d_in")
    (d_out, r), d_in = B.shape, A.shape[1]
    if r > d_in:
        raise ValueError(f"rank r={r} exceeds d_in={d_in}: A cannot have {r} orthonormal rows in {d_in} dimensions")
    return int(d_out), int(r), int(d_in)


def orthonormal_frame(A: torch.Tensor) -> torch.Tensor:
    """F (r × d_in) with orthonormal rows spanning A's row space (A full rank), from the reduced QR of Aᵀ.

    For a rank-deficient A the frame still has r orthonormal rows; it then spans more than A's rows.
    """
    q, _ = torch.linalg.qr(A.double().T, mode="reduced")
    return q.T.contiguous().to(A.dtype)


def refactorize(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FedSVD's re-factorisation: (B', A') with B'·A' = B·A, A' with orthonormal rows, B' = U_r·Σ_r.

    B·A has rank ≤ r, so its thin SVD needs no dense d_out × d_in matrix: with Aᵀ = Q·R (reduced QR, Q d_in × r
    orthonormal) B·A = (B·Rᵀ)·Qᵀ; the SVD of the small M = B·Rᵀ = U·Σ·Wᵀ (d_out × r) gives
    B·A = U·Σ·(Q·W)ᵀ, so A' = Wᵀ·Qᵀ (the right singular vectors of B·A, as rows) and B' = U·Σ (the left ones
    scaled by the singular values, in descending order). Cost O((d_out + d_in)·r²), not O(d_out·d_in·min(d)).

    For singular values that are distinct and non-zero this is the full SVD's top r up to each pair's sign (what
    the authors' `torch.linalg.svd(B @ A)` gives). Where B·A has rank < r the trailing rows of A' complete the
    basis inside A's row space (Q's span), and their columns of B' are zero; a full SVD completes them anywhere
    in R^{d_in}. Either way B'·A' = B·A. With d_out < r, Σ has d_out entries and B' is zero-padded to r columns.

    Parameters
    ----------
    B : Tensor
        d_out × r (e.g. FedSVD's averaged B̄).
    A : Tensor
        r × d_in, with r ≤ d_in (the previous round's A).

    Returns
    -------
    B_new, A_new : Tensor
        d_out × r and r × d_in, in B's and A's dtypes.
    """
    d_out, r, _ = _check(B, A)
    q, rr = torch.linalg.qr(A.double().T, mode="reduced")  # Aᵀ = Q·R
    m = B.double() @ rr.T  # d_out × r
    u, s, wh = torch.linalg.svd(m, full_matrices=d_out < r)  # wh is r × r either way
    k = s.numel()
    b_new = torch.zeros(d_out, r, dtype=torch.float64)
    b_new[:, :k] = u[:, :k] * s
    a_new = wh @ q.T
    return b_new.to(B.dtype), a_new.to(A.dtype)


def frame_map(A: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
    """G = A·Fᵀ (r × r, float64): B·G are the coordinates of B·A's rows in the frame F, i.e. B·A = (B·G)·F when
    A's rows lie in F's span. Invertible when A has full rank r; orthogonal when A's rows are orthonormal too."""
    return A.double() @ F.double().T


def to_frame(B: torch.Tensor, A: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
    """C = B·A·Fᵀ (d_out × r, float64): the update B·A in the fixed orthonormal frame F (‖C‖ = ‖B·A‖)."""
    return B.double() @ frame_map(A, F)


def from_frame(C: torch.Tensor, A: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
    """B with B·A = C·F: the inverse of `to_frame` for a full-rank A whose rows lie in F's span (float64)."""
    return torch.linalg.solve(frame_map(A, F), C.double(), left=False)


def orthonormality_error(A: torch.Tensor) -> float:
    """max |A·Aᵀ − I| (0 for orthonormal rows)."""
    a = A.double()
    return float((a @ a.T - torch.eye(a.shape[0], dtype=torch.float64)).abs().max())


def outside_span(A: torch.Tensor, F: torch.Tensor) -> float:
    """‖A − A·Fᵀ·F‖ / ‖A‖: how far A's rows leave F's span (0 when they lie in it; F orthonormal)."""
    a, f = A.double(), F.double()
    norm = float(a.norm())
    return float((a - a @ f.T @ f).norm()) / norm if norm > 0 else 0.0
