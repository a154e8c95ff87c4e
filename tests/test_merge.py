"""`samsum-tuner merge`: the merged folder evaluates like its adapter; bad runs and outputs are refused in one line."""
from __future__ import annotations

import json
import shutil

import pytest

from samsum_tuner import cli
from samsum_tuner.recipe import build_recipe

from .damage import assert_refused, base, cut, edit, files_of, nothing, other_base, remove, write

EVAL = ["--limit", "4", "--max-new-tokens", "8", "--batch-size", "2"]


@pytest.fixture(scope="module")
def merged(lora_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("merge") / "merged"
    assert cli.main(["merge", str(lora_run), str(out)]) == 0
    return out


def _eval(capsys, folder, out, data) -> tuple[str, list[dict]]:
    capsys.readouterr()
    # data.source given: a folder without the run's recipe would still read the run's data, and differ by prompt only
    assert cli.main(["eval", str(folder), *EVAL, "--out", str(out), f"data.source={data}"]) == 0
    printed = capsys.readouterr().out
    return printed, [json.loads(x) for x in (out / "predictions_test.jsonl").read_text().splitlines()]


def test_merge_into_the_working_directory_itself(lora_run, tmp_path, monkeypatch):
    """`merge RUN .` into an empty working directory: `.` has no name to stage the merge beside (a ValueError
    traceback after the whole merge, before)."""
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert cli.main(["merge", str(lora_run), "."]) == 0
    assert (here / "config.json").is_file() and (here / "model.safetensors").is_file()


def test_merged_folder_evaluates_like_its_adapter(lora_run, merged, tmp_path, capsys):
    data = lora_run.parent / "samsum"
    printed_run, from_adapter = _eval(capsys, lora_run, tmp_path / "adapter", data)
    printed_merged, from_merged = _eval(capsys, merged, tmp_path / "merged", data)
    assert [p["prediction"] for p in from_merged] == [p["prediction"] for p in from_adapter]
    assert [p["new_tokens"] for p in from_merged] == [p["new_tokens"] for p in from_adapter]
    template = repr(build_recipe().data.prompt_template)
    assert f"samsum_tuner: prompt: chat template around {template} (from {merged / 'recipe.yaml'})" in printed_merged
    assert f"(from {lora_run / 'recipe.yaml'})" in printed_run
    metrics = json.loads((tmp_path / "merged" / "eval_metrics_test.json").read_text())
    assert metrics["chat_template"] is True and metrics["prompt_from"] == f"from {merged / 'recipe.yaml'}"


def test_merged_folder_carries_the_training_tokenizer_and_recipe(lora_run, merged):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_tok, merged_tok = AutoTokenizer.from_pretrained(lora_run), AutoTokenizer.from_pretrained(merged)
    assert (merged_tok.eos_token_id, merged_tok.pad_token_id) == (run_tok.eos_token_id, run_tok.pad_token_id)
    assert merged_tok.chat_template == run_tok.chat_template
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert model.generation_config.eos_token_id == run_tok.eos_token_id  # a plain generate() stops there too
    assert not any("lora" in n for n, _ in model.named_parameters())
    run_recipe, merged_recipe = build_recipe(lora_run / "recipe.yaml"), build_recipe(merged / "recipe.yaml")
    assert merged_recipe.data == run_recipe.data and merged_recipe.model.name == run_recipe.model.name
    assert not merged_recipe.lora.enabled and merged_recipe.quantization.bits is None
    assert json.loads((merged / "merged_from.json").read_text())["run_dir"] == str(lora_run.resolve())


def test_overwrite_replaces_an_earlier_merge_only_when_asked(lora_run, merged, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(merged, out)
    (out / "stale.txt").write_text("from the earlier merge")
    assert_refused(capsys, ["merge", lora_run, out], "exists and is not empty; choose another folder (--overwrite")
    assert (out / "stale.txt").is_file()
    assert cli.main(["merge", str(lora_run), str(out), "--overwrite"]) == 0
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no partial or replaced folder left behind


def _full_model_folder(run, tmp):
    (run / "adapter_config.json").unlink()
    (run / "config.json").write_text("{}")


def _folder_with_notes(run, tmp):
    (tmp / "o").mkdir()
    (tmp / "o" / "notes.txt").write_text("mine")


def _file(run, tmp):
    (tmp / "f").write_text("a file")


def _out(run, tmp):
    return [run, tmp / "out"]


# name: (setup(run, tmp), what the one line says, the arguments after `merge` (default: RUN TMP/out))
CASES = {
    "run-missing": (nothing, "no such run directory", lambda run, tmp: [tmp / "nope", tmp / "out"]),
    "run-is-a-file": (nothing, "recipe.yaml: is not a folder", lambda run, tmp: [run / "recipe.yaml", tmp / "out"]),
    "no-adapter-config": (remove("adapter_config.json"), "no adapter_config.json: not a LoRA run directory"),
    "full-model-folder": (_full_model_folder, "no adapter_config.json: a full fine-tune's folder"),
    "no-recipe": (remove("recipe.yaml"), "no recipe.yaml"),
    "adapter-config-truncated": (cut("adapter_config.json"), "adapter_config.json:"),
    "adapter-config-empty": (write("adapter_config.json", b""), "adapter_config.json: empty file"),
    "adapter-config-not-object": (write("adapter_config.json", b"[1]"), "adapter_config.json: expected an object"),
    "adapter-config-not-utf8": (write("adapter_config.json", b'{"r": "\xff"}'), "adapter_config.json: not UTF-8"),
    "adapter-weights-missing": (remove("adapter_model.safetensors"), "adapter_model.safetensors: missing"),
    "adapter-weights-truncated": (cut("adapter_model.safetensors"),
                                  "adapter_model.safetensors: not a complete safetensors file"),
    "adapter-weights-empty": (cut("adapter_model.safetensors", 0),
                              "adapter_model.safetensors: not a complete safetensors file"),
    "recipe-invalid-yaml": (write("recipe.yaml", b"model: [unclosed\n"), "recipe.yaml:2: invalid YAML"),
    "recipe-truncated": (cut("recipe.yaml", 0.03), "recipe.yaml"),
    "recipe-bad-value": (edit("learning_rate: 0.01", "learning_rate: -1"),
                         "recipe.yaml: train.learning_rate must be positive"),
    "recipe-unknown-key": (edit("learning_rate:", "learning_rat:"), "unknown key 'train.learning_rat'"),
    "recipe-not-utf8": (write("recipe.yaml", b"model:\n  name: \xff\n"), "recipe.yaml: not UTF-8 text"),
    "recipe-base-missing": (base(lambda tmp: tmp / "gone"), "recipe.yaml: model.name: local model folder"),
    "adapter-of-another-base": (base(other_base), "which does not fit model.layers.0.self_attn.q_proj"),
    "tokenizer-missing": (remove("tokenizer.json", "tokenizer_config.json"), "no tokenizer"),
    "tokenizer-truncated": (cut("tokenizer.json"), "tokenizer.json:"),
    "tokenizer-config-not-object": (write("tokenizer_config.json", b'"x"'), "tokenizer_config.json: expected an"),
    "out-is-a-file": (_file, "exists and is not a folder", lambda run, tmp: [run, tmp / "f"]),
    "out-under-a-file": (_file, "is a file, not a folder", lambda run, tmp: [run, tmp / "f" / "out"]),
    "out-not-empty": (_folder_with_notes, "exists and is not empty", lambda run, tmp: [run, tmp / "o"]),
    "out-not-a-merge-overwrite": (_folder_with_notes, "no merged_from.json",
                                  lambda run, tmp: [run, tmp / "o", "--overwrite"]),
    "out-is-the-run-overwrite": (nothing, "is the run directory itself", lambda run, tmp: [run, run, "--overwrite"]),
    "out-holds-the-run-overwrite": (nothing, "no merged_from.json",
                                    lambda run, tmp: [run, run.parent, "--overwrite"]),
    "out-unwritable": (nothing, "/proc/merged: cannot write in /proc", lambda run, tmp: [run, "/proc/merged"]),
    "out-missing": (nothing, "the following arguments are required: out", lambda run, tmp: [run]),
    "unknown-flag": (nothing, "unrecognized arguments: --force", lambda run, tmp: [run, tmp / "out", "--force"]),
}


@pytest.mark.parametrize("case", CASES)
def test_merge_refuses_bad_input_in_one_line(case, lora_run, tmp_path, capsys):
    setup, expected, args = (*CASES[case], _out)[:3]
    run = tmp_path / "runs" / "run"
    shutil.copytree(lora_run, run)
    setup(run, tmp_path)
    kept = files_of(tmp_path)
    assert_refused(capsys, ["merge", *args(run, tmp_path)], expected)
    assert not (tmp_path / "out").exists() and not list(tmp_path.rglob(".*partial*"))
    assert files_of(tmp_path) == kept  # nothing written or removed


def test_a_fresh_process_prints_only_the_one_line(lora_run, tmp_path):
    """The refusal that comes last, after transformers has built the base on the meta device: no library warning
    or progress bar before it (in-process tests would miss what a library prints only once per process)."""
    import subprocess
    import sys

    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    base(other_base)(run, tmp_path)
    done = subprocess.run([sys.executable, "-m", "samsum_tuner", "merge", str(run), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [f"samsum-tuner: error: {run / 'adapter_model.safetensors'}: "
                                        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight has shape "
                                        f"[8, 64], which does not fit model.layers.0.self_attn.q_proj of "
                                        f"{tmp_path / 'other'} (32 -> 32): an adapter of another model"]
