"""Which clients a round asks (`strategies/sampling.py`): `sim.client_sampling=cyclic` takes a seeded permutation
of the clients k a round (shuffled cyclic participation, Cho et al., ICML 2023), so each trains once a cycle; the
cycle is server state; bad values and the pairing with client-level DP are refused at compose."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, MessageType
from loop_grid import LoopGrid

from fl.app.config import compose
from fl.app.server_app import run_server
from strategies.sampling import NodeSampler


def sampler(num: int, seed: int = 0) -> NodeSampler:
    s = NodeSampler(seed=seed, num_nodes=num, timeout=1.0, hello=ConfigRecord, cyclic=True)
    s.partition_of = {100 + p: p for p in range(num)}  # node id -> partition id, as the hello query learns them
    return s


def test_every_client_trains_once_a_cycle_and_the_cycle_resumes_from_its_state() -> None:
    s = sampler(20)
    known = sorted(s.partition_of)
    rounds = [s.next_in_cycle(known, 5) for _ in range(8)]
    for cycle in (rounds[:4], rounds[4:]):  # 20 clients, 5 a round: a cycle is 4 rounds
        assert sorted(n for r in cycle for n in r) == known
    assert rounds[:4] != rounds[4:]  # each cycle is a new permutation
    assert all(r == sorted(r) and len(set(r)) == 5 for r in rounds)
    again = sampler(20)
    assert [again.next_in_cycle(known, 5) for _ in range(8)] == rounds  # seeded
    resumed, part = sampler(20), sampler(20)
    for _ in range(3):
        part.next_in_cycle(known, 5)
    resumed.load_state_dict(part.state_dict())  # a checkpoint mid-cycle
    assert [resumed.next_in_cycle(known, 5) for _ in range(5)] == rounds[3:]


def test_a_cycle_that_runs_out_mid_round_never_repeats_a_client_in_it_and_passes_over_the_offline() -> None:
    s = sampler(10)
    known = sorted(s.partition_of)
    rounds = [s.next_in_cycle(known, 3) for _ in range(10)]
    assert all(len(set(r)) == 3 for r in rounds)
    assert set(Counter(n for r in rounds for n in r).values()) == {3}  # 30 picks, each of 10 clients 3 times
    online = known[1:]  # partition 0's node went away: the others still fill every round
    assert all(known[0] not in s.next_in_cycle(online, 3) for _ in range(5))


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["sim.client_sampling=cycle"], r"sim\.client_sampling='cycle' is invalid: use uniform .* or cyclic"),
        (["sim.client_sampling=cyclic", "privacy=client"], r"does not compose with client-level DP \(privacy=client\)"),
    ],
)
def test_bad_values_and_client_level_dp_are_refused_at_compose(extra: list[str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        compose(["model=tiny", *extra])


def test_an_inline_run_asks_each_client_once_a_cycle(tiny: list[str], tmp_path: Path) -> None:
    grid = LoopGrid(6)
    sim = ["sim.num_clients=6", "sim.fraction_train=0.34", "sim.rounds=3", "data.partitioner=iid"]
    run_server(grid, [*tiny, *sim, "sim.client_sampling=cyclic", f"run_dir={tmp_path / 'run'}"])
    asked = [m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
    # 3 rounds x 2 of 6 clients: every client exactly once (seed 0's uniform draws ask one client twice)
    assert len(asked) == 6 and len(set(asked)) == 6
