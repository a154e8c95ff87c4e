"""Errors meant for people: the CLI prints the message on one line and exits with `exit_code`."""
from __future__ import annotations

from typing import Any


class SamsumTunerError(Exception):
    exit_code = 2


class ConfigError(SamsumTunerError):
    """A recipe, override or environment that cannot run; the message names the key."""


class DataError(SamsumTunerError):
    """Input data that cannot be used; the message names file:line where there is one."""


class WontFitError(SamsumTunerError):
    """The memory planner's verdict: the run would run out of GPU or host memory."""

    exit_code = 3


class TrainingOutOfMemory(SamsumTunerError):
    """CUDA ran out of memory during training; the message carries the peak reached."""

    exit_code = 3


class TrainingDiverged(SamsumTunerError):
    """A non-finite loss, or the fp16 loss scaler skipping step after step; names the last good checkpoint."""

    exit_code = 4

    def __init__(self, message: str, last_good: str | None = None):
        super().__init__(message)
        self.last_good = last_good  # the checkpoint the message names, or None: resume=auto picks this one


class DiskFull(SamsumTunerError):
    """No space left while saving; the last complete checkpoint is intact and the half-written save removed."""

    exit_code = 5


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; names the last complete checkpoint. Still a KeyboardInterrupt, so code (and a
    notebook) that stops on one still does; the CLI prints the message as its one line and exits 130."""

    exit_code = 130


def brief(value: Any) -> str:
    """A value as it goes into a one-line message: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
