"""The engines' side: read every engine's /health and /metrics, parse them, and turn samples into load."""
