"""Pods bound to the node: one worker thread per pod drives its containers and writes its status."""

from __future__ import annotations

import ipaddress
import shutil
import threading
import time
import traceback
from collections.abc import Mapping
from pathlib import Path

from kubernetes import client

from devcluster.localruntime.container import ContainerRunner
from devcluster.localruntime.kube import STRATEGIC_MERGE, TIMEOUT, Obj, call, is_not_found, timestamp, watch_forever
from devcluster.localruntime.log import event
from devcluster.localruntime.spec import LaunchPlan, Mount, launch_plan
from devcluster.localruntime.volumes import ApiObjects, PodVolumes, VolumeNotReady

TICK_SECONDS = 0.5
GRACE_CAP_SECONDS = 30.0
SHUTDOWN_GRACE_SECONDS = 5.0
TERMINAL_PHASES = ("Succeeded", "Failed")


DEFAULT_SUBNET = "127.0.10.0/24"


class IpPool:
    """Unique pod addresses from one loopback /24 (all of 127/8 reaches the loopback device)."""

    def __init__(self, subnet: str = DEFAULT_SUBNET) -> None:
        network = ipaddress.ip_network(subnet)
        if network.prefixlen != 24 or not network.is_loopback:
            raise ValueError(f"pod subnet {subnet} must be a /24 inside 127.0.0.0/8")
        self.subnet = subnet
        self.prefix = str(network.network_address).rsplit(".", 1)[0] + "."
        self._by_uid: dict[str, str] = {}
        self._lock = threading.Lock()
        self._cursor = 1

    def allocate(self, uid: str, preferred: str | None) -> str:
        with self._lock:
            if uid in self._by_uid:
                return self._by_uid[uid]
            used = set(self._by_uid.values())
            if preferred and preferred.startswith(self.prefix) and preferred not in used:
                address = preferred
            else:
                # Walk on from the last handout so a just-freed address is not reused at once.
                for step in range(1, 254):
                    candidate = f"{self.prefix}{(self._cursor + step - 2) % 253 + 2}"
                    if candidate not in used:
                        address = candidate
                        self._cursor = int(candidate.rsplit(".", 1)[1])
                        break
                else:
                    raise RuntimeError(f"no free pod address left in {self.subnet}")
            self._by_uid[uid] = address
            return address

    def release(self, uid: str) -> None:
        with self._lock:
            self._by_uid.pop(uid, None)


class PodWorker(threading.Thread):
    def __init__(self, manager: PodManager, pod: Obj) -> None:
        metadata = pod["metadata"]
        super().__init__(name=f"pod-{metadata['namespace']}/{metadata['name']}", daemon=True)
        self.manager = manager
        self.core = manager.core
        self.pod = pod
        self.uid: str = metadata["uid"]
        self.namespace: str = metadata["namespace"]
        self.pod_name: str = metadata["name"]
        self.key = f"{self.namespace}/{self.pod_name}"
        self.pod_dir = manager.state_dir / "pods" / f"{self.namespace}_{self.pod_name}"
        self.changed = threading.Event()
        self.vanished = False
        status = pod.get("status", {})
        self.terminal = status.get("phase") in TERMINAL_PHASES
        self.ip: str | None = status.get("podIP") if self.terminal else None
        self.start_time: str = status.get("startTime") or timestamp()
        self.transitions: dict[str, tuple[str, str]] = {
            c["type"]: (c["status"], c.get("lastTransitionTime") or timestamp()) for c in status.get("conditions", [])
        }
        self.pending_message: str | None = None
        self.init_runners: list[ContainerRunner] = []
        self.runners: list[ContainerRunner] = []
        self.volumes_ready = False
        # A finished pod's status is final: it is written once and never recomputed.
        self.final_status: Obj | None = status if self.terminal else None
        self.last_status: Obj | None = self.final_status

    def update(self, pod: Obj) -> None:
        self.pod = pod
        self.changed.set()

    def vanish(self) -> None:
        self.vanished = True
        self.changed.set()

    # --- lifecycle -------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._loop()
        except Exception:  # noqa: BLE001 - a broken pod must not leave processes behind
            event("pod.worker_failed", "error", pod=self.key, error=traceback.format_exc())
            self._halt_all(0)
            self.manager.forget(self, finished=False)
        else:
            self.manager.forget(self, finished=True)

    def _loop(self) -> None:
        if not self.terminal:
            self.ip = self.manager.pool.allocate(self.uid, self.pod.get("status", {}).get("podIP"))
            event("pod.accepted", pod=self.key, ip=self.ip)
        while True:
            if self.manager.stopping.is_set():
                self._halt_all(SHUTDOWN_GRACE_SECONDS)
                return
            if self.vanished:
                self._halt_all(0)
                self._clean_up()
                return
            try:
                if self.pod["metadata"].get("deletionTimestamp"):
                    self._finish_deletion()
                    return
                if not self.terminal:
                    self._step(time.monotonic())
                self._push_status()
            except Exception as exc:  # noqa: BLE001 - API hiccups are retried on the next tick
                event("pod.step_failed", "warning", pod=self.key, error=repr(exc))
            self.changed.wait(TICK_SECONDS)
            self.changed.clear()

    def _grace(self) -> float:
        spec_grace = self.pod["spec"].get("terminationGracePeriodSeconds", 30)
        asked = self.pod["metadata"].get("deletionGracePeriodSeconds", spec_grace)
        return float(min(asked, spec_grace, GRACE_CAP_SECONDS))

    def _halt_all(self, grace: float) -> None:
        deadline = time.monotonic() + grace
        for runner in [*self.init_runners, *self.runners]:
            runner.halt(max(0.0, deadline - time.monotonic()))

    def _finish_deletion(self) -> None:
        grace = self._grace()
        event("pod.terminating", pod=self.key, grace_seconds=grace)
        self._halt_all(grace)
        self._push_status()
        try:
            call(self.core.delete_namespaced_pod, self.pod_name, self.namespace, grace_period_seconds=0,
                 body={"gracePeriodSeconds": 0, "preconditions": {"uid": self.uid}})
        except client.ApiException as exc:
            if exc.status not in (404, 409):
                raise
        self._clean_up()
        event("pod.deleted", pod=self.key)

    def _clean_up(self) -> None:
        # Logs stay for post-mortems; emptyDirs and the home folder die with the pod.
        shutil.rmtree(self.pod_dir / "volumes", ignore_errors=True)
        shutil.rmtree(self.pod_dir / "home", ignore_errors=True)
        self.manager.pool.release(self.uid)

    # --- containers ------------------------------------------------------------------------

    def _runner(self, container: Obj, volumes: Mapping[str, Path], restart_policy: str) -> ContainerRunner:
        mounts: list[Mount] = [
            (mount["mountPath"], volumes[mount["name"]] / mount.get("subPath", ""))
            for mount in container.get("volumeMounts", [])
            if mount["name"] in volumes
        ]
        message_path = self.pod_dir / f"{container['name']}.termination-log"
        # Kubelet mounts a file at terminationMessagePath; here values naming that path are pointed at ours.
        message_mount = (container.get("terminationMessagePath") or "/dev/termination-log", message_path)
        home = self.pod_dir / "home"
        objects = ApiObjects(self.core, self.namespace)
        assert self.ip is not None
        pod_ip = self.ip

        def plan() -> LaunchPlan:
            home.mkdir(parents=True, exist_ok=True)
            for _, local in mounts:
                if not local.exists():  # a missing subPath is created, as kubelet does
                    local.mkdir(parents=True)
            return launch_plan(container, self.pod, pod_ip, [*mounts, message_mount], objects,
                               self.manager.engine_python, home, self.manager.base_env)

        runner = ContainerRunner(container, self.key, self.pod_dir / f"{container['name']}.log", message_path,
                                 restart_policy, plan, self._grace())
        status = self.pod.get("status", {})
        # Container names are unique across init and regular containers.
        previous = {s["name"]: s for s in [*status.get("initContainerStatuses", []),
                                           *status.get("containerStatuses", [])]}
        if container["name"] in previous:
            runner.resume(previous[container["name"]])
        return runner

    def _step(self, now: float) -> None:
        if not self.volumes_ready:
            try:
                volumes = PodVolumes(self.core, self.pod, self.pod_dir, self.ip or "").materialize()
            except VolumeNotReady as exc:
                if str(exc) != self.pending_message:
                    event("pod.volumes_pending", pod=self.key, reason=str(exc))
                self.pending_message = str(exc)
                return
            self.pending_message = None
            self.volumes_ready = True
            spec = self.pod["spec"]
            policy = spec.get("restartPolicy", "Always")
            # Init containers run to completion; under Always a failed one is retried.
            init_policy = "OnFailure" if policy == "Always" else policy
            self.init_runners = [self._runner(c, volumes, init_policy) for c in spec.get("initContainers", [])]
            self.runners = [self._runner(c, volumes, policy) for c in spec["containers"]]
        assert self.ip is not None
        for runner in self.init_runners:
            if not runner.done:
                runner.tick(self.ip, now)
                return
        if all(runner.succeeded for runner in self.init_runners):
            for runner in self.runners:
                runner.tick(self.ip, now)

    # --- status ----------------------------------------------------------------------------

    def _phase(self) -> str:
        if any(runner.done and not runner.succeeded for runner in self.init_runners):
            return "Failed"
        if self.runners and all(runner.done for runner in self.runners):
            return "Succeeded" if all(runner.succeeded for runner in self.runners) else "Failed"
        if any(runner.process is not None or runner.restart_count or runner.done for runner in self.runners):
            return "Running"
        return "Pending"

    def _condition(self, kind: str, ok: bool, reason: str | None = None, message: str | None = None) -> Obj:
        status = "True" if ok else "False"
        previous = self.transitions.get(kind)
        since = previous[1] if previous and previous[0] == status else timestamp()
        self.transitions[kind] = (status, since)
        return {"type": kind, "status": status, "lastTransitionTime": since, "lastProbeTime": None,
                "reason": None if ok else reason, "message": None if ok else message}

    def _status(self) -> Obj:
        if self.final_status is not None:
            return self.final_status
        phase = self._phase()
        self.terminal = phase in TERMINAL_PHASES
        initialized = bool(self.runners) and all(runner.succeeded for runner in self.init_runners)
        unready = [runner.name for runner in self.runners if not runner.ready] if self.runners else [
            c["name"] for c in self.pod["spec"]["containers"]]
        containers_ready = not unready and phase == "Running"
        gates = [gate["conditionType"] for gate in self.pod["spec"].get("readinessGates", [])]
        current = {c["type"]: c["status"] for c in self.pod.get("status", {}).get("conditions", [])}
        open_gates = [gate for gate in gates if current.get(gate) != "True"]
        why = "PodCompleted" if self.terminal else "ContainersNotReady"
        unready_message = f"containers with unready status: [{' '.join(unready)}]"
        conditions = [
            self._condition("PodReadyToStartContainers", self.volumes_ready, "VolumesPending", self.pending_message),
            self._condition("Initialized", initialized, "ContainersNotInitialized",
                            "containers with incomplete status: init containers or volumes"),
            self._condition("ContainersReady", containers_ready, why, unready_message),
            self._condition("Ready", containers_ready and not open_gates,
                            "ReadinessGatesNotReady" if containers_ready else why,
                            f"the status of pod readiness gates are not true: {open_gates}" if containers_ready
                            else unready_message),
        ]
        status: Obj = {
            "phase": phase,
            "conditions": conditions,
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": self.ip,
            "podIPs": [{"ip": self.ip}],
            "startTime": self.start_time,
            "containerStatuses": [runner.status() for runner in self.runners] or [
                _waiting_status(c, self.pending_message) for c in self.pod["spec"]["containers"]],
        }
        if self.pod["spec"].get("initContainers"):
            status["initContainerStatuses"] = [runner.status() for runner in self.init_runners] or [
                _waiting_status(c, self.pending_message) for c in self.pod["spec"]["initContainers"]]
        if self.terminal:
            self.final_status = status
            event("pod.finished", pod=self.key, phase=phase)
        return status

    def _push_status(self) -> None:
        status = self._status()
        if status == self.last_status:
            return
        try:
            self.core.patch_namespaced_pod_status(self.pod_name, self.namespace, {"status": status},
                                                  _content_type=STRATEGIC_MERGE, _request_timeout=TIMEOUT)
        except client.ApiException as exc:
            if is_not_found(exc):
                self.vanish()
                return
            event("pod.status_failed", "warning", pod=self.key, status=exc.status, reason=exc.reason)
            return
        except Exception as exc:  # noqa: BLE001 - retried on the next tick
            event("pod.status_failed", "warning", pod=self.key, error=repr(exc))
            return
        if self.last_status is None or status["phase"] != self.last_status["phase"]:
            event("pod.phase", pod=self.key, phase=status["phase"], ip=self.ip)
        self.last_status = status


def _waiting_status(container: Obj, message: str | None) -> Obj:
    return {"name": container["name"], "image": container.get("image", ""), "imageID": "", "containerID": None,
            "started": False, "ready": False, "restartCount": 0,
            "state": {"waiting": {"reason": "ContainerCreating", "message": message}, "running": None,
                      "terminated": None},
            "lastState": {"waiting": None, "running": None, "terminated": None}}


class PodManager:
    """Watches the pods bound to the node and keeps one worker per pod."""

    def __init__(self, api: client.ApiClient, node: str, state_dir: Path, engine_python: Path,
                 base_env: Mapping[str, str], stop: threading.Event, pod_subnet: str = DEFAULT_SUBNET) -> None:
        self.core = client.CoreV1Api(api)
        self.node = node
        self.state_dir = state_dir
        self.engine_python = engine_python
        self.base_env = dict(base_env)
        self.stop = stop
        self.stopping = threading.Event()
        self.pool = IpPool(pod_subnet)
        self.workers: dict[str, PodWorker] = {}
        self.finished: set[str] = set()
        self.lock = threading.Lock()

    def run(self) -> None:
        watch_forever("pods", self.core.list_pod_for_all_namespaces, self._sync, self._changed, self.stop,
                      field_selector=f"spec.nodeName={self.node}")

    def _sync(self, pods: list[Obj]) -> None:
        present = {pod["metadata"]["uid"] for pod in pods}
        with self.lock:
            gone = [worker for uid, worker in self.workers.items() if uid not in present]
        for worker in gone:
            worker.vanish()
        for pod in pods:
            self._changed("MODIFIED", pod)

    def _changed(self, kind: str, pod: Obj) -> None:
        uid = pod["metadata"]["uid"]
        with self.lock:
            worker = self.workers.get(uid)
            if worker is None and kind != "DELETED" and uid not in self.finished and not self.stopping.is_set():
                worker = self.workers[uid] = PodWorker(self, pod)
                worker.start()
                return
        if worker is None:
            return
        if kind == "DELETED":
            worker.vanish()
        else:
            worker.update(pod)

    def forget(self, worker: PodWorker, finished: bool) -> None:
        """Drop a worker; a finished pod's later events are ignored, a crashed one gets a new worker."""
        with self.lock:
            self.workers.pop(worker.uid, None)
            if finished and not self.stopping.is_set():
                self.finished.add(worker.uid)

    def shutdown(self) -> None:
        """Stop every pod's processes (SIGTERM, then SIGKILL after a short grace) and wait for that."""
        self.stopping.set()
        with self.lock:
            workers = list(self.workers.values())
        for worker in workers:
            worker.changed.set()
        for worker in workers:
            worker.join(SHUTDOWN_GRACE_SECONDS + 5)
