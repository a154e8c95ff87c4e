"""Fast by default: the fast recipes compile where CUDA is available and run eager on a CPU (model.compile: auto),
torch.compile's caches persist under samsum_tuner's cache folder, and a run says how long it waited for its first
optimizer step."""
from __future__ import annotations

import json
import os

import pytest
import torch

import samsum_tuner as st
from samsum_tuner.recipe import build_recipe
from samsum_tuner.errors import ConfigError
from samsum_tuner.model import compiles, use_compile_cache

from .conftest import QUIET_RUN, ROOT

FAST_RECIPES = ["lora_fast.yaml", "qlora_fast.yaml", "smollm2_gpu.yaml"]


@pytest.mark.parametrize("value, expected", [("auto", "auto"), ("true", True), ("false", False), ("off", False)])
def test_model_compile_takes_true_false_or_auto(value, expected):
    assert build_recipe(None, [f"model.compile={value}"]).model.compile == expected


@pytest.mark.parametrize("value", ["maybe", "null", "2", '"true"'])
def test_any_other_model_compile_is_refused_in_one_line(value):
    with pytest.raises(ConfigError, match=r"^model.compile: expected true, false or auto, got "):
        build_recipe(None, [f"model.compile={value}"])


@pytest.mark.parametrize("overrides, message", [
    (["model.compile=true", "model.compile_mode=reduce-overhed"],
     "model.compile_mode: unknown mode 'reduce-overhed'; did you mean reduce-overhead?"),
    (["model.compile_mode=reduce-overhead"],
     "model.compile_mode applies to compiled layers: set model.compile=true or auto"),
    (["train.torch_compile=true"], "train.torch_compile is decided by model.compile (each decoder layer compiled "
                                   "in place); set it there"),
    (["train.torch_compile_mode=max-autotune"], "train.torch_compile_mode is decided by model.compile_mode; set it "
                                                "there")])
def test_compilation_is_decided_by_the_model_section_only(overrides, message):
    with pytest.raises(ConfigError) as e:
        build_recipe(None, overrides)
    assert str(e.value) == message


@pytest.mark.parametrize("overrides, message", [
    (["model.compile=true", "model.compile_scope=models"],
     "model.compile_scope: unknown scope 'models'; did you mean model?"),
    (["model.compile=auto", "model.compile_scope=model", "model.gradient_checkpointing=true"],
     "refused: model.compile_scope=model with gradient checkpointing (recomputing a layer inside a nested region): "
     "set model.compile_scope=layers"),
    (["model.compile=auto", "model.compile_scope=model", "train.eval_rouge_rows=8"],
     "refused: model.compile_scope=model with train.eval_rouge_rows (generation would compile the whole model again "
     "at every new width): set model.compile_scope=layers")])
def test_a_model_compiled_whole_is_refused_where_it_cannot_serve(overrides, message):
    with pytest.raises(ConfigError) as e:
        build_recipe(None, overrides)
    assert str(e.value) == message


def test_turning_compilation_off_needs_no_change_of_scope():
    off = ["model.compile=false", "model.gradient_checkpointing=true", "train.eval_rouge_rows=4"]
    r = build_recipe(ROOT / "recipes" / "smollm2_gpu.yaml", off)
    assert r.model.compile_scope == "model" and r.model.compile is False


def test_a_model_compiled_whole_is_refused_under_fsdp_before_loading():
    from samsum_tuner.checks import check_environment
    from samsum_tuner.launch import Launch

    recipe = build_recipe(None, ["model.compile=auto", "model.compile_scope=model",
                                 "model.gradient_checkpointing=false"])
    with pytest.raises(ConfigError, match=r"^refused: model.compile_scope=model under FSDP, .* set "
                                          r"model.compile_scope=layers$"):
        check_environment(recipe, Launch("torchrun", 2, 0, 0, True, False))
    check_environment(recipe, Launch("python", 1, 0, 0, False, False))  # one process: allowed


def test_compile_mode_reaches_every_decoder_layer(monkeypatch):
    from samsum_tuner.model import compile_layers

    from .conftest import tiny_llama

    seen, real = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw) or real(fn, **kw))
    r = build_recipe(None, ["model.compile=true", "model.compile_mode=max-autotune-no-cudagraphs"])
    assert compile_layers(tiny_llama(vocab_size=256), ["LlamaDecoderLayer"], r.model.compile_mode) == 2
    assert seen == [{"mode": "max-autotune-no-cudagraphs"}] * 2


def test_the_fast_recipes_compile_on_cuda_and_the_cpu_demo_never():
    for name in FAST_RECIPES:
        recipe = build_recipe(ROOT / "recipes" / name)
        assert recipe.model.compile == "auto", name
        assert compiles(recipe.model) == torch.cuda.is_available(), name
    demo = build_recipe(ROOT / "recipes" / "demo_cpu.yaml")
    assert demo.model.compile is False and not compiles(demo.model)
    assert compiles(build_recipe(None, ["model.compile=true"]).model)  # an explicit true compiles anywhere


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto compiles where CUDA is available")
def test_auto_loads_an_eager_model_on_a_cpu(tiny_model_dir, capsys):
    from samsum_tuner.model import load_model
    from samsum_tuner.resolve import model_load

    model = load_model(model_load(build_recipe(None, [f"model.name={tiny_model_dir}", "model.compile=auto",
                                                      "--use_peft"])))
    assert not any(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())
    assert "compiled in place" not in capsys.readouterr().out


def test_compile_caches_go_under_the_cache_folder_unless_placed_already(monkeypatch, tmp_path):
    monkeypatch.setenv("SAMSUM_TUNER_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    use_compile_cache()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache" / "torch_compile")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    use_compile_cache()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")


def test_the_wait_for_the_first_optimizer_step_is_printed_and_kept(tiny_model_dir, tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    r = st.load_recipe(None, [f"model.name={tiny_model_dir}", f"data.source={tiny_data}", f"train.output_dir={out}",
                              "data.max_length=128", "--use_peft", "train.max_steps=3", "train.eval_on_start=true",
                              "train.gradient_accumulation_steps=1", *QUIET_RUN])
    metrics = st.train(r)
    lines = [x for x in capsys.readouterr().out.splitlines() if "first optimizer step" in x]
    assert len(lines) == 1  # once per run, not per step
    m = metrics
    assert lines[0] == (f"samsum_tuner: first optimizer step {m['first_step_after_launch_s']} s after launch (model "
                        f"load {m['model_load_s']} s, evaluation before training {m['before_first_step_s']} s, first "
                        f"step {m['first_step_s']} s, compilation included)")
    # Launch is the process's start: this test process began before the run, its load and its first step.
    assert m['first_step_after_launch_s'] >= m['model_load_s'] + m['before_first_step_s'] + m['first_step_s']
    # Tenths of a second: a tiny model's evaluation and step can round to 0.0 on an idle machine.
    assert m['before_first_step_s'] >= 0 and m['first_step_s'] >= 0 and m['model_load_s'] >= 0
    saved = json.loads((out / "metrics.json").read_text())
    assert {k: saved[k] for k in ("first_step_after_launch_s", "model_load_s", "first_step_s")} == \
        {k: m[k] for k in ("first_step_after_launch_s", "model_load_s", "first_step_s")}
