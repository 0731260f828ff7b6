"""One container of a pod as a local process group: start, probes, exits, restarts with back-off."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from kubernetes.utils import parse_quantity

from devcluster.localruntime.kube import Obj, timestamp
from devcluster.localruntime.log import event
from devcluster.localruntime.probes import Prober, check
from devcluster.localruntime.spec import LaunchPlan, SpecError

BACKOFF_FIRST = 2.0
BACKOFF_CAP = 20.0
BACKOFF_RESET_AFTER = 60.0  # a run this long counts as healthy again
MEMORY_CHECK_SECONDS = 2.0
# Kubelet's limits for termination messages: a message file counts up to its last 4 KiB; the log
# fallback takes a run's last 80 lines, at most their last 2 KiB.
MESSAGE_FILE_BYTES = 4096
MESSAGE_LOG_LINES = 80
MESSAGE_LOG_BYTES = 2048
_PAGE = os.sysconf("SC_PAGE_SIZE")


def group_rss(pgid: int) -> int:
    """Resident bytes of every process in a process group."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        # fields[0] is field 3 (state) of proc(5): pgrp is field 5, rss (pages) field 24.
        if int(fields[2]) == pgid:
            total += int(fields[21]) * _PAGE
    return total


def read_end(path: Path, start: int, limit: int) -> bytes:
    """At most the last ``limit`` bytes of a file from ``start`` on; nothing when it cannot be read."""
    try:
        with path.open("rb") as file:
            size = file.seek(0, os.SEEK_END)
            file.seek(max(start, size - limit))
            return file.read()
    except OSError:
        return b""


def log_tail(path: Path, offset: int) -> str:
    """The end of what a run (begun at ``offset``) wrote to its log: its last lines, at most their last bytes."""
    # The last lines' last bytes are within the file's last bytes, so reading those is enough.
    data = read_end(path, offset, MESSAGE_LOG_BYTES)
    # A final newline ends the last line rather than starting another one.
    keep = MESSAGE_LOG_LINES + int(data.endswith(b"\n"))
    return b"\n".join(data.split(b"\n")[-keep:]).decode(errors="replace")


def _state(waiting: Obj | None = None, running: Obj | None = None, terminated: Obj | None = None) -> Obj:
    # Explicit nulls: a strategic merge patch would otherwise keep the previous state's key.
    return {"waiting": waiting, "running": running, "terminated": terminated}


class ContainerRunner:
    def __init__(self, container: Obj, pod_name: str, log_path: Path, message_path: Path, restart_policy: str,
                 plan: Callable[[], LaunchPlan], grace_seconds: float) -> None:
        self.spec = container
        self.name: str = container["name"]
        self.pod_name = pod_name
        self.log_path = log_path
        self.message_path = message_path  # the file standing in for terminationMessagePath
        self.restart_policy = restart_policy
        self.make_plan = plan
        self.grace_seconds = grace_seconds
        limit = container.get("resources", {}).get("limits", {}).get("memory")
        self.memory_limit = int(parse_quantity(limit)) if limit else None

        self.process: subprocess.Popen[bytes] | None = None
        self.plan: LaunchPlan | None = None
        self.restart_count = 0
        self.started = False
        self.ready = False
        self.done = False  # exited for good under the restart policy
        self.waiting: Obj | None = {"reason": "ContainerCreating", "message": None}
        self.terminated: Obj | None = None
        self.last_terminated: Obj | None = None
        self.started_at = ""
        self.run_began = 0.0
        self.log_offset = 0
        self.next_start = 0.0
        self.delay = 0.0
        self.kill_note: tuple[str | None, str] | None = None  # (reason override, message) of our own kill
        self.halting = False
        self.next_memory_check = 0.0
        self.probers: dict[str, Prober] = {}

    def resume(self, previous: Obj) -> None:
        """Carry over the counters of a status written before the agent restarted; that run is gone."""
        self.restart_count = previous.get("restartCount", 0)
        self.last_terminated = previous.get("lastState", {}).get("terminated")
        state = previous.get("state", {})
        if state.get("running") or state.get("terminated"):
            self.restart_count += 1
            began = (state.get("running") or state["terminated"]).get("startedAt")
            self.last_terminated = {"exitCode": 137, "reason": "Error", "signal": None, "startedAt": began,
                                    "finishedAt": timestamp(), "containerID": None,
                                    "message": "the local runtime agent restarted"}

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def tick(self, pod_ip: str, now: float) -> None:
        if self.done:
            return
        if self.process is None:
            if now >= self.next_start:
                self._start(now)
            return
        code = self.process.poll()
        if code is not None:
            self._exited(code, now)
            return
        if self.memory_limit and now >= self.next_memory_check:
            self.next_memory_check = now + MEMORY_CHECK_SECONDS
            used = group_rss(self.process.pid)
            if used > self.memory_limit:
                self.kill_note = ("OOMKilled", f"resident memory {used} bytes exceeded the limit {self.memory_limit}")
                self._signal(signal.SIGKILL)
                return
        self._probe(pod_ip, now)

    def _start(self, now: float) -> None:
        try:
            self.plan = self.make_plan()
        except SpecError as exc:
            self.waiting = {"reason": "CreateContainerConfigError", "message": str(exc)}
            self.next_start = now + 5
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        # Kubelet gives every run a new, empty file: a message must not outlive the run that wrote it.
        self.message_path.parent.mkdir(parents=True, exist_ok=True)
        self.message_path.write_bytes(b"")
        self.started_at = timestamp()
        self.run_began = now
        try:
            with self.log_path.open("ab") as log:
                self.process = subprocess.Popen(
                    self.plan.argv, env=self.plan.env, cwd=self.plan.cwd, stdin=subprocess.DEVNULL,
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                )
        except OSError as exc:
            self.kill_note = ("StartError", str(exc))
            self._exited(128, now)
            return
        self.waiting = None
        self.terminated = None
        self.probers = {kind: Prober(self.spec[f"{kind}Probe"], now)
                        for kind in ("startup", "readiness", "liveness") if self.spec.get(f"{kind}Probe")}
        self.started = "startup" not in self.probers
        self.ready = self.started and "readiness" not in self.probers
        event("container.started", pod=self.pod_name, container=self.name, pid=self.process.pid,
              argv=self.plan.argv, restart_count=self.restart_count)

    def _probe(self, pod_ip: str, now: float) -> None:
        assert self.plan is not None
        order = ["startup"] if not self.started else ["liveness", "readiness"]
        for kind in order:
            prober = self.probers.get(kind)
            if prober is None or not prober.due(now):
                continue
            passed, why = check(prober.probe, self.spec, pod_ip, self.plan.env, self.plan.cwd)
            prober.record(passed, time.monotonic())
            if kind == "startup" and prober.passing:
                self.started = True
                self.ready = "readiness" not in self.probers
                event("container.startup_passed", pod=self.pod_name, container=self.name)
            elif kind == "readiness" and prober.passing != self.ready and (prober.passing or prober.failed):
                self.ready = prober.passing
                event("container.readiness", pod=self.pod_name, container=self.name, ready=self.ready, why=why)
            elif kind in ("startup", "liveness") and prober.failed:
                event("container.probe_failed", "warning", pod=self.pod_name, container=self.name, probe=kind, why=why)
                self.kill_note = (None, f"{kind} probe failed: {why}")
                grace = prober.probe.get("terminationGracePeriodSeconds", self.grace_seconds)
                self.terminate(min(grace, self.grace_seconds))
                return

    def _signal(self, signum: int) -> None:
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signum)
        except ProcessLookupError:
            pass

    def terminate(self, grace: float) -> None:
        """SIGTERM the process group, SIGKILL it after ``grace`` seconds; the exit is recorded by ``tick``."""
        if self.process is None:
            return
        self._signal(signal.SIGTERM)
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            event("container.kill", "warning", pod=self.pod_name, container=self.name, after_seconds=grace)
        self._signal(signal.SIGKILL)
        self.process.wait()

    def halt(self, grace: float) -> None:
        """Stop for good (the pod goes away): terminate and record the exit without a restart."""
        self.halting = True
        if self.process is not None:
            self.terminate(grace)
            self._exited(self.process.returncode, time.monotonic())
        self.done = True

    def _exited(self, code: int, now: float) -> None:
        exit_code = code if code >= 0 else 128 - code
        reason, note = self.kill_note or (None, None)
        self.kill_note = None
        pid = self.pid
        # The main process is gone; whatever it left behind in its group goes too.
        self._signal(signal.SIGKILL)
        self.process = None
        self.started = self.ready = False
        self.probers = {}
        # As kubelet: what the run wrote to its message file, else, only for FallbackToLogsOnError and a
        # failure, its log's tail; our own kill reason stands where kubelet puts the runtime's message.
        text = read_end(self.message_path, 0, MESSAGE_FILE_BYTES).decode(errors="replace")
        if not text and exit_code != 0 and self.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            text = log_tail(self.log_path, self.log_offset)
        message = ": ".join(part for part in (note, text) if part) or None
        terminated = {
            "exitCode": exit_code,
            "signal": -code if code < 0 else None,
            "reason": reason or ("Completed" if exit_code == 0 else "Error"),
            "message": message,
            "startedAt": self.started_at,
            "finishedAt": timestamp(),
            "containerID": f"localruntime://{pid}" if pid else None,
        }
        event("container.exited", "info" if exit_code == 0 else "warning", pod=self.pod_name, container=self.name,
              exit_code=exit_code, reason=terminated["reason"])
        restart = not self.halting and (
            self.restart_policy == "Always" or (self.restart_policy == "OnFailure" and exit_code != 0))
        if not restart:
            self.terminated = terminated
            self.done = True
            return
        self.last_terminated = terminated
        self.restart_count += 1
        healthy = now - self.run_began >= BACKOFF_RESET_AFTER
        self.delay = BACKOFF_FIRST if healthy or not self.delay else min(self.delay * 2, BACKOFF_CAP)
        self.next_start = now + self.delay
        self.waiting = {"reason": "CrashLoopBackOff",
                        "message": f"back-off {self.delay:.0f}s restarting failed container={self.name}"}

    @property
    def succeeded(self) -> bool:
        return self.done and self.terminated is not None and self.terminated["exitCode"] == 0

    def status(self) -> Obj:
        if self.process is not None:
            state = _state(running={"startedAt": self.started_at})
        elif self.terminated is not None:
            state = _state(terminated=self.terminated)
        else:
            state = _state(waiting=self.waiting)
        return {
            "name": self.name,
            "image": self.spec.get("image", ""),
            "imageID": f"localruntime://{self.spec.get('image', '')}",
            "containerID": f"localruntime://{self.process.pid}" if self.process else None,
            "started": self.started,
            "ready": self.ready,
            "restartCount": self.restart_count,
            "state": state,
            "lastState": _state(terminated=self.last_terminated),
        }
