"""Opacus DP-SGD wiring for one client round, charged to the client's persistent accountant.

`make_private` builds the round's GradSampleModule / DPOptimizer / Poisson DPDataLoader with Opacus'
`PrivacyEngine`, after swapping the engine's fresh accountant for the client's `ClientAccountant.opacus`:
the DP optimizer's step hook then records every noisy step in the accountant that lives across rounds.
`release` removes the hooks at the end of the round: the client reuses the same module next round, and
hooks left in place would stack. `noisy_gradient_sum` is the one-off privatised gradient sum of Fed-SB's
federated initialisation (Singhal et al. 2025), charged as one full-batch Gaussian step.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple, overload

import torch
from opacus import GradSampleModule, PrivacyEngine
from opacus.grad_sample.gsm_base import OPACUS_PARAM_MONKEYPATCH_ATTRS, AbstractGradSampleModule
from opacus.optimizers import DPOptimizer
from torch.utils.data import DataLoader

from privacy.accountant import ClientAccountant
from privacy.clipping import CLIPPINGS, PerLayerOptimizer, per_layer_bounds
from privacy.noise import SECURE_RNG_MISSING

log = logging.getLogger(__name__)

GRAD_SAMPLE_MODES = ("hooks", "ghost", "functorch")
FULL_HOOK_WARNING = "Full backward hook is firing when gradients are computed with respect to module outputs"
"""Opacus modes that work with keyword inputs (``model(**batch)``). ``hooks`` materialises per-example
gradients; ``ghost`` (fast gradient clipping with ghost norms, Li et al. 2022 / Bu et al. 2023) computes only
their norms and then a second, reweighted backward pass, through the criterion `make_private` returns.
``ew`` takes positional inputs only."""

# per-parameter and per-module state Opacus leaves behind (the DP optimizer's sums; a forward without backward)
_PARAM_ATTRS = (*OPACUS_PARAM_MONKEYPATCH_ATTRS, "summed_grad")
_MODULE_ATTRS = ("activations", "max_batch_len")

LossFn = Callable[[torch.nn.Module, Mapping[str, torch.Tensor]], torch.Tensor]
"""(model, batch) -> per-example losses, shape (batch,)."""

ExampleLoss = Callable[[Any, Mapping[str, torch.Tensor]], torch.Tensor]
"""(model outputs, batch) -> per-example losses, shape (batch,): the one place a task defines its loss."""

Objective = Callable[[Any, Mapping[str, torch.Tensor]], Any]
"""(model outputs, physical batch) -> something with ``.backward()`` and ``.detach()`` (the batch mean)."""


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


class PrivateRound(NamedTuple):
    """One round's DP-SGD objects (from `make_private`).

    ``objective(outputs, batch)`` is what the loop calls ``.backward()`` on for each physical batch: the
    batch-mean loss (hooks, functorch) or Opacus' ghost-clipping loss, which runs both backward passes.
    """

    module: torch.nn.Module
    optimizer: DPOptimizer
    data_loader: DataLoader
    objective: Objective


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
    """DP-SGD versions of (model, optimizer, loader) for one round; steps are charged to `accountant`.

    Parameters
    ----------
    model : torch.nn.Module
        The plain module (e.g. a PEFT LoRA model), in training mode; its ``requires_grad`` parameters
        must be exactly the optimizer's. On an accelerator, move the base model to its device *before*
        ``get_peft_model``, or the LoRA weights may never update under Opacus (opacus #820).
    optimizer : torch.optim.Optimizer
        Over the model's trainable parameters.
    data_loader : DataLoader
        Batches of dicts; Opacus charges sample rate ``1 / len(data_loader)`` per step (what
        `privacy.budget.plan_dp` plans with).
    noise_multiplier : float
        σ, from `privacy.budget.plan_dp`.
    max_grad_norm : float
        Per-example clipping bound C (flat: one L2 norm over all trainable tensors).
    accountant : ClientAccountant
        The client's persistent accountant; each optimizer step adds (σ, q, 1) to it.
    loss_fn : callable
        ``(outputs, batch) -> per-example losses``, the task's (`fl.tasks.Task.per_example_loss`); ghost
        clipping needs the loss per example.
    poisson_sampling : bool
        Poisson batches (a `DPDataLoader`), as the accounting assumes; False keeps the loader.
    grad_sample_mode : str
        ``"hooks"``, ``"ghost"`` or ``"functorch"``; see `GRAD_SAMPLE_MODES`.
    noise_seed : int, optional
        Seeds the noise (reproducible simulations); None draws fresh noise.
    clipping : str
        ``"flat"`` or ``"per_layer"`` (`CLIPPINGS`); per_layer needs hooks or functorch.
    head_clip_share : float, optional
        per_layer only: the fraction of C² given to the task head's tensors (PEFT ``modules_to_save``, e.g. a
        classifier), the rest split equally over the other trainable tensors; None: C² split equally over all.
    secure_mode : bool
        Opacus' secure RNG: noise from a CSPRNG (torchcsprng), drawn so that it resists floating-point attacks
        (Jin et al. 2022); `noise_seed` is then ignored. Raises with the fix when torchcsprng is missing.
    sampling_seed : int, optional
        Poisson sampling from its own generator with this seed (a deployment node's private seed,
        `privacy.noise.noise_source`); None: Opacus' default, the CSPRNG under secure_mode and otherwise the
        loader's generator or torch's global RNG (seeded by the training loop in simulations).

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
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ValueError(f"grad_sample_mode={grad_sample_mode!r} is not supported; use one of {GRAD_SAMPLE_MODES}.")
    if clipping not in CLIPPINGS or (clipping == "per_layer" and grad_sample_mode == "ghost"):
        raise ValueError(
            f"clipping={clipping!r} with grad_sample_mode={grad_sample_mode!r} is not supported; use flat, or "
            "per_layer with hooks or functorch."
        )
    if isinstance(model, AbstractGradSampleModule) or hasattr(model, "autograd_grad_sample_hooks"):
        raise ValueError("The model still carries Opacus hooks from an earlier round; call release(model) first.")
    engine = _engine(accountant.kind, secure_mode=secure_mode)
    engine.accountant = accountant.opacus  # make_private attaches the optimizer's step hook to this object
    # Opacus draws the noise on the parameters' device with this generator, so it must live there (a CPU
    # generator fails on CUDA); the same seed gives the same noise on one device, not across devices.
    device = next((p.device for g in optimizer.param_groups for p in g["params"]), torch.device("cpu"))
    generator = (
        torch.Generator(device=device).manual_seed(noise_seed) if noise_seed is not None and not secure_mode else None
    )
    bound: float | list[float] = max_grad_norm
    if clipping == "per_layer":  # Opacus wants one bound per optimizer parameter; their L2 norm is C
        bound = per_layer_bounds(model, optimizer, max_grad_norm, head_share=head_clip_share)
    # Opacus' hooks on a frozen base: the first hooked module's inputs need no gradient, so torch warns on every
    # step that its full backward hook sees the outputs' gradients only. Those are all Opacus uses (per-example
    # gradients come from the saved activations and the outputs' gradients), so the warning is noise. Process-wide:
    # the backward passes run after this call returns.
    warnings.filterwarnings("ignore", message=FULL_HOOK_WARNING, category=UserWarning)
    made = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=data_loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=bound,
        clipping=clipping,
        poisson_sampling=poisson_sampling,
        grad_sample_mode=grad_sample_mode,
        noise_generator=generator,
        criterion=PerExampleCriterion(loss_fn),
    )
    log.debug(
        "DP-SGD round (%s, %s clipping): σ=%.4g, C=%g, q=%.4g",
        grad_sample_mode,
        clipping if head_clip_share is None else f"{clipping}, head share {head_clip_share:g}",
        noise_multiplier,
        max_grad_norm,
        1 / len(data_loader),
    )
    if clipping == "per_layer":
        made[1].__class__ = PerLayerOptimizer  # same state, the dtype-safe clip_and_accumulate
    if sampling_seed is not None and poisson_sampling and not secure_mode:
        # the DPDataLoader (last of `made`) draws its batches from its UniformWithReplacementSampler's generator
        made[-1].batch_sampler.generator = torch.Generator().manual_seed(sampling_seed)
    if grad_sample_mode == "ghost":
        module, dp_optimizer, criterion, dp_loader = made
        return PrivateRound(module, dp_optimizer, dp_loader, criterion)
    module, dp_optimizer, dp_loader = made

    def objective(outputs: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return loss_fn(outputs, batch).mean()

    return PrivateRound(module, dp_optimizer, dp_loader, objective)


def _engine(kind: str, *, secure_mode: bool) -> PrivacyEngine:
    if secure_mode:
        try:
            return PrivacyEngine(accountant=kind, secure_mode=True)
        except ImportError as e:
            raise RuntimeError(SECURE_RNG_MISSING) from e
    with warnings.catch_warnings():  # only the engine's notice that secure_mode is off (simulations, opted-out nodes)
        warnings.filterwarnings("ignore", message="Secure RNG turned off", category=UserWarning)
        return PrivacyEngine(accountant=kind)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside an Opacus GradSampleModule (the model itself otherwise); hooks stay on."""
    if isinstance(model, AbstractGradSampleModule):
        return model._module
    return model


def release(model: torch.nn.Module) -> torch.nn.Module:
    """End a round: remove Opacus' hooks and per-example state; returns the plain module.

    Safe on a plain module and after an interrupted round (drops leftover activations too), so the same
    module can go through `make_private` again next round without hooks piling up.
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
