"""NaN guard: stop a run whose loss or gradients are no longer finite, or whose fp16 loss scaler skips step
after step.

Every optimizer step is accounted for, in order. Its loss is read back from the GPU without waiting, once the
GPU has got there (a wait every step would leave the GPU idle while the host queues the next step); at a step
where the Trainer may save, evaluate or log, at an epoch's and at training's end, the guard waits for it. So
a checkpoint written after the guard trips never exists; the message names the last checkpoint from before
the streak.
"""
from __future__ import annotations

import math
from collections import deque

import torch
from transformers import TrainerCallback

from .checkpoint import latest_checkpoint
from .config import GuardConfig
from .errors import TrainingDiverged


class NonFiniteGuard(TrainerCallback):
    def __init__(self, cfg: GuardConfig, run_dir: str):
        self.cfg, self.run_dir = cfg, run_dir
        self.on_train_begin(None, None, None)

    def on_train_begin(self, args, state, control, **kwargs):
        self._bad: torch.Tensor | None = None  # any non-finite micro-batch loss in this optimizer step
        self._worst: torch.Tensor | None = None
        self._grads_bad: torch.Tensor | None = None  # a non-finite gradient norm at this optimizer step
        # Steps not yet accounted for: (step, [bad, loss, grads bad] on the host once `ready` has passed, ready,
        # skipped)
        self._pending: deque = deque()
        self._trip: tuple | None = None  # the first limit reached, raised at the next wait point
        self.nonfinite = self.skipped = 0  # streaks, in optimizer steps
        self.first_nonfinite = self.first_skipped = 0
        self._device = args.device if args is not None else torch.device("cpu")  # of the processes' all-reduce

    def observe(self, loss: torch.Tensor) -> None:
        """Called by SamsumTrainer.training_step for every micro-batch; no host sync here."""
        if not self.cfg.max_nonfinite_steps:
            return
        loss = loss.detach().float()
        bad = ~torch.isfinite(loss).all()
        self._bad = bad if self._bad is None else self._bad | bad
        first = loss.reshape(-1)[0]
        self._worst = first if self._worst is None else torch.where(bad, first, self._worst)

    def observe_gradients(self, norm) -> None:
        """Called by SamsumTrainer with the Trainer's gradient norm of every optimizer step, before the optimizer
        applies it; no host sync here. Weights whose loss is still finite can give non-finite gradients, and the
        step applying those leaves non-finite weights behind: caught here, the checkpoint the guard names is the
        one before those weights."""
        if not self.cfg.max_nonfinite_steps or norm is None:
            return
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor under FSDP2
        self._grads_bad = ~torch.isfinite(torch.as_tensor(norm).detach().float())

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        # accelerate's AcceleratedOptimizer knows whether the GradScaler skipped this step (on the host already).
        self._pending.append((state.global_step, *self._read_back(), getattr(optimizer, "step_was_skipped", False)))
        self._bad = self._worst = self._grads_bad = None
        # The Trainer decided in its own on_step_end (the first callback) whether this step saves, evaluates or
        # logs; an epoch-end save is decided later, in on_epoch_end. Off a GPU every step costs nothing to check.
        self._account(state.global_step, wait=control.should_save or control.should_evaluate or control.should_log
                      or control.should_training_stop or args is None or args.device.type != "cuda")
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        self.check(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.check(state.global_step)

    def check(self, step: int) -> None:
        """Every step up to `step` accounted for, waiting for the GPU; stops the run if the guard tripped. Also
        called before every checkpoint (SamsumTrainer), whoever asked for the save."""
        self._account(step, wait=True)

    def _read_back(self) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        seen = [t for t in (self._bad, self._grads_bad) if t is not None]
        if not seen:
            return torch.tensor([0.0, math.nan, 0.0]), None
        device = seen[0].device

        def value(t: torch.Tensor | None, missing: float) -> torch.Tensor:
            return t.float().reshape(()).to(device) if t is not None else torch.tensor(missing, device=device)

        values = torch.stack([value(self._bad, 0.0), value(self._worst, math.nan), value(self._grads_bad, 0.0)])
        if not values.is_cuda:
            return values, None
        host = torch.empty(3, pin_memory=True)
        host.copy_(values, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return host, ready

    def _account(self, now: int, wait: bool) -> None:
        """Steps whose loss has reached the host, in order; at a wait point all of them, and the run stops
        there if the guard tripped on any process: every process stops at the same step."""
        while self._pending:
            step, values, ready, skipped = self._pending[0]
            if ready is not None:
                if not wait and not ready.query():
                    break
                ready.synchronize()
            self._pending.popleft()
            if self._trip is None:
                self._trip = self._step(step, bool(values[0]), float(values[1]), skipped, bool(values[2]))
        if not wait:
            return
        # Every process learns whether any tripped, and the earliest suspect step: all name the same checkpoint.
        tripped, suspect_from = _any_process(self._trip is not None, self._trip[1] if self._trip else 0, self._device)
        if tripped:
            if self._trip is None:
                self._stop(now, suspect_from, "the NaN guard tripped on another process")
            step, _, head, tail = self._trip
            self._stop(now, suspect_from, f"{head}{f' up to step {step}' if step != now else ''} {tail}")

    def _step(self, step: int, bad: bool, value: float, skipped: bool, grads_bad: bool = False) -> tuple | None:
        """The streaks after `step`; (step, first suspect step, message halves) if a limit is reached."""
        # Non-finite gradients count unless the fp16 scaler skipped the step (then the weights stayed as they were).
        grads_bad = grads_bad and not skipped
        if bad or grads_bad:
            self.nonfinite += 1
            self.first_nonfinite = self.first_nonfinite if self.nonfinite > 1 else step
        else:
            self.nonfinite = 0
        # A skipped step leaves the weights as checkpoint-(first skipped - 1) has them.
        if skipped:
            self.skipped += 1
            self.first_skipped = self.first_skipped if self.skipped > 1 else step
        else:
            self.skipped = 0
        limit_nf, limit_skip = self.cfg.max_nonfinite_steps, self.cfg.max_skipped_steps
        if limit_nf and self.nonfinite >= limit_nf:
            # The loss and gradients of step k come from the weights saved as checkpoint-(k-1): those are suspect too.
            what = f"loss is {value}" if bad else f"gradients are not finite (loss {value:.4g})"
            return (step, self.first_nonfinite - 1, f"{what} for {self.nonfinite} step(s) in a row",
                    f"(guard.max_nonfinite_steps={limit_nf})")
        if limit_skip and self.skipped >= limit_skip:
            return (step, self.first_skipped, f"the fp16 loss scaler skipped {self.skipped} steps in a row",
                    f"(guard.max_skipped_steps={limit_skip})")
        return None

    def _stop(self, step: int, suspect_from: int, why: str) -> None:
        good = latest_checkpoint(self.run_dir, before_step=suspect_from)
        where = (f"last good checkpoint: {good} (resume from it with train.resume_from_checkpoint={good}, "
                 "after lowering train.learning_rate)") if good else "no good checkpoint was saved before it"
        raise TrainingDiverged(f"training stopped at step {step}: {why}; {where}",
                               last_good=str(good) if good else None)


def _any_process(flag: bool, step: int, device: torch.device) -> tuple[bool, int]:
    """Whether `flag` holds on any process, and the smallest `step` of those where it does (a collective: every
    process calls it at the same point). `device` is the one the processes train on, which their group serves."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return flag, step
    # MAX of (flag, -step) over the processes where flag holds: -step is -inf elsewhere
    value = torch.tensor([float(flag), -float(step) if flag else -math.inf], device=device, dtype=torch.float64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value[0]), int(-value[1]) if value[0] else step
