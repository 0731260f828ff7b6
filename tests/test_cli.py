"""The ``vllm-operator run`` process: what it loads."""

import subprocess
import sys

from vllm_operator.cli import UNUSED_CLIENTS


def test_the_operator_process_does_not_load_the_kubernetes_client_kopf_would() -> None:
    # Where the client is installed beside the operator (this environment), kopf imports it at its own import.
    code = ("import sys; from vllm_operator import cli; {} import kopf, vllm_operator.handlers; "
            "sys.exit(1 if any(sys.modules.get(name) for name in cli.UNUSED_CLIENTS) else 0)")
    assert subprocess.run([sys.executable, "-c", code.format("")], check=False).returncode == 1, \
        "kopf no longer loads the client: keep_out_unused_clients can go"
    assert subprocess.run([sys.executable, "-c", code.format("cli.keep_out_unused_clients();")],
                          check=False).returncode == 0


def test_a_client_already_loaded_is_left_alone() -> None:
    code = ("import sys, kubernetes; from vllm_operator import cli; cli.keep_out_unused_clients(); "
            "import kubernetes.client; sys.exit(0 if sys.modules['kubernetes'] is not None else 1)")
    assert "kubernetes" in UNUSED_CLIENTS
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
