"""simulations/bench_fedsa.py without running MiniLM: the sweep's cells compose, the table's arithmetic."""

from __future__ import annotations

from fl import constants as K
from fl.app.config import compose
from simulations.bench_fedsa import table
from simulations.sweep import expand, load_sweep


def test_the_fedsa_sweep_is_fedit_and_fedsa_on_the_same_client_test_shares() -> None:
    overrides, cases = load_sweep("fedsa")
    cells = expand(overrides, cases)
    assert len(cells) == 6
    cfgs = [compose(c) for c in cells]
    assert sorted({c.strategy.name for c in cfgs}) == ["fedit", "fedsa_lora"]
    for c in cfgs:
        assert c.data.client_test_fraction == 0.1 and c.sim.fraction_evaluate == 1.0
        assert c.strategy.lr == 3e-3 and c.strategy.rank == 8 and c.sim.num_clients == 10


def test_the_table_is_mean_and_sample_std_over_seeds() -> None:
    def row(acc: float, client: float) -> dict[str, float]:
        return {
            "accuracy": acc,
            K.CLIENT_ACCURACY_MEAN: client,
            K.CLIENT_ACCURACY_STD: 0.1,
            K.CLIENT_ACCURACY_MIN: client - 0.2,
            K.CLIENT_ACCURACY_MAX: client + 0.2,
        }

    text = table({"FedSA-LoRA": [row(0.5, 0.7), row(0.6, 0.8)], "FedIT": [row(0.6, 0.6)]})
    assert "| FedSA-LoRA | 2 | 75.00 ± 7.07 | 10.00 ± 0.00 | 55.00 ± 7.07 | 95.00 ± 7.07 | 55.00 ± 7.07 |" in text
    assert "| FedIT | 1 | 60.00 ± 0.00 |" in text
