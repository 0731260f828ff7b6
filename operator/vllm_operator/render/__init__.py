"""Pure builders: a spec in, manifests, engine command lines and environments out.

Where a spec field becomes a vLLM flag: ``engine_args``; what differs per accelerator: ``profiles``;
the children's manifests: ``manifests``; which vLLM flags exist: ``vllm_flags``.
"""
