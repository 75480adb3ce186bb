"""FedSVD (`strategies.fedsvd`, `strategies.svd_math`): the re-factorisation's properties (exact B̄·A, orthonormal A,
shapes, rank-deficient products, the authors' full SVD up to sign), then tiny federations through the real ServerApp
and ClientApp in-process (`LoopGrid`): the downlink carries the new A and the clients keep it, the export reloads
with plain PEFT, a resumed run with a server optimizer ends where the uninterrupted one does, and sample-level DP
reports the ε its plan promised."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import torch
from loop_grid import LoopGrid
from opacus.accountants import RDPAccountant
from peft import PeftModel

from fl import constants as K
from fl.adapters import A_SUFFIX, B_SUFFIX, load_tensors
from fl.app.cli import resume_overrides
from fl.app.config import compose
from fl.app.server_app import run_server
from fl.app.workspace import get_workspace
from fl.checkpoint import Checkpoint
from fl.data import IndexedDataset
from fl.outputs import read_metrics
from fl.tasks import load_base_model
from fl.tasks.classification import collate
from fl.wire import from_record
from privacy import client_plan
from strategies import get_strategy
from strategies.svd_math import (
    from_frame,
    orthonormal_frame,
    orthonormality_error,
    outside_span,
    refactorize,
    to_frame,
)

NODES, R = 2, 4
H, INTER, LAYERS, LABELS = 32, 64, 2, 3  # the tiny model (configs/model/tiny.yaml)
MODULES = [(H, H)] * 4 + [(INTER, H), (H, INTER)]  # (d_out, d_in): q, k, v, attn-out, intermediate, output
B_FLOATS = LAYERS * sum(d_out * R for d_out, _ in MODULES) + H * LABELS + LABELS  # B and the head
A_FLOATS = LAYERS * sum(R * d_in for _, d_in in MODULES)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _close(x: torch.Tensor, y: torch.Tensor, tol: float = 1e-10) -> bool:
    return float((x.double() - y.double()).abs().max()) <= tol * max(1.0, float(y.double().abs().max()))


# ------------------------------------------------------------------ the maths
CASES = [  # (d_out, r, d_in, how B is made)
    (16, 4, 12, "random"),
    (5, 8, 20, "random"),  # d_out < r: Σ has d_out values, B' is zero-padded
    (12, 6, 6, "random"),  # r = d_in: A' is a square orthogonal matrix
    (10, 4, 9, "rank1"),  # rank(B·A) = 1 < r
    (10, 4, 9, "zero_column"),  # one of B's columns is zero
    (10, 4, 9, "zero"),  # B = 0 (round 1 before training)
]


def _b(d_out: int, r: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    if kind == "rank1":
        return torch.randn(d_out, 1, generator=gen, dtype=torch.float64) @ torch.randn(1, r, generator=gen).double()
    b = torch.randn(d_out, r, generator=gen, dtype=torch.float64)
    if kind == "zero_column":
        b[:, 1] = 0
    return torch.zeros_like(b) if kind == "zero" else b


@pytest.mark.parametrize(("d_out", "r", "d_in", "kind"), CASES)
def test_refactorize_keeps_the_product_and_makes_a_orthonormal(d_out: int, r: int, d_in: int, kind: str) -> None:
    gen = _gen(d_out * 100 + r)
    a = torch.randn(r, d_in, generator=gen, dtype=torch.float64)
    b = _b(d_out, r, kind, gen)
    b_new, a_new = refactorize(b, a)
    assert b_new.shape == (d_out, r) and a_new.shape == (r, d_in)
    assert _close(b_new @ a_new, b @ a)  # exact: B'·A' = B̄·A
    assert orthonormality_error(a_new) < 1e-12
    assert outside_span(a_new, orthonormal_frame(a)) < 1e-12  # A' stays in A's row space
    norms = b_new.norm(dim=0)  # B' = U·Σ: column norms are the singular values, descending
    assert torch.all(norms[:-1] >= norms[1:] - 1e-12)
    again_b, again_a = refactorize(b_new, a_new)  # a factorisation in SVD form is a fixed point (up to sign)
    assert _close(again_b @ again_a, b @ a)


def test_refactorize_is_the_authors_full_svd_up_to_sign_and_keeps_float32() -> None:
    gen = _gen(7)
    a, b = torch.randn(6, 40, generator=gen), torch.randn(30, 6, generator=gen)
    b_new, a_new = refactorize(b, a)
    assert b_new.dtype == a_new.dtype == torch.float32
    u, s, vh = torch.linalg.svd(b.double() @ a.double(), full_matrices=False)  # misc/utils.py:reinit_lora
    signs = torch.sign((a_new.double() * vh[:6]).sum(dim=1))
    assert torch.allclose(a_new.double(), signs[:, None] * vh[:6], atol=1e-5)
    assert torch.allclose(b_new.double(), u[:, :6] * s[:6] * signs, atol=1e-4)
    assert _close(b_new @ a_new, b @ a, tol=1e-5)


def test_the_frame_round_trips_and_keeps_norms() -> None:
    gen = _gen(3)
    a0 = torch.randn(4, 20, generator=gen, dtype=torch.float64)  # PEFT's Kaiming A: not orthonormal
    frame = orthonormal_frame(a0)
    b = torch.randn(9, 4, generator=gen, dtype=torch.float64)
    c = to_frame(b, a0, frame)
    assert _close(c @ frame, b @ a0) and abs(float(c.norm()) - float((b @ a0).norm())) < 1e-10
    assert _close(from_frame(c, a0, frame), b)
    _, a1 = refactorize(b, a0)  # after a re-factorisation the same frame still holds the product exactly
    assert _close(to_frame(b, a0, frame), to_frame(*refactorize(b, a0), frame))
    assert _close(from_frame(c, a1, frame) @ a1, b @ a0)


def test_bad_shapes_are_refused_naming_them() -> None:
    with pytest.raises(ValueError, match="exceeds d_in"):
        refactorize(torch.zeros(8, 6), torch.zeros(6, 4))
    with pytest.raises(ValueError, match="shape mismatch"):
        refactorize(torch.zeros(8, 3), torch.zeros(4, 10))


# ------------------------------------------------------------------ the strategy in a federation
def _job(tiny: list[str], run_dir: Path, *extra: str) -> list[str]:
    job = [*tiny, "strategy=fedsvd", f"strategy.rank={R}", f"sim.num_clients={NODES}", "sim.rounds=2"]
    return [*job, "data.partitioner=iid", "strategy.lr=0.05", f"run_dir={run_dir}", *extra]


@pytest.fixture(scope="module")
def federation(tiny: list[str], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], LoopGrid]:
    """Two rounds with per-client evaluation and a defence (the median of 2 is their mean: the path, not its
    effect); the grid keeps each node's Context.state."""
    run_dir = tmp_path_factory.mktemp("fedsvd") / "run"
    overrides = _job(
        tiny, run_dir, "sim.fraction_evaluate=1.0", "data.client_test_fraction=0.2", "strategy.defence=median"
    )
    grid = LoopGrid(NODES)
    return run_server(grid, overrides), overrides, grid


def test_each_round_is_exact_and_the_downlink_carries_the_new_a(federation: Any) -> None:
    run_dir, _, _ = federation
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert row["aggregated"] == NODES and row["residual"] < 1e-6 and row["svd_residual"] < 1e-6
        assert row["defence"] == "median"
        assert row["floats_up"] == NODES * B_FLOATS
        a_down = NODES * A_FLOATS if row["round"] > 1 else 0  # round 1 starts from the seed's A: no bytes
        assert row["floats_down"] == NODES * B_FLOATS + a_down
        assert row["bytes_down"] > 4 * row["floats_down"]
    assert rows[2]["bytes_down"] - rows[1]["bytes_down"] > 4 * NODES * A_FLOATS
    assert rows[2]["train_loss"] < rows[1]["train_loss"]  # it learns (the tiny model's test loss is noise)


def test_clients_score_the_same_model_as_ffa_lora_after_the_refactorisation(federation: Any, tmp_path: Path) -> None:
    """Round 1 of FedSVD is FFA-LoRA's; its re-factorisation moves no prediction, so each client's evaluation of
    (B', A') must equal FFA-LoRA's of (B̄, A): the clients really load the new A with the new B."""
    run_dir, overrides, _ = federation
    ffa = [o for o in overrides if not o.startswith(("strategy=", "run_dir=", "sim.rounds="))]
    ffa += ["strategy=ffa_lora", "sim.rounds=1", f"run_dir={tmp_path / 'ffa'}"]
    theirs, ours = read_metrics(run_server(LoopGrid(NODES), ffa))[1], read_metrics(run_dir)[1]
    assert ours[K.CLIENTS_EVALUATED] == theirs[K.CLIENTS_EVALUATED] == NODES
    assert ours[K.CLIENT_LOSS_MEAN] == pytest.approx(theirs[K.CLIENT_LOSS_MEAN], rel=1e-5)
    assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5)


def test_the_server_keeps_a_orthonormal_and_the_clients_hold_it(federation: Any) -> None:
    run_dir, _, grid = federation
    ckpt = Checkpoint.load(run_dir)
    fixed = ckpt.strategy_state["fixed"]
    assert ckpt.strategy_state["factored"] and set(fixed) == set(ckpt.strategy_state["frame"])
    assert fixed and all(k.endswith(A_SUFFIX) and orthonormality_error(a) < 1e-5 for k, a in fixed.items())
    assert not any(k.endswith(A_SUFFIX) for k in ckpt.arrays)  # A travels as server state, not as a trained array
    for ctx in grid.contexts.values():  # the last message each node got (per-client evaluation) held the final A
        held = from_record(ctx.state.array_records[K.STATE_FROZEN])
        assert set(held) == set(fixed) and all(torch.equal(held[k], fixed[k]) for k in fixed)


def test_the_export_is_a_plain_peft_adapter_with_the_servers_logits(federation: Any) -> None:
    run_dir, overrides, _ = federation
    ws = get_workspace(overrides)
    reloaded = PeftModel.from_pretrained(
        load_base_model(ws.cfg.model, num_labels=ws.num_labels, seed=int(ws.cfg.seed)), str(run_dir / "adapter")
    ).eval()
    ckpt = Checkpoint.load(run_dir)
    fixed = ckpt.strategy_state["fixed"]
    params = dict(reloaded.named_parameters())
    assert all(torch.equal(params[k], a) for k, a in fixed.items())  # the exported A is the server's current A
    load_tensors(ws.model, {**fixed, **ckpt.arrays})  # the server's final model (other runs share the workspace)
    ds = IndexedDataset(ws.task.test)
    batch = collate([ds[i] for i in range(32)], ws.pad_id)
    batch.pop("labels")
    ws.model.eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).logits, ws.model(**batch).logits, atol=1e-5)


def test_a_resumed_run_with_a_server_optimizer_ends_where_the_uninterrupted_one_does(
    tiny: list[str], tmp_path: Path
) -> None:
    """FedAdam steps B in A_1's fixed frame: its moments, the frame and the current A are in the checkpoint."""
    full = read_metrics(run_server(LoopGrid(NODES), _job(tiny, tmp_path / "full", "server_opt=adam")))
    run_server(LoopGrid(NODES), _job(tiny, tmp_path / "part", "server_opt=adam", "sim.rounds=1"))
    resumed = read_metrics(run_server(LoopGrid(NODES), resume_overrides(str(tmp_path / "part"), ["sim.rounds=2"])))
    assert [r["round"] for r in resumed] == [0, 1, 2]
    for a, b in zip(full, resumed, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["accuracy"] == pytest.approx(b["accuracy"])
    assert resumed[2]["floats_down"] == full[2]["floats_down"]  # the resumed round 2 sent A too
    for row in full[1:]:
        assert row["residual"] < 1e-6 and row["svd_residual"] < 1e-6 and abs(row["server_step_ratio"] - 1) > 1e-3
    end_full, end_part = Checkpoint.load(tmp_path / "full"), Checkpoint.load(tmp_path / "part")
    assert set(end_full.strategy_state["server_opt"]["m"]) == set(end_full.arrays)  # moments for what is averaged
    for key, value in {**end_full.arrays, **end_full.strategy_state["fixed"]}.items():
        other = end_part.arrays.get(key, end_part.strategy_state["fixed"].get(key))
        torch.testing.assert_close(value, other, rtol=1e-5, atol=1e-6)


def test_sample_level_dp_reports_the_epsilon_its_plan_promised_with_a_server_optimizer(
    tiny: list[str], tmp_path: Path
) -> None:
    """DP-SGD on B and the head, FedAvgM on the released B̄ (post-processing): each client's reported ε is an
    independent RDP recomputation from privacy_plan.json, whose σ, q and steps are the plan without the optimizer."""
    job = _job(tiny, tmp_path / "dp", "privacy=dp", "privacy.target_epsilon=8", "privacy.batch_size=16")
    job.append("privacy.accountant=rdp")
    rows = read_metrics(run_server(LoopGrid(NODES), [*job, "server_opt=avgm"]))
    plans = json.loads((tmp_path / "dp" / "privacy_plan.json").read_text())
    plain = get_workspace(job).privacy  # the same run without a server optimizer
    for p in plans:
        assert asdict(client_plan(plain, p["num_examples"])).items() <= p.items()
        acc = RDPAccountant()
        acc.history = [(p["noise_multiplier"], p["sample_rate"], 2 * p["steps_per_round"])]
        p["eps"] = acc.get_epsilon(delta=p["delta"])
    assert rows[2]["epsilon_max"] == pytest.approx(max(p["eps"] for p in plans), rel=1e-6)
    assert 0 < rows[2]["epsilon_max"] <= 8.0 + 1e-6
    assert rows[2]["svd_residual"] < 1e-6 and rows[2]["residual"] < 1e-6 and rows[2]["server_step_ratio"] > 0


def test_compose_refuses_scaffold_and_bad_fields_naming_the_key(tiny: list[str]) -> None:
    with pytest.raises(ValueError, match="drift=scaffold does not compose with strategy=fedsvd: each round's re-f"):
        compose([*tiny, "strategy=fedsvd", "drift=scaffold"])
    with pytest.raises(ValueError, match=r"strategy.svd_period=-1 is invalid"):
        compose([*tiny, "strategy=fedsvd", "strategy.svd_period=-1"])
    cls = get_strategy("fedsvd")
    assert cls.describe({"rank": 8, "svd_period": 1}) == "FedSVD r=8"
    assert cls.describe({"rank": 8, "svd_period": 0}) == "FedSVD r=8 (no SVD)"


def test_each_key_is_a_b_name(federation: Any) -> None:
    """Every A the server keeps has its B among the global arrays (the view maps them in pairs)."""
    ckpt = Checkpoint.load(federation[0])
    assert all(k[: -len(A_SUFFIX)] + B_SUFFIX in ckpt.arrays for k in ckpt.strategy_state["fixed"])
