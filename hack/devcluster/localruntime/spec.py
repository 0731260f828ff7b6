"""How a container of a pod becomes a local process: its argv, environment and working folder.

Pure functions over the pod as a dict, so they can be tested without a cluster; but for ``mount_namespaces``,
which asks the machine once.
"""

from __future__ import annotations

import functools
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from kubernetes.utils import parse_quantity

Obj = dict[str, Any]
# A mount: the path the container asked for, and the local folder standing in for it.
Mount = tuple[str, Path]

ENGINE_MODULE = "vllm.entrypoints.openai.api_server"
# The model puller image's script (images/model-puller/Dockerfile), run from the repository with this venv's
# huggingface_hub instead.
PULLER_SCRIPT = "/opt/puller/puller.py"
LOCAL_PULLER = Path(__file__).resolve().parents[3] / "images" / "model-puller" / "puller.py"
WILDCARD_HOSTS = {"", "0.0.0.0", "::", "[::]"}
_REFERENCE = re.compile(r"\$(\$|\(([^()]*)\))")
_PYTHON = re.compile(r"python(3(\.\d+)?)?")
# A Service's in-cluster URL; nothing here resolves cluster DNS names or routes Service IPs.
_SERVICE_URL = re.compile(r"(https?://)([a-z0-9]([-a-z0-9]*[a-z0-9])?)\.([a-z0-9]([-a-z0-9]*[a-z0-9])?)"
                          r"\.svc(\.cluster\.local)?(:(\d+))?")


# Mount points a volume never covers in the engine's mount namespace: the system's own (kubelet puts /dev/shm and
# the termination log there; here they are plain local paths already).
SYSTEM_PATHS = ("/dev", "/proc", "/sys")
# Binds each (local folder, container path) pair given before "--" in a private mount namespace, then runs the rest.
_BIND = 'set -e; while [ "$1" != "--" ]; do mkdir -p "$2"; mount --bind "$1" "$2"; shift 2; done; shift; exec "$@"'


@functools.cache
def mount_namespaces() -> bool:
    """Whether this machine lets the runtime give a process a mount namespace of its own (root, CAP_SYS_ADMIN)."""
    try:
        return subprocess.run(["unshare", "--mount", "--propagation", "private", "true"],
                              capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def in_own_mounts(argv: list[str], mounts: Sequence[Mount]) -> list[str]:
    """``argv`` run where every volume folder is also at the path the container mounts it at, as in a container:
    paths the engine is handed at run time (the folder of a LoRA adapter the operator loads) resolve there too.
    Where the machine allows no mount namespace, ``argv`` as it is (docs/local-runtime.md)."""
    binds = [(str(local), path) for path, local in sorted(mounts, key=lambda mount: len(mount[0]))
             if path.startswith("/") and not path.startswith(SYSTEM_PATHS) and local.is_dir()]
    if not binds or not mount_namespaces():
        return argv
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", _BIND, "sh",
            *(part for pair in binds for part in pair), "--", *argv]


class SpecError(Exception):
    """The container cannot be started as asked; the message goes into its waiting state."""


class ObjectSource(Protocol):
    """Secrets and ConfigMaps of the pod's namespace, as key -> bytes; None when absent."""

    def secret(self, name: str) -> dict[str, bytes] | None: ...

    def config_map(self, name: str) -> dict[str, bytes] | None: ...

    def service_address(self, namespace: str, name: str, port: int) -> str | None:
        """``<ip>:<port>`` of a ready Pod behind that Service port; None when there is none."""


@dataclass(frozen=True)
class LaunchPlan:
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    engine: bool


def expand(text: str, variables: Mapping[str, str]) -> str:
    """Kubelet's ``$(VAR)`` expansion: unknown references stay as written, ``$$`` is a literal ``$``."""

    def substitute(match: re.Match[str]) -> str:
        if match.group(1) == "$":
            return "$"
        return variables.get(match.group(2), match.group(0))

    return _REFERENCE.sub(substitute, text)


def field_value(pod: Obj, pod_ip: str, path: str) -> str:
    """The value of a downward-API ``fieldRef`` path."""
    metadata = pod["metadata"]
    simple: dict[str, str] = {
        "metadata.name": metadata["name"],
        "metadata.namespace": metadata["namespace"],
        "metadata.uid": metadata.get("uid", ""),
        "spec.nodeName": pod["spec"].get("nodeName", ""),
        "spec.serviceAccountName": pod["spec"].get("serviceAccountName", ""),
        "status.podIP": pod_ip,
        "status.podIPs": pod_ip,
        "status.hostIP": "127.0.0.1",
        "status.hostIPs": "127.0.0.1",
    }
    if path in simple:
        return simple[path]
    keyed = re.fullmatch(r"metadata\.(labels|annotations)\['([^']*)'\]", path)
    if keyed:
        return str(metadata.get(keyed.group(1), {}).get(keyed.group(2), ""))
    if path in ("metadata.labels", "metadata.annotations"):
        values = metadata.get(path.split(".")[1], {})
        return "\n".join(f'{key}="{value}"' for key, value in sorted(values.items()))
    raise SpecError(f"fieldRef {path} is not supported by the local runtime")


def resource_value(container: Obj, resource: str, divisor: str | None) -> str:
    """The value of a ``resourceFieldRef`` (limits fall back to requests, then to 0)."""
    kind, _, name = resource.partition(".")
    resources = container.get("resources", {})
    quantity = resources.get(kind, {}).get(name) or resources.get("requests", {}).get(name) or "0"
    return str(math.ceil(parse_quantity(quantity) / parse_quantity(divisor or "1")))


def _from_source(source: ObjectSource, kind: str, ref: Obj) -> dict[str, bytes] | None:
    data = source.secret(ref["name"]) if kind == "secret" else source.config_map(ref["name"])
    if data is None and not ref.get("optional", False):
        raise SpecError(f"{kind} {ref['name']} not found")
    return data


def container_env(container: Obj, pod: Obj, pod_ip: str, source: ObjectSource) -> dict[str, str]:
    """The container's environment as kubelet builds it: envFrom first, then env in order."""
    env: dict[str, str] = {}
    for entry in container.get("envFrom", []):
        kind, ref = ("secret", entry["secretRef"]) if "secretRef" in entry else ("configmap", entry["configMapRef"])
        for key, value in (_from_source(source, kind, ref) or {}).items():
            env[entry.get("prefix", "") + key] = value.decode()
    for item in container.get("env", []):
        origin = item.get("valueFrom")
        if origin is None:
            env[item["name"]] = expand(item.get("value", ""), env)
        elif "fieldRef" in origin:
            env[item["name"]] = field_value(pod, pod_ip, origin["fieldRef"]["fieldPath"])
        elif "resourceFieldRef" in origin:
            ref = origin["resourceFieldRef"]
            env[item["name"]] = resource_value(container, ref["resource"], ref.get("divisor"))
        else:
            kind, ref = ("secret", origin["secretKeyRef"]) if "secretKeyRef" in origin else (
                "configmap", origin["configMapKeyRef"])
            data = _from_source(source, kind, ref)
            if data is not None and ref["key"] in data:
                env[item["name"]] = data[ref["key"]].decode()
            elif data is not None and not ref.get("optional", False):
                raise SpecError(f"key {ref['key']} not found in {kind} {ref['name']}")
    return env


def rewrite_path(value: str, mounts: Sequence[Mount]) -> str:
    """Point a value that starts with a mount path (also ``--flag=<path>``) at the local folder."""
    flag, equals, rest = value.partition("=")
    if value.startswith("-") and equals:
        return f"{flag}={rewrite_path(rest, mounts)}"
    for mount_path, local in sorted(mounts, key=lambda mount: len(mount[0]), reverse=True):
        prefix = mount_path.rstrip("/")
        if prefix and (value == prefix or value.startswith(prefix + "/")):
            return str(local) + value[len(prefix):]
    return value


def rewrite_service_urls(value: str, source: ObjectSource) -> str:
    """Point ``http://<service>.<namespace>.svc[.cluster.local][:port]`` at a ready Pod of that Service,
    as cluster DNS and kube-proxy would; once, at start: a later Pod of the Service is not followed."""

    def substitute(match: re.Match[str]) -> str:
        scheme, port = match.group(1), int(match.group(8) or (443 if match.group(1) == "https://" else 80))
        address = source.service_address(match.group(4), match.group(2), port)
        if address is None:
            raise SpecError(f"no ready Pod serves Service {match.group(4)}/{match.group(2)} port {port}")
        return scheme + address

    return _SERVICE_URL.sub(substitute, value)


def is_engine_image(image: str) -> bool:
    """Whether the image's repository path (registry host, tag and digest aside) mentions vllm."""
    parts = image.split("@", 1)[0].split("/")
    parts[-1] = parts[-1].split(":", 1)[0]
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        parts = parts[1:]
    return "vllm" in "/".join(parts)


def is_puller_image(image: str) -> bool:
    """Whether the image's repository (registry host, tag and digest aside) is the model puller's."""
    return image.split("@", 1)[0].rsplit("/", 1)[-1].split(":", 1)[0].endswith("model-puller")


def engine_arguments(argv: Sequence[str]) -> list[str] | None:
    """The server's own options when ``argv`` starts the vLLM OpenAI server, else None."""
    if len(argv) >= 2 and os.path.basename(argv[0]) == "vllm" and argv[1] == "serve":
        rest = list(argv[2:])
    elif len(argv) >= 3 and _PYTHON.fullmatch(os.path.basename(argv[0])) and list(argv[1:3]) == ["-m", ENGINE_MODULE]:
        rest = list(argv[3:])
    else:
        return None
    # `vllm serve MODEL` takes the model positionally; the module entry point ignores that form.
    if rest and not rest[0].startswith("-"):
        rest = ["--model", rest[0], *rest[1:]]
    return rest


def bind_to(arguments: Sequence[str], pod_ip: str) -> list[str]:
    """Bind the server to the pod's own address so many pods can share one port number."""
    result: list[str] = []
    bound = False
    items = iter(arguments)
    for argument in items:
        if argument == "--host":
            value = next(items, "")
            result += ["--host", pod_ip if value in WILDCARD_HOSTS else value]
            bound = True
        elif argument.startswith("--host="):
            value = argument.partition("=")[2]
            result.append(f"--host={pod_ip if value in WILDCARD_HOSTS else value}")
            bound = True
        else:
            result.append(argument)
    return result if bound else [*result, "--host", pod_ip]


def launch_plan(
    container: Obj,
    pod: Obj,
    pod_ip: str,
    mounts: Sequence[Mount],
    source: ObjectSource,
    engine_python: Path,
    home: Path,
    base_env: Mapping[str, str],
) -> LaunchPlan:
    env = {key: rewrite_service_urls(rewrite_path(value, mounts), source)
           for key, value in container_env(container, pod, pod_ip, source).items()}
    command = [expand(part, env) for part in container.get("command", [])]
    args = [rewrite_service_urls(expand(part, env), source) for part in container.get("args", [])]
    puller = is_puller_image(container.get("image", ""))
    engine = is_engine_image(container.get("image", "")) and not puller  # vllm-model-puller names vllm too
    # Without a command the image's entrypoint would run; for vLLM images that is the server.
    server_options = engine_arguments(command + args) if command else engine_arguments(["vllm", "serve", *args])
    if engine and server_options is not None:
        if not engine_python.is_file():
            raise SpecError(f"the vLLM engine venv is missing ({engine_python}); run `make engine`")
        argv = [str(engine_python), "-m", ENGINE_MODULE, *bind_to(server_options, pod_ip)]
    elif command:
        argv = command + args
    else:
        raise SpecError("the local runtime cannot read image entrypoints; give the container a command")
    argv = [rewrite_path(part, mounts) for part in argv]
    if puller and argv[1:2] == [PULLER_SCRIPT]:
        argv[1] = str(LOCAL_PULLER)
    if engine and server_options is None and _PYTHON.fullmatch(os.path.basename(argv[0])):
        # Other Python programs of a vLLM image (its serving benchmark) need vLLM too: the engine venv has it.
        if not engine_python.is_file():
            raise SpecError(f"the vLLM engine venv is missing ({engine_python}); run `make engine`")
        argv[0] = str(engine_python)
    elif not (engine and server_options is not None):
        argv[0] = _executable(argv[0], base_env.get("PATH", ""))
    engine = engine and server_options is not None
    if engine:
        argv = in_own_mounts(argv, mounts)
    working_dir = container.get("workingDir")
    mapped = rewrite_path(working_dir, mounts) if working_dir else ""
    cwd = Path(mapped) if mapped and mapped != working_dir else home
    return LaunchPlan(argv, {**base_env, "HOME": str(home), **env}, cwd, engine)


def _executable(name: str, path: str) -> str:
    # Python is this interpreter: version-manager shims break once HOME points at the pod's folder.
    if _PYTHON.fullmatch(name):
        return sys.executable
    if "/" in name:
        return name
    return shutil.which(name, path=path) or name
