"""Warm ClientApps for `flower-supernode --isolation process`: libraries imported once, a fork per task.

Started by `fl-deploy --warm` next to each SuperNode as `python -m fl.deploy --clientapp-executor HOST:PORT`
(docs/deploy.md, "Warm ClientApps").
"""

from __future__ import annotations

import logging
import os
import sys
import time

log = logging.getLogger("fl.deploy")

APP_PACKAGES = ("fl", "clients", "strategies", "privacy", "simulations")  # the app's own code (pyproject)


def run_clientapp_executor(runtime_api_address: str, *, preload: str = "fl.app.client_app", poll: float = 0.25) -> None:
    """A warm SuperExec for `flower-supernode --isolation process`: one forked child per ClientApp task.

    Flower's SuperExec starts a fresh `flwr-clientapp` per message, which imports torch, transformers,
    PEFT and Opacus again each time (~8 s of a tiny model's ~23 s round on 2 cores). This executor imports
    `preload` once, forgets the app's own modules (`APP_PACKAGES`: each task imports them from its FAB, as
    flwr-clientapp does) and forks a child per task that runs Flower's `run_clientapp` with the libraries
    already loaded. The parent never runs a torch op, so no thread pool is inherited across `fork`.
    Uses Flower 1.41 internals (`RuntimeHttpClient`, `AcquireTaskRequest`, `run_clientapp`; flwr<1.42).
    """
    import importlib

    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    t0 = time.perf_counter()
    importlib.import_module(preload)
    for name in [m for m in sys.modules if m.partition(".")[0] in APP_PACKAGES]:
        del sys.modules[name]
    log.info(
        "Warm ClientApp executor for %s: %s preloaded in %.1f s", runtime_api_address, preload, time.perf_counter() - t0
    )
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address,
        insecure=True,  # the SuperNode's local Runtime API (plain HTTP unless the node has --ssl-* flags)
        root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=make_simple_http_retry_invoker(),
    )
    children: set[int] = set()
    while True:
        children -= {pid for pid in children if os.waitpid(pid, os.WNOHANG)[0]}
        res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
        if res.HasField("task") and res.token:
            pid = os.fork()
            if pid == 0:  # the child: run one task, never return into the parent's loop
                code = 1
                try:
                    run_clientapp(
                        runtime_api_address=runtime_api_address,
                        token=res.token,
                        insecure=True,
                        certificates=None,
                        parent_pid=os.getppid(),
                        runtime_dependency_install=False,
                    )
                    code = 0
                except SystemExit as e:  # run_clientapp ends with flwr_exit
                    code = e.code if isinstance(e.code, int) else 0
                except BaseException:
                    log.exception("ClientApp task %d failed outside Flower's handler", res.task.task_id)
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            children.add(pid)
        time.sleep(poll)
