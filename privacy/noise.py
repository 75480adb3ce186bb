"""Where a node's DP randomness comes from: its Gaussian noise and its Poisson sampling.

DP-SGD protects a client's examples from the server only if the server cannot reproduce the client's noise: a
server that can regenerate the noise can subtract it, and one that can replay the Poisson sampling knows which
examples each step used, which voids privacy amplification by subsampling. The run seed is the server's (it arrives
in every message), so on a deployment node neither may be seeded from it:

- Opacus' `secure_mode` (``privacy-secure-rng=true``, or ``auto`` where torchcsprng is installed): a CSPRNG for
  both, and noise drawn to resist the floating-point attack of Jin et al. (2022).
- otherwise, on a deployment node: torch's generator, seeded each round with 63 fresh bits from the OS
  (`secrets`), separately for the noise and the sampling. Not a CSPRNG stream, but seeds the server cannot know.
- in a simulation: the seed derived from the run seed, and the sampling from the training RNG it seeds, so runs
  reproduce (the simulated server is the experimenter).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fl.runtime_env import in_simulation

log = logging.getLogger(__name__)

NODE_SECURE_RNG = "privacy-secure-rng"  # node config: true | false | auto (default: auto on deployment nodes)
SECURE_RNG_MISSING = (
    "privacy-secure-rng=true: Opacus' secure_mode needs the torchcsprng "
    "package, which is not installed (PyPI has no build of it for torch 2.x). Install a torchcsprng built for "
    "this torch, or start the SuperNode with --node-config '... privacy-secure-rng=false' to draw the noise from "
    "torch's generator, seeded by the node (not cryptographically secure)."
)
_warned_insecure = False


def csprng_available() -> bool:
    """Whether Opacus' `secure_mode` can run here: it needs the torchcsprng package (PyPI has no build of it for
    torch 2.x, so most installs lack it)."""
    try:
        import torchcsprng  # noqa: F401
    except ImportError:
        return False
    return True


def csprng_generator() -> torch.Generator:
    """A CSPRNG generator over /dev/urandom, as Opacus' `PrivacyEngine(secure_mode=True)` makes its own; raises
    SECURE_RNG_MISSING (the fix) without torchcsprng."""
    try:
        import torchcsprng
    except ImportError as e:
        raise RuntimeError(SECURE_RNG_MISSING) from e
    gen: torch.Generator = torchcsprng.create_random_device_generator("/dev/urandom")
    return gen


def secure_rng(node_config: Mapping[str, Any]) -> bool:
    """Whether this node draws DP noise with Opacus' `secure_mode` (a CSPRNG, and noise that resists the
    floating-point attack of Jin et al. 2022).

    ``privacy-secure-rng=true`` demands it (a node without torchcsprng then fails its first DP round with the
    fix); ``false`` turns it off; unset or ``auto`` uses it on deployment nodes where torchcsprng is installed and
    otherwise warns once that the noise comes from torch's generator (seeded by the node, `noise_source`).
    Simulations keep their seeded generator (reproducible runs)."""
    global _warned_insecure
    raw = node_config.get(NODE_SECURE_RNG)
    value = "auto" if raw is None or str(raw).strip() == "" else str(raw).strip().lower()
    if value not in ("true", "false", "1", "0", "auto"):
        raise ValueError(f"Node config {NODE_SECURE_RNG}={raw!r} must be true, false or auto.")
    if value != "auto":
        return value in ("true", "1")
    if in_simulation():
        return False
    if csprng_available():
        return True
    if not _warned_insecure:
        _warned_insecure = True
        log.warning(
            "DP noise on this node comes from torch's generator (seeded by the node, not the server), not a CSPRNG: "
            "Opacus' secure_mode needs torchcsprng (not installed). Install it and set --node-config '%s=true' to "
            "demand it, or '%s=false' to silence this.",
            NODE_SECURE_RNG,
            NODE_SECURE_RNG,
        )
    return False


@dataclass(frozen=True)
class NoiseSource:
    """A node's DP randomness for one round; the default is torch's unseeded noise and sampling.

    Attributes
    ----------
    secure : bool
        Opacus' secure_mode: a CSPRNG for the noise and the sampling (the seeds below are then None).
    noise_seed : int or None
        The seed of torch's generator for the noise.
    sampling_seed : int or None
        The seed of the Poisson sampler's own generator; None: the sampler draws from the training RNG, which the
        run seed seeds (simulations only, where results must reproduce).
    """

    secure: bool = False
    noise_seed: int | None = None
    sampling_seed: int | None = None

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        """The noise's generator: the CSPRNG under secure_mode, else torch's, seeded with `noise_seed`."""
        if self.secure:
            return csprng_generator()
        assert self.noise_seed is not None
        return torch.Generator(device=device).manual_seed(self.noise_seed)


def noise_source(node_config: Mapping[str, Any], *, seed: int) -> NoiseSource:
    """This node's DP randomness for a round whose run-derived seed is `seed` (module docstring)."""
    if secure_rng(node_config):
        return NoiseSource(True, None, None)
    if in_simulation():
        return NoiseSource(False, seed, None)
    return NoiseSource(False, secrets.randbits(63), secrets.randbits(63))
