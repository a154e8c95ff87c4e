"""`python -m samsum_tuner.train [RECIPE.yaml] [key=value | --llama_recipes_flag value ...]`

Also runs under `accelerate launch` and `torchrun`. Thin: parse, check, plan, build, train.
"""
from __future__ import annotations

import sys

from .cli import main_train

if __name__ == "__main__":
    sys.exit(main_train(sys.argv[1:]))
