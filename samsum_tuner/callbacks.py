"""Trainer callbacks: the samplers' epoch (batching.py's samplers, however wrapped), and the timing of a run:
seconds per step and tokens per second, and the wait before the first step.

api.build_trainer keeps a reference to each timer; api.train adds their `summary` to the run's metrics.
"""
from __future__ import annotations

import time

import torch
from transformers import TrainerCallback


class BatchSamplerEpoch(TrainerCallback):
    """Sets the epoch on every sampler the train loader wraps, however deep, before each epoch.

    Resuming mid-epoch, the Trainer iterates accelerate's skip_first_batches copy of the loader, whose
    SkipBatchSampler neither has set_epoch nor passes it on; the Trainer's own reach goes one level down only,
    so with two or more processes (SkipBatchSampler -> BatchSamplerShard -> TokenBudgetBatchSampler) the
    resumed epoch replayed epoch 0's order (LongestFirstSampler, one level further under a BatchSampler,
    likewise). The epoch comes from the state (its integer part is the epoch under way, a resumed one
    included), not from whatever wrapper the Trainer happens to call set_epoch on."""

    def on_epoch_begin(self, args, state, control, train_dataloader=None, **kwargs):
        sampler = getattr(train_dataloader, "batch_sampler", None)
        while sampler is not None:
            for s in (sampler, getattr(sampler, "sampler", None)):
                if hasattr(s, "set_epoch"):
                    s.set_epoch(int(state.epoch or 0))
            sampler = getattr(sampler, "batch_sampler", None)


class ThroughputCallback(TrainerCallback):
    """Seconds per optimizer step and real (non-pad) tokens per second, from the end of the first step (warm-up)
    to the end of the last one, less the evaluations and saves in between.

    `tokens` gives the non-padding tokens seen so far over all processes (SamsumTrainer.tokens_seen). On a GPU
    the marks are CUDA events on the GPU's own timeline: a wait every step would stall the host's queue of
    launches."""

    def __init__(self, tokens):
        self.tokens = tokens
        self.on_train_begin(None, None, None)

    def on_train_begin(self, args, state, control, **kwargs):
        self.summary: dict[str, float] = {}
        self.tokens0 = None
        self.first = self.last = None  # (mark, step)
        self.paused = None  # the mark where an evaluation or a save began
        self.pauses: list[tuple] = []

    @staticmethod
    def _mark(args):
        if args.device.type != "cuda":
            return time.perf_counter()
        mark = torch.cuda.Event(enable_timing=True)
        mark.record()
        return mark

    @staticmethod
    def _seconds(start, end) -> float:
        if isinstance(end, float):
            return end - start
        end.synchronize()
        return start.elapsed_time(end) / 1000

    def on_step_begin(self, args, state, control, **kwargs):
        if self.paused is not None:
            self.pauses.append((self.paused, self._mark(args)))
            self.paused = None

    def on_step_end(self, args, state, control, **kwargs):
        if self.first is None:
            self.tokens0 = self.tokens()
            self.first = (self._mark(args), state.global_step)
        else:
            self.last = (self._mark(args), state.global_step)
        self._pause_if(args, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._pause_if(args, control)

    def _pause_if(self, args, control) -> None:
        if self.first is not None and self.paused is None and (control.should_evaluate or control.should_save):
            self.paused = self._mark(args)

    def on_train_end(self, args, state, control, **kwargs):
        if self.first is None or self.last is None or self.last[1] <= self.first[1]:
            return
        (start, step0), (end, step1) = self.first, self.last
        seconds = self._seconds(start, end) - sum(self._seconds(a, b) for a, b in self.pauses)
        self.summary = {"s_per_step": seconds / (step1 - step0),
                        "real_tokens_per_s": (self.tokens() - self.tokens0) / seconds, "timed_steps": step1 - step0}


class FirstStepTimer(TrainerCallback):
    """How long a run waits before its first optimizer step, printed once and kept in `summary` (the run's
    metrics): seconds from the process's start to the end of that step, and the parts known to be long: the
    model's load, an evaluation before training (eval_on_start) and the first step itself, which on a GPU holds
    the compilation of everything compiled (flex_attention, model.compile) at the training shape."""

    def __init__(self, model_load_s: float | None = None):
        self.model_load_s = model_load_s
        self.on_train_begin(None, None, None)

    def on_train_begin(self, args, state, control, **kwargs):
        self.summary: dict[str, float] = {}
        self.train_begin, self.step_begin, self.evaluated = time.time(), None, False

    def on_evaluate(self, args, state, control, **kwargs):
        self.evaluated = self.evaluated or self.step_begin is None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.step_begin is None:
            self.step_begin = time.time()

    def on_step_end(self, args, state, control, **kwargs):
        if self.summary or self.step_begin is None:
            return
        if args.device.type == "cuda":
            torch.cuda.synchronize()  # once per run: the step has ended when its kernels have
        import psutil

        now = time.time()
        self.summary = {"first_step_after_launch_s": round(now - psutil.Process().create_time(), 1),
                        "first_step_s": round(now - self.step_begin, 1),
                        "before_first_step_s": round(self.step_begin - self.train_begin, 1)}
        if self.model_load_s is not None:
            self.summary["model_load_s"] = round(self.model_load_s, 1)
        if state.is_world_process_zero:
            s = self.summary
            parts = [f"model load {s['model_load_s']} s"] if "model_load_s" in s else []
            if self.evaluated:
                parts.append(f"evaluation before training {s['before_first_step_s']} s")
            parts.append(f"first step {s['first_step_s']} s, compilation included")
            print(f"samsum_tuner: first optimizer step {s['first_step_after_launch_s']} s after launch "
                  f"({', '.join(parts)})", flush=True)
