"""Generation + ROUGE, merge, and EOS supervision through the padded collator."""
from __future__ import annotations

import json

import pytest
import torch

from samsum_tuner import cli
from samsum_tuner.config import build_recipe
from samsum_tuner.data import DataConfig, tokenize_row
from samsum_tuner.evaluation import GenerationConfig, evaluate, generate, rouge
from samsum_tuner.trainer import build_collator

from .conftest import QUIET_RUN, tiny_llama


def test_rouge_is_rouge_score_with_stemmer():
    from rouge_score import rouge_scorer

    preds, refs = (["Amanda baked cookies for Jerry.", "Tom is late"],
                   ["Amanda bakes cookies and brings Jerry some.", "Tom will be late."])
    got = rouge(preds, refs)
    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
    want = sum(scorer.score(r, p)["rouge1"].fmeasure for p, r in zip(preds, refs)) / 2 * 100
    assert got["rouge1"] == pytest.approx(want, abs=0.01)
    assert rouge(["same words here."], ["same words here."]) == {
        k: 100.0 for k in ("rouge1", "rouge2", "rougeL", "rougeLsum")}


def test_eos_stays_supervised_when_pad_is_eos(tokenizer):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    cfg = DataConfig()
    rows = [tokenize_row(cfg, tokenizer, {"dialogue": d, "summary": s}) for d, s in
            [("A: hi", "A greets."), ("A: a much longer dialogue here\nB: yes indeed it is long", "Long one.")]]
    batch = build_collator(build_recipe(), tokenizer)([{"input_ids": r["input_ids"], "labels": r["labels"]}
                                                       for r in rows])
    eos = tokenizer.eos_token_id
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        assert batch["labels"][i, n - 1].item() == eos  # the EOS that ends the summary is a target
        assert (batch["labels"][i, n:] == -100).all() and batch["attention_mask"][i, n:].sum() == 0


def _run_dir(tmp_path, tokenizer, model_dir):
    """A LoRA run directory as training leaves it: adapter, tokenizer, recipe."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(run)
    tokenizer.save_pretrained(run)
    (run / "recipe.yaml").write_text(build_recipe(None, [f"model.name={model_dir}", "--use_peft"]).to_yaml())
    return run, model


def test_merge_gives_a_plain_model_with_equal_logits(tmp_path, tokenizer, tiny_model_dir, capsys):
    from transformers import AutoModelForCausalLM

    run, adapter_model = _run_dir(tmp_path, tokenizer, tiny_model_dir)
    assert cli.main(["merge", str(run), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    ids = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapter_model.eval()(input_ids=ids).logits,
                                   atol=1e-4, rtol=1e-4)
    assert cli.main(["merge", str(run), str(tmp_path / "merged")]) == 2  # never overwrites
    assert "exists and is not empty" in capsys.readouterr().err


def test_generation_is_batched_left_padded_and_order_preserving(tokenizer):
    model = tiny_llama()
    recipe = build_recipe()
    dialogues = ["A: hi", "A: a longer dialogue\nB: with two turns and more words", "B: ok"]
    gen = GenerationConfig(max_new_tokens=5, batch_size=2)
    batched = generate(model, tokenizer, recipe, dialogues, gen, progress=False)
    one_by_one = [generate(model, tokenizer, recipe, [d], GenerationConfig(max_new_tokens=5, batch_size=1),
                           progress=False)[0] for d in dialogues]
    assert [b["prediction"] for b in batched] == [o["prediction"] for o in one_by_one]
    assert all(0 <= b["new_tokens"] <= 5 for b in batched)


def test_eval_run_dir_writes_predictions_and_metrics(tmp_path, tokenizer, tiny_model_dir, tiny_data):
    run, _ = _run_dir(tmp_path, tokenizer, tiny_model_dir)
    metrics = evaluate(str(run), split="test", limit=4, gen=GenerationConfig(max_new_tokens=8, batch_size=2),
                       overrides=[f"data.source={tiny_data}"], progress=False)
    assert metrics["rows"] == 4 and set(metrics) >= {"rouge1", "rouge2", "rougeL", "rougeLsum", "ended_at_eos"}
    preds = [json.loads(x) for x in (run / "predictions_test.jsonl").read_text().splitlines()]
    assert len(preds) == 4 and all({"id", "reference", "prediction", "ended_at_eos"} <= set(p) for p in preds)
    assert json.loads((run / "eval_metrics_test.json").read_text())["rows"] == 4


def test_rouge_at_every_evaluation_when_asked(tiny_model_dir, tiny_data, tmp_path):
    import samsum_tuner as st

    r = st.load_recipe(None, [f"model.name={tiny_model_dir}", f"data.source={tiny_data}", "--use_peft",
                              f"train.output_dir={tmp_path / 'run'}", "train.num_train_epochs=2",
                              "train.per_device_train_batch_size=8", "train.gradient_accumulation_steps=1",
                              "train.eval_rouge_rows=3", "data.max_length=128", *QUIET_RUN])
    trainer = st.build_trainer(r)
    metrics = st.train(r, trainer=trainer)
    scored = [h for h in trainer.state.log_history if "eval_rouge1" in h]
    assert [h["epoch"] for h in scored] == [1.0, 2.0]
    assert set(scored[0]) >= {"eval_rouge1", "eval_rouge2", "eval_rougeL", "eval_rougeLsum", "eval_ended_at_eos"}
    assert 0 <= metrics["eval_rouge1"] <= 100 and trainer.model.training is False  # scored last, after training
    assert trainer.processing_class.padding_side == "right"  # generation's left padding was put back
    off = st.load_recipe(None, [f"model.name={tiny_model_dir}", f"data.source={tiny_data}"])
    assert off.train.eval_rouge_rows == 0
    with pytest.raises(st.ConfigError, match="train.eval_rouge_rows needs an evaluation split"):
        st.load_recipe(None, ["train.eval_rouge_rows=3", "data.eval_split=null"])
