"""Llama shapes: parameter counts per projection, the known shapes, and how a model name maps to one.

Read from config.json or the built-in table, never from the weights: the planner and the random models use it.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANDOM_PREFIX = "random:"


@dataclass
class ModelShape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool = False
    head_dim: int | None = None  # None: hidden_size // num_attention_heads (Llama's default)

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * (self.head_dim or self.hidden_size // self.num_attention_heads)

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * (self.head_dim or self.hidden_size // self.num_attention_heads)

    def linear_dims(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each projection in one decoder layer."""
        h, i = self.hidden_size, self.intermediate_size
        return {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
                "o_proj": (self.q_dim, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def linear_params(self, target_modules=None) -> int:
        """Parameters of the named projections over all layers (None or "all-linear": all seven)."""
        names = target_names(target_modules)
        return self.num_hidden_layers * sum(a * b for n, (a, b) in self.linear_dims().items() if n in names)

    def lora_params(self, target_modules, r: int) -> int:
        names = target_names(target_modules)
        return self.num_hidden_layers * sum(r * (a + b) for n, (a, b) in self.linear_dims().items() if n in names)

    @property
    def layer_params(self) -> int:
        return self.linear_params() // self.num_hidden_layers + 2 * self.hidden_size  # + two RMSNorm scales

    @property
    def embedding_params(self) -> int:
        """Embeddings, final norm and lm_head (one matrix when tied)."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2) + self.hidden_size

    @property
    def n_params(self) -> int:
        return self.num_hidden_layers * self.layer_params + self.embedding_params


def target_names(target_modules) -> set[str]:
    """The projection names that LoRA target_modules select (None or "all-linear": all seven)."""
    if target_modules is None or target_modules == "all-linear" or list(target_modules) == ["all-linear"]:
        return set(LINEARS)
    return {t.rsplit(".", 1)[-1] for t in target_modules}


LLAMA_SHAPES: dict[str, ModelShape] = {
    "llama2-7b": ModelShape(4096, 11008, 32, 32, 32, 32000),
    "llama2-13b": ModelShape(5120, 13824, 40, 40, 40, 32000),
    "llama2-70b": ModelShape(8192, 28672, 80, 64, 8, 32000),
    "smollm2-135m": ModelShape(576, 1536, 30, 9, 3, 49152, tie_word_embeddings=True),
}
RANDOM_VOCAB = 49152  # random: shapes use SmolLM2's tokenizer
HUB_SHAPES = {f"meta-llama/llama-2-{size}-{kind}": f"llama2-{size}"
              for size in ("7b", "13b", "70b") for kind in ("hf", "chat-hf")}


def random_shape_name(name: str) -> str | None:
    """The shape key of a `random:` model name (None for any other name)."""
    return name[len(RANDOM_PREFIX):] if name.startswith(RANDOM_PREFIX) else None


def shape_from_config(config: dict | Any) -> ModelShape:
    """A shape from a config.json dict or a transformers config object."""
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    heads, hidden, head_dim = get("num_attention_heads"), get("hidden_size"), get("head_dim")
    return ModelShape(
        hidden_size=hidden, intermediate_size=get("intermediate_size"),
        num_hidden_layers=get("num_hidden_layers"), num_attention_heads=heads,
        num_key_value_heads=get("num_key_value_heads") or heads, vocab_size=get("vocab_size"),
        tie_word_embeddings=bool(get("tie_word_embeddings", False)),
        head_dim=None if head_dim in (None, hidden // heads) else head_dim,  # None: Llama's default
    )


def shape_for_model_name(name: str) -> ModelShape | None:
    """The shape a model name stands for without the network: a random: shape, a table entry, a local folder's
    config.json or a known Llama-2 hub id; None when only the hub's config.json would tell."""
    key = random_shape_name(name)
    if key is not None:
        if key.startswith("llama2-") and key in LLAMA_SHAPES:
            return dataclasses.replace(LLAMA_SHAPES[key], vocab_size=RANDOM_VOCAB)
        return None
    if name in LLAMA_SHAPES:
        return LLAMA_SHAPES[name]
    folder = Path(name).expanduser()
    if (folder / "config.json").is_file():
        return shape_from_config(json.loads((folder / "config.json").read_text(encoding="utf-8")))
    key = HUB_SHAPES.get(name.lower())
    return LLAMA_SHAPES[key] if key else None
