"""The operator's apiserver client: credentials from every kind of kubeconfig and in-cluster, kept fresh;
retries the apiserver asks for; a client-side rate limit; Events aggregated as client-go does. A stand-in
apiserver on 127.0.0.1 plays the answers; Event aggregation runs against the local cluster."""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from kubernetes import client

from devcluster.certs import Authority
from devcluster.pytest_plugin import Cluster
from vllm_operator import cli, kubeconfig
from vllm_operator.handlers import RunOptions
from vllm_operator.kube import (
    RETRY_AFTER_CAP, RETRY_ATTEMPTS, TLS_READ_BUFFER, Credentials, EventLog, Kube, KubeError, SecretKeys, TokenBucket,
    limit_tls_read_buffer, retry_delay,
    yaml_safe_json,
)

Answer = Callable[[web.Request, int], Awaitable[web.StreamResponse]]
CHART_VALUES = Path(__file__).resolve().parents[1] / "charts" / "vllm-operator" / "values.yaml"
DEPLOYMENT = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "a", "namespace": "ns"}}


def kubeconfig_file(path: Path, server: str, user: dict[str, Any]) -> str:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": server, "insecure-skip-tls-verify": True}}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
    }))
    return str(path)


def test_a_token_kubeconfig_sends_a_bearer_token(tmp_path: Path) -> None:
    credentials = Credentials.load(kubeconfig_file(tmp_path / "kubeconfig", "https://127.0.0.1:6443",
                                                   {"token": "abc.def"}))
    assert credentials.host == "https://127.0.0.1:6443"
    assert credentials.headers() == {"Authorization": "Bearer abc.def"}
    assert isinstance(credentials.ssl_context, ssl.SSLContext)
    assert credentials.ssl_context.verify_mode == ssl.CERT_NONE


# -- a stand-in apiserver -----------------------------------------------------------------------


class FakeApiserver:
    """Answers the n-th request (from 1) with ``answer(request, n)``; keeps what each request carried."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.seen: list[tuple[float, str | None]] = []  # (monotonic time, Authorization) of each request

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append((time.monotonic(), request.headers.get("Authorization")))
        return await self.answer(request, len(self.seen))

    @property
    def tokens(self) -> list[str | None]:
        return [authorization for _, authorization in self.seen]


@asynccontextmanager
async def apiserver(answer: Answer, ssl_context: Any = None) -> AsyncIterator[tuple[FakeApiserver, str]]:
    fake = FakeApiserver(answer)
    app = web.Application()
    app.router.add_route("*", "/{path:.*}", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    scheme = "https" if ssl_context else "http"
    try:
        yield fake, f"{scheme}://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def status(code: int, reason: str, headers: dict[str, str] | None = None) -> web.Response:
    body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": f"the apiserver says {reason}",
            "reason": reason, "code": code}
    return web.json_response(body, status=code, headers=headers)


async def ok(_: web.Request, __: int) -> web.Response:
    return web.json_response(DEPLOYMENT)


def run(body: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(body())


@asynccontextmanager
async def kube_for(tmp_path: Path, url: str, **options: Any) -> AsyncIterator[Kube]:
    kube = Kube(Credentials.load(kubeconfig_file(tmp_path / "kubeconfig", url, {"token": "t"})), **options)
    try:
        yield kube
    finally:
        await kube.close()


# -- retries the apiserver asks for -------------------------------------------------------------


def test_too_many_requests_is_retried_after_the_seconds_it_names(tmp_path: Path) -> None:
    async def answer(_: web.Request, n: int) -> web.Response:
        return status(429, "TooManyRequests", {"Retry-After": "1"}) if n == 1 else web.json_response(DEPLOYMENT)

    async def body() -> None:
        async with apiserver(answer) as (fake, url), kube_for(tmp_path, url) as kube:
            assert await kube.get("Deployment", "ns", "a") == DEPLOYMENT
            (first, _), (second, _) = fake.seen
            assert second - first >= 0.95  # waited as asked (a lower bound only: never faster)

    run(body)


def test_unavailable_is_retried_only_when_the_apiserver_says_when(tmp_path: Path) -> None:
    async def answer(request: web.Request, n: int) -> web.Response:
        if request.path.endswith("/told") and n == 1:
            return status(503, "ServiceUnavailable", {"Retry-After": "0"})
        if request.path.endswith("/untold"):
            return status(503, "ServiceUnavailable")
        return web.json_response(DEPLOYMENT)

    async def body() -> None:
        async with apiserver(answer) as (fake, url), kube_for(tmp_path, url) as kube:
            assert await kube.get("Deployment", "ns", "told") == DEPLOYMENT
            assert len(fake.seen) == 2
            with pytest.raises(KubeError) as raised:
                await kube.get("Deployment", "ns", "untold")
            assert raised.value.status == 503 and len(fake.seen) == 3

    run(body)


def test_a_lasting_overload_ends_in_the_apiservers_own_error(tmp_path: Path) -> None:
    async def answer(_: web.Request, __: int) -> web.Response:
        return status(429, "TooManyRequests", {"Retry-After": "0"})

    async def body() -> None:
        async with apiserver(answer) as (fake, url), kube_for(tmp_path, url) as kube:
            with pytest.raises(KubeError) as raised:
                await kube.apply(DEPLOYMENT)
            assert (raised.value.status, raised.value.reason) == (429, "TooManyRequests")
            assert str(raised.value) == "the apiserver says TooManyRequests"
            assert len(fake.seen) == RETRY_ATTEMPTS

    run(body)


@pytest.mark.parametrize(("code", "retry_after", "delay"), [
    (429, "2", 2.0),
    (429, None, 1.0),                  # no header (a proxy's 429): a second
    (429, "Wed, 21 Oct 2026 07:28:00 GMT", 1.0),  # an HTTP date: not from an apiserver; a second
    (429, "86400", RETRY_AFTER_CAP),   # never a day
    (429, "-5", 0.0),
    (503, "3", 3.0),
    (503, None, None),                 # a plain outage is not the apiserver asking to come back
    (500, "3", None),
    (409, None, None),
])
def test_retry_delay(code: int, retry_after: str | None, delay: float | None) -> None:
    assert retry_delay(code, retry_after) == delay


# -- client-side rate limit ---------------------------------------------------------------------


def test_the_bucket_lets_a_burst_through_then_paces_at_qps() -> None:
    bucket = TokenBucket(qps=10, burst=3)
    assert [bucket.reserve(100.0) for _ in range(5)] == pytest.approx([0, 0, 0, 0.1, 0.2])
    # Tokens come back at qps, up to the burst and no further.
    assert bucket.reserve(100.5) == pytest.approx(0)
    assert [bucket.reserve(1000.0) for _ in range(4)] == pytest.approx([0, 0, 0, 0.1])


def test_a_waiter_that_gives_up_returns_its_token() -> None:
    bucket = TokenBucket(qps=1, burst=1)
    assert bucket.reserve(0.0) == 0
    assert bucket.reserve(0.0) == pytest.approx(1)
    bucket.cancel()
    assert bucket.reserve(0.0) == pytest.approx(1)


def test_kube_paces_requests_beyond_its_burst(tmp_path: Path) -> None:
    async def body() -> None:
        async with apiserver(ok) as (fake, url), kube_for(tmp_path, url, qps=4, burst=2) as kube:
            await asyncio.gather(*(kube.get("Deployment", "ns", "a") for _ in range(4)))
            times = sorted(t for t, _ in fake.seen)
            # Two at once, then one every 1/4 s: the fourth no sooner than half a second after the first.
            assert times[3] - times[0] >= 0.45

    run(body)


def test_the_limits_default_alike_in_the_cli_the_run_options_and_the_chart() -> None:
    args = cli._parser().parse_args(["run"])
    chart = yaml.safe_load(CHART_VALUES.read_text())["kubeApi"]
    options = RunOptions()
    assert (args.kube_api_qps, args.kube_api_burst) == (options.kube_qps, options.kube_burst) == \
        (chart["qps"], chart["burst"])
    args = cli._parser().parse_args(["run", "--kube-api-qps", "50.5", "--kube-api-burst", "80"])
    assert (args.kube_api_qps, args.kube_api_burst) == (50.5, 80)


# -- credentials that change --------------------------------------------------------------------


EXEC_PLUGIN = """#!/bin/sh
# A client-go exec credential plugin: token-<call number>, valid for $2 seconds; counts its calls in $1.
n=$(( $(cat "$1" 2>/dev/null || echo 0) + 1 ))
echo "$n" > "$1"
expires=$(date -u -d "+$2 seconds" +%Y-%m-%dT%H:%M:%SZ)
printf '{"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential",
 "status": {"token": "token-%s", "expirationTimestamp": "%s"}}' "$n" "$expires"
"""


def exec_kubeconfig(tmp_path: Path, server: str, lifetime: int) -> tuple[str, Path]:
    plugin, calls = tmp_path / "plugin.sh", tmp_path / "calls"
    plugin.write_text(EXEC_PLUGIN)
    plugin.chmod(0o755)
    user = {"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": str(plugin),
                     "args": [str(calls), str(lifetime)], "interactiveMode": "Never"}}
    return kubeconfig_file(tmp_path / "kubeconfig", server, user), calls


def test_an_expired_exec_token_is_replaced_before_the_next_request(tmp_path: Path) -> None:
    async def body() -> None:
        async with apiserver(ok) as (fake, url):
            path, calls = exec_kubeconfig(tmp_path, url, lifetime=3)  # 2 to 3 s: the stamp has whole seconds
            kube = Kube(Credentials.load(path))
            try:
                await kube.get("Deployment", "ns", "a")
                await kube.get("Deployment", "ns", "a")
                # While it is valid, the token is reused: the plugin ran once, at load.
                assert calls.read_text().strip() == "1"
                await asyncio.sleep(3.5)
                await kube.get("Deployment", "ns", "a")
                assert fake.tokens == ["Bearer token-1", "Bearer token-1", "Bearer token-2"]
                assert calls.read_text().strip() == "2"
            finally:
                await kube.close()

    run(body)


def test_unauthorized_reloads_the_credentials_once_and_retries(tmp_path: Path) -> None:
    valid = {"Bearer token-2"}  # token-1 was revoked before its stated expiry

    async def answer(request: web.Request, _: int) -> web.Response:
        return web.json_response(DEPLOYMENT) if request.headers.get("Authorization") in valid else \
            status(401, "Unauthorized")

    async def body() -> None:
        async with apiserver(answer) as (fake, url):
            path, calls = exec_kubeconfig(tmp_path, url, lifetime=3600)
            kube = Kube(Credentials.load(path))
            try:
                assert await kube.get("Deployment", "ns", "a") == DEPLOYMENT
                assert fake.tokens == ["Bearer token-1", "Bearer token-2"]
                assert calls.read_text().strip() == "2"
                # Requests turned away together reload once between them, and each retries once only.
                valid.clear()
                fake.seen.clear()
                results = await asyncio.gather(*(kube.get("Deployment", "ns", "a") for _ in range(3)),
                                               return_exceptions=True)
                assert all(isinstance(r, KubeError) and r.status == 401 for r in results), results
                assert calls.read_text().strip() == "3"
                assert sorted(fake.tokens) == ["Bearer token-2"] * 3 + ["Bearer token-3"] * 3
            finally:
                await kube.close()

    run(body)


def test_a_tls_connection_reads_through_the_smaller_buffer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    authority = Authority(tmp_path / "pki")
    pair = authority.server("apiserver", "kubernetes", ("127.0.0.1",))
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(pair.cert, pair.key)
    monkeypatch.setattr(asyncio.sslproto.SSLProtocol, "max_size", asyncio.sslproto.SSLProtocol.max_size)
    limit_tls_read_buffer()
    big = {"items": ["x" * 1000] * 1000}  # 1 MB: many reads of the buffer

    async def answer(request: web.Request, n: int) -> web.StreamResponse:
        return web.json_response(big)

    async def body() -> None:
        async with apiserver(answer, server_context) as (_, url):
            kube = Kube(Credentials(url, ssl.create_default_context(cafile=str(authority.pair.cert))))
            try:
                assert await kube.request("GET", "/api/v1/pods") == big
                (connection,) = kube._client().connector._conns.values()  # type: ignore[union-attr]
                assert len(connection[0][0].transport._ssl_protocol._ssl_buffer) == TLS_READ_BUFFER
            finally:
                await kube.close()

    run(body)


def test_the_in_cluster_token_rotated_by_the_kubelet_reaches_the_next_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    authority = Authority(tmp_path / "pki")
    pair = authority.server("apiserver", "kubernetes", ("127.0.0.1",))
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(pair.cert, pair.key)
    account = tmp_path / "serviceaccount"
    account.mkdir()
    token = account / "token"
    token.write_text("first")
    (account / "ca.crt").write_bytes(authority.pair.cert.read_bytes())
    monkeypatch.setattr(kubeconfig, "SERVICE_ACCOUNT_DIR", account)

    async def body() -> None:
        async with apiserver(ok, server_context) as (fake, url):
            monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
            monkeypatch.setenv("KUBERNETES_SERVICE_PORT", url.rsplit(":", 1)[1])
            kube = Kube(Credentials.load())
            try:
                await kube.get("Deployment", "ns", "a")
                (account / "token.new").write_text("second")
                (account / "token.new").replace(token)  # as the kubelet swaps it
                await kube.get("Deployment", "ns", "a")
                assert fake.tokens == ["Bearer first", "Bearer second"]
            finally:
                await kube.close()

    run(body)


# -- Events -------------------------------------------------------------------------------------


def test_the_event_log_keeps_recent_events_within_the_window_and_no_more() -> None:
    log = EventLog(size=2, window=600)
    ready = ("uid-1", "Normal", "Ready", "up")
    first = log.entry(ready, now=0.0)
    assert log.entry(ready, now=599.0) is first
    kept = log.entry(ready, now=1200.0)  # quiet for longer than the window: a new Event
    assert kept is not first
    other = log.entry(("uid-2", "Normal", "Ready", "up"), now=1201.0)
    assert log.entry(ready, now=1202.0) is kept
    log.entry(("uid-3", "Normal", "Ready", "up"), now=1203.0)  # one too many: the least recently posted goes
    assert log.entry(ready, now=1204.0) is kept
    assert log.entry(("uid-2", "Normal", "Ready", "up"), now=1205.0) is not other


def test_the_event_log_forgets_what_has_been_quiet_for_longer_than_the_window() -> None:
    log = EventLog(size=100, window=600)
    for uid in range(10):
        log.entry((f"uid-{uid}", "Normal", "Ready", "up"), now=float(uid))
    assert len(log) == 10
    recent = log.entry(("uid-9", "Normal", "Ready", "up"), now=605.0)
    assert len(log) == 5, "uid-0 .. uid-4 were last posted more than 600 s ago"
    assert log.entry(("uid-9", "Normal", "Ready", "up"), now=606.0) is recent


@pytest.mark.cluster
def test_the_same_event_three_times_is_one_event_counted_three_times(cluster: Cluster, namespace: str) -> None:
    involved = {"apiVersion": "llm.vllm-operator.io/v1alpha1", "kind": "LLMDeployment",
                "metadata": {"name": "llama", "namespace": namespace, "uid": str(uuid.uuid4())}}

    async def body() -> None:
        kube = Kube(Credentials.load(str(cluster.kubeconfig)))
        try:
            for _ in range(3):
                await kube.post_event(involved, "Warning", "ApplyFailed", "Deployment refused: forbidden")
            await asyncio.gather(*(kube.post_event(involved, "Normal", "Ready", "2/2 replicas") for _ in range(2)))
        finally:
            await kube.close()

    run(body)
    events = client.CoreV1Api(cluster.api_client).list_namespaced_event(
        namespace, field_selector=f"involvedObject.uid={involved['metadata']['uid']}").items
    counted = sorted((e.reason, e.count) for e in events)
    assert counted == [("ApplyFailed", 3), ("Ready", 2)]
    failed = next(e for e in events if e.reason == "ApplyFailed")
    assert failed.last_timestamp >= failed.first_timestamp


@pytest.mark.cluster
def test_server_side_apply_keeps_characters_beyond_the_basic_plane(cluster: Cluster, namespace: str) -> None:
    # An apply body is parsed as YAML, which refuses the \ud83e\udd99 surrogate pair JSON would escape the llama to,
    # and C1 controls raw, and reads NEL and U+2028 raw as line breaks.
    text = "llama \U0001f999, naïve 模型, \x85\x9f\x7f\u2028\ufffe end"
    manifest = {"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "unicode", "namespace": namespace, "annotations": {"note": text}},
                "data": {"prompt": text}}

    async def body() -> dict[str, Any]:
        kube = Kube(Credentials.load(str(cluster.kubeconfig)))
        try:
            await kube.apply(manifest)
            return await kube.get("ConfigMap", namespace, "unicode")
        finally:
            await kube.close()

    stored = asyncio.run(body())
    assert stored["data"]["prompt"] == text and stored["metadata"]["annotations"]["note"] == text


@pytest.mark.parametrize("text", ["llama \U0001f999", "naïve 模型", "\x00\x1f\x7f\x85\x9f\xa0", "\u2028\u2029\ufffe\uffff"])
def test_request_bodies_are_json_that_yaml_reads_back_unchanged(text: str) -> None:
    body = {"metadata": {"annotations": {"note": text}}, "data": {text: text}}
    encoded = yaml_safe_json(body)
    assert json.loads(encoded) == body and yaml.safe_load(encoded) == body


def test_secret_keys_are_read_again_only_after_their_ttl_and_a_missing_one_is_remembered_as_none(
        tmp_path: Path) -> None:
    now = [0.0]
    reads = {"api": 0}

    async def answer(request: web.Request, _: int) -> web.Response:
        name = request.path.rsplit("/", 1)[-1]
        if name == "api":
            reads["api"] += 1
            return web.json_response({"data": {"key": base64.b64encode(f"v{reads['api']}\n".encode()).decode()}})
        return status(403, "Forbidden") if name == "forbidden" else status(404, "NotFound")

    async def body() -> None:
        async with apiserver(answer) as (fake, url), kube_for(tmp_path, url) as kube:
            keys = SecretKeys(kube, ttl=30, clock=lambda: now[0])
            assert await keys.get("ns", "api", "key") == "v1\n"  # byte for byte, as the engine gets it
            now[0] = 29.0
            assert await keys.get("ns", "api", "key") == "v1\n"
            now[0] = 30.0
            assert await keys.get("ns", "api", "key") == "v2\n"  # a rotated key, once the ttl is over
            assert await keys.get("ns", "api", "other") is None
            assert await keys.get("ns", "gone", "key") is None
            asked = len(fake.seen)
            assert await keys.get("ns", "gone", "key") is None
            assert len(fake.seen) == asked
            with pytest.raises(KubeError) as refused:
                await keys.get("ns", "forbidden", "key")
            assert refused.value.status == 403

    run(body)
