"""A SuperLink on this machine and the `flwr` CLI that talks to it: start, connect, submit, ask a run's status.

`fl-sim` starts the SuperLink in simulation mode (its SuperExec launches `flwr-simulation`, which runs the
ServerApp and the ClientApps on Ray); `fl-deploy` starts it for SuperNodes, with TLS and node authentication.
Both then use the `flwr` CLI as a user would, with `FLWR_HOME` inside the run folder (never ~/.flwr).
"""

from __future__ import annotations

import json
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import tomli_w

from fl import constants as K
from fl.app.processes import LOOPBACK, FlowerProcessError, Processes, bin_path, wait_for_port


class ServerTLS(Protocol):
    """What `start_superlink` needs of the SuperLink's certificates (`fl.deploy.certs.ServerCerts`)."""

    @property
    def ca_cert(self) -> Path: ...
    @property
    def cert(self) -> Path: ...
    @property
    def key(self) -> Path: ...


def start_superlink(
    procs: Processes,
    *,
    port: int,
    env: dict[str, str],
    log_path: Path,
    certs: ServerTLS | None,
    host: str = LOOPBACK,
    simulation: bool = False,
    timeout: float = 60.0,
) -> str:
    """Start `flower-superlink` and wait until it listens; returns its address (host:port).

    Flower 1.41 serves the Fleet, Control and Runtime APIs on one HTTPS port (`--host/--port`; the
    `--fleet-api-address`/`--control-api-address` flags are deprecated). `certs=None` means `--insecure`;
    otherwise TLS with the CA, certificate and key, and SuperNode authentication. `simulation=True` is the
    Simulation Runtime (`--simulation`: a run's ServerApp and ClientApps run in one `flwr-simulation`).
    """
    argv = [
        bin_path("flower-superlink"),
        "--host",
        host,
        "--port",
        str(port),
        "--disable-runtime-dependency-installation",
    ]
    if simulation:
        argv.append("--simulation")
    if certs is None:
        argv.append("--insecure")
    else:
        argv += ["--ssl-ca-certfile", str(certs.ca_cert), "--ssl-certfile", str(certs.cert)]
        argv += ["--ssl-keyfile", str(certs.key), "--enable-supernode-auth"]
    proc = procs.start(argv, env=env, log_path=log_path)
    wait_for_port(LOOPBACK if host == "0.0.0.0" else host, port, proc, log_path, timeout)
    return f"{host}:{port}"


def write_connection(flwr_home: Path, *, name: str, address: str, root_certificates: Path | None) -> Path:
    """Write `$FLWR_HOME/config.toml` with one SuperLink connection (the default) for the `flwr` CLI."""
    conn: dict[str, Any] = {"address": address}
    if root_certificates is None:
        conn["insecure"] = True
    else:
        conn["root-certificates"] = str(root_certificates.resolve())
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    path.write_text(tomli_w.dumps({"superlink": {"default": name, name: conn}}))
    return path


def flwr_cli(args: Sequence[str], *, env: dict[str, str], timeout: float = 120.0) -> dict[str, Any]:
    """Run `flwr <args> --format json` and return its JSON answer; raise FlowerProcessError on failure."""
    res = subprocess.run(
        [bin_path("flwr"), *args, "--format", "json"], env=env, capture_output=True, text=True, timeout=timeout
    )
    out = res.stdout
    try:
        answer: dict[str, Any] = json.loads(out[out.index("{") :])
    except ValueError:
        answer = {}
    if res.returncode != 0 or not answer.get("success"):
        raise FlowerProcessError(
            f"`flwr {' '.join(args)}` failed ({res.returncode}): {out.strip()} {res.stderr.strip()}"
        )
    return answer


def submit_run(
    project_dir: Path,
    overrides: Sequence[str],
    *,
    connection: str,
    env: dict[str, str],
    federation_config: Mapping[str, object] | None = None,
) -> int:
    """`flwr run <project_dir> <connection> --run-config <file>` with `overrides`; returns the run id.

    The run config goes through a TOML file, equal to `--run-config "overrides='a=1 b=2'"` but safe for
    any quoting inside the overrides. `federation_config` (simulation only) becomes `--federation-config`,
    e.g. ``{"num-supernodes": 10, "client-resources-num-cpus": 1}``.
    """
    cfg_file = Path(env["FLWR_HOME"]) / "run-config.toml"
    cfg_file.write_text(tomli_w.dumps({K.OVERRIDES: shlex.join(overrides)}))
    args = ["run", str(project_dir), connection, "--run-config", str(cfg_file)]
    if federation_config:
        args += ["--federation-config", " ".join(f"{k}={toml_value(v)}" for k, v in federation_config.items())]
    answer = flwr_cli(args, env=env, timeout=600)
    return int(answer["run-id"])


def toml_value(value: object) -> str:
    """A Python value as a TOML value for `--federation-config`: booleans lower case, strings quoted."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def run_status(run_id: int, *, connection: str, env: dict[str, str]) -> str:
    """The SuperLink's status of a run, e.g. `running`, `finished:completed`, `finished:failed`."""
    runs = flwr_cli(["ls", connection, "--run-id", str(run_id)], env=env)["runs"]
    return str(runs[0]["status"]) if runs else "unknown"


class RunLog:
    """A submitted run, watched: `flwr log RUN --stream` appended to `log_path`, restarted when the link hiccups.

    `finished()` is the one poll both `fl-sim` and `fl-deploy` make while they follow a run: it raises when the
    SuperLink (the first process `procs` started) has exited, and says whether the SuperLink reports the run
    finished (the log stream ends then, or on a dropped connection, when it is started again).
    """

    def __init__(self, procs: Processes, run_id: int, *, connection: str, env: dict[str, str], log_path: Path) -> None:
        self._procs, self._env, self.log_path = procs, env, log_path
        self._run_id, self._connection = run_id, connection
        self.status = "running"  # the SuperLink's last word on the run, e.g. `finished:failed`
        self._argv = [bin_path("flwr"), "log", str(run_id), connection, "--stream"]
        self._stream = procs.start(self._argv, env=env, log_path=log_path)

    def finished(self) -> bool:
        self._procs.refresh()  # the ServerApp's process and Ray's, to stop them by PID if need be
        superlink = self._procs.started[0]
        if superlink.poll() is not None:
            where = self.log_path.parent / "superlink.log"
            raise FlowerProcessError(f"The SuperLink exited ({superlink.returncode}); see {where}.")
        if self._stream.poll() is None:
            return False
        self.status = run_status(self._run_id, connection=self._connection, env=self._env)
        if self.status.startswith("finished"):
            return True
        self._stream = self._procs.start(self._argv, env=self._env, log_path=self.log_path)
        return False
