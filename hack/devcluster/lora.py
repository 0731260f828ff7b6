"""Tiny LoRA adapters of the tiny model, made with PEFT (random weights, saved as PEFT saves real ones).

PEFT runs in the engine venv, where torch and transformers are; it is installed beside that venv (pip
``--target``, no dependencies: the venv has them, but for accelerate) so the engine venv stays as vLLM pinned it.

    python -m devcluster.lora make <folder> <rank> <seed>   (from the dev venv; runs the engine venv)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from devcluster import engine

PEFT_VERSION = "0.21.2"
ACCELERATE_VERSION = "1.15.0"
PEFT_DIR = engine.CACHE_ROOT / f"peft-{PEFT_VERSION}-accelerate-{ACCELERATE_VERSION}"
BASE_MODEL = "vllm-operator/tiny-llama"
HACK = Path(__file__).resolve().parents[1]


def ensure_peft() -> Path:
    if not (PEFT_DIR / "peft").is_dir():
        subprocess.run([str(engine.engine_python()), "-m", "pip", "install", "--quiet", "--progress-bar", "off",
                        "--no-deps", "--target", str(PEFT_DIR), f"peft=={PEFT_VERSION}",
                        f"accelerate=={ACCELERATE_VERSION}"], check=True)
    return PEFT_DIR


def make(out: Path, rank: int, seed: int) -> Path:
    """An adapter of ``rank`` for the tiny model's attention projections in ``out``."""
    base = engine.model_snapshot()
    if base is None:
        raise engine.EngineError("the tiny model is missing; run `make model` first")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HACK), str(ensure_peft())])}
    subprocess.run([str(engine.engine_python()), "-m", "devcluster.lora", "generate", str(out), str(rank), str(seed),
                    str(base)], check=True, env=env, capture_output=True)
    return out


def _generate(out: Path, rank: int, seed: int, base: Path) -> None:
    """Runs inside the engine venv."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        init_lora_weights=False)  # random, so the adapter changes what the model says
    get_peft_model(model, config).save_pretrained(out)
    # As an adapter trained on the hub's model records it, not the local folder it was made from.
    config_file = out / "adapter_config.json"
    saved = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**saved, "base_model_name_or_path": BASE_MODEL}, indent=2) + "\n")


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "generate":
        _generate(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5]))
    elif len(sys.argv) == 5 and sys.argv[1] == "make":
        print(make(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
