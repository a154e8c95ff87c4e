"""ROUGE by batched generation: left padding, stop at EOS, trimmed output, offline scoring.

Scoring for every figure we report: `rouge_score` with `use_stemmer=True`, F-measure x 100, greedy
decoding, at most 96 new tokens, the prompt the model was trained with (read from the run directory).
`evaluate.load("rouge")` would fetch a script from the hub, which fails offline: we call rouge_score.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import Recipe, build_recipe
from .data import load_clean_split
from .errors import ConfigError

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")


@dataclass
class GenerationConfig:
    max_new_tokens: int = 96
    batch_size: int = 16
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0


def _sentences(text: str) -> str:
    # rougeLsum scores newline-separated sentences; nltk's punkt would need a download, this does not.
    return "\n".join(s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s)


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    from rouge_score import rouge_scorer, scoring

    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    agg = scoring.BootstrapAggregator()
    for pred, ref in zip(predictions, references):
        agg.add_scores(scorer.score(_sentences(ref), _sentences(pred)))
    result = agg.aggregate()
    return {k: round(result[k].mid.fmeasure * 100, 2) for k in ROUGE_KEYS}


def score(preds: list[dict[str, Any]], references: list[str]) -> dict[str, float]:
    """ROUGE of `generate`'s predictions, the share that ended at EOS and their mean length."""
    metrics = rouge([p["prediction"] for p in preds], references)
    metrics["ended_at_eos"] = round(100 * sum(p["ended_at_eos"] for p in preds) / len(preds), 2)
    metrics["mean_new_tokens"] = round(sum(p["new_tokens"] for p in preds) / len(preds), 1)
    return metrics


@torch.no_grad()
def generate(model, tokenizer, recipe: Recipe, dialogues: list[str], gen: GenerationConfig,
             progress: bool = True) -> list[dict[str, Any]]:
    """Summaries for dialogues, in order; each with whether it ended at EOS and its token count."""
    from tqdm.auto import tqdm

    from .data import _encode_prompt

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    device = next(model.parameters()).device
    model.eval()
    order = sorted(range(len(dialogues)), key=lambda i: -len(dialogues[i]))  # similar lengths batch together
    results: dict[int, dict[str, Any]] = {}
    bar = tqdm(total=len(dialogues), desc="generating", disable=not progress)
    for start in range(0, len(order), gen.batch_size):
        idx = order[start:start + gen.batch_size]
        prompts = [_encode_prompt(recipe.data, tokenizer, dialogues[i]) for i in idx]
        width = max(map(len, prompts))
        # Left padding: every prompt ends where generation starts.
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        kwargs = dict(max_new_tokens=gen.max_new_tokens, eos_token_id=eos, pad_token_id=pad, use_cache=True,
                      do_sample=gen.do_sample)
        if gen.do_sample:
            kwargs.update(temperature=gen.temperature, top_p=gen.top_p)
        seqs = model.generate(input_ids=input_ids, attention_mask=attention, **kwargs)[:, width:]
        for i, row in zip(idx, seqs.tolist()):
            ended = eos in row
            tokens = row[: row.index(eos)] if ended else row
            results[i] = {"prediction": tokenizer.decode(tokens, skip_special_tokens=True).strip(),
                          "ended_at_eos": ended, "new_tokens": len(tokens)}
        bar.update(len(idx))
    bar.close()
    return [results[i] for i in range(len(dialogues))]


def load_for_eval(run_or_model: str, overrides: list[str] | None = None):
    """(model, tokenizer, recipe) from a run directory (adapter or full model) or a model name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .model import EMBEDDED, check_model_source, embedded_model_dir, load_tokenizer

    path = Path(run_or_model)
    # Generation runs one padded batch at a time with a KV cache: sdpa, whatever attention the run trained with
    # (flex_attention would compile again for every new prompt width).
    load = {"dtype": torch.bfloat16 if torch.cuda.is_available() else torch.float32, "attn_implementation": "sdpa"}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if (path / "recipe.yaml").is_file():
        recipe = build_recipe(path / "recipe.yaml", overrides)
        tokenizer = AutoTokenizer.from_pretrained(path)
        if (path / "adapter_config.json").is_file():
            from peft import PeftModel

            base_name = embedded_model_dir() if recipe.model.name == EMBEDDED else recipe.model.name
            base = AutoModelForCausalLM.from_pretrained(base_name, **load)
            model = PeftModel.from_pretrained(base, path)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **load)
    elif path.is_dir() and not (path / "config.json").is_file():
        raise ConfigError(f"{path}: neither a run directory (recipe.yaml) nor a model folder (config.json)")
    else:
        recipe = build_recipe(None, [f"model.name={run_or_model}", *(overrides or [])])
        check_model_source(recipe)  # a missing folder or an unreachable hub id: one line, not transformers' traceback
        tokenizer = load_tokenizer(recipe)
        name = embedded_model_dir() if recipe.model.name == EMBEDDED else recipe.model.name
        model = AutoModelForCausalLM.from_pretrained(name, **load)
    tokenizer.padding_side = "left"
    return model.to(device), tokenizer, recipe


def evaluate(run_or_model: str, *, split: str = "test", limit: int | None = None, out_dir: str | None = None,
             gen: GenerationConfig | None = None, overrides: list[str] | None = None,
             progress: bool = True) -> dict[str, Any]:
    """ROUGE-1/2/L/Lsum, share ending at EOS, mean length; writes predictions.jsonl and eval_metrics.json."""
    gen = gen or GenerationConfig()
    model, tokenizer, recipe = load_for_eval(run_or_model, overrides)
    # The run's data settings (source, cleaning, prompt), but never its training slice.
    rows, _, origin = load_clean_split(recipe.data, split)
    rows = rows[:limit] if limit else rows
    preds = generate(model, tokenizer, recipe, [r["dialogue"] for r in rows], gen, progress=progress)
    metrics: dict[str, Any] = score(preds, [r["summary"] for r in rows])
    metrics.update(rows=len(rows), split=split, source=origin, max_new_tokens=gen.max_new_tokens,
                   do_sample=gen.do_sample, chat_template=recipe.data.chat_template)
    target = Path(out_dir) if out_dir else (Path(run_or_model) if Path(run_or_model, "recipe.yaml").is_file() else None)
    if target is not None:
        target.mkdir(parents=True, exist_ok=True)
        with open(target / f"predictions_{split}.jsonl", "w", encoding="utf-8") as fh:
            for r, p in zip(rows, preds):
                fh.write(json.dumps({"id": r["id"], "reference": r["summary"], **p}, ensure_ascii=False) + "\n")
        (target / f"eval_metrics_{split}.json").write_text(json.dumps(metrics, indent=2))
    return metrics
