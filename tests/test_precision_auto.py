"""`train.precision=auto` (the default): bf16 where the device has it natively, fp32 elsewhere, said once at INFO
level and never as a warning; an explicit bf16 that cannot run still warns."""

from __future__ import annotations

import logging

import pytest
import torch

from fl import accel
from fl.app.config import compose

CPU = torch.device("cpu")


@pytest.fixture
def fresh_notes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process that has said nothing about precision yet."""
    monkeypatch.setattr(accel, "_WARNED", set())
    monkeypatch.setattr(accel, "_SAID", set())


def test_the_default_job_asks_for_auto() -> None:
    assert compose([]).train.precision == "auto"
    assert compose(["+experiment=smollm2"]).train.precision == "auto"


def test_auto_is_fp32_without_native_bf16_and_says_so_once_without_a_warning(
    fresh_notes: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(accel, "cpu_bf16_native", lambda: False)
    caplog.set_level(logging.INFO, logger="fl.accel")
    assert accel.autocast_dtype(CPU, "auto") is None
    assert accel.resolved_precision(CPU, "auto") == "fp32"
    lin = torch.nn.Linear(4, 4)
    for _ in range(3):
        with accel.autocast(CPU, "auto"):
            assert lin(torch.ones(1, 4)).dtype == torch.float32
    said = [r for r in caplog.records if r.name == "fl.accel"]
    assert [r.levelno for r in said] == [logging.INFO], caplog.text
    assert "train.precision=auto: fp32 on cpu (no native bf16)" in said[0].getMessage()


def test_auto_is_bf16_where_the_cpu_reports_native_bf16(
    fresh_notes: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(accel, "cpu_bf16_native", lambda: True)
    caplog.set_level(logging.INFO, logger="fl.accel")
    assert accel.autocast_dtype(CPU, "auto") is torch.bfloat16
    assert accel.resolved_precision(CPU, "auto") == "bf16"
    with accel.autocast(CPU, "auto"):
        pass
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert "train.precision=auto: bf16 on cpu (native bf16)" in caplog.text


def test_auto_on_cuda_follows_the_devices_bf16_support(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert accel.autocast_dtype(cuda, "auto") is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert accel.autocast_dtype(cuda, "auto") is None  # e.g. a T4: fp32, never fp16 unasked


def test_an_explicit_bf16_that_cannot_run_still_warns(
    fresh_notes: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(accel, "cpu_bf16_native", lambda: False)
    caplog.set_level(logging.INFO, logger="fl.accel")
    with accel.autocast(CPU, "bf16"):
        pass
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "train.precision=bf16 does not apply on cpu" in warning.getMessage()


def test_an_unknown_precision_is_refused_at_compose() -> None:
    with pytest.raises(Exception, match="use auto, fp32, bf16 or fp16"):
        compose(["train.precision=fp8"])
