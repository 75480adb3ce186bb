"""The Flower processes a run starts on this machine: their environment, ports, exit codes, stopping them by PID.

`fl-sim` (a SuperLink in simulation mode) and `fl-deploy` (a SuperLink and SuperNodes) both start them here;
every process gets its own session and is stopped by PID and process group, never by name.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import psutil

from fl.runtime_env import CLIENT_THREADS_ENV, QUIET_ENV

log = logging.getLogger("fl.app")

LOOPBACK = "127.0.0.1"
EXIT_CODE_RE = re.compile(r"Exit Code: (\d+)")


class FlowerProcessError(RuntimeError):
    """A Flower process or `flwr` command failed; the message says which and where its log is."""


def child_env(flwr_home: Path, *, client_threads: int | None = None) -> dict[str, str]:
    """Environment of every Flower process: offline, quiet, no `uv sync`, project-local FLWR_HOME.

    The venv's bin folder goes first on PATH: the SuperLink and SuperNodes start `flower-superexec`,
    `flwr-serverapp` and `flwr-clientapp` by name.
    """
    env = {**os.environ, **QUIET_ENV, "FLWR_HOME": str(flwr_home), "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.25"}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if client_threads:
        env.setdefault(CLIENT_THREADS_ENV, str(client_threads))
    return env


def free_port(host: str = LOOPBACK) -> int:
    """A port nothing listens on now (the OS picks it when binding port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def flower_exit_code(log_path: Path) -> int | None:
    """Flower's own exit code (e.g. 305: connection refused) from a process log; the OS sees 1."""
    found = EXIT_CODE_RE.findall(log_path.read_text(errors="replace")) if log_path.is_file() else []
    return int(found[-1]) if found else None


def bin_path(name: str) -> str:
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


PR_SET_PDEATHSIG = 1  # linux/prctl.h


@functools.cache
def _prctl() -> Callable[..., int] | None:
    """libc's prctl (Linux), loaded once in this process: never in a forked child."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return cast(Callable[..., int], ctypes.CDLL(None, use_errno=True).prctl)
    except (OSError, AttributeError):
        return None


def die_with_parent(sig: signal.Signals = signal.SIGTERM) -> Callable[[], None] | None:
    """A `preexec_fn` that has the kernel send `sig` to the child when this process dies (PR_SET_PDEATHSIG).

    The children run in sessions of their own (so a Ctrl-C in the terminal reaches fl-sim alone, which stops
    them in order); without this, a `kill -9` of fl-sim would leave its SuperLink (and through it the SuperExec,
    `flwr-simulation` and Ray) running. The SuperLink stops its SuperExec on SIGTERM, and Flower's own
    processes below it watch their parent's PID. Linux only (None elsewhere), and only from the main thread:
    the kernel sends the signal when the *thread* that started the child ends.
    """
    prctl = _prctl()
    if prctl is None or threading.current_thread() is not threading.main_thread():
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died between fork and prctl: the signal would never come
            os.kill(os.getpid(), sig)

    return preexec


@dataclass
class Processes:
    """The processes a deployment started (each in a new session) and every descendant seen since.

    `stop()` signals them by PID and process group only — never by name — and waits until all are gone.
    Each is also told to die with the process that started it (`die_with_parent`), for when that process is
    killed and cannot call `stop()`.
    """

    started: list[subprocess.Popen[bytes]] = field(default_factory=list)
    known: set[psutil.Process] = field(default_factory=set)  # psutil.Process: PID + start time

    def start(self, argv: Sequence[str], *, env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as out:
            proc = subprocess.Popen(
                list(argv),
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )
        self.started.append(proc)
        self.refresh()
        return proc

    def refresh(self) -> None:
        """Remember the descendants alive now (ServerApp/ClientApp processes, SuperExecs)."""
        for proc in self.started:
            try:
                root = psutil.Process(proc.pid)
                self.known.update([root, *root.children(recursive=True)])
            except psutil.NoSuchProcess:
                continue

    @property
    def pids(self) -> list[int]:
        return sorted({p.pid for p in self.started} | {p.pid for p in self.known})

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM every group and process, SIGKILL what is left after `timeout` s, reap the children."""
        self.refresh()
        for proc in self.started:
            if proc.poll() is None:
                with suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGTERM)  # the leader is alive: its group id is ours
        targets = list(self.known)
        for p in targets:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                continue
        _, left = psutil.wait_procs(targets, timeout=timeout)
        for p in left:
            log.warning("PID %d (%s) ignored SIGTERM for %.0f s: killing it", p.pid, p.name(), timeout)
            try:
                p.kill()
            except psutil.NoSuchProcess:
                continue
        psutil.wait_procs(left, timeout=5)
        for proc in self.started:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                log.error("PID %d is still running after SIGKILL", proc.pid)


def wait_for_port(host: str, port: int, proc: subprocess.Popen[bytes], log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FlowerProcessError(f"The SuperLink exited with status {proc.returncode}; see {log_path}.")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise FlowerProcessError(f"The SuperLink did not listen on {host}:{port} within {timeout:.0f} s; see {log_path}.")


@contextmanager
def shielded() -> Iterator[None]:
    """Ignore SIGINT/SIGTERM while cleaning up, so a second Ctrl-C cannot leave processes behind."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
