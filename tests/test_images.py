"""The container images, checked without a Docker engine: their Dockerfiles, read by Docker's own
parser (the `dockerfile` package), must follow the conventions the chart relies on."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

import dockerfile
import pytest
import yaml

from vllm_operator.render.profiles import PROFILES

REPO = Path(__file__).resolve().parents[1]
IMAGES = sorted((REPO / "images").glob("*/Dockerfile"))
OPERATOR = REPO / "images" / "operator" / "Dockerfile"
# Tools that compile or fetch; none belongs in an image that only runs.
BUILD_TOOLS = re.compile(r"\b(gcc|g\+\+|cc|make|build-essential|apt-get install|pip install|pip3 install)\b")


@dataclass
class Stage:
    base: str
    commands: list[dockerfile.Command]

    def last(self, instruction: str) -> dockerfile.Command | None:
        return next((c for c in reversed(self.commands) if c.cmd == instruction), None)


def stages(path: Path) -> list[Stage]:
    """The build stages, with ARGs declared before the first FROM substituted into FROM."""
    args: dict[str, str] = {}
    found: list[Stage] = []
    for command in dockerfile.parse_file(str(path)):
        if command.cmd == "ARG" and not found:
            name, _, default = command.value[0].partition("=")
            args[name] = default
        elif command.cmd == "FROM":
            base = re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], command.value[0])
            found.append(Stage(base, []))
        elif found:
            found[-1].commands.append(command)
    return found


@pytest.fixture(params=IMAGES, ids=[p.parent.name for p in IMAGES])
def image(request: pytest.FixtureRequest) -> Path:
    path: Path = request.param
    return path


def test_both_images_exist() -> None:
    assert [p.parent.name for p in IMAGES] == ["model-puller", "operator"]


def test_multi_stage_with_pinned_bases(image: Path) -> None:
    built = stages(image)
    assert len(built) >= 2, f"{image}: build and runtime must be separate stages"
    for stage in built:
        repository, _, tag = stage.base.partition(":")
        assert tag and tag != "latest" and re.match(r"\d+\.\d+", tag), f"{image}: unpinned base {stage.base}"


def test_final_stage_runs_unprivileged_without_build_tools(image: Path) -> None:
    final = stages(image)[-1]
    user = final.last("USER")
    assert user is not None, f"{image}: the final stage sets no USER"
    uid, _, gid = user.value[0].partition(":")
    assert uid.isdigit() and int(uid) >= 1000 and (not gid or int(gid) >= 1000), f"{image}: USER {user.value[0]}"
    for command in final.commands:
        if command.cmd == "RUN":
            assert not BUILD_TOOLS.search(" ".join(command.value)), f"{image}: {command.original}"
    copied_from = {flag for c in final.commands if c.cmd == "COPY" for flag in c.flags if flag.startswith("--from")}
    assert copied_from == {"--from=builder"}, f"{image}: the final stage copies from {copied_from}"


def test_builder_keeps_no_pip_cache(image: Path) -> None:
    builder = stages(image)[0]
    env = {name: value for c in builder.commands if c.cmd == "ENV" for name, value in zip(c.value[::2], c.value[1::2])}
    assert env.get("PIP_NO_CACHE_DIR") == "1", f"{image}: pip would cache downloads into the layer"


def test_entrypoint_is_exec_form(image: Path) -> None:
    final = stages(image)[-1]
    entrypoint = final.last("ENTRYPOINT")
    assert entrypoint is not None and entrypoint.json, f"{image}: ENTRYPOINT must be a JSON list (exec form)"
    command = final.last("CMD")
    assert command is None or command.json, f"{image}: CMD must be a JSON list (exec form)"


def test_operator_image_runs_the_packaged_command_as_the_charts_user() -> None:
    final = stages(OPERATOR)[-1]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    entrypoint = final.last("ENTRYPOINT")
    command = final.last("CMD")
    assert entrypoint is not None and list(entrypoint.value) == ["vllm-operator"] and "vllm-operator" in scripts
    assert command is not None and list(command.value) == ["run"]
    values = yaml.safe_load((REPO / "charts" / "vllm-operator" / "values.yaml").read_text())
    user = final.last("USER")
    assert user is not None and user.value[0] == f"{values['podSecurityContext']['runAsUser']}:" \
        f"{values['podSecurityContext']['runAsGroup']}"


def test_operator_build_context_holds_what_the_dockerfile_copies() -> None:
    allowed = {line.strip().lstrip("!").rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    builder = stages(OPERATOR)[0]
    sources = [src for c in builder.commands if c.cmd == "COPY" and not c.flags for src in c.value[:-1]]
    assert sources
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: no such path in the repository"
        assert source.rstrip("/") in allowed, f"COPY {source}: excluded by .dockerignore"


def test_images_doc_names_every_profiles_default_engine_image() -> None:
    text = (REPO / "docs" / "images.md").read_text()
    for profile in PROFILES.values():
        assert f"`{profile.image}`" in text, f"docs/images.md does not name {profile.type}'s image {profile.image}"
