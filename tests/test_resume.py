"""Never lose a run: exact resume (in-process and after kill -9), atomic checkpoints, rotation, the run directory."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import samsum_tuner as st
from samsum_tuner import checkpoint as ck
from samsum_tuner import resume as rs
from samsum_tuner.rundir import check_output_dir, retire_after, retire_run

from .conftest import QUIET_RUN, ROOT, synthetic_rows, torchrun_two, varied_rows, write_jsonl, write_small_checkpoint

FAST = ["train.report_to=[]", "train.disable_tqdm=true", "train.logging_steps=1", "memory.preflight=false",
        "data.max_length=128", "train.eval_strategy=no", "train.per_device_train_batch_size=4",
        "train.gradient_accumulation_steps=1", "train.num_train_epochs=2", "train.save_strategy=steps",
        "train.save_steps=3", "train.save_total_limit=2", "train.lr_scheduler_type=linear", "data.eval_split=null"]
KINDS = {"lora": ["--use_peft", "train.learning_rate=1e-2"],
         "full": ["train.learning_rate=1e-3"],
         "qlora": ["--use_peft", "--quantization", "4bit", "train.learning_rate=1e-2"]}


def _overrides(model_dir, data_dir, out, *extra):
    return [f"model.name={model_dir}", f"data.source={data_dir}", f"train.output_dir={out}", *FAST, *extra]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    name = "adapter_model.safetensors" if (out / "adapter_model.safetensors").is_file() else "model.safetensors"
    return load_file(out / name)


def _losses(out: Path) -> list[tuple[int, float]]:
    state = json.loads((out / ck.STATE_FILE).read_text()) if (out / ck.STATE_FILE).is_file() else None
    if state is None:  # the final save has no trainer_state.json: the last checkpoint carries the whole curve
        state = json.loads((ck.latest_checkpoint(out) / ck.STATE_FILE).read_text())
    return [(h["step"], h["loss"]) for h in state["log_history"] if "loss" in h]


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture
def small_data(tmp_path) -> Path:
    """16 rows: batch 4 gives 4 steps an epoch, 8 in two epochs."""
    return write_jsonl(tmp_path / "small", "train", synthetic_rows(16)).parent


@pytest.mark.parametrize("kind", ["lora", pytest.param("full", marks=pytest.mark.slow),
                                  pytest.param("qlora", marks=pytest.mark.slow)])
def test_resume_equals_an_uninterrupted_run(kind, tiny_model_dir, small_data, tmp_path):
    """8 steps straight vs. resumed from checkpoint-3 (mid epoch 1): same weights and loss curve, bit for bit."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    r = st.load_recipe(None, _overrides(tiny_model_dir, small_data, straight, *KINDS[kind],
                                        "train.save_total_limit=10"))
    trainer = st.build_trainer(r)
    metrics = st.train(r, trainer=trainer)
    assert trainer.state.global_step == 8 and [p.name for p in ck.complete_checkpoints(straight)] == [
        "checkpoint-3", "checkpoint-6", "checkpoint-8"]
    # The interrupted run: the folder as it was at step 3 (the later checkpoints never happened).
    resumed.mkdir()
    import shutil

    shutil.copytree(straight / "checkpoint-3", resumed / "checkpoint-3")
    r2 = st.load_recipe(None, _overrides(tiny_model_dir, small_data, resumed, *KINDS[kind], "resume=auto"))
    t2 = st.build_trainer(r2)
    m2 = st.train(r2, trainer=t2)
    _assert_same_weights(_weights(straight), _weights(resumed))
    curve = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    assert [(h["step"], h["loss"]) for h in t2.state.log_history if "loss" in h] == curve
    assert m2["last_loss"] == metrics["last_loss"]


def test_the_best_checkpoint_is_named_where_it_is_published_kept_and_loaded_at_the_end(
        tiny_model_dir, tiny_data, tmp_path):
    """Checkpoints are written into staging and published as checkpoint-N: the Trainer's best_model_checkpoint
    named the staging folder (gone once published), so rotation could remove the best checkpoint, and
    load_best_model_at_end warned or raised. "Best" here is the highest eval loss: an early step of a run whose loss
    falls, so the best is not the last."""
    out = tmp_path / "run"
    r = st.load_recipe(None, [*_overrides(tiny_model_dir, tiny_data, out, "--use_peft", "train.learning_rate=1e-2"),
                              "data.eval_split=validation", "train.eval_strategy=steps", "train.eval_steps=1",
                              "train.save_steps=1", "train.save_total_limit=1", "train.max_steps=4",
                              "train.load_best_model_at_end=true", "train.metric_for_best_model=eval_loss",
                              "train.greater_is_better=true"])
    trainer = st.build_trainer(r)
    st.train(r, trainer=trainer)
    evals = {h["step"]: h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h}
    best_step = max(evals, key=evals.get)
    assert best_step < 4, evals
    best = out / f"checkpoint-{best_step}"
    assert trainer.state.best_model_checkpoint == str(best)
    # Rotation kept it beside the newest at every save; at the end the Trainer keeps the best alone (limit 1).
    assert [c.name for c in ck.complete_checkpoints(out)] == [best.name]
    assert json.loads((best / ck.STATE_FILE).read_text())["best_model_checkpoint"] == str(best)
    _assert_same_weights(_weights(best), _weights(out))  # the final save is the best checkpoint's adapter


# ---------------------------------------------------------------- token-budget batches on resume
# How batches form, for the resume tests: by token budget (packed or padded), or rows with the longest first.
BATCHING = {"packed": ["data.packing=true", "data.max_tokens_per_batch=256"],
            "padded": ["data.packing=false", "data.max_tokens_per_batch=256"],
            "longest_first": ["data.longest_first=true", "train.per_device_train_batch_size=2"]}


def _budget_run(model_dir, data_dir, out, batching: str, resume=None) -> list[list[list[int]]]:
    """Two epochs, a checkpoint every step; the input_ids this process trained on, step by step."""
    r = st.load_recipe(None, [f"model.name={model_dir}", f"data.source={data_dir}", f"train.output_dir={out}",
                              *BATCHING[batching], "data.max_length=128", "data.eval_split=null", "--use_peft",
                              "train.gradient_accumulation_steps=1", "train.num_train_epochs=2", *QUIET_RUN,
                              "train.save_strategy=steps", "train.save_steps=1", "train.save_total_limit=null",
                              *([f"train.resume_from_checkpoint={resume}"] if resume else [])])
    trainer = st.build_trainer(r)
    seen, step = [], trainer.training_step

    def recording(model, inputs, *args, **kwargs):
        seen.append(inputs["input_ids"].tolist())
        return step(model, inputs, *args, **kwargs)

    trainer.training_step = recording
    st.train(r, trainer=trainer)
    return seen


def budget_resumes(model_dir, data_dir, root: Path, batching: str) -> dict[str, list]:
    """The uninterrupted run's batches, and those of runs resumed from its checkpoints mid epoch 0 and mid epoch 1."""
    runs = {"straight": _budget_run(model_dir, data_dir, root / "straight", batching)}
    per_epoch = len(runs["straight"]) // 2
    for k in (per_epoch // 2, per_epoch + per_epoch // 2):
        runs[str(k)] = _budget_run(model_dir, data_dir, root / f"resumed-{k}", batching,
                                   resume=root / "straight" / f"checkpoint-{k}")
    return runs


def _assert_resumes_see_the_straight_batches(runs: dict[str, list]) -> None:
    straight = runs.pop("straight")
    per_epoch = len(straight) // 2
    # Each epoch visits the batches in its own order, or the test could not tell the epochs apart.
    assert per_epoch >= 3 and straight[per_epoch:] != straight[:per_epoch]
    assert sorted(map(int, runs)) == [per_epoch // 2, per_epoch + per_epoch // 2]
    for k, resumed in runs.items():
        assert resumed == straight[int(k):], f"resumed from checkpoint-{k} of {len(straight)} steps"


@pytest.mark.parametrize("batching", ["packed", "padded"])
def test_token_budget_resume_sees_the_uninterrupted_batches(batching, tiny_model_dir, tmp_path):
    """data.max_tokens_per_batch: a run resumed mid epoch 0 or mid epoch 1 trains on the uninterrupted run's
    batches, in its order (the resumed epoch must not replay epoch 0's order)."""
    write_jsonl(tmp_path / "d", "train", varied_rows(24))
    _assert_resumes_see_the_straight_batches(budget_resumes(tiny_model_dir, tmp_path / "d", tmp_path, batching))


# ---------------------------------------------------------------- kill -9
def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_", "SAMSUM_DATA_DIR"))}
    # Same threads in every run: a different reduction order would change the last bits.
    return {**env, "PYTHONPATH": f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _train_cmd(model_dir, data_dir, out, *extra) -> list[str]:
    return [sys.executable, "-m", "samsum_tuner.train",
            *_overrides(model_dir, data_dir, out, "--use_peft", "train.learning_rate=1e-2", "train.save_steps=2",
                        "train.num_train_epochs=3", *extra)]


@pytest.mark.slow
def test_kill_9_after_a_checkpoint_then_resume_auto_is_bit_exact(tiny_model_dir, tiny_data, tmp_path):
    """The training process is SIGKILLed at a random point after a random checkpoint (possibly mid-save);
    `resume=auto` picks the last complete checkpoint and ends with the uninterrupted run's weights and losses."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    p = subprocess.run(_train_cmd(tiny_model_dir, tiny_data, straight), env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]

    rng = random.Random(1234)
    wait_for = tmp_path / "killed" / f"checkpoint-{2 * rng.randint(2, 8)}"  # of 30 steps: the kill comes mid-run
    proc = subprocess.Popen(_train_cmd(tiny_model_dir, tiny_data, killed), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not wait_for.is_dir():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.002)
    time.sleep(rng.uniform(0.0, 0.3))
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "run_summary.json").exists()
    last = ck.latest_checkpoint(killed)
    assert last is not None and ck.step_of(last) >= ck.step_of(wait_for)

    # Resuming into the existing run directory is allowed because resume is asked for.
    p = subprocess.run(_train_cmd(tiny_model_dir, tiny_data, killed, "resume=auto"), env=_env(), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"resuming from {last}" in p.stdout
    _assert_same_weights(_weights(straight), _weights(killed))
    assert _losses(killed) == _losses(straight) and len(_losses(straight)) == 30
    done = [json.loads((d / "run_summary.json").read_text())["metrics"]["last_loss"] for d in (straight, killed)]
    assert done[0] == done[1]
    assert not (killed / ck.STAGING).exists()


# ---------------------------------------------------------------- atomic saves, rotation, the run directory
def _complete(run: Path, step: int) -> Path:
    with ck.atomic_checkpoint(run, step) as stage:
        write_small_checkpoint(stage, step)
    return run / f"checkpoint-{step}"


SAVER = """
import sys, time
from samsum_tuner.checkpoint import atomic_checkpoint
with atomic_checkpoint(sys.argv[1], 4) as stage:
    (stage / "trainer_state.json").write_text("{}")
    (stage / "adapter_model.safetensors").write_bytes(b"half")
    print("writing", flush=True)
    time.sleep(120)
"""


def test_a_save_killed_halfway_is_never_resumed_from(tmp_path):
    run = tmp_path / "run"
    good = _complete(run, 2)
    # What the stock Trainer leaves when killed while writing: checkpoint-6 without its state file.
    (run / "checkpoint-6").mkdir()
    (run / "checkpoint-6" / "adapter_model.safetensors").write_bytes(b"half")
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(run)], env=_env(), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (run / ck.STAGING / "checkpoint-4" / ck.STATE_FILE).is_file()  # the half save, out of sight
    assert not (run / "checkpoint-4").exists()
    from transformers.trainer_utils import get_last_checkpoint

    assert get_last_checkpoint(str(run)).endswith("checkpoint-6")  # what Trainer's own resume would pick
    assert ck.latest_checkpoint(run) == good == rs.resolve_resume("auto", run)
    with pytest.raises(st.ConfigError, match=r"checkpoint-6 is not a complete checkpoint .*the last complete one is "
                                             r".*checkpoint-2$"):
        rs.resolve_resume(str(run / "checkpoint-6"), run)
    with pytest.raises(st.ConfigError, match="does not exist"):
        rs.resolve_resume(str(run / "checkpoint-9"), run)
    assert _complete(run, 4).is_dir() and not (run / ck.STAGING).exists()  # the next save clears the debris
    assert ck.latest_checkpoint(run) == run / "checkpoint-4"


def test_rotation_never_deletes_the_only_good_checkpoint(tmp_path):
    from transformers.trainer_utils import rotate_checkpoints

    run = tmp_path / "run"
    for step in (2, 4, 6):
        _complete(run, step)
    (run / "checkpoint-8").mkdir()  # incomplete and newest
    assert [p.name for p in ck.rotate(run, keep=2)] == ["checkpoint-2"]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-4", "checkpoint-6", "checkpoint-8"]
    assert [p.name for p in ck.rotate(run, keep=1)] == ["checkpoint-4"]
    assert ck.latest_checkpoint(run) == run / "checkpoint-6" and (run / "checkpoint-8").is_dir()
    assert ck.rotate(run, keep=1) == [] and ck.rotate(run, keep=None) == []
    # transformers' own rotation keeps the newest folder, complete or not, and deletes the only good one.
    rotate_checkpoints(str(run), save_total_limit=1)
    assert not (run / "checkpoint-6").exists() and ck.latest_checkpoint(run) is None


def test_checking_another_tools_checkpoint_leaves_the_recipe_settings_as_they_were(tmp_path):
    """Another tool's checkpoint (no recipe.yaml) is compared by optimizer kind: that comparison wrote the kind into
    the caller's settings, and resume=auto's next checkpoint then met a placeholder (a TypeError traceback)."""
    settings = st.load_recipe(None, ["train.optim=adafactor"]).to_dict()
    before = json.dumps(settings)
    for step in (2, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
        rs.check_recipe(tmp_path / f"checkpoint-{step}", settings)
    assert json.dumps(settings) == before


def test_resuming_another_folders_checkpoint_never_writes_over_a_run(tmp_path):
    """resume=PATH of another folder into a folder that holds a run: refused, unless overwrite, which moves the
    whole old run aside (its own later checkpoints would otherwise have been rotated away by the new run)."""
    a, b = tmp_path / "a", tmp_path / "b"
    for step in (2, 4):
        _complete(a, step)
    (a / "adapter_model.safetensors").write_bytes(b"the old run's adapter")
    foreign = _complete(b, 6)
    with pytest.raises(st.ConfigError, match=r"already holds a run, and resuming .*another folder's checkpoint"):
        check_output_dir(a, overwrite=False, resume=str(foreign))
    assert sorted(x.name for x in a.iterdir()) == ["adapter_model.safetensors", "checkpoint-2", "checkpoint-4"]
    assert check_output_dir(tmp_path / "fresh", overwrite=False, resume=str(foreign)) == foreign  # an empty folder
    assert check_output_dir(a, overwrite=True, resume=str(foreign)) == foreign
    aside = retire_after(a, foreign)
    assert sorted(x.name for x in aside.iterdir()) == ["adapter_model.safetensors", "checkpoint-2", "checkpoint-4"]
    assert ck.latest_checkpoint(a) is None and (b / "checkpoint-6").is_dir()


def test_another_writers_checkpoint_with_state_of_the_wrong_shape_is_skipped_naming_why(tmp_path):
    """Valid JSON or a loadable pickle, but not what resume reads another writer's recipe from (an
    adapter_config.json that is no object, an optimizer state without param_groups): an AttributeError or KeyError
    traceback before; now the checkpoint is unusable, named, and resume=auto takes the one before it."""
    settings = st.load_recipe(None, []).to_dict()
    for step in (2, 4, 6):
        (_complete(tmp_path, step) / ck.MANIFEST).unlink()  # another writer's: no manifest, no recipe.yaml
    (tmp_path / "checkpoint-6" / "adapter_config.json").write_text("null")
    torch.save({"state": {}}, tmp_path / "checkpoint-4" / "optimizer.pt")
    not_an_object = "has an unreadable adapter_config.json (a JSON NoneType, not an object)"
    assert rs.unusable(tmp_path / "checkpoint-6") == not_an_object
    assert rs.unusable(tmp_path / "checkpoint-4") == "has an unreadable optimizer.pt (no list of param_groups)"
    notes: list[str] = []
    assert rs.resolve_resume("auto", tmp_path, settings, notes) == tmp_path / "checkpoint-2"
    assert len(notes) == 2 and "checkpoint-6: it has" in notes[0] and "checkpoint-4: it has" in notes[1], notes
    with pytest.raises(st.ConfigError, match="optimizer.pt .no list of param_groups"):
        rs.resolve_resume(str(tmp_path / "checkpoint-4"), tmp_path, settings)


# recipe.yaml of a checkpoint another writer left without a manifest: what the note says of it
DAMAGED_RECIPES = {"section-an-int": ("lora: 5\n", " ('lora' must be a mapping, got 5)"),
                   "section-a-list": ("lora: [x]\n", " ('lora' must be a mapping, got ['x'])"),
                   "int-too-long": (f"lora:\n  r: {'1' * 5000}\n", ": invalid YAML: Exceeds the limit (4300 digits)")}


@pytest.mark.parametrize("case", DAMAGED_RECIPES)
def test_a_checkpoint_with_a_damaged_recipe_is_skipped_naming_it(case, tmp_path):
    """A TypeError (`lora: 5`, `lora: [x]`) or ValueError (an integer too long for Python) traceback before; now
    resume=auto skips the checkpoint with a note naming recipe.yaml, and a path to it is refused so."""
    text, why = DAMAGED_RECIPES[case]
    settings = st.load_recipe(None, []).to_dict()
    for step in (2, 4):
        (_complete(tmp_path, step) / ck.MANIFEST).unlink()
    (tmp_path / "checkpoint-4" / ck.RECIPE_FILE).write_text(text)
    notes: list[str] = []
    assert rs.resolve_resume("auto", tmp_path, settings, notes) == tmp_path / "checkpoint-2"
    assert len(notes) == 1 and notes[0].startswith(f"skipping {tmp_path / 'checkpoint-4'}: it has an unreadable "
                                                   f"recipe.yaml{why}"), notes
    with pytest.raises(st.ConfigError, match=r"checkpoint-4 has an unreadable recipe.yaml"):
        rs.resolve_resume(str(tmp_path / "checkpoint-4"), tmp_path, settings)
    assert rs.saved_recipe(tmp_path / "checkpoint-4") is None  # what the trainer reads the schedule from


def test_a_divergence_record_naming_no_checkpoint_path_is_refused_naming_it(tmp_path):
    """run_summary.json of a diverged run whose last_good_checkpoint is no path: a TypeError traceback before."""
    _complete(tmp_path, 2)
    (tmp_path / ck.SUMMARY).write_text(json.dumps({"status": "diverged", "last_good_checkpoint": 5}))
    with pytest.raises(st.ConfigError, match=r"run_summary.json: 'last_good_checkpoint' must be a checkpoint path "
                                             r"or null, got 5"):
        rs.resolve_resume("auto", tmp_path)


# trainer_state.json: what transformers' resume would have met (a TypeError or KeyError inside it)
PARTIAL_STATES = {
    "no-batch-size": ({"global_step": 2, "log_history": []}, "'train_batch_size' must be a positive integer, got none"),
    "no-trainer-control": ({"global_step": 2, "train_batch_size": 4}, "'stateful_callbacks' has no TrainerControl"),
    "step-a-string": ({"global_step": "2", "train_batch_size": 4},
                      "'global_step' must be a non-negative integer, got '2'"),
    "unknown-key": ({"global_step": 2, "train_batch_size": 4, "steps": 2}, "an unknown key 'steps'"),
    "history-not-objects": ({"global_step": 2, "train_batch_size": 4, "log_history": [1],
                             "stateful_callbacks": {"TrainerControl": {}}}, "'log_history' must hold objects"),
}


@pytest.mark.parametrize("case", PARTIAL_STATES)
def test_a_checkpoint_whose_trainer_state_the_trainer_cannot_resume_is_skipped_naming_it(case, tmp_path):
    """A minimal trainer_state.json passed resume's checks, then transformers failed on it mid-resume
    (compare_trainer_and_checkpoint_args: None // int; the next save: KeyError 'TrainerControl')."""
    state, why = PARTIAL_STATES[case]
    for step in (2, 4):
        (_complete(tmp_path, step) / ck.MANIFEST).unlink()
    (tmp_path / "checkpoint-4" / ck.STATE_FILE).write_text(json.dumps(state))
    assert rs.unusable(tmp_path / "checkpoint-4") == f"has an unreadable trainer_state.json ({why})"
    assert rs.unusable(tmp_path / "checkpoint-2") is None  # the state as the Trainer writes it
    notes: list[str] = []
    assert rs.resolve_resume("auto", tmp_path, None, notes) == tmp_path / "checkpoint-2"
    assert len(notes) == 1 and "checkpoint-4: it has an unreadable trainer_state.json" in notes[0], notes


def test_run_directory_rules(tmp_path):
    run = tmp_path / "run"
    _complete(run, 3)
    with pytest.raises(st.ConfigError, match="already holds a run; .*overwrite_output_dir=true or resume=auto"):
        check_output_dir(run, overwrite=False, resume=None)
    assert check_output_dir(run, overwrite=False, resume="auto") == run / "checkpoint-3"  # resuming writes into it
    check_output_dir(run, overwrite=True, resume=None)
    with pytest.raises(st.ConfigError, match="is not a folder"):
        check_output_dir(run / "checkpoint-3" / ck.STATE_FILE, overwrite=True, resume=None)
    assert rs.resolve_resume("auto", tmp_path / "fresh") is None  # auto with nothing to resume: a fresh start
    (run / "memory.jsonl").write_text('{"event": "epoch"}\n')
    aside = retire_run(run)
    assert aside.parent == run / ".overwritten" and (aside / "checkpoint-3" / ck.STATE_FILE).is_file()
    assert (aside / "memory.jsonl").is_file() and not (run / "memory.jsonl").exists()  # a new run starts its own
    assert ck.latest_checkpoint(run) is None and retire_run(run) is None


# ---------------------------------------------------------------- two processes, FSDP2 over gloo
def _torchrun(*args) -> subprocess.CompletedProcess:
    return torchrun_two(ROOT / "tests" / "fsdp2_worker.py", *args, env=_env())


def _loss_by_step(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "losses.jsonl").read_text().splitlines())}


@pytest.mark.slow
def test_two_process_fsdp2_sharded_checkpoint_survives_kill_9(tiny_model_dir, tmp_path):
    """`fully_shard` over gloo on CPU: LoRA'd tiny Llama, sharded DCP checkpoints every 2 steps (atomic, keep 2);
    both ranks SIGKILLed after step 5; resume from checkpoint-4 ends with the uninterrupted run's weights."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    p = _torchrun(tiny_model_dir, straight, 7)
    assert p.returncode == 0, p.stderr[-3000:]
    p = _torchrun(tiny_model_dir, killed, 7, "--kill-after", 5)
    assert p.returncode != 0 and "SIGKILL" in p.stderr + p.stdout, p.stderr[-3000:]
    assert not (killed / "final.safetensors").exists()
    assert [c.name for c in ck.complete_checkpoints(killed)] == ["checkpoint-2", "checkpoint-4"]
    assert sorted(x.name for x in (killed / "checkpoint-4").iterdir()) == [
        ck.MANIFEST, "rng_state_0.pth", "rng_state_1.pth", "sharded", ck.STATE_FILE]
    p = _torchrun(tiny_model_dir, killed, 7, "--resume")
    assert p.returncode == 0, p.stderr[-3000:]
    _assert_same_weights(load_file(straight / "final.safetensors"), load_file(killed / "final.safetensors"))
    assert _loss_by_step(killed) == _loss_by_step(straight) and len(_loss_by_step(straight)) == 7
    assert [c.name for c in ck.complete_checkpoints(killed)] == ["checkpoint-4", "checkpoint-6"]


@pytest.mark.slow
def test_two_process_fsdp2_over_compiled_layers_trains_like_eager(tiny_model_dir, tmp_path):
    """model.compile compiles each decoder layer in place before fully_shard wraps it: FSDP2's per-layer hooks
    still run (each rank trains on its shard) and the losses are the eager run's."""
    runs = {}
    for flag in ((), ("--compile",)):
        run = tmp_path / ("compiled" if flag else "eager")
        p = _torchrun(tiny_model_dir, run, 3, "--dropout", 0, *flag)
        losses = (run / "losses.jsonl").read_text() if (run / "losses.jsonl").exists() else "no steps"
        assert p.returncode == 0, (flag, losses, p.stdout[-1000:], p.stderr[-3000:])  # where a rank stopped
        assert ("2 decoder layers compiled" in p.stdout) == bool(flag)
        runs[bool(flag)] = _loss_by_step(run)
    assert len(runs[True]) == 3 and runs[True] == pytest.approx(runs[False], rel=1e-4)


BUDGET_WORKER = """
import json, os, sys
from pathlib import Path
from tests.test_resume import budget_resumes

model_dir, data_dir, root = sys.argv[1:]
runs = {b: budget_resumes(model_dir, data_dir, Path(root) / b, b) for b in ("packed", "padded", "longest_first")}
Path(root, f"batches-{os.environ['RANK']}.json").write_text(json.dumps(runs))
"""


@pytest.mark.slow
def test_two_process_token_budget_resume_sees_the_uninterrupted_batches(tiny_model_dir, tmp_path):
    """The same under torchrun (2 ranks, DDP over gloo): each rank's resumed batches are its uninterrupted ones,
    also for data.longest_first batches of rows (LongestFirstSampler sits under a BatchSampler there)."""
    write_jsonl(tmp_path / "d", "train", varied_rows(48))
    (tmp_path / "worker.py").write_text(BUDGET_WORKER)
    p = torchrun_two(tmp_path / "worker.py", tiny_model_dir, tmp_path / "d", tmp_path / "runs", env=_env(), timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    ranks = [json.loads((tmp_path / "runs" / f"batches-{rank}.json").read_text()) for rank in (0, 1)]
    for batching in ("packed", "padded", "longest_first"):
        assert ranks[0][batching]["straight"] != ranks[1][batching]["straight"]  # each rank its own share
        for runs in ranks:
            _assert_resumes_see_the_straight_batches(runs[batching])


@pytest.mark.parametrize("optim", ["adamw", "sgd", "sgd_no_momentum"])
def test_fsdp_resume_primes_an_fp16_optimizer_before_the_sharded_state_loads(optim):
    """Distributed checkpointing steps an empty optimizer once to create its state; through accelerate's
    wrapper with an fp16 GradScaler that step is refused (seen on an H200: FSDP + fp16 could not resume)."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    from samsum_tuner.trainer import prime_optimizer_state

    def wrapped():
        layer = torch.nn.Linear(4, 4)
        inner = (torch.optim.AdamW(layer.parameters(), lr=1e-3) if optim == "adamw"
                 else torch.optim.SGD(layer.parameters(), lr=1e-3, momentum=0.0 if "no_momentum" in optim else 0.9))
        return layer, AcceleratedOptimizer(inner, device_placement=False, scaler=torch.amp.GradScaler("cpu"))

    Accelerator(cpu=True)  # the state the wrapper reads, as the Trainer's own Accelerator sets it
    _, unprimed = wrapped()
    with pytest.raises(AssertionError, match="_scale is None"):
        _init_optim_state(unprimed)
    layer, opt = wrapped()
    before = [p.detach().clone() for p in layer.parameters()]
    prime_optimizer_state(opt)
    _init_optim_state(opt)  # what load_fsdp_optimizer runs next: now a no-op
    if optim == "sgd_no_momentum":  # no state to create: zero gradients make DCP skip its init step
        assert len(opt.state) == 0 and all(torch.equal(p.grad, torch.zeros_like(p)) for p in layer.parameters())
    else:
        assert len(opt.state) == 2 and all(p.grad is None for p in layer.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, layer.parameters()))


def test_a_sharded_fsdp_lora_checkpoint_gets_its_adapter_config(tmp_path):
    """The Trainer's sharded FSDP checkpoint keeps the adapter's weights in its DCP folder and writes no
    adapter_config.json, which resume requires of a LoRA checkpoint: SamsumTrainer writes peft's config beside it."""
    from peft import LoraConfig, PeftConfig, get_peft_model

    from samsum_tuner.trainer import write_adapter_config

    from .conftest import tiny_llama

    ckpt = tmp_path / "checkpoint-2"
    for folder in ("pytorch_model_fsdp_0", "optimizer_0"):  # the layout of a sharded FSDP save
        (ckpt / folder).mkdir(parents=True)
    for name in ("scheduler.pt", "rng_state.pth"):
        torch.save({}, ckpt / name)
    (ckpt / ck.STATE_FILE).write_text(json.dumps({"global_step": 2, "train_batch_size": 4, "log_history": [],
                                                  "stateful_callbacks": {"TrainerControl": {}}}))
    assert rs.unusable(ckpt, lora=True) == "misses adapter_config.json"
    model = get_peft_model(tiny_llama(vocab_size=256), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    write_adapter_config(model, ckpt)
    assert rs.unusable(ckpt, lora=True) is None
    saved = PeftConfig.from_pretrained(str(ckpt))
    assert (saved.r, saved.lora_alpha, sorted(saved.target_modules)) == (4, 8, ["q_proj"])
    write_adapter_config(tiny_llama(vocab_size=256), tmp_path)  # not a PEFT model: nothing to write
    assert not (tmp_path / "adapter_config.json").exists()
