"""What the vLLM server accepts on its command line, and which flags users may not pass.

The flag list is the real argument parser of vLLM's OpenAI server, captured from the version the
default images ship (``data/vllm-<version>-serve-args.json``).
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources

VLLM_VERSION = "0.32.0"

# Flags the operator derives from spec fields; passing them in extraArgs would fight the spec.
OWNED_FLAGS: dict[str, str] = {
    "--model": "spec.model.name",
    "--served-model-name": "spec.model.servedName",
    "--revision": "spec.model.revision",
    "--tokenizer": "spec.model.tokenizer",
    "--trust-remote-code": "spec.model.trustRemoteCode",
    "--chat-template": "spec.model.chatTemplate or chatTemplateConfigMapRef",
    "--hf-token": "spec.model.hfTokenSecretRef",
    "--host": "the operator (the engine listens on all interfaces)",
    "--port": "the operator (the container port is fixed; set spec.service.port for the Service)",
    "--api-key": "spec.apiKeySecretRef",
    "--download-dir": "spec.cache",
    "--max-model-len": "spec.engine.maxModelLen",
    "--gpu-memory-utilization": "spec.engine.gpuMemoryUtilization",
    "--max-num-seqs": "spec.engine.maxNumSeqs",
    "--max-num-batched-tokens": "spec.engine.maxNumBatchedTokens",
    "--tensor-parallel-size": "spec.engine.tensorParallelSize",
    "--pipeline-parallel-size": "spec.engine.pipelineParallelSize",
    "--distributed-executor-backend": "spec.engine.distributedBackend",
    # A replica across nodes: the operator gives each Pod its rank and the leader's address.
    "--nnodes": "spec.accelerator.nodesPerReplica",
    "--node-rank": "spec.accelerator.nodesPerReplica",
    "--master-addr": "spec.accelerator.nodesPerReplica",
    "--master-port": "spec.accelerator.nodesPerReplica",
    "--headless": "spec.accelerator.nodesPerReplica",
    "--dtype": "spec.engine.dtype",
    "--quantization": "spec.engine.quantization",
    "--load-format": "spec.engine.loadFormat",
    "--kv-cache-dtype": "spec.engine.kvCacheDtype",
    "--block-size": "spec.engine.blockSize",
    "--enable-prefix-caching": "spec.engine.enablePrefixCaching",
    "--enable-chunked-prefill": "spec.engine.enableChunkedPrefill",
    "--enforce-eager": "spec.engine.enforceEager",
    "--compilation-config": "spec.engine.cudaGraph",
    "--cudagraph-capture-sizes": "spec.engine.cudaGraph.captureSizes",
    # The operator loads and unloads spec.adapters at run time; adapters loaded otherwise would be unloaded.
    "--enable-lora": "spec.adapters or spec.engine.maxLoras",
    "--lora-modules": "spec.adapters",
    "--max-loras": "spec.engine.maxLoras",
    "--max-cpu-loras": "spec.engine.maxLoras",
    "--max-lora-rank": "spec.engine.maxLoraRank",
}

# Flags older guides still use that this vLLM no longer has: the server exits at start-up on them.
REMOVED_FLAGS: dict[str, str] = {
    "--disable-log-requests": "request logging is off by default; --enable-log-requests turns it on",
    "--max-seq-len-to-capture": "use spec.engine.cudaGraph.captureSizes (--cudagraph-capture-sizes)",
    "--worker-use-ray": "use spec.engine.distributedBackend: ray",
    "--engine-use-ray": "use spec.engine.distributedBackend: ray",
    "--swap-space": "CPU swap space is gone; size the KV cache with spec.engine.gpuMemoryUtilization "
                    "or spec.engine.cpuKVCacheSpaceGiB",
    "--cuda-graph-sizes": "use spec.engine.cudaGraph.captureSizes (--cudagraph-capture-sizes)",
    "--use-v2-block-manager": "the V2 block manager is the only one; drop the flag",
    "--num-lookahead-slots": "drop the flag; speculative decoding is set with --speculative-config",
    "--disable-log-stats-interval": "drop the flag",
}


@dataclass(frozen=True)
class FlagCatalog:
    """The option strings of one vLLM version's server, grouped by argparse action."""

    version: str
    aliases: dict[str, frozenset[str]]  # every option string -> all option strings of its action
    takes_value: frozenset[str]

    def __contains__(self, flag: str) -> bool:
        return flag in self.aliases

    def canonical_owner(self, flag: str) -> str | None:
        """The OWNED_FLAGS key this flag is an alias (or a --no- form) of, if any."""
        for option in self.aliases.get(flag, frozenset({flag})):
            if option in OWNED_FLAGS:
                return option
            if option.startswith("--no-") and "--" + option[len("--no-"):] in OWNED_FLAGS:
                return "--" + option[len("--no-"):]
        return None


@cache
def catalog(version: str = VLLM_VERSION) -> FlagCatalog:
    data = resources.files("vllm_operator").joinpath(f"data/vllm-{version}-serve-args.json").read_text()
    aliases: dict[str, frozenset[str]] = {}
    takes_value: set[str] = set()
    for action in json.loads(data):
        flags = frozenset(action.get("flags", ()))
        for flag in flags:
            aliases[flag] = flags
            if action["nargs"] != 0:
                takes_value.add(flag)
    return FlagCatalog(version, aliases, frozenset(takes_value))


# A token that is a value, not a flag: it starts with a digit after '-' (a negative number) or with no '-' at all.
# ASCII digits and no backslash, so that the CRD's CEL twin (RE2, in a CEL string) reads it the same way.
VALUE_TOKEN_PATTERN = "^(-[0-9]|-[.][0-9]|[^-])"
_VALUE_TOKEN = re.compile(VALUE_TOKEN_PATTERN)


def _flags_of(args: Sequence[str]) -> Iterable[str]:
    """The flag names in an argument list (``--a=1``, ``--a 1``, ``-tp 2``); values are skipped."""
    for arg in args:
        if arg and not _VALUE_TOKEN.match(arg):
            yield arg.split("=", 1)[0]


def extra_args_errors(args: Sequence[str], version: str = VLLM_VERSION) -> list[str]:
    """Why each offending flag in spec.engine.extraArgs is refused (empty when all are fine)."""
    known = catalog(version)
    errors = []
    for flag in _flags_of(args):
        if flag in REMOVED_FLAGS:
            errors.append(f"{flag} was removed from vLLM: {REMOVED_FLAGS[flag]}")
        elif flag not in known:
            close = difflib.get_close_matches(flag, known.aliases, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            errors.append(f"{flag} is not a vLLM {known.version} server flag{hint}")
        elif (owner := known.canonical_owner(flag)) is not None:
            errors.append(f"{flag} is set by the operator from {OWNED_FLAGS[owner]}; use that instead")
    return errors


def owned_flag_pattern(version: str = VLLM_VERSION) -> str:
    """A regex matching an argument that sets an owned flag (any alias), for the CRD's CEL rule.

    Option strings hold only letters, digits and '-', so they need no escaping (CEL has no \\- escape).
    """
    known = catalog(version)
    options = sorted(
        {option for flag, options in known.aliases.items() if known.canonical_owner(flag) for option in options}
        | set(OWNED_FLAGS)
    )
    return "^(" + "|".join(options) + ")(=.*)?$"
