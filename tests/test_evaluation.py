"""Generation + ROUGE, merge, and EOS supervision through the padded collator."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from samsum_tuner import cli
from samsum_tuner.resolve import batching_spec
from samsum_tuner.batching import build_collator
from samsum_tuner.recipe import build_recipe
from samsum_tuner.data import DataConfig, tokenize_row
from samsum_tuner.evaluation import GenerationConfig, evaluate, generate, rouge

from .conftest import QUIET_RUN, tiny_llama
from .damage import assert_refused, base, cut, edit, files_of, nothing, other_base, remove, write


def test_rouge_is_the_mean_of_per_example_f_measures():
    # By hand (rouge_score lowercases and stems "buys" and "calls" on both sides):
    # ROUGE-1 F: 1, 2/3 (2 of 3 words), 0.4 (P 1, R 1/4); ROUGE-2 F: 1, 1/2 ("buys pizza" of 2 bigrams), 0 (no bigram);
    # ROUGE-L F: 1, 2/3 (LCS "buys pizza"), 0.4 (LCS "bob").
    preds = ["Ann buys wine.", "Ann buys pizza.", "Bob."]
    refs = ["Ann buys wine.", "Bob buys pizza.", "Bob calls Ann back."]
    mean = round(100 * (1 + 2 / 3 + 0.4) / 3, 2)
    assert rouge(preds, refs) == {"rouge1": mean, "rouge2": 50.0, "rougeL": mean, "rougeLsum": mean}
    assert rouge(["same words here."], ["same words here."]) == {
        k: 100.0 for k in ("rouge1", "rouge2", "rougeL", "rougeLsum")}


def test_rouge_is_the_same_on_every_call():
    import random

    rng = random.Random(0)
    words = "ann bob meet at five pm bring wine pizza call back later today".split()
    preds = [" ".join(rng.choices(words, k=rng.randint(2, 12))) + "." for _ in range(100)]
    refs = [" ".join(rng.choices(words, k=rng.randint(2, 12))) + "." for _ in range(100)]
    first = rouge(preds, refs)
    assert all(rouge(preds, refs) == first for _ in range(4))


def test_eos_stays_supervised_when_pad_is_eos(tokenizer):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    cfg = DataConfig()
    rows = [tokenize_row(cfg, tokenizer, {"dialogue": d, "summary": s}) for d, s in
            [("A: hi", "A greets."), ("A: a much longer dialogue here\nB: yes indeed it is long", "Long one.")]]
    collate = build_collator(batching_spec(build_recipe()), tokenizer)
    batch = collate([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows])
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
    batched = generate(model, tokenizer, recipe.data, dialogues, gen, progress=False)
    one_by_one = [generate(model, tokenizer, recipe.data, [d], GenerationConfig(max_new_tokens=5, batch_size=1),
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


def test_eval_says_which_prompt_it_uses(lora_run, tmp_path, capsys):
    base, data = lora_run.parent / "base", lora_run.parent / "samsum"
    template = repr(build_recipe().data.prompt_template)
    args = ["eval", str(base), "--limit", "2", "--max-new-tokens", "2", f"data.source={data}"]
    for extra, line in (([], f"samsum_tuner: prompt: {template} (default)"),
                        (["data.chat_template=true"], f"samsum_tuner: prompt: chat template around {template} "
                                                      "(default, data.chat_template from the command line)")):
        assert cli.main([*args, *extra, "--out", str(tmp_path)]) == 0
        assert line in capsys.readouterr().out.splitlines()
    assert json.loads((tmp_path / "eval_metrics_test.json").read_text())["prompt_from"] == (
        "default, data.chat_template from the command line")


def _model(damage):
    """The run's base copied to RUN/model (a plain model folder: config.json, model.safetensors, tokenizer), damaged."""
    def setup(run, tmp):
        shutil.copytree(run.parent / "base", run / "model")
        damage(run / "model", tmp)
    return setup


def _test_split(lines: bytes):
    def setup(run, tmp):
        shutil.copytree(run.parent / "samsum", tmp / "data")
        (tmp / "data" / "test.jsonl").write_bytes(lines)
    return setup


def _dir(name: str):
    return lambda run, tmp: (run / name).mkdir()


RUN = lambda run, tmp: [run, "--limit", "2", "--max-new-tokens", "2"]  # noqa: E731
MODEL = lambda run, tmp: [run / "model", "--limit", "2", f"data.source={run.parent / 'samsum'}"]  # noqa: E731


def _run_with(*extra):
    return lambda run, tmp: [*RUN(run, tmp), *extra]


# name: (setup(run, tmp), what the one line says, the arguments after `eval` (default: RUN))
CASES = {
    "adapter-config-truncated": (cut("adapter_config.json"), "adapter_config.json:"),
    "adapter-config-not-object": (write("adapter_config.json", b"null"), "adapter_config.json: expected an object"),
    "adapter-weights-missing": (remove("adapter_model.safetensors"), "adapter_model.safetensors: missing"),
    "adapter-weights-truncated": (cut("adapter_model.safetensors", 0.9), "not a complete safetensors file"),
    "adapter-weights-not-safetensors": (write("adapter_model.safetensors", b"PK\x03\x04 a zip"),
                                        "adapter_model.safetensors: not a complete safetensors file"),
    "adapter-of-another-base": (base(other_base), "an adapter of another model"),
    "no-adapter-no-model": (remove("adapter_config.json"), "neither adapter_config.json (LoRA) nor config.json"),
    "adapter-without-recipe": (remove("recipe.yaml"), "an adapter without recipe.yaml"),
    "recipe-invalid-yaml": (write("recipe.yaml", b"data: {chat_template: true\n"), "recipe.yaml:2: invalid YAML"),
    "recipe-not-a-mapping": (write("recipe.yaml", b"- model\n"), "recipe.yaml: a recipe is a mapping"),
    "recipe-unknown-key": (edit("chat_template:", "chat_templte:"), "unknown key 'data.chat_templte'"),
    "recipe-bad-value": (edit("max_length: 128", "max_length: -1"), "recipe.yaml: data.max_length must be positive"),
    "recipe-base-missing": (base(lambda tmp: tmp / "gone"), "recipe.yaml: model.name: local model folder"),
    "recipe-random-base": (base(lambda tmp: "random:llama2-7b"), "is a random base that was never saved"),
    "tokenizer-missing": (remove("tokenizer.json", "tokenizer_config.json"), "no tokenizer"),
    "tokenizer-truncated": (cut("tokenizer.json", 0.99), "tokenizer.json:"),
    "tokenizer-config-not-utf8": (write("tokenizer_config.json", b"{\"a\": \"\xc3\"}"), "not UTF-8 text"),
    "adapter-config-int-too-long": (write("adapter_config.json", b'{"r": ' + b"1" * 5000 + b"}"),
                                    "adapter_config.json: not valid JSON (Exceeds the limit (4300 digits)"),
    "tokenizer-config-int-too-long": (write("tokenizer_config.json", b'{"model_max_length": ' + b"1" * 5000 + b"}"),
                                      "tokenizer_config.json: not valid JSON (Exceeds the limit (4300 digits)"),
    "model-config-truncated": (_model(cut("config.json")), "model/config.json:", MODEL),
    "model-weights-missing": (_model(remove("model.safetensors")), "model.safetensors: missing", MODEL),
    "model-weights-truncated": (_model(cut("model.safetensors")), "model.safetensors: not a complete safetensors",
                                MODEL),
    "model-shard-missing": (_model(write("model.safetensors.index.json", json.dumps({"weight_map": {
        "a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}).encode())),
        "model-00002-of-00002.safetensors: missing", MODEL),
    "model-index-without-map": (_model(write("model.safetensors.index.json", b"{}")), "no weight_map", MODEL),
    "path-missing": (nothing, "nope: no such run directory or model folder", lambda run, tmp: [tmp / "nope"]),
    "path-is-a-file": (nothing, "neither a run directory (recipe.yaml) nor a model folder",
                       lambda run, tmp: [run / "recipe.yaml"]),
    "empty-folder": (nothing, "neither a run directory", lambda run, tmp: [tmp]),
    "random-model": (nothing, "has random weights: nothing to evaluate", lambda run, tmp: ["random:llama2-7b"]),
    "out-is-a-file": (nothing, "--out", lambda run, tmp: [*RUN(run, tmp), "--out", run / "recipe.yaml"]),
    "out-under-a-file": (nothing, "cannot create the folder",
                         lambda run, tmp: [*RUN(run, tmp), "--out", run / "recipe.yaml" / "x"]),
    "predictions-path-is-a-folder": (_dir("predictions_test.jsonl"), "predictions_test.jsonl: is a folder"),
    "temperature-zero": (nothing, "--temperature must be a finite number > 0, got 0.0",
                         _run_with("--sample", "--temperature", "0")),
    "temperature-negative": (nothing, "--temperature must be", _run_with("--sample", "--temperature=-1")),
    "temperature-nan": (nothing, "--temperature must be a finite number > 0, got nan",
                        _run_with("--sample", "--temperature", "nan")),
    "temperature-inf": (nothing, "got inf", _run_with("--sample", "--temperature", "inf")),
    "temperature-not-a-number": (nothing, "argument --temperature: invalid float value: 'hot'",
                                 _run_with("--sample", "--temperature", "hot")),
    "temperature-without-sample": (nothing, "--temperature applies only with --sample",
                                   _run_with("--temperature", "0.7")),
    "top-p-zero": (nothing, "--top-p must be in (0, 1], got 0.0", _run_with("--sample", "--top-p", "0")),
    "top-p-above-one": (nothing, "--top-p must be in (0, 1], got 1.5", _run_with("--sample", "--top-p", "1.5")),
    "top-p-negative": (nothing, "--top-p must be in (0, 1]", _run_with("--sample", "--top-p=-0.5")),
    "top-p-nan": (nothing, "--top-p must be in (0, 1], got nan", _run_with("--sample", "--top-p", "nan")),
    "top-p-without-sample": (nothing, "--top-p applies only with --sample", _run_with("--top-p", "0.9")),
    "max-new-tokens-zero": (nothing, "--max-new-tokens must be a positive integer", _run_with("--max-new-tokens", "0")),
    # The base's context is 1024 positions: a larger budget generated for hours before.
    "max-new-tokens-beyond-context": (nothing, "--max-new-tokens must be at most 1024, the context of",
                                      _run_with("--max-new-tokens", "1025")),
    "max-new-tokens-huge": (nothing, "(max_position_embeddings), got 99999999999999999999",
                            _run_with("--max-new-tokens", "99999999999999999999")),
    "model-max-new-tokens-beyond-context": (_model(nothing), "--max-new-tokens must be at most 1024",
                                            lambda run, tmp: [*MODEL(run, tmp), "--max-new-tokens", "1025"]),
    "batch-size-negative": (nothing, "--batch-size must be a positive integer", _run_with("--batch-size=-2")),
    "limit-zero": (nothing, "--limit must be a positive integer", _run_with("--limit", "0")),
    "limit-not-a-number": (nothing, "argument --limit: invalid int value: 'ten'", _run_with("--limit", "ten")),
    "split-missing": (nothing, "no tset.jsonl", _run_with("--split", "tset")),
    "data-source-missing": (nothing, "data.source: folder",
                            lambda run, tmp: [*RUN(run, tmp), f"data.source={tmp / 'gone'}"]),
    "test-split-malformed": (_test_split(b'{"dialogue": "A: hi", "summary": "hi"}\n{"dialogue": \n'),
                             "test.jsonl:2: malformed JSON line",
                             lambda run, tmp: [*RUN(run, tmp), f"data.source={tmp / 'data'}"]),
    "unknown-override": (nothing, "unknown key 'data.chat'", _run_with("data.chat=true")),
}


@pytest.mark.parametrize("case", CASES)
def test_eval_refuses_bad_input_in_one_line(case, lora_run, tmp_path, capsys):
    setup, expected, args = (*CASES[case], RUN)[:3]
    run = tmp_path / "runs" / "run"
    shutil.copytree(lora_run, run)
    for name in ("base", "samsum"):  # the run's base model and data, beside it as in the session's copy
        (run.parent / name).symlink_to(lora_run.parent / name)
    setup(run, tmp_path)
    kept = files_of(tmp_path)
    assert_refused(capsys, ["eval", *args(run, tmp_path)], expected)
    assert files_of(tmp_path) == kept  # nothing written or removed
