"""vllm-operator: serve LLMs on Kubernetes with vLLM."""

__version__ = "0.1.0"
