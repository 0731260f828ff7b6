"""Credentials: every way a kubeconfig authenticates must reach the operator's own HTTP client."""

from __future__ import annotations

from pathlib import Path

import yaml

from vllm_operator.kube import Credentials


def test_a_token_kubeconfig_sends_a_bearer_token(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "sa",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:6443", "insecure-skip-tls-verify": True}}],
        "users": [{"name": "sa", "user": {"token": "abc.def"}}],
        "contexts": [{"name": "sa", "context": {"cluster": "c", "user": "sa"}}],
    }))
    credentials = Credentials.load(str(kubeconfig))
    assert credentials.host == "https://127.0.0.1:6443"
    assert credentials.headers() == {"Authorization": "Bearer abc.def"}
    assert credentials.ssl_context is False
