"""The Trainer subclass: transformers' own step, with batches by token budget, the loss on supervised positions only,
the original's per-epoch StepLR, atomic checkpoints and resume with this run's hyperparameters.

We use `transformers.Trainer` rather than TRL's `SFTTrainer`: our data pipeline already produces
completion-only labels (SAMSum cleaning, dialogue-side truncation, exact masks we test), so SFTTrainer's
dataset handling would be bypassed, and its config surface moves between TRL releases.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import Trainer
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.trainer_utils import speed_metrics

from .batching import (PACKED_MASKS, BatchingSpec, LongestFirstSampler, TokenBudgetBatchSampler,
                       WithSupervisedPositions, non_padding_tokens, packed_attention_mask, supervised_positions)
from .callbacks import BatchSamplerEpoch
from .data import IGNORE_INDEX
from .checkpoint import RECIPE_FILE, STATE_FILE, atomic_checkpoint, checkpoint_dir, rotate, worst_over_processes
from .resume import saved_recipe
from .guards import NonFiniteGuard
from .memory import MemoryCallback


class TokenCounting:
    """A transformers.Trainer mixin: the non-padding input tokens fed (state.num_input_tokens_seen, in every log
    line) without a host sync per micro-batch.

    The Trainer's own count (include_num_input_tokens_seen) gathers it and reads it back after every micro-batch,
    and the wait leaves the GPU idle while the host queues the next work. Here it is summed on the device and
    read only when asked for: at log lines, or at a throughput window's ends."""

    _tokens: torch.Tensor | None = None  # this process's count since train() began
    _tokens_base = 0  # a resumed run's count goes on from its checkpoint's

    def train(self, *args, **kwargs):
        self._tokens = None
        return super().train(*args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        n = non_padding_tokens(inputs, getattr(self.processing_class, "pad_token_id", None))
        if self._tokens is None:
            self._tokens, self._tokens_base = n, self.state.num_input_tokens_seen
        else:
            self._tokens = self._tokens + n
        return loss

    def tokens_seen(self) -> int:
        """Summed over processes: a collective, so every process asks at the same point of the loop (the
        Trainer logs on every process at the same steps)."""
        if self._tokens is not None:
            total = self.accelerator.reduce(self._tokens, "sum") if self.accelerator.num_processes > 1 else self._tokens
            self.state.num_input_tokens_seen = self._tokens_base + int(total)
        return self.state.num_input_tokens_seen

    def _save_checkpoint(self, model, trial) -> None:  # private: no public hook runs before a checkpoint's state
        self.tokens_seen()  # into the checkpoint's trainer_state.json, which a resumed run's count starts from
        super()._save_checkpoint(model, trial)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        logs["num_input_tokens_seen"] = tokens = self.tokens_seen()
        if start_time is not None:  # what the Trainer's own count adds to a training log line
            logs.update(speed_metrics("train", start_time, num_tokens=tokens - self._tokens_base))
        super().log(logs, start_time)


class TokenWeightedEvalLoss:
    """A transformers.Trainer mixin: eval_loss is the mean over every supervised token of the split.

    The Trainer averages each batch's mean loss weighted by its row count. With token-budget batches (one packed
    row each, the last one short) that weighting followed how the seed grouped the samples (docs/notes.md)."""

    _eval_sums: torch.Tensor | None = None  # this process's summed loss and supervised token count

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        loss, logits, labels = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        if loss is not None and self._eval_sums is not None and inputs.get("labels") is not None:
            n = (inputs["labels"][:, 1:] != IGNORE_INDEX).sum()  # the positions its mean loss averaged
            self._eval_sums += torch.stack([loss.detach().float() * n, n.float()])
        return loss, logits, labels

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        self._eval_sums = torch.zeros(2, device=self.args.device)  # on every process: the reduce below is a collective
        try:
            output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                             metric_key_prefix)
            sums = self.accelerator.reduce(self._eval_sums, "sum") if self.accelerator.num_processes > 1 \
                else self._eval_sums
        finally:
            self._eval_sums = None
        total, count = sums.tolist()
        if count and f"{metric_key_prefix}_loss" in output.metrics:
            output.metrics[f"{metric_key_prefix}_loss"] = total / count
        return output


class SamsumTrainer(TokenCounting, TokenWeightedEvalLoss, Trainer):
    """Trainer plus the original's schedule and perplexity in every log. Batches as `batching` says; `guard` and
    `memory` (None: off) are callbacks among `callbacks` that it also calls itself; `rouge(model, tokenizer)` adds
    its scores to every evaluation; `recipe_yaml` goes into every checkpoint (what a resume checks)."""

    def __init__(self, *args, batching: BatchingSpec, recipe_yaml: str, guard: NonFiniteGuard | None = None,
                 memory: MemoryCallback | None = None, rouge: Callable[[Any, Any], dict] | None = None, **kwargs):
        self.batching, self.recipe_yaml, self.rouge = batching, recipe_yaml, rouge
        self.guard, self.memory = guard, memory
        self._staging: str | None = None
        if batching.supervised_logits_only:
            kwargs.setdefault("compute_loss_func", supervised_loss)
        super().__init__(*args, **kwargs)
        if self.compute_loss_func is supervised_loss:
            self.data_collator = WithSupervisedPositions(self.data_collator)
        if batching.max_tokens_per_batch or batching.longest_first:
            self.add_callback(BatchSamplerEpoch())

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        attn = self.batching.attn_implementation
        if "position_ids" in inputs and inputs.get("attention_mask") is None and attn in PACKED_MASKS:
            # Left to the model, a packed row's mask starts with transformers asking the GPU whether the row holds
            # several samples: a host sync at every forward. The row is packed; its mask is built here instead.
            inputs = {**inputs, "attention_mask": packed_attention_mask(inputs["position_ids"], attn)}
        if self.compute_loss_func is supervised_loss and "labels" in inputs:
            # Through the model's own forward (so FSDP, DDP and PEFT hooks all run): lm_head sees only the
            # positions whose next token is a target, in any row of the batch, and the loss their targets.
            keep = inputs.get("logits_to_keep")
            if keep is None:  # a batch from another collator: the same positions, found on the GPU (a host sync)
                keep = supervised_positions(inputs["labels"])
            inputs = {**inputs, "logits_to_keep": keep, "labels": inputs["labels"][:, 1:][:, keep]}
        else:
            inputs = {k: v for k, v in inputs.items() if k != "logits_to_keep"}
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    # Private overrides (no public hook does this; CI runs them on the lowest and newest transformers pinned):
    # where a checkpoint is written, so that _save_checkpoint can stage it.
    def _get_output_dir(self, trial) -> str:
        return self._staging or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        # The Trainer writes checkpoint-N in place; here it writes into staging and the folder appears
        # complete or not at all (checkpoint.py). Its own rotation then only sees the staging folder.
        if self.guard is not None:
            self.guard.check(self.state.global_step)
        run_dir = super()._get_output_dir(trial)
        with atomic_checkpoint(run_dir, self.state.global_step, is_main=self.args.should_save,
                               worst=lambda outcome: worst_over_processes(outcome, self.args.device)) as stage:
            self._staging = str(stage.parent)
            try:
                super()._save_checkpoint(model, trial)
                self._name_the_best_as_published(run_dir, stage)
                if self.args.should_save:  # what a resume checks its recipe against
                    (stage / RECIPE_FILE).write_text(self.recipe_yaml, encoding="utf-8")
                    write_adapter_config(self.model, stage)
            finally:
                self._staging = None
        if self.args.should_save:
            rotate(run_dir, self.args.save_total_limit,
                   protect=(self.state.best_model_checkpoint,) if self.state.best_model_checkpoint else ())

    def _name_the_best_as_published(self, run_dir: str, stage: Path) -> None:
        """The Trainer names the best checkpoint inside the folder it writes into (staging, gone once published), and
        only when it is the one being written: name it where it is published, also in the state saved with it."""
        step = self.state.best_global_step
        best = checkpoint_dir(run_dir, step)
        if step and (step == self.state.global_step or best.is_dir()):
            self.state.best_model_checkpoint = str(best)
            if self.args.should_save:
                self.state.save_to_json(str(stage / STATE_FILE))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        # The Trainer pickles TrainingArguments into training_args.bin; a pickle is code on load. JSON instead.
        out = Path(output_dir if output_dir is not None else self.args.output_dir)
        if self.args.should_save and (out / "training_args.bin").is_file():
            (out / "training_args.bin").unlink()
            (out / "training_args.json").write_text(self.args.to_json_string())

    def evaluate(self, *args, **kwargs) -> dict[str, float]:
        metrics = super().evaluate(*args, **kwargs)
        if self.rouge is not None:
            scores = self.rouge(self.model, self.processing_class)
            self.log(scores)
            metrics.update(scores)
        return metrics

    # Private: the one point after a resume loads the checkpoint's optimizer, before the first step.
    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is not None and self.is_fsdp_enabled:
            prime_optimizer_state(self.optimizer)
        # This run's hyperparameters, as it built its optimizer; loading the checkpoint's state replaces them.
        given = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        changes = rebase_hyperparameters(self.optimizer, self.lr_scheduler, given)
        changes += schedule_changes(saved_recipe(checkpoint), self.args.to_dict())
        if self.is_world_process_zero():
            for change in changes:
                print(f"samsum_tuner: resume: {change} (from the recipe)", flush=True)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.guard is not None:
            self.guard.observe(loss)
        return loss

    # Private: the one point where the step's gradient norm exists before the optimizer applies it.
    def _get_grad_norm(self, model, grad_norm=None):
        # The Trainer's gradient norm of every optimizer step (clipped or not), before the optimizer applies it.
        grad_norm = super()._get_grad_norm(model, grad_norm)
        if self.guard is not None:
            self.guard.observe_gradients(grad_norm)
        return grad_norm

    def get_train_dataloader(self):
        b = self.batching
        if b.max_tokens_per_batch:
            return self._token_budget_loader(self.train_dataset, longest_first=b.longest_first)
        if b.longest_first:
            first = LongestFirstSampler(self._lengths(self.train_dataset), self.args.per_device_train_batch_size,
                                        self.args.seed)
            return self._loader(self.train_dataset, torch.utils.data.BatchSampler(
                first, self.args.per_device_train_batch_size, drop_last=self.args.dataloader_drop_last))
        return super().get_train_dataloader()

    def get_eval_dataloader(self, eval_dataset=None):
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if not self.batching.max_tokens_per_batch or isinstance(dataset, (str, dict)):
            return super().get_eval_dataloader(eval_dataset)
        # Evaluation batches cut by the training budget: with pad_to_multiple_of every batch has the training
        # shape, so flex_attention compiles one shape for both (fixed-count eval batches gave it several, and
        # each new shape recompiled its kernels: minutes on the GPU before the first training step).
        return self._token_budget_loader(dataset)

    def _token_budget_loader(self, dataset, longest_first: bool = False):
        batches = TokenBudgetBatchSampler(self._lengths(dataset), self.batching.max_tokens_per_batch,
                                          packed=self.batching.packing, seed=self.args.seed,
                                          longest_first=longest_first, multiple=self.batching.pad_to_multiple_of)
        return self._loader(dataset, batches)

    def _loader(self, dataset, batch_sampler):
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=self.data_collator,
                                             num_workers=self.args.dataloader_num_workers,
                                             pin_memory=self.args.dataloader_pin_memory)
        return self.accelerator.prepare(loader)

    @staticmethod
    def _lengths(dataset) -> list[int]:
        return [len(ids) for ids in dataset["input_ids"]]

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.args.lr_scheduler_type != "steplr" or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        # The original's StepLR(step_size=1, gamma) stepped once per epoch; the Trainer steps per update. Warmup
        # as transformers' linear warmup.
        steps_per_epoch = max(1, math.ceil(len(self.get_train_dataloader()) / self.args.gradient_accumulation_steps))
        gamma, warmup = self.args.gamma, self.args.get_warmup_steps(num_training_steps)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer or self.optimizer,
            lambda step: (step / warmup if step < warmup else 1.0) * gamma ** (step // steps_per_epoch))
        return self.lr_scheduler

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Callbacks see a log line only after it is in log_history: memory figures join here instead.
        if self.memory is not None:
            logs.update(self.memory.pop_pending())
        for loss_key, ppl_key in (("loss", "ppl"), ("train_loss", "train_ppl"), ("eval_loss", "eval_ppl")):
            if loss_key in logs:
                logs[ppl_key] = math.exp(min(logs[loss_key], 50.0))
        super().log(logs, start_time)


def write_adapter_config(model, folder: Path) -> None:
    """peft's adapter_config.json beside a checkpoint's weights where the Trainer wrote none: a sharded FSDP
    checkpoint holds the adapter's weights in its DCP folder only, and resume and `eval` read the config."""
    configs = getattr(model, "peft_config", None)
    if configs and not (folder / "adapter_config.json").exists():
        configs[getattr(model, "active_adapter", "default")].save_pretrained(str(folder))


def supervised_loss(outputs, targets: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """transformers' causal-LM loss of logits kept at `keep = supervised_positions(labels)` only, `targets` being
    their shifted labels `labels[:, 1:][:, keep]`: the model's own loss, without the logits nothing reads."""
    return ForCausalLMLoss(outputs.logits, None, outputs.logits.size(-1), num_items_in_batch=num_items_in_batch,
                           shift_labels=targets)


# Optimizer group keys a resume takes from this run's recipe rather than the checkpoint (initial_lr: the base rate
# the schedule scales), by their recipe names.
GIVEN_AT_RESUME = {"initial_lr": "learning_rate", "weight_decay": "weight_decay", "momentum": "momentum"}


def rebase_hyperparameters(optimizer, scheduler, given: list[dict[str, Any]]) -> list[str]:
    """After a resume loaded the checkpoint's optimizer and schedule: the hyperparameters this run was given
    (`given`: its own param groups before the load) replace the checkpoint's, and the schedule goes on from the new
    base rate at the step it had reached. Returns what changed, as `name old -> new`."""
    changes: dict[str, str] = {}
    groups = optimizer.param_groups
    for group, want in zip(groups, given):
        for key, name in GIVEN_AT_RESUME.items():
            if key in group and key in want and group[key] != want[key]:
                changes.setdefault(name, f"{name} {group[key]:g} -> {want[key]:g}")
                group[key] = want[key]
    if scheduler is not None and hasattr(scheduler, "base_lrs"):
        was = list(scheduler.base_lrs)
        scheduler.base_lrs = [group.get("initial_lr", base) for group, base in zip(groups, was)]
        lambdas = getattr(scheduler, "lr_lambdas", [None] * len(groups))
        for group, base, old, factor in zip(groups, scheduler.base_lrs, was, lambdas):
            # LambdaLR (our StepLR and every HF schedule): this run's factor at the step reached; others scale
            group["lr"] = base * factor(scheduler.last_epoch) if factor else group["lr"] * base / (old or base)
        scheduler._last_lr = [group["lr"] for group in groups]  # what get_last_lr() (the logged rate) returns
    return list(changes.values())


SCHEDULE = ("lr_scheduler_type", "warmup_steps", "gamma", "num_train_epochs", "max_steps", "max_grad_norm")


def schedule_changes(saved: dict | None, now: dict) -> list[str]:
    """Schedule settings of this run's arguments (`now`, TrainingArguments.to_dict()) that differ from the
    checkpoint's recipe. They take effect as they are: the schedule's function is this run's (LambdaLR restores no
    plain function from a checkpoint)."""
    was = (saved or {}).get("train") or {}
    keys = [k for k in SCHEDULE if k != "gamma" or now["lr_scheduler_type"] == "steplr"]
    return [f"{k} {was[k]} -> {now[k]}" for k in keys if k in was and was[k] != now[k]]


def prime_optimizer_state(optimizer) -> None:
    """Give an optimizer that has not stepped yet its (zero) state before an FSDP checkpoint loads into it.

    Distributed checkpointing does this itself by stepping the optimizer once with zero gradients, but
    through accelerate's wrapper that step reaches the fp16 GradScaler, which refuses a step before any
    scale() ("Attempted step but _scale is None"): FSDP + fp16 runs could not resume. The optimizer
    inside the wrapper is primed directly instead."""
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    inner = getattr(optimizer, "optimizer", optimizer)
    _init_optim_state(inner)
    if not inner.state:
        # A stateless optimizer (SGD without momentum) stays empty; distributed checkpointing skips its own
        # init step when gradients exist, so zero gradients stand in (the first step overwrites them).
        for group in inner.param_groups:
            for param in group["params"]:
                if param.requires_grad and param.grad is None:
                    param.grad = torch.zeros_like(param)
