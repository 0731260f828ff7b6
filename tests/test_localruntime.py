"""The local-runtime node: spec translation offline, then pods and volumes on the local cluster."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from devcluster import engine
from devcluster.cluster import group_members, process_running
from devcluster.pytest_plugin import wait_for
from devcluster.localruntime.container import ContainerRunner
from devcluster.localruntime.node import LOCAL_RUNTIME_TAINT
from devcluster.localruntime.pods import IpPool
from devcluster.localruntime.probes import Prober
from devcluster.localruntime.spec import (
    ENGINE_MODULE,
    LaunchPlan,
    SpecError,
    bind_to,
    container_env,
    engine_arguments,
    expand,
    in_own_mounts,
    is_engine_image,
    launch_plan,
    mount_namespaces,
    rewrite_path,
)

NODE = "local-0"


class FakeObjects:
    def __init__(self, secrets: dict[str, dict[str, bytes]], config_maps: dict[str, dict[str, bytes]]) -> None:
        self.secrets = secrets
        self.config_maps = config_maps

    def secret(self, name: str) -> dict[str, bytes] | None:
        return self.secrets.get(name)

    def config_map(self, name: str) -> dict[str, bytes] | None:
        return self.config_maps.get(name)


def a_pod(container: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"name": "web-0", "namespace": "ai", "uid": "u1", "labels": {"app": "web"}},
            "spec": {"nodeName": NODE, "containers": [container]}}


# --- offline: how a container spec becomes a process ------------------------------------------


def test_expand_follows_kubelet_rules() -> None:
    variables = {"A": "1", "B": "x y"}
    assert expand("$(A)-$(B)", variables) == "1-x y"
    assert expand("$$(A) $(MISSING) $", variables) == "$(A) $(MISSING) $"


def test_container_env_resolves_every_source() -> None:
    container = {
        "name": "c",
        "envFrom": [{"configMapRef": {"name": "settings"}, "prefix": "CFG_"}],
        "env": [
            {"name": "NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
            {"name": "MAYBE", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k", "optional": True}}},
            {"name": "URL", "value": "http://$(IP):8000/$(CFG_PATH)"},
        ],
    }
    objects = FakeObjects({"creds": {"token": b"s3cret"}}, {"settings": {"PATH": b"v1"}})
    env = container_env(container, a_pod(container), "127.0.10.7", objects)
    assert env == {"CFG_PATH": "v1", "NAME": "web-0", "IP": "127.0.10.7", "APP": "web", "TOKEN": "s3cret",
                   "URL": "http://127.0.10.7:8000/v1"}


def test_a_missing_secret_is_a_config_error() -> None:
    container = {"name": "c", "env": [{"name": "T", "valueFrom": {"secretKeyRef": {"name": "nope", "key": "k"}}}]}
    with pytest.raises(SpecError, match="secret nope not found"):
        container_env(container, a_pod(container), "127.0.10.7", FakeObjects({}, {}))


def test_rewrite_path_maps_mounts_and_flag_values(tmp_path: Path) -> None:
    mounts = [("/data", tmp_path / "pv"), ("/data/cache", tmp_path / "cache")]
    assert rewrite_path("/data/hf", mounts) == f"{tmp_path}/pv/hf"
    assert rewrite_path("/data/cache/x", mounts) == f"{tmp_path}/cache/x"
    assert rewrite_path("--download-dir=/data", mounts) == f"--download-dir={tmp_path}/pv"
    assert rewrite_path("/database", mounts) == "/database"
    assert rewrite_path("relative/data", mounts) == "relative/data"


def test_engine_images_and_commands_are_recognised() -> None:
    assert is_engine_image("vllm/vllm-openai:v0.32.0")
    assert is_engine_image("registry.local:5000/team/vllm-cpu@sha256:abc")
    assert not is_engine_image("registry.vllm.example:5000/busybox:1")
    assert engine_arguments(["vllm", "serve", "org/m", "--port", "8000"]) == ["--model", "org/m", "--port", "8000"]
    assert engine_arguments(["python3", "-m", ENGINE_MODULE, "--model", "m"]) == ["--model", "m"]
    assert engine_arguments(["python3", "-m", "http.server"]) is None
    assert bind_to(["--host", "0.0.0.0", "--port", "8000"], "127.0.10.3") == ["--host", "127.0.10.3", "--port", "8000"]
    assert bind_to(["--host=::"], "127.0.10.3") == ["--host=127.0.10.3"]
    assert bind_to(["--port", "8000"], "127.0.10.3") == ["--port", "8000", "--host", "127.0.10.3"]


def test_launch_plan_for_the_vllm_server(tmp_path: Path) -> None:
    engine_python = tmp_path / "engine" / "python"
    engine_python.parent.mkdir()
    engine_python.touch()
    container = {
        "name": "vllm", "image": "vllm/vllm-openai:v0.32.0", "command": ["vllm", "serve"],
        "args": ["org/model", "--host", "0.0.0.0", "--download-dir", "/models/dl"],
        "env": [{"name": "HF_HOME", "value": "/models/hf"}],
    }
    mounts = [("/models", tmp_path / "pv")]
    plan = launch_plan(container, a_pod(container), "127.0.10.9", mounts, FakeObjects({}, {}), engine_python,
                       tmp_path / "home", {"PATH": "/usr/bin"})
    assert plan.engine
    assert plan.argv == [str(engine_python), "-m", ENGINE_MODULE, "--model", "org/model", "--host", "127.0.10.9",
                         "--download-dir", f"{tmp_path}/pv/dl"]
    assert plan.env["HF_HOME"] == f"{tmp_path}/pv/hf"
    assert plan.env["HOME"] == str(tmp_path / "home")
    assert plan.cwd == tmp_path / "home"


def test_an_engine_finds_its_volumes_at_the_container_paths_it_is_handed_at_run_time(tmp_path: Path) -> None:
    """The operator hands a running engine container paths (a LoRA adapter's folder): the engine process runs in a
    mount namespace of its own where each volume is also where the container mounts it."""
    if not mount_namespaces():
        pytest.skip("this machine gives no process a mount namespace of its own (docs/local-runtime.md)")
    volume = tmp_path / "claim"
    (volume / "adapter").mkdir(parents=True)
    (volume / "adapter" / "adapter_config.json").write_text('{"r": 8}')
    container_path = f"/vllm-operator-test-{os.getpid()}/adapters/claim"
    mounts = [(container_path, volume), ("/dev/termination-log", tmp_path / "message"), ("/missing", tmp_path / "x")]
    argv = in_own_mounts(["cat", f"{container_path}/adapter/adapter_config.json"], mounts)
    assert argv[-2:] == ["cat", f"{container_path}/adapter/adapter_config.json"]
    assert [part for part in argv if part.startswith("/dev") or part == "/missing"] == []
    assert subprocess.run(argv, capture_output=True, text=True, check=True).stdout == '{"r": 8}'
    assert not os.path.exists(f"{container_path}/adapter"), "the bind is the process's own, not the machine's"


def test_launch_plan_for_other_images(tmp_path: Path) -> None:
    container = {"name": "web", "image": "python:3.11", "command": ["python3", "-m", "http.server"]}
    plan = launch_plan(container, a_pod(container), "127.0.10.9", [], FakeObjects({}, {}), tmp_path / "none",
                       tmp_path, {"PATH": os.environ["PATH"]})
    assert not plan.engine
    assert plan.argv == [sys.executable, "-m", "http.server"]
    with pytest.raises(SpecError, match="entrypoint"):
        launch_plan({"name": "x", "image": "busybox"}, a_pod(container), "127.0.10.9", [], FakeObjects({}, {}),
                    tmp_path / "none", tmp_path, {})


def test_launch_plan_for_the_model_puller_runs_the_repositorys_puller(tmp_path: Path) -> None:
    from vllm_operator.render.manifests import Owner
    from vllm_operator.render.puller import PullerSettings, pull_job
    from vllm_operator.api import LLMDeploymentSpec

    spec = LLMDeploymentSpec.model_validate({"model": {"name": "local/tiny"}, "accelerator": {"type": "cpu"}})
    pod = pull_job(spec, Owner("tiny", "ns", "uid"), PullerSettings("registry.example.com/vllm-model-puller:2.4.0"))
    container = pod["spec"]["template"]["spec"]["containers"][0]
    mounts = [("/cache", tmp_path / "pv"), ("/dev/termination-log", tmp_path / "message")]
    plan = launch_plan(container, {"metadata": {"name": "p", "namespace": "ns"}, "spec": {}}, "127.0.10.9", mounts,
                       FakeObjects({}, {}), tmp_path / "none", tmp_path / "home", {"PATH": os.environ["PATH"]})
    puller = Path(__file__).resolve().parents[1] / "images" / "model-puller" / "puller.py"
    assert not plan.engine
    assert plan.argv[:3] == [sys.executable, str(puller), "local/tiny"] and puller.is_file()
    assert plan.env["HF_HOME"] == f"{tmp_path}/pv/huggingface"
    assert plan.env["PULLER_HOST"] == "127.0.10.9"
    assert plan.env["PULLER_TERMINATION_LOG"] == str(tmp_path / "message")


def test_ip_pool_hands_out_unique_addresses() -> None:
    pool = IpPool()
    first = pool.allocate("a", None)
    second = pool.allocate("b", first)  # taken, so another one
    assert first.startswith("127.0.10.") and second != first
    assert IpPool("127.64.255.0/24").allocate("a", None).startswith("127.64.255.")
    assert pool.allocate("a", None) == first
    pool.release("a")
    assert pool.allocate("c", first) == first  # a pod may keep its address across agent restarts


def test_prober_thresholds() -> None:
    prober = Prober({"initialDelaySeconds": 5, "periodSeconds": 2, "failureThreshold": 2, "successThreshold": 1}, 100)
    assert not prober.due(104) and prober.due(105)
    prober.record(False, 105)
    assert not prober.failed and prober.next_at == 107
    prober.record(False, 107)
    assert prober.failed
    prober.record(True, 109)
    assert prober.passing and not prober.failed


def run_locally(command: list[str], tmp_path: Path, restart_policy: str,
                policy: str = "File", **spec: Any) -> ContainerRunner:
    plan = LaunchPlan(command, dict(os.environ), tmp_path, engine=False)
    container = {"name": "c", "image": "busybox", "terminationMessagePolicy": policy, **spec}
    return ContainerRunner(container, "ai/p", tmp_path / "c.log", tmp_path / "c.termination-log", restart_policy,
                           lambda: plan, grace_seconds=2)


def run_to_exit(runner: ContainerRunner) -> dict[str, Any]:
    def finished() -> bool:
        runner.tick("127.0.0.1", time.monotonic())
        return runner.done

    wait_for("the process to exit", finished, 10, 0.05)
    terminated: dict[str, Any] = runner.status()["state"]["terminated"]
    return terminated


# For `sh -c WRITE_MESSAGE FILE MESSAGE`: $0 is the termination message file, $1 the message.
WRITE_MESSAGE = 'printf %s "$1" > "$0"'


def test_a_failed_exit_falls_back_to_the_log_tail(tmp_path: Path) -> None:
    runner = run_locally(["sh", "-c", "echo starting; echo broken >&2; exit 3"], tmp_path, "Never",
                         "FallbackToLogsOnError")
    terminated = run_to_exit(runner)
    assert terminated["exitCode"] == 3 and terminated["reason"] == "Error"
    assert terminated["message"] == "starting\nbroken\n"


def test_the_log_tail_is_the_last_80_lines(tmp_path: Path) -> None:
    runner = run_locally(["sh", "-c", "for i in $(seq 1 100); do echo line $i; done; exit 1"], tmp_path, "Never",
                         "FallbackToLogsOnError")
    assert run_to_exit(runner)["message"] == "".join(f"line {i}\n" for i in range(21, 101))


def test_the_log_tail_is_at_most_2048_bytes(tmp_path: Path) -> None:
    # 40 lines of 100 bytes: fewer than 80 lines, but twice the byte limit, which keeps the end.
    script = "for i in $(seq 10 49); do printf '%099d\\n' $i; done; exit 1"
    runner = run_locally(["sh", "-c", script], tmp_path, "Never", "FallbackToLogsOnError")
    written = "".join(f"{i:099d}\n" for i in range(10, 50))
    assert run_to_exit(runner)["message"] == written[-2048:]


def test_only_the_current_run_is_tailed(tmp_path: Path) -> None:
    (tmp_path / "c.log").write_text("an earlier run\n")
    runner = run_locally(["sh", "-c", "echo this run; exit 1"], tmp_path, "Never", "FallbackToLogsOnError")
    assert run_to_exit(runner)["message"] == "this run\n"


def test_a_successful_exit_gets_no_log_tail(tmp_path: Path) -> None:
    runner = run_locally(["sh", "-c", "echo all done"], tmp_path, "Never", "FallbackToLogsOnError")
    terminated = run_to_exit(runner)
    assert terminated["exitCode"] == 0 and terminated["reason"] == "Completed"
    assert terminated["message"] is None


def test_the_file_policy_never_reads_the_log(tmp_path: Path) -> None:
    runner = run_locally(["sh", "-c", "echo broken; exit 3"], tmp_path, "Never")
    terminated = run_to_exit(runner)
    assert terminated["exitCode"] == 3 and terminated["message"] is None


@pytest.mark.parametrize("policy", ["File", "FallbackToLogsOnError"])
@pytest.mark.parametrize("code", [0, 3])
def test_the_termination_message_file_wins_over_the_log(tmp_path: Path, policy: str, code: int) -> None:
    script = f"echo log line; {WRITE_MESSAGE}; exit {code}"
    runner = run_locally(["sh", "-c", script, str(tmp_path / "c.termination-log"), "why it ended"], tmp_path,
                         "Never", policy)
    terminated = run_to_exit(runner)
    assert terminated["exitCode"] == code and terminated["message"] == "why it ended"


def test_the_termination_message_file_is_read_up_to_its_last_4096_bytes(tmp_path: Path) -> None:
    message = "a" * 1000 + "b" * 4000
    runner = run_locally(["sh", "-c", f"{WRITE_MESSAGE}; exit 1", str(tmp_path / "c.termination-log"), message],
                         tmp_path, "Never")
    assert run_to_exit(runner)["message"] == message[-4096:]


def test_each_run_gets_an_empty_termination_message_file(tmp_path: Path) -> None:
    # The first run leaves a message and fails; the second writes none: its message must not be the first one's.
    script = f"if [ -e ran ]; then exit 0; fi; touch ran; {WRITE_MESSAGE}; exit 3"
    runner = run_locally(["sh", "-c", script, str(tmp_path / "c.termination-log"), "first run"], tmp_path,
                         "OnFailure")
    terminated = run_to_exit(runner)
    assert runner.status()["lastState"]["terminated"]["message"] == "first run"
    assert terminated["exitCode"] == 0 and terminated["message"] is None


def test_our_own_kill_reason_comes_before_the_log_tail(tmp_path: Path) -> None:
    runner = run_locally(["sh", "-c", "echo loading; sleep 30"], tmp_path, "Never", "FallbackToLogsOnError",
                         resources={"limits": {"memory": "1Ki"}})
    runner.tick("127.0.0.1", time.monotonic())
    wait_for("the first log line", lambda: (tmp_path / "c.log").read_text() == "loading\n", 10, 0.05)
    terminated = run_to_exit(runner)
    assert terminated["reason"] == "OOMKilled"
    assert terminated["message"].startswith("resident memory ")
    assert terminated["message"].endswith(" exceeded the limit 1024: loading\n")


def test_runner_restarts_with_back_off_and_stops_its_group(tmp_path: Path) -> None:
    runner = run_locally(["sh", "-c", "sleep 60 & sleep 60"], tmp_path, "Always")
    runner.tick("127.0.0.1", time.monotonic())
    first = runner.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    wait_for("the exit to be seen", lambda: runner.tick("127.0.0.1", time.monotonic()) or runner.restart_count, 10)
    status = runner.status()
    assert status["state"]["waiting"]["reason"] == "CrashLoopBackOff"
    assert status["lastState"]["terminated"]["exitCode"] == 137
    # The background `sleep` of the killed run went with its process group (zombies count as gone:
    # whether an orphan is reaped is up to the machine's init).
    wait_for("the killed run's process group to be gone", lambda: not group_members(first), 5, 0.1)
    wait_for("the restart", lambda: runner.tick("127.0.0.1", time.monotonic()) or runner.pid, 10)
    runner.halt(2)
    assert runner.done and runner.status()["state"]["terminated"]["exitCode"] == 143


def test_hub_layout_resolves_the_snapshot(tmp_path: Path) -> None:
    files = tmp_path / "files"
    files.mkdir()
    (files / "config.json").write_text("{}")
    (files / "tokenizer.json").write_text("{}")
    (files / "model.safetensors").write_bytes(b"\0" * 8)
    snapshot = engine._write_hub_layout(files, tmp_path / "hf")
    assert engine.model_snapshot(tmp_path / "hf") == snapshot
    assert (snapshot / "model.safetensors").is_symlink()
    assert (snapshot / "model.safetensors").read_bytes() == b"\0" * 8
    assert snapshot.parent.parent.name == "models--vllm-operator--tiny-llama"


# --- on the local cluster -------------------------------------------------------------------


def read_pod(core: client.CoreV1Api, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        response = core.read_namespaced_pod(name, namespace, _preload_content=False)
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise
    pod: dict[str, Any] = json.loads(response.data)
    return pod


def is_ready(pod: dict[str, Any] | None) -> bool:
    conditions = (pod or {}).get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def container_pid(pod: dict[str, Any]) -> int:
    return int(pod["status"]["containerStatuses"][0]["containerID"].removeprefix("localruntime://"))


def web_pod(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": NODE}, "tolerations": [LOCAL_RUNTIME_TAINT],
            "terminationGracePeriodSeconds": 5,
            "containers": [{
                "name": "web", "image": "python:3.11",
                "command": ["python3", "-m", "http.server", "--bind", "$(POD_IP)", "8080"],
                "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
                "readinessProbe": {"httpGet": {"path": "/", "port": 8080}, "periodSeconds": 1},
            }],
        },
    }


@pytest.mark.cluster
def test_pod_runs_restarts_and_dies_with_its_deletion(cluster: Any, namespace: str) -> None:
    core = client.CoreV1Api(cluster.api_client)
    core.create_namespaced_pod(namespace, web_pod("web"))

    pod = wait_for("the pod to be Ready", lambda: (p := read_pod(core, namespace, "web")) and is_ready(p) and p, 60)
    ip = pod["status"]["podIP"]
    assert ip.startswith("127.") and pod["status"]["podIPs"] == [{"ip": ip}]
    with urllib.request.urlopen(f"http://{ip}:8080/", timeout=5) as response:
        assert response.status == 200

    first = container_pid(pod)
    os.kill(first, signal.SIGKILL)
    pod = wait_for("a restart", lambda: (p := read_pod(core, namespace, "web")) and is_ready(p)
                   and p["status"]["containerStatuses"][0]["restartCount"] == 1 and p, 60)
    status = pod["status"]["containerStatuses"][0]
    assert status["lastState"]["terminated"]["exitCode"] == 137
    assert status["state"]["running"]
    second = container_pid(pod)
    assert second != first and process_running(second)

    core.delete_namespaced_pod("web", namespace)
    wait_for("the pod to go", lambda: read_pod(core, namespace, "web") is None, 30)
    assert not process_running(second)


@pytest.mark.cluster
def test_termination_messages_follow_each_containers_policy(cluster: Any, namespace: str) -> None:
    core = client.CoreV1Api(cluster.api_client)
    crash = ["sh", "-c", "echo loading; echo crashed >&2; exit 2"]
    fallback = {"terminationMessagePolicy": "FallbackToLogsOnError"}
    core.create_namespaced_pod(namespace, {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "crash"},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": NODE}, "tolerations": [LOCAL_RUNTIME_TAINT],
            "restartPolicy": "Never",
            "containers": [
                {"name": "tail", "image": "busybox", "command": crash, **fallback},
                {"name": "no-tail", "image": "busybox", "command": crash},
                {"name": "done", "image": "busybox", "command": ["sh", "-c", "echo fine"], **fallback},
                # The API server defaults terminationMessagePath to /dev/termination-log.
                {"name": "default-path", "image": "busybox",
                 "command": ["sh", "-c", f"{WRITE_MESSAGE}; exit 0", "/dev/termination-log", "all good"]},
                {"name": "own-path", "image": "busybox", "terminationMessagePath": "/run/why", **fallback,
                 "command": ["sh", "-c", f"echo loading; {WRITE_MESSAGE}; exit 2", "/run/why", "out of cheese"]},
            ],
        },
    })
    pod = wait_for("the pod to fail", lambda: (p := read_pod(core, namespace, "crash"))
                   and p["status"].get("phase") == "Failed" and p, 60)
    messages = {s["name"]: s["state"]["terminated"].get("message") for s in pod["status"]["containerStatuses"]}
    assert messages == {"tail": "loading\ncrashed\n", "no-tail": None, "done": None, "default-path": "all good",
                        "own-path": "out of cheese"}


def test_container_logs_reach_kubectl_logs_through_the_apiserver(cluster: Any, namespace: str) -> None:
    core = client.CoreV1Api(cluster.api_client)
    lines = "; ".join(f"echo line {i}" for i in range(1, 6))
    core.create_namespaced_pod(namespace, {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "talker"},
        "spec": {"nodeSelector": {"kubernetes.io/hostname": NODE}, "tolerations": [LOCAL_RUNTIME_TAINT],
                 "restartPolicy": "Never",
                 "containers": [{"name": "talk", "image": "busybox", "command": ["sh", "-c", lines]}]},
    })
    wait_for("the pod to finish", lambda: (p := read_pod(core, namespace, "talker"))
             and p["status"].get("phase") == "Succeeded", 60)
    assert core.read_namespaced_pod_log("talker", namespace, container="talk") == "".join(
        f"line {i}\n" for i in range(1, 6))
    assert core.read_namespaced_pod_log("talker", namespace, container="talk", tail_lines=2) == "line 4\nline 5\n"
    assert core.read_namespaced_pod_log("talker", namespace, container="talk", tail_lines=2, limit_bytes=4) == "line"
    with pytest.raises(client.ApiException):
        core.read_namespaced_pod_log("talker", namespace, container="nobody")


def bound_claim_folder(core: client.CoreV1Api, namespace: str, name: str, size: str) -> Path:
    core.create_namespaced_persistent_volume_claim(namespace, {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name},
        "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "local-path",
                 "resources": {"requests": {"storage": size}}},
    })

    def bound() -> str | None:
        claim = core.read_namespaced_persistent_volume_claim(name, namespace)
        return claim.spec.volume_name if claim.status.phase == "Bound" else None

    volume = core.read_persistent_volume(wait_for(f"claim {name} to bind", bound, 60))
    assert volume.spec.capacity["storage"] == size
    return Path(volume.spec.host_path.path)


@pytest.mark.cluster
def test_claim_is_provisioned_and_bound(cluster: Any, namespace: str) -> None:
    folder = bound_claim_folder(client.CoreV1Api(cluster.api_client), namespace, "scratch", "1Gi")
    assert folder.is_dir() and folder.parts[-2:] == (namespace, "scratch")


@pytest.mark.cluster
@pytest.mark.engine
def test_vllm_server_on_the_tiny_model(cluster: Any, namespace: str) -> None:
    if not engine.engine_ready() or engine.model_snapshot() is None:
        pytest.skip("the engine venv or the tiny model is missing; run `make model`")
    core = client.CoreV1Api(cluster.api_client)
    folder = bound_claim_folder(core, namespace, "models", "2Gi")
    engine.seed_hf_cache(folder / "hf")
    health = {"httpGet": {"path": "/health", "port": 8000}, "periodSeconds": 1}
    core.create_namespaced_pod(namespace, {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "engine"},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": NODE}, "tolerations": [LOCAL_RUNTIME_TAINT],
            "containers": [{
                "name": "vllm", "image": "vllm/vllm-openai:v0.32.0", "command": ["vllm", "serve"],
                "args": [engine.MODEL_ID, "--host", "0.0.0.0", "--port", "8000", "--max-model-len", "512"],
                "env": [{"name": "HF_HOME", "value": "/models/hf"}, {"name": "HF_HUB_OFFLINE", "value": "1"},
                        {"name": "VLLM_CPU_KVCACHE_SPACE", "value": "1"},
                        {"name": "VLLM_CACHE_ROOT", "value": "/models/vllm-cache"}],
                "volumeMounts": [{"name": "models", "mountPath": "/models"}],
                "startupProbe": {**health, "failureThreshold": 300},
                "readinessProbe": health,
            }],
            "volumes": [{"name": "models", "persistentVolumeClaim": {"claimName": "models"}}],
        },
    })
    started = time.monotonic()
    pod = wait_for("vLLM to be Ready", lambda: (p := read_pod(core, namespace, "engine")) and is_ready(p) and p,
                   420, 2)
    print(f"vLLM pod Ready after {time.monotonic() - started:.0f}s")
    request = urllib.request.Request(
        f"http://{pod['status']['podIP']}:8000/v1/chat/completions",
        data=json.dumps({"model": engine.MODEL_ID, "max_tokens": 8,
                         "messages": [{"role": "user", "content": "Hello!"}]}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        answer = json.load(response)
    assert answer["usage"]["completion_tokens"] > 0
    assert answer["choices"][0]["message"]["role"] == "assistant"
