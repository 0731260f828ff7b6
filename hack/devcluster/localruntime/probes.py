"""Container probes (httpGet, tcpSocket, exec) with kubelet's timing and threshold rules."""

from __future__ import annotations

import http.client
import socket
import ssl
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from devcluster.localruntime.spec import Obj


def _port(port: int | str, container: Obj) -> int:
    if isinstance(port, int) or port.isdigit():
        return int(port)
    for declared in container.get("ports", []):
        if declared.get("name") == port:
            return int(declared["containerPort"])
    raise ValueError(f"named port {port} is not declared by the container")


def check(probe: Obj, container: Obj, pod_ip: str, env: Mapping[str, str], cwd: Path) -> tuple[bool, str]:
    """Run one probe once: (passed, a short reason when it did not)."""
    timeout = probe.get("timeoutSeconds", 1)
    try:
        if "httpGet" in probe:
            action = probe["httpGet"]
            host = action.get("host") or pod_ip
            port = _port(action["port"], container)
            connection: http.client.HTTPConnection
            if action.get("scheme", "HTTP").upper() == "HTTPS":
                # kubelet does not verify probe certificates either.
                connection = http.client.HTTPSConnection(host, port, timeout=timeout,
                                                         context=ssl._create_unverified_context())
            else:
                connection = http.client.HTTPConnection(host, port, timeout=timeout)
            headers = {header["name"]: header["value"] for header in action.get("httpHeaders", [])}
            try:
                connection.request("GET", action.get("path", "/"), headers=headers)
                status = connection.getresponse().status
            finally:
                connection.close()
            passed = 200 <= status < 400
            return passed, "" if passed else f"HTTP probe failed with statuscode: {status}"
        if "tcpSocket" in probe:
            action = probe["tcpSocket"]
            with socket.create_connection((action.get("host") or pod_ip, _port(action["port"], container)), timeout):
                return True, ""
        if "exec" in probe:
            result = subprocess.run(probe["exec"]["command"], env=dict(env), cwd=cwd, timeout=timeout,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            passed = result.returncode == 0
            return passed, "" if passed else f"command exited with {result.returncode}"
    except (OSError, ValueError, subprocess.TimeoutExpired, http.client.HTTPException) as exc:
        return False, str(exc) or type(exc).__name__
    return False, "only httpGet, tcpSocket and exec probes are supported by the local runtime"


@dataclass
class Prober:
    """The schedule and counters of one probe of one container run."""

    probe: Obj
    started_at: float
    successes: int = 0
    failures: int = 0
    next_at: float = field(init=False)

    def __post_init__(self) -> None:
        self.next_at = self.started_at + self.probe.get("initialDelaySeconds", 0)

    def due(self, now: float) -> bool:
        return now >= self.next_at

    def record(self, passed: bool, now: float) -> None:
        self.next_at = now + self.probe.get("periodSeconds", 10)
        if passed:
            self.successes, self.failures = self.successes + 1, 0
        else:
            self.successes, self.failures = 0, self.failures + 1

    @property
    def passing(self) -> bool:
        return self.successes >= int(self.probe.get("successThreshold", 1))

    @property
    def failed(self) -> bool:
        return self.failures >= int(self.probe.get("failureThreshold", 3))
