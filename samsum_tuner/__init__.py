"""samsum_tuner: fine-tune Llama-family causal LMs on SAMSum, and know before loading whether it fits."""
from . import noise  # noqa: F401  (first: its filters are in place before the libraries below load)
from .api import Prepared, build_trainer, load_recipe, prepare, save, train
from .config import Recipe
from .evaluation import evaluate
from .merge import merge
from .planning import plan
from .report import report
from .errors import ConfigError, DataError, SamsumTunerError, WontFitError

__all__ = [
    "load_recipe", "plan", "prepare", "build_trainer", "train", "save", "evaluate", "merge", "report", "Prepared",
    "Recipe", "ConfigError", "DataError", "WontFitError", "SamsumTunerError",
]
__version__ = "0.1.0"
