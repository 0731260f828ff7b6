"""Download a Hugging Face model into the hub cache of an LLMDeployment's cache claim, saying how far it is.

    python puller.py REPO_ID [--revision REV] [--allow-pattern GLOB ...] [--ignore-pattern GLOB ...]
                     [--host HOST] [--port 8001] [--termination-log /dev/termination-log] [--linger SECONDS]

Each option may come from the environment instead: PULLER_REPO, PULLER_REVISION, PULLER_ALLOW_PATTERNS and
PULLER_IGNORE_PATTERNS (comma-separated), PULLER_HOST, PULLER_PORT, PULLER_TERMINATION_LOG, PULLER_LINGER_SECONDS.
huggingface_hub reads its own: HF_HOME (the cache), HF_TOKEN, HF_ENDPOINT.

Steps: resolve the revision to a commit (written to the cache's refs/), list the files with their sizes
(so the total is known before the first byte), fetch the weights (LFS files) into ``blobs/<etag>.incomplete``
files that a later run resumes with an HTTP range (huggingface_hub 2.4 downloads into a temporary file of its
own process and drops it on failure), then ``snapshot_download`` for the rest and the cache layout.

Progress is measured on disk, in the cache's blobs and partial files, so it needs no hook into the client:
``GET /progress`` answers JSON, ``GET /metrics`` Prometheus text, ``GET /health`` ``ok``.
The outcome goes to the termination message file as JSON; the exit code is 0 when done, 2 when a retry
cannot help (no such repo or revision, gated without access, bad arguments) and 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx2
from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    RevisionResolutionError,
)
from huggingface_hub.file_download import hf_hub_url, http_get, repo_folder_name
from huggingface_hub.hf_api import RepoSibling
from huggingface_hub.utils import (
    build_hf_headers,
    disable_progress_bars,
    filter_repo_objects,
)

LIBRARY = "vllm-operator-puller"  # the User-Agent's first product, so a hub can tell the puller's requests apart
VERSION = "1"
PHASES = ("Pending", "Downloading", "Ready", "Failed")
RATE_WINDOW_SECONDS = 10.0
SAMPLE_SECONDS = 1.0
MESSAGE_LIMIT = 1000  # kubelet keeps 4 KiB of a termination message
EXIT_RETRY, EXIT_PERMANENT = 1, 2


@dataclass(frozen=True)
class Wanted:
    """A file to fetch, named in the cache's blobs/ by its etag (the LFS sha256, or the git blob id)."""

    path: str
    size: int
    etag: str
    lfs: bool


@dataclass
class State:
    """What the progress endpoints show; ``samples`` are (monotonic time, bytes on disk)."""

    repo: str
    requested: str
    phase: str = "Pending"
    revision: str | None = None
    files: list[Wanted] = field(default_factory=list)
    reason: str | None = None
    message: str | None = None
    samples: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=64))
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def bytes_total(self) -> int | None:
        """Known once the files are listed, which is also when the revision is resolved."""
        return sum(f.size for f in self.files) if self.revision is not None else None


def wanted(sibling: RepoSibling) -> Wanted:
    lfs = sibling.lfs is not None
    etag = sibling.lfs.sha256 if sibling.lfs is not None else sibling.blob_id
    if etag is None or sibling.size is None:
        raise ValueError(f"the hub's listing has no size or id for {sibling.rfilename}")
    return Wanted(sibling.rfilename, sibling.size, etag, lfs)


def bytes_on_disk(blobs: Path, files: Sequence[Wanted]) -> int:
    """Bytes of ``files`` in the cache: a finished blob counts whole, else its partial files (ours and the
    client's ``<etag>.<id>.incomplete``), each file capped at its size."""
    done = 0
    for wanted_file in files:
        blob = blobs / wanted_file.etag
        try:
            size = blob.stat().st_size
        except FileNotFoundError:
            size = sum(_size(p) for p in blobs.glob(f"{wanted_file.etag}*.incomplete"))
        done += min(size, wanted_file.size)
    return done


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # renamed into place meanwhile
        return 0


def rate(samples: Sequence[tuple[float, int]], window: float = RATE_WINDOW_SECONDS) -> float:
    """Bytes per second over the samples of the last ``window`` seconds."""
    if len(samples) < 2:
        return 0.0
    end_time, end_bytes = samples[-1]
    start_time, start_bytes = next((t, b) for t, b in samples if t >= end_time - window)
    return max(end_bytes - start_bytes, 0) / (end_time - start_time) if end_time > start_time else 0.0


def progress(state: State) -> dict[str, Any]:
    """The /progress body; the same fields, less the rate, end up in the termination message."""
    with state.lock:
        total = state.bytes_total
        done = state.samples[-1][1] if state.samples else 0
        per_second = rate(state.samples)
        phase, reason, message = state.phase, state.reason, state.message
        body: dict[str, Any] = {"repo": state.repo, "requestedRevision": state.requested, "revision": state.revision,
                                "phase": phase, "files": len(state.files)}
    percent = 100.0 if phase == "Ready" else (100.0 * done / total if total else 0.0)
    left = (total or 0) - done
    eta = 0.0 if phase == "Ready" else (left / per_second if per_second > 0 and total is not None else None)
    body |= {"bytesTotal": total, "bytesDone": done, "percent": round(percent, 1),
             "bytesPerSecond": round(per_second, 1), "etaSeconds": None if eta is None else round(eta, 1)}
    if reason is not None:
        body |= {"reason": reason, "message": message}
    return body


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def metrics(body: Mapping[str, Any]) -> str:
    """The /progress body in Prometheus text format; a gauge that is not known yet is left out."""
    lines = []
    gauges = (("model_puller_total_bytes", "Bytes of the files to download, from the hub's listing.", "bytesTotal"),
              ("model_puller_done_bytes", "Bytes of those files in the cache.", "bytesDone"),
              ("model_puller_rate_bytes_per_second", "Download rate over the last seconds.", "bytesPerSecond"),
              ("model_puller_eta_seconds", "Seconds left at the current rate.", "etaSeconds"))
    for name, help_text, key in gauges:
        if body[key] is not None:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {body[key]}"]
    labels = f'repo="{_label(body["repo"])}",revision="{_label(body["revision"] or "")}"'
    lines += ["# HELP model_puller_info The repo, the commit its revision resolved to and the phase.",
              "# TYPE model_puller_info gauge",
              f'model_puller_info{{{labels},phase="{body["phase"]}",reason="{_label(body.get("reason") or "")}"}} 1',
              "# HELP model_puller_phase 1 for the current phase.", "# TYPE model_puller_phase gauge"]
    lines += [f'model_puller_phase{{phase="{phase}"}} {int(phase == body["phase"])}' for phase in PHASES]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Failure:
    reason: str
    message: str
    exit_code: int


def failure(error: BaseException, repo: str, revision: str, endpoint: str) -> Failure:
    """A short reason, a message saying what to do, and the exit code, for an error of the download."""
    if isinstance(error, GatedRepoError):
        if error.response.status_code == 401:
            return Failure("GatedRepo", (f"{repo} is gated and no token was given: accept its terms on the hub, "
                                         "then put that account's token in the Secret named by "
                                         "model.hfTokenSecretRef"), EXIT_PERMANENT)
        return Failure("GatedRepo", (f"the token in model.hfTokenSecretRef has no access to the gated {repo}: "
                                     "accept its terms on the hub with the token's account, or use another token"),
                       EXIT_PERMANENT)
    if isinstance(error, RepositoryNotFoundError):
        return Failure("RepositoryNotFound", (f"{repo} does not exist on {endpoint}, or it is private and the "
                                              "token in model.hfTokenSecretRef cannot read it: check model.name"),
                       EXIT_PERMANENT)
    if isinstance(error, RevisionNotFoundError):
        return Failure("RevisionNotFound", f"{repo} has no revision {revision!r}: check model.revision",
                       EXIT_PERMANENT)
    if isinstance(error, (httpx2.TransportError, OfflineModeIsEnabled, LocalEntryNotFoundError,
                          RevisionResolutionError)):
        return Failure("HubUnreachable", f"cannot reach {endpoint}: {_first_line(error)}", EXIT_RETRY)
    if isinstance(error, HfHubHTTPError):
        answer = error.server_message or _first_line(error)
        return Failure("HubError", f"{endpoint} answered HTTP {error.response.status_code}: {answer}", EXIT_RETRY)
    return Failure("DownloadFailed", f"{type(error).__name__}: {_first_line(error)}", EXIT_RETRY)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def fetch_resumable(url: str, blob: Path, size: int, headers: Mapping[str, str]) -> None:
    """Download one file to ``blob``, continuing a partial file a previous run left behind."""
    if blob.exists():
        return
    partial = blob.with_name(f"{blob.name}.incomplete")
    if partial.exists() and partial.stat().st_size > size:
        partial.unlink()  # not this file's bytes
    with partial.open("ab") as out:
        http_get(url, out, resume_size=out.tell(), headers=dict(headers), expected_size=size,
                 displayed_filename=blob.name)
    partial.replace(blob)


def pull(state: State, allow: list[str] | None, ignore: list[str] | None, workers: int) -> Path:
    """Resolve, list, fetch; returns the snapshot folder."""
    api = HfApi(library_name=LIBRARY, library_version=VERSION)
    revision = api.resolve_revision(state.repo, revision=state.requested)
    info = api.model_info(state.repo, revision=revision.resolved, files_metadata=True)
    names = set(filter_repo_objects([s.rfilename for s in info.siblings or []], allow_patterns=allow,
                                    ignore_patterns=ignore))
    files = [wanted(s) for s in info.siblings or [] if s.rfilename in names]
    with state.lock:
        state.revision, state.files, state.phase = revision.resolved, files, "Downloading"
    print(f"{state.repo}@{state.requested} is {revision.resolved}: {len(files)} files, "
          f"{sum(f.size for f in files)} bytes", flush=True)
    blobs = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=state.repo, repo_type="model") / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    headers = build_hf_headers(library_name=LIBRARY, library_version=VERSION)

    def fetch(weights: Wanted) -> None:
        url = hf_hub_url(state.repo, weights.path, revision=revision.resolved, endpoint=api.endpoint)
        fetch_resumable(url, blobs / weights.etag, weights.size, headers)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(fetch, [f for f in files if f.lfs]))
    # Finds the weights' blobs in place and links them; fetches the small files; writes the snapshot.
    folder = snapshot_download(state.repo, revision=revision, allow_patterns=allow, ignore_patterns=ignore,
                               library_name=LIBRARY, library_version=VERSION, max_workers=workers)
    return Path(folder)


def sample(state: State, blobs_of: Path) -> None:
    with state.lock:
        files = list(state.files)
    done = bytes_on_disk(blobs_of, files)
    with state.lock:
        state.samples.append((time.monotonic(), done))


def serve(state: State, host: str, port: int) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = progress(state)
            pages = {"/progress": ("application/json", json.dumps(body)),
                     "/metrics": ("text/plain; version=0.0.4", metrics(body)), "/health": ("text/plain", "ok\n")}
            content_type, text = pages.get(self.path.split("?", 1)[0], ("text/plain", "not found\n"))
            data = text.encode()
            self.send_response(200 if self.path.split("?", 1)[0] in pages else 404)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # a scrape every few seconds is not news

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="progress", daemon=True).start()
    return server


def write_termination(path: Path, body: Mapping[str, Any]) -> None:
    message = {key: body[key] for key in ("phase", "repo", "requestedRevision", "revision", "bytesTotal",
                                          "bytesDone", "files")}
    if "reason" in body:
        message |= {"reason": body["reason"], "message": str(body["message"])[:MESSAGE_LIMIT]}
    try:
        path.write_text(json.dumps(message))
    except OSError as error:  # outside a pod there may be no such file; the log still has it
        print(f"cannot write the termination message to {path}: {error}", file=sys.stderr)


def _patterns(values: list[str] | None, env: str) -> list[str] | None:
    found = values or [p.strip() for p in os.environ.get(env, "").split(",") if p.strip()]
    return found or None


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    env = os.environ
    parser = argparse.ArgumentParser(prog="puller.py", description=__doc__.splitlines()[0])
    parser.add_argument("repo", nargs="?", default=env.get("PULLER_REPO"), help="org/name on the hub")
    parser.add_argument("--revision", default=env.get("PULLER_REVISION") or constants.DEFAULT_REVISION)
    parser.add_argument("--allow-pattern", action="append", dest="allow", help="glob of files to fetch")
    parser.add_argument("--ignore-pattern", action="append", dest="ignore", help="glob of files to skip")
    parser.add_argument("--host", default=env.get("PULLER_HOST", "0.0.0.0"))
    parser.add_argument("--port", type=int, default=int(env.get("PULLER_PORT", "8001")))
    parser.add_argument("--termination-log", type=Path,
                        default=Path(env.get("PULLER_TERMINATION_LOG", "/dev/termination-log")))
    parser.add_argument("--linger", type=float, default=float(env.get("PULLER_LINGER_SECONDS", "0")),
                        help="seconds to keep answering /progress after the end, for a last scrape")
    parser.add_argument("--workers", type=int, default=int(env.get("PULLER_WORKERS", "4")))
    args = parser.parse_args(argv)
    if not args.repo:
        parser.error("give the repo id as an argument or in PULLER_REPO")
    args.allow = _patterns(args.allow, "PULLER_ALLOW_PATTERNS")
    args.ignore = _patterns(args.ignore, "PULLER_IGNORE_PATTERNS")
    return args


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    disable_progress_bars()  # bars redrawn with carriage returns make unreadable pod logs
    state = State(args.repo, args.revision)
    server = serve(state, args.host, args.port)
    print(f"progress on http://{args.host}:{server.server_address[1]}/progress", flush=True)
    blobs = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=args.repo, repo_type="model") / "blobs"
    stop = threading.Event()

    def sampler() -> None:
        while not stop.wait(SAMPLE_SECONDS):
            sample(state, blobs)

    threading.Thread(target=sampler, name="sampler", daemon=True).start()
    code = 0
    try:
        folder = pull(state, args.allow, args.ignore, args.workers)
        stop.set()
        sample(state, blobs)
        with state.lock:
            state.phase, state.revision = "Ready", folder.name
        print(f"ready: {folder}", flush=True)
    except Exception as error:  # noqa: BLE001 - every failure becomes a reason the operator can show
        stop.set()
        failed = failure(error, args.repo, args.revision, constants.ENDPOINT)
        code = failed.exit_code
        with state.lock:
            state.phase, state.reason, state.message = "Failed", failed.reason, failed.message
        print(f"failed: {failed.reason}: {failed.message}\n{type(error).__name__}: {error}", file=sys.stderr,
              flush=True)
    body = progress(state)
    write_termination(args.termination_log, body)
    time.sleep(args.linger)
    server.shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
