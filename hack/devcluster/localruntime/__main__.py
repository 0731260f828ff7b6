"""``python -m devcluster.localruntime``: the agent that plays kubelet for one local node."""

from __future__ import annotations

import argparse
import fcntl
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from devcluster.engine import engine_python
from devcluster.localruntime.kube import api_client
from devcluster.localruntime.kubelet import KubeletServer
from devcluster.localruntime.log import event
from devcluster.localruntime.node import NodeAgent
from devcluster.localruntime.pods import DEFAULT_SUBNET, PodManager
from devcluster.localruntime.volumes import Provisioner

# Every process the agent starts carries this variable, so a later agent can find orphans of a
# predecessor that died without cleaning up (SIGKILL).
MARKER = "VLLM_OPERATOR_LOCALRUNTIME_STATE_DIR"
PASSED_ENV = ("PATH", "LANG", "LC_ALL", "TZ", "TMPDIR")


def take_lock(state_dir: Path) -> IO[str] | None:
    """Hold ``agent.lock`` for the agent's lifetime; None when another agent holds it."""
    handle = (state_dir / "agent.lock").open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        print(f"error: another local runtime agent (pid {handle.read().strip() or '?'}) already runs for "
              f"{state_dir}; stop it first", file=sys.stderr)
        handle.close()
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def kill_orphans(state_dir: Path) -> None:
    wanted = f"{MARKER}={state_dir}".encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = Path(entry.path, "environ").read_bytes().split(b"\0")
            if wanted in environ:
                group = os.getpgid(int(entry.name))
                os.killpg(group, signal.SIGKILL)
                event("agent.orphan_killed", pid=int(entry.name), pgid=group)
        except (OSError, ProcessLookupError):
            continue


def _retry_until(stop: threading.Event, what: str, action: Callable[[], None]) -> bool:
    while not stop.is_set():
        try:
            action()
            return True
        except Exception as exc:  # noqa: BLE001 - the API server may still be starting
            event("agent.retry", "warning", what=what, error=str(exc).splitlines()[0])
            stop.wait(2)
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devcluster.localruntime", description=__doc__)
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--state-dir", required=True, type=Path)
    parser.add_argument("--node", default="local-0")
    parser.add_argument("--pod-subnet", default=DEFAULT_SUBNET, help="loopback /24 for pod IPs (default: %(default)s)")
    parser.add_argument("--engine-python", type=Path, default=engine_python(),
                        help="interpreter of the vLLM engine venv (default: %(default)s)")
    parser.add_argument("--kubelet-port", type=int, default=0,
                        help="serve container logs to the apiserver on this port (default: not at all)")
    parser.add_argument("--kubelet-cert", type=Path, help="serving certificate of the log endpoint")
    parser.add_argument("--kubelet-key", type=Path, help="its key")
    parser.add_argument("--client-ca", type=Path, help="CA of the apiserver's client certificate")
    args = parser.parse_args(argv)
    state_dir: Path = args.state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    lock = take_lock(state_dir)
    if lock is None:
        return 1
    kill_orphans(state_dir)

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    api = api_client(args.kubeconfig)
    node = NodeAgent(api, args.node, state_dir, stop, args.kubelet_port)
    base_env = {key: os.environ[key] for key in PASSED_ENV if key in os.environ}
    base_env[MARKER] = str(state_dir)
    pods = PodManager(api, args.node, state_dir, args.engine_python, base_env, stop, args.pod_subnet)
    provisioner = Provisioner(api, state_dir, stop)
    event("agent.starting", node=args.node, state_dir=str(state_dir), pid=os.getpid(),
          engine_python=str(args.engine_python))
    try:
        if not _retry_until(stop, "register node", node.register):
            return 0
        for target in (node.run, provisioner.run_claims, provisioner.run_volumes, pods.run):
            threading.Thread(target=target, name=target.__qualname__, daemon=True).start()
        if args.kubelet_port:
            kubelet = KubeletServer(state_dir, args.kubelet_port, args.kubelet_cert, args.kubelet_key, args.client_ca)
            threading.Thread(target=kubelet.run, args=(stop,), name="kubelet", daemon=True).start()
        event("agent.ready", node=args.node)
        # A timed wait keeps the main thread responsive to signals.
        while not stop.wait(1):
            pass
    finally:
        stop.set()
        started = time.monotonic()
        pods.shutdown()
        node.mark_stopped()
        event("agent.stopped", node=args.node, shutdown_seconds=round(time.monotonic() - started, 1))
        lock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
