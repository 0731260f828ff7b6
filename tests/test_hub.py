"""The local hub (hack/devcluster/hub.py) against the real huggingface_hub client: what the client downloads,
lists and raises must be what it would with huggingface.co."""

from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from devcluster.hub import (
    DEFAULT_TOKEN,
    GATED_REPO,
    SYNTHETIC_REPOS,
    TINY_REPO,
    LocalHub,
)

from conftest import BIG_REPO, BIG_SIZE, MIB

LLAMA_8B = "meta-llama/Llama-3.1-8B-Instruct"


@pytest.fixture(name="hub")
def _hub(private_hub: LocalHub) -> LocalHub:
    return private_hub


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_snapshot_download_of_the_tiny_model_gives_its_files_once(hub: LocalHub, tiny: Path, tmp_path: Path) -> None:
    folder = Path(snapshot_download(TINY_REPO, cache_dir=tmp_path / "cache", endpoint=hub.url, token=False))
    files = sorted(p.name for p in tiny.iterdir())
    assert sorted(p.name for p in folder.iterdir()) == files
    for name in files:
        assert (folder / name).read_bytes() == (tiny / name).read_bytes(), name
    assert folder.name == hub.repos[TINY_REPO].commit
    total = sum((tiny / name).stat().st_size for name in files)
    assert hub.bytes_served(TINY_REPO) == total

    # Again into the same cache: the files are there, so nothing is fetched.
    snapshot_download(TINY_REPO, cache_dir=tmp_path / "cache", endpoint=hub.url, token=False)
    assert hub.bytes_served(TINY_REPO) == total
    assert hub.count(path=f"/{TINY_REPO}/resolve/", method="GET") == len(files)


def test_model_info_lists_sizes_and_resolves_the_revision_to_a_commit(hub: LocalHub) -> None:
    declared = json.loads((SYNTHETIC_REPOS / LLAMA_8B / "safetensors.json").read_text())
    api = HfApi(endpoint=hub.url, token=False)
    info = api.model_info(LLAMA_8B, files_metadata=True)
    sizes = {s.rfilename: s.size for s in info.siblings or []}
    assert sizes == {"config.json": (SYNTHETIC_REPOS / LLAMA_8B / "config.json").stat().st_size,
                     **declared["files"]}
    assert info.sha == hub.repos[LLAMA_8B].commit
    assert info.safetensors is not None and info.safetensors.parameters == declared["parameters"]
    assert all(s.lfs is not None and s.lfs.size == s.size for s in info.siblings or [] if s.rfilename.endswith(
        ".safetensors"))
    assert api.model_info(LLAMA_8B, revision=info.sha).sha == info.sha
    assert api.list_repo_files(LLAMA_8B, revision=info.sha) == sorted(sizes)


def test_a_synthetic_file_has_a_safetensors_header_that_fills_it(hub: LocalHub) -> None:
    name = "model-00001-of-00004.safetensors"
    size = json.loads((SYNTHETIC_REPOS / LLAMA_8B / "safetensors.json").read_text())["files"][name]
    metadata = HfApi(endpoint=hub.url, token=False).parse_safetensors_file_metadata(LLAMA_8B, name)
    (tensor,) = metadata.tensors.values()
    start, end = tensor.data_offsets
    header = hub.repos[LLAMA_8B].files[name].read(0, 8)
    assert tensor.dtype == "BF16" and start == 0
    assert 8 + int.from_bytes(header, "little") + end == size
    # Only the header was sent, not the 5 GB behind it.
    assert hub.bytes_served(LLAMA_8B) < 200_000


def test_a_gated_repo_lists_its_files_but_serves_them_only_with_an_authorized_token(
        hub: LocalHub, tiny: Path, tmp_path: Path) -> None:
    assert HfApi(endpoint=hub.url, token=False).model_info(GATED_REPO).gated == "manual"
    with pytest.raises(GatedRepoError) as anonymous:
        hf_hub_download(GATED_REPO, "config.json", cache_dir=tmp_path, endpoint=hub.url, token=False)
    assert anonymous.value.response.status_code == 401
    with pytest.raises(GatedRepoError) as stranger:
        hf_hub_download(GATED_REPO, "config.json", cache_dir=tmp_path, endpoint=hub.url, token="hf_someone_else")
    assert stranger.value.response.status_code == 403
    path = hf_hub_download(GATED_REPO, "config.json", cache_dir=tmp_path, endpoint=hub.url, token=DEFAULT_TOKEN)
    assert Path(path).read_bytes() == (tiny / "config.json").read_bytes()


def test_missing_repos_revisions_and_files_raise_what_the_client_raises_for_the_hub(
        hub: LocalHub, tmp_path: Path) -> None:
    api = HfApi(endpoint=hub.url, token=False)
    with pytest.raises(RepositoryNotFoundError) as anonymous:
        api.model_info("local/no-such-model")
    assert anonymous.value.response.status_code == 401 and not isinstance(anonymous.value, GatedRepoError)
    with pytest.raises(RepositoryNotFoundError) as signed_in:
        HfApi(endpoint=hub.url, token=DEFAULT_TOKEN).model_info("local/no-such-model")
    assert signed_in.value.response.status_code == 404
    with pytest.raises(RevisionNotFoundError):
        snapshot_download(LLAMA_8B, revision="no-such-branch", cache_dir=tmp_path, endpoint=hub.url, token=False)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(LLAMA_8B, "config.json", revision="0" * 40, cache_dir=tmp_path, endpoint=hub.url,
                        token=False)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(LLAMA_8B, "tokenizer.model", cache_dir=tmp_path, endpoint=hub.url, token=False)


def test_a_cut_download_resumes_without_fetching_the_received_bytes_again(hub: LocalHub, tmp_path: Path) -> None:
    # Cut where the client has just written its first chunk to disk: it must continue from there.
    hub.cut_next(BIG_REPO, "model.safetensors", after=constants.DOWNLOAD_CHUNK_SIZE)
    path = hf_hub_download(BIG_REPO, "model.safetensors", cache_dir=tmp_path, endpoint=hub.url, token=False)
    expected = hub.repos[BIG_REPO].files["model.safetensors"].read(0, BIG_SIZE)
    assert sha256(Path(path).read_bytes()) == sha256(expected)
    gets = [r for r in hub.requests if r.method == "GET" and r.path.endswith("/model.safetensors")]
    assert [r.range for r in gets] == [None, f"bytes={constants.DOWNLOAD_CHUNK_SIZE}-"]
    assert [r.status for r in gets] == [200, 206]
    assert hub.bytes_served(BIG_REPO, "model.safetensors") == BIG_SIZE


def test_requests_are_counted_per_path_and_per_client(hub: LocalHub, tiny: Path, tmp_path: Path) -> None:
    HfApi(endpoint=hub.url, token=False, library_name="engine").model_info(TINY_REPO)
    hf_hub_download(TINY_REPO, "config.json", cache_dir=tmp_path, endpoint=hub.url, token=False,
                    library_name="puller")
    assert hub.count(client="engine") == 1
    assert hub.count(client="puller", path=f"/{TINY_REPO}/resolve/") == 2  # HEAD, then GET
    assert hub.count(client="puller", method="GET") == 1
    hub.reset_counts()
    assert hub.count() == 0


def test_ranges_are_served_as_asked_also_when_throttled(hub: LocalHub) -> None:
    hub.throttle = 10 * MIB
    url = f"{hub.url}/{BIG_REPO}/resolve/main/model.safetensors"
    content = hub.repos[BIG_REPO].files["model.safetensors"].read(0, BIG_SIZE)

    def get(byte_range: str) -> tuple[int, str | None, bytes]:
        request = urllib.request.Request(url, headers={"Range": byte_range})
        try:
            with urllib.request.urlopen(request) as response:
                return response.status, response.headers["Content-Range"], response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.headers["Content-Range"], b""

    assert get("bytes=1000-1999") == (206, f"bytes 1000-1999/{BIG_SIZE}", content[1000:2000])
    assert get("bytes=-300000") == (206, f"bytes {BIG_SIZE - 300000}-{BIG_SIZE - 1}/{BIG_SIZE}", content[-300000:])
    assert get(f"bytes={BIG_SIZE}-") == (416, f"bytes */{BIG_SIZE}", b"")
