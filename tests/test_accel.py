"""`train.precision` on CPU: bf16 autocast where the CPU has native bf16, fp32 (with a warning) elsewhere."""

from __future__ import annotations

import logging

import pytest
import torch

from clients.train import local_train
from fl import accel
from fl.adapters import build_adapter
from fl.app.config import compose
from fl.data import IndexedDataset, TokenizedSplit
from fl.tasks import get_task, load_base_model
from privacy import ClientAccountant, make_private

SEQ_CLS = get_task("seq_cls")  # the tiny models here are sequence classifiers

CPU = torch.device("cpu")


def _tiny(n: int = 48) -> tuple[torch.nn.Module, IndexedDataset]:
    cfg = compose(["model=tiny", "strategy.rank=4"])
    model = build_adapter(
        load_base_model(cfg.model, num_labels=3, seed=0),
        kind="lora",
        strategy_cfg=cfg.strategy,
        targets=["all-linear"],
        seed=0,
    )
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(5, 300, (10,), generator=gen) for _ in range(n)]
    return model, IndexedDataset(TokenizedSplit(ids, torch.randint(0, 3, (n,), generator=gen)))


def test_precision_maps_to_an_autocast_dtype_only_where_it_helps(monkeypatch: pytest.MonkeyPatch) -> None:
    assert accel.autocast_dtype(CPU, "fp32") is None
    assert accel.autocast_dtype(CPU, "fp16") is None  # fp16 autocast on CPU is slower than fp32
    assert accel.autocast_dtype(torch.device("cuda"), "fp16") is torch.float16
    monkeypatch.setattr(accel, "cpu_bf16_native", lambda: True)
    assert accel.autocast_dtype(CPU, "bf16") is torch.bfloat16
    monkeypatch.setattr(accel, "cpu_bf16_native", lambda: False)
    assert accel.autocast_dtype(CPU, "bf16") is None


def test_a_precision_that_does_not_apply_trains_in_fp32_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(accel, "_WARNED", set())
    caplog.set_level(logging.WARNING, logger="fl.accel")
    lin = torch.nn.Linear(4, 4)
    with accel.autocast(CPU, "fp16"):
        assert lin(torch.ones(1, 4)).dtype == torch.float32
    assert "train.precision=fp16 does not apply on cpu" in caplog.text


@pytest.mark.skipif(not accel.cpu_bf16_native(), reason="this CPU has no native bf16 (AVX512-BF16/AMX)")
@pytest.mark.parametrize("dp", [False, True])
def test_bf16_on_a_native_cpu_trains_with_fp32_master_weights(dp: bool) -> None:
    model, data = _tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    lin = torch.nn.Linear(4, 4)
    with accel.autocast(CPU, "bf16"):
        assert lin(torch.ones(1, 4)).dtype == torch.bfloat16  # autocast is really on
    acc = ClientAccountant("rdp")

    def wrap(m, o, loader):
        return make_private(
            model=m,
            optimizer=o,
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            accountant=acc,
            loss_fn=SEQ_CLS.per_example_loss,
        )

    res = local_train(
        model,
        data,
        steps=3,
        batch_size=16,
        physical_batch_size=8,
        lr=1e-2,
        weight_decay=0.0,
        pad_id=0,
        seed=0,
        wrap=wrap if dp else None,
        precision="bf16",
    )
    assert res.steps == 3 and torch.isfinite(torch.tensor(res.loss))
    for n, p in model.named_parameters():
        if n in before:
            assert p.dtype == torch.float32 and torch.isfinite(p).all() and not torch.equal(p, before[n]), n
    assert acc.steps == (3 if dp else 0)


@pytest.mark.skipif(not accel.cpu_bf16_native(), reason="this CPU has no native bf16 (AVX512-BF16/AMX)")
def test_evaluation_runs_under_the_training_precision() -> None:
    from clients.evaluate import evaluate

    model, data = _tiny()
    split = data.split.subset(data.indices)
    loss32, _ = evaluate(model, split, batch_size=16, pad_id=0)
    loss16, _ = evaluate(model, split, batch_size=16, pad_id=0, precision="bf16")
    assert loss16 != loss32 and abs(loss16 - loss32) < 0.05 * abs(loss32)  # bf16 forwards, same model
