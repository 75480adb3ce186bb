"""Pure maths of Fed-SB's sketched initialisation: a federated randomized range finder.

Halko, Martinsson & Tropp, "Finding structure with randomness: probabilistic algorithms for constructing
approximate matrix decompositions", SIAM Review 53(2), 2011, https://arxiv.org/abs/0909.4061 (Alg. 4.1,
with the power scheme of Alg. 4.3/4.4). For G = Σ_k G_k (d_out × d_in) and a test matrix Ω (d_in × ℓ,
ℓ = r + p):

1. every party draws the same Ω from the run seed (no bytes);
2. client k sends Y_k = G_k·Ω; the server takes Q = qr(Σ_k Y_k)  (d_out × ℓ);
3. (q power iterations, each two more exchanges: Z_k = G_kᵀ·Q → W = qr(Σ Z_k); Y_k = G_k·W → Q = qr(Σ Y_k));
4. client k sends Z_k = G_kᵀ·Q; the server has Qᵀ·G = (Σ_k Z_k)ᵀ (ℓ × d_in) and takes its small SVD.

Every exchange is linear in G_k, so the sums equal the single-party randomized SVD of Σ_k G_k. Ω, W and Q
have orthonormal columns, so ‖M·Ω‖_F ≤ ‖M‖_F for any M: a per-example clipped gradient keeps its bound C in
every release (DP sensitivity ≤ C).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from fl.sketch import contraction, orthonormal_basis, sketch_width, test_matrix

__all__ = ["contraction", "orthonormal_basis", "range_finder", "sketch_factors", "sketch_width", "test_matrix"]

Exchange = Callable[[dict[str, torch.Tensor]], Mapping[str, torch.Tensor]]
"""One federated exchange: the server's matrices by module -> the sum of the clients' releases."""


def sketch_factors(
    basis: torch.Tensor, projection: torch.Tensor, *, rank: int, lr: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fed-SB's A, B, R0 from a sketch: B·R0·A = the rank-r truncation of −c·Q·(QᵀG).

    Parameters
    ----------
    basis : Tensor
        Q (d_out × ℓ), orthonormal columns.
    projection : Tensor
        Qᵀ·G (ℓ × d_in).
    rank : int
        r ≤ ℓ.
    lr : float
        η of the dense init (`strategy.init_lr`).

    Notes
    -----
    The dense init factorises −η·sign(G), every entry ±η. sign(G) is not available from sketches, so the
    sketch factorises −c·G restricted to its sketched range, with c chosen so that this rank-ℓ estimate
    has the same root-mean-square entry η as −η·sign(G): c = η·sqrt(d_out·d_in) / ‖QᵀG‖_F. The direction
    differs from the dense init's (measured in BENCHMARKS.md); the scale of R0 is comparable.
    """
    d_out, width = basis.shape
    d_in = projection.shape[1]
    if projection.shape[0] != width or not 0 < rank <= width:
        raise ValueError(f"basis {tuple(basis.shape)}, projection {tuple(projection.shape)}, rank {rank}: mismatch.")
    total = float(projection.double().norm())
    if not math.isfinite(total) or total == 0.0:
        raise ValueError("The sketched init gradient is zero or non-finite; cannot factorise it.")
    scale = lr * math.sqrt(d_out * d_in) / total
    u, s, vh = torch.linalg.svd(projection.double(), full_matrices=False)
    B = -(basis.double() @ u[:, :rank])
    A = vh[:rank]
    R0 = torch.diag(scale * s[:rank])
    return A.float().contiguous(), B.float().contiguous(), R0.float()


def range_finder(
    sketch: Mapping[str, torch.Tensor], *, left: Exchange, right: Exchange, power_iters: int = 0
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """From Y = Σ_k G_k·Ω (exchange 1) to (Q, Qᵀ·G) per module, through the clients' exchanges.

    Parameters
    ----------
    sketch : mapping of str to Tensor
        Σ_k G_k·Ω per module (d_out × ℓ).
    left : callable
        Sends Q (d_out × ℓ) per module; returns Σ_k G_kᵀ·Q (d_in × ℓ).
    right : callable
        Sends W (d_in × ℓ) per module; returns Σ_k G_k·W (d_out × ℓ).
    power_iters : int
        q ≥ 0 power iterations (Halko et al. 2011, Alg. 4.4): Q spans (G·Gᵀ)^q·G·Ω, sharper when G's
        spectrum decays slowly; each costs one `left` and one `right` exchange.

    Returns
    -------
    tuple of dict
        Q (d_out × ℓ, orthonormal columns) and Qᵀ·G (ℓ × d_in), float64.
    """
    if power_iters < 0:
        raise ValueError(f"power_iters={power_iters} must be >= 0.")
    basis = {n: orthonormal_basis(y) for n, y in sketch.items()}
    for _ in range(power_iters):
        co = left(basis)
        w = {n: orthonormal_basis(co[n]) for n in basis}
        y = right(w)
        basis = {n: orthonormal_basis(y[n]) for n in basis}
    z = left(basis)
    return basis, {n: z[n].double().T.contiguous() for n in basis}


def uplink_ratio(d_out: int, d_in: int, *, rank: int, oversample: int, power_iters: int = 0) -> float:
    """Sketch uplink over dense uplink for one module: (1 + q)·ℓ·(d_in + d_out) / (d_in·d_out)."""
    width = sketch_width(d_out, d_in, rank=rank, oversample=oversample)
    return (1 + power_iters) * width * (d_in + d_out) / (d_in * d_out)
