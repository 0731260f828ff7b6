"""The model puller (images/model-puller/puller.py) run as a process against the local hub: its progress
endpoint, its resume after being killed, and the termination message for success and each failure."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import constants

from devcluster.hub import DEFAULT_TOKEN, GATED_REPO, TINY_REPO, LocalHub
from conftest import BIG_REPO, BIG_SIZE, MIB
from devcluster.pytest_plugin import wait_for

PULLER = Path(__file__).resolve().parents[1] / "images" / "model-puller" / "puller.py"
CHUNK = constants.DOWNLOAD_CHUNK_SIZE  # the client writes to disk in chunks of this size
CONFIG = {"model_type": "llama", "torch_dtype": "bfloat16"}


@pytest.fixture(name="hub")
def _hub(private_hub: LocalHub) -> LocalHub:
    return private_hub


class Puller:
    """A puller process; ``url`` is its progress server."""

    def __init__(self, tmp_path: Path, endpoint: str, *args: str, token: str | None = None) -> None:
        self.termination_log = tmp_path / "termination-log"
        self.termination_log.unlink(missing_ok=True)
        env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "PULLER_"))}
        env |= {"HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1",
                "PULLER_TERMINATION_LOG": str(self.termination_log), **({"HF_TOKEN": token} if token else {})}
        self.process = subprocess.Popen([sys.executable, str(PULLER), *args, "--host", "127.0.0.1", "--port", "0"],
                                        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        self.url = self.process.stdout.readline().split()[-1].rsplit("/", 1)[0]

    def get(self, path: str) -> str:
        with urllib.request.urlopen(self.url + path, timeout=5) as response:
            return response.read().decode()

    def progress(self) -> dict[str, Any]:
        return json.loads(self.get("/progress"))

    def finish(self) -> tuple[int, dict[str, Any]]:
        _, stderr = self.process.communicate(timeout=120)
        assert self.termination_log.exists(), stderr
        return self.process.returncode, json.loads(self.termination_log.read_text())


def metric(text: str, name: str) -> float:
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def test_progress_knows_the_total_before_the_first_byte_and_reaches_100_percent(hub: LocalHub,
                                                                                 tmp_path: Path) -> None:
    hub.hold(after=0)
    puller = Puller(tmp_path, hub.url, BIG_REPO, "--linger", "60")
    try:
        total = BIG_SIZE + hub.repos[BIG_REPO].files["config.json"].size
        first = wait_for("the listing", lambda: (p := puller.progress())["phase"] == "Downloading" and p, 60)
        assert first["bytesTotal"] == total and first["bytesDone"] == 0
        assert first["revision"] == hub.repos[BIG_REPO].commit
        assert metric(puller.get("/metrics"), "model_puller_total_bytes") == total

        hub.hold(after=CHUNK + MIB)  # the first chunk reaches the disk, the second does not
        midway = wait_for("a chunk on disk", lambda: (p := puller.progress())["bytesDone"] >= CHUNK and p, 60)
        assert midway["bytesDone"] < total and 0 < midway["percent"] < 100
        text = puller.get("/metrics")
        assert metric(text, "model_puller_done_bytes") == midway["bytesDone"]
        assert 'model_puller_phase{phase="Downloading"} 1' in text

        hub.release()
        done = wait_for("the end", lambda: (p := puller.progress())["phase"] == "Ready" and p, 60)
        assert done["bytesDone"] == total and done["percent"] == 100 and done["etaSeconds"] == 0
        assert 'model_puller_phase{phase="Ready"} 1' in puller.get("/metrics")
        assert puller.get("/health") == "ok\n"
    finally:
        puller.process.kill()
        puller.process.communicate()


def test_a_killed_puller_resumes_from_the_bytes_on_disk(hub: LocalHub, tmp_path: Path) -> None:
    hub.hold(after=CHUNK + MIB)
    first = Puller(tmp_path, hub.url, BIG_REPO)
    wait_for("a chunk on disk", lambda: first.progress()["bytesDone"] >= CHUNK, 60)
    first.process.kill()  # as a Pod's container is killed: no chance to clean up
    first.process.communicate()
    hub.release()

    code, message = Puller(tmp_path, hub.url, BIG_REPO).finish()
    assert code == 0 and message["phase"] == "Ready"
    gets = [r for r in hub.requests if r.method == "GET" and r.path.endswith("/model.safetensors")]
    assert [r.range for r in gets] == [None, f"bytes={CHUNK}-"]
    assert gets[-1].bytes_sent == BIG_SIZE - CHUNK
    blob = next((tmp_path / "hf-home" / "hub").glob("models--local--big/snapshots/*/model.safetensors"))
    expected = hub.repos[BIG_REPO].files["model.safetensors"].read(0, BIG_SIZE)
    assert hashlib.sha256(blob.read_bytes()).digest() == hashlib.sha256(expected).digest()


def test_success_is_written_to_the_termination_message_and_a_second_pull_fetches_nothing(
        hub: LocalHub, tiny: Path, tmp_path: Path) -> None:
    code, message = Puller(tmp_path, hub.url, TINY_REPO).finish()
    total = sum(p.stat().st_size for p in tiny.iterdir())
    commit = hub.repos[TINY_REPO].commit
    assert code == 0
    assert message == {"phase": "Ready", "repo": TINY_REPO, "requestedRevision": "main", "revision": commit,
                       "bytesTotal": total, "bytesDone": total, "files": len(list(tiny.iterdir()))}
    snapshot = tmp_path / "hf-home" / "hub" / "models--local--tiny"
    assert (snapshot / "refs" / "main").read_text() == commit  # what an engine with HF_HUB_OFFLINE=1 looks up
    assert hub.bytes_served(TINY_REPO) == total
    assert hub.count() == hub.count(client="vllm-operator-puller")

    code, message = Puller(tmp_path, hub.url, TINY_REPO).finish()
    assert code == 0 and message["bytesDone"] == total
    assert hub.bytes_served(TINY_REPO) == total


def test_patterns_choose_the_files(hub: LocalHub, tiny: Path, tmp_path: Path) -> None:
    code, message = Puller(tmp_path, hub.url, TINY_REPO, "--allow-pattern", "*.json",
                           "--ignore-pattern", "tokenizer*").finish()
    names = ["config.json", "generation_config.json"]
    assert code == 0 and message["files"] == len(names)
    assert message["bytesTotal"] == sum((tiny / name).stat().st_size for name in names)
    assert hub.bytes_served(TINY_REPO) == message["bytesTotal"]


@pytest.mark.parametrize(("repo", "args", "token", "reason", "says"), [
    ("local/no-such-model", [], None, "RepositoryNotFound", "model.name"),
    (TINY_REPO, ["--revision", "no-such-branch"], None, "RevisionNotFound", "model.revision"),
    (GATED_REPO, [], None, "GatedRepo", "model.hfTokenSecretRef"),
    (GATED_REPO, [], "hf_someone_else", "GatedRepo", "model.hfTokenSecretRef"),
], ids=["missing-repo", "missing-revision", "gated-without-token", "gated-without-access"])
def test_a_failure_that_a_retry_cannot_mend_is_named_in_the_termination_message(
        hub: LocalHub, tiny: Path, tmp_path: Path, repo: str, args: list[str], token: str | None, reason: str,
        says: str) -> None:
    code, message = Puller(tmp_path, hub.url, repo, *args, token=token).finish()
    assert code == 2
    assert message["phase"] == "Failed" and message["reason"] == reason and says in message["message"]
    assert hub.bytes_served(repo) == 0


def test_the_gated_repo_downloads_with_an_authorized_token(hub: LocalHub, tiny: Path, tmp_path: Path) -> None:
    code, message = Puller(tmp_path, hub.url, GATED_REPO, token=DEFAULT_TOKEN).finish()
    assert code == 0 and message["bytesDone"] == message["bytesTotal"] > 0


def test_an_unreachable_hub_is_a_failure_worth_retrying(tmp_path: Path) -> None:
    with LocalHub([]).serve() as stopped:
        endpoint = stopped.url
    code, message = Puller(tmp_path, endpoint, TINY_REPO).finish()
    assert code == 1 and message["reason"] == "HubUnreachable" and endpoint in message["message"]
    assert message["bytesTotal"] is None
