"""`fl-deploy` / `python -m fl.deploy`: the command line of the deployment runner (`fl.deploy.runner`)."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence

from fl.deploy.runner import DeployError, deploy


def _raise_on_signal(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)


def parse_node_configs(items: Sequence[str]) -> dict[int, dict[str, str]]:
    """`--node-config I:KEY=VALUE[ KEY=VALUE...]` (repeatable) as {node: {key: value}}."""
    out: dict[int, dict[str, str]] = {}
    for item in items:
        node, sep, rest = item.partition(":")
        pairs = [p.partition("=") for p in rest.split()]
        if not sep or not node.strip().isdigit() or not pairs or any(not k or not eq or not v for k, eq, v in pairs):
            raise ValueError(
                f"--node-config {item!r} is malformed; write NODE:KEY=VALUE, e.g. --node-config 0:lora-rank=4."
            )
        out.setdefault(int(node), {}).update({k: v for k, _, v in pairs})
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """`fl-deploy --clients N [--insecure] [--warm] [--bench] [--node-config I:K=V] [overrides]`."""
    from fl.app.cli import setup_logging

    parser = argparse.ArgumentParser(
        prog="fl-deploy",
        description="Run one job on a Flower deployment (SuperLink + SuperNodes) on 127.0.0.1; TLS and "
        "SuperNode authentication unless --insecure. Outputs go to the run folder like fl-sim's.",
    )
    parser.add_argument("--clients", type=int, default=None, help="SuperNodes to start (default: sim.num_clients)")
    parser.add_argument("--insecure", action="store_true", help="no TLS, no node authentication (local trials)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds the whole run may take")
    parser.add_argument("--warm", action="store_true", help="warm ClientApps (no fresh process per message)")
    parser.add_argument("--bench", action="store_true", help="time the job in simulation and in deployment")
    parser.add_argument(
        "--node-config",
        action="append",
        default=[],
        metavar="NODE:KEY=VALUE",
        help="a SuperNode's own node config, e.g. 0:lora-rank=2 (repeatable; a node's lora-rank wins over "
        "sim.client_ranks)",
    )
    parser.add_argument(
        "--clientapp-executor",
        metavar="HOST:PORT",
        help="only run a warm ClientApp executor for `flower-supernode --isolation process --port PORT`",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. strategy=fed_sb run_dir=outputs/dep")
    args = parser.parse_args(argv)
    if args.clients is not None and args.clients < 1:
        parser.error(f"--clients must be >= 1, got {args.clients}")
    try:
        node_configs = parse_node_configs(args.node_config)
    except ValueError as e:
        parser.error(str(e))
    setup_logging()
    if args.clientapp_executor:
        from fl.deploy.warm_clientapp import run_clientapp_executor

        run_clientapp_executor(args.clientapp_executor)
        return
    signal.signal(signal.SIGTERM, _raise_on_signal)
    signal.signal(signal.SIGINT, _raise_on_signal)
    try:
        if args.bench:
            from fl.deploy.bench import bench

            bench(args.overrides, clients=args.clients, insecure=args.insecure)
            return
        run_dir = deploy(
            args.overrides,
            clients=args.clients,
            insecure=args.insecure,
            timeout=args.timeout,
            warm=args.warm,
            node_configs=node_configs,
        )
    except (ValueError, DeployError) as e:
        print(f"fl-deploy: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, ValueError) else 1)
    except KeyboardInterrupt:
        print("fl-deploy: interrupted; every process it started has been stopped.", file=sys.stderr)
        sys.exit(130)
    print(f"\nDone. Outputs in {run_dir}:")
    print("  config.yaml  metrics.jsonl  summary.json  adapter/  .deploy/ (certs, FLWR_HOME, process logs)")


if __name__ == "__main__":
    main()
