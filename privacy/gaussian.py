"""Gaussian releases of a clipped sum at sample rate 1, charged to the client's accountant.

Fed-SB's federated initialisation (Singhal et al. 2025) releases, once or a few times before round 1, a function
of the client's per-example clipped gradients whose sensitivity is at most C: the dense sum Σ_i clip_C(G_i)
(`noisy_gradient_sum`), or a sketch of it through a matrix of spectral norm ≤ 1 (`fl.sketch.contraction`). Each such
release is the Gaussian mechanism with noise N(0, (σC)²) per entry, every example used with certainty: one step at
q = 1 (`gaussian_release`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import overload

import torch
from opacus import GradSampleModule
from opacus.grad_sample import AbstractGradSampleModule

# Opacus 1.6.0 draws its secure noise (the floating-point-attack-resistant sum of draws) only in this private
# helper of DPOptimizer.add_noise, with no public equivalent; a copy would fork a security-relevant routine.
from opacus.optimizers.optimizer import _generate_noise

from privacy.accountant import ClientAccountant
from privacy.engine import quiet_hooks, release

LossFn = Callable[[torch.nn.Module, Mapping[str, torch.Tensor]], torch.Tensor]
"""(model, batch) -> per-example losses, shape (batch,)."""

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


@overload
def noisy_gradient_sum(
    *,
    model: torch.nn.Module,
    params: Sequence[torch.nn.Parameter],
    batches: Iterable[Mapping[str, torch.Tensor]],
    loss_fn: LossFn,
    max_grad_norm: float,
    noise_multiplier: float,
    generator: torch.Generator | None = ...,
    accountant: ClientAccountant | None = ...,
    micro_batch_size: int = ...,
) -> list[torch.Tensor]: ...


@overload
def noisy_gradient_sum(
    *,
    model: torch.nn.Module,
    params: Mapping[str, torch.nn.Parameter],
    batches: Iterable[Mapping[str, torch.Tensor]],
    loss_fn: LossFn,
    max_grad_norm: float,
    noise_multiplier: float,
    generator: torch.Generator | None = ...,
    accountant: ClientAccountant | None = ...,
    micro_batch_size: int = ...,
) -> dict[str, torch.Tensor]: ...


def noisy_gradient_sum(
    *,
    model: torch.nn.Module,
    params: Sequence[torch.nn.Parameter] | Mapping[str, torch.nn.Parameter],
    batches: Iterable[Mapping[str, torch.Tensor]],
    loss_fn: LossFn,
    max_grad_norm: float,
    noise_multiplier: float,
    generator: torch.Generator | None = None,
    accountant: ClientAccountant | None = None,
    micro_batch_size: int = 8,
) -> list[torch.Tensor] | dict[str, torch.Tensor]:
    """Σ over examples of per-example gradients w.r.t. `params`, clipped, plus Gaussian noise.

    Each example's gradient (jointly over all `params`) is scaled to L2 norm ≤ C = `max_grad_norm`, the
    clipped gradients are summed in float32, and N(0, (σC)²) is added per coordinate when σ > 0. The result
    is charged to `accountant` as ONE step at sample rate 1.0 (each example is used once, with certainty).
    Used for Fed-SB's federated initialisation, where `params` are dense base weights.

    Parameters
    ----------
    model : torch.nn.Module
        A plain module (not wrapped by Opacus). Its train/eval mode is kept (eval: no dropout); only the
        modules owning `params` are flagged as training, which Opacus' hooks need to record activations.
    params : sequence or mapping of Parameter
        Parameters of `model`, frozen or not: only these require grad during the call, then every flag is
        restored. The result has the same shape: a list, or a dict with the same names.
    batches : iterable of dict
        Batch-first tensors; each batch is processed in micro-batches of `micro_batch_size` examples,
        which bounds memory (per-example gradients of dense weights: micro_batch_size × their size).
    loss_fn : callable
        ``(model, batch) -> losses`` of shape (batch,), the task's (`fl.tasks.Task.loss_of`).
    max_grad_norm : float
        C > 0; ``inf`` disables clipping (then no noise is allowed).
    noise_multiplier : float
        σ ≥ 0.
    generator : torch.Generator, optional
        Source of the noise (seed it for reproducible runs).
    accountant : ClientAccountant, optional
        Charged (σ, q = 1, 1 step) once the sum is computed.
    micro_batch_size : int
        Examples per forward/backward pass.
    """
    if not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}.")
    if noise_multiplier < 0 or (noise_multiplier > 0 and max_grad_norm == float("inf")):
        raise ValueError(
            f"noise_multiplier={noise_multiplier} with max_grad_norm={max_grad_norm}: "
            "noise needs σ ≥ 0 and a finite clipping bound."
        )
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}.")
    if isinstance(model, AbstractGradSampleModule):
        raise ValueError("Pass the plain module (privacy.unwrap(model)), not an Opacus GradSampleModule.")
    names = list(params) if isinstance(params, Mapping) else None
    plist = list(params.values()) if isinstance(params, Mapping) else list(params)
    wanted = {id(p) for p in plist}
    if not plist or len(wanted) != len(plist) or not wanted <= {id(p) for p in model.parameters()}:
        raise ValueError("params must be distinct parameters of model, at least one.")

    all_params = list(model.parameters())
    flags = [p.requires_grad for p in all_params]
    owners = [m for m in model.modules() if any(id(p) in wanted for p in m.parameters(recurse=False))]
    modes = [m.training for m in owners]
    grads = [p.grad for p in plist]
    totals = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in plist]
    gsm: GradSampleModule | None = None
    try:
        for p in all_params:
            p.requires_grad_(id(p) in wanted)
        for m in owners:
            m.training = True
        gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
        for micro in _micro_batches(batches, micro_batch_size):
            for p in plist:
                p.grad = None
                p.grad_sample = None  # type: ignore[attr-defined]  # Opacus' per-example gradient slot
            with quiet_hooks():
                loss_fn(gsm, micro).sum().backward()
            _add_clipped(totals, plist, max_grad_norm)
    finally:
        release(gsm if gsm is not None else model)
        for p, flag in zip(all_params, flags, strict=True):
            p.requires_grad_(flag)
        for p, grad in zip(plist, grads, strict=True):
            p.grad = grad
        for m, mode in zip(owners, modes, strict=True):
            m.training = mode
    if noise_multiplier > 0:
        std = noise_multiplier * max_grad_norm
        for total in totals:
            total.add_(torch.randn(total.shape, generator=generator, device=total.device), alpha=std)
    if accountant is not None:
        accountant.step(noise_multiplier=noise_multiplier, sample_rate=1.0, steps=1)
    return dict(zip(names, totals, strict=True)) if names is not None else totals


def _micro_batches(batches: Iterable[Mapping[str, torch.Tensor]], size: int) -> Iterator[Mapping[str, torch.Tensor]]:
    for batch in batches:
        n = len(next(iter(batch.values())))
        for start in range(0, n, size):
            yield {k: v[start : start + size] for k, v in batch.items()}


def _add_clipped(totals: list[torch.Tensor], params: list[torch.nn.Parameter], max_grad_norm: float) -> None:
    """Add Σ_i min(1, C / ‖g_i‖) g_i to `totals`, from the per-example gradients Opacus left in `grad_sample`."""
    samples = []
    for p in params:
        gs = getattr(p, "grad_sample", None)
        if gs is None:
            raise ValueError("A parameter in params got no per-example gradient: is it used by the forward pass?")
        samples.append(gs.float())
    norms = torch.stack([g.reshape(len(g), -1).pow(2).sum(dim=1) for g in samples]).sum(dim=0).sqrt()
    factors = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    for total, g in zip(totals, samples, strict=True):
        total.add_(torch.einsum("i,i...->...", factors, g))
