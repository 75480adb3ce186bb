"""`fl-deploy`: run one job on Flower's Deployment Runtime — a SuperLink and N SuperNodes — on 127.0.0.1.

`fl-deploy --clients 2 strategy=fed_sb run_dir=outputs/dep` does, in order, what an operator does on real
machines (docs/deploy.md), each step a function:

1. `fl.deploy.certs.create_federation_credentials`: a CA, the SuperLink's certificate, one ECDSA key per node;
2. `fl.app.flwr_cli.start_superlink`: TLS on its one HTTPS port (Fleet, Control and Runtime APIs), SuperNode
   auth on, no `uv sync` of the app's dependencies;
3. `write_connection` + `register_node`: the `flwr` CLI's connection in `$FLWR_HOME/config.toml` (a folder
   inside the run folder, never ~/.flwr) and `flwr supernode register KEY.pub <connection>` per node;
4. `start_supernode` N times (`--node-config "partition-id=i num-partitions=N"`);
5. `submit_run`: `flwr run <project> <connection> --run-config` with the Hydra overrides;
6. `follow_run`: log every row the ServerApp appends to metrics.jsonl until summary.json is written.

Every process is started in its own session and stopped by PID (and its process group) when the job ends,
fails or is interrupted (Ctrl-C, SIGTERM). `--insecure` skips TLS and node authentication (local trials).
`--warm` keeps ClientApp libraries loaded between messages (`fl.deploy.warm_clientapp`); `--bench`
(`fl.deploy.bench`) times the same job in simulation and in deployment. The command line is `fl.deploy.cli`;
imports go one way: cli -> bench -> runner -> follow, process, certs (and fl.app's process helpers); never back.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fl import constants as K
from fl.app.config import compose
from fl.app.console import ERROR_LOG, read_failure
from fl.app.flwr_cli import RunLog, flwr_cli, start_superlink, submit_run, write_connection
from fl.app.processes import (
    LOOPBACK,
    Processes,
    bin_path,
    child_env,
    flower_exit_code,
    free_port,
    shielded,
)
from fl.deploy.certs import DEFAULT_SANS, NodeKeys, ServerCerts, create_federation_credentials
from fl.deploy.follow import follow_run
from fl.deploy.process import DeployError, node_config_value
from fl.outputs import written_since

log = logging.getLogger("fl.deploy")  # also when run as `python -m fl.deploy`

PROJECT_DIR = Path(__file__).resolve().parents[2]  # the Flower app: pyproject.toml with [tool.flwr.app]
DEPLOY_DIR = ".deploy"  # inside the run folder: flwr-home/, certs/, logs/
CONNECTION = "fl-deploy"
INSECURE_NOTE = "INSECURE deployment: no TLS, no SuperNode authentication - for local trials only"


def register_node(public_key: Path, *, connection: str, env: dict[str, str]) -> int:
    """`flwr supernode register KEY.pub <connection>`: allow the node holding the private key. Returns its id."""
    return int(flwr_cli(["supernode", "register", str(public_key), connection], env=env)["node-id"])


def start_supernode(
    procs: Processes,
    *,
    superlink: str,
    partition_id: int,
    num_partitions: int,
    port: int,
    env: dict[str, str],
    log_path: Path,
    root_certificates: Path | None,
    private_key: Path | None = None,
    max_wait_time: float | None = None,
    warm: bool = False,
    node_config: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start one `flower-supernode` serving partition `partition_id` of `num_partitions`.

    `root_certificates=None` connects without TLS (`--insecure`). `port` is the node's own Runtime API
    port (its ClientApp processes talk to it). `max_wait_time` (s) makes it give up connecting. `warm`
    starts it with `--isolation process` and a `run_clientapp_executor` beside it (log: `*.executor.log`).
    `node_config` adds the node's own keys to its `--node-config` (e.g. ``{"lora-rank": "4"}``).
    """
    argv = [bin_path("flower-supernode"), "--superlink", superlink, "--port", str(port)]
    if warm:
        argv += ["--isolation", "process"]
        executor = [sys.executable, "-m", "fl.deploy", "--clientapp-executor", f"{LOOPBACK}:{port}"]
        procs.start(executor, env=env, log_path=log_path.with_suffix(".executor.log"))
    own = " ".join(f"{k}={node_config_value(v)}" for k, v in (node_config or {}).items())
    argv += [
        "--node-config",
        f"{K.NODE_PARTITION_ID}={partition_id} {K.NODE_NUM_PARTITIONS}={num_partitions} {own}".strip(),
    ]
    argv += ["--insecure"] if root_certificates is None else ["--root-certificates", str(root_certificates)]
    if private_key is not None:
        argv += ["--auth-supernode-private-key", str(private_key)]
    if max_wait_time is not None:
        argv += ["--max-wait-time", str(max_wait_time)]
    return procs.start(argv, env=env, log_path=log_path)


@dataclass
class LocalFederation:
    """A SuperLink and SuperNodes on 127.0.0.1; credentials, logs and FLWR_HOME live in `workdir`.

    A context manager: leaving it stops every process it started, also on error or Ctrl-C.
    """

    workdir: Path
    insecure: bool = False
    client_threads: int | None = None
    warm: bool = False
    procs: Processes = field(default_factory=Processes)
    address: str = ""
    server_certs: ServerCerts | None = None
    nodes: list[tuple[subprocess.Popen[bytes], Path]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.flwr_home = self.workdir / "flwr-home"
        self.logs = self.workdir / "logs"
        if self.warm:
            log.info("Warm ClientApps: each SuperNode runs --isolation process with a forking executor")
        self.env = child_env(self.flwr_home, client_threads=self.client_threads)

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def ca(self) -> Path | None:
        return None if self.server_certs is None else self.server_certs.ca_cert

    def start(self, num_nodes: int, *, sans: Sequence[str] = DEFAULT_SANS) -> list[NodeKeys]:
        """Make credentials (unless insecure), start the SuperLink, write the CLI connection; returns node keys."""
        keys: list[NodeKeys] = []
        if self.insecure:
            log.warning(INSECURE_NOTE)
        else:
            self.server_certs, keys = create_federation_credentials(
                self.workdir / "certs", num_nodes=num_nodes, sans=sans
            )
        self.address = start_superlink(
            self.procs, port=free_port(), env=self.env, log_path=self.logs / "superlink.log", certs=self.server_certs
        )
        write_connection(self.flwr_home, name=CONNECTION, address=self.address, root_certificates=self.ca)
        log.info("SuperLink on %s (%s); logs in %s", self.address, "insecure" if self.insecure else "TLS", self.logs)
        return keys

    def add_node(
        self,
        partition_id: int,
        num_partitions: int,
        *,
        keys: NodeKeys | None,
        register: bool = True,
        tls: bool | None = None,
        max_wait_time: float | None = None,
        name: str | None = None,
        node_config: Mapping[str, str] | None = None,
    ) -> tuple[subprocess.Popen[bytes], Path]:
        """Register `keys` (if `register`) and start a SuperNode; `tls=None` follows the federation.

        `node_config`: the node's own `--node-config` keys beside its partition (e.g. its ``lora-rank``)."""
        if keys is not None and register:
            node_id = register_node(keys.public, connection=CONNECTION, env=self.env)
            log.info("Registered %s as node %d", keys.public.name, node_id)
        use_tls = (not self.insecure) if tls is None else tls
        log_path = self.logs / f"{name or f'supernode-{partition_id}'}.log"
        proc = start_supernode(
            self.procs,
            superlink=self.address,
            partition_id=partition_id,
            num_partitions=num_partitions,
            port=free_port(),
            env=self.env,
            log_path=log_path,
            root_certificates=self.ca if use_tls else None,
            private_key=None if keys is None else keys.private,
            max_wait_time=max_wait_time,
            warm=self.warm,
            node_config=node_config,
        )
        self.nodes.append((proc, log_path))
        return proc, log_path

    def wait_online(self, nodes: Sequence[tuple[subprocess.Popen[bytes], Path]], timeout: float = 180.0) -> None:
        """Wait until each node logged its SuperNode ID (it is connected and activated)."""
        deadline = time.monotonic() + timeout
        for proc, log_path in nodes:
            while "SuperNode ID:" not in (log_path.read_text(errors="replace") if log_path.is_file() else ""):
                if proc.poll() is not None:
                    code = flower_exit_code(log_path)
                    raise DeployError(f"SuperNode exited (Flower exit code {code}) before connecting; see {log_path}.")
                if time.monotonic() > deadline:
                    raise DeployError(f"SuperNode not connected after {timeout:.0f} s; see {log_path}.")
                time.sleep(0.3)

    def submit(self, overrides: Sequence[str], *, project_dir: Path = PROJECT_DIR) -> int:
        run_id = submit_run(project_dir, overrides, connection=CONNECTION, env=self.env)
        log.info("Submitted run %d; ServerApp log: %s", run_id, self.logs / "serverapp.log")
        return run_id

    def follow(
        self, run_dir: Path, run_id: int, *, since_ns: int, rounds: int, timeout: float | None = None
    ) -> dict[str, Any]:
        """Stream the ServerApp's log to logs/serverapp.log and follow metrics.jsonl until summary.json."""
        watch = RunLog(self.procs, run_id, connection=CONNECTION, env=self.env, log_path=self.logs / "serverapp.log")

        def check() -> None:
            if not watch.finished():
                return
            time.sleep(2.0)  # summary.json is written before the ServerApp returns; one last look
            if not written_since(run_dir / K.SUMMARY_FILE, since_ns):
                why = read_failure(run_dir, since_ns)  # the ServerApp's own record of its exception (error.log)
                if why is not None:
                    raise DeployError(
                        f"{why}; traceback in {run_dir / ERROR_LOG}; the run folder keeps what it wrote: after a "
                        f"fix, continue with resume={run_dir}"
                    )
                tail = watch.log_path.read_text(errors="replace")[-3000:]
                raise DeployError(f"Run {run_id} ended ({watch.status}) without writing summary.json:\n{tail}")

        return follow_run(run_dir, since_ns=since_ns, rounds=rounds, check=check, timeout=timeout)

    def stop(self) -> None:
        with shielded():
            self.procs.stop()
        log.info("Stopped %d Flower processes (PIDs %s)", len(self.procs.pids), self.procs.pids)


def prepare_overrides(overrides: Sequence[str], *, clients: int | None) -> tuple[list[str], Path]:
    """The job's overrides with an absolute `run_dir=` and `sim.num_clients` (= `clients` when given).

    `hydra.run.dir=DIR` is read as `run_dir=DIR`, as `fl-sim` does; with neither, outputs/<date>/<time>.
    """
    out: list[str] = []
    run_dir: str | None = None
    for o in overrides:
        key, _, value = o.partition("=")
        if key in ("run_dir", "hydra.run.dir"):
            run_dir = value
        elif key.startswith("hydra."):
            log.warning("Ignoring %s: fl-deploy is not a Hydra app (only hydra.run.dir is read)", o)
        else:
            out.append(o)
    if run_dir is None:
        from fl.app.server_app import default_run_dir

        run_dir = str(default_run_dir())
    path = Path(run_dir).expanduser().resolve()
    if clients is not None:
        given = int(compose(out).sim.num_clients)
        if any(o.startswith("sim.num_clients=") for o in out) and given != clients:
            raise ValueError(f"--clients {clients} but sim.num_clients={given}: give one of them.")
        out = [o for o in out if not o.startswith("sim.num_clients=")] + [f"sim.num_clients={clients}"]
    return [*out, f"run_dir={path}"], path


def deploy(
    overrides: Sequence[str],
    *,
    clients: int | None = None,
    insecure: bool = False,
    project_dir: Path = PROJECT_DIR,
    timeout: float | None = None,
    warm: bool = False,
    on_started: Callable[[LocalFederation], None] | None = None,
    node_configs: Mapping[int, Mapping[str, str]] | None = None,
) -> Path:
    """Run one job on a loopback deployment (TLS + node auth unless `insecure`); returns the run folder.

    The run folder holds what `fl-sim` writes (config.yaml, metrics.jsonl, summary.json, adapter/) and
    `.deploy/` (certificates, FLWR_HOME, one log per process). `timeout` (s) bounds the whole run.
    `warm` runs ClientApps through `run_clientapp_executor` instead of a fresh process per message.
    `on_started(federation)` is called once the SuperLink and the nodes are up, before the run is
    submitted (e.g. to start more nodes). `node_configs[i]`: SuperNode i's own node-config keys (e.g.
    ``{0: {"lora-rank": "2"}, 1: {"lora-rank": "8"}}`` for a federation of mixed ranks).
    """
    ov, run_dir = prepare_overrides(overrides, clients=clients)
    cfg = compose(ov)  # fail fast, before any process starts
    n = int(cfg.sim.num_clients)
    threads = max(1, int(cfg.train.threads or cfg.sim.client_cpus))  # as in simulation: comparable numbers
    extra = dict(node_configs or {})
    if unknown := sorted(set(extra) - set(range(n))):
        raise ValueError(f"--node-config names node(s) {unknown}, but the federation has nodes 0..{n - 1}.")
    with LocalFederation(run_dir / DEPLOY_DIR, insecure=insecure, client_threads=threads, warm=warm) as fed:
        keys = fed.start(n)
        nodes = [fed.add_node(i, n, keys=keys[i] if keys else None, node_config=extra.get(i)) for i in range(n)]
        fed.wait_online(nodes)
        if on_started is not None:
            on_started(fed)
        since = time.time_ns()
        run_id = fed.submit(ov, project_dir=project_dir)
        summary = fed.follow(run_dir, run_id, since_ns=since, rounds=int(cfg.sim.rounds), timeout=timeout)
    log.info(
        "Deployment run %d finished: final accuracy %.4f; outputs in %s", run_id, summary["final_accuracy"], run_dir
    )
    if insecure:
        log.warning("%s (this run used it).", INSECURE_NOTE)
    return run_dir
