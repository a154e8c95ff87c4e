"""The command line as people meet it: the command list, each command's help, the recipe keys, plan's sizes and
plan without the hub."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

import pytest

from samsum_tuner import cli
from samsum_tuner.config import SECTIONS, Recipe
from samsum_tuner.recipe import ALIASES

from .conftest import ROOT, cli_in_fresh_processes


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    """cli.main in-process; argparse's own --help leaves through SystemExit(0)."""
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("argv", [["--help"], ["-h"], ["help"]])
def test_the_overview_lists_every_command_with_a_line(argv, capsys):
    code, out, err = _run(argv, capsys)
    assert code == 0 and err == ""
    listed = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert set(listed) == {*cli.COMMANDS, "help"}
    assert all(len(line.split()) > 3 for line in listed.values())  # a description, not just the name


def test_no_command_or_an_unknown_one_is_bad_input(capsys):
    code, out, err = _run([], capsys)
    assert code == 2 and "commands:" in err and out == ""
    for argv in (["trian"], ["help", "trian"]):  # also when help is asked for it (exit 0 and the overview before)
        code, out, err = _run(argv, capsys)
        assert code == 2 and out == ""
        assert err.strip() == ("samsum-tuner: error: unknown command 'trian' (did you mean train?); the commands: "
                               "train, plan, eval, merge, report, keys, help (samsum-tuner --help describes them)")


@pytest.mark.parametrize("argv, line", [
    # an option spelt with underscores, as the recipe's keys are, names the option rather than an unknown key
    (["train", "recipes/demo_cpu.yaml", "--dry_run"],
     "samsum-tuner train: unknown option '--dry_run'; did you mean --dry-run?"),
    (["plan", "--gpu_memory=32GB"],
     "samsum-tuner plan: unknown option '--gpu_memory=32GB'; did you mean --gpu-memory?"),
    # a recipe path without its extension reads as an override: say how a recipe is named
    (["train", "recipes/demo_cpu", "--dry-run"],
     "argument 'recipes/demo_cpu': expected key=value or --key value; "
     "a recipe file is named first and ends in .yaml (recipes/demo_cpu.yaml?)"),
])
def test_a_misspelt_option_or_recipe_path_gets_one_line_naming_the_fix(argv, line, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    code, out, err = _run(argv, capsys)
    assert (code, out) == (2, "") and err.strip().endswith(line), err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, shows", [
    (["train", "--help"], ["RECIPE.yaml", "OVERRIDE", "key.sub=value", "--use_peft", "--dry-run", "--force"]),
    (["help", "train"], ["RECIPE.yaml", "OVERRIDE", "key.sub=value"]),
    (["plan", "--help"], ["RECIPE.yaml", "OVERRIDE", "--gpus", "--gpu-memory", "32GB", "10^9", "--lengths"]),
    (["help", "plan"], ["RECIPE.yaml", "--host-memory"]),
    (["eval", "--help"], ["run_or_model", "--split"]),
    (["merge", "--help"], ["run_dir", "out"]),
    (["report", "--help"], ["run_dir"]),
    (["keys", "--help"], ["SECTION", "aliases"]),
])
def test_each_command_help_shows_its_arguments(argv, shows, capsys):
    code, out, err = _run(argv, capsys)
    assert code == 0 and err == "", err
    positional = out.split("positional arguments:")[1].split("options:")[0]
    assert [s for s in shows if s not in out] == []
    assert positional.strip(), out
    assert f"usage: samsum-tuner {argv[-1] if argv[0] == 'help' else argv[0]}" in out


def test_python_m_train_help_shows_the_recipe_and_overrides():
    p = subprocess.run([sys.executable, "-m", "samsum_tuner.train", "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0 and p.stderr == ""
    assert "[RECIPE.yaml] [OVERRIDE ...]" in p.stdout and "key.sub=value" in p.stdout


def test_keys_lists_every_field_with_its_default_and_help(capsys):
    code, out, err = _run(["keys"], capsys)
    assert code == 0 and err == ""
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    recipe = Recipe()
    for section in SECTIONS:
        for f in [f for f in dataclasses.fields(getattr(recipe, section)) if f.init]:
            key, default = f"{section}.{f.name}", cli._shown_default(getattr(getattr(recipe, section), f.name))
            assert f.metadata.get("help"), f"{key} has no help"
            assert key in lines, key
            rest = lines[key][len(key):].strip()
            help_line = cli.one_line(f.metadata["help"])
            assert rest.startswith(default) and rest[len(default):].strip() == help_line, lines[key]
    assert lines["train.learning_rate"].split()[1] == "0.0001"
    assert lines["lora.target_modules"].split()[1] == "q_proj,v_proj"
    assert lines["model.dtype"].split()[1] == "null"
    for alias, (target, _) in ALIASES.items():
        assert f"--{alias}" in lines
        if target and not target.startswith("_"):
            assert lines[f"--{alias}"].split()[1] == target


def test_keys_of_one_section_and_an_unknown_section(capsys):
    code, out, _ = _run(["keys", "lora"], capsys)
    assert code == 0
    fields = [f"lora.{f.name}" for f in dataclasses.fields(Recipe().lora)]
    assert [line.split()[0] for line in out.splitlines()] == fields
    code, out, _ = _run(["keys", "aliases"], capsys)
    assert code == 0 and "--use_peft" in out and not [line for line in out.splitlines() if line.startswith("lora.")]
    code, out, err = _run(["keys", "loar"], capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "invalid choice: 'loar'" in err


# ---------------------------------------------------------------- plan: sizes
@pytest.mark.parametrize("text, gib, note", [
    ("32GiB", 32.0, None), ("32G", 32.0, None), ("32", 32.0, None), ("63 GiB", 63.0, None), ("1TiB", 1024.0, None),
    ("512MiB", 0.5, None),
    ("32GB", 29.802322, "--gpu-memory 32GB read as 29.80 GiB (GB = 10^9 bytes; 32GiB would be 32 x 2^30)"),
    ("1TB", 931.322575, "--gpu-memory 1TB read as 931.32 GiB (TB = 10^12 bytes; 1TiB would be 1 x 2^40)"),
])
def test_size_units(text, gib, note):
    value, said = cli.parse_size_gib(text, "--gpu-memory")
    assert value == pytest.approx(gib) and said == note


def test_plan_says_how_it_read_gb_and_plans_for_it(capsys):
    code, out, err = _run(["plan", "--gpus", "4", "--gpu-memory", "32GB", "--host-memory", "63GiB",
                           "--lengths", "default"], capsys)
    assert code in (0, 3)
    assert err.strip() == ("samsum-tuner: note: --gpu-memory 32GB read as 29.80 GiB (GB = 10^9 bytes; 32GiB would "
                           "be 32 x 2^30)")
    assert "GPU peak per rank" in out and " of 29.80" in out and " of 63.00" in out


@pytest.mark.parametrize("flag", ["--gpu-memory", "--host-memory"])
@pytest.mark.parametrize("size", ["nan", "inf", "-inf", "-1", "0", "1e400", "0GB", "32XB", "lots", ""])
def test_plan_refuses_a_size_that_is_no_size_in_one_line(flag, size, capsys):
    # --flag=-inf: argparse takes a lone -inf for an option (-1 it knows as a number)
    code, out, err = _run(["plan", f"{flag}={size}", "--lengths", "default"], capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"samsum-tuner: error: {flag}: expected a ")
    assert repr(size) in err


@pytest.mark.parametrize("gpus, says", [("0", "--gpus must be positive, got 0"), ("-1", "--gpus must be positive"),
                                        ("two", "invalid int value: 'two'"), ("2.5", "invalid int value: '2.5'")])
def test_plan_refuses_a_gpu_count_that_is_no_count_in_one_line(gpus, says, capsys):
    code, out, err = _run(["plan", "--gpus", gpus, "--lengths", "default"], capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and says in err


# ---------------------------------------------------------------- plan without the hub
README_PLAN = ["plan", "recipes/full_sgd.yaml", "--gpus", "4", "--gpu-memory", "32GiB", "--host-memory", "63GiB"]


def _offline_env(tmp_path, hub_offline: bool) -> dict[str, str]:
    """The hub unreachable on any machine (a closed local port), an empty hub cache, with or without the hub's
    own offline switch."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "SAMSUM_DATA_DIR")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_CACHE=str(tmp_path / "hub"),
               HF_DATASETS_CACHE=str(tmp_path / "datasets"), TOKENIZERS_PARALLELISM="false")
    if hub_offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


def _plan(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "samsum_tuner", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("hub_offline", [False, True], ids=["hub-unreachable", "HF_HUB_OFFLINE"])
@pytest.mark.parametrize("local_data", [True, False], ids=["SAMSUM_DATA_DIR", "hub-data"])
def test_readme_plan_without_the_hub_falls_back_to_built_in_lengths_at_once(hub_offline, local_data, tmp_path,
                                                                            tiny_data):
    env = _offline_env(tmp_path, hub_offline)
    if local_data:
        env["SAMSUM_DATA_DIR"] = str(tiny_data)
    p = _plan(README_PLAN, env)
    assert p.returncode in (0, 3), p.stderr[-3000:]
    assert "Retrying" not in p.stderr  # huggingface_hub's backoff: ~25 s per file
    notes = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(notes) == 1, p.stderr
    unreachable = "the tokenizer of meta-llama/Llama-2-7b-hf" + ("" if local_data else " or the data knkarthick/samsum")
    assert notes[0].startswith(f"samsum-tuner: note: cannot reach {unreachable} (")
    assert notes[0].endswith("; planning with the built-in SAMSum lengths (--lengths default)")
    assert ("offline mode" in notes[0]) == hub_offline
    assert "default SAMSum lengths" in p.stdout and p.stdout.strip().splitlines()[-1].startswith(("fits", "will not"))


@pytest.mark.parametrize("hub_offline", [False, True], ids=["hub-unreachable", "HF_HUB_OFFLINE"])
def test_plan_with_default_lengths_of_a_hub_model_needs_no_hub(hub_offline, tmp_path, tiny_data):
    """A plan is given for a hub model the planner knows by shape, and nothing retries the hub (without
    --lengths default, the test above)."""
    env = _offline_env(tmp_path, hub_offline)
    env["SAMSUM_DATA_DIR"] = str(tiny_data)
    p = _plan([*README_PLAN, "--lengths", "default"], env)
    assert p.returncode in (0, 3) and "Retrying" not in p.stderr and p.stderr == "", p.stderr[-3000:]
    assert p.stdout.strip().splitlines()[-1].startswith(("fits", "will not"))


@pytest.mark.parametrize("hub_offline", [False, True], ids=["hub-unreachable", "HF_HUB_OFFLINE"])
def test_train_of_an_unreachable_hub_model_is_refused_at_once_in_one_line(hub_offline, tmp_path, tiny_data):
    env = _offline_env(tmp_path, hub_offline)
    env["SAMSUM_DATA_DIR"] = str(tiny_data)
    p = _plan(["train", "recipes/lora_fp32.yaml", f"train.output_dir={tmp_path / 'run'}"], env)
    assert p.returncode == 2 and "Retrying" not in p.stderr, p.stderr[-3000:]
    assert [line for line in p.stderr.splitlines() if line.strip()] == [p.stderr.strip()]
    assert p.stderr.startswith("samsum-tuner: error: model.name: cannot reach 'meta-llama/Llama-2-7b-hf' (")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_plan_reads_a_cached_tokenizer_without_the_hub(tmp_path, tiny_data, tokenizer):
    """A tokenizer in the hub cache is read from there: no retries of the unreachable hub, the real lengths."""
    from .conftest import tiny_llama

    repo = tmp_path / "hub" / "models--meta-llama--Llama-2-7b-hf"
    snapshot = repo / "snapshots" / ("0" * 40)
    tokenizer.save_pretrained(snapshot)
    tiny_llama().config.save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    p = _plan([*README_PLAN, f"data.source={tiny_data}"], _offline_env(tmp_path, hub_offline=False))
    assert p.returncode in (0, 3), p.stderr[-3000:]
    assert "Retrying" not in p.stderr and "samsum-tuner: note" not in p.stderr, p.stderr[-3000:]
    assert "(40 real samples, longest" in p.stdout


def test_plan_with_a_missing_local_model_folder_is_still_bad_input(tmp_path, tiny_data, capsys):
    code, out, err = _run(["plan", f"model.name={tmp_path / 'nowhere'}", f"data.source={tiny_data}"], capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "model.name: local model folder" in err and "does not exist" in err


def test_keys_output_is_valid_for_overrides():
    """Every default as `keys` shows it is accepted back as an override and gives the same recipe."""
    recipe = Recipe()
    overrides = [f"{s}.{f.name}={cli._shown_default(getattr(getattr(recipe, s), f.name))}"
                 for s in SECTIONS for f in dataclasses.fields(getattr(recipe, s))]
    from samsum_tuner import load_recipe

    assert json.dumps(load_recipe(None, overrides).to_dict()) == json.dumps(recipe.to_dict())


def test_a_silent_rank_waits_for_rank_0_then_prints_its_refusal_itself(capsys, monkeypatch):
    # Under a launcher rank 0 speaks and the launcher then stops the others; a rank still alive after the grace
    # (rank 0 did not end the launch) says its refusal itself rather than exit with nothing printed.
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(cli, "SILENT_RANK_GRACE_S", 0.5)
    started = time.monotonic()
    code, out, err = _run(["train", "--lr", "-1"], capsys)
    assert time.monotonic() - started >= 0.5
    assert (code, out) == (2, "")
    assert err.strip() == "samsum-tuner: error: train.learning_rate must be positive, got -1.0"


@pytest.mark.parametrize("override,says", [
    ("train.optim_args=a=b=c", "train.optim with its settings"),
    ("train.adam_beta1=2", "Invalid beta parameter"),
    ("train.adam_epsilon=-1", "Invalid epsilon value"),
    ("train.optim=adamw_torch_xla", "torch_xla"),
    ("train.lr_scheduler_type=cosine_with_min_lr", "min_lr or min_lr_rate"),
    ('train.lr_scheduler_kwargs={"foo": 1}', "train.lr_scheduler_type with its settings"),
], ids=["optim_args", "beta", "eps", "optim_package", "scheduler_needs_kwargs", "scheduler_kwargs"])
def test_what_the_optimizer_or_schedule_refuses_is_one_line_before_the_model(override, says, tiny_model_dir,
                                                                             tiny_data, tmp_path, capsys):
    """The Trainer builds its optimizer and schedule after the model loads, and overwrite_output_dir has moved the
    previous run aside by then: each such value used to end in a traceback there, the old run set aside."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "adapter_model.safetensors").write_bytes(b"an earlier run")
    extra = ["train.lr_scheduler_type=cosine"] if "kwargs" in override else []
    code, _, err = _run(["train", f"model.name={tiny_model_dir}", f"data.source={tiny_data}", "--use_peft",
                         f"train.output_dir={out}", "train.overwrite_output_dir=true", "data.max_length=128",
                         *extra, override], capsys)
    lines = [x for x in err.splitlines() if x.startswith("samsum-tuner: error: ")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err and says in lines[0], err[-2000:]
    assert [p.name for p in out.iterdir()] == ["adapter_model.safetensors"]  # nothing moved aside


@pytest.mark.parametrize("override,says", [
    ("train.neftune_noise_alpha=-1", "train.neftune_noise_alpha must be positive"),
    ("train.eval_accumulation_steps=0", "train.eval_accumulation_steps must be positive"),
    ("train.dataloader_prefetch_factor=0", "train.dataloader_prefetch_factor must be positive"),
    ("train.label_names=[x]", "train.label_names: the batches carry their targets as ['labels']"),
    ("train.metric_for_best_model=nosuch", "no evaluation reports 'nosuch'"),
    ("train.metric_for_best_model=eval_rouge1", "(the ROUGE scores with train.eval_rouge_rows)"),
    ("train.metric_for_best_model=eval_ppl", "use eval_loss, or set train.greater_is_better=false"),
    ("train.deepspeed=ds.json", "train.deepspeed is decided by the fsdp section"),
    ("train.parallelism_config={a: 1}", "train.parallelism_config is decided by"),
])
def test_trainer_settings_that_fail_only_mid_run_are_refused_when_read(override, says):
    import samsum_tuner as st

    with pytest.raises(st.ConfigError) as e:
        st.load_recipe(None, [override])
    assert says in str(e.value)


def test_the_metrics_an_evaluation_reports_can_pick_the_best_checkpoint():
    import samsum_tuner as st

    for metric in ("loss", "eval_loss"):
        assert st.load_recipe(None, [f"train.metric_for_best_model={metric}"]).train.metric_for_best_model == metric
    st.load_recipe(None, ["train.metric_for_best_model=eval_ppl", "train.greater_is_better=false"])
    st.load_recipe(None, ["train.metric_for_best_model=eval_rouge1", "train.eval_rouge_rows=8"])


def test_push_to_hub_without_a_hub_is_one_line(tiny_model_dir, tiny_data, tmp_path):
    """HF_HUB_OFFLINE: refused before anything loads; a hub that does not answer (a closed local port standing in
    for it): the Trainer's repository creation fails, said in one line naming the setting."""
    args = ["train", f"model.name={tiny_model_dir}", f"data.source={tiny_data}", "--use_peft", "data.max_length=128",
            "train.max_steps=1", "train.push_to_hub=true"]
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_HUB_OFFLINE", "HF_ENDPOINT"))}
    for env, says in (({"HF_HUB_OFFLINE": "1"}, "train.push_to_hub pushes the run to the hub, and HF_HUB_OFFLINE"),
                      ({"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"},
                       "train.push_to_hub: cannot reach the hub")):
        out = tmp_path / env["HF_HUB_OFFLINE"]
        _, [(code, _, err)] = cli_in_fresh_processes([args + [f"train.output_dir={out}"]], env={**base, **env})
        lines = [x for x in err.splitlines() if x.startswith("samsum-tuner: error: ")]
        assert code == 2 and len(lines) == 1 and says in lines[0] and "Traceback" not in err, err[-2000:]
