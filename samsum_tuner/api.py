"""The public API: load a recipe, prepare the data, build the trainer, train.

    import samsum_tuner as st
    recipe = st.load_recipe("recipes/demo_cpu.yaml", ["train.max_steps=5"])
    trainer = st.build_trainer(recipe)
    metrics = st.train(recipe, trainer=trainer)

Everything that can be refused (config, environment, data, memory) is refused before the model loads.
"""
from __future__ import annotations

import json
import os
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import DataConfig, Recipe, describe_precision
from .recipe import build_recipe
from .data import PreparedSplit, read_splits, tokenize_splits
from .errors import (ConfigError, DiskFull, TrainingDiverged, TrainingInterrupted, TrainingOutOfMemory,
                     WontFitError)
from .checks import check_environment
from .launch import Launch, detect_launch
from .resolve import lora_targets


def load_recipe(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Recipe:
    """Defaults (the original's training configuration) <- YAML <- `key.sub=value` overrides, validated."""
    return build_recipe(path, overrides)


@dataclass
class Prepared:
    """Everything that exists before the model: launch, tokenizer, tokenized splits, memory plan."""

    recipe: Recipe
    launch: Launch
    tokenizer: Any
    splits: dict[str, PreparedSplit]
    plan: Any = None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        r = self.recipe
        q = r.quantization
        adapter = ("LoRA r=%d on %s" % (r.lora.r, ",".join(r.lora.target_modules)) if r.lora.enabled
                   else "full fine-tune")
        quant = ", %d-bit %s" % (q.bits, q.quant_type if q.bits == 4 else "int8") if q.bits else ""
        sharding = ("FSDP " + r.fsdp.sharding_strategy + (" + CPU offload" if self.launch.cpu_offload else "")
                    if self.launch.fsdp else "no FSDP")
        lines = [
            f"model: {r.model.name}  ({adapter}{quant})",
            f"precision: {describe_precision(r)}",
            f"launch: {self.launch.launcher}, {self.launch.world_size} process(es), {sharding}"
            + (", every decoder layer checkpointed" if r.checkpoints_activations else ""),
            f"optimizer: {r.train.optim}, lr {r.train.learning_rate:g}, schedule {r.train.lr_scheduler_type}"
            f"{' gamma %g per epoch' % r.train.gamma if r.train.lr_scheduler_type == 'steplr' else ''}, "
            f"batch {r.train.per_device_train_batch_size} x accumulation {r.train.gradient_accumulation_steps} "
            f"x {self.launch.world_size} process(es), {r.train.num_train_epochs:g} epoch(s)"
            f"{', max %d steps' % r.train.max_steps if r.train.max_steps > 0 else ''}",
        ]
        for name, split in self.splits.items():
            st = split.stats()
            lines.append(f"data {name}: {split.origin}: {split.report.line()}")
            lines.append(f"  tokens {name}: rows {st['rows']}, total {st['tokens']:,}, min {st['min']}, "
                         f"mean {st['mean']}, p50 {st['p50']}, p99 {st['p99']}, max {st['max']}")
        if self.plan is not None:
            lines.append(self.plan.verdict)
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _check_output_dir(recipe: Recipe) -> None:
    from .checks import check_output_location
    from .rundir import check_output_dir

    t = recipe.train
    check_output_dir(t.output_dir, overwrite=t.overwrite_output_dir, resume=t.resume_from_checkpoint,
                     settings=recipe.to_dict())
    check_output_location(t.output_dir)


def prepare(recipe: Recipe, *, dry_run: bool = False, force: bool = False) -> Prepared:
    """All checks and the data, no model. `dry_run` reports hardware refusals as notes instead."""
    launch = detect_launch(recipe.fsdp)
    notes: list[str] = []
    try:
        check_environment(recipe, launch)
    except ConfigError as e:
        if not dry_run:
            raise
        notes.append(f"a real run here would be {e}")
    if not dry_run:
        _check_output_dir(recipe)
    tokenizer, splits = _tokenized(recipe, recipe.data, loading=not dry_run)
    if dry_run:  # TrainingArguments' own checks, which a real run meets in build_trainer. The decoder-layer class
        # FSDP wraps is named from the model's code, which a dry run never runs; none of the checks reads it.
        from .resolve import training_arguments

        training_arguments(recipe, launch, ["LlamaDecoderLayer"], has_eval="eval" in splits)
    prepared = Prepared(recipe, launch, tokenizer, splits, notes=notes)
    prepared.plan = _preflight(prepared, enforce=not (dry_run or force))
    return prepared


def _tokenized(recipe: Recipe, data: DataConfig, *, loading: bool = False):
    """(tokenizer, tokenized splits) for `data`: the model's source is checked, its weights never loaded. Unless
    `loading` (the model loads next), no code from the model's folder runs, trusted or not."""
    from .model_source import check_model, check_model_source, load_tokenizer

    check_model_source(recipe.model)  # a missing model folder or unknown shape: a stat, before reading any data
    raw = read_splits(data)  # data errors (file:line) before anything model-shaped loads
    # config.json, weights, LoRA targets: read by transformers, no weights
    check_model(recipe.model, lora_targets(recipe), loading=loading)
    tokenizer = load_tokenizer(recipe.model, run_code=loading)
    return tokenizer, tokenize_splits(data, tokenizer, raw)


def _preflight(prepared: Prepared, enforce: bool):
    """The memory planner's verdict; a run that will not fit is refused (exit 3) unless forced."""
    r = prepared.recipe
    if not r.memory.preflight:
        return None
    import torch

    from .planner import plan

    cuda = torch.cuda.is_available()
    gpu_gib, host_gib = r.memory.gpu_memory_gib, r.memory.host_memory_gib
    if gpu_gib is None and cuda:
        from .memory import usable_gpu_gib

        dev = prepared.launch.local_rank
        free, total = torch.cuda.mem_get_info(dev)
        gpu_gib, note = usable_gpu_gib(free, total, torch.cuda.memory_reserved(dev), dev)
        if note and prepared.launch.world_size == 1:
            print(f"samsum_tuner: {note}", flush=True)
        elif note:  # every rank must reach the same verdict (one refusing alone would hang the others)
            gpu_gib = total / 2**30
            print(f"samsum_tuner: warning: {note.split(';')[0]}; the plan assumes the whole card on every rank, "
                  "so this rank may run out of memory", flush=True)
    if r.memory.gpu_limit_gib is not None:
        gpu_gib = min(gpu_gib or r.memory.gpu_limit_gib, r.memory.gpu_limit_gib)
    if host_gib is None:
        import psutil

        host_gib = psutil.virtual_memory().total / 2**30
    result = plan(r, gpus=prepared.launch.world_size, gpu_memory_gib=gpu_gib, host_memory_gib=host_gib,
                  token_lengths=prepared.splits["train"].lengths,
                  supervised_lengths=prepared.splits["train"].supervised, device="cuda" if cuda else "cpu")
    if enforce and result.fits is False:
        raise WontFitError(f"{result.verdict} (memory.preflight=false or --force runs it anyway)")
    return result


def build_trainer(recipe: Recipe, *, prepared: Prepared | None = None, callbacks: list | None = None):
    """A `SamsumTrainer` (a transformers.Trainer) with model, data, collator and memory callback."""
    from transformers import set_seed
    from transformers.trainer_callback import ProgressCallback

    from .batching import build_collator
    from .callbacks import FirstStepTimer, ThroughputCallback
    from .evaluation import RougeProbe
    from .guards import NonFiniteGuard
    from .memory import MemoryCallback, apply_gpu_limit
    from .model import layers_to_wrap, load_model
    from .resolve import batching_spec, model_load, training_arguments
    from .trainer import SamsumTrainer

    prepared = prepared or prepare(recipe)
    launch = prepared.launch
    apply_gpu_limit(recipe.memory.gpu_limit_gib)
    set_seed(recipe.train.seed)  # LoRA/random init happen here, before the Trainer seeds: same run, same weights
    # TrainingArguments first: under a torchrun FSDP launch they export the FSDP environment that
    # from_pretrained reads to load on rank 0 only (one host copy of the weights, not one per rank).
    args = training_arguments(recipe, launch, layers_to_wrap(recipe.model), has_eval="eval" in prepared.splits)
    lock = _lock_run_dir(recipe, args)  # the process group exists now: every process learns the verdict
    loading = time.perf_counter()
    model = load_model(model_load(recipe, fsdp=launch.fsdp))
    first_step = FirstStepTimer(model_load_s=time.perf_counter() - loading)
    memory_cb = MemoryCallback(recipe.train.output_dir, log_every_steps=recipe.memory.log_every_steps,
                               sample_interval_s=recipe.memory.sample_interval_s,
                               gpu_limit_gib=recipe.memory.gpu_limit_gib)
    g = recipe.guard  # both limits 0: no guard at all, not one that checks and never stops
    guard = NonFiniteGuard(g, recipe.train.output_dir) if g.max_nonfinite_steps or g.max_skipped_steps else None
    batching = batching_spec(recipe)
    try:
        trainer = SamsumTrainer(
            model=model,
            args=args,
            train_dataset=prepared.splits["train"].dataset,
            eval_dataset=prepared.splits["eval"].dataset if "eval" in prepared.splits else None,
            data_collator=build_collator(batching, prepared.tokenizer),
            processing_class=prepared.tokenizer,
            callbacks=[memory_cb, *([guard] if guard is not None else []), first_step, *(callbacks or [])],
            batching=batching,
            recipe_yaml=recipe.to_yaml(),
            rouge=RougeProbe(recipe.data, recipe.train.eval_rouge_rows) if recipe.train.eval_rouge_rows else None,
            guard=guard,
            memory=memory_cb,
        )
    except Exception as e:
        # push_to_hub: the Trainer creates the hub repository as it is built; an unreachable hub is the setting's
        # failure, said in one line, not a traceback from the HTTP client.
        if recipe.train.push_to_hub and type(e).__module__.startswith(("httpx", "huggingface_hub", "requests")):
            raise ConfigError(f"train.push_to_hub: cannot reach the hub ({' '.join(str(e).split())[:200]})") from None
        raise
    throughput = ThroughputCallback(trainer.tokens_seen)
    trainer.add_callback(throughput)
    trainer.timers = [first_step, throughput]  # their summaries join the run's metrics (_train)
    # The one callback made by the Trainer itself (its __init__ adds it, whatever the callbacks given), so found by
    # its kind, once: its bars, whose lines an interrupted run ends (_interrupted). None with disable_tqdm or in a
    # notebook (other kinds).
    trainer.progress_bars = next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, ProgressCallback)),
                                 None)
    trainer.prepared = prepared
    trainer.run_lock = lock
    return trainer


def _lock_run_dir(recipe: Recipe, args):
    """One run per run directory: the main process takes its lock before anything is written there (or refuses,
    naming the holder), and every process gets the verdict. Released at the end of train(), or at exit."""
    from .rundir import RunLock, decided_by_main

    lock = RunLock(recipe.train.output_dir)

    def take() -> None:
        note = lock.acquire()
        if note:
            print(f"samsum_tuner: note: {note}", flush=True)

    decided_by_main(take, device=args.device)
    return lock


def train(recipe: Recipe, *, trainer=None) -> dict[str, Any]:
    """Train, save (safetensors adapter or full model, tokenizer, resolved recipe) and return the metrics.

    A CUDA out-of-memory is caught and reported with the peak reached (TrainingOutOfMemory, exit 3). The run
    directory stays locked until the end, whatever the end.
    """
    trainer = trainer or build_trainer(recipe)
    lock = getattr(trainer, "run_lock", None)
    if lock is None or lock.released:  # a trainer built otherwise, or trained before
        lock = trainer.run_lock = _lock_run_dir(recipe, trainer.args)
    try:
        return _train(recipe, trainer)
    finally:
        lock.release()


def _train(recipe: Recipe, trainer) -> dict[str, Any]:
    from .checkpoint import is_disk_full, latest_checkpoint
    from .memory import SHARED_CARD_GIB, held_outside_gib, is_cuda_oom, snapshot
    from .model import parameter_counts

    trainable, total = parameter_counts(trainer.model)
    if trainer.args.process_index == 0:
        print(f"samsum_tuner: training {trainable:,} of {total:,} parameters ({100 * trainable / total:.3f}%)",
              flush=True)
    summary: dict[str, Any] = {"status": "ok", "trainable_params": trainable, "total_params": total}
    resume = _resume_point(trainer, recipe)
    try:
        metrics = dict(trainer.train(resume_from_checkpoint=resume).metrics)
        if trainer.eval_dataset is not None:
            step = trainer.state.global_step
            final = [h for h in trainer.state.log_history if h.get("step") == step]
            if any("eval_loss" in h for h in final):
                # The epoch's evaluation already scored the final weights: running it again costs a whole pass.
                metrics.update({k: v for h in final for k, v in h.items() if k.startswith("eval_")})
            else:
                metrics.update(trainer.evaluate())
    except TrainingDiverged as e:  # resume=auto goes back to the checkpoint the guard named
        summary.update(status="diverged", step=trainer.state.global_step, error=str(e),
                       last_good_checkpoint=e.last_good)
        _write_summary(trainer, recipe, summary)
        raise
    except KeyboardInterrupt:
        raise _interrupted(trainer, recipe, summary) from None
    except DiskFull as e:
        summary.update(status="disk_full", step=trainer.state.global_step, error=str(e))
        try:
            _write_summary(trainer, recipe, summary)
        except OSError:  # a summary that does not fit either: the error line says it all
            pass
        raise
    except pickle.UnpicklingError as e:  # torch.load(weights_only=True) met an object that is not a tensor
        raise ConfigError(f"train.resume_from_checkpoint: {resume} holds a file that is not plain tensors, refused "
                          f"({str(e).strip().splitlines()[0][:200]})") from None
    except Exception as e:
        if not is_cuda_oom(e):
            raise
        peak = snapshot(recipe.memory.gpu_limit_gib)
        outside = held_outside_gib()
        peak["gpu_held_outside_gib"] = outside
        shared = (f"; {outside:.2f} GiB of the card held outside this process (other processes?)"
                  if (outside or 0) > SHARED_CARD_GIB else "")
        summary.update(status="oom", step=trainer.state.global_step, memory=peak, error=str(e).splitlines()[0])
        _write_summary(trainer, recipe, summary)
        raise TrainingOutOfMemory(
            f"out of GPU memory at step {trainer.state.global_step}: peak allocated "
            f"{peak.get('gpu_peak_allocated_gib')} GiB, reserved {peak.get('gpu_peak_reserved_gib')} GiB"
            f"{' of a %s GiB cap' % recipe.memory.gpu_limit_gib if recipe.memory.gpu_limit_gib else ''}"
            f"{shared}"
        ) from None
    for timer in getattr(trainer, "timers", ()):  # a trainer built otherwise has none
        metrics.update(timer.summary)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if losses:
        metrics.update(first_loss=losses[0], last_loss=losses[-1])
    try:
        if recipe.train.save_model:
            save(trainer, recipe)
        summary.update(metrics=metrics, memory=snapshot(recipe.memory.gpu_limit_gib))
        _write_summary(trainer, recipe, summary)
    except Exception as e:
        out = recipe.train.output_dir
        if not is_disk_full(e, out):
            raise
        raise DiskFull(f"no space left on the device of {out} while saving the trained model: the last complete "
                       f"checkpoint is {latest_checkpoint(out) or 'none'}; free some space and run again with "
                       "resume=auto") from None
    return metrics


def _interrupted(trainer, recipe: Recipe, summary: dict[str, Any]) -> TrainingInterrupted:
    """Ctrl-C: the run's summary says so, and the one line names what a resume would continue from."""
    from .checkpoint import latest_checkpoint

    progress = getattr(trainer, "progress_bars", None)
    if progress is not None:  # end the progress bars' lines: the message gets a line of its own
        for bar in (progress.training_bar, progress.prediction_bar):
            if bar is not None:
                bar.close()
    step, last = trainer.state.global_step, latest_checkpoint(recipe.train.output_dir)
    where = (f"last complete checkpoint: {last} (resume with resume=auto)" if last is not None
             else "no complete checkpoint: nothing to resume")
    summary.update(status="interrupted", step=step, last_checkpoint=str(last) if last else None)
    _write_summary(trainer, recipe, summary)
    return TrainingInterrupted(f"interrupted after step {step}; {where}")


def _resume_point(trainer, recipe: Recipe) -> str | None:
    """The checkpoint to continue from, or None, decided under the run directory's lock by the main process (every
    process gets it). What it would mix with moves aside: with overwrite and nothing to resume, the previous run;
    resuming, a trajectory that had gone past the resume point."""
    from .rundir import check_output_dir, decided_by_main, retire_after, retire_run

    t = recipe.train

    def decide() -> str | None:
        notes: list[str] = []
        resume = check_output_dir(t.output_dir, overwrite=t.overwrite_output_dir, resume=t.resume_from_checkpoint,
                                  settings=recipe.to_dict(), notes=notes)
        for note in notes:
            print(f"samsum_tuner: note: {note}", flush=True)
        if resume is not None:
            print(f"samsum_tuner: resuming from {resume}", flush=True)
            aside = retire_after(t.output_dir, resume)
            if aside is not None:
                print(f"samsum_tuner: note: what {t.output_dir} held from after {resume.name} (checkpoints, logs, "
                      f"outputs) moved to {aside}", flush=True)
        elif t.overwrite_output_dir:
            aside = retire_run(t.output_dir)
            if aside is not None:
                print(f"samsum_tuner: overwrite_output_dir: the previous run moved to {aside}", flush=True)
        return str(resume) if resume is not None else None

    return decided_by_main(decide, device=trainer.args.device)


def _write_summary(trainer, recipe: Recipe, summary: dict[str, Any]) -> None:
    if not trainer.is_world_process_zero():
        return
    import platform

    import accelerate
    import peft
    import torch
    import transformers

    out = Path(recipe.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary.setdefault("step", trainer.state.global_step)  # where the run ended: a resume from before it goes anew
    summary.update(
        recipe=recipe.to_dict(),
        world_size=trainer.args.world_size,
        device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
        versions={"torch": torch.__version__, "transformers": transformers.__version__,
                  "accelerate": accelerate.__version__, "peft": peft.__version__},
    )
    (out / "metrics.json").write_text(json.dumps(summary.get("metrics", {}), indent=2))
    # The Trainer's log lines (losses, lr, eval, memory figures): `samsum-tuner report` plots them.
    (out / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1, default=str))
    (out / "run_summary.json").write_text(json.dumps(summary, indent=2, default=str))


def save(trainer, recipe: Recipe) -> None:
    out = Path(recipe.train.output_dir)
    if trainer.is_fsdp_enabled:
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(out))  # safetensors: adapter for LoRA, full weights otherwise
    if trainer.is_world_process_zero():
        (out / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
