"""What a local deployment adds to `fl.app.processes`: its error type and the SuperNodes' `--node-config` values.

Used by `fl.deploy.runner`; the processes themselves (environment, ports, stopping by PID) are
`fl.app.processes`, shared with `fl-sim`'s local SuperLink.
"""

from __future__ import annotations

import json
import re

from fl.app.processes import FlowerProcessError

DeployError = FlowerProcessError  # a deployment step failed; the message says which and where its log is


def node_config_value(value: object) -> str:
    """`value` as `--node-config` needs it: Flower reads each value as TOML, so a string (a path, a name) is
    quoted and a number or a boolean is not (``lora-rank=4``, ``privacy-ledger="/data/ledger.json"``)."""
    text = str(value).strip()
    if text.lower() in ("true", "false") or re.fullmatch(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?", text):
        return text.lower() if text.lower() in ("true", "false") else text
    return json.dumps(text.strip("'\""))  # a TOML basic string: JSON's escapes are TOML's
