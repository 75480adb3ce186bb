"""FedLC's logit calibration (`train.fedlc_tau`, clients.calibration): the shift, the loss it gives, the pairings
it refuses at compose, and a tiny federation that trains with it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from loop_grid import LoopGrid

from clients.calibration import calibrated_loss, class_counts, fedlc_shift
from fl.app.config import compose
from fl.app.server_app import run_server
from fl.data import IndexedDataset, TokenizedSplit
from fl.outputs import read_metrics
from fl.tasks import get_task


def test_the_shift_is_tau_times_the_count_to_the_minus_quarter_and_an_absent_class_all_but_leaves() -> None:
    shift = fedlc_shift(torch.tensor([16, 1, 0]), 0.5)
    torch.testing.assert_close(shift, torch.tensor([0.5 / 2, 0.5, 0.5 * 100.0]))
    ids = [torch.tensor([1, 2])] * 6
    split = TokenizedSplit(ids, torch.tensor([0, 0, 2, -1, 2, 0]))
    counts = class_counts(IndexedDataset(split, np.array([0, 1, 2, 3, 4])), 3)  # example 5 is another client's
    assert counts.tolist() == [2, 0, 2]  # the -1 (no class) is not counted


def test_the_calibrated_loss_is_cross_entropy_on_the_shifted_logits_and_tau_0_keeps_the_tasks_loss() -> None:
    task = get_task("seq_cls")
    split = TokenizedSplit([torch.tensor([1])] * 4, torch.tensor([0, 0, 0, 1]))
    data = IndexedDataset(split)
    assert calibrated_loss(task, data, 3, 0.0) is None
    loss = calibrated_loss(task, data, 3, 1.0)
    assert loss is not None
    logits = torch.tensor([[2.0, 0.5, -1.0], [1.0, 1.0, -5.0]])
    labels = torch.tensor([0, 1])
    got = loss(SimpleNamespace(logits=logits), {"labels": labels})
    shift = torch.tensor([3.0**-0.25, 1.0, 100.0])  # counts 3, 1, 0
    want = torch.nn.functional.cross_entropy(logits - shift, labels, reduction="none")
    torch.testing.assert_close(got, want)
    plain = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    assert got[1] > plain[1]  # the rare local class's example costs more: its logit is lowered more than class 0's


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["train.fedlc_tau=-1"], "use 0 (off) or a τ > 0"),
        (["train.fedlc_tau=1.0", "privacy=dp"], "per-example bound does not hold"),
        (["train.fedlc_tau=1.0", "model=tiny_llama"], "has none"),
    ],
)
def test_bad_values_and_pairings_fail_at_compose_naming_the_key(extra: list[str], says: str) -> None:
    with pytest.raises(ValueError, match=r"train\.fedlc_tau") as err:
        compose(["model=tiny", *extra])
    assert says in str(err.value)


def test_client_level_dp_composes_with_it() -> None:
    assert compose(["model=tiny", "train.fedlc_tau=1.0", "privacy=client"]).train.fedlc_tau == 1.0


def test_a_tiny_skewed_federation_trains_with_it_and_its_clients_losses_differ(tiny: list[str], tmp_path: Path) -> None:
    job = [*tiny, "strategy=ffa_lora", "sim.num_clients=3", "sim.rounds=1", "data.alpha=0.1"]
    plain = read_metrics(run_server(LoopGrid(3), [*job, f"run_dir={tmp_path / 'plain'}"]))
    fedlc = read_metrics(run_server(LoopGrid(3), [*job, "train.fedlc_tau=1.0", f"run_dir={tmp_path / 'fedlc'}"]))
    assert [r["round"] for r in fedlc] == [0, 1]
    assert fedlc[0]["accuracy"] == plain[0]["accuracy"]  # the same start
    assert np.isfinite(fedlc[1]["loss"]) and fedlc[1]["train_loss"] != pytest.approx(plain[1]["train_loss"])
