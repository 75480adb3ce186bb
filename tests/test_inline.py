"""`sim.runtime=inline` (fl.app.inline): what a node of Flower's Simulation Runtime gets, in one process.

Its metrics equal a Ray run's: tests/test_simulation.py (one run) and tests/golden_sweep.json (the 4-cell sweep).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.constant import ErrorCode

from fl.app.inline import InlineGrid
from fl.app.simulation import SimulationError, run_simulation


def _app(msg: Message, context: Context) -> Message:
    """Counts its calls in the node's state, scribbles on the message it got, raises when told to."""
    calls = int(str(context.state["n"]["calls"])) if "n" in context.state else 0
    context.state["n"] = ConfigRecord({"calls": calls + 1})
    msg.content.config_records["cfg"]["x"] = "changed by the client"
    if msg.content.config_records["cfg"]["raise"]:
        raise RuntimeError("boom")
    return Message(RecordDict({"cfg": ConfigRecord({"calls": calls + 1})}), reply_to=msg)


def _msg(node: int, *, fail: bool = False) -> Message:
    content = RecordDict({"cfg": ConfigRecord({"x": "sent", "raise": fail})})
    return Message(content, dst_node_id=node, message_type="train")


def test_each_node_keeps_its_context_a_failure_is_an_error_reply_and_keeps_nothing() -> None:
    grid = InlineGrid(2, _app)
    a, b = sorted(grid.get_node_ids())
    assert [int(str(grid.contexts[n].node_config["partition-id"])) for n in (a, b)] == [0, 1]
    sent = [_msg(a), _msg(b), _msg(a)]
    replies = list(grid.send_and_receive(sent))
    assert [int(str(r.content["cfg"]["calls"])) for r in replies] == [1, 1, 2]  # node a's state is its own
    assert {r.metadata.reply_to_message_id for r in replies} == {m.metadata.message_id for m in sent}
    assert all(m.content.config_records["cfg"]["x"] == "sent" for m in sent)  # the client got a copy, as over the wire
    (failed,) = grid.send_and_receive([_msg(a, fail=True)])
    assert failed.has_error() and failed.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert "boom" in str(failed.error.reason)
    assert int(str(grid.contexts[a].state["n"]["calls"])) == 2  # the failed call's changes were dropped


def test_pulling_runs_one_client_at_a_time_and_a_new_round_drops_what_was_not_pulled() -> None:
    grid = InlineGrid(3, _app)
    nodes = sorted(grid.get_node_ids())
    ids = list(grid.push_messages([_msg(n) for n in nodes]))
    first = list(grid.pull_messages(ids))
    assert len(first) == 1 and "n" in grid.contexts[nodes[0]].state and "n" not in grid.contexts[nodes[1]].state
    grid.push_messages([_msg(nodes[2])])  # the round stopped waiting (sim.timeout): the rest is not delivered
    assert list(grid.pull_messages(ids)) == []
    with pytest.raises(ValueError, match="no node 5"):
        grid.push_messages([_msg(5)])


def test_a_server_failure_inline_is_one_line_with_its_traceback_in_the_run_folder(
    tiny: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fl.app.server_app as server_app

    def fails(grid: object, overrides: list[str]) -> Path:
        raise ValueError("the strategy refused its input")

    monkeypatch.setattr(server_app, "run_server", fails)
    run_dir = tmp_path / "r"
    with pytest.raises(SimulationError) as err:
        run_simulation([*tiny, "sim.num_clients=2", "sim.runtime=inline", f"run_dir={run_dir}"])
    assert "ValueError: the strategy refused its input" in str(err.value)
    assert f"traceback in {run_dir.resolve() / 'error.log'}" in str(err.value)
    assert "Traceback" in (run_dir / "error.log").read_text()
