"""Defences for clients of different ranks (`strategies.robust_mixed`): each rule on a hand-computed case in the
``scaled_product`` space (FLoRA, FlexLoRA) and HetLoRA's ``padded`` space, the uniform-rank spaces recovered at
one rank, and HetLoRA and FlexLoRA runs with mixed ranks and a median defence on the tiny model (the real ServerApp
and ClientApp in-process through `LoopGrid`)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from loop_grid import LoopGrid

from fl.adapters import A_SUFFIX, B_SUFFIX
from fl.app.server_app import run_server
from fl.outputs import read_metrics
from fl.wire import to_record
from strategies import robust_math as rm
from strategies import robust_mixed as rmx
from strategies.defences import make_defence
from strategies.screening import Reply
from strategies.stats import RoundStats

A, B = "m" + A_SUFFIX, "m" + B_SUFFIX  # one adapted module's factors
T = torch.tensor


def _lora(b: list[list[float]], a: list[list[float]], **rest: torch.Tensor) -> dict[str, torch.Tensor]:
    return {A: T(a), B: T(b), **rest}


def _zero(rank: int, d_out: int, d_in: int) -> dict[str, torch.Tensor]:
    return {A: torch.zeros(rank, d_in), B: torch.zeros(d_out, rank)}


def _apply(name: str, states: list[dict[str, torch.Tensor]], *, space: str, ref: dict[str, torch.Tensor], **kw):  # type: ignore[no-untyped-def]
    stats = RoundStats()
    replies = [Reply(node=100 + i, partition=i, state=s, metrics={}) for i, s in enumerate(states)]
    kept = make_defence(name, **kw).apply(
        replies, [1.0] * len(states), reference=to_record(ref), space=space, stats=stats
    )
    return kept, stats


def _product(state: dict[str, torch.Tensor], server_rank: int) -> torch.Tensor:
    """R/r·B·A: the state's product in units of the server's scaling s_R."""
    return server_rank / state[A].shape[0] * state[B].double() @ state[A].double()


# ---------------------------------------------------------------- the spaces
def test_a_low_rank_clients_point_is_scaled_to_the_servers_units() -> None:
    state = _lora([[1.0], [2.0]], [[3.0, 4.0]])  # rank 1; server rank 2: s_1 / s_2 = 2
    prod = rmx.point(state, space="scaled_product", rank=2)
    assert torch.equal(prod["m"], T([[6.0, 8.0], [12.0, 16.0]], dtype=torch.float64))
    padded = rmx.point(state, space="padded", rank=2)
    assert torch.equal(padded[B], T([[2.0, 0.0], [4.0, 0.0]], dtype=torch.float64))
    assert torch.equal(padded[A], T([[3.0, 4.0], [0.0, 0.0]], dtype=torch.float64))


def test_at_one_rank_the_mixed_spaces_are_the_uniform_ones() -> None:
    gen = torch.Generator().manual_seed(0)
    state = {A: torch.randn(2, 5, generator=gen), B: torch.randn(4, 2, generator=gen), "head": torch.randn(3)}
    ref = {A: torch.randn(2, 5, generator=gen), B: torch.randn(4, 2, generator=gen), "head": torch.randn(3)}
    for mixed, uniform in (("scaled_product", "product"), ("padded", "factors")):
        got, want = rmx.update(state, ref, space=mixed, rank=2), rm.update_vector(state, ref, space=uniform)
        assert got.keys() == want.keys() and all(torch.allclose(got[k], want[k]) for k in got)


# ---------------------------------------------------------------- each rule against a hand-computed case
def test_median_of_mixed_rank_products_is_carried_at_the_server_rank() -> None:
    states = [
        _lora([[1.0], [0.0]], [[1.0, 0.0]], head=T([1.0])),  # rank 1: R/r·B·A = diag(2, 0)
        _lora([[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]], head=T([2.0])),  # rank 2: diag(1, 1)
        _lora([[100.0, 0.0], [0.0, 100.0]], [[1.0, 0.0], [0.0, 1.0]], head=T([900.0])),  # hostile: diag(100, 100)
    ]
    kept, stats = _apply("median", states, space="scaled_product", ref={**_zero(2, 2, 2), "head": T([0.0])})
    (robust,) = kept.states
    assert kept.weights == [1.0] and robust[A].shape == (2, 2) and robust[B].shape == (2, 2)
    # medians: (2, 1, 100) -> 2 and (0, 1, 100) -> 1; off the diagonal 0: T = diag(2, 1), rank 2 = R, fits exactly
    assert torch.allclose(_product(robust, 2), T([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64), atol=1e-6)
    assert torch.equal(robust["head"], T([2.0])) and stats.defence["defence_fit_residual"] < 1e-6  # float32 factors


def test_a_target_above_the_server_rank_is_its_truncated_svd_and_the_loss_is_recorded() -> None:
    states = [
        _lora([[1.5], [0.0], [0.0]], [[1.0, 0.0, 0.0]]),  # rank 1: 2·1.5·E11 = diag(3, 0, 0)
        _lora([[0.0, 0.0], [6.0, 0.0], [0.0, 0.0]], [[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]),  # diag(0, 6, 0)
        _lora([[0.0, 0.0], [0.0, 0.0], [1.5, 0.0]], [[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]),  # diag(0, 0, 1.5)
    ]
    # trim_fraction 0: the mean, T = diag(1, 2, 0.5) (rank 3 > R = 2): trunc_2(T) = diag(1, 2, 0)
    kept, stats = _apply("trimmed_mean", states, space="scaled_product", ref=_zero(2, 3, 3), trim_fraction=0.0)
    assert torch.allclose(_product(kept.states[0], 2), torch.diag(T([1.0, 2.0, 0.0], dtype=torch.float64)), atol=1e-6)
    assert stats.defence["defence_fit_residual"] == pytest.approx(0.5 / math.sqrt(1 + 4 + 0.25))
    assert stats.defence["defence_trimmed"] == {0: 0.0, 1: 0.0, 2: 0.0}


def test_median_in_the_padded_space_is_hetloras_zero_padded_factors() -> None:
    states = [
        _lora([[1.0], [2.0]], [[3.0, 4.0]]),  # rank 1: padded B = [[2, 0], [4, 0]], A = [[3, 4], [0, 0]]
        _lora([[1.0, 1.0], [1.0, 1.0]], [[1.0, 1.0], [1.0, 1.0]]),
        _lora([[5.0, 5.0], [5.0, 5.0]], [[9.0, 9.0], [9.0, 9.0]]),
    ]
    kept, stats = _apply("median", states, space="padded", ref=_zero(2, 2, 2))
    assert torch.equal(kept.states[0][B], T([[2.0, 1.0], [4.0, 1.0]]))
    assert torch.equal(kept.states[0][A], T([[3.0, 4.0], [1.0, 1.0]]))
    assert "defence_fit_residual" not in stats.defence  # the padded space is the method's own: nothing to fit


def test_trimmed_mean_cuts_each_end_per_coordinate_across_ranks() -> None:
    # 1 x 1 modules: a client's point is R/r·B·A, one number; R = 2
    states = [_lora([[b]], [[1.0]]) for b in (0.5, 1.0)] + [_lora([[b, 0.0]], [[1.0], [0.0]]) for b in (3.0, 4.0, 50.0)]
    kept, stats = _apply("trimmed_mean", states, space="scaled_product", ref=_zero(2, 1, 1), trim_fraction=0.2)
    # points 1, 2, 3, 4, 50: cut one at each end, the mean of 2, 3, 4
    assert _product(kept.states[0], 2).item() == pytest.approx(3.0)
    assert stats.defence["defence_trimmed"] == {0: 1.0, 1: 0.0, 2: 0.0, 3: 0.0, 4: 1.0}


def test_norm_bound_against_a_zero_reference_keeps_the_clients_rank() -> None:
    """FLoRA's reference is a fresh adapter (B = 0): a clipped reply is c·B_k on its own A_k, exactly."""
    states = [_lora([[1.5], [2.0]], [[1.0, 0.0]]), _lora([[0.5, 0.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]])]
    # rank 1: 2·B·A = [[3, 0], [4, 0]], norm 5; rank 2: [[0.5, 0], [0, 0]], norm 0.5
    kept, stats = _apply("norm_bound", states, space="scaled_product", ref=_zero(2, 2, 2), bound=2.0)
    assert torch.allclose(kept.states[0][B], T([[0.6], [0.8]])) and torch.equal(kept.states[0][A], states[0][A])
    assert kept.states[1] is states[1]  # under the bound: the reply as sent
    assert stats.defence["defence_clipped"] == {0: pytest.approx(0.4)}
    assert stats.defence["defence_norms"] == {0: pytest.approx(5.0), 1: pytest.approx(0.5)}


def test_norm_bound_against_a_reference_carries_the_clipped_product_at_rank_r_plus_r() -> None:
    ref = _lora([[1.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]])  # product E11
    state = _lora([[0.5], [1.0]], [[1.0, 0.0]])  # rank 1: 2·B·A = [[1, 0], [2, 0]]; update [[0, 0], [2, 0]], norm 2
    kept, stats = _apply("norm_bound", [state], space="scaled_product", ref=ref, bound=1.0)
    (clipped,) = kept.states
    # c = 0.5: the target E11 + 0.5·[[0, 0], [2, 0]] = [[1, 0], [1, 0]] on factors of rank 1 + 2 = 3
    assert clipped[A].shape == (3, 2) and clipped[B].shape == (2, 3)
    assert torch.allclose(clipped[B], T([[0.75, 0.75, 0.0], [1.5, 0.0, 0.0]]))
    assert torch.allclose(_product(clipped, 2), T([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64))
    assert stats.defence["defence_clipped"] == {0: pytest.approx(0.5)}


def test_norm_bound_in_the_padded_space_shrinks_towards_the_reference_at_rank_r() -> None:
    ref = _lora([[1.0, 1.0]], [[1.0], [1.0]])  # 1 x 1 module at R = 2
    state = _lora([[1.0]], [[1.0]])  # rank 1: padded B = [[2, 0]], A = [[1], [0]]; update B [[1, -1]], A [[0], [-1]]
    kept, stats = _apply("norm_bound", [state], space="padded", ref=ref, bound=math.sqrt(3) / 2)
    assert stats.defence["defence_norms"][0] == pytest.approx(math.sqrt(3))  # c = 0.5
    assert torch.allclose(kept.states[0][B], T([[1.5, 0.5]])) and torch.allclose(kept.states[0][A], T([[1.0], [0.5]]))


@pytest.mark.parametrize("space", rmx.SPACES)
def test_krum_scores_mixed_ranks_where_they_are_comparable_and_keeps_replies_as_sent(space: str) -> None:
    # 1 x 1 modules, R = 2, zero reference; products R/r·B·A: 1.0, 1.1, 1.2 and a hostile 10
    states = [
        _lora([[1.0]], [[0.5]]),
        _lora([[1.0, 0.0]], [[1.1], [0.0]]),
        _lora([[1.0, 1.0]], [[0.6], [0.6]]),
        _lora([[5.0]], [[1.0]]),
    ]
    kept, stats = _apply("multikrum", states, space=space, ref=_zero(2, 1, 1), krum_f=1)
    assert stats.defence["defence_dropped"] == [3] and stats.rejected == 1
    assert all(k is s for k, s in zip(kept.states, states[:3], strict=True))  # each at its own rank
    if space == "scaled_product":  # n=4, f=1: each score is the smallest squared distance to another
        assert stats.defence["defence_scores"] == pytest.approx({0: 0.01, 1: 0.01, 2: 0.01, 3: 77.44}, rel=1e-4)


@pytest.mark.parametrize("space", rmx.SPACES)
@pytest.mark.parametrize("name", ["median", "trimmed_mean"])
def test_a_coordinate_rule_on_identical_updates_is_the_update(name: str, space: str) -> None:
    """Honest identical clients at different ranks: a rank-1 update sent at ranks 1 and 2 is kept as it is."""
    low = _lora([[1.0], [2.0], [0.0]], [[1.0, -1.0]], head=T([0.5]))
    high = {
        A: torch.cat([low[A], torch.zeros(1, 2)]),
        B: torch.cat([2 * low[B], torch.zeros(3, 1)], 1),
        "head": T([0.5]),
    }
    kept, _ = _apply(name, [low, high, dict(low)], space=space, ref={**_zero(2, 3, 2), "head": T([0.0])})
    assert torch.allclose(_product(kept.states[0], 2), _product(low, 2), atol=1e-6)
    assert torch.equal(kept.states[0]["head"], T([0.5]))


# ---------------------------------------------------------------- real tiny runs
@pytest.mark.parametrize(
    ("strategy", "extra"),
    [("hetlora", ["strategy.prune_gamma=0.5"]), ("flexlora", [])],
)
def test_mixed_ranks_with_a_median_defence_complete_with_the_record(
    tiny: list[str], tmp_path: Path, strategy: str, extra: list[str]
) -> None:
    run_dir = tmp_path / "run"
    overrides = [
        *tiny,
        f"strategy={strategy}",
        "strategy.rank=8",
        "sim.client_ranks=[2,4,8]",
        "sim.num_clients=3",
        "sim.rounds=2",
        "data.max_examples=240",
        "data.partitioner=iid",
        "strategy.defence=median",
        f"run_dir={run_dir}",
        *extra,
    ]
    run_server(LoopGrid(3), overrides)
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert row["defence"] == "median" and row["aggregated"] == 3 and row["client_ranks"] == [2, 4, 8]
        assert math.isfinite(row["loss"])
        if strategy == "flexlora":  # the median product is carried at rank 8 by its truncated SVD
            assert 0.0 <= row["defence_fit_residual"] < 1.0
