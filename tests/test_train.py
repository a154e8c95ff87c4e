"""End to end on CPU: the Trainer built from a recipe, tiny random Llama in a local folder, real tokenizer."""
from __future__ import annotations

import json
import math
import time

import pytest
import torch

import samsum_tuner as st

from .conftest import ROOT, write_jsonl

ALL_LINEAR = "lora.target_modules=q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
FAST = ["train.report_to=[]", "train.disable_tqdm=true", "train.logging_steps=1", "memory.preflight=false"]


def _recipe(model_dir, data_dir, out, *overrides):
    return st.load_recipe(None, [f"model.name={model_dir}", f"data.source={data_dir}", f"train.output_dir={out}",
                                 "data.max_length=128", *FAST, *overrides])


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_lora_lowers_the_loss_saves_and_reloads(tiny_model_dir, tiny_data, tmp_path):
    out = tmp_path / "run"
    r = _recipe(tiny_model_dir, tiny_data, out, "--use_peft", "lora.r=16", "train.learning_rate=2e-2", ALL_LINEAR,
                "train.per_device_train_batch_size=4", "train.gradient_accumulation_steps=1",
                "train.num_train_epochs=2", "train.lr_scheduler_type=constant", "train.save_strategy=no")
    trainer = st.build_trainer(r)
    metrics = st.train(r, trainer=trainer)
    losses = _losses(trainer)
    assert len(losses) == 20  # 40 rows / batch 4 x 2 epochs
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    assert metrics["eval_ppl"] == pytest.approx(math.exp(metrics["eval_loss"]))
    assert trainer.args.prediction_loss_only  # eval keeps no logits: only eval_loss is reported
    probe = trainer.evaluation_loop(trainer.get_eval_dataloader(), "probe", metric_key_prefix="probe")
    assert probe.predictions is None and probe.metrics["probe_loss"] == pytest.approx(metrics["eval_loss"], rel=1e-5)
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert len(evals) >= 2 and all(h["eval_ppl"] == pytest.approx(math.exp(h["eval_loss"])) for h in evals)
    assert all("ppl" in h for h in trainer.state.log_history if "loss" in h)
    # Saved: safetensors adapter, tokenizer, the resolved recipe; reload gives the same logits.
    assert (out / "adapter_model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert st.load_recipe(out / "recipe.yaml") == r
    assert json.loads((out / "metrics.json").read_text())["eval_loss"] == metrics["eval_loss"]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([trainer.train_dataset[0]["input_ids"]])
    trainer.model.eval()
    with torch.no_grad():
        want = trainer.model(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out).eval()
        got = reloaded(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    mem = [json.loads(x) for x in (out / "memory.jsonl").read_text().splitlines()]
    epochs = [m for m in mem if m.get("event") == "epoch" and m.get("rank", 0) == 0]
    assert len(epochs) == 2 and epochs[0]["gpu_peak_allocated_gib"] is None and epochs[0]["host_peak_rss_gib"] > 0.05


def test_sgd_is_a_real_sgd_with_momentum_and_steplr_per_epoch(tiny_model_dir, tiny_data, tmp_path):
    r = _recipe(tiny_model_dir, tiny_data, tmp_path / "run", "--fsdp_config.optimizer", "SGD", "--lr", "1e-2",
                "--gamma", "0.5", "train.per_device_train_batch_size=8", "train.gradient_accumulation_steps=1",
                "train.num_train_epochs=3", "train.save_strategy=no", "train.save_model=false",
                "train.eval_strategy=no")
    trainer = st.build_trainer(r)
    st.train(r, trainer=trainer)
    opt = trainer.optimizer
    inner = getattr(opt, "optimizer", opt)
    assert type(inner) is torch.optim.SGD
    assert inner.defaults["momentum"] == 0.9 and inner.defaults["weight_decay"] == 0.0
    # Full fine-tune: every parameter trains.
    assert all(p.requires_grad for p in trainer.model.parameters())
    lrs = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert lrs == pytest.approx([1e-2] * 5 + [5e-3] * 5 + [2.5e-3] * 5)  # 40 rows / 8 = 5 steps per epoch


def test_sgd_is_transformers_own_and_training_args_json_is_the_truth(tiny_model_dir, tiny_data, tmp_path):
    """optim=sgd is TrainingArguments' own SGD (its momentum from train.momentum), holding torch.optim.SGD's state for
    every trainable parameter; training_args.json records what ran: sgd, steplr and their settings."""
    out = tmp_path / "run"
    r = _recipe(tiny_model_dir, tiny_data, out, "train.optim=sgd", "train.momentum=0.8", "train.learning_rate=1e-2",
                "train.warmup_steps=2", "train.per_device_train_batch_size=8", "train.gradient_accumulation_steps=1",
                "train.max_steps=6", "train.save_strategy=no", "train.eval_strategy=no")
    trainer = st.build_trainer(r)
    st.train(r, trainer=trainer)
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert type(inner) is torch.optim.SGD and inner.defaults["momentum"] == 0.8
    assert not inner.defaults["nesterov"] and inner.defaults["dampening"] == 0
    params = [p for group in inner.param_groups for p in group["params"]]
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    assert len(params) == len(trainable) and {id(p) for p in params} == {id(p) for p in trainable}
    assert all(inner.state[p]["momentum_buffer"].shape == p.shape for p in trainable)
    saved = json.loads((out / "training_args.json").read_text())
    ran = (saved["optim"], saved["lr_scheduler_type"], saved["momentum"], saved["gamma"])
    assert ran == ("sgd", "steplr", 0.8, 0.85)
    assert saved["optim_args"] == "momentum=0.8" and saved["learning_rate"] == 1e-2
    # StepLR's schedule with transformers' linear warmup: 0, 1/2, then the full rate (40 rows / 8: 5 steps an epoch)
    lrs = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert lrs == pytest.approx([0.0, 5e-3, 1e-2, 1e-2, 1e-2, 8.5e-3])


def test_reported_loss_is_the_true_mean_not_divided_by_accumulation(tiny_model_dir, tmp_path, tokenizer):
    rows = [{"id": str(i), "dialogue": "Ann: where are you?\nBob: at home", "summary": "Bob is at home."}
            for i in range(8)]
    write_jsonl(tmp_path / "d", "train", rows)
    r = _recipe(tiny_model_dir, tmp_path / "d", tmp_path / "run", "data.eval_split=null", "train.max_steps=1",
                "train.save_strategy=no", "train.save_model=false")  # batch 1 x accumulation 4: the original's
    trainer = st.build_trainer(r)
    example = trainer.train_dataset[0]
    with torch.no_grad():
        expected = trainer.model(input_ids=torch.tensor([example["input_ids"]]),
                                 labels=torch.tensor([example["labels"]])).loss.item()
    st.train(r, trainer=trainer)
    assert _losses(trainer)[0] == pytest.approx(expected, rel=1e-4)  # the original logged expected / 4


def test_full_finetune_fp32_lowers_loss(tiny_model_dir, tiny_data, tmp_path):
    r = _recipe(tiny_model_dir, tiny_data, tmp_path / "run", "train.learning_rate=1e-3", "train.max_steps=12",
                "train.per_device_train_batch_size=4", "train.gradient_accumulation_steps=1",
                "train.lr_scheduler_type=constant", "train.save_strategy=no", "train.eval_strategy=no")
    trainer = st.build_trainer(r)
    st.train(r, trainer=trainer)
    losses = _losses(trainer)
    assert losses[-1] < losses[0] and (tmp_path / "run" / "model.safetensors").is_file()


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_tokens_seen_are_the_non_padding_tokens_of_every_batch(layout, tiny_model_dir, tiny_data, tmp_path):
    """The Trainer's own count reads the GPU back every micro-batch; ours is read at log lines and at the end."""
    extra = (["train.per_device_train_batch_size=4"] if layout == "padded" else
             ["data.packing=true", "data.max_tokens_per_batch=160", "data.pad_to_multiple_of=32"])
    out = tmp_path / "run"
    r = _recipe(tiny_model_dir, tiny_data, out, *extra, "train.logging_steps=2", "train.save_strategy=steps",
                "train.save_steps=3", "train.save_total_limit=10", "train.gradient_accumulation_steps=1",
                "train.num_train_epochs=1", "train.save_model=false", "train.eval_strategy=no")
    trainer = st.build_trainer(r)
    assert trainer.args.include_num_input_tokens_seen == "no" and not trainer.args.logging_nan_inf_filter
    loader = trainer.get_train_dataloader()
    if layout == "packed":  # each batch's samples, whole (their EOS is SmolLM2's pad id too), without the row's tail
        lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
        counts = [sum(lengths[i] for i in batch) for batch in loader.batch_sampler]
        rows = [b["input_ids"].shape[1] for b in loader]
        assert trainer.processing_class.pad_token_id == trainer.processing_class.eos_token_id
        assert rows == [-(-n // 32) * 32 for n in counts] and rows != counts  # and there are tails to leave out
    else:
        counts = [int(b["attention_mask"].sum()) for b in loader]
    metrics = st.train(r, trainer=trainer)
    assert trainer.state.global_step == len(counts)
    assert trainer.state.num_input_tokens_seen == metrics["num_input_tokens_seen"] == sum(counts)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged[1:] and all(h["num_input_tokens_seen"] == sum(counts[:h["step"]]) for h in logged)
    assert all(h["train_tokens_per_second"] > 0 for h in logged)
    # a checkpoint at a step without a log line carries the count a resumed run goes on from
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["num_input_tokens_seen"] == sum(counts[:3])
    # first step excluded from the throughput window (warm-up)
    assert metrics["timed_steps"] == len(counts) - 1 and metrics["real_tokens_per_s"] > 0
    trainer.train()  # a second run on the same trainer counts from zero again
    assert trainer.state.num_input_tokens_seen == sum(counts)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])])
def test_the_throughput_window_counts_steps_not_evaluations_or_saves(device):
    """From the first step's end to the last one's, less an evaluation in between: the final evaluation and save
    come after the last step, a mid-run one between two steps."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from samsum_tuner.callbacks import ThroughputCallback

    args = TrainingArguments("/tmp/unused", use_cpu=device == "cpu", report_to=[])
    assert args.device.type == device
    seen = iter(range(100, 10_000, 100))
    cb = ThroughputCallback(lambda: next(seen))
    state, control = TrainerState(), TrainerControl()
    cb.on_train_begin(args, state, control)
    for step in range(1, 5):
        cb.on_step_begin(args, state, control)
        time.sleep(0.05)
        state.global_step = step
        control.should_evaluate = step == 2
        cb.on_step_end(args, state, control)
        if step == 2:
            time.sleep(0.5)  # the evaluation the Trainer runs after this step
    time.sleep(0.5)  # the final evaluation and save
    cb.on_train_end(args, state, control)
    assert cb.summary["timed_steps"] == 3 and 0.05 <= cb.summary["s_per_step"] < 0.2
    assert cb.summary["real_tokens_per_s"] == pytest.approx(100 / (3 * cb.summary["s_per_step"]))
    # a second run on the same trainer: its own window, here a single step that times nothing
    cb.on_train_begin(args, TrainerState(), control)
    cb.on_step_end(args, state, control)
    cb.on_train_end(args, state, control)
    assert cb.summary == {}


def test_existing_run_dir_is_never_overwritten(tiny_model_dir, tiny_data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint-1").mkdir()
    r = _recipe(tiny_model_dir, tiny_data, out)
    with pytest.raises(st.ConfigError, match="already holds a run"):
        st.build_trainer(r)
    assert [p.name for p in out.iterdir()] == ["checkpoint-1"]


def test_longest_first_puts_the_worst_batch_at_step_one(tiny_model_dir, tmp_path):
    rows = [{"id": str(i), "dialogue": "Ann: " + "word " * (5 + (i * 7) % 60), "summary": "Ann talks."}
            for i in range(30)]
    write_jsonl(tmp_path / "d", "train", rows)
    r = _recipe(tiny_model_dir, tmp_path / "d", tmp_path / "run", "data.eval_split=null", "data.longest_first=true",
                "train.per_device_train_batch_size=3")
    trainer = st.build_trainer(r)
    lengths = [len(x) for x in trainer.train_dataset["input_ids"]]
    first = next(iter(trainer.get_train_dataloader()))
    assert first["input_ids"].shape[1] == max(lengths)
    order = list(trainer.get_train_dataloader().batch_sampler.sampler)  # the LongestFirstSampler's order
    assert sorted(order) == list(range(30)) and {lengths[i] for i in order[:3]} == set(sorted(lengths)[-3:])


@pytest.mark.parametrize("launcher", ["accelerate", "torchrun"])
def test_fsdp_reduces_gradients_after_every_micro_batch_unless_told_not_to(launcher, tmp_path):
    """The Trainer skips the gradient sync on all but the last micro-batch unless its accelerator's
    gradient-accumulation plugin says sync_each_batch; under FSDP2 the skip holds every gradient unsharded."""
    from samsum_tuner.recipe import build_recipe
    from samsum_tuner.launch import Launch
    from samsum_tuner.resolve import training_arguments

    def sync_each_batch(*overrides: str) -> bool:
        recipe = build_recipe(str(ROOT / "recipes" / "full_sgd.yaml"), [f"train.output_dir={tmp_path}", *overrides])
        fsdp = recipe.fsdp.enabled
        args = training_arguments(recipe, Launch(launcher, 2, 0, 0, fsdp, False), ["LlamaDecoderLayer"], False)
        return bool((args.accelerator_config.gradient_accumulation_kwargs or {}).get("sync_each_batch"))

    assert sync_each_batch()  # full_sgd.yaml: FSDP, batch 1 x 4 micro-batches
    assert not sync_each_batch("fsdp.reduce_every_micro_batch=false")
    assert not sync_each_batch("train.gradient_accumulation_steps=1")
    assert not sync_each_batch("fsdp.enabled=false")  # DDP accumulates in .grad either way
