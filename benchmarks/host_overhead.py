"""Host time per optimizer step by package: how much of a step's Python runs in samsum_tuner, transformers,
accelerate and torch, and how much in torch's C++ operators (on a GPU: launches, on a CPU: the compute too).

    python benchmarks/host_overhead.py [--steps 150] [--warmup 3] MODEL_DIR [override ...]

It trains `recipes/smollm2_gpu.yaml` on MODEL_DIR (a small local model folder: the question is the host's share,
not the model's FLOPs) with 64-token rows and sdpa on the CPU, under cProfile, and prints milliseconds per step.
"""
from __future__ import annotations

import argparse
import collections
import cProfile
import json
import pstats
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("samsum_tuner", "transformers", "accelerate", "torch")


def _package(filename: str) -> str:
    if filename == "~":
        return "C++ operators and builtins"
    return next((p for p in PACKAGES if f"/{p}/" in filename), "other Python")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--warmup", type=int, default=3, help="steps before the profiled ones (compilation among them)")
    p.add_argument("--top", metavar="PACKAGE", help="also list this package's 10 functions of most own time")
    p.add_argument("overrides", nargs="*", help="recipe overrides, key=value")
    a = p.parse_args()

    from transformers import TrainerCallback

    import samsum_tuner as st

    recipe = st.load_recipe(ROOT / "recipes" / "smollm2_gpu.yaml", [
        f"model.name={a.model_dir}", "model.attn_implementation=sdpa", "data.split_slice=[:3000]",
        "data.max_length=64", "data.max_tokens_per_batch=64", "data.pad_to_multiple_of=64",
        f"train.max_steps={a.steps}", "train.bf16=false", "train.eval_strategy=no", "train.save_model=false",
        "train.report_to=[]", "train.disable_tqdm=true", "memory.preflight=false",
        "train.output_dir=/tmp/host_overhead", "train.overwrite_output_dir=true", *a.overrides])
    profiler, clock = cProfile.Profile(), {}

    class ProfileAfterWarmup(TrainerCallback):  # compilation and first-step set-up are not the step's host time
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == a.warmup:
                clock["start"] = time.perf_counter()
                profiler.enable()

        def on_train_end(self, args, state, control, **kwargs):
            profiler.disable()
            clock["wall"] = time.perf_counter() - clock["start"]

    trainer = st.build_trainer(recipe, callbacks=[ProfileAfterWarmup()])
    trainer.train()
    wall, steps = clock["wall"], a.steps - a.warmup
    stats = pstats.Stats(profiler)
    by_package: collections.Counter = collections.Counter()
    for (filename, _, _), (_, _, own_s, _, _) in stats.stats.items():
        by_package[_package(filename)] += own_s
    if a.top:
        stats.sort_stats("tottime").print_stats(f"/{a.top}/", 10)
    print(json.dumps({"steps": steps, "ms_per_step": round(1000 * wall / steps, 2),
                      "own_ms_per_step": {k: round(1000 * v / steps, 2) for k, v in by_package.most_common()}}))


if __name__ == "__main__":
    main()
