"""`python -m samsum_tuner COMMAND ...`: the console script `samsum-tuner` without an installed entry point."""
import sys

from .cli import main

sys.exit(main(sys.argv[1:]))
