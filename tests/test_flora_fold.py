"""FLoRA's client-side fold: a client that keeps its folded ΔW0 (`fl.base_delta.fold_factors`) multiplies out only
the new round's stacks, and lands where a full rebuild from every round's stacks does (and, exactly, where the
server's own fold does)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from loop_grid import LoopGrid

from fl import base_delta
from fl import constants as K
from fl.app.server_app import run_server
from fl.base_delta import FactorFold, delta_from_factors, factored, fold_factors
from fl.checkpoint import Checkpoint
from fl.wire import from_record

NAMES = {"m.q.base_layer.weight": (12, 10), "m.v.base_layer.weight": (8, 10)}  # base weight name -> (d_out, d_in)
RANKS = [2, 4, 3]  # the clients' ranks: each round's stack has Σ r_k = 9 columns


def _stacks(rounds: int, seed: int = 0) -> dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(seed)
    width = sum(RANKS)
    return {
        t: {
            n: (torch.randn(d_out, width, generator=gen), torch.randn(width, d_in, generator=gen))
            for n, (d_out, d_in) in NAMES.items()
        }
        for t in range(1, rounds + 1)
    }


def _message(stacks: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]], upto: int) -> dict[str, torch.Tensor]:
    """What FLoRA sends after round `upto` (`strategies.flora.FLoRA.arrays_for`): the stacks of every round so far."""
    return factored({str(t): s for t, s in sorted(stacks.items()) if t <= upto})


@pytest.fixture
def products(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts B·A products (one per module per part multiplied out)."""
    calls: list[int] = []
    real = base_delta._product

    def counting(B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return real(B, A)

    monkeypatch.setattr(base_delta, "_product", counting)
    return calls


def test_the_incremental_fold_equals_the_full_rebuild_over_many_rounds(products: list[int]) -> None:
    rounds = 12  # past 10: round "10" folds after "9", as the server's does
    stacks = _stacks(rounds)
    fold = FactorFold()
    server: dict[str, torch.Tensor] = {}
    for t in range(1, rounds + 1):
        for name, (B, A) in stacks[t].items():  # the server's rule (strategies/flora.py): float64 product, float32 sum
            prod = (B.double() @ A.double()).float()
            server[name] = server[name] + prod if name in server else prod
        msg = _message(stacks, t)
        before = len(products)
        got = fold.update(msg)
        assert len(products) - before == len(NAMES)  # only round t's stacks were multiplied out
        full = delta_from_factors(msg)
        assert set(got) == set(full) == set(NAMES)
        for name in NAMES:
            torch.testing.assert_close(got[name], full[name], rtol=1e-5, atol=1e-5)
            assert torch.equal(got[name], server[name]), name
        before = len(products)
        again = fold.update(msg)  # the next virtual client of the process, same message: nothing to multiply
        assert len(products) == before and all(torch.equal(again[n], got[n]) for n in NAMES)


def test_a_message_whose_earlier_stacks_differ_is_folded_from_scratch() -> None:
    fold = FactorFold()
    first, other = _stacks(3, seed=0), _stacks(3, seed=1)
    for t in (1, 2, 3):
        fold.update(_message(first, t))
    for upto in (2, 1):  # another run in the same process (same model), or a server that restarted
        got = fold.update(_message(other, upto))
        full = delta_from_factors(_message(other, upto))
        for name in NAMES:
            torch.testing.assert_close(got[name], full[name], rtol=1e-5, atol=1e-5)
    assert fold.update({}) == {}  # no stacks: the pretrained W0


def test_fold_factors_keeps_one_fold_per_model(products: list[int]) -> None:
    stacks = _stacks(3)
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    for t in (1, 2, 3):
        fold_factors(a, _message(stacks, t))
    assert len(products) == 3 * len(NAMES)
    fold_factors(b, _message(stacks, 3))  # a model of its own (e.g. another rank's workspace) folds from scratch
    assert len(products) == 6 * len(NAMES)
    fold_factors(a, _message(stacks, 3))
    assert len(products) == 6 * len(NAMES)


def test_a_flora_runs_messages_fold_incrementally_to_the_servers_fold(tiny: list[str], tmp_path: Path) -> None:
    """The real FLoRA (in process, mixed ranks): every training message's stacks, folded as a client that keeps its
    fold would, equal the full rebuild, and after the last round the server's exported ΔW0 exactly."""
    grid = LoopGrid(3)
    overrides = [
        *tiny,
        "strategy=flora",
        "strategy.rank=4",
        "sim.client_ranks=[2,4,3]",
        "sim.num_clients=3",
        "sim.rounds=3",
        "data.max_examples=240",
        "data.partitioner=iid",
        "train.local_steps=1",
        f"run_dir={tmp_path / 'run'}",
    ]
    run_dir = run_server(grid, overrides)
    fold, rounds_seen = FactorFold(), set()
    for msg in grid.sent:
        if K.BASE_DELTA_FACTORS not in msg.content.array_records:
            continue
        flat = from_record(msg.content.array_records[K.BASE_DELTA_FACTORS])
        got, full = fold.update(flat), delta_from_factors(flat)
        assert set(got) == set(full)
        for name in full:
            torch.testing.assert_close(got[name], full[name], rtol=1e-5, atol=1e-6)
        rounds_seen.add(len(fold.digests))
    assert rounds_seen == {1, 2}  # rounds 2 and 3 carry the stacks of the rounds before
    state = Checkpoint.load(run_dir).strategy_state  # the server's stacks and fold after round 3
    stacks = {str(t): {n: (B, A) for n, (B, A) in s.items()} for t, s in state["stacks"].items()}
    got = fold.update(factored(stacks))  # round 3's stack is the only new part
    assert len(fold.digests) == 3 and set(got) == set(state["fold"])
    for name, server in state["fold"].items():
        assert torch.equal(got[name], server), name
