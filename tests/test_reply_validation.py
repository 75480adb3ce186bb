"""Reply validation under random input: never a crash, never a bad tensor in the aggregate."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fl import constants as K
from fl.app.config import compose
from strategies import FedIT
from strategies.screening import reply_problem

EXPECTED = {"m.lora_A.default.weight": (2, 3), "m.lora_B.default.weight": (3, 2), "head.weight": (3,)}


@pytest.fixture(autouse=True, scope="module")
def task_identity() -> None:
    """Messages can only be built inside a run; give them one."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def _good_state(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in EXPECTED.items()}


def _msg(arrays: dict[str, np.ndarray] | None, metrics: dict[str, float | int] | None) -> Message:
    content = RecordDict()
    if arrays is not None:
        content[K.ARRAYS] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    if metrics is not None:
        content[K.METRICS] = MetricRecord(metrics)
    return Message(content, 1, MessageType.TRAIN)


dtypes = st.sampled_from([np.float32, np.float64, np.float16, np.int64, np.int8, np.bool_])
values = st.sampled_from([0.0, 1.0, -1e30, math.nan, math.inf, -math.inf, 1e-40])
shapes = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)


@st.composite
def records(draw: st.DrawFn) -> tuple[dict[str, np.ndarray] | None, dict[str, float | int] | None]:
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    state: dict[str, np.ndarray] | None = _good_state(rng)
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["drop", "add", "shape", "dtype", "value", "none"]))
        assert state is not None
        key = draw(st.sampled_from(sorted(EXPECTED)))
        if op == "drop":
            state.pop(key, None)
        elif op == "add":
            state[draw(st.text(min_size=1, max_size=8))] = np.zeros(draw(shapes), np.float32)
        elif op == "shape":
            state[key] = np.zeros(draw(shapes), np.float32)
        elif op == "dtype" and key in state:
            state[key] = state[key].astype(draw(dtypes))
        elif op == "value" and key in state and state[key].size and np.issubdtype(state[key].dtype, np.floating):
            flat = state[key].reshape(-1)
            flat[draw(st.integers(0, flat.size - 1))] = draw(values)
        elif op == "none":
            state = None
            break
    n = draw(st.one_of(st.integers(-5, 100), st.floats(allow_nan=True, allow_infinity=True), st.none()))
    metrics = None if n is None else {K.NUM_EXAMPLES: n, K.TRAIN_LOSS: 0.5}
    return state, metrics


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(records())
def test_reply_validation_never_crashes_and_passes_only_sound_replies(rec) -> None:  # type: ignore[no-untyped-def]
    state, metrics = rec
    problem = reply_problem(_msg(state, metrics), expected=EXPECTED, server_round=1)
    if problem is None:
        assert state is not None and metrics is not None
        assert set(state) == set(EXPECTED)
        for k, v in state.items():
            assert v.shape == EXPECTED[k] and np.issubdtype(v.dtype, np.floating) and np.isfinite(v).all()
        assert math.isfinite(metrics[K.NUM_EXAMPLES]) and metrics[K.NUM_EXAMPLES] > 0
    else:
        assert isinstance(problem, str) and problem


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(records(), min_size=1, max_size=4), st.integers(0, 2**16))
def test_the_aggregate_never_holds_a_bad_tensor(recs, seed) -> None:  # type: ignore[no-untyped-def]
    cfg = compose(["model=tiny", "sim.num_clients=2", "sim.min_train_clients=1"])
    strategy = FedIT.from_config(cfg, overrides=[], fixed={})
    strategy.expected = dict(EXPECTED)
    good = _good_state(np.random.default_rng(seed))
    msgs = [_msg(good, {K.NUM_EXAMPLES: 10})] + [_msg(s, m) for s, m in recs]
    arrays, _ = strategy.aggregate_train(1, msgs)
    assert arrays is not None  # the one sound reply is always enough (min 1)
    out = arrays.to_torch_state_dict()
    assert set(out) == set(EXPECTED)
    for k, t in out.items():
        assert tuple(t.shape) == EXPECTED[k] and bool(torch.isfinite(t).all())
    stats = strategy.stats[1]
    assert stats.aggregated + stats.rejected == len(msgs)
