"""PEFT adapters for each federated LoRA method, their trainable tensors, and export to plain PEFT.

Three adapter kinds, registered by name (a strategy names the kind it needs):

- ``lora``  W0 + s·B·A, A and B trainable (FedIT, LoRA-FAIR).
- ``ffa``   the same, A frozen at its seeded initialisation, only B trains (FFA-LoRA).
- ``fedsb`` W0 + B·R·A with A and B frozen and R (r × r) trainable, scaling 1 (Fed-SB). PEFT's LoRA
  layer computes ``lora_B(lora_A(x))``; Fed-SB replaces ``lora_B`` with `RB`, whose forward is
  ``B(R(h))`` and whose R is an ``nn.Linear`` so Opacus computes R's per-example gradients.

Every kind also trains the modules the task names (`fl.tasks.Task.trained_modules`: a classifier's head,
nothing for a causal LM), as PEFT ``modules_to_save``. Tensors travel under their
PEFT parameter names. `export_peft` writes a standard LoRA adapter folder for any kind (Fed-SB folds
R into B: lora_B = B·R, lora_alpha = r) that ``PeftModel.from_pretrained`` loads.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import PreTrainedModel

from fl.models import HEAD_NAMES, NOT_ADAPTED, linear_module_names

ADAPTER = "default"  # PEFT adapter name
A_SUFFIX = f".lora_A.{ADAPTER}.weight"
B_SUFFIX = f".lora_B.{ADAPTER}.weight"
SB_B_SUFFIX = f".lora_B.{ADAPTER}.B.weight"
SB_R_SUFFIX = f".lora_B.{ADAPTER}.R.weight"
BASE_SUFFIX = ".base_layer.weight"  # the frozen W0 inside a PEFT LoRA layer
BLOCK_INDEX = re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")  # PEFT's layers_to_transform rule: a name's block index


class RB(torch.nn.Module):
    """Fed-SB's ``h -> B(R h)``: R (r × r) trainable, B (d_out × r) frozen; stands in for lora_B."""

    def __init__(self, rank: int, out_features: int) -> None:
        super().__init__()
        self.R = torch.nn.Linear(rank, rank, bias=False)
        self.B = torch.nn.Linear(rank, out_features, bias=False)
        self.B.weight.requires_grad_(False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.B(self.R(h))


@dataclass(frozen=True)
class AdapterKind:
    """How one method shapes its adapter: LoRA scaling and what stays frozen after PEFT builds it."""

    name: str
    fixed_alpha_equals_rank: bool  # scaling 1 (Fed-SB)
    prepare: Callable[[PeftModel, int, int], None]  # (model, rank, seed) -> None, in place


def _prepare_lora(model: PeftModel, rank: int, seed: int) -> None:
    """Plain LoRA: PEFT's own init (A Kaiming-uniform, B zero), both trainable."""


def _prepare_ffa(model: PeftModel, rank: int, seed: int) -> None:
    """FFA-LoRA: freeze A (drawn from the shared seed when the model was built)."""
    for name, p in model.named_parameters():
        if name.endswith(A_SUFFIX):
            p.requires_grad_(False)


def _prepare_fedsb(model: PeftModel, rank: int, seed: int) -> None:
    """Fed-SB: swap each lora_B for `RB`; random orthonormal A, B and R = 0 (W = W0 at start).

    `strategy.init=federated` later overwrites A, B, R with the gradient-SVD initialisation.
    """
    gen = torch.Generator().manual_seed(seed + 7919)
    for module in model.modules():
        if not isinstance(module, LoraLayer) or ADAPTER not in module.lora_B:
            continue
        lora_a = module.lora_A[ADAPTER]
        assert isinstance(lora_a, torch.nn.Linear)
        d_in, d_out = int(lora_a.in_features), int(module.out_features or 0)
        rb = RB(rank, d_out)
        with torch.no_grad():
            qa, _ = torch.linalg.qr(torch.randn(d_in, rank, generator=gen))
            qb, _ = torch.linalg.qr(torch.randn(d_out, rank, generator=gen))
            lora_a.weight.copy_(qa.T[:rank])
            rb.B.weight.copy_(qb[:, :rank])
            rb.R.weight.zero_()
        lora_a.weight.requires_grad_(False)
        module.lora_B[ADAPTER] = rb


ADAPTER_KINDS: dict[str, AdapterKind] = {
    "lora": AdapterKind("lora", False, _prepare_lora),
    "ffa": AdapterKind("ffa", False, _prepare_ffa),
    "fedsb": AdapterKind("fedsb", True, _prepare_fedsb),
}


def get_kind(name: str) -> AdapterKind:
    """Look up an adapter kind; the error lists the valid names."""
    if name not in ADAPTER_KINDS:
        raise KeyError(f"Unknown adapter kind {name!r}; valid kinds: {sorted(ADAPTER_KINDS)}.")
    return ADAPTER_KINDS[name]


def present_heads(base: torch.nn.Module) -> list[str]:
    """The classification heads `base` has (`fl.models.HEAD_NAMES`; none for a causal LM)."""
    return [n for n in HEAD_NAMES if isinstance(getattr(base, n, None), torch.nn.Module)]


def lora_config(
    base: PreTrainedModel,
    *,
    targets: list[str],
    rank: int,
    alpha: float,
    dropout: float,
    modules_to_save: list[str] | None = None,
    layers: list[int] | None = None,
) -> LoraConfig:
    """A PEFT LoraConfig on the resolved target modules; `modules_to_save` (default: `present_heads`) train in full;
    `layers` (`model.lora_layers`): only these transformer blocks get adapters (PEFT's ``layers_to_transform``)."""
    trained = present_heads(base) if modules_to_save is None else list(modules_to_save)
    if layers is not None:
        blocks = getattr(base.config, "num_hidden_layers", None)
        bad = [i for i in layers if not 0 <= int(i) < (blocks if blocks is not None else 10**9)]
        if not layers or bad:
            raise ValueError(
                f"model.lora_layers={list(layers)} is invalid: list block indices in 0..{(blocks or 1) - 1} "
                f"(this model has {blocks} blocks), or null for every block."
            )
    names = linear_module_names(base, targets, exclude=(*NOT_ADAPTED, *trained))
    if layers is not None:
        # PEFT applies `layers_to_transform` only to suffix matches, not to the exact module names resolved here,
        # so the blocks are selected by PEFT's own rule: the first numbered segment of a name is its block.
        keep = {int(i) for i in layers}
        names = [n for n in names if (m := BLOCK_INDEX.match(n)) is not None and int(m["idx"]) in keep]
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,  # type: ignore[arg-type]  # PEFT annotates int; a float is valid
        lora_dropout=dropout,
        target_modules=names,
        modules_to_save=trained or None,
        bias="none",
    )


def check_ranks_fit(
    base: torch.nn.Module,
    ranks: Mapping[str, int],
    *,
    targets: list[str],
    modules_to_save: list[str] | None = None,
) -> None:
    """Refuse a LoRA rank wider than a target module's smaller side, naming the rank's key, the module and its shape.

    A rank r > min(d_out, d_in) adds no expressiveness and breaks Fed-SB's orthonormal A and B (they need r
    orthonormal columns). Called before any work, with every rank the run names (`fl.ranks.configured_ranks`).

    Parameters
    ----------
    ranks : mapping of str to int
        The rank under each config key, e.g. ``{"strategy.rank": 32, "sim.client_ranks[1]": 8}``.
    """
    trained = present_heads(base) if modules_to_save is None else list(modules_to_save)
    names = linear_module_names(base, list(targets), exclude=(*NOT_ADAPTED, *trained))
    modules = dict(base.named_modules())
    narrowest = min(names, key=lambda n: min(modules[n].weight.shape))
    d_out, d_in = (int(x) for x in modules[narrowest].weight.shape)
    for key, rank in ranks.items():
        if int(rank) > min(d_out, d_in):
            raise ValueError(
                f"{key}={rank} does not fit module {narrowest} (d_out x d_in = {d_out} x {d_in}): a LoRA rank "
                f"must be at most {min(d_out, d_in)} on this model; lower {key.split('[')[0]} or narrow "
                "model.target_modules."
            )


def build_adapter(
    base: PreTrainedModel,
    *,
    kind: str,
    strategy_cfg: DictConfig,
    targets: list[str],
    seed: int,
    modules_to_save: list[str] | None = None,
    rank: int | None = None,
    rank_key: str = "strategy.rank",
    layers: list[int] | None = None,
) -> PeftModel:
    """Wrap `base` with the adapter of `kind`; deterministic in `seed` (forked RNG).

    `base` is consumed (PEFT injects layers into it). Move `base` to its device first (opacus #820); the
    adapter tensors are drawn on CPU and follow it. `modules_to_save` defaults to `present_heads(base)`.
    `rank` (default `strategy_cfg.rank`) is this party's own rank in a heterogeneous federation; one that does
    not fit a target module is refused naming `rank_key` (`check_ranks_fit`). `layers`: `model.lora_layers`.
    """
    ak = get_kind(kind)
    rank = int(strategy_cfg.rank) if rank is None else int(rank)
    check_ranks_fit(base, {rank_key: rank}, targets=list(targets), modules_to_save=modules_to_save)
    alpha = float(rank) if ak.fixed_alpha_equals_rank else float(strategy_cfg.alpha)
    cfg = lora_config(
        base,
        targets=list(targets),
        rank=rank,
        alpha=alpha,
        dropout=float(strategy_cfg.dropout),
        modules_to_save=modules_to_save,
        layers=layers,
    )
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # PEFT calls transformers' deprecated is_gradient_checkpointing; nothing for users to act on.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        torch.manual_seed(seed + 1)
        model = get_peft_model(base, cfg)
    device = next(base.parameters()).device
    if device.type != "cpu":  # PEFT and Fed-SB's RB put new tensors on CPU first
        model.to(device)
    ak.prepare(model, rank, seed)
    model.to(device)
    return model


HEAD_MARK = "modules_to_save"  # PEFT's trainable copy of a task head (e.g. the classifier)


def freeze_head(model: torch.nn.Module) -> list[str]:
    """`train.freeze_head`: stop training the task head's tensors (PEFT ``modules_to_save``); returns their names.

    The head keeps its seeded initialisation, which every node builds identically (`fl.models`), so it is
    neither sent nor averaged; an exported adapter still carries it (PEFT saves ``modules_to_save``).
    """
    names = [n for n, p in model.named_parameters() if HEAD_MARK in n]
    for n, p in model.named_parameters():
        if HEAD_MARK in n:
            p.requires_grad_(False)
    return names


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of the parameters that train (what a client sends), by name."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def fixed_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors that stay frozen (FFA's A; Fed-SB's A and B), by name."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if ".lora_" in n and not p.requires_grad}


def load_tensors(model: torch.nn.Module, state: Mapping[str, torch.Tensor], *, expect: set[str] | None = None) -> None:
    """Copy `state` into the model's parameters by name, checking names and shapes.

    Parameters
    ----------
    expect : set of str, optional
        If given, the exact key set `state` must have (e.g. the trainable names).
    """
    params = dict(model.named_parameters())
    keys = set(state)
    if expect is not None and keys != expect:
        missing, extra = sorted(expect - keys)[:3], sorted(keys - expect)[:3]
        raise KeyError(f"Adapter tensors do not match the model: missing {missing}, extra {extra}.")
    with torch.no_grad():
        for name, value in state.items():
            if name not in params:
                raise KeyError(f"No parameter named {name!r} in the model.")
            p = params[name]
            if tuple(p.shape) != tuple(value.shape):
                raise ValueError(f"Shape mismatch for {name!r}: model {tuple(p.shape)}, got {tuple(value.shape)}.")
            p.copy_(value.to(p.dtype))


def export_peft(model: PeftModel, *, kind: str, base: PreTrainedModel, out_dir: str | Path) -> Path:
    """Write a standard PEFT LoRA adapter folder that gives this model's predictions.

    Parameters
    ----------
    model : PeftModel
        The framework's model (any adapter kind), holding the final tensors.
    kind : str
        Its adapter kind.
    base : PreTrainedModel
        A fresh base model like the one `model` wraps; consumed when `kind` is ``fedsb``.
    out_dir : path
        Destination folder (created).
    """
    out = Path(out_dir)
    if kind != "fedsb":
        _save(model, out)
        return out
    cfg = copy.deepcopy(model.peft_config[ADAPTER])
    assert isinstance(cfg, LoraConfig)
    # Fed-SB: W0 + B R A == W0 + (r/r) · (B R) · A, a plain LoRA with lora_alpha = r.
    cfg.lora_alpha = cfg.r
    plain = get_peft_model(base, cfg)
    src = dict(model.named_parameters())
    state: dict[str, torch.Tensor] = {}
    for name, p in plain.named_parameters():
        if name.endswith(B_SUFFIX):
            prefix = name[: -len(B_SUFFIX)]
            state[name] = src[prefix + SB_B_SUFFIX] @ src[prefix + SB_R_SUFFIX]
        elif name in src and p.requires_grad:
            state[name] = src[name]
    load_tensors(plain, state)
    _save(plain, out)
    return out


def _save(model: PeftModel, out: Path) -> None:
    """`save_pretrained`, without PEFT's offline-only warning.

    PEFT looks the base model's config up on the Hub to see whether the vocabulary was resized; offline (always,
    here) the lookup fails and it warns that it "will assume that the vocabulary was not modified" — which is
    true: no adapter kind of ours resizes embeddings.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Could not find a config file in", category=UserWarning)
        model.save_pretrained(str(out))


def module_factors(
    state: Mapping[str, torch.Tensor],
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per adapted module, the factors (B_eff, A) with update B_eff·A (up to the LoRA scaling).

    For Fed-SB B_eff = B·R. `state` must hold every factor (trainable and frozen).
    """
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, a in state.items():
        if not name.endswith(A_SUFFIX):
            continue
        prefix = name[: -len(A_SUFFIX)]
        if prefix + B_SUFFIX in state:
            out[prefix] = (state[prefix + B_SUFFIX], a)
        elif prefix + SB_B_SUFFIX in state and prefix + SB_R_SUFFIX in state:
            out[prefix] = (state[prefix + SB_B_SUFFIX] @ state[prefix + SB_R_SUFFIX], a)
    return out
