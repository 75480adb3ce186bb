"""One Gaussian release of a clipped sum at sample rate 1, charged to the client's accountant.

Fed-SB's federated initialisation (Singhal et al. 2025) releases, once or a few times before round 1, a function
of the client's per-example clipped gradients whose sensitivity is at most C: the dense sum Σ_i clip_C(G_i), or a
sketch of it through a matrix of spectral norm ≤ 1 (`fl.sketch.contraction`). Each such release is the Gaussian
mechanism with noise N(0, (σC)²) per entry, every example used with certainty: one step at q = 1.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from opacus.optimizers.optimizer import _generate_noise  # Opacus' own secure draw, reused rather than copied

from privacy.accountant import ClientAccountant

FULL_BATCH = 1.0
"""The sample rate of a release that uses every example (what `ClientAccountant.steps_at` counts them by)."""


def gaussian_release(
    arrays: Mapping[str, torch.Tensor],
    *,
    noise_multiplier: float,
    clip: float,
    generator: torch.Generator,
    accountant: ClientAccountant,
    secure_mode: bool = False,
) -> dict[str, torch.Tensor]:
    """`arrays` plus N(0, (σ·C)²) per entry, charged to `accountant` as one step at sample rate 1.

    Parameters
    ----------
    arrays : mapping of str to Tensor
        A release of sensitivity ≤ `clip` (L2, jointly over every tensor) in one example; not modified.
    noise_multiplier : float
        σ ≥ 0; 0 adds no noise (and the accountant's ε becomes infinite).
    clip : float
        C > 0, the bound the caller clipped each example's contribution to.
    generator : torch.Generator
        Source of the noise, drawn tensor by tensor in the mapping's order (seed it for reproducible runs).
    accountant : ClientAccountant
        The client's persistent accountant.
    secure_mode : bool
        Draw as Opacus' secure_mode does (`opacus.optimizers.optimizer._generate_noise`: the sum of four draws,
        halved, which resists the floating-point attack of Jin et al. 2022); `generator` is then the node's
        CSPRNG (`privacy.noise.csprng_generator`).

    Returns
    -------
    dict of str to Tensor
        The noised tensors, same names, shapes and dtypes.
    """
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}.")
    if not 0 < clip < float("inf"):
        raise ValueError(f"clip must be a finite bound > 0, got {clip}: noise is scaled to it.")
    out = dict(arrays)
    if noise_multiplier > 0:
        std = noise_multiplier * clip
        for name, t in arrays.items():
            if secure_mode:
                out[name] = t + _generate_noise(std, t.float(), generator=generator, secure_mode=True).to(t.dtype)
                continue
            noise = torch.randn(t.shape, generator=generator, device=generator.device)
            out[name] = torch.add(t, noise.to(t.device), alpha=std)
    accountant.step(noise_multiplier=noise_multiplier, sample_rate=FULL_BATCH, steps=1)
    return out
