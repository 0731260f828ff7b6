"""Serving benchmarks on demand, without a cluster: the request, the Job, the wrapper's message, the result
(from real ``vllm bench serve`` results against the tiny model) and what each reconcile does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from vllm_operator import api, benchmark
from vllm_operator.api import LLMDeploymentSpec
from vllm_operator.benchmark import wrapper
from vllm_operator.render.manifests import Owner, deployment

DATA = Path(__file__).resolve().parent / "data" / "vllm-0.32.0"
BENCH_OPTIONS = {line for line in (DATA / "bench-serve-options.txt").read_text().splitlines()
                 if line and not line.startswith("#")}
OWNER = Owner("tiny", "ns", "uid-1")
NOW = "2026-12-01T18:00:00Z"
Obj = dict[str, Any]


def a_spec(**extra: Any) -> LLMDeploymentSpec:
    return LLMDeploymentSpec.model_validate({"model": {"name": "vllm-operator/tiny-llama"},
                                             "accelerator": {"type": "cpu"}, **extra})


def annotated(request: Obj | str) -> dict[str, str]:
    return {api.BENCHMARK_ANNOTATION: request if isinstance(request, str) else json.dumps(request)}


def real_result(name: str) -> Obj:
    result: Obj = json.loads((DATA / name).read_text())
    return result


# -- the request --------------------------------------------------------------------------------------


def test_no_annotation_is_no_request() -> None:
    assert benchmark.parse_request({"other": "x"}) is None
    assert benchmark.parse_request(None) is None


def test_a_request_gets_vllm_defaults_written_out() -> None:
    parsed = benchmark.parse_request(annotated({"id": "r1", "numPrompts": 5, "requestRate": 2}))
    assert parsed is not None and parsed.request is not None
    settings = parsed.request.resolved()
    assert (settings.dataset, settings.num_prompts, settings.request_rate) == ("random", 5, 2.0)
    assert (settings.input_len, settings.output_len) == (1024, 128)


@pytest.mark.parametrize(("request_", "message"), [
    ("{not json", "annotation llm.vllm-operator.io/benchmark is not JSON"),
    ("[1]", "must be a JSON object"),
    ({"numPrompts": 5}, "benchmark.id: Field required"),
    ({"id": "r", "numPrompts": 0}, "benchmark.numPrompts: Input should be greater than or equal to 1"),
    ({"id": "r", "requestRate": 0}, "benchmark.requestRate: Input should be greater than 0"),
    ({"id": "r", "maxConcurrency": 0}, "benchmark.maxConcurrency: Input should be greater than or equal to 1"),
    ({"id": "r", "rate": 3}, "benchmark.rate: Extra inputs are not permitted"),
    ({"id": "r", "dataset": "sharegpt"}, "dataset sharegpt needs datasetPath"),
    ({"id": "r", "datasetPath": "a.json"}, "datasetPath applies to dataset sharegpt only"),
    ({"id": "r", "dataset": "sharegpt", "datasetPath": "../etc/passwd"}, "relative to its root"),
    ({"id": "r", "dataset": "sharegpt", "datasetPath": "/etc/passwd"}, "relative to its root"),
    ({"id": "r", "dataset": "sharegpt", "datasetPath": "d.json", "inputLen": 5}, "inputLen applies to dataset random"),
    ({"id": "bad id!"}, "benchmark.id: String should match pattern"),
])
def test_an_invalid_request_says_what_is_wrong(request_: Obj | str, message: str) -> None:
    parsed = benchmark.parse_request(annotated(request_))
    assert parsed is not None and parsed.request is None
    assert parsed.error is not None and message in parsed.error, parsed.error


# -- the Job ------------------------------------------------------------------------------------------


def a_request(**fields: Any) -> api.BenchmarkRequest:
    return api.BenchmarkRequest.model_validate({"id": "r1", **fields})


def container_of(job: Obj) -> Obj:
    containers: list[Obj] = job["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def test_the_job_runs_vllms_benchmark_against_the_service_with_the_engine_image() -> None:
    spec = a_spec(service={"port": 8080})
    job = benchmark.job(spec, OWNER, a_request(numPrompts=7, requestRate=3, maxConcurrency=2, inputLen=64,
                                               outputLen=32))
    container = container_of(job)
    engine = deployment(spec, OWNER)["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == engine["image"]
    assert container["command"] == ["python3", "-c", benchmark.WRAPPER]
    args = container["args"]
    options = [a for a in args if a.startswith("--")]
    assert set(options) <= BENCH_OPTIONS, set(options) - BENCH_OPTIONS
    flags = dict(zip(args[::2], args[1::2]))
    assert flags["--base-url"] == "http://tiny.ns.svc.cluster.local:8080"
    assert (flags["--served-model-name"], flags["--model"]) == ("tiny", "vllm-operator/tiny-llama")
    assert (flags["--num-prompts"], flags["--request-rate"], flags["--max-concurrency"]) == ("7", "3.0", "2")
    assert (flags["--input-len"], flags["--output-len"], flags["--dataset-name"]) == ("64", "32", "random")
    assert "p50" not in flags["--metric-percentiles"] and "50" in flags["--metric-percentiles"].split(",")


def test_the_job_belongs_to_the_llmdeployment_and_runs_restricted() -> None:
    job = benchmark.job(a_spec(), OWNER, a_request())
    meta = job["metadata"]
    assert meta["ownerReferences"] == [OWNER.reference] and OWNER.reference["controller"] is True
    assert meta["labels"]["app.kubernetes.io/component"] == "benchmark"
    assert meta["labels"]["app.kubernetes.io/managed-by"] == "vllm-operator"
    assert meta["annotations"][benchmark.ID_ANNOTATION] == "r1"
    assert job["spec"]["backoffLimit"] == 0 and job["spec"]["activeDeadlineSeconds"] > 0
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    assert pod["securityContext"] == {"seccompProfile": {"type": "RuntimeDefault"}}
    container = container_of(job)
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    assert container["terminationMessagePath"] == "/dev/termination-log"
    assert {"name": "BENCHMARK_MESSAGE_PATH", "value": "/dev/termination-log"} in container["env"]


def test_the_api_key_comes_from_its_secret_and_never_into_the_command_line() -> None:
    spec = a_spec(apiKeySecretRef={"name": "keys", "key": "tiny"})
    container = container_of(benchmark.job(spec, OWNER, a_request()))
    assert {"name": "OPENAI_API_KEY", "valueFrom": {"secretKeyRef": {"name": "keys", "key": "tiny"}}} \
        in container["env"]
    assert not any("keys" in part or "API_KEY" in part for part in container["args"])
    assert all("value" not in e for e in container["env"] if e["name"] == "OPENAI_API_KEY")


def test_a_job_without_an_api_key_sends_none() -> None:
    container = container_of(benchmark.job(a_spec(), OWNER, a_request()))
    assert not any(e["name"] == "OPENAI_API_KEY" for e in container["env"])


def test_a_read_write_once_cache_is_mounted_read_only_next_to_an_engine() -> None:
    spec = a_spec(tolerations=[{"key": "k", "operator": "Exists", "effect": "NoSchedule"}])
    job = benchmark.job(spec, OWNER, a_request(dataset="sharegpt", datasetPath="data/sg.json"))
    pod = job["spec"]["template"]["spec"]
    assert pod["volumes"] == [{"name": "cache", "persistentVolumeClaim": {"claimName": "tiny-cache", "readOnly": True}}]
    assert container_of(job)["volumeMounts"] == [{"name": "cache", "mountPath": "/cache", "readOnly": True}]
    affinity = pod["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert affinity["topologyKey"] == "kubernetes.io/hostname"
    assert affinity["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "engine"
    assert {"key": "k", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert {"name": "HF_HUB_OFFLINE", "value": "1"} in container_of(job)["env"]
    args = container_of(job)["args"]
    assert args[args.index("--dataset-path") + 1] == "/cache/data/sg.json"
    assert "--input-len" not in args


def test_a_shared_cache_needs_no_engine_node() -> None:
    spec = a_spec(cache={"accessMode": "ReadWriteMany"})
    assert "affinity" not in benchmark.job(spec, OWNER, a_request())["spec"]["template"]["spec"]


def test_job_names_fit_a_label_value() -> None:
    name = benchmark.job_name("x" * 253, "r1")
    assert len(name) <= 63 and name.endswith(benchmark.job_name("x", "r1").removeprefix("x"))
    assert benchmark.job_name("tiny", "r1") != benchmark.job_name("tiny", "r2")


# -- the wrapper's message and the result ---------------------------------------------------------------


def test_the_message_keeps_the_figures_of_a_real_result_within_4_kib() -> None:
    result = real_result("bench-serve-ok.json")
    text = wrapper.message({"startTime": "a", "completionTime": "b", "result": wrapper.figures(result)})
    assert len(text.encode()) <= wrapper.MESSAGE_BYTES
    report = json.loads(text)
    assert report["result"]["p99_itl_ms"] == result["p99_itl_ms"] and "ttfts" not in report["result"]


def test_the_message_drops_long_texts_before_it_overflows() -> None:
    figures = {"completed": 3, "first_error": "x" * 5000, "label": "y" * 100}
    report = json.loads(wrapper.message({"startTime": "a", "result": figures}))
    assert report["result"] == {"completed": 3, "label": "y" * 100}


def test_results_of_a_real_run() -> None:
    result = real_result("bench-serve-ok.json")
    figures = benchmark.results(json.loads(wrapper.message({"result": wrapper.figures(result)}))["result"])
    assert (figures.completed_requests, figures.failed_requests) == (8, 0)
    assert figures.request_throughput == pytest.approx(result["request_throughput"])
    assert figures.output_tokens_per_second == pytest.approx(result["output_throughput"])
    assert figures.ttft_seconds_p50 == pytest.approx(result["p50_ttft_ms"] / 1000)
    assert figures.ttft_seconds_p99 == pytest.approx(result["p99_ttft_ms"] / 1000)
    assert figures.itl_seconds_p50 == pytest.approx(result["p50_itl_ms"] / 1000)
    assert figures.itl_seconds_p99 == pytest.approx(result["p99_itl_ms"] / 1000)
    assert figures.first_error is None


def test_results_of_a_real_run_whose_requests_all_failed() -> None:
    figures = benchmark.results(wrapper.figures(real_result("bench-serve-unauthorized.json")))
    assert (figures.completed_requests, figures.failed_requests, figures.first_error) == (0, 4, "Unauthorized")


# -- one reconcile at a time ------------------------------------------------------------------------------


def parsed(**fields: Any) -> benchmark.Parsed | None:
    return benchmark.parse_request(annotated({"id": "r1", "numPrompts": 5, **fields}))


def a_job(request_id: str = "r1", finished: str | None = None, owner_uid: str = OWNER.uid) -> Obj:
    job = benchmark.job(a_spec(), OWNER, a_request(id=request_id))
    job["metadata"]["uid"] = f"job-{request_id}"
    job["metadata"]["ownerReferences"][0]["uid"] = owner_uid
    if finished:
        job["status"] = {"conditions": [{"type": finished, "status": "True", "reason": "DeadlineExceeded",
                                         "message": "Job was active longer than specified deadline"}]}
    return job


def a_pod(request_id: str = "r1", message: str | None = None, exit_code: int = 0) -> Obj:
    terminated = {"exitCode": exit_code, "finishedAt": NOW, "message": message}
    return {"metadata": {"name": "p", "labels": {"app.kubernetes.io/component": "benchmark"},
                         "ownerReferences": [{"controller": True, "uid": f"job-{request_id}"}]},
            "status": {"containerStatuses": [{"name": "benchmark", "state": {"terminated": terminated}}]}}


def running(request_id: str = "r1") -> Obj:
    return {"id": request_id, "phase": "Running", "job": benchmark.job_name("tiny", request_id),
            "startTime": "2026-12-01T17:59:00Z", "message": "running", "settings": {"numPrompts": 5}}


def test_a_request_on_a_model_that_is_not_ready_waits_without_a_job() -> None:
    plan = benchmark.plan(parsed(), "Loading", a_spec(), OWNER, [], [], None, NOW)
    assert plan.create is None
    assert plan.status is not None and plan.status["phase"] == "Waiting" and "Ready" in plan.status["message"]
    assert [e[1] for e in plan.events] == ["BenchmarkWaiting"]
    again = benchmark.plan(parsed(), "Loading", a_spec(), OWNER, [], [], plan.status, NOW)
    assert again.create is None and again.events == []


def test_a_request_on_a_ready_model_starts_its_job() -> None:
    plan = benchmark.plan(parsed(), None, a_spec(), OWNER, [], [], None, NOW)
    assert plan.create is not None and plan.create["metadata"]["name"] == benchmark.job_name("tiny", "r1")
    assert plan.status is not None
    assert (plan.status["phase"], plan.status["job"], plan.status["startTime"]) == ("Running", plan.create["metadata"]["name"], NOW)
    assert plan.status["settings"]["inputLen"] == 1024
    assert [e[1] for e in plan.events] == ["BenchmarkStarted"]


def test_a_second_request_waits_while_one_runs() -> None:
    plan = benchmark.plan(parsed(id="r2"), None, a_spec(), OWNER, [a_job("r1")], [], running("r1"), NOW)
    assert plan.create is None and plan.delete == ()
    assert plan.status is not None and plan.status["id"] == "r1" and plan.status["phase"] == "Running"
    assert "request r2 waits for it to finish" in plan.status["message"]
    assert [e[1] for e in plan.events] == ["BenchmarkWaiting"]


def test_a_running_job_whose_status_write_was_lost_keeps_its_settings_to_the_end() -> None:
    # The status that started the Job never reached the apiserver: the next reconcile sees the Job alone.
    jobs = [a_job("r1")]
    plan = benchmark.plan(parsed(), None, a_spec(), OWNER, jobs, [], None, NOW)
    assert plan.create is None and plan.status is not None and plan.status["id"] == "r1"
    started = benchmark.plan(benchmark.parse_request(annotated({"id": "r1"})), None, a_spec(), OWNER, [], [], None, NOW)
    assert started.status is not None and plan.status["settings"] == started.status["settings"]
    message = wrapper.message({"startTime": "2026-12-01T17:59:01Z", "completionTime": "2026-12-01T17:59:30Z",
                               "result": wrapper.figures(real_result("bench-serve-ok.json"))})
    done = benchmark.plan(parsed(), None, a_spec(), OWNER, [a_job("r1", "Complete")], [a_pod("r1", message)],
                          {k: v for k, v in plan.status.items() if k != "settings"}, NOW)
    assert done.status is not None and done.status["settings"] == plan.status["settings"]


def test_a_finished_run_is_recorded_then_its_job_deleted_and_the_next_one_started() -> None:
    message = wrapper.message({"startTime": "2026-12-01T17:59:01Z", "completionTime": "2026-12-01T17:59:30Z",
                               "result": wrapper.figures(real_result("bench-serve-ok.json"))})
    jobs, pods = [a_job("r1", "Complete")], [a_pod("r1", message)]
    plan = benchmark.plan(parsed(id="r2"), None, a_spec(), OWNER, jobs, pods, running("r1"), NOW)
    assert plan.create is None and plan.delete == (jobs[0]["metadata"]["name"],)
    assert plan.status is not None and plan.status["phase"] == "Succeeded" and plan.status["id"] == "r1"
    assert plan.status["results"]["completedRequests"] == 8 and plan.status["results"]["requestThroughput"] > 0
    assert (plan.status["startTime"], plan.status["completionTime"]) == ("2026-12-01T17:59:01Z", "2026-12-01T17:59:30Z")
    assert plan.status["report"] == "tiny-benchmark" and plan.report is not None
    assert json.loads(plan.report["report.json"])["result"]["p99_ttft_ms"] > 0
    assert [e[:2] for e in plan.events] == [("Normal", "BenchmarkSucceeded")]
    assert "requests/s" in plan.events[0][2] and "TTFT" in plan.events[0][2]
    # The next reconcile sees that status: the old Job goes, the waiting request starts.
    after = benchmark.plan(parsed(id="r2"), None, a_spec(), OWNER, jobs, pods, plan.status, NOW)
    assert after.delete == (jobs[0]["metadata"]["name"],)
    assert after.create is not None and after.status is not None and after.status["id"] == "r2"
    # The finished run stays readable while the next one runs (`bench --wait` on r1 finds it there), and on.
    assert after.status["previous"] == plan.status
    api.BenchmarkStatus.model_validate(after.status)
    running_r2 = benchmark.plan(parsed(id="r2"), None, a_spec(), OWNER, [a_job("r2")], [], after.status, NOW)
    assert running_r2.status is not None and running_r2.status["previous"] == plan.status
    r2_done = {**running_r2.status, "phase": "Succeeded"}
    third = benchmark.plan(parsed(id="r3"), None, a_spec(), OWNER, [], [], r2_done, NOW)
    assert third.status is not None and third.status["previous"] == {k: v for k, v in r2_done.items()
                                                                      if k != "previous"}


def test_a_finished_job_waits_for_its_pods_end_to_be_seen() -> None:
    plan = benchmark.plan(parsed(), None, a_spec(), OWNER, [a_job("r1", "Complete")], [], running("r1"), NOW)
    assert plan.status == running("r1") and plan.delete == () and plan.create is None


def test_a_run_whose_requests_all_failed_is_failed() -> None:
    message = wrapper.message({"startTime": "a", "completionTime": "b",
                               "result": wrapper.figures(real_result("bench-serve-unauthorized.json"))})
    plan = benchmark.plan(parsed(), None, a_spec(), OWNER, [a_job("r1", "Complete")], [a_pod("r1", message)],
                          running("r1"), NOW)
    assert plan.status is not None and plan.status["phase"] == "Failed"
    assert "no request succeeded (Unauthorized)" in plan.status["message"]
    assert [e[:2] for e in plan.events] == [("Warning", "BenchmarkFailed")]


def test_a_job_past_its_deadline_is_failed_with_the_job_controllers_words() -> None:
    plan = benchmark.plan(parsed(), None, a_spec(), OWNER, [a_job("r1", "Failed")], [], running("r1"), NOW)
    assert plan.status is not None and plan.status["phase"] == "Failed"
    assert "longer than specified deadline" in plan.status["message"]


def test_a_wrapper_error_fails_the_run() -> None:
    message = wrapper.message({"startTime": "a", "completionTime": "b", "error": "ValueError: no tokenizer"})
    plan = benchmark.plan(parsed(), None, a_spec(), OWNER, [a_job("r1", "Failed")],
                          [a_pod("r1", message, exit_code=1)], running("r1"), NOW)
    assert plan.status is not None and plan.status["phase"] == "Failed" and "no tokenizer" in plan.status["message"]


def test_a_recorded_request_does_not_run_again() -> None:
    done = {**running("r1"), "phase": "Succeeded", "message": "done"}
    plan = benchmark.plan(parsed(), None, a_spec(), OWNER, [], [], done, NOW)
    assert plan.create is None and plan.status == done and plan.events == []


def test_an_invalid_request_fails_without_a_job() -> None:
    plan = benchmark.plan(parsed(numPrompts=0), None, a_spec(), OWNER, [], [], None, NOW)
    assert plan.create is None and plan.status is not None and plan.status["phase"] == "Failed"
    assert "benchmark.numPrompts" in plan.status["message"]


def test_a_job_deleted_while_running_fails_the_run() -> None:
    plan = benchmark.plan(None, None, a_spec(), OWNER, [], [], running("r1"), NOW)
    assert plan.status is not None and plan.status["phase"] == "Failed" and "deleted" in plan.status["message"]


def test_jobs_of_others_are_left_alone() -> None:
    foreign = a_job("r1", "Complete", owner_uid="someone-else")
    plan = benchmark.plan(parsed(), None, a_spec(), OWNER, [foreign], [], None, NOW)
    assert plan.delete == () and plan.create is not None


def test_the_examples_annotation_is_a_valid_request() -> None:
    manifest = yaml.safe_load((Path(__file__).resolve().parents[1] / "examples" / "benchmark-annotation.yaml").read_text())
    parsed = benchmark.parse_request(manifest["metadata"]["annotations"])
    assert parsed is not None and parsed.error is None and parsed.request is not None
