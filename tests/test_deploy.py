"""Flower's Deployment Runtime on 127.0.0.1 (fl-deploy): TLS + SuperNode authentication, 2 SuperNodes, Fed-SB.

One deployment serves most tests: it must write a simulation's outputs with a simulation's numbers (those of the
in-process run, which are the Simulation Runtime's), refuse a node with an unregistered key and a node without
TLS, and leave no Flower process behind.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from loop_grid import LoopGrid

from fl.app.server_app import run_server
from fl.deploy import CONNECTION, LocalFederation, deploy, flower_exit_code, flwr_cli, prepare_overrides
from fl.deploy.certs import create_federation_credentials, create_node_keys
from fl.outputs import read_metrics

JOB = ["strategy=fed_sb", "strategy.rank=4", "sim.num_clients=2", "sim.rounds=2"]
SUPERNODE_CONNECTION_ERROR = 305  # Flower's exit code (in the log; the OS exit status is 1)


def _running(procs: list[psutil.Process]) -> list[str]:
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
        except psutil.NoSuchProcess:
            continue
    return alive


@dataclass
class Deployed:
    run_dir: Path
    overrides: list[str]
    processes: list[psutil.Process]
    rogues: dict[str, tuple[subprocess.Popen[bytes], Path]]
    nodes: list[dict[str, object]]


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory, tiny: list[str]) -> Deployed:
    run_dir = tmp_path_factory.mktemp("deploy") / "run"
    seen: dict[str, object] = {}

    def add_rogues(fed: LocalFederation) -> None:
        stranger = create_node_keys(fed.workdir / "strangers", "stranger")  # a valid key nobody registered
        rogues = {
            "unregistered": fed.add_node(0, 2, keys=stranger, register=False, name="unregistered"),
            "insecure": fed.add_node(1, 2, keys=None, tls=False, max_wait_time=10, name="insecure"),
        }
        for proc, _ in rogues.values():
            proc.wait(timeout=60)
        seen.update(rogues=rogues, fed=fed)
        seen["nodes"] = flwr_cli(["supernode", "ls", CONNECTION], env=fed.env)["nodes"]

    deploy([*tiny, *JOB, f"run_dir={run_dir}"], timeout=900, on_started=add_rogues)
    fed = seen["fed"]
    assert isinstance(fed, LocalFederation)
    return Deployed(
        run_dir=run_dir,
        overrides=[*tiny, *JOB],
        processes=list(fed.procs.known),
        rogues=seen["rogues"],  # type: ignore[arg-type]
        nodes=seen["nodes"],  # type: ignore[arg-type]
    )


@pytest.mark.slow
def test_deployment_writes_a_simulations_outputs(deployed: Deployed) -> None:
    rows = read_metrics(deployed.run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert r["aggregated"] == 2 and r["failed"] == 0 and r["rejected"] == 0
        assert r["bytes_up"] > 0 and r["bytes_down"] > 0
    assert (deployed.run_dir / "summary.json").is_file()
    assert "fed_sb" in (deployed.run_dir / "config.yaml").read_text()
    assert (deployed.run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (deployed.run_dir / "adapter" / "adapter_config.json").is_file()


@pytest.mark.slow
def test_deployment_ends_where_the_simulation_does(deployed: Deployed, tmp_path: Path) -> None:
    # the reference runs in-process (the real ServerApp and ClientApp, `LoopGrid`), which ends exactly where the
    # Simulation Runtime does (test_reliability.py), without another ~30 s of Ray start-up
    sim = read_metrics(run_server(LoopGrid(2), [*deployed.overrides, f"run_dir={tmp_path / 'sim'}"]))
    dep = read_metrics(deployed.run_dir)
    for rs, rd in zip(sim, dep, strict=True):
        for key in ("accuracy", "bytes_up", "bytes_down", "floats_up", "floats_down", "aggregated"):
            assert rs.get(key) == rd.get(key), (rs["round"], key, rs.get(key), rd.get(key))
        for key in ("loss", "train_loss"):  # measured: identical; allow float noise of other thread counts
            want = rs.get(key)
            assert rd.get(key) == (want if want is None else pytest.approx(want, rel=1e-6)), (rs["round"], key)


@pytest.mark.slow
def test_unregistered_and_insecure_supernodes_are_refused(deployed: Deployed) -> None:
    for name, (proc, log_path) in deployed.rogues.items():
        assert proc.returncode == 1, name
        assert flower_exit_code(log_path) == SUPERNODE_CONNECTION_ERROR, (name, log_path.read_text()[-2000:])
    assert "Failed to activate SuperNode" in deployed.rogues["unregistered"][1].read_text()
    assert sorted(str(n["status"]) for n in deployed.nodes) == ["online", "online"]  # the two registered ones


@pytest.mark.slow
def test_no_flower_process_is_left(deployed: Deployed) -> None:
    assert len(deployed.processes) >= 6  # SuperLink, its SuperExec, 4 SuperNodes, ...
    assert not _running(deployed.processes)


@pytest.mark.slow
def test_sigterm_mid_run_stops_every_process_of_a_warm_insecure_deployment(tiny: list[str], tmp_path: Path) -> None:
    """`fl-deploy --insecure --warm`: warm ClientApps train round 1, then SIGTERM stops everything it started."""
    err, run_dir = tmp_path / "stderr.txt", tmp_path / "run"
    argv = [sys.executable, "-m", "fl.deploy", "--insecure", "--warm", "--clients", "2", *tiny, "sim.rounds=20"]
    with err.open("wb") as f:
        main = subprocess.Popen([*argv, f"run_dir={run_dir}"], stderr=f, stdout=f)
    seen: dict[int, psutil.Process] = {}
    try:
        deadline = time.monotonic() + 300
        while main.poll() is None and time.monotonic() < deadline:
            seen.update({p.pid: p for p in psutil.Process(main.pid).children(recursive=True)})
            if "[deploy] round 1/20" in err.read_text():
                break
            time.sleep(0.5)
        assert main.poll() is None, err.read_text()[-3000:]
        assert read_metrics(run_dir)[1]["aggregated"] == 2
        main.send_signal(signal.SIGTERM)
        assert main.wait(timeout=90) == 128 + signal.SIGTERM
    finally:
        if main.poll() is None:
            main.kill()
    text = err.read_text()
    assert "INSECURE deployment" in text and "Warm ClientApps" in text
    assert len(seen) >= 6, text[-3000:]  # SuperLink, SuperExec, 2 SuperNodes, 2 executors, ServerApp, ...
    assert not _running(list(seen.values())), text[-3000:]


@pytest.mark.slow
def test_mixed_ranks_from_each_supernodes_node_config(tiny: list[str], tmp_path: Path) -> None:
    """Two SuperNodes saying their own rank (`--node-config "... lora-rank=r"`), FlexLoRA across them: each
    client trains at its node's rank, and the run ends where the in-process run with those ranks ends."""
    job = [*tiny, "strategy=flexlora", "strategy.rank=4", "sim.num_clients=2", "sim.rounds=2"]
    ranks = {0: {"lora-rank": "2"}, 1: {"lora-rank": "4"}}
    dep = read_metrics(deploy([*job, f"run_dir={tmp_path / 'dep'}"], insecure=True, timeout=600, node_configs=ranks))
    grid = LoopGrid(2)
    for (_, ctx), rank in zip(sorted(grid.contexts.items()), (2, 4), strict=True):
        ctx.node_config["lora-rank"] = rank
    ref = read_metrics(run_server(grid, [*job, f"run_dir={tmp_path / 'ref'}"]))
    assert [r["round"] for r in dep] == [0, 1, 2]
    for rd, rr in zip(dep[1:], ref[1:], strict=True):
        assert rd["client_ranks"] == [2, 4] and rd["aggregated"] == 2 and rd["rejected"] == 0
        for key in ("accuracy", "floats_up", "floats_down", "bytes_up", "bytes_down"):
            assert rd[key] == rr[key], (rd["round"], key)
        assert rd["loss"] == pytest.approx(rr["loss"], rel=1e-6)
    with pytest.raises(ValueError, match="names node"):
        deploy([*job, f"run_dir={tmp_path / 'bad'}"], insecure=True, node_configs={5: {"lora-rank": "2"}})


def test_node_config_flags_parse_and_a_malformed_one_names_the_form() -> None:
    from fl.deploy.cli import parse_node_configs

    got = parse_node_configs(["0:lora-rank=2", "1:lora-rank=8 privacy-target-epsilon=3", "0:attack=scale"])
    assert got == {0: {"lora-rank": "2", "attack": "scale"}, 1: {"lora-rank": "8", "privacy-target-epsilon": "3"}}
    for bad in ("lora-rank=2", "x:lora-rank=2", "0:", "0:lora-rank"):
        with pytest.raises(ValueError, match="NODE:KEY=VALUE"):
            parse_node_configs([bad])


def test_certificates_chain_sans_and_node_keys(tmp_path: Path) -> None:
    server, nodes = create_federation_credentials(tmp_path, num_nodes=2, sans=["localhost", "127.0.0.1", "10.1.2.3"])
    ca = x509.load_pem_x509_certificate(server.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(server.cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("10.1.2.3"),
    ]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for keys in nodes:
        public = load_ssh_public_key(keys.public.read_bytes())
        private = load_ssh_private_key(keys.private.read_bytes(), None)
        assert isinstance(public, ec.EllipticCurvePublicKey) and isinstance(private, ec.EllipticCurvePrivateKey)
        assert public.curve.name == "secp384r1" and private.public_key() == public
        assert keys.public.read_text().startswith("ecdsa-sha2-nistp384 ")
        assert os.stat(keys.private).st_mode & 0o077 == 0
    assert os.stat(server.key).st_mode & 0o077 == 0
    with pytest.raises(ValueError, match="subject alternative name"):
        create_federation_credentials(tmp_path / "none", num_nodes=0, sans=[])


def test_overrides_get_an_absolute_run_dir_and_the_client_count(tiny: list[str], tmp_path: Path) -> None:
    ov, run_dir = prepare_overrides([*tiny, f"hydra.run.dir={tmp_path}/r"], clients=3)
    assert run_dir == (tmp_path / "r").resolve() and ov[-1] == f"run_dir={run_dir}"
    assert "sim.num_clients=3" in ov and not any(o.startswith("hydra.") for o in ov)
    with pytest.raises(ValueError, match="--clients"):
        prepare_overrides([*tiny, "sim.num_clients=2", "run_dir=x"], clients=3)
