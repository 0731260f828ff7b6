"""LoRA adapters kept true in every running engine: the pure plan (plan.py), the engine's runtime API
(engine.py) and the loop that reconciles one against the other each sweep (sync.py)."""
