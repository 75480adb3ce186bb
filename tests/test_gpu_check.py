"""The GPU check (simulations.gpu_check): its CPU half on the tiny model, its JSON, and the CUDA fixes it found.

Without CUDA every part must still run its CPU side and record the CUDA side as skipped, with the reason; a
failing part must be recorded while the others run, and the exit status must say so. The device tests run on
every device torch sees (CUDA only where there is one).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader
from transformers import BertConfig, BertForSequenceClassification

from fl.adapters import build_adapter
from fl.app.config import compose
from fl.models import embedded_minilm_path, load_tokenizer
from fl.tasks import get_task
from privacy import ClientAccountant, make_private, release
from simulations import gpu_check
from simulations.gpu_parts import NO_CUDA, STRATEGY_RUNS

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA))]


def _check(tmp_path: Path, *args: str) -> tuple[int, dict[str, Any]]:
    out = tmp_path / "check.json"
    code = gpu_check.main(["--out", str(out), "--work-dir", str(tmp_path / "work"), *args])
    return code, json.loads(out.read_text())


def test_the_cpu_half_runs_and_records_what_it_skipped(tmp_path: Path) -> None:
    code, rep = _check(tmp_path, "--steps", "2", "--skip", "federation", "--strategies", "fed_sb+dp+sketch")
    assert code == 0 and rep["ok"] is True and rep["failed"] == []
    env = rep["environment"]
    assert env["cuda"] == torch.cuda.is_available() and env["packages"]["torch"] == torch.__version__
    parts = rep["parts"]
    assert parts["federation"] == {"status": "skipped", "reason": "left out with --skip"}
    for name in ("precision", "dp", "strategies"):
        assert parts[name]["status"] == "ok" and parts[name]["seconds"] > 0, parts[name]
    fp32 = parts["precision"]["result"]["tiny"]["cpu/fp32"]
    assert (
        fp32["steps"] == 2 and fp32["step_seconds"] > 0 and fp32["adapter_change_l1"] > 0 and fp32["autocast"] == "none"
    )
    dp = parts["dp"]["result"]["tiny"]
    for mode in ("dp_hooks/fp32", "dp_ghost/fp32"):
        assert dp[mode]["epsilon_at_1e-5"] > 0 and dp[mode]["dp_over_plain_step_time"] > 0
    run = parts["strategies"]["result"]["fed_sb+dp+sketch"]  # Fed-SB's DP sketched init, then a DP round
    assert len(run["accuracy"]) == 2 and run["failed_replies"] == 0
    skipped = {s["what"]: s["why"] for s in parts["strategies"]["skipped"]}
    assert {k for k in STRATEGY_RUNS if k != "fed_sb+dp+sketch"} <= set(skipped)
    assert skipped["fedit"] == "left out with --strategies"
    if not torch.cuda.is_available():
        for name in ("precision", "dp", "strategies"):
            whys = [s["why"] for s in parts[name]["skipped"]]
            assert any(NO_CUDA in w for w in whys), (name, whys)
        assert "gpu_speedup_over_cpu" not in parts["precision"]["result"]["tiny"]
        assert parts["dp"]["result"]["device"] == "cpu"
    assert {"what": "minilm", "why": "no --minilm folder given"} in parts["precision"]["skipped"]


def test_a_failing_part_is_recorded_and_the_others_still_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def slow(chk: Any) -> dict[str, Any]:
        time.sleep(5)
        return {}

    monkeypatch.setitem(gpu_check.PARTS, "precision", slow)
    monkeypatch.setitem(gpu_check.PARTS, "dp", lambda chk: {"skipped": [], "x": 1})
    code, rep = _check(tmp_path, "--part-timeout", "0.5", "--skip", "federation", "--strategies", "nope")
    assert code == 1 and rep["ok"] is False and rep["failed"] == ["precision", "strategies"]
    assert rep["parts"]["precision"]["error"].startswith("TimeoutError") and rep["parts"]["precision"]["seconds"] < 4
    assert "--strategies ['nope']: unknown" in rep["parts"]["strategies"]["error"]
    assert rep["parts"]["dp"] == {
        "status": "ok",
        "seconds": rep["parts"]["dp"]["seconds"],
        "skipped": [],
        "result": {"x": 1},
    }


def test_bad_arguments_name_the_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--out", str(tmp_path / "x.json"), "--skip", "precison"])
    assert e.value.code == 2 and "--skip ['precison']: unknown" in capsys.readouterr().err


def test_a_half_precision_checkpoint_loads_with_fp32_master_weights(tmp_path: Path) -> None:
    tok = load_tokenizer(compose(["model=tiny"]).model)
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    config.intermediate_size, config.num_labels = 64, 3
    BertForSequenceClassification(config).half().save_pretrained(str(tmp_path / "m"))
    tok.save_pretrained(str(tmp_path / "m"))
    cfg = compose(["model=hf", f"model.name={tmp_path / 'm'}"])
    model = get_task("seq_cls").build_model(cfg.model, num_labels=3, seed=0)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert embedded_minilm_path()  # the real MiniLM (fp32 on disk) loads the same way


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_dp_noise_is_drawn_on_the_parameters_device(device: str) -> None:
    """Opacus draws noise with the seeded generator on the reference tensor's device: a CPU generator fails on
    CUDA. The same seed gives the same noise again on one device."""
    cfg = compose(["model=tiny", "strategy=fedit", "strategy.rank=2"])
    tok = load_tokenizer(cfg.model)
    task = get_task("seq_cls")
    updates = []
    for _ in range(2):
        base = task.build_model(cfg.model, num_labels=3, seed=0).to(device)
        model = build_adapter(base, kind="lora", strategy_cfg=cfg.strategy, targets=["all-linear"], seed=0)
        params = [p for p in model.parameters() if p.requires_grad]
        before = [p.detach().clone() for p in params]
        ids = torch.randint(5, tok.vocab_size, (8, 6), generator=torch.Generator().manual_seed(1))
        rows = [
            {"input_ids": i, "attention_mask": torch.ones_like(i), "labels": torch.tensor(k % 3)}
            for k, i in enumerate(ids)
        ]
        loader = DataLoader(rows, batch_size=4)
        model.train()
        opt = torch.optim.SGD(params, lr=0.1)
        priv = make_private(
            model=model,
            optimizer=opt,
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            accountant=ClientAccountant(),
            poisson_sampling=False,
            noise_seed=3,
            loss_fn=task.per_example_loss,
        )
        assert priv.optimizer.generator is not None and priv.optimizer.generator.device.type == device
        batch = {k: v.to(device) for k, v in next(iter(priv.data_loader)).items()}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(11)  # the same dropout both times: only the noise's seed could differ
            priv.objective(priv.module(**task.model_inputs(batch)), batch).backward()
            priv.optimizer.step()
        release(priv.module)
        updates.append(torch.cat([(p.detach() - b).flatten().cpu() for p, b in zip(params, before, strict=True)]))
    assert updates[0].abs().sum() > 0 and torch.equal(updates[0], updates[1])
