"""The local control plane: etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok
(plus the simulated engines, the local-runtime agent and the LeaderWorkerSet controller), each its own process
group, all on loopback.

State lives in one folder (default ``<repo>/.local-cluster``): ``certs/``, ``etcd/`` data,
``logs/<process>.log``, ``run/<process>.pid`` and the admin ``kubeconfig``.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import ipaddress
import itertools
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml
from kubernetes import client, config

from devcluster import audit, binaries, crds, lws, nodes
from devcluster.certs import Authority, Identity, KeyPair, service_account_key

REPO_ROOT = Path(__file__).resolve().parents[2]
STATE_DIR_ENV = "VLLM_OPERATOR_CLUSTER_DIR"
PORT_BASE_ENV = "VLLM_OPERATOR_CLUSTER_PORT_BASE"
# A second cluster on the same machine needs its own range, or both would listen on the same Pod IPs.
POD_CIDR_ENV = "VLLM_OPERATOR_CLUSTER_POD_CIDR"
DEFAULT_PORT_BASE = 16400
SERVICE_CIDR = "10.96.0.0/16"
SERVICE_IP = "10.96.0.1"
ISSUER = "https://kubernetes.default.svc.cluster.local"
LOCAL_NODE = "local-0"
LOCALRUNTIME_MODULE = Path(__file__).resolve().parent / "localruntime" / "__main__.py"
CONTEXT = "vllm-operator-local"

ADMIN = Identity("vllm-operator-admin", ("system:masters",))
# The bootstrap RBAC roles are bound to these exact user names.
CONTROLLER_MANAGER = Identity("system:kube-controller-manager")
SCHEDULER = Identity("system:kube-scheduler")
# kwok and the agent play kubelets for many nodes and provision volumes: no bootstrap role fits.
KWOK = Identity("vllm-operator:kwok", ("system:masters",))
LOCALRUNTIME = Identity("vllm-operator:localruntime", ("system:masters",))
# The LeaderWorkerSet controller; upstream's ClusterRole would do, but the cluster installs no RBAC of its own.
LWS = Identity("vllm-operator:lws", ("system:masters",))
APISERVER_KUBELET_CLIENT = Identity("kube-apiserver-kubelet-client")
# The operator and the gateway the tests and benchmarks start run as users of their own, so that the audit log
# tells their calls from the tests' (devcluster.audit); as masters, their RBAC is the tests' to judge.
OPERATOR = Identity("vllm-operator:operator", ("system:masters",))
GATEWAY = Identity("vllm-operator:gateway", ("system:masters",))
FRONT_PROXY_CLIENT = "front-proxy-client"

Out = Callable[[str], None]


class ClusterError(RuntimeError):
    """One line that says what failed and what to do about it."""


def default_state_dir() -> Path:
    return Path(os.environ.get(STATE_DIR_ENV, REPO_ROOT / ".local-cluster")).resolve()


@dataclass(frozen=True)
class Ports:
    """Every listening port, as fixed offsets from one base; the offsets echo the usual numbers."""

    base: int = DEFAULT_PORT_BASE

    def __post_init__(self) -> None:
        if not 1024 <= self.base <= 65400:
            raise ClusterError(f"port base {self.base} is out of range; choose one between 1024 and 65400")

    @classmethod
    def from_env(cls) -> Ports:
        raw = os.environ.get(PORT_BASE_ENV, str(DEFAULT_PORT_BASE))
        try:
            return cls(int(raw))
        except ValueError:
            raise ClusterError(f"{PORT_BASE_ENV}={raw!r} is not a number") from None

    @property
    def apiserver(self) -> int:
        return self.base + 43

    @property
    def etcd_client(self) -> int:
        return self.base + 79

    @property
    def etcd_peer(self) -> int:
        return self.base + 80

    @property
    def controller_manager(self) -> int:
        return self.base + 57

    @property
    def scheduler(self) -> int:
        return self.base + 59

    @property
    def kubelet(self) -> int:
        """The local runtime's log endpoint (a kubelet's 10250)."""
        return self.base + 50

    @property
    def simengines_admin(self) -> int:
        return self.base + 90

    @property
    def lws_webhook(self) -> int:
        """The LeaderWorkerSet controller's webhooks (its 9443)."""
        return self.base + 94

    @property
    def lws_metrics(self) -> int:
        return self.base + 84

    @property
    def lws_health(self) -> int:
        return self.base + 81

    def named(self) -> dict[str, int]:
        return {"etcd client": self.etcd_client, "etcd peer": self.etcd_peer, "kube-apiserver": self.apiserver,
                "kube-controller-manager": self.controller_manager, "kube-scheduler": self.scheduler,
                "local runtime logs": self.kubelet, "simulated engines admin": self.simengines_admin,
                "lws webhooks": self.lws_webhook, "lws metrics": self.lws_metrics, "lws health": self.lws_health}


def client_kubeconfig(kubeconfig: Path, client: str) -> Path:
    """The kubeconfig of ``client`` ("operator" or "gateway") on the local cluster whose admin kubeconfig this is;
    the admin one itself on a cluster that has none (another cluster, or one started by an older version)."""
    own = kubeconfig.parent / "config" / f"{client}.kubeconfig"
    return own if own.is_file() else kubeconfig


def check_ports_free(ports: Ports) -> None:
    for role, port in ports.named().items():
        with socket.socket() as sock:
            # Like the Go servers, ignore TIME_WAIT leftovers of a previous run: only a listener clashes.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                raise ClusterError(
                    f"port 127.0.0.1:{port} ({role}) is already in use: stop what listens there "
                    f"(`ss -ltnp 'sport = :{port}'`) or choose other ports with {PORT_BASE_ENV}=<base> "
                    f"(now {ports.base}; ports base+43..base+94 are used)") from None


# --- processes -----------------------------------------------------------------------------------


def _proc_stat(pid: int) -> tuple[str, int, str] | None:
    """(state, process group, start time) of a process, None when it does not exist."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    return fields[0], int(fields[2]), fields[19]


def _reap(pid: int) -> None:
    # Processes this interpreter started (pytest sessions) stay zombies until waited for.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def process_running(pid: int) -> bool:
    """Alive and not a zombie (a zombie has exited; only its parent has not collected it)."""
    stat = _proc_stat(pid)
    return stat is not None and stat[0] != "Z"


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group."""
    members = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            stat = _proc_stat(int(entry.name))
            if stat is not None and stat[1] == pgid and stat[0] != "Z":
                members.append(int(entry.name))
    return members


@dataclass(frozen=True)
class Process:
    """One managed process: its log, and a pid file that also records the start time so a
    recycled pid is never mistaken for it."""

    name: str
    state_dir: Path
    stop_grace: float = 10.0

    @property
    def log(self) -> Path:
        return self.state_dir / "logs" / f"{self.name}.log"

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "run" / f"{self.name}.pid"

    def pid(self) -> int | None:
        """The pid when the recorded process is alive."""
        try:
            pid_text, started = self.pid_file.read_text().split()
            pid = int(pid_text)
        except (OSError, ValueError):
            return None
        _reap(pid)
        stat = _proc_stat(pid)
        return pid if stat is not None and stat[0] != "Z" and stat[2] == started else None

    def start(self, command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(command)}\n".encode())
            log.flush()
            # A session of its own: survives the `up` command and is stopped as one group.
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True, cwd=REPO_ROOT, env=env)
        stat = _proc_stat(process.pid)
        self.pid_file.write_text(f"{process.pid} {stat[2] if stat else '0'}\n")
        return process

    def stop(self) -> int | None:
        """SIGTERM to the process group, SIGKILL after the grace period; returns the pid stopped."""
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return None
        for sig, wait in ((signal.SIGTERM, self.stop_grace), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                _reap(pid)
                if not group_members(pid):
                    self.pid_file.unlink(missing_ok=True)
                    return pid
                time.sleep(0.1)
        raise ClusterError(f"{self.name} (process group {pid}) survived SIGKILL; see {self.log}")

    def last_line(self, limit: int = 300) -> str:
        try:
            lines = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return lines[-1].strip()[:limit] if lines else ""


# --- health --------------------------------------------------------------------------------------


def _get(url: str, context: ssl.SSLContext | None = None, timeout: float = 2.0) -> int | None:
    """HTTP status of a GET, None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return None


def pod_ranges(cidr: str) -> tuple[str, str]:
    """kwok's Pod IPs (the first half of ``cidr``) and the local-runtime node's (its last /24)."""
    try:
        network = ipaddress.ip_network(cidr)
    except ValueError as exc:
        raise ClusterError(f"{POD_CIDR_ENV}={cidr}: {exc}") from None
    if not network.is_loopback or network.prefixlen > 22:
        raise ClusterError(f"{POD_CIDR_ENV}={cidr} must be a /22 or larger inside 127.0.0.0/8: "
                           "every Pod IP is served on loopback")
    first_half, second_half = network.subnets(prefixlen_diff=1)
    return str(first_half), str(list(second_half.subnets(new_prefix=24))[-1])


def _hack_env() -> dict[str, str]:
    """The environment of this repo's helper processes: unbuffered, with ``hack/`` importable."""
    path = os.pathsep.join(filter(None, [str(REPO_ROOT / "hack"), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}


def _client_context(ca: Path, pair: KeyPair) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(str(pair.cert), str(pair.key))
    return context


def _healthz(port: int) -> Callable[[], bool]:
    # The controller manager and scheduler serve health on loopback with a throwaway certificate.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return lambda: _get(f"https://127.0.0.1:{port}/healthz", context) == 200


# --- the cluster ---------------------------------------------------------------------------------


@dataclass
class LocalCluster:
    state_dir: Path = field(default_factory=default_state_dir)
    ports: Ports = field(default_factory=Ports.from_env)
    pod_cidr: str = field(default_factory=lambda: os.environ.get(POD_CIDR_ENV, nodes.POD_CIDR))

    def __post_init__(self) -> None:
        self.state_dir = self.state_dir.resolve()

    # layout

    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    @property
    def certs(self) -> Path:
        return self.state_dir / "certs"

    @property
    def _settings(self) -> Path:
        return self.state_dir / "cluster.json"

    def processes(self) -> list[Process]:
        """In start order; the agent only when its module exists."""
        names = ["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok", "simengines"]
        found = [Process(name, self.state_dir) for name in names]
        if LOCALRUNTIME_MODULE.is_file():
            # The agent stops its pods within their grace periods (at most 30 s) before it exits.
            found.append(Process("localruntime", self.state_dir, stop_grace=45.0))
        found.append(Process("lws", self.state_dir))
        return found

    def _process(self, name: str) -> Process:
        return next(p for p in self.processes() if p.name == name)

    def _running_ports(self) -> Ports:
        try:
            return Ports(int(json.loads(self._settings.read_text())["port_base"]))
        except (OSError, ValueError, KeyError):
            return self.ports

    # health

    def apiserver_ready(self, ports: Ports | None = None) -> bool:
        ports = ports or self.ports
        admin = KeyPair(self.certs / "admin.crt", self.certs / "admin.key")
        if not admin.exists():
            return False
        context = _client_context(self.certs / "ca.crt", admin)
        return _get(f"https://127.0.0.1:{ports.apiserver}/readyz", context) == 200

    def is_running(self) -> bool:
        """Every process alive and the API server ready."""
        return all(p.pid() is not None for p in self.processes()) and self.apiserver_ready(self._running_ports())

    def api_client(self) -> client.ApiClient:
        return config.new_client_from_config(config_file=str(self.kubeconfig))

    # commands

    @contextlib.contextmanager
    def _exclusive(self, out: Out, timeout: float = 900.0) -> Iterator[None]:
        """Serialise `up` and `down` across processes (parallel test sessions share one folder)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        lock = self.state_dir / "lock"
        with lock.open("a") as handle:
            deadline = time.monotonic() + timeout
            for attempt in itertools.count():
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise ClusterError(f"another `up` or `down` still holds {lock} after {timeout:.0f}s; "
                                           f"find it with `fuser {lock}`") from None
                    if attempt == 0:
                        out("waiting for another `up` or `down` of this cluster to finish")
                    time.sleep(0.5)
            yield

    def up(self, out: Out = print) -> bool:
        """Start the cluster unless it runs; True when this call started it."""
        started = time.monotonic()
        with self._exclusive(out):
            return self._up(started, out)

    def down(self, out: Out = print) -> None:
        with self._exclusive(out):
            self._stop_all(out)

    def _up(self, started: float, out: Out) -> bool:
        if self.is_running():
            pids = ", ".join(f"{p.name} {p.pid()}" for p in self.processes())
            out(f"local cluster already running ({pids})")
            # Nodes declared since it started are added now; the running kwok takes over any node it finds.
            with self.api_client() as api:
                nodes.ensure_nodes(api)
            return False
        if any(p.pid() is not None for p in self.processes()):
            out("local cluster partly running: restarting it")
            self._stop_all(out)
        check_ports_free(self.ports)
        try:
            binaries.ensure((binaries.ETCD, binaries.KUBERNETES, binaries.KWOK, binaries.LWS))
        except binaries.BuildError as exc:
            raise ClusterError(str(exc)) from exc
        try:
            self._start(started, out)
        except BaseException:
            self._stop_all(lambda _line: None)
            raise
        return True

    def _stop_all(self, out: Out) -> None:
        stopped = False
        for process in reversed(self.processes()):
            pid = process.stop()
            if pid is not None:
                out(f"stopped {process.name} (pid {pid})")
                stopped = True
        if not stopped:
            out("local cluster not running")

    def status(self, out: Out = print) -> bool:
        ports = self._running_ports()
        for process in self.processes():
            pid = process.pid()
            out(f"{process.name:<24} {f'running (pid {pid})' if pid else 'stopped'}  log: {process.log}")
        ready = self.apiserver_ready(ports)
        out(f"kube-apiserver https://127.0.0.1:{ports.apiserver} {'Ready' if ready else 'not ready'}")
        return ready and self.is_running()

    # start-up

    def _pki(self) -> dict[str, KeyPair]:
        ca = Authority(self.certs)
        # A CA of its own: a certificate from it lets the holder assert any user via headers.
        front_proxy = Authority(self.certs / "front-proxy")
        api_names = ("127.0.0.1", "localhost", SERVICE_IP, "kubernetes", "kubernetes.default",
                     "kubernetes.default.svc", "kubernetes.default.svc.cluster.local")
        return {
            "ca": ca.pair,
            "sa": service_account_key(self.certs),
            "apiserver": ca.server("apiserver", "kube-apiserver", api_names),
            # etcd's gRPC gateway dials etcd itself with this certificate, so it is a client one too.
            "etcd": ca.server("etcd", "etcd", ("127.0.0.1", "localhost"), client=True),
            "apiserver-etcd-client": ca.client("apiserver-etcd-client", Identity("kube-apiserver-etcd-client")),
            "admin": ca.client("admin", ADMIN),
            "kube-controller-manager": ca.client("kube-controller-manager", CONTROLLER_MANAGER),
            "kube-scheduler": ca.client("kube-scheduler", SCHEDULER),
            "kwok": ca.client("kwok", KWOK),
            "localruntime": ca.client("localruntime", LOCALRUNTIME),
            "lws": ca.client("lws", LWS),
            # The API server calls the LWS webhooks by URL on loopback.
            "lws-webhook": ca.server("lws-webhook", "lws-webhook", ("127.0.0.1",)),
            "operator": ca.client("operator", OPERATOR),
            "gateway": ca.client("gateway", GATEWAY),
            "kubelet": ca.server("kubelet", LOCAL_NODE, ("127.0.0.1", LOCAL_NODE)),
            "apiserver-kubelet-client": ca.client("apiserver-kubelet-client", APISERVER_KUBELET_CLIENT),
            "front-proxy-ca": front_proxy.pair,
            "front-proxy-client": front_proxy.client("client", Identity(FRONT_PROXY_CLIENT)),
        }

    def _write_kubeconfig(self, path: Path, user: str, pair: KeyPair) -> None:
        def data(file: Path) -> str:
            return base64.b64encode(file.read_bytes()).decode()

        document = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": CONTEXT, "cluster": {
                "server": f"https://127.0.0.1:{self.ports.apiserver}",
                "certificate-authority-data": data(self.certs / "ca.crt")}}],
            "users": [{"name": user, "user": {"client-certificate-data": data(pair.cert),
                                              "client-key-data": data(pair.key)}}],
            "contexts": [{"name": CONTEXT, "context": {"cluster": CONTEXT, "user": user, "namespace": "default"}}],
            "current-context": CONTEXT,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(document, sort_keys=False))
        path.chmod(0o600)

    def _wait(self, process: Process, popen: subprocess.Popen[bytes], what: str, check: Callable[[], bool],
              timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if popen.poll() is not None:
                raise ClusterError(f"{process.name} exited with code {popen.returncode} while starting; "
                                   f"see {process.log}: {process.last_line()}")
            if time.monotonic() > deadline:
                raise ClusterError(f"{process.name}: {what} not reached within {timeout:.0f}s; see {process.log}")
            time.sleep(0.2)

    def _start(self, started: float, out: Out) -> None:
        ports = self.ports
        kwok_pods, local_pods = pod_ranges(self.pod_cidr)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        pki = self._pki()
        configs = self.state_dir / "config"
        self._settings.write_text(json.dumps({"port_base": ports.base}) + "\n")
        identities = {"kube-controller-manager": CONTROLLER_MANAGER, "kube-scheduler": SCHEDULER,
                      "kwok": KWOK, "localruntime": LOCALRUNTIME, "lws": LWS, "operator": OPERATOR,
                      "gateway": GATEWAY}
        for name, identity in identities.items():
            self._write_kubeconfig(configs / f"{name}.kubeconfig", identity.user, pki[name])
        self._write_kubeconfig(self.kubeconfig, ADMIN.user, pki["admin"])
        stages = configs / "kwok-stages.yaml"
        stages.write_text(nodes.kwok_stages())
        audit_policy = configs / "audit-policy.yaml"
        audit_policy.write_text(audit.policy([CONTROLLER_MANAGER.user, SCHEDULER.user, KWOK.user, LOCALRUNTIME.user,
                                              LWS.user, "system:apiserver"]))
        lws_certs = self.state_dir / "lws" / "serving-certs"
        lws.write_serving_cert(lws_certs, pki["lws-webhook"].cert, pki["lws-webhook"].key)
        lws_config = configs / "lws.yaml"
        lws_config.write_text(lws.configuration(ports.lws_webhook, ports.lws_metrics, ports.lws_health, lws_certs))

        def step(name: str, what: str) -> None:
            out(f"{time.monotonic() - started:6.1f}s  {name:<24} {what}")

        def binary(name: str) -> str:
            return str(binaries.path_of(name))

        etcd = self._process("etcd")
        etcd_url = f"https://127.0.0.1:{ports.etcd_client}"
        peer_url = f"http://127.0.0.1:{ports.etcd_peer}"
        popen = etcd.start([
            binary("etcd"), "--name=local", f"--data-dir={self.state_dir / 'etcd'}",
            f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=local={peer_url}",
            f"--cert-file={pki['etcd'].cert}", f"--key-file={pki['etcd'].key}",
            f"--trusted-ca-file={pki['ca'].cert}", "--client-cert-auth",
            # A disposable store: fsync would dominate start-up and writes on a shared disk.
            "--unsafe-no-fsync",
        ])
        etcd_context = _client_context(pki["ca"].cert, pki["apiserver-etcd-client"])
        self._wait(etcd, popen, f"{etcd_url}/health", lambda: _get(f"{etcd_url}/health", etcd_context) == 200, 30)
        step("etcd", f"ready on {etcd_url}")

        apiserver = self._process("kube-apiserver")
        popen = apiserver.start([
            binary("kube-apiserver"),
            "--bind-address=127.0.0.1", f"--secure-port={ports.apiserver}", "--advertise-address=127.0.0.1",
            # Endpoints may not hold loopback addresses; nothing in this cluster dials the Service.
            "--endpoint-reconciler-type=none",
            f"--cert-dir={self.state_dir / 'apiserver'}",
            f"--etcd-servers={etcd_url}", f"--etcd-cafile={pki['ca'].cert}",
            f"--etcd-certfile={pki['apiserver-etcd-client'].cert}",
            f"--etcd-keyfile={pki['apiserver-etcd-client'].key}",
            f"--tls-cert-file={pki['apiserver'].cert}", f"--tls-private-key-file={pki['apiserver'].key}",
            f"--client-ca-file={pki['ca'].cert}",
            *audit.flags(self.state_dir, audit_policy),
            # Logs come from the node's InternalIP, as in clusters whose node names DNS does not resolve.
            "--kubelet-preferred-address-types=InternalIP",
            f"--kubelet-certificate-authority={pki['ca'].cert}",
            f"--kubelet-client-certificate={pki['apiserver-kubelet-client'].cert}",
            f"--kubelet-client-key={pki['apiserver-kubelet-client'].key}",
            "--authorization-mode=Node,RBAC",
            f"--service-account-issuer={ISSUER}",
            f"--service-account-key-file={pki['sa'].cert}",
            f"--service-account-signing-key-file={pki['sa'].key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--allow-privileged=true",
            # The aggregation layer; the controller manager and scheduler also read this CA to
            # authenticate requests to their own endpoints.
            f"--requestheader-client-ca-file={pki['front-proxy-ca'].cert}",
            f"--requestheader-allowed-names={FRONT_PROXY_CLIENT}",
            "--requestheader-username-headers=X-Remote-User", "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={pki['front-proxy-client'].cert}",
            f"--proxy-client-key-file={pki['front-proxy-client'].key}",
        ])
        self._wait(apiserver, popen, "/readyz", lambda: self.apiserver_ready(ports), 60)
        apiserver_popen = popen
        ready = time.monotonic() - started
        step("kube-apiserver", f"Ready (/readyz) on https://127.0.0.1:{ports.apiserver}")

        def kube_component(name: str, port: int, *extra: str) -> subprocess.Popen[bytes]:
            kubeconfig = configs / f"{name}.kubeconfig"
            return self._process(name).start([
                binary(name), f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}", f"--authorization-kubeconfig={kubeconfig}",
                "--bind-address=127.0.0.1", f"--secure-port={port}",
                # One instance only: leader election would wait out the previous run's lease.
                "--leader-elect=false", *extra,
            ])

        waiting: list[tuple[str, subprocess.Popen[bytes], str, Callable[[], bool], float]] = []
        for name, port, extra in (
            ("kube-controller-manager", ports.controller_manager, (
                # Endpoints may not hold the loopback Pod IPs: those controllers would only retry, and
                # fill the apiserver's CPU and the Events with their failures.
                "--controllers=*,-endpoints-controller,-endpointslice-controller,-endpointslice-mirroring-controller",
                "--use-service-account-credentials=true",
                # The default 20 requests/s makes creating or deleting a thousand Deployments take minutes.
                "--kube-api-qps=200", "--kube-api-burst=400",
                f"--service-account-private-key-file={pki['sa'].key}", f"--root-ca-file={pki['ca'].cert}",
                f"--cluster-signing-cert-file={pki['ca'].cert}", f"--cluster-signing-key-file={pki['ca'].key}")),
            ("kube-scheduler", ports.scheduler, ()),
        ):
            waiting.append((name, kube_component(name, port, *extra), f"https://127.0.0.1:{port}/healthz",
                            _healthz(port), 30))

        with self.api_client() as api:
            # The controller needs its CRD served before it starts: installed now, it is by the time kwok is up.
            lws.install(api, ports.lws_webhook, pki["ca"].cert.read_bytes())
            nodes.release_leases(api)
            # Nodes persisted from an earlier run look Ready already: wait for Leases the new kwok renewed.
            kwok_started = datetime.now(UTC) - timedelta(seconds=1)
            kwok = self._process("kwok").start(
                [binary("kwok"), f"--kubeconfig={configs / 'kwok.kubeconfig'}", f"--config={stages}",
                 "--manage-all-nodes=false",
                 f"--manage-nodes-with-annotation-selector={nodes.KWOK_ANNOTATION}=fake",
                 f"--cidr={kwok_pods}", "--node-lease-duration-seconds=40", "--v=WARN"],
                # kwok otherwise also reads ~/.kwok/kwok.yaml.
                env={**os.environ, "KWOK_WORKDIR": str(self.state_dir / "kwok")})
            simulated = [node.name for node in nodes.NODES]
            waiting.append(("kwok", kwok, f"nodes {', '.join(simulated)} Ready",
                            lambda: self._nodes_ready(api, simulated, kwok_started), 30))
            simengines = self._process("simengines").start(
                [sys.executable, "-m", "devcluster.simengines", f"--kubeconfig={configs / 'kwok.kubeconfig'}",
                 f"--cidr={kwok_pods}", f"--admin-port={ports.simengines_admin}"],
                env=_hack_env())
            waiting.append(("simengines", simengines, f"admin endpoint on port {ports.simengines_admin}",
                            lambda: _get(f"http://127.0.0.1:{ports.simengines_admin}/engines") == 200, 30))
            if LOCALRUNTIME_MODULE.is_file():
                agent = self._process("localruntime").start(
                    [sys.executable, "-m", "devcluster.localruntime",
                     f"--kubeconfig={configs / 'localruntime.kubeconfig'}",
                     f"--state-dir={self.state_dir / 'localruntime'}", f"--node={LOCAL_NODE}",
                     f"--pod-subnet={local_pods}", f"--kubelet-port={ports.kubelet}",
                     f"--kubelet-cert={pki['kubelet'].cert}", f"--kubelet-key={pki['kubelet'].key}",
                     f"--client-ca={pki['ca'].cert}"],
                    env=_hack_env())
                waiting.append(("localruntime", agent, f"node {LOCAL_NODE} Ready",
                                lambda: self._nodes_ready(api, [LOCAL_NODE]), 60))

            nodes.ensure_nodes(api)
            nodes.ensure_storage_class(api)
            step("nodes", f"{', '.join(simulated)} and StorageClass {nodes.STORAGE_CLASS} applied")
            self._wait(apiserver, apiserver_popen, f"CRD {lws.CRD_NAME} Established",
                       lambda: crds.established(api, lws.CRD_NAME), 30)
            controller = self._process("lws").start(
                [binary("lws-controller"), f"--kubeconfig={configs / 'lws.kubeconfig'}", f"--config={lws_config}",
                 # Its development logger defaults to debug: a line per reconcile and admission.
                 "--zap-log-level=info"],
                # Webhooks on, whatever the calling shell sets (the binary reads ENABLE_WEBHOOKS).
                env={**os.environ, "ENABLE_WEBHOOKS": "true"})
            waiting.append(("lws", controller, f"webhooks on https://127.0.0.1:{ports.lws_webhook} admit",
                            lambda: lws.admits(api), 60))
            for name, popen, what, check, timeout in waiting:
                self._wait(self._process(name), popen, what, check, timeout)
                step(name, f"ready ({what})")
        out(f"local cluster up: API server Ready in {ready:.1f}s, everything in {time.monotonic() - started:.1f}s "
            f"(logs: {self.state_dir / 'logs'})")

    @staticmethod
    def _nodes_ready(api: client.ApiClient, names: list[str], leases_since: datetime | None = None) -> bool:
        try:
            if leases_since is not None and not set(names) <= nodes.renewed_leases(api, leases_since):
                return False
            return nodes.schedulable_nodes(api, names) == set(names)
        except Exception:  # noqa: BLE001 - a transient API error just means "not yet"
            return False
