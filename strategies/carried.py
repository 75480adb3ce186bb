"""Client state the server carries for a resume: the privacy accountant each client last reported.

A client's accountant lives in its own Flower context; a run that is resumed (`resume=<run dir>`) may start new
client processes, so the server keeps a copy of each reported accountant, by partition, in its checkpoint and
hands it back with the first message after the resume (`privacy.session` restores it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict

from fl import constants as K


class AccountantCopies:
    """The privacy accountant state each client last reported, by partition."""

    def __init__(self) -> None:
        self.by_partition: dict[int, dict[str, Any]] = {}

    def keep(self, partition_of: Mapping[int, int], node: int, msg: Message) -> None:
        """Keep the accountant state `msg` from `node` carries (a DP client's reply), if any, by its partition."""
        if K.STATE_PRIVACY in msg.content.config_records:
            record = msg.content.config_records[K.STATE_PRIVACY]
            self.by_partition[partition_of.get(node, node)] = dict(record.items())

    def hand_back(self, content: RecordDict, partition: int | None) -> None:
        """Add the kept accountant of `partition` to a message's content (after a resume)."""
        if partition in self.by_partition:
            content[K.STATE_PRIVACY] = ConfigRecord(self.by_partition[partition])

    def state_dict(self) -> dict[int, dict[str, Any]]:
        """The copies, for the server's checkpoint."""
        return dict(self.by_partition)

    def load_state_dict(self, state: Mapping[int, dict[str, Any]]) -> None:
        """Restore `state_dict()`."""
        self.by_partition = dict(state)
