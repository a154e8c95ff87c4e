"""Library messages a samsum_tuner user cannot act on, silenced one by one: each by its own logger and text, or its
exact warning message. Anything else a library prints (a warning a user can act on) still prints.

What could be removed at its cause is removed there instead (trainer.py: non_blocking only with CUDA, the
activation_checkpointing names; model.py: checkpointing enabled by the Trainer for quantized models too)."""
from __future__ import annotations

import logging
import warnings

# logger name -> the start of the one message dropped from it.
LOG_MESSAGES = {
    # peft imports bitsandbytes on every run, and on a CPU with AVX512-BF16 bitsandbytes then fetches a 4-bit
    # kernel from the hub for itself: offline, or refused without trust_remote_code (which it does not pass),
    # it logs the failure and uses its own kernel. Nothing in a recipe changes that.
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
    "kernels._internals.hf_hub": "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'",
}
# peft's get_peft_model reads transformers' deprecated `is_gradient_checkpointing` on every LoRA model.
WARNING_MESSAGES = (r"`is_gradient_checkpointing` is deprecated",)


class _DropMessage(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


def silence() -> None:
    """Install the filters; a second call adds nothing. A logger can be given a filter before its library loads."""
    for name, start in LOG_MESSAGES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.start == start for f in logger.filters):
            logger.addFilter(_DropMessage(start))
    for message in WARNING_MESSAGES:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)


silence()  # on import: samsum_tuner/__init__.py imports this module before anything else
