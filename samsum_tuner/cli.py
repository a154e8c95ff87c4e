"""`samsum-tuner train|plan ...`: errors for people are one line and an exit code (0 ok, 2 bad input, 3 won't fit)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from .errors import SamsumTunerError

EXIT_OK, EXIT_BAD_INPUT, EXIT_WONT_FIT = 0, 2, 3


def _split_recipe(rest: list[str]) -> tuple[str | None, list[str]]:
    if rest and rest[0].endswith((".yaml", ".yml")) and "=" not in rest[0]:
        return rest[0], rest[1:]
    return None, rest


def _guard(fn: Callable[[], int]) -> int:
    try:
        return fn()
    except SamsumTunerError as e:
        print(f"samsum-tuner: error: {e}", file=sys.stderr, flush=True)
        return e.exit_code


class _Parser(argparse.ArgumentParser):
    """argparse prints usage plus a message and exits; ours is one line through `_guard`, like every error."""

    def error(self, message: str):
        from .errors import ConfigError

        raise ConfigError(f"{self.prog}: {message}")


def _train_parser(prog: str) -> argparse.ArgumentParser:
    p = _Parser(
        prog=prog,
        allow_abbrev=False,  # never let --lr or --use_fp16 be taken for a prefix of our own flags
        description="Fine-tune on SAMSum. RECIPE is a YAML file (omit it for the original's defaults); "
        "overrides are key.sub=value or the original llama-recipes flags (--use_peft, --lr 1e-4, ...).",
    )
    p.add_argument("--dry-run", action="store_true", help="resolve, check and prepare the data; load no model")
    p.add_argument("--force", action="store_true", help="train even if the memory planner says it will not fit")
    return p


def main_train(argv: list[str], prog: str = "samsum-tuner train") -> int:
    parser = _train_parser(prog)

    def run() -> int:
        from . import api

        opts, rest = parser.parse_known_args(argv)
        path, overrides = _split_recipe(rest)
        recipe = api.load_recipe(path, overrides)
        prepared = api.prepare(recipe, dry_run=opts.dry_run, force=opts.force)
        if prepared.launch.is_main:
            print(prepared.summary(), flush=True)
        if opts.dry_run:
            if prepared.launch.is_main:
                print("--- resolved recipe ---\n" + recipe.to_yaml(), end="", flush=True)
            return EXIT_OK
        metrics = api.train(recipe, trainer=api.build_trainer(recipe, prepared=prepared))
        if prepared.launch.is_main:
            shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}
            print(f"samsum_tuner: done: {shown}; saved in {recipe.train.output_dir}", flush=True)
        _close_process_group()
        return EXIT_OK

    return _guard(run)


def _close_process_group() -> None:
    """A launched run left with its process group open could hang after its last line: on an H200, 1-process FSDP
    runs printed "done", then NCCL's heartbeat thread kept calling the launcher's store, gone by then, and the
    process never exited. Closed on success only: after an error another rank may still wait in a collective."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main_plan(argv: list[str], prog: str = "samsum-tuner plan") -> int:
    p = _Parser(prog=prog, allow_abbrev=False,
                description="Predict peak GPU and host memory; exit 0 fits, 3 will not fit.")
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--gpu-memory", default=None, help="per GPU, e.g. 32GiB or 80")
    p.add_argument("--host-memory", default=None, help="whole node, e.g. 63GiB")
    p.add_argument("--lengths", choices=("data", "default"), default="data",
                   help="worst batch from the recipe's tokenized train split (default; needs the data and the "
                        "tokenizer, not the model) or from built-in SAMSum length statistics")
    p.add_argument("--cpu", action="store_true", help="a run without CUDA: everything in host memory")
    opts, rest = p.parse_known_args(argv)

    def run() -> int:
        from . import api
        from .errors import ConfigError
        from .planner import plan

        def gib(text: str | None, flag: str) -> float | None:
            if text is None:
                return None
            t = text.strip().lower().removesuffix("ib").removesuffix("g").removesuffix("b")
            try:
                value = float(t)
            except ValueError:
                raise ConfigError(f"{flag}: expected a size like 32GiB, got {text!r}") from None
            if value <= 0:
                raise ConfigError(f"{flag}: must be positive, got {text!r}")
            return value

        if opts.gpus <= 0:
            raise ConfigError(f"--gpus must be positive, got {opts.gpus}")
        path, overrides = _split_recipe(rest)
        recipe = api.load_recipe(path, overrides)
        if opts.lengths == "default":  # "data" checks the model on the way to its tokenizer
            from .model import check_model

            check_model(recipe)
        lengths, supervised = api.train_lengths(recipe) if opts.lengths == "data" else (None, None)
        result = plan(recipe, gpus=opts.gpus, gpu_memory_gib=gib(opts.gpu_memory, "--gpu-memory"),
                      host_memory_gib=gib(opts.host_memory, "--host-memory"), token_lengths=lengths,
                      supervised_lengths=supervised,
                      device="cpu" if opts.cpu else "cuda")
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
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--out", default=None, help="where predictions and metrics go (default: the run directory)")
    opts, overrides = p.parse_known_args(argv)

    def run() -> int:
        from .errors import ConfigError
        from .evaluation import GenerationConfig, evaluate

        for flag, v in (("--limit", opts.limit), ("--batch-size", opts.batch_size),
                        ("--max-new-tokens", opts.max_new_tokens)):
            if v is not None and v <= 0:
                raise ConfigError(f"{flag} must be positive, got {v}")
        gen = GenerationConfig(max_new_tokens=opts.max_new_tokens, batch_size=opts.batch_size,
                               do_sample=opts.sample, temperature=opts.temperature, top_p=opts.top_p)
        metrics = evaluate(opts.run_or_model, split=opts.split, limit=opts.limit, out_dir=opts.out, gen=gen,
                           overrides=overrides)
        print(json.dumps(metrics, indent=2))
        return EXIT_OK

    return _guard(run)


def _one_call_command(argv: list[str], prog: str, description: str, positional: list[str], act) -> int:
    """A command of positional arguments whose work is one call; `act(opts)` says what it did."""
    p = _Parser(prog=prog, allow_abbrev=False, description=description)
    for name in positional:
        p.add_argument(name)

    def run() -> int:
        print(f"samsum_tuner: {act(p.parse_args(argv))}")
        return EXIT_OK

    return _guard(run)


def main_merge(argv: list[str], prog: str = "samsum-tuner merge") -> int:
    def act(opts) -> str:
        from .merge import merge

        return f"merged model written to {merge(opts.run_dir, opts.out)}"

    return _one_call_command(argv, prog, "Merge a LoRA run's adapter into a plain HF model folder.",
                             ["run_dir", "out"], act)


def main_report(argv: list[str], prog: str = "samsum-tuner report") -> int:
    def act(opts) -> str:
        from .report import report

        return f"report written to {report(opts.run_dir)}"

    return _one_call_command(argv, prog, "report.md and PNG plots (loss, perplexity, learning rate, memory) of a "
                             "run directory.", ["run_dir"], act)


COMMANDS = {"train": main_train, "plan": main_plan, "eval": main_eval, "merge": main_merge, "report": main_report}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        names = "|".join(COMMANDS)
        print(f"usage: samsum-tuner {{{names}}} [RECIPE.yaml] [overrides ...]", file=sys.stderr)
        return EXIT_OK if argv and argv[0] in ("-h", "--help") else EXIT_BAD_INPUT
    return _guard(lambda: COMMANDS[argv[0]](argv[1:], prog=f"samsum-tuner {argv[0]}"))


if __name__ == "__main__":
    sys.exit(main())
