"""The sketch protocol both sides of Fed-SB's sketched init share: the width, the seeded test matrix Ω, the
orthonormal basis and the client's contraction guard (Halko, Martinsson & Tropp 2011; the server's side of the
range finder is `strategies.sketch_math`). In the ground because server and clients must agree on it exactly.
"""

from __future__ import annotations

import zlib

import torch

from fl.checks import derive_seed


def sketch_width(d_out: int, d_in: int, *, rank: int, oversample: int) -> int:
    """ℓ = r + p, capped at min(d_out, d_in) (then the sketch is exact)."""
    if rank < 1 or oversample < 0:
        raise ValueError(f"rank={rank} must be >= 1 and oversample={oversample} >= 0.")
    return min(rank + oversample, d_out, d_in)


def test_matrix(d_in: int, width: int, *, seed: int, name: str) -> torch.Tensor:
    """The shared test matrix Ω (d_in × width, float64, orthonormal columns) of module `name`.

    A Gaussian matrix from a generator seeded by (`seed`, CRC-32 of `name`), orthonormalised by QR: every
    party derives the same Ω without sending it, and orthonormal columns bound the release's sensitivity.
    """
    gen = torch.Generator().manual_seed(derive_seed(seed, stream=zlib.crc32(name.encode()), modulus=2**63))
    gauss = torch.randn(d_in, width, generator=gen, dtype=torch.float64)
    return orthonormal_basis(gauss)


def orthonormal_basis(y: torch.Tensor) -> torch.Tensor:
    """Q of the reduced QR of `y` (float64): orthonormal columns spanning range(y)."""
    q, _ = torch.linalg.qr(y.double(), mode="reduced")
    return q


def contraction(m: torch.Tensor) -> torch.Tensor:
    """`m` scaled so its spectral norm is ≤ 1 (a client's guard on a matrix the server sends).

    A sketch release G·M keeps the sensitivity ≤ C only if ‖M‖₂ ≤ 1; an honest server's M has orthonormal
    columns (‖M‖₂ = 1 up to float error) and is left as it is.
    """
    m = m.double()
    norm = float(torch.linalg.matrix_norm(m, ord=2)) if m.numel() else 0.0
    return m / norm if norm > 1.0 else m
