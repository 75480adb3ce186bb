"""Opacus DP-SGD wiring for one client round, charged to the client's persistent accountant.

`private_round` builds the round's GradSampleModule / DPOptimizer / Poisson DPDataLoader from Opacus' public
parts, with the DP optimizer's step hook on the client's `ClientAccountant.opacus`, so every noisy step lands in
the accountant that lives across rounds. What it runs is two small settings objects: `DPSGD` (the mechanism σ, C,
clipping, sampling) and `privacy.noise.NoiseSource` (where the node's randomness comes from). `release` removes the
hooks at the end of the round: the client reuses the same module next round, and hooks left in place would stack.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from opacus.data_loader import DPDataLoader, switch_generator
from opacus.grad_sample import AbstractGradSampleModule, prepare_module
from opacus.grad_sample.gsm_base import OPACUS_PARAM_MONKEYPATCH_ATTRS
from opacus.optimizers import DPOptimizer, get_optimizer_class
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from opacus.validators import ModuleValidator
from torch.utils.data import DataLoader

from privacy.accountant import ClientAccountant
from privacy.clipping import CLIPPINGS, PerLayerOptimizer, per_layer_bounds
from privacy.noise import NoiseSource, csprng_generator

log = logging.getLogger(__name__)

GRAD_SAMPLE_MODES = ("hooks", "ghost", "functorch")
"""Opacus modes that work with keyword inputs (``model(**batch)``). ``hooks`` materialises per-example
gradients; ``ghost`` (fast gradient clipping with ghost norms, Li et al. 2022 / Bu et al. 2023) computes only
their norms and then a second, reweighted backward pass, through the objective `private_round` returns.
``ew`` takes positional inputs only."""
FULL_HOOK_WARNING = "Full backward hook is firing when gradients are computed with respect to module outputs"

# per-parameter and per-module state Opacus leaves behind (the DP optimizer's sums; a forward without backward)
_PARAM_ATTRS = (*OPACUS_PARAM_MONKEYPATCH_ATTRS, "summed_grad")
_MODULE_ATTRS = ("activations", "max_batch_len")

ExampleLoss = Callable[[Any, Mapping[str, torch.Tensor]], torch.Tensor]
"""(model outputs, batch) -> per-example losses, shape (batch,): the one place a task defines its loss."""

Objective = Callable[[Any, Mapping[str, torch.Tensor]], Any]
"""(model outputs, physical batch) -> something with ``.backward()`` and ``.detach()`` (the batch mean)."""


@dataclass(frozen=True)
class DPSGD:
    """One round's DP-SGD mechanism (from the client's plan and `PrivacySettings`).

    Attributes
    ----------
    noise_multiplier : float
        σ, from `privacy.budget.plan_dp`.
    max_grad_norm : float
        The per-example clipping bound C.
    clipping : str
        ``"flat"`` (one L2 norm over all trainable tensors) or ``"per_layer"`` (`CLIPPINGS`; hooks or functorch).
    head_clip_share : float, optional
        per_layer only: the fraction of C² given to the task head's tensors (PEFT ``modules_to_save``), the rest
        split equally over the other trainable tensors; None: C² split equally over all.
    grad_sample_mode : str
        ``"hooks"``, ``"ghost"`` or ``"functorch"`` (`GRAD_SAMPLE_MODES`).
    poisson_sampling : bool
        Poisson batches (a `DPDataLoader`, sample rate ``1 / len(loader)``), as the accounting assumes; False
        keeps the loader.
    """

    noise_multiplier: float
    max_grad_norm: float
    clipping: str = "flat"
    head_clip_share: float | None = None
    grad_sample_mode: str = "hooks"
    poisson_sampling: bool = True

    def __post_init__(self) -> None:
        mode, clipping = self.grad_sample_mode, self.clipping
        if mode not in GRAD_SAMPLE_MODES:
            raise ValueError(f"grad_sample_mode={mode!r} is not supported; use one of {GRAD_SAMPLE_MODES}.")
        if clipping not in CLIPPINGS or (clipping == "per_layer" and mode == "ghost"):
            raise ValueError(
                f"clipping={clipping!r} with grad_sample_mode={mode!r} is not supported; use flat, or "
                "per_layer with hooks or functorch."
            )


class PerExampleCriterion(torch.nn.Module):
    """An `ExampleLoss` as the criterion Opacus' ghost clipping wraps: ``reduction`` is flipped to
    ``"none"`` by Opacus for the per-example pass, ``"mean"``/``"sum"`` reduce as in ``torch.nn`` losses."""

    def __init__(self, loss_fn: ExampleLoss, reduction: str = "mean") -> None:
        super().__init__()
        self.loss_fn = loss_fn
        self.reduction = reduction

    def forward(self, outputs: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        losses = self.loss_fn(outputs, batch)
        if self.reduction == "none":
            return losses
        return losses.sum() if self.reduction == "sum" else losses.mean()


@contextmanager
def quiet_hooks() -> Iterator[None]:
    """Backward passes through Opacus' hooks on a frozen base, without torch's full-backward-hook notice.

    The first hooked module's inputs need no gradient, so torch warns on every step that its full backward hook
    sees the outputs' gradients only. Those are all Opacus uses (per-example gradients come from the saved
    activations and the outputs' gradients), so the notice is noise; it is silenced for these passes only.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=FULL_HOOK_WARNING, category=UserWarning)
        yield


class _QuietLoss(NamedTuple):
    """A loss whose ``backward()`` runs under `quiet_hooks`."""

    loss: Any

    def backward(self) -> None:
        with quiet_hooks():
            self.loss.backward()

    def detach(self) -> torch.Tensor:
        return self.loss.detach()


class PrivateRound(NamedTuple):
    """One round's DP-SGD objects (from `private_round`).

    ``objective(outputs, batch)`` is what the loop calls ``.backward()`` on for each physical batch: the
    batch-mean loss (hooks, functorch) or Opacus' ghost-clipping loss, which runs both backward passes.
    """

    module: torch.nn.Module
    optimizer: DPOptimizer
    data_loader: DataLoader
    objective: Objective


Wrap = Callable[[torch.nn.Module, torch.optim.Optimizer, DataLoader], PrivateRound]
"""(model, optimizer, loader) -> this round's DP-SGD objects: what `clients.train.local_train` takes as ``wrap``."""


def private_round(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader,
    *,
    mechanism: DPSGD,
    accountant: ClientAccountant,
    loss_fn: ExampleLoss,
    noise: NoiseSource | None = None,
) -> PrivateRound:
    """DP-SGD versions of (model, optimizer, loader) for one round; every step is charged to `accountant`.

    Parameters
    ----------
    model : torch.nn.Module
        The plain module (e.g. a PEFT LoRA model), in training mode; its ``requires_grad`` parameters must be
        exactly the optimizer's. On an accelerator, move the base model to its device *before* ``get_peft_model``,
        or the LoRA weights may never update under Opacus (`fl.app.workspace` does; tests/test_privacy_session.py).
    optimizer : torch.optim.Optimizer
        Over the model's trainable parameters.
    data_loader : DataLoader
        Batches of dicts; the accountant is charged sample rate ``1 / len(data_loader)`` per step (what
        `privacy.budget.plan_dp` plans with).
    mechanism : DPSGD
        σ, C, the clipping and the sampling.
    accountant : ClientAccountant
        The client's persistent accountant; each optimizer step adds (σ, q, 1) to it.
    loss_fn : callable
        ``(outputs, batch) -> per-example losses``, the task's (`fl.tasks.Task.per_example_loss`); ghost
        clipping needs the loss per example.
    noise : NoiseSource, optional
        The node's randomness (`privacy.noise.noise_source`): Opacus' secure_mode (a CSPRNG for noise and
        sampling; raises with the fix when torchcsprng is missing), or torch's generator seeded with
        ``noise_seed`` (None: fresh noise) and the Poisson sampler's own generator seeded with ``sampling_seed``
        (None: the loader's generator, else torch's global RNG, which the training loop seeds in simulations).

    Returns
    -------
    PrivateRound
        (module, DPOptimizer, DataLoader, objective). Call the module with keyword inputs, ``module(**inputs)``;
        Opacus' hooks sit on the submodules, so the top-level call signature is free. Backpropagate
        ``objective(outputs, batch)``. A logical batch larger than memory allows is split into physical ones with
        ``optimizer.signal_skip_step(do_skip=True)`` before every physical step but the last (what Opacus'
        ``BatchMemoryManager`` does). Skip empty Poisson batches (no step, no charge) and call `release` on the
        module when the round ends.
    """
    m, noise = mechanism, noise or NoiseSource()
    if isinstance(model, AbstractGradSampleModule) or hasattr(model, "autograd_grad_sample_hooks"):
        raise ValueError("The model still carries Opacus hooks from an earlier round; call release(model) first.")
    if not {id(p) for g in optimizer.param_groups for p in g["params"]} <= {id(p) for p in model.parameters()}:
        raise ValueError("The optimizer's parameters must be parameters of the model.")
    # What Opacus' PrivacyEngine.make_private assembles, from the same public parts: the engine picks the optimizer
    # class itself (we need PerLayerOptimizer's dtype fix) and charges an accountant of its own (we charge the one
    # the client keeps across rounds).
    ModuleValidator.validate(model, strict=True)
    secure_rng = csprng_generator() if noise.secure else None
    bound: float | list[float] = m.max_grad_norm
    if m.clipping == "per_layer":  # Opacus wants one bound per optimizer parameter; their L2 norm is C
        bound = per_layer_bounds(model, optimizer, m.max_grad_norm, head_share=m.head_clip_share)
    ghost = {"max_grad_norm": bound} if m.grad_sample_mode == "ghost" else {}
    module = prepare_module(model, m.grad_sample_mode, batch_first=True, loss_reduction="mean", **ghost)
    loader = data_loader
    if m.poisson_sampling:
        module.forbid_grad_accumulation()
        loader = DPDataLoader.from_data_loader(data_loader, generator=secure_rng)
        if noise.sampling_seed is not None and not noise.secure:
            # the sampler's only: given to from_data_loader it would also be the loader's, which draws from it per pass
            loader.batch_sampler.generator = torch.Generator().manual_seed(noise.sampling_seed)
    elif secure_rng is not None:
        loader = switch_generator(data_loader=data_loader, generator=secure_rng)
    sample_rate = 1 / len(loader)
    # Opacus draws the noise on the parameters' device with this generator, so it must live there (a CPU
    # generator fails on CUDA); the same seed gives the same noise on one device, not across devices.
    device = next((p.device for g in optimizer.param_groups for p in g["params"]), torch.device("cpu"))
    generator = secure_rng
    if noise.noise_seed is not None and not noise.secure:
        generator = torch.Generator(device=device).manual_seed(noise.noise_seed)
    flat = get_optimizer_class("flat", distributed=False, grad_sample_mode=m.grad_sample_mode)
    dp_optimizer = (PerLayerOptimizer if m.clipping == "per_layer" else flat)(
        optimizer,
        noise_multiplier=m.noise_multiplier,
        max_grad_norm=bound,
        expected_batch_size=int(len(loader.dataset) * sample_rate),  # type: ignore[arg-type]
        loss_reduction="mean",
        generator=generator,
        secure_mode=noise.secure,
    )
    dp_optimizer.attach_step_hook(accountant.opacus.get_optimizer_hook_fn(sample_rate=sample_rate))
    log.debug("DP-SGD round: %s, σ=%.4g, q=%.4g", m, m.noise_multiplier, sample_rate)
    if m.grad_sample_mode == "ghost":
        criterion = DPLossFastGradientClipping(module, dp_optimizer, PerExampleCriterion(loss_fn), "mean")
        return PrivateRound(module, dp_optimizer, loader, lambda out, batch: _QuietLoss(criterion(out, batch)))
    return PrivateRound(module, dp_optimizer, loader, lambda out, batch: _QuietLoss(loss_fn(out, batch).mean()))


def make_private(
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader,
    noise_multiplier: float,
    max_grad_norm: float,
    accountant: ClientAccountant,
    loss_fn: ExampleLoss,
    poisson_sampling: bool = True,
    grad_sample_mode: str = "hooks",
    noise_seed: int | None = None,
    clipping: str = "flat",
    head_clip_share: float | None = None,
    secure_mode: bool = False,
    sampling_seed: int | None = None,
) -> PrivateRound:
    """`private_round` with the fields of `DPSGD` and `NoiseSource` as flat keywords (``secure_mode`` is
    ``NoiseSource.secure``), for the benchmarks and tests that call it so; the client goes through
    `privacy.session.ClientPrivacy`."""
    mechanism = DPSGD(noise_multiplier, max_grad_norm, clipping, head_clip_share, grad_sample_mode, poisson_sampling)
    noise = NoiseSource(secure_mode, noise_seed, sampling_seed)
    return private_round(
        model, optimizer, data_loader, mechanism=mechanism, accountant=accountant, loss_fn=loss_fn, noise=noise
    )


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside an Opacus GradSampleModule (the model itself otherwise); hooks stay on."""
    if isinstance(model, AbstractGradSampleModule):
        return model._module  # Opacus 1.6.0's only handle on it: to_standard_module() also removes the hooks
    return model


def release(model: torch.nn.Module) -> torch.nn.Module:
    """End a round: remove Opacus' hooks and per-example state; returns the plain module.

    Safe on a plain module and after an interrupted round (drops leftover activations too), so the same
    module can go through `private_round` again next round without hooks piling up.
    """
    if isinstance(model, AbstractGradSampleModule):
        model = model.to_standard_module()
    # vars(), not hasattr(): PEFT's ModulesToSaveWrapper forwards attribute reads to the module it wraps
    for module in model.modules():
        for attr in _MODULE_ATTRS:
            if attr in vars(module):
                delattr(module, attr)
    for p in model.parameters():
        for attr in _PARAM_ATTRS:
            if attr in vars(p):
                delattr(p, attr)
    return model
