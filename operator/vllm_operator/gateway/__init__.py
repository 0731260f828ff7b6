"""The gateway: one OpenAI-compatible endpoint in front of every LLMDeployment (``vllm-operator gateway``)."""
