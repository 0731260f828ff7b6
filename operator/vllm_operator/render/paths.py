"""Where the engine container finds the cache claim, and the Hugging Face cache on it."""

CACHE_MOUNT = "/cache"
HF_HOME = f"{CACHE_MOUNT}/huggingface"
