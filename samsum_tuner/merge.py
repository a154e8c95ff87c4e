"""A LoRA run's adapter merged into a plain HF folder that `AutoModelForCausalLM.from_pretrained` loads.

The folder also carries what `samsum-tuner eval` needs to evaluate it as the adapter was trained: the tokenizer
as trained (eos, pad, chat template) and the run's recipe (prompt template, chat template flag, max length), with
LoRA and quantization off, since the weights are now a plain float32 model.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

from .checks import check_output_location
from .config import Recipe
from .errors import ConfigError
from .evaluation import check_adapter_fits, check_saved_model, loading, run_recipe

MARKER = "merged_from.json"  # written last into every merged folder: --overwrite replaces only such a folder


def merged_recipe(recipe: Recipe) -> Recipe:
    """The run's recipe describing the merged folder: same data and prompt, a plain float32 model."""
    r = copy.deepcopy(recipe)
    r.lora.enabled = False
    r.quantization.bits = None  # merged into the full-precision base, never into 4/8-bit weights
    r.model.dtype = "float32"
    return r


def _check_target(target: Path, run: Path, overwrite: bool) -> None:
    if target.exists() and not target.is_dir():
        raise ConfigError(f"{target}: exists and is not a folder")
    parent = next(p for p in (target.absolute(), *target.absolute().parents) if p.exists())
    if not parent.is_dir():
        raise ConfigError(f"{target}: {parent} is a file, not a folder")
    # The merge writes beside the target first (its staging folder), so that folder's parent must take it.
    check_output_location(str(target.parent), what=f"{target}")
    if target.exists() and target.resolve() == run.resolve():
        raise ConfigError(f"{target}: is the run directory itself; choose another folder")
    if target.is_dir() and any(target.iterdir()):
        if not overwrite:
            raise ConfigError(f"{target}: exists and is not empty; choose another folder (--overwrite replaces an "
                              "earlier merge)")
        if not (target / MARKER).is_file():
            raise ConfigError(f"{target}: not a folder that samsum-tuner merge wrote (no {MARKER}); --overwrite "
                              "replaces only an earlier merge")


def _check_run(run: Path) -> Recipe:
    from .model_source import check_model_source

    if not run.is_dir():
        raise ConfigError(f"{run}: {'is not a folder' if run.exists() else 'no such run directory'}")
    if not (run / "adapter_config.json").exists():
        what = ("a full fine-tune's folder already loads with from_pretrained: nothing to merge"
                if (run / "config.json").is_file() else "not a LoRA run directory")
        raise ConfigError(f"{run}: no adapter_config.json: {what}")
    if not (run / "recipe.yaml").is_file():
        raise ConfigError(f"{run}: no recipe.yaml: the base model of the adapter is unknown")
    recipe = run_recipe(run)
    check_saved_model(run, adapter=True)
    try:
        check_model_source(recipe.model)  # the base the adapter goes on
    except ConfigError as e:
        raise ConfigError(f"{run / 'recipe.yaml'}: {e}") from None
    check_adapter_fits(run, recipe)
    return recipe


def merge(run_dir: str, out: str, *, overwrite: bool = False) -> Path:
    """Merge the adapter of `run_dir` into its base and write the plain model folder `out`. Everything is checked
    before the model loads; `out` appears only once complete, and replaces an earlier merge only with `overwrite`."""
    run, target = Path(run_dir), Path(os.path.abspath(out))  # absolute: `.` has no name to stage beside
    recipe = _check_run(run)
    _check_target(target, run, overwrite)

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .smollm2 import EMBEDDED, embedded_model_dir

    # Always the full-precision base, also for QLoRA runs: merging into 4-bit weights would round the adapter away.
    base_name = embedded_model_dir() if recipe.model.name == EMBEDDED else recipe.model.name
    with loading(run):
        tokenizer = AutoTokenizer.from_pretrained(run)
        base = AutoModelForCausalLM.from_pretrained(base_name, dtype=torch.float32)
        merged = PeftModel.from_pretrained(base, run).merge_and_unload()
    # A plain generate() stops at the EOS the run was trained to end with.
    merged.generation_config.eos_token_id = tokenizer.eos_token_id
    merged.generation_config.pad_token_id = tokenizer.pad_token_id
    try:
        target.absolute().parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.absolute().parent))
    except OSError as e:
        raise ConfigError(f"{target}: cannot write the merged model ({e.strerror or e})") from None
    try:
        merged.save_pretrained(partial)  # safetensors
        tokenizer.save_pretrained(partial)
        (partial / "recipe.yaml").write_text(merged_recipe(recipe).to_yaml(), encoding="utf-8")
        (partial / MARKER).write_text(json.dumps({"run_dir": str(run.resolve()), "base_model": recipe.model.name},
                                                 indent=2), encoding="utf-8")
        if target.exists():  # empty, or an earlier merge with overwrite: moved aside, then removed
            aside = target.with_name(f".{target.name}.replaced-{os.getpid()}")
            target.rename(aside)
            partial.rename(target)
            shutil.rmtree(aside)
        else:
            partial.rename(target)
    except OSError as e:
        shutil.rmtree(partial, ignore_errors=True)
        raise ConfigError(f"{target}: cannot write the merged model ({e.strerror or e})") from None
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return target
