"""NaN guard: stop a run whose loss is no longer finite, or whose fp16 loss scaler skips step after step.

Checked at the end of each optimizer step, before the Trainer may save at that step, so a checkpoint
written after the guard trips never exists; the message names the last checkpoint from before the streak.
"""
from __future__ import annotations

import math

import torch
from transformers import TrainerCallback

from .checkpoint import latest_checkpoint
from .config import GuardConfig
from .errors import TrainingDiverged


class NonFiniteGuard(TrainerCallback):
    def __init__(self, cfg: GuardConfig, run_dir: str):
        self.cfg, self.run_dir = cfg, run_dir
        self._bad: torch.Tensor | None = None  # any non-finite micro-batch loss in this optimizer step
        self._worst: torch.Tensor | None = None
        self.nonfinite = self.skipped = 0  # streaks, in optimizer steps
        self.first_nonfinite = self.first_skipped = 0

    def observe(self, loss: torch.Tensor) -> None:
        """Called by SamsumTrainer.training_step for every micro-batch; no host sync here."""
        loss = loss.detach().float()
        bad = ~torch.isfinite(loss).all()
        self._bad = bad if self._bad is None else self._bad | bad
        first = loss.reshape(-1)[0]
        self._worst = first if self._worst is None else torch.where(bad, first, self._worst)

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        bad = bool(self._bad) if self._bad is not None else False
        value = float(self._worst) if self._worst is not None else math.nan
        self._bad = self._worst = None
        step = state.global_step
        if bad:
            self.nonfinite += 1
            self.first_nonfinite = self.first_nonfinite if self.nonfinite > 1 else step
        else:
            self.nonfinite = 0
        # accelerate's AcceleratedOptimizer knows whether the GradScaler skipped this step; a skipped step
        # leaves the weights as checkpoint-(first skipped - 1) has them.
        if getattr(optimizer, "step_was_skipped", False):
            self.skipped += 1
            self.first_skipped = self.first_skipped if self.skipped > 1 else step
        else:
            self.skipped = 0
        limit_nf, limit_skip = self.cfg.max_nonfinite_steps, self.cfg.max_skipped_steps
        if limit_nf and self.nonfinite >= limit_nf:
            # The loss of step k is computed from the weights saved as checkpoint-(k-1): those are suspect too.
            self._stop(step, self.first_nonfinite - 1,
                       f"loss is {value} for {self.nonfinite} step(s) in a row (guard.max_nonfinite_steps={limit_nf})")
        if limit_skip and self.skipped >= limit_skip:
            self._stop(step, self.first_skipped,
                       f"the fp16 loss scaler skipped {self.skipped} steps in a row "
                       f"(guard.max_skipped_steps={limit_skip})")
        return control

    def _stop(self, step: int, suspect_from: int, why: str) -> None:
        good = latest_checkpoint(self.run_dir, before_step=suspect_from)
        where = (f"last good checkpoint: {good} (resume from it with train.resume_from_checkpoint={good}, "
                 "after lowering train.learning_rate)") if good else "no good checkpoint was saved before it"
        raise TrainingDiverged(f"training stopped at step {step}: {why}; {where}")
