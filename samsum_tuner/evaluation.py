"""ROUGE by batched generation: left padding, stop at EOS, trimmed output, offline scoring.

Scoring for every figure we report: `rouge_score` with `use_stemmer=True`, the mean over examples of the
F-measure x 100 (the same figure on every call), greedy decoding, at most 96 new tokens, the prompt the model
was trained with (read from the run directory's or merged folder's recipe.yaml).
`evaluate.load("rouge")` would fetch a script from the hub, which fails offline: we call rouge_score.
"""
from __future__ import annotations

import json
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import SECTIONS, DataConfig, Recipe
from .recipe import build_recipe, split_overrides
from .yaml_io import read_yaml
from .data import load_clean_split
from .errors import ConfigError

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass
class GenerationConfig:
    max_new_tokens: int = 96
    batch_size: int = 16
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0

    def __post_init__(self):
        # Named by their command-line flags: transformers would warn, or fail mid-run, on these.
        for flag, v in (("--max-new-tokens", self.max_new_tokens), ("--batch-size", self.batch_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"{flag} must be a positive integer, got {v!r}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ConfigError(f"--temperature must be a finite number > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:  # NaN fails this too
            raise ConfigError(f"--top-p must be in (0, 1], got {self.top_p}")


def _sentences(text: str) -> str:
    # rougeLsum scores newline-separated sentences; nltk's punkt would need a download, this does not.
    return "\n".join(s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s)


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean over examples of rouge_score's F-measure x 100: deterministic (a bootstrap's mid is resampled)."""
    from rouge_score import rouge_scorer

    if not predictions or len(predictions) != len(references):
        raise ValueError(f"rouge: {len(predictions)} predictions for {len(references)} references")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    scores = [scorer.score(_sentences(ref), _sentences(pred)) for pred, ref in zip(predictions, references)]
    return {k: round(100 * sum(s[k].fmeasure for s in scores) / len(scores), 2) for k in ROUGE_KEYS}


def score(preds: list[dict[str, Any]], references: list[str]) -> dict[str, float]:
    """ROUGE of `generate`'s predictions, the share that ended at EOS and their mean length."""
    metrics = rouge([p["prediction"] for p in preds], references)
    metrics["ended_at_eos"] = round(100 * sum(p["ended_at_eos"] for p in preds) / len(preds), 2)
    metrics["mean_new_tokens"] = round(sum(p["new_tokens"] for p in preds) / len(preds), 1)
    return metrics


@torch.no_grad()
def generate(model, tokenizer, data: DataConfig, dialogues: list[str], gen: GenerationConfig,
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
        prompts = [_encode_prompt(data, tokenizer, dialogues[i]) for i in idx]
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


class RougeProbe:
    """ROUGE as `samsum-tuner eval` scores it (greedy, 96 new tokens) on the first n rows of the eval split, for
    the Trainer's every evaluation (SamsumTrainer's `rouge`)."""

    def __init__(self, data: DataConfig, n: int):
        self.data, self.n, self.rows = data, n, None

    def __call__(self, model, tokenizer) -> dict[str, float]:
        from .data import load_clean_split

        if self.rows is None:
            self.rows = load_clean_split(self.data, self.data.eval_split)[0][:self.n]
        # generate() left-pads the prompts itself: the tokenizer's padding side is not involved.
        preds = generate(model, tokenizer, self.data, [r["dialogue"] for r in self.rows], GenerationConfig(),
                         progress=False)
        return {f"eval_{k}": v for k, v in score(preds, [r["summary"] for r in self.rows]).items()}


# ---------------------------------------------------------------- what a saved run or model folder holds
def read_json(path: Path, expect: type | None = None):
    """A JSON file's content; missing, empty, truncated, non-UTF-8 or of another type: one ConfigError line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: missing") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    if not text.strip():
        raise ConfigError(f"{path}: empty file")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except ValueError as e:  # an integer of more digits than Python converts (4300)
        raise ConfigError(f"{path}: not valid JSON ({str(e).partition(':')[0]})") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid JSON (nested too deeply)") from None
    if expect is not None and not isinstance(value, expect):
        want = {dict: "an object", list: "an array"}.get(expect, expect.__name__)
        raise ConfigError(f"{path}: expected {want}, got {type(value).__name__}")
    return value


def check_saved_model(folder: Path, adapter: bool) -> None:
    """Refuse a missing, truncated or corrupt file of a saved adapter or model and its tokenizer in one line,
    before a library reads it (they fail with a traceback, or warn and go on with random weights)."""
    from safetensors import safe_open

    folder = Path(folder)
    read_json(folder / ("adapter_config.json" if adapter else "config.json"), dict)
    for name in ("generation_config.json", "special_tokens_map.json", *TOKENIZER_FILES):
        if (folder / name).exists():
            read_json(folder / name, dict)
    if not any((folder / n).is_file() for n in TOKENIZER_FILES):
        raise ConfigError(f"{folder}: no tokenizer (tokenizer.json or tokenizer_config.json)")
    index = folder / "model.safetensors.index.json"
    if adapter:
        weights = [folder / "adapter_model.safetensors"]
    elif index.exists():
        shards = read_json(index, dict).get("weight_map")
        if not isinstance(shards, dict) or not shards:
            raise ConfigError(f"{index}: no weight_map")
        weights = [folder / s for s in sorted(set(map(str, shards.values())))]
    elif not (folder / "model.safetensors").exists() and any(folder.glob("pytorch_model*.bin")):
        weights = []  # a downloaded folder of torch weights: transformers reads them with weights_only=True
    else:
        weights = [folder / "model.safetensors"]
    for w in weights:
        if not w.is_file():
            raise ConfigError(f"{w}: missing")
        try:
            with safe_open(w, "pt"):  # reads the header and checks the file covers every tensor it lists
                pass
        except Exception as e:  # SafetensorError: truncated, empty or not safetensors at all
            raise ConfigError(f"{w}: not a complete safetensors file ({_first_line(e)})") from None


def check_adapter_fits(folder: Path, recipe: Recipe) -> None:
    """An adapter trained on another base is refused before that base loads: each LoRA matrix against the layer it
    goes on, in the base built from its config on the meta device (no weights, no memory)."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    from .shapes import random_shape_name
    from .smollm2 import EMBEDDED, embedded_model_dir

    name = recipe.model.name
    if random_shape_name(name) is not None:
        raise ConfigError(f"{folder / 'recipe.yaml'}: model.name {name} is a random base that was never saved: "
                          "its adapter cannot be loaded again")
    base = embedded_model_dir() if name == EMBEDDED else name
    with loading(base), torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
    modules = dict(model.named_modules())
    where = folder / "adapter_model.safetensors"
    with safe_open(where, "pt") as f:
        keys = [k for k in f.keys() if ".lora_" in k]
        if not keys:
            raise ConfigError(f"{where}: holds no LoRA weights")
        for key in keys:
            path, _, kind = key.removeprefix("base_model.model.").rpartition(".lora_")
            if path not in modules:
                raise ConfigError(f"{where}: {key} is for a layer {name} does not have: an adapter of another model")
            layer, shape = modules[path], f.get_slice(key).get_shape()
            if not isinstance(layer, torch.nn.Linear):
                continue  # an embedding's LoRA: its shapes are not in_features/out_features
            if shape[1] != layer.in_features if kind.startswith("A") else shape[0] != layer.out_features:
                raise ConfigError(f"{where}: {key} has shape {list(shape)}, which does not fit {path} of {name} "
                                  f"({layer.in_features} -> {layer.out_features}): an adapter of another model")


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    # "Error(s) in loading state_dict for X:" says what only on its next line
    return " ".join(lines[:2] if lines[0].endswith(":") and len(lines) > 1 else lines[:1])[:300]


@contextmanager
def loading(what):
    """What the checks above cannot see (a config or tokenizer the libraries reject, ...): one line, no traceback."""
    from .errors import SamsumTunerError

    try:
        yield
    except SamsumTunerError:
        raise
    except Exception as e:  # transformers, peft, tokenizers and safetensors raise many kinds
        raise ConfigError(f"{what}: cannot load ({_first_line(e)})") from None


@dataclass
class EvalSource:
    """What `samsum-tuner eval` reads, resolved and checked before anything loads."""

    recipe: Recipe
    folder: Path | None  # the run directory, merged folder or model folder; None: the model by name
    adapter: bool
    prompt_from: str  # where the prompt settings come from, for people

    def prompt(self) -> str:
        d = self.recipe.data
        how = f"chat template around {d.prompt_template!r}" if d.chat_template else repr(d.prompt_template)
        return f"{how} ({self.prompt_from})"


def _prompt_from(recipe_file: Path | None, overrides: list[str]) -> str:
    where = f"from {recipe_file}" if recipe_file else "default"
    keys = [k for k, _ in split_overrides(overrides) if k in ("data.prompt_template", "data.chat_template")]
    return where + "".join(f", {k} from the command line" for k in keys)


def run_recipe(folder: Path, overrides: list[str] | None = None) -> Recipe:
    """The recipe a run directory was saved with, then with the overrides: an error names the file it comes from."""
    file = Path(folder) / "recipe.yaml"
    try:
        recipe = build_recipe(file)
    except ConfigError as e:
        raise ConfigError(e if str(e).startswith(str(file)) else f"{file}: {e}") from None
    # A saved recipe holds every section: one cut short can still parse, into defaults the run never had.
    missing = [s for s in SECTIONS if s not in read_yaml(file)]
    if missing:
        raise ConfigError(f"{file}: incomplete (no {', '.join(missing)}: every saved recipe holds each section): a "
                          "damaged file?")
    return build_recipe(file, overrides) if overrides else recipe


def resolve_eval_source(run_or_model: str, overrides: list[str] | None = None) -> EvalSource:
    """A run directory (adapter or full model), a merged folder, a model folder or a model name: its recipe
    and files checked, nothing loaded."""
    from .model_source import check_model_source
    from .shapes import random_shape_name
    from .smollm2 import EMBEDDED

    overrides = list(overrides or [])
    path = Path(run_or_model)
    if (path / "recipe.yaml").is_file():
        recipe = run_recipe(path, overrides)
        adapter = (path / "adapter_config.json").exists()
        if not adapter and not (path / "config.json").exists():
            raise ConfigError(f"{path}: a run directory with neither adapter_config.json (LoRA) nor config.json "
                              "(a full model)")
        check_saved_model(path, adapter)
        if adapter:  # the base model the adapter goes on
            try:
                check_model_source(recipe.model)
            except ConfigError as e:
                raise ConfigError(f"{path / 'recipe.yaml'}: {e}") from None
            check_adapter_fits(path, recipe)
        return EvalSource(recipe, path, adapter, _prompt_from(path / "recipe.yaml", overrides))
    if run_or_model.startswith((".", "/", "~")) and not path.exists():
        raise ConfigError(f"{path}: no such run directory or model folder")
    if path.exists() and not (path / "config.json").is_file():
        if (path / "adapter_config.json").is_file():
            raise ConfigError(f"{path}: an adapter without recipe.yaml: its base model and prompt are unknown")
        raise ConfigError(f"{path}: neither a run directory (recipe.yaml) nor a model folder (config.json)")
    recipe = build_recipe(None, [f"model.name={run_or_model}", *overrides])
    if random_shape_name(recipe.model.name) is not None:
        raise ConfigError(f"model.name: {recipe.model.name} has random weights: nothing to evaluate")
    check_model_source(recipe.model)
    folder = path if path.is_dir() and recipe.model.name != EMBEDDED else None
    if folder is not None:
        check_saved_model(folder, adapter=False)
    return EvalSource(recipe, folder, False, _prompt_from(None, overrides))


def _model_path(src: EvalSource) -> str | Path:
    """Where the model (for an adapter, its base) loads from: the run's or model folder, else the base by name."""
    from .smollm2 import EMBEDDED, embedded_model_dir

    if src.folder is not None and not src.adapter:
        return src.folder
    return embedded_model_dir() if src.recipe.model.name == EMBEDDED else src.recipe.model.name


def check_max_new_tokens(gen: GenerationConfig, src: EvalSource) -> None:
    """Refuse --max-new-tokens beyond the model's context (max_position_embeddings) before the model loads: the
    model was never trained on those positions, and such a budget can keep generation going for hours."""
    from transformers import AutoConfig

    where = _model_path(src)
    with loading(where):
        config = AutoConfig.from_pretrained(where)
    context = getattr(config.get_text_config(), "max_position_embeddings", None)
    if isinstance(context, int) and not isinstance(context, bool) and gen.max_new_tokens > context:
        raise ConfigError(f"--max-new-tokens must be at most {context}, the context of {where} "
                          f"(max_position_embeddings), got {gen.max_new_tokens}")


def load_for_eval(source: EvalSource | str, overrides: list[str] | None = None):
    """(model, tokenizer, recipe) of a resolved source (or of a path or name, resolved here)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .model_source import load_tokenizer
    from .smollm2 import EMBEDDED, embedded_model_dir

    src = source if isinstance(source, EvalSource) else resolve_eval_source(source, overrides)
    recipe = src.recipe
    # Generation runs one padded batch at a time with a KV cache: sdpa, whatever attention the run trained with
    # (flex_attention would compile again for every new prompt width).
    load = {"dtype": torch.bfloat16 if torch.cuda.is_available() else torch.float32, "attn_implementation": "sdpa"}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with loading(src.folder or recipe.model.name):
        if src.folder is not None and (src.folder / "recipe.yaml").is_file():
            tokenizer = AutoTokenizer.from_pretrained(src.folder)  # as trained: its eos, pad and chat template
            if src.adapter:
                from peft import PeftModel

                base_name = embedded_model_dir() if recipe.model.name == EMBEDDED else recipe.model.name
                base = AutoModelForCausalLM.from_pretrained(base_name, **load)
                model = PeftModel.from_pretrained(base, src.folder)
            else:
                model = AutoModelForCausalLM.from_pretrained(src.folder, **load)
        else:
            tokenizer = load_tokenizer(recipe.model)
            name = embedded_model_dir() if recipe.model.name == EMBEDDED else recipe.model.name
            model = AutoModelForCausalLM.from_pretrained(name, **load)
    tokenizer.padding_side = "left"
    return model.to(device), tokenizer, recipe


def _output_folder(out_dir: str | None, src: EvalSource, split: str) -> Path | None:
    """Where predictions and metrics go, created now: a path that cannot hold them fails before the model loads."""
    is_run = src.folder is not None and (src.folder / "recipe.yaml").is_file()
    target = Path(out_dir) if out_dir else (src.folder if is_run else None)
    if target is None:
        return None
    flag = "--out " if out_dir else ""
    if target.exists() and not target.is_dir():
        raise ConfigError(f"{flag}{target}: exists and is not a folder")
    for name in (f"predictions_{split}.jsonl", f"eval_metrics_{split}.json"):
        if (target / name).is_dir():
            raise ConfigError(f"{target / name}: is a folder, not a file")
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{flag}{target}: cannot create the folder ({e.strerror})") from None
    return target


def evaluate(run_or_model: str, *, split: str = "test", limit: int | None = None, out_dir: str | None = None,
             gen: GenerationConfig | None = None, overrides: list[str] | None = None,
             progress: bool = True) -> dict[str, Any]:
    """ROUGE-1/2/L/Lsum, share ending at EOS, mean length; writes predictions_SPLIT.jsonl and
    eval_metrics_SPLIT.json (into the run directory, or `out_dir`). Everything is checked before the model loads."""
    gen = gen or GenerationConfig()
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise ConfigError(f"--limit must be a positive integer, got {limit!r}")
    src = resolve_eval_source(run_or_model, overrides)
    check_max_new_tokens(gen, src)
    target = _output_folder(out_dir, src, split)
    # The run's data settings (source, cleaning, prompt), but never its training slice.
    rows, _, origin = load_clean_split(src.recipe.data, split)
    rows = rows[:limit] if limit else rows
    print(f"samsum_tuner: prompt: {src.prompt()}", flush=True)
    model, tokenizer, recipe = load_for_eval(src)
    preds = generate(model, tokenizer, recipe.data, [r["dialogue"] for r in rows], gen, progress=progress)
    metrics: dict[str, Any] = score(preds, [r["summary"] for r in rows])
    metrics.update(rows=len(rows), split=split, source=origin, max_new_tokens=gen.max_new_tokens,
                   do_sample=gen.do_sample, chat_template=recipe.data.chat_template,
                   prompt_template=recipe.data.prompt_template, prompt_from=src.prompt_from)
    if target is not None:
        with open(target / f"predictions_{split}.jsonl", "w", encoding="utf-8") as fh:
            for r, p in zip(rows, preds):
                fh.write(json.dumps({"id": r["id"], "reference": r["summary"], **p}, ensure_ascii=False) + "\n")
        (target / f"eval_metrics_{split}.json").write_text(json.dumps(metrics, indent=2))
    return metrics
