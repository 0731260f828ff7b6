"""The chart's alert rules, checked and unit-tested with Prometheus' own promtool: every alert the chart
ships fires on the series that should wake someone and stays quiet on those that should not."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from devcluster import binaries, monitoring
from promql import known_names, unknown_names

Obj = dict[str, Any]
UNIT_TESTS = Path(__file__).resolve().parent / "data" / "alerts" / "tests.yaml"
ALERTS = {"VLLMEngineDown", "VLLMQueueBuildingUp", "VLLMKVCacheSaturated", "VLLMTimeToFirstTokenHigh",
          "VLLMOperatorScrapesFailing", "LLMDeploymentFailed", "VLLMOperatorNotLeading"}


@pytest.fixture(scope="module")
def tools() -> tuple[Path, Path]:
    binaries.ensure((binaries.HELM, binaries.PROMETHEUS))
    return binaries.path_of("helm"), binaries.path_of("promtool")


def rules(helm: Path, *settings: str) -> Obj:
    return monitoring.rule_file(monitoring.render(helm, "vllm-operator", "monitoring", *settings))


def alerts(rule_file: Obj) -> dict[str, Obj]:
    return {r["alert"]: r for group in rule_file["groups"] for r in group["rules"] if "alert" in r}


def promtool(promtool_path: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(promtool_path), *map(str, args)], capture_output=True, text=True, timeout=120)


def unit_test(tools: tuple[Path, Path], folder: Path, *settings: str) -> subprocess.CompletedProcess[str]:
    """promtool's unit tests against the rules rendered with ``settings``, as rules.yaml beside them."""
    helm, promtool_path = tools
    (folder / "rules.yaml").write_text(yaml.safe_dump(rules(helm, *settings), sort_keys=False))
    shutil.copy(UNIT_TESTS, folder / UNIT_TESTS.name)
    return promtool(promtool_path, "test", "rules", folder / UNIT_TESTS.name)


def test_the_chart_ships_the_alerts_and_promtool_checks_them(tools: tuple[Path, Path], tmp_path: Path) -> None:
    helm, promtool_path = tools
    rendered = rules(helm)
    assert set(alerts(rendered)) == ALERTS
    assert all({"summary", "description"} <= set(a["annotations"]) and a["labels"]["severity"]
               for a in alerts(rendered).values())
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rendered))
    checked = promtool(promtool_path, "check", "rules", "--lint=all", "--lint-fatal", tmp_path / "rules.yaml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in checked.stdout


def test_every_alert_passes_its_promtool_unit_tests(tools: tuple[Path, Path], tmp_path: Path) -> None:
    result = unit_test(tools, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_case_that_fires_and_one_that_does_not() -> None:
    cases = [case for test in yaml.safe_load(UNIT_TESTS.read_text())["tests"] for case in test["alert_rule_test"]]
    firing = {c["alertname"] for c in cases if c["exp_alerts"]}
    quiet = {c["alertname"] for c in cases if not c["exp_alerts"]}
    assert firing == quiet == ALERTS


def test_the_unit_tests_notice_a_changed_threshold(tools: tuple[Path, Path], tmp_path: Path) -> None:
    result = unit_test(tools, tmp_path, "prometheus.rules.queueWaiting=20", "prometheus.rules.failedFor=10m")
    assert result.returncode != 0
    assert "alertname: VLLMQueueBuildingUp" in result.stdout + result.stderr
    assert "alertname: LLMDeploymentFailed" in result.stdout + result.stderr


def test_every_rule_reads_only_metrics_that_exist(tools: tuple[Path, Path]) -> None:
    helm, _ = tools
    exprs = [r["expr"] for r in alerts(rules(helm)).values()]
    assert unknown_names(exprs, known_names()) == {}
    broken = [e.replace("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc") for e in exprs]
    assert {"vllm:gpu_cache_usage_perc"} in unknown_names(broken, known_names()).values()
