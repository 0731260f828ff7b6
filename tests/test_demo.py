"""`make demo` as a new user runs it: the real engine answers, and `make demo-down` leaves nothing."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from devcluster import monitoring
from devcluster.cluster import REPO_ROOT, Ports, process_running
from devcluster.pytest_plugin import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.engine]

# Away from the test cluster's and a user's demo's ports and Pod range.
PORT_BASE = 17600


def demo(command: str, state_dir: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "hack"), os.environ.get("PYTHONPATH", "")]),
           "VLLM_OPERATOR_DEMO_DIR": str(state_dir), "VLLM_OPERATOR_DEMO_PORT_BASE": str(PORT_BASE),
           "VLLM_OPERATOR_DEMO_POD_CIDR": "127.74.0.0/16"}
    return subprocess.run([sys.executable, "-m", "devcluster.demo", command], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def alive_pids(state_dir: Path) -> list[int]:
    pids = (int(pid_file.read_text().split()[0]) for pid_file in state_dir.rglob("run/*.pid"))
    return [pid for pid in pids if process_running(pid)]


def assert_prometheus_scrapes_the_demo(stdout: str) -> None:
    """The demo's Prometheus has the engine's series, labelled as the chart's PodMonitor labels them, the
    operator's own, and the chart's alert rules, none of them firing."""
    url = re.search(r"Prometheus: (http://\S+)", stdout)
    assert url, stdout[-3000:]
    [running] = monitoring.query(url[1], 'vllm:num_requests_running{llmdeployment="tiny"}')
    labels = running["metric"]
    assert labels["namespace"] == "default" and labels["pod"].startswith("tiny-"), labels
    assert labels["job"] == "vllm-operator-system/vllm-operator-engines" and labels["model_name"] == "tiny"
    # The operator's phase series follows the status; Prometheus sees the change on its next scrape.
    [phase] = wait_for("Prometheus to scrape the Ready phase", lambda: [
        series for series in monitoring.query(url[1], 'vllm_operator_llmdeployment_phase{llmdeployment="tiny"}')
        if series["metric"]["phase"] == "Ready"], 90, 2)
    assert phase["metric"]["namespace"] == "default"
    [leader] = monitoring.query(url[1], "vllm_operator_leader")
    assert leader["metric"]["job"] == "vllm-operator-metrics" and leader["value"][1] == "1"
    rules = [r for group in monitoring.rules(url[1]) for r in group["rules"]]
    assert len(rules) == 7 and all(r["health"] == "ok" for r in rules), rules
    assert not [r["name"] for r in rules if r["state"] == "firing"]


def test_demo_serves_a_real_completion_and_cleans_up(tmp_path: Path) -> None:
    state_dir = tmp_path / "demo"
    try:
        up = demo("up", state_dir, 900)
        assert up.returncode == 0, up.stdout[-4000:] + up.stderr[-4000:]
        usage = re.search(r"completion_tokens=(\d+); engine vllm:generation_tokens_total (\d+) -> (\d+)", up.stdout)
        assert usage, up.stdout[-3000:]
        completion, before, after = map(int, usage.groups())
        assert completion > 0 and after >= before + completion
        assert re.search(r"^\s+tiny\s+vllm-operator/tiny-llama\s+cpu\s+1/1\s+Ready", up.stdout, re.M)
        assert "kubectl get llmd -w" in up.stdout and "make demo-down" in up.stdout
        assert "total" in up.stdout
        assert_prometheus_scrapes_the_demo(up.stdout)

        again = demo("up", state_dir, 600)  # a second run reuses what is there
        assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
        assert "local cluster already running" in again.stdout
    finally:
        pids = alive_pids(state_dir)
        down = demo("down", state_dir, 180)
    assert down.returncode == 0, down.stderr
    assert pids and not any(process_running(pid) for pid in pids)
    assert not state_dir.exists()


def test_a_taken_port_stops_the_demo_with_one_line(tmp_path: Path) -> None:
    state_dir = tmp_path / "demo"
    with socket.socket() as blocker:
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a previous run may leave TIME_WAIT
        blocker.bind(("127.0.0.1", Ports(PORT_BASE).apiserver))
        blocker.listen()
        failed = demo("up", state_dir, 600)
    assert failed.returncode == 1
    reason = [line for line in failed.stderr.splitlines() if line.startswith("demo failed:")]
    assert len(reason) == 1 and str(Ports(PORT_BASE).apiserver) in reason[0], failed.stderr
    assert alive_pids(state_dir) == []
    demo("down", state_dir, 60)
