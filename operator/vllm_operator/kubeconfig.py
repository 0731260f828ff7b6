"""Where the apiserver is and who the operator is to it: kubeconfig files, in-cluster service accounts,
client-go exec credential plugins; and the two Kubernetes wire formats the operator reads (quantities,
RFC 3339 times).

Why our own and not the ``kubernetes`` package's loaders and ``parse_quantity``: importing that package
imports all of its generated API models. Measured (Python 3.11, kubernetes 37.0.2, kopf 1.45.2; median VmRSS):

    with kubernetes   without   what
    72.5 MiB          63.3 MiB  a fresh interpreter after importing cli, handlers, kube and reconcile.drift
    81.8 MiB          72.4 MiB  the operator, logged in and watching an empty namespace, 10 s after start

About 9.4 MiB that stay for the process's life, whatever the fleet. kopf imports ``kubernetes`` itself
whenever it is installed, so the package is no runtime dependency at all; tests and hack/devcluster use it.

Supported, as client-go reads them: the current or a named context of ``$KUBECONFIG`` (a list of files,
merged as kubectl does: the first file to name a context, cluster or user wins) or ``~/.kube/config``;
a cluster's server, certificate-authority(-data) and insecure-skip-tls-verify; a user's
client-certificate(-data) and client-key(-data), token, tokenFile and exec plugin
(client.authentication.k8s.io/v1 and v1beta1, never interactive). Relative paths are relative to the
file that names them. Auth-provider plugins and username/password raise ConfigError.
"""

from __future__ import annotations

import base64
import json
import os
import re
import ssl
import subprocess
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import Decimal, DecimalException
from pathlib import Path
from typing import Any

import yaml

# Where the kubelet mounts a Pod's service account token (rotated in place), CA and namespace.
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
EXEC_API_VERSIONS = ("client.authentication.k8s.io/v1", "client.authentication.k8s.io/v1beta1")


class ConfigError(Exception):
    """No usable credentials: ``str()`` says what is missing or unsupported, and where."""


class Token:
    """A bearer token: a fixed one, or a file read again whenever it changes.

    The kubelet replaces a projected service account token before it expires (an atomic symlink swap),
    so a stat per request is enough to send the new one at once.
    """

    def __init__(self, value: str | None = None, path: str | None = None) -> None:
        self._path = path
        self._stamp: tuple[int, int, int] | None = None
        self._value = value if path is None else self._read()

    def _read(self) -> str:
        assert self._path is not None
        stat = os.stat(self._path)
        value = Path(self._path).read_text().strip()
        if not value:
            raise ConfigError(f"the token file {self._path} is empty")
        self._stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        return value

    def value(self) -> str | None:
        if self._path is not None:
            try:
                stat = os.stat(self._path)
                if (stat.st_ino, stat.st_mtime_ns, stat.st_size) != self._stamp:
                    self._value = self._read()
            except (OSError, ConfigError):
                pass  # in the middle of a swap: the token read last is still valid
        return self._value


@dataclass(frozen=True)
class Access:
    """One apiserver and the credentials to present to it. Certificates and keys are PEM, as files or data."""

    server: str
    ca_file: str | None = None
    ca_data: str | None = None
    insecure: bool = False
    cert_file: str | None = None
    cert_data: str | None = None
    key_file: str | None = None
    key_data: str | None = None
    token: Token | None = field(default=None, compare=False)
    expires: datetime | None = None  # when an exec plugin's credentials expire; None: never said
    namespace: str | None = None  # the context's (or the Pod's) namespace

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca_file, cadata=self.ca_data)
        if self.insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if self.cert_file or self.cert_data:
            with ExitStack() as stack:
                certfile = _pem_file(stack, self.cert_file, self.cert_data)
                assert certfile is not None
                context.load_cert_chain(certfile, _pem_file(stack, self.key_file, self.key_data))
        return context


def _pem_file(stack: ExitStack, file: str | None, data: str | None) -> str | None:
    """``file``, or ``data`` in a private temporary file that ``stack`` removes: ssl loads key pairs from files only."""
    if file or not data:
        return file
    temporary = stack.enter_context(tempfile.NamedTemporaryFile("w", suffix=".pem"))
    temporary.write(data)
    temporary.flush()
    return temporary.name


def load(kubeconfig: str | None = None) -> Access:
    """controller-runtime's order: the kubeconfig named, in-cluster config, ``$KUBECONFIG``, ``~/.kube/config``."""
    if kubeconfig is None:
        access = in_cluster()
        if access is not None:
            return access
    return from_kubeconfig(kubeconfig)


def in_cluster() -> Access | None:
    """The Pod's service account; None outside a Pod."""
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        return None
    if ":" in host:  # IPv6
        host = f"[{host}]"
    try:
        token = Token(path=str(SERVICE_ACCOUNT_DIR / "token"))
        namespace = (SERVICE_ACCOUNT_DIR / "namespace").read_text().strip() if \
            (SERVICE_ACCOUNT_DIR / "namespace").exists() else None
    except OSError as exc:
        raise ConfigError(f"in-cluster config: {exc}") from exc
    ca_file = SERVICE_ACCOUNT_DIR / "ca.crt"
    if not ca_file.exists():
        raise ConfigError(f"in-cluster config: {ca_file} is missing")
    return Access(f"https://{host}:{port}", ca_file=str(ca_file), token=token, namespace=namespace)


@dataclass(frozen=True)
class _Entry:
    body: dict[str, Any]
    base: Path  # the directory of the file that named it: relative paths start there

    def path(self, key: str) -> str | None:
        value = self.body.get(key)
        return str(self.base / os.path.expanduser(value)) if value else None

    def pem(self, key: str) -> str | None:
        value = self.body.get(key)
        return base64.b64decode(value).decode() if value else None


def _files(kubeconfig: str | None) -> list[Path]:
    listed = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
    paths = [Path(os.path.expanduser(p)) for p in listed.split(os.pathsep) if p]
    existing = [p for p in paths if p.exists()]  # kubectl skips the missing files of a list
    if not existing:
        raise ConfigError(f"no kubeconfig at {listed}")
    return existing


def from_kubeconfig(kubeconfig: str | None = None, context: str | None = None) -> Access:
    """The credentials of ``context`` (default: the current one) in ``kubeconfig`` (default: ``$KUBECONFIG``)."""
    current: str | None = None
    named: dict[str, dict[str, _Entry]] = {"contexts": {}, "clusters": {}, "users": {}}
    for path in _files(kubeconfig):
        document = yaml.safe_load(path.read_text()) or {}
        current = current or document.get("current-context")
        for kind, entries in named.items():
            for item in document.get(kind) or []:
                entries.setdefault(item["name"], _Entry(item.get(kind[:-1]) or {}, path.parent))
    source, name = kubeconfig or "$KUBECONFIG", context or current
    if not name:
        raise ConfigError(f"{source}: no current-context, and none was named")
    if name not in named["contexts"]:
        raise ConfigError(f"{source}: no context {name!r}")
    chosen = named["contexts"][name].body
    cluster = named["clusters"].get(chosen.get("cluster", ""))
    if cluster is None:
        raise ConfigError(f"{source}: context {name!r} names the cluster {chosen.get('cluster')!r}, which is not there")
    user = named["users"].get(chosen.get("user", ""), _Entry({}, cluster.base))
    for unsupported in ("auth-provider", "username", "password"):
        if user.body.get(unsupported):
            raise ConfigError(f"context {name!r}: the user's {unsupported} is not supported; "
                              "use a token, a client certificate or an exec plugin")
    server = cluster.body.get("server")
    if not server:
        raise ConfigError(f"context {name!r}: the cluster names no server")
    access = Access(
        server=server,
        ca_file=cluster.path("certificate-authority"),
        ca_data=cluster.pem("certificate-authority-data"),
        insecure=bool(cluster.body.get("insecure-skip-tls-verify")),
        cert_file=user.path("client-certificate"),
        cert_data=user.pem("client-certificate-data"),
        key_file=user.path("client-key"),
        key_data=user.pem("client-key-data"),
        namespace=chosen.get("namespace"),
    )
    # client-go's precedence: a token beats a token file; either beats an exec plugin.
    if user.body.get("token"):
        return _with_token(access, Token(user.body["token"]))
    if user.body.get("tokenFile"):
        return _with_token(access, Token(path=user.path("tokenFile")))
    if user.body.get("exec"):
        return _exec(access, user, cluster)
    return access


def _with_token(access: Access, token: Token | None, expires: datetime | None = None) -> Access:
    return replace(access, token=token, expires=expires)


def _exec(access: Access, user: _Entry, cluster: _Entry) -> Access:
    """Run the user's exec plugin (non-interactively: the operator has no terminal) for its credentials."""
    spec = user.body["exec"]
    version = spec.get("apiVersion")
    if version not in EXEC_API_VERSIONS:
        raise ConfigError(f"exec plugin apiVersion {version!r} is not one of {', '.join(EXEC_API_VERSIONS)}")
    if spec.get("interactiveMode") == "Always":
        raise ConfigError(f"the exec plugin {spec['command']} needs a terminal (interactiveMode Always)")
    command = spec["command"]
    if os.sep in command:  # a path, not a name to look up in $PATH: relative to its kubeconfig
        command = str(user.base / command)
    info: dict[str, Any] = {"apiVersion": version, "kind": "ExecCredential", "spec": {"interactive": False}}
    if spec.get("provideClusterInfo"):
        info["spec"]["cluster"] = {key: cluster.body[key] for key in
                                   ("server", "certificate-authority-data", "insecure-skip-tls-verify")
                                   if key in cluster.body}
    env = {**os.environ, **{e["name"]: e["value"] for e in spec.get("env") or []},
           "KUBERNETES_EXEC_INFO": json.dumps(info)}
    try:
        done = subprocess.run([command, *(spec.get("args") or [])], env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, check=False)
    except OSError as exc:
        raise ConfigError(f"the exec plugin {command} did not run: {exc}. {spec.get('installHint', '')}") from exc
    if done.returncode != 0:
        raise ConfigError(f"the exec plugin {command} failed ({done.returncode}): {done.stderr.strip()}")
    try:
        credential = json.loads(done.stdout)
    except ValueError as exc:
        raise ConfigError(f"the exec plugin {command} wrote no JSON: {exc}") from exc
    if credential.get("kind") != "ExecCredential" or credential.get("apiVersion") != version:
        raise ConfigError(f"the exec plugin {command} answered {credential.get('apiVersion')} "
                          f"{credential.get('kind')}, not {version} ExecCredential")
    status = credential.get("status") or {}
    try:
        expires = parse_rfc3339(status["expirationTimestamp"]) if status.get("expirationTimestamp") else None
    except ValueError as exc:
        raise ConfigError(f"the exec plugin {command} answered an expirationTimestamp that is no time: {exc}") from exc
    if status.get("clientCertificateData") and status.get("clientKeyData"):
        access = replace(access, cert_file=None, key_file=None, cert_data=status["clientCertificateData"],
                         key_data=status["clientKeyData"])
    elif not status.get("token"):
        raise ConfigError(f"the exec plugin {command} answered neither a token nor a client certificate")
    return _with_token(access, Token(status.get("token")) if status.get("token") else None, expires)


def parse_rfc3339(text: str) -> datetime:
    """An RFC 3339 date-time (``2026-12-01T18:30:00Z``, fractions and offsets too), aware of its zone."""
    # RFC 3339 allows a lower-case t and z; fromisoformat reads up to microseconds of longer fractions.
    parsed = datetime.fromisoformat(text.upper())
    if parsed.tzinfo is None:
        raise ValueError(f"{text!r} has no time zone")
    return parsed


_QUANTITY = re.compile(r"(?P<number>[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))"
                       r"(?:(?P<suffix>[KMGTPE]i|[numkMGTPE])|[eE][+-]?[0-9]+)?")
_EXPONENTS = {"n": -3, "u": -2, "m": -1, "k": 1, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5, "E": 6}


def parse_quantity(quantity: str | int | float | Decimal) -> Decimal:
    """A Kubernetes quantity's value ("1Gi" is 1073741824, "100m" is 0.1), as ``kubernetes.utils.parse_quantity``.

    Strings follow apimachinery's grammar (whose exponents are whole, unlike the OpenAPI pattern's);
    ValueError for anything else. The arithmetic is the same
    as the library's (a power of 1000 or 1024 in Decimal's default context), so values are equal.
    """
    if isinstance(quantity, (int, float, Decimal)):
        return Decimal(quantity)
    found = _QUANTITY.fullmatch(quantity)
    if found is None:
        raise ValueError(f"{quantity!r} is not a Kubernetes quantity")
    number, suffix = found["number"], found["suffix"]
    try:
        if suffix is None:  # a decimal exponent, or none: Decimal reads both
            return Decimal(quantity)
        return Decimal(number) * ((1024 if suffix.endswith("i") else 1000) ** Decimal(_EXPONENTS[suffix[0]]))
    except DecimalException as exc:  # an exponent beyond what Decimal holds
        raise ValueError(f"{quantity!r} is out of range") from exc
