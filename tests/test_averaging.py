"""Server-side model averaging (`server_opt.average_from`, strategies/averaging.py): the model the server scores
and exports is the running mean of the rounds' globals; the clients' trajectory is the run's without it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from loop_grid import LoopGrid
from safetensors.torch import load_file

from fl.adapters import B_SUFFIX
from fl.app.config import compose
from fl.app.server_app import run_server
from fl.checkpoint import PREVIOUS_FILE, Checkpoint
from fl.outputs import read_metrics
from strategies import get_strategy
from strategies.averaging import ModelAverage

SIM = ["sim.num_clients=3", "data.partitioner=iid", "strategy=ffa_lora", "sim.rounds=3"]


def test_the_mean_is_of_the_rounds_from_the_start_on_in_the_arrays_dtypes() -> None:
    avg = ModelAverage(2)
    xs = [{"b": torch.full((2,), float(t), dtype=torch.float32)} for t in (1, 2, 3, 4)]
    assert avg.update(1, xs[0])["b"].tolist() == [1.0, 1.0]  # before the start: the global itself
    assert avg.update(2, xs[1])["b"].tolist() == [2.0, 2.0]
    assert avg.update(3, xs[2])["b"].tolist() == [2.5, 2.5]
    out = avg.update(4, xs[3])
    assert out["b"].tolist() == [3.0, 3.0] and out["b"].dtype == torch.float32 and avg.count == 3
    with pytest.raises(ValueError, match="round 4 was already averaged"):
        avg.update(4, xs[3])
    again = ModelAverage(2)
    again.load_state_dict(avg.state_dict())
    assert again.update(5, {"b": torch.full((2,), 7.0)})["b"].tolist() == [4.0, 4.0]
    with pytest.raises(
        ValueError, match=r"average_from=3 average_window=0, but the checkpoint's mean has average_from=2"
    ):
        ModelAverage(3).load_state_dict(avg.state_dict())
    with pytest.raises(ValueError, match=r"server_opt\.average_from=-1"):
        ModelAverage(-1)
    with pytest.raises(ValueError, match=r"server_opt\.average_window=2 needs server_opt\.average_from >= 1"):
        ModelAverage(0, 2)
    ema = ModelAverage(1, 2)  # the mean of the first 2 rounds, then x̄ ← x̄ + (x − x̄)/2
    for t, want in [(1, 1.0), (2, 1.5), (3, 2.25), (4, 3.125)]:
        assert ema.update(t, {"b": torch.tensor([float(t)])})["b"].item() == want
    with pytest.raises(
        ValueError, match="average_window=3, but the checkpoint's mean has average_from=1 average_window=2"
    ):
        ModelAverage(1, 3).load_state_dict(ema.state_dict())
    off = ModelAverage(0)
    assert not off.active and off.update(3, xs[2])["b"].tolist() == [3.0, 3.0] and off.count == 0


@pytest.mark.parametrize("strategy", ["fedsvd", "flora", "fedex_lora", "flexlora"])
def test_methods_whose_globals_are_not_their_model_are_refused_naming_both_keys(strategy: str) -> None:
    with pytest.raises(ValueError, match=rf"server_opt\.average_from=2 does not compose with strategy={strategy}") as e:
        compose(["model=tiny", f"strategy={strategy}", "server_opt.average_from=2"])
    assert str(get_strategy(strategy).average_problem) in str(e.value)


def test_a_start_after_the_last_round_is_refused_naming_both_keys() -> None:
    with pytest.raises(ValueError, match=r"server_opt\.average_from=6 is after the last round \(sim\.rounds=5\)"):
        compose(["model=tiny", "sim.rounds=5", "server_opt.average_from=6"])
    compose(["model=tiny", "sim.rounds=5", "server_opt.average_from=5"])  # the last round alone is a mean of one


def test_the_scored_and_exported_model_is_the_mean_of_the_globals(tiny: list[str], tmp_path: Path) -> None:
    """Two inline runs of one federation, with and without averaging from round 2: the clients' trajectory is the
    same (round 1 and 2 score the same model), round 3 scores the mean of the globals of rounds 2 and 3, and the
    exported adapter is that mean (read from the plain run's last two checkpoints)."""
    plain = run_server(LoopGrid(3), [*tiny, *SIM, f"run_dir={tmp_path / 'plain'}"])
    avg = run_server(LoopGrid(3), [*tiny, *SIM, "server_opt.average_from=2", f"run_dir={tmp_path / 'avg'}"])
    p, a = read_metrics(plain), read_metrics(avg)
    for r in (0, 1, 2):
        assert a[r]["accuracy"] == p[r]["accuracy"] and a[r]["loss"] == p[r]["loss"], r
        assert a[r]["train_loss"] == p[r]["train_loss"] if r else True  # the clients trained the same
    assert a[3]["train_loss"] == p[3]["train_loss"]  # round 3's clients trained from the global, not the mean
    assert [r["averaged_rounds"] for r in a] == [0, 0, 1, 2] and "averaged_rounds" not in p[3]
    assert a[3]["loss"] != p[3]["loss"]  # round 3 scored another model
    g2, g3 = Checkpoint.load(plain, name=PREVIOUS_FILE), Checkpoint.load(plain)
    assert (g2.round, g3.round) == (2, 3)
    assert Checkpoint.load(avg).arrays.keys() == g3.arrays.keys()
    assert all(torch.equal(Checkpoint.load(avg).arrays[k], g3.arrays[k]) for k in g3.arrays)  # resumes the global
    mean = {k: ((g2.arrays[k].double() + g3.arrays[k].double()) / 2).float() for k in g3.arrays}
    exported = load_file(str(avg / "adapter" / "adapter_model.safetensors"))
    b_names = [k for k in mean if k.endswith(B_SUFFIX)]
    assert b_names
    for name in b_names:  # PEFT saves an adapter's tensors without its adapter name
        got = exported[name.replace(B_SUFFIX, ".lora_B.weight")]
        assert torch.allclose(got, mean[name], atol=1e-6), name
        assert not torch.allclose(got, g3.arrays[name], atol=1e-6), name  # not the last global
