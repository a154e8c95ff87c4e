"""A LoRA run's adapter merged into a plain HF folder that `AutoModelForCausalLM.from_pretrained` loads."""
from __future__ import annotations

from pathlib import Path

from .errors import ConfigError


def merge(run_dir: str, out: str) -> Path:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .config import build_recipe
    from .model import EMBEDDED, embedded_model_dir

    run, target = Path(run_dir), Path(out)
    if not (run / "adapter_config.json").is_file() or not (run / "recipe.yaml").is_file():
        raise ConfigError(f"{run}: not a LoRA run directory (adapter_config.json and recipe.yaml expected)")
    if target.exists() and any(target.iterdir()):
        raise ConfigError(f"{target}: exists and is not empty; choose another folder")
    recipe = build_recipe(run / "recipe.yaml")
    # Always the full-precision base, also for QLoRA runs: merging into 4-bit weights would round the adapter away.
    base_name = embedded_model_dir() if recipe.model.name == EMBEDDED else recipe.model.name
    base = AutoModelForCausalLM.from_pretrained(base_name, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, run).merge_and_unload()
    merged.save_pretrained(target)  # safetensors
    AutoTokenizer.from_pretrained(run).save_pretrained(target)
    return target
