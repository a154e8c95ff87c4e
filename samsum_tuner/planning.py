"""`samsum-tuner plan` as a call: the memory planner fed with the recipe's real token lengths (data and tokenizer,
never the weights), or with built-in SAMSum statistics, working offline."""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

from .config import Recipe
from .data import read_splits, tokenize_splits
from .errors import ConfigError
from .resolve import lora_targets


def _on_hub(name: str) -> bool:
    from .model_source import looks_local
    from .shapes import random_shape_name
    from .smollm2 import EMBEDDED

    return not (name == EMBEDDED or random_shape_name(name) is not None or looks_local(name))


def check_for_plan(recipe: Recipe) -> None:
    """What a plan checks of the model: all but a hub model's config (the planner has the shapes it knows, and
    training checks the rest when it loads), so that a plan works offline."""
    from .model_source import check_model

    if not _on_hub(recipe.model.name):
        check_model(recipe.model, lora_targets(recipe))


class HubUnreachable(ConfigError):
    """The tokenizer or the data is on the hub, which cannot be reached now, and the local cache has no copy."""


def train_lengths(recipe: Recipe) -> tuple[list[int], list[int]]:
    """Per-sample token counts of the train split as training would see them, and their supervised (summary)
    tokens: data and tokenizer, never the model. A tokenizer in the hub cache is read from there; HubUnreachable,
    at once, when the tokenizer or the data must come from a hub that cannot serve it now."""
    from huggingface_hub import constants

    from .data import resolve_source
    from .hub import hub_problem, in_hub_cache
    from .model_source import load_tokenizer, looks_local

    name, source = recipe.model.name, resolve_source(recipe.data)
    missing, cached_tokenizer = [], False  # missing: (what, why)
    if not _on_hub(name):
        check_for_plan(recipe)  # a missing or broken folder, an unknown shape, LoRA targets it lacks: by name
    else:  # the model's config.json only, which AutoTokenizer reads too; the planner has its own shapes
        cached_tokenizer = in_hub_cache(name, ("config.json", "tokenizer_config.json"),
                                        revision=recipe.model.revision)
        why = None if cached_tokenizer else hub_problem(name, "config.json", constants.HF_HUB_OFFLINE,
                                                        revision=recipe.model.revision)
        missing += [(f"the tokenizer of {name}", why)] if why else []
    if not looks_local(source):
        import datasets

        offline = datasets.config.HF_HUB_OFFLINE  # HF_DATASETS_OFFLINE, else HF_HUB_OFFLINE
        cached = in_hub_cache(source, ("README.md",), repo_type="dataset")
        # datasets reads its cache in offline mode only: online it retries an unreachable hub file by file.
        why = None if offline and cached else hub_problem(source, "README.md", offline, repo_type="dataset")
        why = why and why + ("; HF_DATASETS_OFFLINE=1 reads the cached copy" if cached else "")
        missing += [(f"the data {source}", why)] if why else []
    if missing:
        whys = {why for _, why in missing}
        raise HubUnreachable("cannot reach " + " or ".join(what for what, _ in missing) + f" ({whys.pop()})"
                             if len(whys) == 1 else "cannot reach " + " or ".join(f"{w} ({y})" for w, y in missing))
    data = replace(recipe.data, eval_split=None)
    raw = read_splits(data)  # data errors (file:line) before the tokenizer
    tokenizer = load_tokenizer(recipe.model, run_code=False, local_files_only=cached_tokenizer)
    split = tokenize_splits(data, tokenizer, raw)["train"]
    return split.lengths, split.supervised


def plan(recipe: Recipe, *, gpus: int = 1, gpu_memory_gib: float | None = None, host_memory_gib: float | None = None,
         device: str = "cuda", lengths: str = "data", on_unreachable: Callable[[str], None] | None = None):
    """`samsum-tuner plan` as a call: the memory planner's `Plan` (`.table()`, `.verdict`, `.fits`) for `gpus`
    processes, with no weights loaded. lengths="data" takes the worst batch from the recipe's tokenized train split
    (data and tokenizer), "default" from built-in SAMSum length statistics; device="cpu" plans a run without CUDA.
    With `on_unreachable`, a tokenizer or data the hub cannot serve now is told to it (HubUnreachable's message)
    and the plan takes the built-in lengths instead of raising."""
    from .planner import plan as plan_memory

    if gpus <= 0:
        raise ConfigError(f"gpus must be positive, got {gpus}")
    if lengths not in ("data", "default"):
        raise ConfigError(f"lengths: expected 'data' or 'default', got {lengths!r}")
    token_lengths = supervised = None
    if lengths == "default":
        check_for_plan(recipe)
    else:
        try:
            token_lengths, supervised = train_lengths(recipe)
        except HubUnreachable as e:  # train_lengths checked the model (check_for_plan) before it found this
            if on_unreachable is None:
                raise
            on_unreachable(str(e))
    return plan_memory(recipe, gpus=gpus, gpu_memory_gib=gpu_memory_gib, host_memory_gib=host_memory_gib,
                       token_lengths=token_lengths, supervised_lengths=supervised, device=device)
