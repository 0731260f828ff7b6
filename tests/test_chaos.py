"""The fault suite (hack/devcluster/chaos.py): its audit-log and docs helpers, then its CI size, which starts a
local cluster of its own (it restarts kube-apiserver and etcd) and fails on any lost object, duplicate, orphan,
operator crash or non-convergence. ``CHAOS_SEED=N`` replays a run."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from devcluster import chaos
from devcluster.chaos import Write

A, B = chaos.REPLICA_USERS
IDENTITIES = {"host_1": A, "host_2": B}


def lease(user: str, holder: str, at: float) -> Write:
    return Write(user, at, at + 0.01, "update leases/chaos-leader/vllm-operator", holder)


def write(user: str, at: float) -> Write:
    return Write(user, at, at + 0.01, "patch deployments/ns/m1", None)


def test_writes_count_against_the_lease_holder_when_the_apiserver_received_them() -> None:
    writes = [lease(A, "host_1", 0.0), write(A, 1.0), lease(B, "host_2", 20.0), write(B, 21.0),
              write(A, 22.0),   # the old leader, woken after the standby took over
              write(B, 19.0)]   # the standby before its term
    wrong = chaos.writes_outside_term(sorted(writes, key=lambda w: w.done), IDENTITIES)
    assert [(w.user, w.at) for w in wrong] == [(B, 19.0), (A, 22.0)]


def test_a_released_lease_leaves_no_writer() -> None:
    writes = [lease(A, "host_1", 0.0), lease(A, "", 5.0), write(A, 6.0)]
    assert [w.at for w in chaos.writes_outside_term(writes, IDENTITIES)] == [6.0]


def test_the_docs_lose_nothing_but_the_fault_suite_section(tmp_path: Path) -> None:
    docs = tmp_path / "reliability.md"
    docs.write_text("# Title\n\nIntro.\n\n## Fault suite\n\nNot built yet.\n\n## API fuzzer\n\nKept.\n")
    chaos.write_docs("## Fault suite\n\nThe table.\n", docs)
    assert docs.read_text() == "# Title\n\nIntro.\n\n## Fault suite\n\nThe table.\n\n## API fuzzer\n\nKept.\n"


@pytest.mark.cluster
def test_the_operator_converges_after_every_fault() -> None:
    seed = int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(1 << 31))
    results = chaos.run(chaos.SIZES["ci"], seed)
    print(chaos.table(results))
    failures = [
        f"{result.fault}: {result.crashes} crashes; "
        + "; ".join(trial.inspection.summary() if trial.seconds is not None else
                    f"not converged: {trial.inspection.summary()}" for trial in result.trials)
        for result in results if result.failed
    ]
    assert not failures, f"replay with CHAOS_SEED={seed}:\n" + "\n".join(failures)
    faults = {r.fault.split(" ")[0] for r in results}
    assert faults == {"operator", "kube-apiserver", "etcd", "leader", "children", "engine"}
