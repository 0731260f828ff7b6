"""LoRA adapters, the pure parts: the plan against what an engine lists, the engine's error words, the flags,
volumes and readiness gate they render to, and their status."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from vllm_operator import api
from vllm_operator.adapters.engine import error_message
from vllm_operator.adapters.plan import Plan, Refusal, loaded_adapters, plan, settled
from vllm_operator.adapters.sync import ReplicaAdapters
from vllm_operator.cache.download import Download
from vllm_operator.reconcile.controller import EngineView, _adapter_status, _gate_current
from vllm_operator.reconcile.status import status_events
from vllm_operator.render.adapters import READINESS_GATE, RUNTIME_UPDATES_ENV, wanted_adapters
from vllm_operator.render.engine_args import engine_args, engine_env
from vllm_operator.render.manifests import Owner, deployment
from vllm_operator.render.puller import PullerSettings, adapter_pull, job_name, pull_job

DATA = Path(__file__).parent / "data" / "vllm-0.32.0"
BASE = "tiny"


def spec(**fields: Any) -> api.LLMDeploymentSpec:
    return api.LLMDeploymentSpec.model_validate(
        {"model": {"name": "org/model"}, "accelerator": {"type": "cpu"}, **fields})


def models_body(*adapters: tuple[str, str]) -> dict[str, Any]:
    """/v1/models as vLLM 0.32 answers it: the base model, then each adapter with the base as parent."""
    return {"object": "list", "data": [
        {"id": BASE, "object": "model", "root": "/cache/model", "parent": None, "max_model_len": 512},
        *({"id": name, "object": "model", "root": path, "parent": BASE, "max_model_len": None}
          for name, path in adapters)]}


def test_an_engine_lists_its_adapters_by_parent_and_never_the_base_model() -> None:
    body = models_body(("a1", "/adapters/c/a1"), ("a2", "/adapters/c/a2"))
    assert loaded_adapters(body, BASE) == {"a1": "/adapters/c/a1", "a2": "/adapters/c/a2"}
    assert loaded_adapters(body, "another-model") == {}
    assert loaded_adapters({"data": "garbage"}, BASE) == {}


def test_the_plan_loads_what_is_missing_and_unloads_what_is_not_wanted_or_moved() -> None:
    wanted = {"a1": "/adapters/c/a1", "a2": "/adapters/c/a2-v2"}
    loaded = {"a2": "/adapters/c/a2", "old": "/adapters/c/old"}
    assert plan(wanted, loaded, {}, now=0) == Plan(unload=("a2", "old"), load={"a1": "/adapters/c/a1",
                                                                              "a2": "/adapters/c/a2-v2"})
    assert plan(wanted, dict(wanted), {}, now=0) == Plan()


def test_a_refused_folder_waits_for_the_retry_but_a_new_folder_is_tried_at_once() -> None:
    wanted = {"big": "/adapters/c/big"}
    refused = {"big": Refusal("/adapters/c/big", at=100.0, message="LoRA rank 32 is greater than max_lora_rank 16.")}
    assert plan(wanted, {}, refused, now=130.0, retry_seconds=60) == Plan()
    assert plan(wanted, {}, refused, now=161.0, retry_seconds=60).load == wanted
    assert plan({"big": "/adapters/c/big-r8"}, {}, refused, now=130.0, retry_seconds=60).load == {
        "big": "/adapters/c/big-r8"}


def test_an_engine_is_settled_once_every_adapter_is_loaded_or_refused_from_its_folder() -> None:
    wanted = {"a1": "/a1", "big": "/big"}
    refusal = Refusal("/big", 0.0, "too big")
    assert settled(wanted, {"a1": "/a1"}, {"big": refusal})
    assert not settled(wanted, {"a1": "/a1"}, {})
    assert not settled(wanted, {"a1": "/a1"}, {"big": Refusal("/big-old", 0.0, "too big")})
    assert settled({}, {}, {})


@pytest.mark.parametrize("case", ["rank-above-max", "already-loaded", "no-such-folder", "unload-unknown"])
def test_the_engines_own_words_are_kept_from_its_error_bodies(case: str) -> None:
    answer = json.loads((DATA / "lora-load-refused.json").read_text())[case]
    assert error_message(answer["status"], json.dumps(answer["body"])) == answer["body"]["error"]["message"]


def test_an_error_body_that_is_not_openai_shaped_is_kept_as_text() -> None:
    assert error_message(502, "<html>Bad gateway</html>\n") == "HTTP 502: <html>Bad gateway</html>"
    assert error_message(400, '{"message": "plain"}') == "plain"


def test_adapters_turn_lora_on_with_runtime_updates_a_gate_and_their_claims_mounted_read_only() -> None:
    served = spec(adapters=[{"name": "sql", "source": "pvc://adapters/sql/v1"},
                            {"name": "chat", "source": "file:///opt/adapters/chat"}],
                  engine={"maxLoraRank": 32})
    args = engine_args(served, "m")
    assert args[args.index("--enable-lora"):][:7] == ["--enable-lora", "--max-loras", str(api.DEFAULT_MAX_LORAS),
                                                      "--max-cpu-loras", str(api.DEFAULT_MAX_LORAS),
                                                      "--max-lora-rank", "32"]
    assert {"name": RUNTIME_UPDATES_ENV, "value": "True"} in engine_env(served)
    pod = deployment(served, Owner("m", "ns", "uid"))["spec"]["template"]["spec"]
    assert pod["readinessGates"] == [{"conditionType": READINESS_GATE}]
    claim_volume = next(v for v in pod["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == "adapters")
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == claim_volume["name"])
    assert claim_volume["persistentVolumeClaim"]["readOnly"] and mount == {
        "name": claim_volume["name"], "mountPath": "/adapters/adapters", "readOnly": True}
    assert wanted_adapters(served, {}) == {"sql": "/adapters/adapters/sql/v1", "chat": "/opt/adapters/chat"}


def test_without_adapters_or_max_loras_nothing_of_lora_is_rendered() -> None:
    plain = spec()
    assert "--enable-lora" not in engine_args(plain, "m")
    assert all(var["name"] != RUNTIME_UPDATES_ENV for var in engine_env(plain))
    assert "readinessGates" not in deployment(plain, Owner("m", "ns", "uid"))["spec"]["template"]["spec"]
    # maxLoras alone keeps LoRA on, so that the first adapter added later needs no restart.
    assert "--enable-lora" in engine_args(spec(engine={"maxLoras": 2}), "m")


def test_an_adapter_may_not_take_the_served_name() -> None:
    assert api.adapter_name_clash(spec(adapters=[{"name": "m", "source": "file:///a"}]), "m")
    named = spec(model={"name": "org/model", "servedName": "chat"}, adapters=[{"name": "m", "source": "file:///a"}])
    assert api.adapter_name_clash(named, "m") is None
    with pytest.raises(ValidationError, match="served name"):
        spec(adapters=[{"name": "chat", "source": "file:///a"}], model={"name": "org/model", "servedName": "chat"})


@pytest.mark.parametrize("source", ["hf://org/adapter\n", "hf://org/a/b", "s3://b/x", "pvc://Claim/x", "pvc://claim", "pvc://claim/",
                                    "file://relative", "file:///a/../etc", "pvc://c/a b"])
def test_a_source_of_no_known_form_is_refused(source: str) -> None:
    with pytest.raises(ValidationError):
        spec(adapters=[{"name": "x", "source": source}])


def test_status_counts_each_adapter_over_the_engines_and_keeps_the_engines_refusal() -> None:
    served = spec(adapters=[{"name": "a1", "source": "file:///a1"}, {"name": "a2", "source": "file:///a2"},
                            {"name": "big", "source": "file:///big"}])
    view = EngineView(adapters={
        "pod-a": ReplicaAdapters(frozenset({"a1", "a2"}), {"big": "LoRA rank 32 is greater than max_lora_rank 16."}),
        "pod-b": ReplicaAdapters(frozenset({"a1"}), {"big": "LoRA rank 32 is greater than max_lora_rank 16."}),
    })
    status = {a["name"]: a for a in _adapter_status(served, view, {}) or []}
    assert status["a1"] == {"name": "a1", "state": "Loaded", "loadedReplicas": 2, "replicas": 2}
    assert status["a2"]["state"] == "Loading" and status["a2"]["loadedReplicas"] == 1
    assert status["big"]["state"] == "Failed" and "max_lora_rank 16" in status["big"]["message"]
    assert _adapter_status(served, EngineView(), {})[0]["state"] == "Loading"  # no engine running yet
    unasked = EngineView(adapters={"pod-a": ReplicaAdapters(error="Unauthorized")})
    assert _adapter_status(served, unasked, {})[0]["message"] == "engine pod-a could not be asked: Unauthorized"
    assert _adapter_status(spec(), view, {}) is None


def test_an_adapter_loaded_everywhere_or_refused_is_an_event_once() -> None:
    loading = {"adapters": [{"name": "a1", "state": "Loading", "loadedReplicas": 0, "replicas": 1}]}
    loaded = {"adapters": [{"name": "a1", "state": "Loaded", "loadedReplicas": 1, "replicas": 1}]}
    failed = {"adapters": [{"name": "a1", "state": "Failed", "loadedReplicas": 0, "replicas": 1, "message": "no"}]}
    assert status_events(loading, loaded) == [("Normal", "AdapterLoaded", "adapter a1 is loaded in all 1 running "
                                                                          "engines")]
    assert status_events(loaded, loaded) == []
    assert status_events(loading, failed) == [("Warning", "AdapterFailed", "an engine refused adapter a1: no")]
    assert status_events(failed, failed) == []


def test_an_adapter_from_the_hub_is_wanted_once_downloaded_from_the_commit_the_download_resolved() -> None:
    served = spec(adapters=[{"name": "sql", "source": "hf://org/sql-lora", "revision": "v2"},
                            {"name": "chat", "source": "file:///opt/chat"}])
    assert wanted_adapters(served, {}) == {"chat": "/opt/chat"}
    commit = "a" * 40
    assert wanted_adapters(served, {"sql": commit})["sql"] == \
        f"/cache/huggingface/hub/models--org--sql-lora/snapshots/{commit}"
    # A download that did not say its commit (no termination message): the engine resolves the repo id itself.
    assert wanted_adapters(served, {"sql": None})["sql"] == "org/sql-lora"


def test_an_adapter_from_the_hub_has_a_download_job_of_its_own_on_the_cache_claim() -> None:
    served = spec(adapters=[{"name": "sql", "source": "hf://org/sql-lora", "revision": "v2"}],
                  model={"name": "org/model", "hfTokenSecretRef": {"name": "hf", "key": "token"}})
    pull = adapter_pull(served.adapters[0])
    job = pull_job(served, Owner("m", "ns", "uid"), PullerSettings(), pull)
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][:3] == ["org/sql-lora", "--revision", "v2"]
    assert "adapter_model.*" in container["args"]
    assert job["metadata"]["name"] == job_name(served, "m", pull) != job_name(served, "m")
    assert job["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "m-cache"
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}} in container["env"]


def test_an_adapter_still_downloading_or_whose_download_failed_says_so() -> None:
    served = spec(adapters=[{"name": "sql", "source": "hf://org/sql-lora"}, {"name": "gone", "source": "hf://org/x"}])
    downloading = Download({"phase": "Downloading", "job": "m-cache-pull-1", "percent": 40.0,
                            "message": "downloading org/sql-lora: 4.0 MB of 10.0 MB"})
    failed = Download({"phase": "Failed", "job": "m-cache-pull-2", "message": "the download failed: no such repo"},
                      failure=("RepoNotFound", "the download failed: no such repo"))
    status = {a["name"]: a for a in _adapter_status(served, EngineView(), {"sql": downloading, "gone": failed}) or []}
    assert (status["sql"]["state"], status["sql"]["download"]["percent"]) == ("Downloading", 40.0)
    assert status["sql"]["message"] == "downloading org/sql-lora: 4.0 MB of 10.0 MB"
    assert (status["gone"]["state"], status["gone"]["message"]) == ("Failed", "the download failed: no such repo")


def test_a_gate_opened_before_the_engine_restarted_is_stale() -> None:
    def pod(gate: str | None, started: str) -> dict[str, Any]:
        conditions = [{"type": READINESS_GATE, "status": "True", "lastTransitionTime": gate}] if gate else []
        return {"status": {"conditions": conditions, "containerStatuses": [
            {"name": "vllm", "state": {"running": {"startedAt": started}}}]}}

    assert _gate_current(pod("2026-12-02T01:00:40Z", started="2026-12-02T01:00:00Z"))
    assert not _gate_current(pod("2026-12-02T01:00:40Z", started="2026-12-02T01:05:00Z"))  # restarted since
    assert not _gate_current(pod(None, started="2026-12-02T01:00:00Z"))
