"""`samsum-tuner COMMAND ...`: errors for people are one line and an exit code (0 ok, 2 bad input, 3 won't fit)."""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import re
import sys
import time
from typing import Any, Callable

from .errors import ConfigError, SamsumTunerError

EXIT_OK, EXIT_BAD_INPUT, EXIT_WONT_FIT, EXIT_INTERRUPTED = 0, 2, 3, 130
# The exit codes every subcommand's help names (errors.py defines 5; EXIT_* above the others).
EXIT_CODES = ("0 done, 2 bad input (one line naming the key or file:line), 3 will not fit (or CUDA out of memory),\n"
              "4 diverged, 5 no space left while saving, 130 interrupted")
RECIPE_HELP = "a recipe file (recipes/*.yaml); omit it for the original's defaults"
OVERRIDE_HELP = ("key.sub=value (train.learning_rate=2e-5, lora.target_modules=q_proj,v_proj) or an original "
                 "llama-recipes flag (--use_peft, --lr 1e-4, --quantization True); `samsum-tuner keys` lists them all")


def _split_recipe(rest: list[str]) -> tuple[str | None, list[str]]:
    if rest and rest[0].endswith((".yaml", ".yml")) and "=" not in rest[0]:
        return rest[0], rest[1:]
    return None, rest


def _speaks_for_the_launch() -> bool:
    """Local rank 0 (or a process not launched at all): the one process of a launch on this machine that reports
    an error every process reaches alike. A LOCAL_RANK that is no rank speaks too: launch.py refuses it, on every
    process, and no process would speak otherwise."""
    local_rank = os.environ.get("LOCAL_RANK", "0").strip()
    return not local_rank.isdigit() or int(local_rank) == 0


# A launcher stops every worker once one exits: a silent rank that exits first can kill local rank 0 before it
# prints. It waits this long instead; if rank 0 has not ended the launch by then, it prints its own line.
SILENT_RANK_GRACE_S = 15.0


def _guard(fn: Callable[[], int], say: bool = True) -> int:
    try:
        return fn()
    except SamsumTunerError as e:
        if not say:
            time.sleep(SILENT_RANK_GRACE_S)
        print(f"samsum-tuner: error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt as e:  # Ctrl-C: one line (training's names the last complete checkpoint), no traceback
        print(f"samsum-tuner: {str(e) or 'interrupted'}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED


class _Parser(argparse.ArgumentParser):
    """argparse prints usage plus a message and exits; ours is one line through `_guard`, like every error."""

    def error(self, message: str):
        raise ConfigError(f"{self.prog}: {message}")


def _parse_with_recipe(argv: list[str], prog: str, description: str, add_options: Callable[[Any], None],
                       epilog: str | None = None) -> tuple[argparse.Namespace, list[str]] | None:
    """(our options, RECIPE and the overrides as given), or None after printing --help. argparse parses our
    options alone: it would split an override such as `--lr 1e-4` into an unknown option and a positional. A twin
    parser that also declares RECIPE and the overrides answers --help."""
    if "-h" in argv or "--help" in argv:
        shown = _Parser(prog=prog, description=description, epilog=epilog, allow_abbrev=False,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
        shown.add_argument("recipe", metavar="RECIPE.yaml", nargs="?", help=RECIPE_HELP)
        shown.add_argument("overrides", metavar="OVERRIDE", nargs="*", help=OVERRIDE_HELP)
        add_options(shown)
        shown.print_help()
        return None
    options = _Parser(prog=prog, allow_abbrev=False, add_help=False)  # never take --lr for a prefix of ours
    add_options(options)
    opts, rest = options.parse_known_args(argv)
    for tok in rest:  # `--dry_run` would reach the recipe as an unknown key: name the option it misspells
        name = tok.split("=", 1)[0]
        flag = name.replace("_", "-")
        if name.startswith("--") and flag != name and flag in options._option_string_actions:
            raise ConfigError(f"{prog}: unknown option '{tok}'; did you mean {flag}?")
    return opts, rest


TRAIN_EPILOG = f"""examples:
  samsum-tuner train recipes/demo_cpu.yaml train.max_steps=10 data.split_slice=1%
  samsum-tuner train recipes/full_sgd.yaml --dry-run
  python -m samsum_tuner.train --use_peft --peft_method lora --quantization True --use_fp16 --model_name DIR

Overrides apply after the recipe, left to right. Exit codes: {EXIT_CODES}. Under torchrun or
accelerate launch the same refusal reaches every process and local rank 0 prints it."""


def _train_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true", help="resolve, check and prepare the data; load no model")
    p.add_argument("--force", action="store_true", help="train even if the memory planner says it will not fit")


def main_train(argv: list[str], prog: str = "samsum-tuner train") -> int:
    ready: dict[str, Any] = {}

    def prepare() -> int:
        from . import api

        parsed = _parse_with_recipe(argv, prog, "Fine-tune on SAMSum: a recipe, then overrides of its keys.",
                                    _train_options, TRAIN_EPILOG)
        if parsed is None:
            return EXIT_OK
        opts, rest = parsed
        path, overrides = _split_recipe(rest)
        recipe = api.load_recipe(path, overrides)
        ready.update(opts=opts, recipe=recipe,
                     prepared=api.prepare(recipe, dry_run=opts.dry_run, force=opts.force))
        return EXIT_OK

    # A refusal before training (recipe, machine, data, memory plan) reaches every process of a launch alike:
    # one line from local rank 0, not one per process; every process still exits with its code.
    code = _guard(prepare, say=_speaks_for_the_launch())
    if code != EXIT_OK or not ready:
        return code
    return _guard(lambda: _train(**ready))


def _train(opts: argparse.Namespace, recipe, prepared) -> int:
    from . import api

    if prepared.launch.is_main:
        print(prepared.summary(), flush=True)
    if opts.dry_run:
        if prepared.launch.is_main:
            print("--- resolved recipe ---\n" + recipe.to_yaml(), end="", flush=True)
        _close_process_group()  # completing TrainingArguments (their checks) may have opened it
        return EXIT_OK
    metrics = api.train(recipe, trainer=api.build_trainer(recipe, prepared=prepared))
    if prepared.launch.is_main:
        shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}
        print(f"samsum_tuner: done: {shown}; saved in {recipe.train.output_dir}", flush=True)
    _close_process_group()
    return EXIT_OK


def _close_process_group() -> None:
    """A launched run left with its process group open can hang after its last line (NCCL's heartbeat thread keeps
    calling the launcher's store, gone by then; docs/notes.md). Closed on success only: after an error another rank
    may still wait in a collective."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# Size units: binary ones (GiB, G, a bare number) as the planner counts; SI ones (GB = 10^9 bytes) converted.
SIZE_UNITS = {"": 2**30, "g": 2**30, "gib": 2**30, "t": 2**40, "tib": 2**40, "m": 2**20, "mib": 2**20,
              "gb": 10**9, "tb": 10**12, "mb": 10**6}
SIZE_HELP = "32GiB, 32G or 32 mean 32 x 2^30 bytes; 32GB means 32 x 10^9 bytes (SI, said when read); MiB/MB, TiB/TB too"


def parse_size_gib(text: str, flag: str) -> tuple[float, str | None]:
    """A size in GiB, and a line saying how an SI size (GB, TB, MB) was read, where one was."""
    m = re.fullmatch(r"\s*(.*?)\s*([a-z]*)\s*", text.lower())
    number, unit = m.groups() if m and m.group(2) not in ("nan", "inf", "infinity") else (text, "")
    try:
        value = float(number) * SIZE_UNITS[unit] / 2**30
    except (ValueError, KeyError):
        raise ConfigError(f"{flag}: expected a size such as 32GiB, 32G or 32 (GiB) or 32GB (10^9 bytes), "
                          f"got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{flag}: expected a positive finite size like 32GiB, got {text!r}")
    if not unit.endswith("b") or unit.endswith("ib"):
        return value, None
    binary = unit[0] + "ib"
    return value, (f"{flag} {text.strip()} read as {value:.2f} GiB ({unit.upper()} = 10^"
                   f"{len(str(SIZE_UNITS[unit])) - 1} bytes; {number}{binary[0].upper()}iB would be {number} x 2^"
                   f"{SIZE_UNITS[binary].bit_length() - 1})")


def _plan_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpus", type=int, default=1, help="GPUs (one process each); default 1")
    p.add_argument("--gpu-memory", default=None, metavar="SIZE",
                   help=f"per GPU: {SIZE_HELP}; default: not checked")
    p.add_argument("--host-memory", default=None, metavar="SIZE", help="the whole node, same units; default: not "
                   "checked")
    p.add_argument("--lengths", choices=("data", "default"), default="data",
                   help="worst batch from the recipe's tokenized train split (default; needs the data and the "
                        "tokenizer, not the model; where the hub holds either and cannot be reached, the built-in "
                        "lengths, said in one line) or from built-in SAMSum length statistics")
    p.add_argument("--cpu", action="store_true", help="a run without CUDA: everything in host memory")


PLAN_EPILOG = """examples:
  samsum-tuner plan recipes/full_sgd.yaml --gpus 4 --gpu-memory 32GiB --host-memory 63GiB
  samsum-tuner plan recipes/lora_fp16.yaml --gpu-memory 32GB model.name=random:llama2-13b

Exit codes: 0 fits (or nothing to check against), 3 will not fit (naming the nearest configuration that does),
2 bad input."""


def main_plan(argv: list[str], prog: str = "samsum-tuner plan") -> int:
    def run() -> int:
        from . import api, planning

        parsed = _parse_with_recipe(argv, prog, "Predict peak GPU memory per rank and host memory per node before "
                                    "anything loads.", _plan_options, PLAN_EPILOG)
        if parsed is None:
            return EXIT_OK
        opts, rest = parsed
        if opts.gpus <= 0:
            raise ConfigError(f"--gpus must be positive, got {opts.gpus}")
        sizes = {}
        for flag, text in (("--gpu-memory", opts.gpu_memory), ("--host-memory", opts.host_memory)):
            sizes[flag], said = parse_size_gib(text, flag) if text is not None else (None, None)
            if said:
                print(f"samsum-tuner: note: {said}", file=sys.stderr, flush=True)
        path, overrides = _split_recipe(rest)
        recipe = api.load_recipe(path, overrides)

        def unreachable(why: str) -> None:
            print(f"samsum-tuner: note: {why}; planning with the built-in SAMSum lengths (--lengths default)",
                  file=sys.stderr, flush=True)

        result = planning.plan(recipe, gpus=opts.gpus, gpu_memory_gib=sizes["--gpu-memory"],
                               host_memory_gib=sizes["--host-memory"], device="cpu" if opts.cpu else "cuda",
                               lengths=opts.lengths, on_unreachable=unreachable)
        print(result.table())
        print(result.verdict)
        return EXIT_WONT_FIT if result.fits is False else EXIT_OK

    return _guard(run)


def main_eval(argv: list[str], prog: str = "samsum-tuner eval") -> int:
    p = _Parser(prog=prog, allow_abbrev=False,
                description="ROUGE of a run directory or a model by batched generation.")
    p.add_argument("run_or_model", help="a run directory (adapter or full model) or a model name/folder")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=None, help="first N rows of the split")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=None, help="with --sample (default 1.0)")
    p.add_argument("--top-p", type=float, default=None, help="with --sample (default 1.0)")
    p.add_argument("--out", default=None, help="where predictions and metrics go (default: the run directory)")

    def run() -> int:
        from .evaluation import GenerationConfig, evaluate

        opts, overrides = p.parse_known_args(argv)
        for flag, v in (("--temperature", opts.temperature), ("--top-p", opts.top_p)):
            if v is not None and not opts.sample:
                raise ConfigError(f"{flag} applies only with --sample (greedy decoding has no {flag[2:]})")
        gen = GenerationConfig(max_new_tokens=opts.max_new_tokens, batch_size=opts.batch_size, do_sample=opts.sample,
                               temperature=1.0 if opts.temperature is None else opts.temperature,
                               top_p=1.0 if opts.top_p is None else opts.top_p)
        metrics = evaluate(opts.run_or_model, split=opts.split, limit=opts.limit, out_dir=opts.out, gen=gen,
                           overrides=overrides)
        print(json.dumps(metrics, indent=2))
        return EXIT_OK

    return _guard(run)


def main_merge(argv: list[str], prog: str = "samsum-tuner merge") -> int:
    p = _Parser(prog=prog, allow_abbrev=False, description="Merge a LoRA run's adapter into a plain HF model "
                "folder that also carries the run's tokenizer and recipe (so eval uses the training prompt).")
    p.add_argument("run_dir")
    p.add_argument("out")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier merge in OUT")

    def run() -> int:
        from .merge import merge

        opts = p.parse_args(argv)
        print(f"samsum_tuner: merged model written to {merge(opts.run_dir, opts.out, overwrite=opts.overwrite)}")
        return EXIT_OK

    return _guard(run)


def main_report(argv: list[str], prog: str = "samsum-tuner report") -> int:
    p = _Parser(prog=prog, allow_abbrev=False, description="report.md and PNG plots (loss, perplexity, learning "
                "rate, memory) of a run directory.")
    p.add_argument("run_dir")

    def run() -> int:
        from .report import report

        print(f"samsum_tuner: report written to {report(p.parse_args(argv).run_dir)}")
        return EXIT_OK

    return _guard(run)


# The original's flags whose value is translated, or that set more than one key.
ALIAS_NOTES = {
    "quantization": "True or 4bit: 4 (NF4); 8bit: 8",
    "fsdp_config.optimizer": "SGD: sgd; AdamW: adamw_torch",
    "fsdp_config.pure_bf16": "True: bfloat16 weights",
    "peft_method": "lora only",
    "dataset": "samsum_dataset only (checked; SAMSum is the only dataset)",
    "batch_size_training": "samples per optimizer step: train.gradient_accumulation_steps = N / micro_batch_size",
    "fast_path": "true: packed padding-free rows, one per optimizer step, sdpa unless an override names an "
                 "attention (README: the fast path)",
    "load_in_4bit": "bitsandbytes' name: true sets 4 (NF4)",
    "load_in_8bit": "bitsandbytes' name: true sets 8",
    "torch_dtype": "float32, bfloat16 or float16 (auto: null)",
    "gradient_checkpointing": "TrainingArguments' and TRL's name for the one switch",
}


def _shown_default(value: Any) -> str:
    """A default as it would be written in an override."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, list):
        return ",".join(value) if value else "[]"
    if isinstance(value, str) and (value == "" or re.search(r"[\s,:#{}]", value)):
        return json.dumps(value)
    return str(value)


def one_line(text: str) -> str:
    """A field's help on one line (TrainingArguments' own helps run over several)."""
    return " ".join(text.split())


def main_keys(argv: list[str], prog: str = "samsum-tuner keys") -> int:
    from .config import SECTIONS, Recipe
    from .recipe import ALIASES

    p = _Parser(prog=prog, allow_abbrev=False,
                description="Every recipe key with its default and one line of help, then the original "
                "llama-recipes flags and the keys they set. Set a key in a recipe (section: then key: value) "
                "or on the command line (section.key=value).")
    p.add_argument("section", nargs="?", choices=[*SECTIONS, "aliases"], metavar="SECTION",
                   help=f"only this section: {', '.join(SECTIONS)} or aliases")

    def run() -> int:
        opts = p.parse_args(argv)
        rows = []
        for section in [s for s in SECTIONS if opts.section in (None, s)]:
            obj = getattr(Recipe(), section)
            rows += [(f"{section}.{f.name}", _shown_default(getattr(obj, f.name)), one_line(f.metadata.get("help", "")))
                     for f in dataclasses.fields(obj) if f.init]
        if opts.section is None:
            d = next(f for f in dataclasses.fields(Recipe) if f.name == "description")
            rows.append(("description", _shown_default(d.default), d.metadata.get("help", "")))
        if opts.section in (None, "aliases"):
            rows.append(("", "", ""))
            rows.append(("alias", "sets", "the original llama-recipes flags, TRL's, peft's and bitsandbytes' names and "
                         "our own: --alias value, --alias=value or alias=value; every train.KEY is also --KEY"))
            for alias, (target, _) in ALIASES.items():
                sets = target if target and not target.startswith("_") else "-"
                rows.append((f"--{alias}", sets, ALIAS_NOTES.get(alias, "")))
        key_w = max(len(r[0]) for r in rows)
        default_w = min(max(len(r[1]) for r in rows), 26)
        for key, default, text in rows:
            print(f"{key:<{key_w}}  {default:<{default_w}}  {text}".rstrip())
        return EXIT_OK

    return _guard(run)


COMMANDS = {"train": main_train, "plan": main_plan, "eval": main_eval, "merge": main_merge, "report": main_report,
            "keys": main_keys}
SUMMARIES = {
    "train": "fine-tune on SAMSum: RECIPE.yaml, then key.sub=value overrides or the original's flags",
    "plan": "predict peak GPU and host memory before anything loads; exit 0 fits, 3 will not fit",
    "eval": "ROUGE of a run directory or a model, by batched generation",
    "merge": "merge a LoRA run's adapter into a plain HF model folder",
    "report": "report.md and PNG plots (loss, perplexity, learning rate, memory) of a run directory",
    "keys": "every recipe key with its default and help, and the original llama-recipes flags",
    "help": "this list; samsum-tuner help COMMAND (or COMMAND --help) shows a command's arguments",
}


def _overview() -> str:
    width = max(map(len, SUMMARIES))
    lines = ["usage: samsum-tuner COMMAND [ARGUMENTS ...]", "",
             "Fine-tune Llama-family causal LMs on SAMSum with every memory strategy, and know before a model "
             "loads whether it fits.", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in SUMMARIES.items()]
    lines += ["", f"Exit codes: {EXIT_CODES}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]) or argv == ["help"] or not argv:
        print(_overview(), file=sys.stdout if argv else sys.stderr)
        return EXIT_OK if argv else EXIT_BAD_INPUT
    if argv[0] == "help":  # help COMMAND: that command's --help; `help help`: help's own usage
        if len(argv) > 2 or argv[1] in ("help", "-h", "--help"):
            bad = len(argv) > 2
            print(f"samsum-tuner: error: help: unexpected argument {argv[2]!r}; samsum-tuner help COMMAND takes "
                  "one command" if bad else "usage: samsum-tuner help [COMMAND]\n\nThe commands, each in a line; "
                  "with COMMAND, that command's arguments (as COMMAND --help).", file=sys.stderr if bad else sys.stdout)
            return EXIT_BAD_INPUT if bad else EXIT_OK
        argv = [argv[1], "--help"]
    name = argv[0]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, list(SUMMARIES), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        print(f"samsum-tuner: error: unknown command {name!r}{hint}; the commands: {', '.join(SUMMARIES)} "
              "(samsum-tuner --help describes them)", file=sys.stderr)
        return EXIT_BAD_INPUT
    return _guard(lambda: COMMANDS[name](argv[1:], prog=f"samsum-tuner {name}"))


if __name__ == "__main__":
    sys.exit(main())
