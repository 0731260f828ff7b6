"""Run the operator as a local process against the local cluster (tests, demo, benchmarks)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from devcluster.cluster import client_kubeconfig


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# The operator image installs no kubernetes package (a test dependency here), and kopf imports it whenever it is
# installed (9 MiB of RSS): None in sys.modules makes every import of it fail as it does in the image.
WITHOUT_KUBERNETES = "import sys; sys.modules['kubernetes'] = None; "


def as_in_image(*args: str) -> list[str]:
    """The command line of ``vllm-operator <args>`` as the image runs it, with this interpreter."""
    return [sys.executable, "-c", WITHOUT_KUBERNETES + "from vllm_operator.cli import main; sys.exit(main(sys.argv[1:]))",
            *args]


def operator_command(kubeconfig: Path, metrics_port: int, health_port: int, extra_args: list[str]) -> list[str]:
    return [
        *as_in_image("run"),
        "--kubeconfig", str(kubeconfig),
        "--metrics-port", str(metrics_port),
        "--health-port", str(health_port),
        *extra_args,
    ]


def operator_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", **(extra or {})}


def wait_healthy(process: subprocess.Popen[bytes], health_port: int, log_file: Path, timeout: float = 60.0) -> None:
    """Return once the operator's liveness endpoint answers; RuntimeError naming the log otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the operator exited with code {process.returncode}; see {log_file}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{health_port}/healthz", timeout=2):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.3)
    raise RuntimeError(f"the operator did not report healthy within {timeout:.0f}s; see {log_file}")


@dataclass
class OperatorProcess:
    """One ``vllm-operator run`` process; ``start`` returns once its liveness endpoint answers."""

    kubeconfig: Path
    log_file: Path
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # e.g. HF_ENDPOINT of a local hub
    metrics_port: int = field(default_factory=free_port)
    health_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self, timeout: float = 60.0) -> OperatorProcess:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        command = operator_command(client_kubeconfig(self.kubeconfig, "operator"), self.metrics_port, self.health_port,
                                   self.extra_args)
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                            env=operator_env(self.env))
        try:
            wait_healthy(self.process, self.health_port, self.log_file, timeout)
        except RuntimeError:
            self.stop()
            raise
        return self

    def stop(self, grace: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""
