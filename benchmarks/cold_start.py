"""The first optimizer step of a training taken apart: runs `samsum_tuner.train` in this process with the given
arguments and, when it ends, writes torch.compile's seconds per phase (each phase's list, one entry per frame or
graph it compiled) and dynamo's counters (graphs, graph breaks, recompilations) to a JSON file.

    [TORCH_TRACE=DIR] python benchmarks/cold_start.py OUT.json RECIPE.yaml [override ...]

With TORCH_TRACE set, `tlparse` reads DIR's structured log (each graph, its compile metrics, the generated code).
"""
from __future__ import annotations

import atexit
import json
import runpy
import sys


def _write(path: str) -> None:
    utils = sys.modules.get("torch._dynamo.utils")  # absent when the run stopped before torch was imported
    if utils is not None:
        json.dump({"seconds": {k: [round(x, 4) for x in v] for k, v in utils.compilation_time_metrics.items()},
                   "counters": {k: dict(v) for k, v in utils.counters.items()}}, open(path, "w"), indent=1)


if __name__ == "__main__":
    out, sys.argv = sys.argv[1], ["samsum_tuner.train", *sys.argv[2:]]
    atexit.register(_write, out)
    runpy.run_module("samsum_tuner.train", run_name="__main__")
