"""FedEx-LoRA: the fold makes aggregation exact (property test), and a real run keeps, sends, evaluates,
checkpoints and exports the folded base weights (tiny model, 2 clients, 2 rounds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from loop_grid import LoopGrid
from peft import PeftModel

from fl.app.server_app import run_server
from fl.app.workspace import get_workspace
from fl.base_delta import BASE_DELTA_FILE, apply_base_delta, apply_to_base
from fl.checkpoint import Checkpoint
from fl.data import IndexedDataset
from fl.outputs import read_metrics
from fl.tasks import load_base_model
from fl.tasks.classification import collate
from strategies.lora_math import combine_residuals, fedex_fold_residual, fedex_residual, weighted_average

dims = st.tuples(st.integers(2, 12), st.integers(2, 12), st.integers(1, 4), st.integers(2, 5), st.integers(0, 10_000))


@settings(max_examples=60, deadline=None, derandomize=True)
@given(dims, st.sampled_from([0.5, 2.0, 16.0]))
def test_folded_model_equals_the_average_of_client_models(d, scaling: float) -> None:  # type: ignore[no-untyped-def]
    d_out, d_in, r, k, seed = d
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(d_out, d_in, generator=g)
    As = [torch.randn(r, d_in, generator=g) for _ in range(k)]
    Bs = [torch.randn(d_out, r, generator=g) for _ in range(k)]
    w = (torch.rand(k, generator=g) + 0.1).tolist()
    a_bar = weighted_average([{"a": a} for a in As], w)["a"]
    b_bar = weighted_average([{"b": b} for b in Bs], w)["b"]
    e = fedex_residual(As, Bs, w, A_bar=a_bar, B_bar=b_bar, scaling=scaling)
    p = torch.tensor(w, dtype=torch.float64) / sum(w)
    clients = sum(pk * (w0.double() + scaling * (b.double() @ a.double())) for pk, a, b in zip(p, As, Bs, strict=True))
    folded = (w0 + e) + scaling * (b_bar @ a_bar)  # float32, as the model computes it
    assert torch.allclose(folded.double(), clients, rtol=1e-5, atol=1e-4 * (1 + scaling))
    parts = [fedex_fold_residual(As, Bs, w, A_bar=a_bar, B_bar=b_bar, E=e, scaling=scaling)]
    assert combine_residuals(parts) < 1e-6


def test_base_delta_is_absolute_and_restored() -> None:
    lin = torch.nn.Linear(3, 2)
    w0 = lin.weight.detach().clone()
    d = {"weight": torch.ones(2, 3)}
    apply_base_delta(lin, d)
    apply_base_delta(lin, d)  # twice (a second virtual client in the same process): not added twice
    assert torch.equal(lin.weight, w0 + 1)
    apply_base_delta(lin, {})  # a message without a fold: the pretrained weight again
    assert torch.equal(lin.weight, w0)


@pytest.fixture(scope="module")
def run(tiny: list[str], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    overrides = [
        *tiny,
        "strategy=fedex_lora",
        "strategy.rank=4",
        "strategy.lr=5e-3",
        "sim.num_clients=2",
        "sim.rounds=2",
        "data.partitioner=iid",
        f"run_dir={tmp_path_factory.mktemp('fedex') / 'run'}",
    ]
    return run_server(LoopGrid(2), overrides), overrides  # in-process: the same numbers as on Ray (test_reliability)


def test_fedex_is_exact_and_pays_the_dense_fold_downlink(run: tuple[Path, list[str]]) -> None:
    run_dir, overrides = run
    rows = read_metrics(run_dir)[1:]
    ws = get_workspace(overrides)
    dense = sum(int(p.numel()) for n, p in ws.model.named_parameters() if n.endswith(".base_layer.weight"))
    for row in rows:
        assert row["residual"] <= 1e-6 < row["residual_before"]
    # round 1 sends the adapter only; from round 2 every client also gets the dense cumulative fold
    assert rows[1]["floats_down"] == rows[0]["floats_down"] + 2 * dense
    assert rows[1]["floats_up"] == rows[0]["floats_up"] == rows[0]["floats_down"]
    fold = Checkpoint.load(run_dir).strategy_state["fold"]
    assert len(fold) == len([n for n, _ in ws.model.named_parameters() if n.endswith(".base_layer.weight")])
    assert all(float(f.abs().max()) > 0 for f in fold.values())


def test_export_with_base_delta_reproduces_the_model_with_plain_peft(run: tuple[Path, list[str]]) -> None:
    run_dir, overrides = run
    ws = get_workspace(overrides)
    ds = IndexedDataset(ws.task.test)
    batch = collate([ds[i] for i in range(32)], ws.pad_id)
    batch.pop("labels")
    base = load_base_model(ws.cfg.model, num_labels=ws.num_labels, seed=int(ws.cfg.seed))
    without = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()
    base = load_base_model(ws.cfg.model, num_labels=ws.num_labels, seed=int(ws.cfg.seed))
    with_fold = PeftModel.from_pretrained(
        apply_to_base(base, run_dir / "adapter" / BASE_DELTA_FILE), str(run_dir / "adapter")
    )
    with torch.no_grad():
        want = ws.model(**batch).logits
        assert torch.allclose(with_fold.eval()(**batch).logits, want, atol=1e-5)
        assert not torch.allclose(without(**batch).logits, want, atol=1e-5)  # the fold matters
    assert json.loads((run_dir / "summary.json").read_text())["strategy"] == "fedex_lora"


def test_the_fold_survives_a_checkpoint_and_goes_to_every_client(tiny: list[str]) -> None:
    from flwr.app import ArrayRecord

    from fl import constants as K
    from fl.app.config import compose
    from fl.wire import from_record
    from strategies.fedex_lora import FedExLoRA

    overrides = [*tiny, "strategy=fedex_lora"]
    first = FedExLoRA.from_config(compose(overrides), overrides=overrides, fixed={})
    assert K.BASE_DELTA not in first.arrays_for(1, ArrayRecord())  # round 1: nothing folded yet
    first.fold = {"m.base_layer.weight": torch.randn(3, 2)}
    resumed = FedExLoRA.from_config(compose(overrides), overrides=overrides, fixed={})
    resumed.load_state_dict(first.state_dict())
    sent = from_record(resumed.arrays_for(7, ArrayRecord()).array_records[K.BASE_DELTA])
    assert torch.equal(sent["m.base_layer.weight"], first.fold["m.base_layer.weight"])
