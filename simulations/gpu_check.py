"""The GPU path, checked in one run: `python -m simulations.gpu_check --out check.json [--minilm DIR]`.

On a CUDA machine it trains the tiny BERT and (with ``--minilm DIR`` holding weights) the real MiniLM with LoRA
in fp32 and bf16 and compares their losses; runs Opacus DP-SGD steps with hooks and with ghost clipping; runs one
round of every strategy through the real ServerApp and ClientApp code (Fed-SB's federated init gradient
included, and its DP sketched init); and runs a two-SuperNode federation on Flower's Deployment Runtime
(TLS + node auth, no Ray) with ``train.device=cuda``, writing a run folder, and the same federation on CPU with
the same seeds. It measures seconds per step, peak GPU memory and the GPU/CPU speed ratio.

Without CUDA it runs the CPU half of each part and records, per part, what it skipped and why. The parts are
independent: one that fails (or runs past ``--part-timeout``) is recorded with its error and the others still
run. The JSON is rewritten after every part; the exit status is 1 if any part failed, 0 otherwise.
docs/gpu.md says how to carry what a bare GPU machine lacks (simulations/gpu_bundle.sh) and the one command.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import platform
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from simulations import harness
from simulations.gpu_parts import Check, dp_part, federation_part, precision_part, strategies_part

PARTS: dict[str, Callable[[Check], dict[str, Any]]] = {
    "precision": precision_part,
    "dp": dp_part,
    "strategies": strategies_part,
    "federation": federation_part,
}
VERSIONS = ("torch", "transformers", "peft", "opacus", "flwr", "hydra-core", "omegaconf", "datasets", "safetensors")


def environment() -> dict[str, Any]:
    """Python, packages, CPU and (when there is one) the GPU."""
    env: dict[str, Any] = {"python": platform.python_version(), "cpu_count": os.cpu_count(), "packages": {}}
    for name in VERSIONS:
        try:
            env["packages"][name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            env["packages"][name] = None
    env["cuda"] = torch.cuda.is_available()
    if env["cuda"]:
        props = torch.cuda.get_device_properties(0)
        env.update(
            gpu=torch.cuda.get_device_name(0),
            gpu_memory_bytes=int(props.total_memory),
            compute_capability=f"{props.major}.{props.minor}",
            cuda_runtime=torch.version.cuda,
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
    return env


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise TimeoutError in the main thread after `seconds` (SIGALRM); a no-op for seconds <= 0."""
    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise TimeoutError(f"the part ran past --part-timeout={seconds:g} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run_part(name: str, chk: Check, *, timeout: float) -> dict[str, Any]:
    """One part's record: status ok | failed (with the error), its seconds, what it measured and skipped."""
    t0 = time.perf_counter()
    try:
        with time_limit(timeout):
            result = PARTS[name](chk)
    except BaseException as e:  # recorded, not raised: the other parts still run (Ctrl-C still stops the check)
        if isinstance(e, KeyboardInterrupt):
            raise
        tail = "".join(traceback.format_exception(e))[-4000:]
        logging.getLogger(__name__).error("gpu_check part %s failed: %s", name, e)
        return {"status": "failed", "error": f"{type(e).__name__}: {e}", "traceback": tail, "seconds": _since(t0)}
    skipped = result.pop("skipped", [])
    return {"status": "ok", "seconds": _since(t0), "skipped": skipped, "result": result}


def _since(t0: float) -> float:
    return round(time.perf_counter() - t0, 3)


def main(argv: list[str] | None = None) -> int:
    """Run every part not left out; write the JSON after each; 0 when none failed, else 1."""
    parser = harness.parser(__doc__)
    parser.add_argument("--out", required=True, help="the JSON file to write")
    parser.add_argument("--minilm", help="a MiniLM folder: its tokenizer serves the tiny model; weights, if any, train")
    parser.add_argument("--steps", type=int, default=10, help="timed optimiser steps per measurement")
    parser.add_argument("--strategies", help="comma-separated runs of the strategies part (default: every one)")
    parser.add_argument("--skip", default="", help=f"comma-separated parts to leave out, of {','.join(PARTS)}")
    parser.add_argument("--part-timeout", type=float, default=300.0, help="seconds one part may run (0: no limit)")
    parser.add_argument("--deadline", type=float, default=0.0, help="seconds the whole check may run (0: no limit)")
    parser.add_argument("--work-dir", help="run folders and the data cache (default: a temporary folder)")
    args = harness.parse(parser, argv)
    skip = {s for s in args.skip.split(",") if s}
    if skip - set(PARTS):
        parser.error(f"--skip {sorted(skip - set(PARTS))}: unknown; the parts are {', '.join(PARTS)}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="gpu_check-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    chk = Check(work_dir=work, cache_dir=str(work / "cache"), minilm=args.minilm, steps=args.steps)
    if args.strategies:
        chk.strategies = [s for s in args.strategies.split(",") if s]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "argv": sys.argv[1:] if argv is None else argv,
        "environment": environment(),
        "work_dir": str(work),
        "parts": {},
    }
    t0 = time.perf_counter()
    for name in PARTS:
        left = args.deadline - (time.perf_counter() - t0) if args.deadline > 0 else float("inf")
        if name in skip:
            report["parts"][name] = {"status": "skipped", "reason": "left out with --skip"}
        elif left < 15:
            report["parts"][name] = {
                "status": "skipped",
                "reason": f"--deadline {args.deadline:g} s: {left:.0f} s left",
            }
        else:
            print(f"gpu_check: {name} ...", flush=True)
            limit = min(args.part_timeout or float("inf"), left - 5)
            report["parts"][name] = run_part(name, chk, timeout=0 if limit == float("inf") else limit)
            print(f"gpu_check: {name} {report['parts'][name]['status']}", flush=True)
        report["seconds"] = _since(t0)
        report["failed"] = [n for n, p in report["parts"].items() if p["status"] == "failed"]
        report["ok"] = not report["failed"]
        out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"gpu_check: {'OK' if report['ok'] else 'FAILED: ' + ', '.join(report['failed'])} -> {out}", flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
