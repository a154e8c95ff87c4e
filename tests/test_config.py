"""Recipes, overrides, the original's flags, refusals and exit codes."""
from __future__ import annotations

import pytest

from samsum_tuner import cli
from samsum_tuner.config import ORIGINAL_PROMPT, Recipe, describe_precision
from samsum_tuner.recipe import build_recipe, split_overrides
from samsum_tuner.errors import ConfigError

from .conftest import ROOT

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def test_no_recipe_gives_the_originals_training_configuration():
    r = build_recipe()
    t = r.train
    assert (t.per_device_train_batch_size, t.gradient_accumulation_steps) == (1, 4)
    assert (t.learning_rate, t.weight_decay, t.num_train_epochs, t.gamma, t.seed) == (1e-4, 0.0, 3.0, 0.85, 42)
    assert t.lr_scheduler_type == "steplr" and t.momentum == 0.9 and t.max_grad_norm == 0.0
    assert (r.lora.r, r.lora.alpha, r.lora.dropout, r.lora.target_modules) == (8, 32, 0.05, ["q_proj", "v_proj"])
    assert r.lora.enabled is False and r.quantization.bits is None and r.model.dtype is None
    assert r.data.prompt_template == ORIGINAL_PROMPT == "Summarize this dialog:\n{dialog}\n---\nSummary:\n"
    assert r.data.completion_only_loss and not r.data.packing


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("train:\n  learning_rate: 3.0e-4\n  fp16: true\nlora:\n  enabled: true\n")
    r = build_recipe(p, ["train.learning_rate=2e-5", "lora.target_modules=q_proj,k_proj",
                         "--train.num_train_epochs", "1"])
    assert r.train.learning_rate == 2e-5 and r.train.fp16 and r.lora.enabled
    assert r.lora.target_modules == ["q_proj", "k_proj"] and r.train.num_train_epochs == 1.0


def test_every_llama_recipes_alias():
    argv = ("--use_peft --peft_method lora --quantization True --use_fp16 --enable_fsdp "
            "--fsdp_config.fsdp_cpu_offload False --fsdp_config.optimizer SGD --fsdp_config.pure_bf16 False "
            "--split_slice 1% --micro_batch_size 2 --batch_size_training 8 --num_epochs 2 --lr 3e-4 "
            "--gamma 0.9 --model_name /tmp/model-7b --output_dir out --save_model False "
            "--dataset samsum_dataset").split()
    r = build_recipe(None, argv)
    assert r.lora.enabled and r.lora.method == "lora" and r.quantization.bits == 4
    assert r.train.fp16 and r.fsdp.enabled and not r.fsdp.cpu_offload and r.train.optim == "sgd"
    assert r.model.dtype is None and r.data.split_slice == "1%"
    assert (r.train.per_device_train_batch_size, r.train.gradient_accumulation_steps) == (2, 4)
    assert (r.train.num_train_epochs, r.train.learning_rate, r.train.gamma) == (2.0, 3e-4, 0.9)
    assert r.model.name == "/tmp/model-7b" and r.train.output_dir == "out" and r.train.save_model is False


def test_alias_values():
    assert build_recipe(None, ["--fsdp_config.pure_bf16"]).model.dtype == "bfloat16"
    assert build_recipe(None, ["--fsdp_config.optimizer", "AdamW"]).train.optim == "adamw_torch"
    assert build_recipe(None, ["--use_peft", "--quantization", "8bit"]).quantization.bits == 8
    assert build_recipe(None, ["--quantization", "False"]).quantization.bits is None
    assert build_recipe(None, ["--batch_size_training", "4"]).train.gradient_accumulation_steps == 4


def test_split_overrides_forms():
    assert split_overrides(["a.b=1", "--c.d", "2", "--flag", "--e=3"]) == [
        ("a.b", "1"), ("c.d", "2"), ("flag", "true"), ("e", "3")]
    with pytest.raises(ConfigError, match="argument 'oops'"):
        split_overrides(["oops"])


@pytest.mark.parametrize("overrides, message", [
    (["quantization.bits=4"], "refused: full fine-tuning of a 4-bit quantized model cannot learn"),
    (["--use_peft", "--quantization", "8bit", "--enable_fsdp"],
     "refused: 8-bit quantization cannot be sharded by FSDP"),
    (["train.fp16=true", "train.bf16=true"], "train.fp16 and train.bf16 are both set"),
    (["fsdp.cpu_offload=true"], "refused: fsdp.cpu_offload needs FSDP"),
    (["train.per_device_train_batch_size=0"], "train.per_device_train_batch_size must be positive, got 0"),
    (["train.learning_rate=-1"], "train.learning_rate must be positive, got -1.0"),
    (["data.max_length=0"], "data.max_length must be positive, got 0"),
    (["memory.log_every_steps=-1"], "memory.log_every_steps must be >= 0, got -1"),  # step % -1 is always 0
    (["--batch_size_training", "3", "--micro_batch_size", "2"],
     "batch_size_training=3 must be a positive multiple of micro_batch_size=2"),
    (["train.learning_rat=1"], "unknown key 'train.learning_rat'; did you mean train.learning_rate"),
    (["lora.rank=4"], "unknown key 'lora.rank'"),
    (["--use_pefft"], "did you mean use_peft"),
    (["train.fp16=maybe"], "train.fp16: expected true or false, got 'maybe'"),
    (["data.split_slice=abc"], "data.split_slice: expected '1%', '10' or '[:100]'"),
    (["--fsdp_config.optimizer", "Adagrad"], "unknown optimizer 'Adagrad'"),
    (["--peft_method", "prefix"], "only 'lora' is supported"),
    (["train.seed=-1"], "train.seed must be in [0, 2**32 - 1], got -1"),
    ([f"train.seed={2**32}"], "train.seed must be in [0, 2**32 - 1], got 4294967296"),
    (["train.lr_scheduler_type=cosine_warmup"], "train.lr_scheduler_type: unknown scheduler 'cosine_warmup'; did you "
                                                "mean cosine_warmup_with_min_lr"),
    (["train.optim=adamw_troch"], "train.optim: unknown optimizer 'adamw_troch'; did you mean adamw_torch"),
    (["model.attn_implementation=flash_attention"], "model.attn_implementation: unknown attention implementation "
                                                    "'flash_attention'; did you mean flash_attention_4"),
    (["train.report_to=[tensorbaord]"], "train.report_to: unknown integration 'tensorbaord'; did you mean tensorboard"),
    (["lora.bias=some"], "lora.bias must be none, all or lora_only"),
    (["lora.method=ia3"], "lora.method: only 'lora' is supported, got 'ia3'"),
    (["lora.target_modules=[]"], "lora.target_modules: name the modules to adapt"),
    (["train.dataloader_num_workers=100000"], "train.dataloader_num_workers must be at most 256, got 100000"),
    (["data.num_proc=0"], "data.num_proc must be null or 1 to 256, got 0"),
    ([f"train.max_steps={10**30}"], "train.max_steps is out of range: 1000000000000000000000000000000"),
    (["train.output_dir="], "train.output_dir is empty"),
    (["data.source=  "], "data.source is empty"),
    (["model.name=null"], "model.name: expected a string, got null"),
    (["train.output_dir=runs/a\x00b"], "train.output_dir: a path cannot hold a NUL character"),
    ([f"train.output_dir=runs/{'x' * 256}"], "train.output_dir: path too long"),
    ([f"model.name=/{'/'.join(['m' * 200] * 21)}"], "model.name: path too long"),
])
def test_refusals_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        build_recipe(None, overrides)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_full_4bit_recipe_refused_with_reason():
    with pytest.raises(ConfigError, match="No inf checks were recorded"):
        build_recipe(ROOT / "recipes" / "full_4bit.yaml")


FAST_PATH = {"lora_fast.yaml", "qlora_fast.yaml", "smollm2_gpu.yaml"}


@pytest.mark.parametrize("path", [p for p in RECIPES if p.name != "full_4bit.yaml"], ids=lambda p: p.name)
def test_every_recipe_loads(path):
    r = build_recipe(path)
    assert r.description
    if path.name not in FAST_PATH | {"demo_cpu.yaml"}:  # the original's samples per step and batching
        assert r.train.per_device_train_batch_size * r.train.gradient_accumulation_steps == 4
        assert not r.data.packing and r.data.max_tokens_per_batch is None
    elif path.name in FAST_PATH:  # one packed row of a fixed token budget per step
        assert r.data.packing and r.data.pad_to_multiple_of == r.data.max_tokens_per_batch
        assert r.model.attn_implementation == "flex_attention" and r.train.supervised_logits_only


def test_precision_means_what_the_original_meant():
    assert describe_precision(build_recipe(None, ["--use_fp16"])) == \
        "fp16 mixed precision: float32 weights, fp16 autocast, dynamic loss scaling"
    assert "sharded master weights" in describe_precision(build_recipe(None, ["--use_fp16", "--enable_fsdp"]))
    assert describe_precision(build_recipe()) == "fp32: float32 weights, gradients and optimizer states"
    assert describe_precision(build_recipe(None, ["--fsdp_config.pure_bf16"])).startswith("pure bfloat16 weights")


def test_yaml_errors_name_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  learning_rate: [1\n")
    with pytest.raises(ConfigError, match=rf"{p}:\d+: invalid YAML"):
        build_recipe(p)
    p.write_text("train:\n  learning_rat: 1\n")
    with pytest.raises(ConfigError, match=rf"{p}: unknown key 'train.learning_rat'"):
        build_recipe(p)
    with pytest.raises(ConfigError, match="recipe file not found"):
        build_recipe(tmp_path / "missing.yaml")


def test_cli_exit_codes_and_one_line_errors(capsys):
    assert cli.main(["train", "--dry-run", "quantization.bits=4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("samsum-tuner: error: refused: full fine-tuning") and err.count("\n") == 1
    assert "Traceback" not in err
    assert cli.main(["train", "--use_fp16", "train.bf16=true"]) == 2
    assert cli.main(["bogus"]) == 2


def test_fp16_without_cuda_is_refused_before_loading(capsys, tmp_path, tiny_data):
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    code = cli.main(["train", "--use_fp16", f"data.source={tiny_data}", f"train.output_dir={tmp_path / 'o'}",
                     "model.name=/does/not/exist"])
    assert code == 2
    assert "refused: train.fp16 (the original's --use_fp16) needs a CUDA GPU" in capsys.readouterr().err


def test_flex_attention_training_without_cuda_is_refused_before_loading(capsys, tmp_path, tiny_data):
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    code = cli.main(["train", str(ROOT / "recipes" / "lora_fast.yaml"), f"data.source={tiny_data}",
                     f"train.output_dir={tmp_path / 'o'}", "model.name=/does/not/exist"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "refused: model.attn_implementation=flex_attention trains on a CUDA GPU only" in err


def test_varlen_attention_is_refused_in_one_line_where_it_cannot_serve(capsys, tmp_path, tiny_data):
    """varlen_attn: packed rows only, no in-training generation (a KV cache): each one line, exit 2."""
    import torch

    base = ["train", str(ROOT / "recipes" / "lora_fast.yaml"), f"data.source={tiny_data}",
            f"train.output_dir={tmp_path / 'o'}", "model.name=/does/not/exist", "model.attn_implementation=varlen_attn"]
    cases = [(["data.packing=false", "data.max_tokens_per_batch=null", "data.pad_to_multiple_of=null"],
              "model.attn_implementation=varlen_attn attends within packed rows: set data.packing=true"),
             (["train.eval_rouge_rows=4"], "train.eval_rouge_rows generates with a KV cache, which varlen_attn")]
    if torch.cuda.is_available():  # FlashAttention's 16-bit inputs
        cases.append((["train.bf16=false", "model.dtype=null"], "computes in bf16 or fp16"))
    for extra, message in cases:
        code = cli.main(base + extra)
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err and message in err, (extra, err)


def test_one_process_over_several_gpus_is_refused_before_dataparallel_splits_the_batch(monkeypatch):
    """The Trainer's DataParallel would scatter a packed row's boundaries and the supervised positions along their
    first dimension. The GPU count is the only thing faked here: this machine has none."""
    import torch

    from samsum_tuner.checks import check_environment
    from samsum_tuner.launch import Launch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    one = Launch("python", 1, 0, 0, False, False)
    with pytest.raises(ConfigError, match="one process sees 2 GPUs.*torchrun --nproc_per_node 2"):
        check_environment(build_recipe(None, []), one)  # supervised_logits_only is on by default
    padded_full_logits = build_recipe(None, ["train.supervised_logits_only=false"])
    check_environment(padded_full_logits, one)  # plain padded batches: DataParallel splits them by rows, correctly
    check_environment(build_recipe(None, []), Launch("torchrun", 2, 0, 0, False, False))


def test_liger_kernels_without_liger_kernel_installed_are_one_line(capsys, tmp_path, tiny_data):
    from samsum_tuner.checks import _liger_available

    if _liger_available():
        pytest.skip("needs a machine without liger-kernel (a CPU-only torch has no Triton for it)")
    code = cli.main(["train", str(ROOT / "recipes" / "demo_cpu.yaml"), f"data.source={tiny_data}",
                     f"train.output_dir={tmp_path / 'o'}", "train.use_liger_kernel=true"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "refused: train.use_liger_kernel needs liger-kernel (pip install liger-kernel)" in err
    assert not (tmp_path / "o").exists()


def test_fast_path_packs_the_step_and_keeps_a_token_budget():
    # sdpa on every device: its packed rows change length every step, which flex_attention would recompile for.
    r = build_recipe(ROOT / "recipes" / "full_sgd.yaml", ["fast_path=true"])
    assert (r.data.packing, r.model.attn_implementation) == (True, "sdpa")
    assert (r.train.per_device_train_batch_size, r.train.gradient_accumulation_steps) == (4, 1)
    # a recipe that already batches by tokens keeps its budget and accumulation
    r = build_recipe(ROOT / "recipes" / "full_sgd.yaml", ["data.max_tokens_per_batch=2048", "fast_path=true"])
    assert (r.data.max_tokens_per_batch, r.train.gradient_accumulation_steps) == (2048, 4)

    # What the command line names is kept, before or after fast_path (which reads the final batch); a recipe file's
    # attention is not (lora_fast.yaml names flex_attention)
    for overrides in (["fast_path=true", "model.attn_implementation=eager"], ["--attn_implementation", "eager",
                                                                              "fast_path=true"]):
        assert build_recipe(ROOT / "recipes" / "full_sgd.yaml", overrides).model.attn_implementation == "eager"
    assert build_recipe(ROOT / "recipes" / "lora_fast.yaml", ["fast_path=true"]).model.attn_implementation == "sdpa"
    with pytest.raises(ConfigError, match=r"^fast_path=true packs .* data.packing=false contradicts it"):
        build_recipe(ROOT / "recipes" / "full_sgd.yaml", ["fast_path=true", "data.packing=false"])


def test_missing_model_path_refused(capsys, tmp_path, tiny_data):
    code = cli.main(["train", f"data.source={tiny_data}", f"train.output_dir={tmp_path / 'o'}",
                     "model.name=/does/not/exist"])
    assert code == 2
    assert "model.name: local model folder /does/not/exist does not exist" in capsys.readouterr().err


def test_recipe_dataclass_roundtrip(tmp_path):
    r = build_recipe(ROOT / "recipes" / "full_sgd.yaml")
    p = tmp_path / "again.yaml"
    p.write_text(r.to_yaml())
    assert build_recipe(p) == r
    assert isinstance(r, Recipe)


def _bomb(width: int = 9, depth: int = 9) -> str:
    """Nested YAML aliases ("billion laughs"): a few hundred bytes that stand for width**depth values."""
    lines = ["description:", f"  - &a0 [{', '.join(['lol'] * width)}]"]
    lines += [f"  - &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, depth)]
    return "\n".join(lines) + "\n"


def test_yaml_aliases_that_expand_past_any_recipe_are_refused_in_well_under_a_second(tmp_path, capsys):
    import time

    p = tmp_path / "laughs.yaml"
    p.write_text(_bomb())  # 9**9 = 387 million strings once expanded
    start = time.perf_counter()
    assert cli.main(["train", str(p), "--dry-run"]) == 2
    assert time.perf_counter() - start < 2
    err = capsys.readouterr().err
    assert err == (f"samsum-tuner: error: {p}: refused: its YAML aliases expand to more than 100,000 values "
                   "(a recipe has a few dozen)\n")
    p.write_text("train: &t\n  seed: 5\n  nested: *t\n")  # an alias inside the node it names (line 1: the anchor)
    with pytest.raises(ConfigError, match=rf"^{p}:1: invalid YAML: an alias refers to the node that holds it$"):
        build_recipe(p)
    with pytest.raises(ConfigError, match="aliases expand to more than"):
        build_recipe(None, ["description=[&a [x, x, x, x, x, x, x, x, x, x], " + ", ".join(
            f"&{c} [{', '.join([f'*{b}'] * 10)}]" for b, c in zip("abcde", "bcdef")) + "]"])
    p.write_text("train:\n  seed: &s 7\n  logging_steps: *s\n")  # aliases as recipes may use them still work
    r = build_recipe(p)
    assert (r.train.seed, r.train.logging_steps) == (7, 7)
    assert max(len(path.read_text()) for path in RECIPES) < 2000  # the committed recipes: far below the bound


def test_yaml_values_python_cannot_hold_are_one_line(tmp_path):
    p = tmp_path / "r.yaml"
    for body, message in [("train:\n  seed: " + "9" * 5000 + "\n", "invalid YAML: Exceeds the limit"),
                          ("description: " + "[" * 5000 + "]" * 5000 + "\n", "invalid YAML: nested too deeply"),
                          ("train:\n  learning_rate: 1" + "0" * 400 + "\n", "train.learning_rate: expected a number")]:
        p.write_text(body)
        with pytest.raises(ConfigError, match=f"^{p}: .*{message}") as e:
            build_recipe(p)
        assert "\n" not in str(e.value) and len(str(e.value)) < 400
    with pytest.raises(ConfigError, match="cannot read the recipe .File name too long."):
        build_recipe(tmp_path / ("r" * 300 + ".yaml"))


def test_the_output_folder_is_checked_where_it_will_go(tmp_path, monkeypatch):
    from samsum_tuner.checks import check_output_location

    check_output_location(str(tmp_path / "new" / "run"))  # creatable: nothing left behind
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=rf"^train.output_dir: {tmp_path / 'file'} is a file, not a folder$"):
        check_output_location(str(tmp_path / "file" / "run"))
    # /proc and /sys refuse new folders to root as well, where permission bits would not stop root
    with pytest.raises(ConfigError, match=r"^train.output_dir: cannot create /proc/samsum-run/x \(/proc: "):
        check_output_location("/proc/samsum-run/x")
    with pytest.raises(ConfigError, match=r"^train.output_dir: cannot create /sys/samsum-run \(/sys: "):
        check_output_location("/sys/samsum-run")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    import os

    if os.geteuid() != 0:  # for everyone but root, permission bits are the read-only case
        with pytest.raises(ConfigError, match="cannot create .*Permission denied"):
            check_output_location(str(locked / "run"))


def test_train_is_training_arguments_and_takes_every_field_and_trls_flat_flags():
    from transformers import TrainingArguments

    r = build_recipe(None, ["--model_name_or_path", "/tmp/m", "--learning_rate", "3e-4", "--adam_beta2", "0.98",
                            "--per_device_train_batch_size", "2", "train.lr_scheduler_kwargs={'num_cycles': 2}",
                            "--lora_alpha", "16", "--lora_r", "4", "--load_in_4bit", "--use_peft",
                            "--bnb_4bit_quant_type", "fp4", "--gradient_checkpointing", "--dataset_name", "/tmp/d"])
    assert isinstance(r.train, TrainingArguments)
    assert r.model.name == "/tmp/m" and r.train.learning_rate == 3e-4 and r.train.adam_beta2 == 0.98
    assert r.train.per_device_train_batch_size == 2 and r.train.lr_scheduler_kwargs == {"num_cycles": 2}
    assert (r.lora.alpha, r.lora.r, r.quantization.bits, r.quantization.quant_type) == (16, 4, 4, "fp4")
    assert r.model.gradient_checkpointing is True and r.data.source == "/tmp/d"
    assert "adam_beta2" in r.to_dict()["train"] and "adam_beta1" not in r.to_dict()["train"]  # set, or ours only


@pytest.mark.parametrize("override, message", [
    ("train.fsdp=full_shard", "train.fsdp is decided by fsdp.enabled"),
    ("train.use_cpu=true", "train.use_cpu is decided by the machine"),
    ("train.gradient_checkpointing=true", "train.gradient_checkpointing is decided by model.gradient_checkpointing"),
    ("train.optim_args=momentum=0.5", "SGD's momentum is train.momentum"),
    ("train.logging_strategy=sometimes", "train.logging_strategy: unknown choice 'sometimes'"),
    ("train.hub_strategy=every_svae", "did you mean every_save?"),
])
def test_training_arguments_decided_elsewhere_or_invalid_are_refused_in_one_line(override, message):
    extra = ["train.optim=sgd"] if "momentum" in override else []
    with pytest.raises(ConfigError, match=message.replace("?", r"\?").replace("(", r"\(")):
        build_recipe(None, [override, *extra])


def test_training_arguments_refusals_at_completion_are_one_line(tmp_path):
    from samsum_tuner.launch import Launch
    from samsum_tuner.resolve import training_arguments

    r = build_recipe(None, [f"train.output_dir={tmp_path}", "train.load_best_model_at_end=true",
                            "train.eval_strategy=steps", "train.eval_steps=3", "train.save_strategy=epoch"])
    with pytest.raises(ConfigError, match=r"^train: .*load_best_model_at_end") as e:
        training_arguments(r, Launch("python", 1, 0, 0, False, False), ["LlamaDecoderLayer"], has_eval=True)
    # transformers' message, every line of it (the strategies it found were cut off), on one line
    assert "\n" not in str(e.value) and str(e.value).endswith("Save strategy: SaveStrategy.EPOCH")


def test_a_dry_run_refuses_what_the_run_would_refuse(tiny_model_dir, tiny_data, tmp_path, capsys):
    """TrainingArguments' own checks run in a dry run too (a real run meets them before loading the model)."""
    from samsum_tuner import cli

    code = cli.main(["train", f"model.name={tiny_model_dir}", f"data.source={tiny_data}", "--dry-run",
                     f"train.output_dir={tmp_path / 'run'}", "train.load_best_model_at_end=true",
                     "train.eval_strategy=steps", "train.eval_steps=2", "train.save_strategy=no",
                     "memory.preflight=false"])
    last = capsys.readouterr().err.splitlines()[-1]  # after the tokenizing progress bars
    assert code == 2 and last.startswith("samsum-tuner: error: train: --load_best_model_at_end requires"), last


def test_training_arguments_unions_with_a_literal_take_a_value_as_it_is():
    """TrainingArguments' `str | None | Literal[False]` (trackio_static_space_id): a text stays text, false stays
    False, and nothing reaches isinstance() with a Literal (a TypeError traceback before)."""
    assert build_recipe(None, ["train.trackio_static_space_id=abc"]).train.trackio_static_space_id == "abc"
    assert build_recipe(None, ["train.trackio_static_space_id=false"]).train.trackio_static_space_id is False


def test_the_saved_train_section_holds_ours_and_what_was_set():
    """recipe.yaml's train: our keys, and a TrainingArguments field only when set away from its default (fields
    whose default is a factory included)."""
    train = build_recipe(None, ["train.adam_beta2=0.98"]).to_dict()["train"]
    assert train["adam_beta2"] == 0.98 and "include_for_metrics" not in train and "adam_beta1" not in train
    assert {"gamma", "momentum", "learning_rate", "report_to"} <= set(train)


def _one_line_refusal(capsys, argv: list[str], message: str) -> None:
    """cli.main refuses argv with exit 2 and the one line `samsum-tuner: error: MESSAGE` (a prefix of it)."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"samsum-tuner: error: {message}"), err


def test_duplicate_keys_in_a_recipe_are_refused_naming_file_and_line(tmp_path, capsys):
    """PyYAML keeps the last of two equal keys: a repeated section silently dropped the first one."""
    p = tmp_path / "dup.yaml"
    p.write_text('model:\n  name: smollm2-135m\ndata:\n  split_slice: "8"\nmodel:\n  dtype: bfloat16\n')
    _one_line_refusal(capsys, ["train", str(p), "--dry-run"], f"{p}:5: duplicate key 'model' (first at line 1)")
    for body, line, key in [("train:\n  seed: 1\n  logging_steps: 2\n  seed: 3\n", 4, "seed"),
                            ("train: {seed: 1, seed: 2}\n", 1, "seed")]:
        p.write_text(body)
        with pytest.raises(ConfigError, match=rf"^{p}:{line}: duplicate key '{key}'"):
            build_recipe(p)
    with pytest.raises(ConfigError, match=r"^override lora.target_modules:1: duplicate key 'a'"):
        build_recipe(None, ["lora.target_modules={a: 1, a: 2}"])
    p.write_text("train:\n  <<: {seed: 5, logging_steps: 3}\n  seed: 7\n")  # a merge key, overridden: no duplicate
    r = build_recipe(p)
    assert (r.train.seed, r.train.logging_steps) == (7, 3)


@pytest.mark.parametrize("name", ["a/b/c", "☃", "bad-"])
def test_a_model_name_neither_a_folder_nor_a_hub_id_is_one_line(name, capsys):
    """huggingface_hub's HFValidationError escaped as a traceback from every command that looks a hub id up."""
    message = f"model.name: {name!r} is neither a local folder nor a valid hub id"
    _one_line_refusal(capsys, ["train", f"model.name={name}", "--dry-run"], message)
    _one_line_refusal(capsys, ["plan", f"model.name={name}"], message)
    _one_line_refusal(capsys, ["plan", f"model.name={name}", "--lengths", "default"], message)  # no data read
    _one_line_refusal(capsys, ["eval", name], message)


def test_a_hub_id_that_cannot_be_one_is_one_line_for_merge_and_data(lora_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    recipe = run / "recipe.yaml"
    recipe.write_text(recipe.read_text().replace(f"name: {lora_run.parent / 'base'}", "name: a/b/c"))
    _one_line_refusal(capsys, ["merge", str(run), str(tmp_path / "out")],
                      f"{recipe}: model.name: 'a/b/c' is neither a local folder nor a valid hub id")
    _one_line_refusal(capsys, ["plan", "model.name=random:llama2-7b", "data.source=☃"],
                      "data.source: '☃' is neither a local folder nor a valid hub id")


@pytest.mark.parametrize("env, name", [({"WORLD_SIZE": "abc"}, "WORLD_SIZE"), ({"RANK": "x"}, "RANK"),
                                       ({"LOCAL_RANK": "abc"}, "LOCAL_RANK"), ({"WORLD_SIZE": "0"}, "WORLD_SIZE"),
                                       ({"ACCELERATE_USE_FSDP": "1", "FSDP_VERSION": "x"}, "FSDP_VERSION")])
def test_launch_variables_that_are_not_ranks_are_one_line_from_every_process(env, name, monkeypatch, capsys):
    """int() raised a ValueError traceback; a broken LOCAL_RANK is said at once (no process is local rank 0)."""
    import time

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    start = time.perf_counter()
    _one_line_refusal(capsys, ["train", "--dry-run"], f"environment variable {name}={env[name]!r}: expected an "
                      "integer >=")
    assert time.perf_counter() - start < cli.SILENT_RANK_GRACE_S


def test_a_cache_that_cannot_be_a_folder_is_one_line(tiny_model_dir, tiny_data, tmp_path, monkeypatch, capsys):
    """SAMSUM_TUNER_CACHE at a file: FileExistsError converting SmolLM2, NotADirectoryError tokenizing."""
    from samsum_tuner.hub import cache_dir

    a_file = tmp_path / "file"
    a_file.write_text("x")
    monkeypatch.setenv("SAMSUM_TUNER_CACHE", str(a_file))
    message = f"SAMSUM_TUNER_CACHE: {a_file} is a file, not a folder"
    _one_line_refusal(capsys, ["plan", "model.name=random:llama2-7b", f"data.source={tiny_data}", "--cpu"], message)
    _one_line_refusal(capsys, ["train", f"model.name={tiny_model_dir}", f"data.source={tiny_data}", "--dry-run",
                               "memory.preflight=false"], message)
    monkeypatch.setenv("SAMSUM_TUNER_CACHE", str(a_file / "sub"))
    with pytest.raises(ConfigError, match=rf"^SAMSUM_TUNER_CACHE: {a_file / 'sub'} cannot be created \(Not a dir"):
        cache_dir()
    monkeypatch.setenv("SAMSUM_TUNER_CACHE", str(tmp_path / "new" / "cache"))
    assert cache_dir().is_dir()


def test_help_help_and_help_with_extra_arguments(capsys):
    assert cli.main(["help", "help"]) == 0
    assert capsys.readouterr().out.startswith("usage: samsum-tuner help [COMMAND]\n")
    assert cli.main(["help", "train", "extra"]) == 2
    assert capsys.readouterr().err == ("samsum-tuner: error: help: unexpected argument 'extra'; samsum-tuner help "
                                       "COMMAND takes one command\n")
