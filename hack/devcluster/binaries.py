"""Build and cache the control-plane binaries the local cluster runs.

Every binary is built from its Go module with the machine's Go toolchain and cached under
``~/.cache/vllm-operator/bin/<component>-<version>/``; a build only happens when that folder
lacks the binary, so bumping a pinned version below is what triggers a rebuild.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

KUBERNETES_VERSION = "v1.36.3"
ETCD_VERSION = "v3.6.16"
KWOK_VERSION = "v0.8.0"
HELM_VERSION = "v3.21.4"
# Prometheus 3.16.0, by its Go module version (see _prometheus_release).
PROMETHEUS_VERSION = "v0.316.0"
LWS_VERSION = "v0.7.0"

CACHE_ROOT = Path(os.environ.get("VLLM_OPERATOR_CACHE", Path.home() / ".cache" / "vllm-operator"))
BIN_ROOT = CACHE_ROOT / "bin"
GO_PROXY = os.environ.get("GOPROXY", "https://proxy.golang.org").split(",")[0]


class BuildError(RuntimeError):
    """A build step failed; the message says what to do next."""


@dataclass(frozen=True)
class Component:
    name: str
    version: str
    module: str
    binaries: dict[str, str]  # binary file name -> Go main package
    ldflags: str = "-s -w"
    tags: str = ""  # Go build tags, comma-separated
    # Files of the module's source (paths inside it) kept beside the binaries under their base names:
    # manifests that must match the built version.
    files: tuple[str, ...] = ()

    @property
    def directory(self) -> Path:
        return BIN_ROOT / f"{self.name}-{self.version}"

    def is_built(self) -> bool:
        names = [*self.binaries, *(Path(f).name for f in self.files)]
        return all((self.directory / name).is_file() for name in names)


def _go_default_binary_name(package: str) -> str:
    # `go build` names a binary after the package path's last element, skipping a /vN suffix.
    parts = package.split("/")
    return parts[-2] if re.fullmatch(r"v\d+", parts[-1]) else parts[-1]


def _kubernetes_ldflags(version: str) -> str:
    major, minor = version.lstrip("v").split(".")[:2]
    flags = ["-s", "-w"]
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [
            f"-X {pkg}.gitVersion={version}",
            f"-X {pkg}.gitMajor={major}",
            f"-X {pkg}.gitMinor={minor}",
            f"-X {pkg}.gitTreeState=clean",
        ]
    return " ".join(flags)


def _prometheus_release(module_version: str) -> str:
    """Prometheus publishes its release 3.x.y as Go module version v0.3xx.y: v0.316.0 is 3.16.0."""
    _, minor, patch = module_version.lstrip("v").split(".")
    return f"{int(minor) // 100}.{int(minor) % 100}.{patch}"


KUBERNETES = Component(
    "kubernetes",
    KUBERNETES_VERSION,
    "k8s.io/kubernetes",
    {name: f"k8s.io/kubernetes/cmd/{name}" for name in ("kube-apiserver", "kube-controller-manager", "kube-scheduler")},
    _kubernetes_ldflags(KUBERNETES_VERSION),
)
ETCD = Component("etcd", ETCD_VERSION, "go.etcd.io/etcd/server/v3", {"etcd": "go.etcd.io/etcd/server/v3"})
KWOK = Component("kwok", KWOK_VERSION, "sigs.k8s.io/kwok", {"kwok": "sigs.k8s.io/kwok/cmd/kwok"})
HELM = Component("helm", HELM_VERSION, "helm.sh/helm/v3", {"helm": "helm.sh/helm/v3/cmd/helm"})
# promtool checks and unit-tests the chart's alert rules; prometheus scrapes the demo. Only the Kubernetes
# service discovery is built in: the others pull in every cloud SDK and double the build time.
PROMETHEUS = Component(
    "prometheus",
    PROMETHEUS_VERSION,
    "github.com/prometheus/prometheus",
    {name: f"github.com/prometheus/prometheus/cmd/{name}" for name in ("prometheus", "promtool")},
    f"-s -w -X github.com/prometheus/common/version.Version={_prometheus_release(PROMETHEUS_VERSION)}",
    "remove_all_sd,enable_kubernetes_sd",
)
# The LeaderWorkerSet controller (and its webhooks); its main package is the module's cmd/, which `go build`
# would name "cmd". The version is stamped where its own Makefile stamps it.
LWS = Component(
    "lws",
    LWS_VERSION,
    "sigs.k8s.io/lws",
    {"lws-controller": "sigs.k8s.io/lws/cmd"},
    f"-s -w -X sigs.k8s.io/lws/pkg/version.GitVersion={LWS_VERSION}",
    # The CRD and webhook manifests devcluster.lws installs, from the same version as the binary.
    files=("config/crd/bases/leaderworkerset.x-k8s.io_leaderworkersets.yaml", "config/webhook/manifests.yaml",
           "config/webhook/mutating-patch.yaml", "config/webhook/validating-patch.yaml"),
)
COMPONENTS = (ETCD, KUBERNETES, KWOK, HELM, PROMETHEUS, LWS)


def path_of(name: str) -> Path:
    """The cached path of a binary by its file name (``kube-apiserver``, ``kwok``, ``helm``...)."""
    for component in COMPONENTS:
        if name in component.binaries:
            return component.directory / name
    raise KeyError(name)


def _staging_replaces(version: str) -> list[str]:
    """``replace`` lines pointing k8s.io/kubernetes' staging modules at their published tags."""
    url = f"{GO_PROXY}/k8s.io/kubernetes/@v/{version}.mod"
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            gomod = response.read().decode()
    except OSError as exc:
        raise BuildError(f"cannot read {url} ({exc}); check that the Go module proxy is reachable") from exc
    staging_version = "v0." + version.lstrip("v").split(".", 1)[1]
    replaces = []
    for line in gomod.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] == "=>" and parts[2].startswith("./staging/"):
            replaces.append(f"\t{parts[0]} => {parts[0]} {staging_version}")
    if not replaces:
        raise BuildError(f"no staging modules found in {url}")
    return replaces


def _wrapper_gomod(component: Component) -> str:
    lines = ["module vllm-operator.io/localcluster-build", "", "go 1.26", "",
             f"require {component.module} {component.version}", ""]
    if component is KUBERNETES:
        lines += ["replace (", *_staging_replaces(component.version), ")", ""]
    return "\n".join(lines)


def _go() -> str:
    go = shutil.which("go")
    if go is None:
        raise BuildError("the Go toolchain is not on PATH: install Go 1.26 or newer (https://go.dev/dl) and retry")
    return go


def build(component: Component, log_dir: Path) -> None:
    go = _go()
    target = component.directory
    target.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_file = log_dir / f"build-{component.name}-{component.version}.log"
    started = time.monotonic()
    print(f"building {component.name} {component.version} (log: {log_file}) ...", flush=True)
    env = dict(os.environ, CGO_ENABLED="0", GOFLAGS="-mod=mod", GOWORK="off")
    with tempfile.TemporaryDirectory(prefix=f"build-{component.name}-") as workdir:
        Path(workdir, "go.mod").write_text(_wrapper_gomod(component))
        staging = Path(workdir, "out")
        staging.mkdir()
        command = [go, "build", "-trimpath", f"-ldflags={component.ldflags}", f"-tags={component.tags}",
                   "-o", str(staging) + "/", *component.binaries.values()]
        with log_file.open("w") as log:
            result = subprocess.run(command, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
        if result.returncode != 0:
            tail = log_file.read_text().strip().splitlines()[-5:]
            raise BuildError(
                f"building {component.name} {component.version} failed (exit {result.returncode}); "
                f"see {log_file}: " + " | ".join(tail)
            )
        if component.files:
            # `go build` has just downloaded the module: the Go module cache holds its source.
            listed = subprocess.run([go, "list", "-m", "-f", "{{.Dir}}", component.module], check=False,
                                    cwd=workdir, env=env, capture_output=True, text=True)
            source = Path(listed.stdout.strip())
            if listed.returncode != 0 or not listed.stdout.strip() or not source.is_dir():
                raise BuildError(f"cannot locate the source of {component.module} {component.version}: "
                                 f"{listed.stderr.strip()}")
            for file in component.files:
                shutil.copyfile(source / file, target / Path(file).name)
        for name, package in component.binaries.items():
            shutil.move(str(staging / _go_default_binary_name(package)), target / name)
    print(f"built {component.name} {component.version} in {time.monotonic() - started:.0f}s", flush=True)


def ensure(components: tuple[Component, ...] = COMPONENTS, log_dir: Path | None = None) -> None:
    """Build every component whose binaries are missing from the cache."""
    log_dir = log_dir or CACHE_ROOT / "logs"
    for component in components:
        if not component.is_built():
            build(component, log_dir)


def main(argv: list[str]) -> int:
    wanted = {c.name: c for c in COMPONENTS}
    names = argv or list(wanted)
    unknown = [n for n in names if n not in wanted]
    if unknown:
        print(f"unknown component(s) {unknown}; choose from {sorted(wanted)}", file=sys.stderr)
        return 2
    try:
        ensure(tuple(wanted[n] for n in names))
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
