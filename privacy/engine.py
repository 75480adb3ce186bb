"""Opacus DP-SGD wiring for one client round, charged to the client's persistent accountant.

`make_private` builds the round's GradSampleModule / DPOptimizer / Poisson DPDataLoader with Opacus'
PrivacyEngine, whose accountant is replaced by the client's `ClientAccountant` before anything is
attached: every noisy step lands in the accountant that lives across rounds. Per-example gradients use
Opacus' ``hooks`` mode, which supports PEFT's LoRA layers and keyword inputs (``model(**batch)``).
`release` removes the hooks after the round, so the same module can be made private again next round.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from opacus import GradSampleModule, PrivacyEngine
from torch.utils.data import DataLoader

from privacy.accountant import ClientAccountant


def make_private(
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader,
    noise_multiplier: float,
    max_grad_norm: float,
    accountant: ClientAccountant,
    poisson_sampling: bool = True,
    noise_seed: int | None = None,
) -> tuple[torch.nn.Module, torch.optim.Optimizer, DataLoader]:
    """DP-SGD versions of (model, optimizer, loader); steps are charged to `accountant`.

    Parameters
    ----------
    noise_multiplier : float
        σ, from `privacy.budget.plan_dp`.
    max_grad_norm : float
        Per-example clipping bound C (flat clipping over all trainable tensors).
    noise_seed : int, optional
        Seeds the noise (reproducible simulations). None draws fresh noise.
    """
    engine = PrivacyEngine(accountant=accountant.kind)
    engine.accountant = accountant.opacus  # the persistent accountant receives the optimizer's step hook
    gen = torch.Generator().manual_seed(noise_seed) if noise_seed is not None else None
    module, opt, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=data_loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        poisson_sampling=poisson_sampling,
        grad_sample_mode="hooks",
        noise_generator=gen,
    )
    return module, opt, loader


def release(model: torch.nn.Module) -> torch.nn.Module:
    """Remove Opacus' hooks and per-example gradients; returns the plain module."""
    if isinstance(model, GradSampleModule):
        return model.to_standard_module()
    return model


def noisy_gradient_sum(
    *,
    model: torch.nn.Module,
    params: dict[str, torch.nn.Parameter],
    batches: Iterable[dict[str, torch.Tensor]],
    max_grad_norm: float,
    noise_multiplier: float,
    generator: torch.Generator | None = None,
    accountant: ClientAccountant | None = None,
) -> dict[str, torch.Tensor]:
    """Σ over examples of per-example gradients w.r.t. `params`, each clipped jointly to norm ≤ C, plus
    N(0, (σC)²) noise per coordinate; charged to `accountant` as one full-batch step (sample rate 1).

    Used for Fed-SB's federated initialisation. `params` may be frozen base weights: they are made
    trainable only inside this call. Per-example gradients come one example at a time (bounded memory:
    the dense gradients of all adapted weights, once).
    """
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    total = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    try:
        for batch in batches:
            for i in range(batch["labels"].shape[0]):
                one = {k: v[i : i + 1] for k, v in batch.items()}
                grads = torch.autograd.grad(model(**one).loss, list(params.values()))
                norm = torch.sqrt(torch.stack([(g.float() ** 2).sum() for g in grads]).sum())
                factor = min(1.0, max_grad_norm / (float(norm) + 1e-12)) if max_grad_norm != float("inf") else 1.0
                for n, g in zip(params, grads, strict=True):
                    total[n] += factor * g.float()
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    if noise_multiplier > 0:
        std = noise_multiplier * max_grad_norm
        for n in total:
            total[n] += torch.normal(0.0, std, size=total[n].shape, generator=generator)
    if accountant is not None:
        accountant.step(noise_multiplier=noise_multiplier, sample_rate=1.0, steps=1)
    return total
