"""The gateway's choices, pure: least load, bounded-load consistent hashing on prompt prefixes, model names, and
what it reads of LLMDeployments and engine Pods."""

from __future__ import annotations

from collections import Counter

import pytest

from vllm_operator.gateway.routing import (
    PrefixRing,
    ReplicaLoad,
    UnknownModel,
    least_load,
    prompt_prefix,
    resolve,
)
from vllm_operator.gateway.watch import model_index, ready_address, served_from

REPLICAS = ["tiny-0", "tiny-1", "tiny-2", "tiny-3"]


def test_least_load_takes_the_replica_with_fewest_requests_in_flight_and_queued() -> None:
    loads = {"a": ReplicaLoad(in_flight=3), "b": ReplicaLoad(in_flight=1, waiting=1), "c": ReplicaLoad(in_flight=1)}
    assert least_load(loads, turn=0) == "c"


def test_a_full_kv_cache_weighs_like_a_queued_request() -> None:
    loads = {"a": ReplicaLoad(in_flight=1, kv_cache=0.9), "b": ReplicaLoad(in_flight=1, kv_cache=0.1)}
    assert least_load(loads, turn=0) == "b"


def test_ties_go_round_so_an_idle_fleet_is_shared() -> None:
    loads = {name: ReplicaLoad() for name in REPLICAS}
    assert {least_load(loads, turn) for turn in range(len(REPLICAS))} == set(REPLICAS)


def test_least_load_needs_a_replica() -> None:
    with pytest.raises(ValueError):
        least_load({}, 0)


def test_a_shared_prefix_lands_on_one_replica() -> None:
    ring = PrefixRing(REPLICAS)
    system = "You are a terse assistant for the billing team. " * 8
    picks = {ring.pick(prompt_prefix({"messages": [{"role": "system", "content": system},
                                                   {"role": "user", "content": f"question {i}"}]}), {})
             for i in range(20)}
    assert len(picks) == 1


def test_different_prefixes_spread_over_every_replica() -> None:
    ring = PrefixRing(REPLICAS)
    picks = Counter(ring.pick(f"system prompt number {i}", {}) for i in range(400))
    assert set(picks) == set(REPLICAS)
    assert min(picks.values()) > 400 / len(REPLICAS) / 2, picks


def test_a_replica_over_its_bound_spills_to_the_next_on_the_ring() -> None:
    ring = PrefixRing(REPLICAS)
    home = ring.pick("shared system prompt", {})
    others = {name: 2 for name in REPLICAS if name != home}
    # Home at 4, the others at 2: with this request the mean is 11/4, the bound ceil(1.25 * 11/4) = 4.
    spilled = ring.pick("shared system prompt", {**others, home: 4})
    assert spilled != home
    # Home at 3: the mean is 10/4, the bound ceil(1.25 * 10/4) = 4, and one more request fits.
    assert ring.pick("shared system prompt", {**others, home: 3}) == home


def test_removing_a_replica_moves_only_its_own_prefixes() -> None:
    keys = [f"prefix {i}" for i in range(300)]
    before = {key: PrefixRing(REPLICAS).pick(key, {}) for key in keys}
    after = {key: PrefixRing(REPLICAS[:-1]).pick(key, {}) for key in keys}
    moved = {key for key in keys if before[key] != after[key]}
    assert moved == {key for key in keys if before[key] == REPLICAS[-1]}


def test_the_prefix_is_what_requests_share_never_the_new_last_message() -> None:
    system = {"role": "system", "content": "Answer briefly."}
    first, second = ({"messages": [system, {"role": "user", "content": question}]} for question in ("Why?", "How?"))
    assert prompt_prefix(first) == prompt_prefix(second) == "Answer briefly."
    turns = {"messages": [system, {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url"}]},
                          {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "More?"}]}
    assert prompt_prefix(turns) == "Answer briefly.\nhi\nHello."
    assert prompt_prefix({"messages": [{"role": "user", "content": "only"}]}) == "only"
    assert prompt_prefix({"prompt": "x" * 1000}, chars=10) == "x" * 10
    assert prompt_prefix({"input": "embed me"}) == "embed me"


def test_unknown_model_names_the_close_ones() -> None:
    served = {"qwen-chat": 1, "qwen-coder": 2, "llama-70b": 3}
    assert resolve("qwen-coder", served) == 2
    with pytest.raises(UnknownModel) as error:
        resolve("Qwen-chatt", served)
    assert error.value.close[0] == "qwen-chat"
    assert "llama-70b" not in error.value.close
    with pytest.raises(UnknownModel) as nothing_close:
        resolve("mistral", served)
    assert nothing_close.value.close == []


# -- what the gateway reads from the apiserver ------------------------------------------------------


def test_an_llmdeployment_routes_by_its_served_name_strategy_key_and_load() -> None:
    served = served_from({
        "metadata": {"namespace": "team-a", "name": "llama", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"model": {"name": "meta-llama/Meta-Llama-3-8B-Instruct", "servedName": "llama-3-8b"},
                 "replicas": 0, "routing": {"strategy": "PrefixHash"},
                 "apiKeySecretRef": {"name": "keys", "key": "llama"}},
        "status": {"phase": "Idle", "engine": {"requestsWaiting": 4, "kvCacheUsagePercent": 55.5}},
    })
    assert (served.model, served.replicas, served.strategy, served.api_key_ref) == (
        "llama-3-8b", 0, "PrefixHash", ("keys", "llama"))
    assert (served.waiting, served.kv_cache_percent, served.phase) == (4, 55.5, "Idle")
    plain = served_from({"metadata": {"namespace": "n", "name": "tiny"}, "spec": {"model": {"name": "m"}}})
    assert (plain.model, plain.replicas, plain.strategy, plain.api_key_ref) == ("tiny", 1, "LeastLoad", None)


def test_loaded_adapters_route_to_their_llmdeployment_and_a_served_name_wins_over_an_adapter() -> None:
    def llmd(name: str, created: str, adapters: list[tuple[str, int]]) -> dict[str, object]:
        return {"metadata": {"namespace": "n", "name": name, "creationTimestamp": created},
                "spec": {"model": {"name": "m"}, "adapters": [{"name": a, "source": f"file:///{a}"}
                                                               for a, _ in adapters]},
                "status": {"adapters": [{"name": a, "state": "Loaded" if loaded else "Failed",
                                         "loadedReplicas": loaded, "replicas": 1} for a, loaded in adapters]}}

    tiny = served_from(llmd("tiny", "2026-01-01T00:00:00Z", [("sql", 1), ("huge", 0), ("chat", 1)]))
    chat = served_from(llmd("chat", "2026-02-01T00:00:00Z", [("sql", 1)]))
    assert tiny.adapters == ("sql", "chat")
    index = model_index([chat, tiny])
    assert {name: served.name for name, served in index.items()} == {"tiny": "tiny", "chat": "chat", "sql": "tiny"}
    # An adapter in the status but no longer in the spec is on its way out: not routed.
    gone = llmd("tiny", "2026-01-01T00:00:00Z", [("sql", 1)])
    gone["spec"] = {"model": {"name": "m"}}
    assert served_from(gone).adapters == ()


def test_only_ready_pods_that_stay_have_an_address() -> None:
    pod = {"metadata": {"name": "p"},
           "spec": {"containers": [{"ports": [{"name": "http", "containerPort": 8000}]}]},
           "status": {"podIP": "10.0.0.7", "conditions": [{"type": "Ready", "status": "True"}]}}
    assert ready_address(pod) == "10.0.0.7:8000"
    assert ready_address({**pod, "status": {**pod["status"], "conditions": [{"type": "Ready", "status": "False"}]}}) \
        is None
    assert ready_address({**pod, "metadata": {"name": "p", "deletionTimestamp": "2026-01-01T00:00:00Z"}}) is None
    assert ready_address({**pod, "status": {"conditions": pod["status"]["conditions"]}}) is None
