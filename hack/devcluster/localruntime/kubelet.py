"""The kubelet's log endpoint, so that `kubectl logs` and the operator read engine logs as on a real node.

The apiserver dials the node's InternalIP on ``status.daemonEndpoints.kubeletEndpoint.Port`` over TLS, checks
the serving certificate against the cluster CA and shows its own client certificate, as with a real kubelet.
Only ``GET /containerLogs/{namespace}/{pod}/{container}`` is served, with ``tailLines`` and ``limitBytes``;
``follow``, ``previous``, ``sinceSeconds`` and ``timestamps`` are not (docs/local-runtime.md).
"""

from __future__ import annotations

import ssl
import threading
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from devcluster.localruntime.log import event


def log_tail(path: Path, tail_lines: int | None, limit_bytes: int | None) -> bytes:
    """The end of a container's log as the kubelet returns it: the last ``tail_lines`` lines, then at most
    ``limit_bytes`` bytes from their start."""
    with path.open("rb") as handle:
        data = b"".join(deque(handle, maxlen=tail_lines)) if tail_lines is not None else handle.read()
    return data[:limit_bytes] if limit_bytes is not None else data


def _number(query: dict[str, list[str]], name: str) -> int | None:
    values = query.get(name)
    return int(values[0]) if values and values[0].isdigit() else None


class KubeletServer:
    """Serves the local node's container logs from the runtime's state directory until ``stop``."""

    def __init__(self, state_dir: Path, port: int, cert: Path, key: Path, client_ca: Path) -> None:
        pods = state_dir / "pods"

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server hook
                url = urlsplit(self.path)
                parts = [unquote(p) for p in url.path.split("/") if p]
                if len(parts) != 4 or parts[0] != "containerLogs" or any(p in (".", "..") for p in parts):
                    self._answer(404, b"only /containerLogs/{namespace}/{pod}/{container} is served here\n")
                    return
                _, namespace, pod, container = parts
                path = pods / f"{namespace}_{pod}" / f"{container}.log"
                if not path.is_file():
                    self._answer(404, f"container {container} of pod {namespace}/{pod} has no log here\n".encode())
                    return
                query = parse_qs(url.query)
                self._answer(200, log_tail(path, _number(query, "tailLines"), _number(query, "limitBytes")))

            def _answer(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the http.server hook
                pass

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        context.load_verify_locations(client_ca)
        context.verify_mode = ssl.CERT_REQUIRED  # the apiserver's client certificate, as the kubelet asks for
        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = port

    def run(self, stop: threading.Event) -> None:
        threading.Thread(target=self.server.serve_forever, name="kubelet-logs", daemon=True).start()
        event("kubelet.serving", port=self.port)
        stop.wait()
        self.server.shutdown()
