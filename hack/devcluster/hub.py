"""A local Hugging Face Hub on loopback, for the real ``huggingface_hub`` client (``HF_ENDPOINT``).

It answers what ``snapshot_download``, ``hf_hub_download`` and ``HfApi.model_info(files_metadata=True)``
ask (checked against huggingface_hub 2.4.0):

- ``GET /api/models/{org}/{name}[/revision/{rev}][?blobs=true]``: the model info, whose ``sha`` resolves a
  revision to a commit and whose ``siblings`` carry sizes, blob ids and LFS hashes;
- ``GET /api/models/{org}/{name}/tree/{rev}[/{path}][?recursive=true]``: the file listing;
- ``HEAD|GET /{org}/{name}/resolve/{rev}/{path}``: the file, with the ``ETag``, ``X-Repo-Commit`` and
  (for LFS files) ``X-Linked-Etag``/``X-Linked-Size`` headers the client names blobs by, and ``Range``.

Errors carry the ``X-Error-Code`` the client maps to its exceptions, with the hub's status codes: a
missing repo is 401 without a token and 404 with one (``RepoNotFound``), a missing revision 404
(``RevisionNotFound``), a gated repo's files 401 without a token and 403 with a token that has no access
(``GatedRepo``) while its listing stays public, as on huggingface.co.

Repos are folders of real files (the tiny model) or synthetic, as in ``tests/data/hub/<org>/<name>/``:
``config.json`` (served as is) and ``safetensors.json`` (``files``: name -> size in bytes, ``parameters``:
count per dtype) whose files are generated on the fly, never stored. They get a valid safetensors header
(one tensor filling the file, so ``get_safetensors_metadata`` works) and deterministic bytes, so a resumed
download can be checked byte for byte; the model info reports the declared parameters.

For tests: ``throttle`` (bytes/s per response), ``cut_next`` (drop the connection of the next download
of a file after some bytes, as a flaky network does), ``hold``/``release`` (stop every download after some
bytes until released, to look at a download midway), and a log of every request (``requests``,
``count``, ``bytes_served``), with the client named by the first product of its User-Agent.

``python -m devcluster.hub [--port N] [--repos DIR] [--token T]`` serves the default repos until stopped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from devcluster.engine import model_snapshot

REPO_ROOT = Path(__file__).resolve().parents[2]
SYNTHETIC_REPOS = REPO_ROOT / "tests" / "data" / "hub"
SYNTHETIC_FILE = "safetensors.json"  # the format of tests/data/hub/README.md
TINY_REPO = "local/tiny"
GATED_REPO = "local/tiny-gated"
DEFAULT_TOKEN = "hf_local_test_token"
LFS_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx"}
CHUNK = 64 * 1024
# Bytes of generated files repeat with a prime period, so that no two nearby offsets look alike.
_PATTERN = random.Random(20240601).randbytes(65521)
# safetensors dtypes by the config's torch dtype, with their element size.
_DTYPES = {"bfloat16": ("BF16", 2), "float16": ("F16", 2), "float32": ("F32", 4)}
_ELEMENT_SIZE = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                 "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class HubFile:
    """One file of a repo: its size, ids, and a reader of any byte range (``read(start, end)``)."""

    path: str
    size: int
    read: Callable[[int, int], bytes] = field(repr=False)
    sha256: str | None  # LFS files only: the hub names their blobs (ETag) by it
    blob_id: str  # git object id: of the content, or of the LFS pointer

    @property
    def etag(self) -> str:
        return self.sha256 or self.blob_id

    @property
    def lfs_pointer_size(self) -> int:
        return len(_lfs_pointer(self.sha256 or "", self.size))


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _is_lfs(path: str, size: int) -> bool:
    return Path(path).suffix in LFS_SUFFIXES or size >= 10 * 1024 * 1024


def content_file(path: str, size: int, read: Callable[[int, int], bytes], sha256: str | None) -> HubFile:
    """A file whose ids follow git and LFS: ``sha256`` is given for LFS files, else the content is hashed."""
    if sha256 is None:
        return HubFile(path, size, read, None, _git_blob_id(read(0, size)))
    return HubFile(path, size, read, sha256, _git_blob_id(_lfs_pointer(sha256, size)))


def disk_file(path: str, local: Path) -> HubFile:
    size = local.stat().st_size

    def read(start: int, end: int) -> bytes:
        with local.open("rb") as handle:
            handle.seek(start)
            return handle.read(end - start)

    sha256 = hashlib.sha256(local.read_bytes()).hexdigest() if _is_lfs(path, size) else None
    return content_file(path, size, read, sha256)


def pattern_bytes(start: int, end: int) -> bytes:
    """Bytes ``start:end`` of an endless, deterministic byte stream."""
    period = len(_PATTERN)
    offset = start % period
    repeats = (offset + end - start) // period + 1
    return (_PATTERN[offset:] + _PATTERN * repeats)[: end - start]


def safetensors_header(size: int, torch_dtype: str | None) -> bytes:
    """The header of a safetensors file of ``size`` bytes holding one tensor that fills it.

    The tensor takes the model's dtype when the data divides into it, else bytes (U8)."""
    header_len = 8
    # The header's length depends on the numbers in it, which depend on its length: a few rounds settle it.
    for _ in range(4):
        data = size - header_len
        if data < 0:
            raise ValueError(f"a safetensors file of {size} bytes cannot hold a header")
        dtype, element = _DTYPES.get(torch_dtype or "", ("U8", 1))
        if data % element:
            dtype, element = "U8", 1
        body = {"__metadata__": {"format": "pt"},
                "weight": {"dtype": dtype, "shape": [data // element], "data_offsets": [0, data]}}
        text = json.dumps(body, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the format pads the header to 8 bytes
        if 8 + len(text) == header_len:
            return len(text).to_bytes(8, "little") + text
        header_len = 8 + len(text)
    raise ValueError(f"no stable safetensors header for {size} bytes")


def generated_file(path: str, size: int, seed: str, torch_dtype: str | None) -> HubFile:
    """A synthetic file: a safetensors header then pattern bytes, or pattern bytes only; never stored."""
    header = safetensors_header(size, torch_dtype) if path.endswith(".safetensors") else b""
    shift = int(hashlib.sha256(seed.encode()).hexdigest()[:8], 16)

    def read(start: int, end: int) -> bytes:
        head = header[start:end]
        rest_start = max(start, len(header))
        return head + (pattern_bytes(shift + rest_start, shift + end) if end > rest_start else b"")

    # Hashing gigabytes of generated bytes would take minutes: a stable made-up sha256 names the blob.
    sha256 = hashlib.sha256(f"{seed}\0{size}".encode()).hexdigest() if _is_lfs(path, size) else None
    return content_file(path, size, read, sha256)


@dataclass(frozen=True)
class Repo:
    repo_id: str
    commit: str
    files: Mapping[str, HubFile]
    gated: bool = False
    parameters: Mapping[str, int] | None = None  # declared by a synthetic repo, else read from the headers

    def resolve(self, revision: str) -> str | None:
        """The commit a revision names: the default branch ``main`` or the commit itself."""
        return self.commit if revision in (self.commit, "main") else None

    @property
    def config(self) -> dict[str, Any]:
        config = self.files.get("config.json")
        return json.loads(config.read(0, config.size)) if config is not None else {}


def make_repo(repo_id: str, files: Iterable[HubFile], parameters: Mapping[str, int] | None = None) -> Repo:
    by_path = {f.path: f for f in sorted(files, key=lambda f: f.path)}
    # The commit names the exact content, as git's does: a changed file is a new commit.
    commit = hashlib.sha1("".join(f"{p} {f.etag}\n" for p, f in by_path.items()).encode()).hexdigest()
    return Repo(repo_id, commit, by_path, parameters=parameters)


def folder_repo(repo_id: str, folder: Path) -> Repo:
    """Every file under ``folder`` (symlinks followed, as in a hub cache snapshot) with its real bytes;
    with a ``safetensors.json``, the files it names are generated instead."""
    synthetic_path = folder / SYNTHETIC_FILE
    declared = json.loads(synthetic_path.read_text()) if synthetic_path.is_file() else {}
    sizes: dict[str, int] = declared.get("files", {})
    real = [disk_file(p.relative_to(folder).as_posix(), p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p != synthetic_path and p.relative_to(folder).as_posix() not in sizes]
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    torch_dtype = config.get("torch_dtype") or config.get("dtype")
    synthetic = [generated_file(path, size, f"{repo_id}/{path}", torch_dtype) for path, size in sizes.items()]
    return make_repo(repo_id, [*real, *synthetic], declared.get("parameters"))


def write_synthetic(root: Path, repo_id: str, config: Mapping[str, Any], sizes: Mapping[str, int]) -> Path:
    """Lay a synthetic repo out under ``root`` as ``tests/data/hub`` does; returns its folder."""
    folder = root / repo_id
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / SYNTHETIC_FILE).write_text(json.dumps({"files": dict(sizes)}, indent=2) + "\n")
    return folder


def repos_in(root: Path) -> list[Repo]:
    """The repos of a folder laid out as ``<org>/<name>/``."""
    if not root.is_dir():
        return []
    return [folder_repo(f"{org.name}/{name.name}", name) for org in sorted(root.iterdir()) if org.is_dir()
            for name in sorted(org.iterdir()) if name.is_dir()]


def default_repos(tiny_snapshot: Path | None, synthetic_root: Path = SYNTHETIC_REPOS) -> list[Repo]:
    """The tiny model as ``local/tiny`` and, gated, ``local/tiny-gated`` (when generated), and the synthetic repos."""
    repos = repos_in(synthetic_root)
    if tiny_snapshot is not None:
        tiny = folder_repo(TINY_REPO, tiny_snapshot)
        repos += [tiny, replace(tiny, repo_id=GATED_REPO, gated=True)]
    return repos


@dataclass
class HubRequest:
    """One request as the hub saw it; ``bytes_sent`` grows while a body is being written."""

    method: str
    path: str
    client: str
    range: str | None
    status: int = 0
    bytes_sent: int = 0


class HubError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = dict(headers or {})


def client_name(user_agent: str) -> str:
    """The first product of a User-Agent: huggingface_hub puts the calling library there
    (``vllm-operator-puller/1; hf_hub/2.4.0; ...``, ``unknown/None; hf_hub/...`` when none is named)."""
    return user_agent.split(";", 1)[0].split("/", 1)[0].strip() or "unknown"


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(start, end)`` (end exclusive) of a single ``bytes=`` range; None to send the whole file.

    Raises ValueError when the range starts past the end (416)."""
    if not header or "," in header or not header.strip().startswith("bytes="):
        return None
    first, _, last = header.strip()[len("bytes="):].partition("-")
    if not first:
        return (max(size - int(last), 0), size) if last else None
    start = int(first)
    if start >= size:
        raise ValueError(header)
    return start, min(int(last) + 1, size) if last else size


class LocalHub:
    """The hub's state and request handling; ``serve`` runs it on a loopback port."""

    def __init__(self, repos: Sequence[Repo], tokens: Iterable[str] = (DEFAULT_TOKEN,)) -> None:
        self.repos = {repo.repo_id: repo for repo in repos}
        self.tokens = set(tokens)
        self.throttle: float | None = None  # bytes per second per response
        self.url = ""
        self._lock = threading.Lock()
        self._requests: list[HubRequest] = []
        self._cuts: dict[tuple[str, str], int] = {}
        self._hold_after: int | None = None
        self._gate = threading.Condition()

    # --- for tests ---------------------------------------------------------------------------

    @property
    def requests(self) -> list[HubRequest]:
        with self._lock:
            return list(self._requests)

    def count(self, *, path: str | None = None, client: str | None = None, method: str | None = None) -> int:
        """How many requests matched; ``path`` matches the start of the URL path (e.g. ``/local/tiny/``)."""
        return sum(1 for r in self.requests if (path is None or r.path.startswith(path))
                   and (client is None or r.client == client) and (method is None or r.method == method))

    def bytes_served(self, repo_id: str, path: str | None = None) -> int:
        """Body bytes sent for the files of a repo (or one file), whatever the revision asked."""
        prefix = f"/{repo_id}/resolve/"
        return sum(r.bytes_sent for r in self.requests if r.method == "GET" and r.path.startswith(prefix)
                   and (path is None or r.path.split("/", 5)[-1] == path))

    def reset_counts(self) -> None:
        with self._lock:
            self._requests.clear()

    def cut_next(self, repo_id: str, path: str, after: int) -> None:
        """The next GET of this file drops its connection after ``after`` body bytes."""
        with self._lock:
            self._cuts[(repo_id, path)] = after

    def hold(self, after: int) -> None:
        """From now on every file body stops after ``after`` bytes, until ``release`` or another ``hold``."""
        with self._gate:
            self._hold_after = after
            self._gate.notify_all()

    def release(self) -> None:
        with self._gate:
            self._hold_after = None
            self._gate.notify_all()

    def env(self) -> dict[str, str]:
        """What a client process needs to use this hub and nothing else."""
        return {"HF_ENDPOINT": self.url, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1"}

    # --- serving -----------------------------------------------------------------------------

    @contextmanager
    def serve(self, port: int = 0, host: str = "127.0.0.1") -> Iterator[LocalHub]:
        server = _Server((host, port), _Handler)
        server.hub = self
        self.url = f"http://{host}:{server.server_address[1]}"
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="local-hub", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.release()  # held responses must not keep the server from stopping
            server.shutdown()
            server.server_close()
            thread.join()

    def handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        url = urlsplit(handler.path)
        record = HubRequest(method, unquote(url.path), client_name(handler.headers.get("User-Agent", "")),
                            handler.headers.get("Range"))
        with self._lock:
            self._requests.append(record)
        token = handler.headers.get("Authorization", "").removeprefix("Bearer ").strip() or None
        try:
            self._route(handler, method, url.path, parse_qs(url.query), token, record)
        except HubError as error:
            body = json.dumps({"error": error.message}).encode()
            headers = {"X-Error-Code": error.code, "X-Error-Message": error.message, **error.headers}
            record.status = error.status
            _send_head(handler, error.status, "application/json", len(body), headers)
            if method == "GET":
                handler.wfile.write(body)
        except OSError:  # the client went away mid-answer
            handler.close_connection = True

    def _route(self, handler: BaseHTTPRequestHandler, method: str, path: str, query: dict[str, list[str]],
               token: str | None, record: HubRequest) -> None:
        parts = [unquote(part) for part in path.split("/")[1:]]
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo = self._repo(f"{parts[2]}/{parts[3]}", token)
            rest = parts[4:]
            if not rest or (len(rest) == 2 and rest[0] == "revision"):
                commit = self._commit(repo, rest[1] if rest else "main")
                blobs = query.get("blobs", ["false"])[0].lower() == "true"
                record.status = 200
                _send_json(handler, method, model_info(repo, commit, blobs))
                return
            if len(rest) >= 2 and rest[0] == "tree":
                self._commit(repo, rest[1])
                recursive = query.get("recursive", ["false"])[0].lower() == "true"
                listing = tree(repo, "/".join(rest[2:]), recursive)
                record.status = 200
                _send_json(handler, method, listing)
                return
        elif len(parts) >= 5 and parts[2] == "resolve":
            repo = self._repo(f"{parts[0]}/{parts[1]}", token)
            commit = self._commit(repo, parts[3])
            self._send_file(handler, method, repo, commit, "/".join(parts[4:]), token, record)
            return
        raise HubError(404, "NotFound", "Sorry, we can't find the page you are looking for.")

    def _repo(self, repo_id: str, token: str | None) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None:
            # The hub does not tell a missing repo from a private one: 401 to strangers, 404 to users.
            raise HubError(404 if token else 401, "RepoNotFound", "Repository not found")
        return repo

    @staticmethod
    def _commit(repo: Repo, revision: str) -> str:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return commit

    def _send_file(self, handler: BaseHTTPRequestHandler, method: str, repo: Repo, commit: str, path: str,
                   token: str | None, record: HubRequest) -> None:
        if repo.gated and token not in self.tokens:
            if token is None:
                raise HubError(401, "GatedRepo", f"Access to model {repo.repo_id} is restricted. You must have "
                               "access to it and be authenticated to access it. Please log in.")
            raise HubError(403, "GatedRepo", f"Access to model {repo.repo_id} is restricted and you are not in the "
                           f"authorized list. Visit {self.url}/{repo.repo_id} to ask for access.")
        hub_file = repo.files.get(path)
        if hub_file is None:
            raise HubError(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": commit})
        headers = {"ETag": f'"{hub_file.etag}"', "X-Repo-Commit": commit, "Accept-Ranges": "bytes"}
        if hub_file.sha256 is not None:
            headers |= {"X-Linked-Etag": f'"{hub_file.sha256}"', "X-Linked-Size": str(hub_file.size)}
        try:
            span = parse_range(handler.headers.get("Range"), hub_file.size) if method == "GET" else None
        except ValueError:
            raise HubError(416, "RangeNotSatisfiable", "Requested range not satisfiable",
                           {"Content-Range": f"bytes */{hub_file.size}"}) from None
        start, end = span or (0, hub_file.size)
        if span is not None:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{hub_file.size}"
        record.status = 206 if span is not None else 200
        _send_head(handler, record.status, "application/octet-stream", end - start, headers)
        if method == "GET":
            with self._lock:
                cut = self._cuts.pop((repo.repo_id, path), None)
            self._write_body(handler, hub_file, start, end, cut, record)

    def _write_body(self, handler: BaseHTTPRequestHandler, hub_file: HubFile, start: int, end: int,
                    cut: int | None, record: HubRequest) -> None:
        position = start
        while position < end:
            sent = position - start
            if cut is not None and sent >= cut:
                # Close without finishing the body: the client sees a truncated response, as on a reset.
                handler.close_connection = True
                handler.wfile.flush()
                handler.connection.shutdown(socket.SHUT_RDWR)
                return
            with self._gate:
                self._gate.wait_for(lambda sent=sent: self._hold_after is None or sent < self._hold_after)
                hold = self._hold_after
            limit = min(end, position + CHUNK, *(start + n for n in (cut, hold) if n is not None and n > sent))
            throttle = self.throttle
            if throttle:
                limit = min(limit, position + max(1024, int(throttle / 20)))
            handler.wfile.write(hub_file.read(position, limit))
            record.bytes_sent += limit - position
            if throttle:
                time.sleep((limit - position) / throttle)
            position = limit


def model_info(repo: Repo, commit: str, blobs: bool) -> dict[str, Any]:
    """The model info as the hub answers it; sizes and ids of files only with ``blobs``."""
    siblings = []
    for hub_file in repo.files.values():
        sibling: dict[str, Any] = {"rfilename": hub_file.path}
        if blobs:
            sibling |= {"blobId": hub_file.blob_id, "size": hub_file.size}
            if hub_file.sha256 is not None:
                sibling["lfs"] = {"sha256": hub_file.sha256, "size": hub_file.size,
                                  "pointerSize": hub_file.lfs_pointer_size}
        siblings.append(sibling)
    info: dict[str, Any] = {
        "_id": repo.commit[:24], "id": repo.repo_id, "modelId": repo.repo_id, "author": repo.repo_id.split("/")[0],
        "sha": commit, "lastModified": "2024-06-01T00:00:00.000Z", "private": False,
        "gated": "manual" if repo.gated else False, "disabled": False, "downloads": 0, "likes": 0,
        "library_name": "transformers", "tags": ["transformers", "safetensors"], "siblings": siblings,
        "config": {key: repo.config[key] for key in ("architectures", "model_type") if key in repo.config},
    }
    parameters = repo.parameters or safetensors_parameters(repo.files.values())
    if parameters:
        info["safetensors"] = {"parameters": parameters, "total": sum(parameters.values())}
    return info


def safetensors_parameters(files: Iterable[HubFile]) -> dict[str, int]:
    """Parameters by dtype, read from the headers of the safetensors files."""
    counts: dict[str, int] = {}
    for hub_file in files:
        if not hub_file.path.endswith(".safetensors") or hub_file.size < 8:
            continue
        length = int.from_bytes(hub_file.read(0, 8), "little")
        header = json.loads(hub_file.read(8, 8 + length))
        for name, tensor in header.items():
            if name != "__metadata__":
                start, end = tensor["data_offsets"]
                counts[tensor["dtype"]] = counts.get(tensor["dtype"], 0) + (end - start) // _ELEMENT_SIZE[tensor["dtype"]]
    return counts


def tree(repo: Repo, folder: str, recursive: bool) -> list[dict[str, Any]]:
    """The tree listing of ``folder`` ("" for the root): files, and the folders met on the way."""
    prefix = f"{folder}/" if folder else ""
    entries: dict[str, dict[str, Any]] = {}
    for hub_file in repo.files.values():
        if not hub_file.path.startswith(prefix):
            continue
        parts = hub_file.path[len(prefix):].split("/")
        for depth in range(1, len(parts) if recursive else min(len(parts), 2)):
            sub = prefix + "/".join(parts[:depth])
            entries.setdefault(sub, {"type": "directory", "oid": hashlib.sha1(sub.encode()).hexdigest(),
                                     "size": 0, "path": sub})
        if recursive or len(parts) == 1:
            entry: dict[str, Any] = {"type": "file", "oid": hub_file.blob_id, "size": hub_file.size,
                                     "path": hub_file.path}
            if hub_file.sha256 is not None:
                entry["lfs"] = {"oid": hub_file.sha256, "size": hub_file.size,
                                "pointerSize": hub_file.lfs_pointer_size}
            entries[hub_file.path] = entry
    if folder and not entries:
        raise HubError(404, "EntryNotFound", f"{folder} does not exist on this revision")
    return list(entries.values())


def _send_head(handler: BaseHTTPRequestHandler, status: int, content_type: str, length: int,
               headers: Mapping[str, str]) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(length))
    for name, value in headers.items():
        handler.send_header(name, value)
    handler.end_headers()


def _send_json(handler: BaseHTTPRequestHandler, method: str, body: Any) -> None:
    data = json.dumps(body).encode()
    _send_head(handler, 200, "application/json", len(data), {})
    if method == "GET":
        handler.wfile.write(data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    hub: LocalHub


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and ranges, as the client expects of the hub
    server: _Server

    def do_GET(self) -> None:
        self.server.hub.handle(self, "GET")

    def do_HEAD(self) -> None:
        self.server.hub.handle(self, "HEAD")

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: the requests are counted instead


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m devcluster.hub", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--repos", type=Path, default=SYNTHETIC_REPOS, help="a folder of <org>/<name>/ repos")
    parser.add_argument("--token", action="append", help=f"a token that opens gated repos (default {DEFAULT_TOKEN})")
    parser.add_argument("--throttle", type=float, help="bytes per second per download")
    args = parser.parse_args(argv)
    # The tiny model is served when `make model` has generated it.
    hub = LocalHub(default_repos(model_snapshot(), args.repos), args.token or [DEFAULT_TOKEN])
    hub.throttle = args.throttle
    with hub.serve(args.port, args.host):
        print(f"HF_ENDPOINT={hub.url} serving {', '.join(sorted(hub.repos))}", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
