"""Padding-free packing: samples in one row attend only to themselves (needs use_cache=False)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from samsum_tuner.resolve import batching_spec
from samsum_tuner.batching import build_collator
from samsum_tuner.recipe import build_recipe
from samsum_tuner.data import IGNORE_INDEX

from .conftest import QUIET_RUN, tiny_llama, varied_rows, write_jsonl


def _samples(n=4, vocab=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 9 + 7 * i
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        n_prompt = length // 2
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * n_prompt + ids[n_prompt:]})
    return out


def _per_token_losses(logits, labels):
    shift_logits, shift_labels = logits[..., :-1, :], labels[..., 1:]
    return F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)).float(), shift_labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="none")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_losses_and_gradients_equal_unpacked(attn, tokenizer):
    model = tiny_llama(vocab_size=256)
    model.config._attn_implementation = attn
    model.config.use_cache = False  # what load_model sets: without it packed samples see each other
    samples = _samples()
    recipe = build_recipe(None, ["data.packing=true"])
    batch = build_collator(batching_spec(recipe), tokenizer)(samples)
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    assert batch["position_ids"][0].tolist() == [p for s in samples for p in range(len(s["input_ids"]))]

    model.zero_grad()
    packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    packed_tok = _per_token_losses(packed, batch["labels"])
    packed_tok[packed_tok != 0].sum().backward()
    packed_grads = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    singles = []
    for s in samples:
        logits = model(input_ids=torch.tensor([s["input_ids"]])).logits
        singles.append(_per_token_losses(logits, torch.tensor([s["labels"]])))
    torch.cat(singles).sum().backward()
    # Per sample: the packed row's label at each sample start is -100 (the flattening separator).
    start = 0
    for s, single in zip(samples, singles):
        n = len(s["input_ids"])
        torch.testing.assert_close(packed_tok[start:start + n - 1], single, atol=1e-5, rtol=1e-5)
        start += n
    for got, want in zip(packed_grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_with_cache_packed_samples_leak_into_each_other():
    """The trap measured on SmolLM2: the default use_cache=True silently gives a causal mask over the row."""
    model = tiny_llama(vocab_size=256)
    model.config.use_cache = True
    s = _samples(2)
    ids = torch.tensor([s[0]["input_ids"] + s[1]["input_ids"]])
    pos = torch.tensor([list(range(len(s[0]["input_ids"]))) + list(range(len(s[1]["input_ids"])))])
    alone = model(input_ids=torch.tensor([s[1]["input_ids"]])).logits[0]
    packed = model(input_ids=ids, position_ids=pos).logits[0, len(s[0]["input_ids"]):]
    assert not torch.allclose(alone, packed, atol=1e-4)


def _lora_step_losses(model_dir, tmp_path, tag: str, overrides: list[str]):
    """The recipe and the 20 per-step losses of an fp32 LoRA run on 40 dialogues. LoRA dropout is off: its
    random masks are drawn per layout, so with it two layouts' curves differ by design."""
    import samsum_tuner as st

    data = tmp_path / "d"
    if not data.exists():  # Lengths that vary a lot, so the padded batches are mostly padding.
        write_jsonl(data, "train", [{"id": str(i), "dialogue": "Ann: " + "so " * (3 + (i * 11) % 40) + f"\nBob: ok {i}",
                                     "summary": f"Ann and Bob talk {i % 5} times."} for i in range(40)])
    r = st.load_recipe(None, [f"model.name={model_dir}", f"data.source={data}", f"train.output_dir={tmp_path / tag}",
                              *overrides, "data.eval_split=null", "train.max_steps=20", "train.learning_rate=1e-3",
                              "train.lr_scheduler_type=constant", "--use_peft", "lora.dropout=0", *QUIET_RUN])
    trainer = st.build_trainer(r)
    st.train(r, trainer=trainer)
    return r, [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.slow
def test_packed_and_padded_training_follow_the_same_loss_curve(tiny_model_dir, tmp_path):
    """Same samples per step, loss = mean over the step's supervised tokens: 20 fp32 steps agree within 1e-4."""
    curves = {packing: _lora_step_losses(tiny_model_dir, tmp_path, str(packing),
                                         [f"data.packing={packing}", "train.per_device_train_batch_size=4",
                                          "train.gradient_accumulation_steps=2"])[1]
              for packing in (False, True)}
    assert len(curves[True]) == len(curves[False]) == 20
    assert curves[True] == pytest.approx(curves[False], abs=1e-4)
    assert curves[True][-1] < curves[True][0]


def test_fast_path_trains_an_original_recipe_like_its_micro_batches(tiny_model_dir, tmp_path):
    """`fast_path=true` on the original's batching (1 sample x 4 accumulated micro-batches): 4 samples packed
    into one row per step follow the original's 20 fp32 per-step losses within 1e-4 (sdpa, which the fast path
    takes on every device)."""
    curves, layouts = {}, {}
    for fast in (False, True):
        r, curves[fast] = _lora_step_losses(tiny_model_dir, tmp_path, str(fast), [f"fast_path={fast}"])
        layouts[fast] = (r.train.per_device_train_batch_size, r.train.gradient_accumulation_steps,
                         r.data.packing, r.model.attn_implementation)
    assert layouts == {False: (1, 4, False, "sdpa"), True: (4, 1, True, "sdpa")}
    assert len(curves[True]) == len(curves[False]) == 20
    assert curves[True] == pytest.approx(curves[False], abs=1e-4)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_token_budget_batches(packed):
    from samsum_tuner.batching import TokenBudgetBatchSampler

    lengths = [5 + (i * 37) % 120 for i in range(200)]
    s = TokenBudgetBatchSampler(lengths, budget=256, packed=packed, seed=1)
    first = list(s)
    cost = (lambda b: sum(lengths[i] for i in b)) if packed else (lambda b: len(b) * max(lengths[i] for i in b))
    assert all(cost(b) <= 256 for b in first) and sorted(i for b in first for i in b) == list(range(200))
    assert len(s) == len(first) < 200  # several samples per batch
    s.set_epoch(1)
    second = list(s)
    # Same batches (the Trainer counts steps per epoch once), visited in a new order.
    assert second != first and sorted(map(sorted, second)) == sorted(map(sorted, first))
    lf = TokenBudgetBatchSampler(lengths, budget=256, packed=packed, seed=1, longest_first=True)
    for epoch in (0, 1):
        lf.set_epoch(epoch)
        head = list(lf)[0]
        assert max(lengths[i] for i in head) == max(lengths) and cost(head) <= 256


def test_token_budget_trains_and_bounds_the_plan(tiny_model_dir, tmp_path):
    import samsum_tuner as st
    from samsum_tuner.planner import plan

    write_jsonl(tmp_path / "d", "train", varied_rows(30))
    r = st.load_recipe(None, [f"model.name={tiny_model_dir}", f"data.source={tmp_path / 'd'}", "data.eval_split=null",
                              f"train.output_dir={tmp_path / 'run'}", "data.packing=true", "data.max_length=128",
                              "data.max_tokens_per_batch=256", "train.gradient_accumulation_steps=1", "--use_peft",
                              "train.num_train_epochs=1", *QUIET_RUN])
    trainer = st.build_trainer(r)
    sizes = [b["input_ids"].shape[1] for b in trainer.get_train_dataloader()]
    assert max(sizes) <= 256 and sum(sizes) == sum(len(x) for x in trainer.train_dataset["input_ids"])
    metrics = st.train(r, trainer=trainer)
    assert trainer.state.global_step == len(sizes) and metrics["last_loss"] > 0
    assert any("at most 256 tokens (packed)" in note for note in plan(r, token_lengths=[128] * 30).notes)
    with pytest.raises(st.ConfigError, match="data.max_tokens_per_batch \\(64\\) must be at least data.max_length"):
        st.load_recipe(None, ["data.max_tokens_per_batch=64", "data.max_length=128"])


@pytest.mark.parametrize("packing,multiple", [(False, 256), (False, 64), (True, 200)],
                         ids=["padded-256", "padded-64", "packed-200"])
def test_token_budget_holds_for_rows_padded_to_a_multiple(tiny_model_dir, tmp_path, packing, multiple):
    """The budget bounds the batches as the collator pads them (rows rounded up to pad_to_multiple_of): padded
    rows at multiple 256 used to make batches of 4 x 256 tokens, and a packed row of 201-256 tokens at multiple
    200 one of 400, against a budget of 256 that the planner plans for."""
    import samsum_tuner as st
    from samsum_tuner.planner import _worst_batch_tokens

    rows = varied_rows(40)
    write_jsonl(tmp_path / "d", "train", rows)
    write_jsonl(tmp_path / "d", "validation", rows[:12])
    r = st.load_recipe(None, [f"model.name={tiny_model_dir}", f"data.source={tmp_path / 'd'}", "--use_peft",
                              f"train.output_dir={tmp_path / 'run'}", f"data.packing={packing}", "data.max_length=128",
                              "data.max_tokens_per_batch=256", f"data.pad_to_multiple_of={multiple}", *QUIET_RUN])
    trainer = st.build_trainer(r)
    for loader in (trainer.get_train_dataloader(), trainer.get_eval_dataloader()):
        shapes = [tuple(b["input_ids"].shape) for b in loader]
        assert max(a * b for a, b in shapes) <= 256 == _worst_batch_tokens(r, None)[0]
        assert all(b % multiple == 0 for _, b in shapes)
    assert sum(len(b) for b in trainer.get_train_dataloader().batch_sampler) == len(rows)


def test_a_budget_below_the_longest_padded_row_is_refused():
    import samsum_tuner as st

    with pytest.raises(st.ConfigError, match=r"data.max_tokens_per_batch \(256\) must be at least data.max_length "
                                             r"\(128, padded to a multiple of data.pad_to_multiple_of \(300\): 300\)"):
        st.load_recipe(None, ["data.max_tokens_per_batch=256", "data.max_length=128", "data.pad_to_multiple_of=300",
                              "data.packing=true"])


def test_eval_batches_take_the_training_shape(tiny_model_dir, tmp_path):
    """With a token budget and pad_to_multiple_of, evaluation runs in the training shape (one compile of
    flex_attention for both), covers every eval sample once, and reports the loss of those samples."""
    import samsum_tuner as st

    rows = varied_rows(40)
    write_jsonl(tmp_path / "d", "train", rows)
    write_jsonl(tmp_path / "d", "validation", rows[:25])
    base = [f"model.name={tiny_model_dir}", f"data.source={tmp_path / 'd'}", "data.max_length=128",
            "train.max_steps=1", "train.per_device_eval_batch_size=5", *QUIET_RUN]
    fixed = st.build_trainer(st.load_recipe(None, base + [f"train.output_dir={tmp_path / 'a'}", "data.packing=true",
                                                          "data.max_tokens_per_batch=256",
                                                          "data.pad_to_multiple_of=256"]))
    loader = fixed.get_eval_dataloader()
    batches = list(loader)
    assert {tuple(b["input_ids"].shape) for b in batches} == {(1, 256)}
    supervised = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
    assert supervised == sum(sum(x != IGNORE_INDEX for x in lab) for lab in fixed.eval_dataset["labels"])
    plain = st.build_trainer(st.load_recipe(None, base + [f"train.output_dir={tmp_path / 'b'}"]))
    assert len({b["input_ids"].shape[1] for b in plain.get_eval_dataloader()}) > 1  # the shapes it replaces
    # eval_loss is the mean over the split's supervised tokens, however the batches group them: packed or padded,
    # and whichever seed orders the packing (the Trainer's own mean weighted each batch by its row count).
    packed_loss = fixed.evaluate()["eval_loss"]
    want = _token_mean_loss(fixed.model, fixed.eval_dataset)
    assert packed_loss == pytest.approx(want, rel=1e-5)
    assert plain.evaluate()["eval_loss"] == pytest.approx(want, rel=1e-5)
    fixed.args.seed = 7
    assert len(list(fixed.get_eval_dataloader())) == len(batches)
    assert [b["input_ids"].tolist() for b in fixed.get_eval_dataloader()] != [b["input_ids"].tolist() for b in batches]
    assert fixed.evaluate()["eval_loss"] == pytest.approx(want, rel=1e-5)


def _token_mean_loss(model, dataset) -> float:
    """The loss of every supervised token of `dataset`, one sample at a time, summed and divided by their count."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in zip(dataset["input_ids"], dataset["labels"]):
            logits = model(input_ids=torch.tensor([ids])).logits
            losses = _per_token_losses(logits, torch.tensor([labels]))
            total, count = total + float(losses.sum()), count + int((torch.tensor(labels)[1:] != IGNORE_INDEX).sum())
    return total / count


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_supervised_logits_only_is_the_same_loss_and_gradients(tokenizer, packing):
    """lm_head on the summary positions only: equal loss and gradients to the model's own full-logits loss."""
    from samsum_tuner.batching import supervised_positions
    from samsum_tuner.trainer import supervised_loss

    model = tiny_llama(vocab_size=256)
    model.config.use_cache = False
    batch = build_collator(batching_spec(build_recipe(None, [f"data.packing={packing}"])), tokenizer)(_samples())
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    model.zero_grad()
    full = model(**inputs, labels=batch["labels"]).loss
    full.backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    keep = supervised_positions(batch["labels"])
    out = model(**inputs, logits_to_keep=keep)
    assert out.logits.shape[1] == len(keep) < batch["input_ids"].shape[1]
    mine = supervised_loss(out, batch["labels"][:, 1:][:, keep])
    mine.backward()
    torch.testing.assert_close(mine, full, atol=1e-6, rtol=1e-6)
    for got, exp in zip((p.grad for p in model.parameters()), want):
        torch.testing.assert_close(got, exp, atol=1e-6, rtol=1e-5)


def test_trainer_with_and_without_supervised_logits_only_logs_the_same_losses(tiny_model_dir, tmp_path):
    import samsum_tuner as st
    from samsum_tuner.batching import supervised_positions

    rows = varied_rows(16)
    write_jsonl(tmp_path / "d", "train", rows)
    write_jsonl(tmp_path / "d", "validation", rows[:4])
    curves = {}
    for flag in (True, False):
        r = st.load_recipe(None, [f"model.name={tiny_model_dir}", f"data.source={tmp_path / 'd'}", "--use_peft",
                                  f"train.output_dir={tmp_path / str(flag)}", f"train.supervised_logits_only={flag}",
                                  "train.max_steps=4", "train.per_device_train_batch_size=2", "lora.dropout=0",
                                  "train.gradient_accumulation_steps=2", "train.learning_rate=1e-3",
                                  "data.max_length=128", *QUIET_RUN])
        trainer = st.build_trainer(r)
        batch = next(iter(trainer.get_train_dataloader()))
        # the positions come with the batch, found on the host: on the GPU the search would wait for it
        assert ("logits_to_keep" in batch) == flag
        if flag:
            assert torch.equal(batch["logits_to_keep"], supervised_positions(batch["labels"]))
        metrics = st.train(r, trainer=trainer)
        curves[flag] = [h["loss"] for h in trainer.state.log_history if "loss" in h] + [metrics["eval_loss"]]
    assert curves[True] == pytest.approx(curves[False], abs=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "flex_attention"])
def test_packed_row_padded_to_a_fixed_shape_changes_no_loss(attn, tokenizer):
    """pad_to_multiple_of gives every packed step one shape (flex_attention compiles once); the tail is a sample
    of its own, unsupervised, and the real samples' losses are those of the unpadded row."""
    model = tiny_llama(vocab_size=256)
    model.config._attn_implementation = attn
    model.config.use_cache = False
    samples = _samples()
    plain = build_collator(batching_spec(build_recipe(None, ["data.packing=true"])), tokenizer)(samples)
    padded = build_collator(batching_spec(build_recipe(None, ["data.packing=true", "data.pad_to_multiple_of=96"])),
                            tokenizer)(samples)
    n = plain["input_ids"].shape[1]
    assert padded["input_ids"].shape == (1, 96) and n < 96
    assert padded["position_ids"][0, n:].tolist() == list(range(96 - n))
    assert (padded["labels"][0, n:] == IGNORE_INDEX).all()
    assert (padded["input_ids"][0, n:] == tokenizer.pad_token_id).all()
    with torch.no_grad():
        want = _per_token_losses(model(input_ids=plain["input_ids"], position_ids=plain["position_ids"]).logits,
                                 plain["labels"])
        got = _per_token_losses(model(input_ids=padded["input_ids"], position_ids=padded["position_ids"]).logits,
                                padded["labels"])
    torch.testing.assert_close(got[: n - 1], want, atol=1e-5, rtol=1e-5)
    assert (got[n - 1:] == 0).all()


@pytest.mark.parametrize("attn", ["sdpa", "flex_attention"])
def test_the_packed_mask_built_beforehand_gives_the_models_own_logits(attn, tokenizer):
    """SamsumTrainer hands the model a packed row's mask (transformers would ask the GPU whether the row is
    packed, a host sync every forward): the same logits as the mask transformers builds, tail included."""
    from samsum_tuner.batching import packed_attention_mask

    model = tiny_llama(vocab_size=256)
    model.config._attn_implementation = attn
    model.config.use_cache = False
    batch = build_collator(batching_spec(build_recipe(None, ["data.packing=true", "data.pad_to_multiple_of=128"])),
                           tokenizer)(_samples())
    mask = packed_attention_mask(batch["position_ids"], attn)
    assert mask.shape == (1, 1, 128, 128)
    if attn == "sdpa":  # sample 2 (from token 9 on) sees itself causally, not sample 1
        assert mask[0, 0, 9, :10].tolist() == [False] * 9 + [True] and mask[0, 0, 12, 9:13].all()
    with torch.no_grad():
        want = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        got = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=mask).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("multiple", [None, 128], ids=["unpadded", "tail"])
def test_varlen_rows_carry_transformers_own_sample_boundaries(multiple, tokenizer):
    """model.attn_implementation=varlen_attn: each packed row carries its samples' cu_seq_lens and longest
    length, found on the host: those transformers' flattening collator computes itself, plus the tail."""
    from transformers import DataCollatorWithFlattening

    extra = [f"data.pad_to_multiple_of={multiple}"] if multiple else []
    spec = batching_spec(build_recipe(None, ["data.packing=true", "model.attn_implementation=varlen_attn", *extra]))
    batch = build_collator(spec, tokenizer)(_samples())
    theirs = DataCollatorWithFlattening(return_flash_attn_kwargs=True, separator_id=IGNORE_INDEX)(_samples())
    cu, n = batch["cu_seq_lens_q"], theirs["input_ids"].shape[1]
    assert cu.dtype == torch.int32 and torch.equal(batch["cu_seq_lens_k"], cu)
    if multiple:  # the unsupervised tail is one more sample
        assert cu[:-1].tolist() == theirs["cu_seq_lens_q"].tolist() and cu[-1] == 128
        assert batch["max_length_q"] == max(theirs["max_length_q"], 128 - n)
    else:
        assert cu.tolist() == theirs["cu_seq_lens_q"].tolist()
        assert batch["max_length_q"] == batch["max_length_k"] == theirs["max_length_q"]


CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="FlashAttention: CUDA only")]


@pytest.mark.parametrize("device, weights", [("cpu", "float32"), pytest.param("cuda", "bfloat16", marks=CUDA),
                                             pytest.param("cuda", "autocast", marks=CUDA)])
def test_varlen_attention_gives_sdpas_logits_and_gradients_on_packed_rows(device, weights, tokenizer):
    """The registered varlen_attn (grouped-query heads, as SmolLM2's) against sdpa with the packed row's mask,
    the same model either way: the same logits and gradients, tail included. On CUDA torch's FlashAttention
    kernel, over bf16 weights or over fp32 weights under bf16 autocast (SmolLM2's recipe, QLoRA's unquantized
    parts); on a CPU per-sample sdpa."""
    from samsum_tuner.batching import packed_attention_mask
    from samsum_tuner.varlen import register

    register()
    dtype = torch.bfloat16 if weights == "bfloat16" else torch.float32
    tol = 1e-5 if device == "cpu" else 2e-2
    batch = build_collator(batching_spec(build_recipe(None, ["data.packing=true", "data.pad_to_multiple_of=128",
                                                             "model.attn_implementation=varlen_attn"])),
                           tokenizer)(_samples())
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    results = {}
    for attn in ("sdpa", "varlen_attn"):
        model = tiny_llama(vocab_size=256).to(device, dtype)
        model.config.use_cache = False
        model.set_attn_implementation(attn)
        extra = ({"attention_mask": packed_attention_mask(batch["position_ids"], "sdpa")} if attn == "sdpa" else
                 {k: batch[k] for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")})
        with torch.autocast(device, torch.bfloat16, enabled=weights == "autocast"):
            out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                        **extra)
        out.loss.backward()
        results[attn] = out.logits.float(), [p.grad.float() for p in model.parameters()]
    torch.testing.assert_close(results["varlen_attn"][0], results["sdpa"][0], atol=tol, rtol=tol)
    for got, want in zip(results["varlen_attn"][1], results["sdpa"][1]):
        torch.testing.assert_close(got, want, atol=tol, rtol=2.5 * tol)


def test_a_varlen_run_logs_the_losses_of_an_sdpa_run(tiny_model_dir, tmp_path):
    """Through build_trainer: the collator's sample boundaries reach the attention function (no mask is built),
    training and evaluation log the packed sdpa run's losses."""
    import samsum_tuner as st

    rows = varied_rows(16)
    write_jsonl(tmp_path / "d", "train", rows)
    write_jsonl(tmp_path / "d", "validation", rows[:4])
    curves = {}
    for attn in ("sdpa", "varlen_attn"):
        r = st.load_recipe(None, [f"model.name={tiny_model_dir}", f"data.source={tmp_path / 'd'}", "--use_peft",
                                  f"train.output_dir={tmp_path / attn}", f"model.attn_implementation={attn}",
                                  "data.packing=true", "data.max_tokens_per_batch=256", "data.pad_to_multiple_of=256",
                                  "data.max_length=128", "train.max_steps=4", "lora.dropout=0",
                                  "train.learning_rate=1e-3", *QUIET_RUN])
        trainer = st.build_trainer(r)
        assert trainer.model.config._attn_implementation == attn
        assert ("cu_seq_lens_q" in next(iter(trainer.get_train_dataloader()))) == (attn == "varlen_attn")
        metrics = st.train(r, trainer=trainer)
        curves[attn] = [h["loss"] for h in trainer.state.log_history if "loss" in h] + [metrics["eval_loss"]]
    assert curves["varlen_attn"] == pytest.approx(curves["sdpa"], rel=1e-4)


def test_padded_batches_round_up_to_the_multiple(tokenizer):
    batch = build_collator(batching_spec(build_recipe(None, ["data.pad_to_multiple_of=64"])), tokenizer)(_samples())
    assert batch["input_ids"].shape == (4, 64)


def _train_packed_tiny(tiny_model_dir, data: Path, out: Path, overrides: list[str]):
    """LoRA on the tiny Llama over packed rows of one shape, 4 steps: (the losses logged and the final eval_loss,
    the class names of the modules compiled in place, the graphs Dynamo compiled)."""
    import samsum_tuner as st

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    r = st.load_recipe(None, [f"model.name={tiny_model_dir}", f"data.source={data}", "--use_peft",
                              f"train.output_dir={out}", "data.packing=true", "data.max_tokens_per_batch=256",
                              "data.pad_to_multiple_of=256", "data.max_length=256", "train.max_steps=4",
                              "lora.dropout=0", "train.gradient_accumulation_steps=1", "train.learning_rate=1e-3",
                              *overrides, *QUIET_RUN])
    trainer = st.build_trainer(r)
    metrics = st.train(r, trainer=trainer)
    curve = [h["loss"] for h in trainer.state.log_history if "loss" in h] + [metrics["eval_loss"]]
    compiled = [type(m).__name__ for m in trainer.model.modules()
                if getattr(m, "_compiled_call_impl", None) is not None]
    return curve, compiled, torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.mark.slow
def test_compiled_layers_train_like_eager_ones(tiny_model_dir, tmp_path):
    """model.compile: every decoder layer is compiled in place (PEFT, checkpointing and FSDP keep seeing the same
    modules) and the run logs the losses of the eager run. Fixed-shape packed rows: one compilation."""
    rows = varied_rows(16)
    write_jsonl(tmp_path / "d", "train", rows)
    write_jsonl(tmp_path / "d", "validation", rows[:4])
    curves, compiled, graphs = {}, {}, {}
    for flag in (False, True):
        curves[flag], modules, graphs[flag] = _train_packed_tiny(
            tiny_model_dir, tmp_path / "d", tmp_path / str(flag),
            [f"model.compile={flag}", "model.gradient_checkpointing=true"])
        compiled[flag] = len(modules)
    assert compiled == {False: 0, True: 2}  # the tiny model's two decoder layers
    assert graphs[False] == 0 and graphs[True] > 0  # compiled graphs really ran (no silent eager fallback)
    assert curves[True] == pytest.approx(curves[False], rel=1e-4)
    assert curves[True][-2] < curves[True][0]


@pytest.mark.slow
def test_a_model_compiled_as_one_graph_trains_like_eager_with_one_compilation(tiny_model_dir, tmp_path):
    """model.compile_scope=model: the decoder stack (under PEFT's wrappers) is one compiled graph whose layers are
    one nested region, entered once a step; the layers are not compiled one by one, the packed rows of one shape
    compile once (no recompilation over the steps), and the run logs the eager run's losses."""
    rows = varied_rows(16)
    write_jsonl(tmp_path / "d", "train", rows)
    write_jsonl(tmp_path / "d", "validation", rows[:4])
    curves, compiled, graphs = {}, {}, {}
    for scope in ("eager", "model"):
        curves[scope], compiled[scope], graphs[scope] = _train_packed_tiny(
            tiny_model_dir, tmp_path / "d", tmp_path / scope,
            [f"model.compile={scope == 'model'}", f"model.compile_scope={'model' if scope == 'model' else 'layers'}",
             "train.eval_strategy=no"])
    assert compiled == {"eager": [], "model": ["LlamaModel"]}
    # Two graphs of the stack: training's, compiled at the first step and entered as it is at every later one,
    # and the final evaluation's (no gradients).
    assert graphs["model"] == 2
    assert len(curves["model"]) == 4 + 1  # four training losses, then the final eval_loss
    assert curves["model"] == pytest.approx(curves["eager"], rel=1e-4)


@pytest.mark.parametrize("length, rows", [(384, 1), (300, 2), (1000, 1), (2048, 2)])
def test_flex_block_mask_of_packed_rows_is_create_block_masks_without_compiling(length, rows):
    """The packed rows' BlockMask, built from each block's first and last sample, is the one torch's
    create_block_mask computes from the mask function (every block count and index, partial and full, both
    directions), and building it compiles nothing: no first-step compilation of the mask."""
    import random

    from torch.nn.attention.flex_attention import create_block_mask

    from samsum_tuner.batching import _sample_ids, packed_attention_mask

    rng = random.Random(length + rows)
    positions = []
    for _ in range(rows):
        row = []
        while len(row) < length:  # samples shorter, as long as, and longer than a block
            row += range(rng.choice([1, 3, 50, 127, 128, 129, 200, 400, 900]))
        positions.append(row[:length])
    positions = torch.tensor(positions)
    torch._dynamo.utils.counters.clear()
    mine = packed_attention_mask(positions, "flex_attention")
    assert not torch._dynamo.utils.counters["stats"]["calls_captured"]
    sample = _sample_ids(positions)
    reference = create_block_mask(lambda b, h, q, kv: (q >= kv) & (sample[b, q] == sample[b, kv]), rows, None,
                                  length, length, device="cpu", _compile=False)
    assert reference.full_kv_num_blocks.sum() > 0 and mine.seq_lengths == reference.seq_lengths
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks",
                 "q_indices", "full_q_num_blocks", "full_q_indices"):
        a, b = getattr(mine, name), getattr(reference, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert torch.equal(mine.to_dense(), reference.to_dense())
