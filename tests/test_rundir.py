"""The run directory: one run at a time, never a run lost or mixed with another; checkpoints resume uses all of, or
none; what is given at resume takes effect; a full disk stops a save cleanly."""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import samsum_tuner as st
from samsum_tuner import checkpoint as ck
from samsum_tuner import resume as rs
from samsum_tuner import cli
from samsum_tuner.errors import DiskFull
from samsum_tuner.rundir import RunLock, check_output_dir, decided_by_main

from .conftest import ROOT, synthetic_rows, tiny_llama, write_jsonl

FAST = ["train.report_to=[]", "train.disable_tqdm=true", "train.logging_steps=1", "memory.preflight=false",
        "data.max_length=128", "train.eval_strategy=no", "data.eval_split=null", "train.per_device_train_batch_size=4",
        "train.gradient_accumulation_steps=1", "--use_peft", "train.learning_rate=1e-2"]


def _args(model_dir, data, out, *extra) -> list[str]:
    return [f"model.name={model_dir}", f"data.source={data}", f"train.output_dir={out}", *FAST, *extra]


def _train(model_dir, data, out, *extra) -> int:
    return cli.main(["train", *_args(model_dir, data, out, *extra)])


def _error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("samsum-tuner: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


@pytest.fixture
def no_model(monkeypatch):
    """Refusals come before any model (or tokenizer) loads."""
    import samsum_tuner.model
    import samsum_tuner.model_source

    def refuse(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(samsum_tuner.model, "load_model", refuse)
    monkeypatch.setattr(samsum_tuner.model_source, "load_tokenizer", refuse)


# ---------------------------------------------------------------- 1, 5: resume=auto and overwrite
@pytest.mark.slow
def test_resume_auto_refuses_a_finished_run_it_cannot_resume(tiny_model_dir, tiny_data, tmp_path, capsys):
    """A run saved without checkpoints (demo_cpu.yaml's save_strategy "no") is not started over by resume=auto:
    it says what the folder holds and leaves it as it was; with overwrite asked for, the old run moves aside."""
    out = tmp_path / "run"
    assert _train(tiny_model_dir, tiny_data, out, "train.max_steps=1", "train.save_strategy=no") == 0
    before = _snapshot(out)
    assert _train(tiny_model_dir, tiny_data, out, "train.max_steps=2", "train.save_strategy=no", "resume=auto") == 2
    err = _error(capsys)
    assert err.startswith(f"samsum-tuner: error: train.output_dir: resume=auto has nothing to resume in {out}: it "
                          "holds a finished run (README.md, adapter_config.json, adapter_model.safetensors, "), err
    assert err.endswith(") and no checkpoint resume can use; set train.overwrite_output_dir=true to start again (the "
                        f"old run moves to {out / '.overwritten'}/), or choose another folder"), err
    assert _snapshot(out) == before  # nothing written: no lock left behind, no file replaced

    assert _train(tiny_model_dir, tiny_data, out, "train.max_steps=2", "train.save_strategy=no", "resume=auto",
                  "train.overwrite_output_dir=true") == 0
    [aside] = (out / ".overwritten").iterdir()
    assert _snapshot(aside) == before
    assert json.loads((out / "run_summary.json").read_text())["step"] == 2


def test_every_overwrite_keeps_the_runs_before_it(tiny_model_dir, tiny_data, tmp_path):
    """Three runs into one folder with overwrite_output_dir: both earlier runs are kept, each whole, in its own
    folder under .overwritten/."""
    out = tmp_path / "run"
    adapters = []
    for seed in (1, 2, 3):
        assert _train(tiny_model_dir, tiny_data, out, "train.max_steps=1", "train.save_strategy=steps",
                      "train.save_steps=1", f"train.seed={seed}", "train.overwrite_output_dir=true") == 0
        adapters.append((out / "adapter_model.safetensors").read_bytes())
    assert len(set(adapters)) == 3
    asides = sorted((out / ".overwritten").iterdir())
    assert len(asides) == 2
    for aside, adapter in zip(asides, adapters):
        assert (aside / "adapter_model.safetensors").read_bytes() == adapter
        assert rs.unusable(aside / "checkpoint-1") is None and (aside / "run_summary.json").is_file()


@pytest.mark.parametrize("where", ["model", "data", "above the model"])
def test_overwrite_never_moves_the_runs_own_inputs_aside(where, tiny_model_dir, tiny_data, tmp_path, capsys,
                                                         no_model):
    """An output_dir that is the model's or the data's folder, or one above them: refused before anything moves
    (overwrite_output_dir once moved the model's config and weights aside and trained on)."""
    model, data = tmp_path / "inputs" / "model", tmp_path / "data"
    shutil.copytree(tiny_model_dir, model)
    shutil.copytree(tiny_data, data)
    out = {"model": model, "data": data, "above the model": model.parent}[where]
    before = _snapshot(tmp_path)
    assert _train(model, data, out, "train.overwrite_output_dir=true") == 2
    key = "data.source" if where == "data" else "model.name"
    assert f"the folder of {key}" in _error(capsys) and _snapshot(tmp_path) == before


# ---------------------------------------------------------------- 2: one run per run directory
def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_", "SAMSUM_DATA_DIR"))}
    return {**env, "PYTHONPATH": f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}", "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.mark.slow
def test_two_processes_racing_into_one_folder(tiny_model_dir, tiny_data, tmp_path):
    """Two real training processes started together into one folder: one trains, the other is refused (exit 2)
    naming it. Killed with SIGKILL, the winner leaves its lock behind; the next run takes it over with a note."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "samsum_tuner.train",
           *_args(tiny_model_dir, tiny_data, out, "train.max_steps=100000", "train.save_strategy=no",
                  "train.overwrite_output_dir=true")]
    procs = [subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        deadline = time.monotonic() + 300
        while all(p.poll() is None for p in procs):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        [loser] = [p for p in procs if p.poll() is not None]
        [winner] = [p for p in procs if p is not loser]
        stderr = loser.stderr.read()
        errors = [x for x in stderr.splitlines() if x.startswith("samsum-tuner: error: ")]
        assert loser.returncode == 2 and len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
        assert errors[0].startswith(f"samsum-tuner: error: train.output_dir: {out} is in use by another run (pid "
                                    f"{winner.pid} on {socket.gethostname()}, started "), errors
        assert "samsum_tuner/train.py model.name=" in errors[0]  # the holder's command
        assert winner.poll() is None
        while not list(out.glob("runs")) and not (out / "memory.jsonl").exists():  # the winner has begun writing
            assert winner.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
            p.wait()
    assert (out / ".lock").is_file()  # a SIGKILLed run cannot clean up

    p = subprocess.run([*cmd[:-3], "train.max_steps=1", "train.save_strategy=no", "train.overwrite_output_dir=true"],
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (f"samsum_tuner: note: took over the lock of a run that is no longer running (pid {winner.pid} on "
            f"{socket.gethostname()}, started ") in p.stdout
    assert not (out / ".lock").exists()


def test_a_held_lock_refuses_a_second_run_naming_its_holder(tmp_path):
    out = tmp_path / "run"
    lock = RunLock(out)
    assert lock.acquire() is None
    record = json.loads((out / ".lock").read_text())
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    with pytest.raises(st.ConfigError, match=rf"{out} is in use by another run \(pid {os.getpid()} on "):
        RunLock(out).acquire(wait_s=0.2)  # another lock of this very process: flock tells them apart too
    lock.release()
    assert not out.exists()  # the lock made the folder; nothing else was written, so it is gone with the lock
    assert RunLock(out).acquire() is None  # free again; released when collected
    import gc

    gc.collect()
    assert not out.exists()


def _rank(rank: int, init: str, root: str) -> None:
    """One of two ranks: takes the lock of `taken` (held by another run), then of `free`, as build_trainer does."""
    import torch.distributed as dist
    from transformers import TrainingArguments

    from samsum_tuner.api import _lock_run_dir

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    args = TrainingArguments(f"{root}/args", use_cpu=True, report_to=[])
    for name in ("taken", "free"):
        run = Path(root, name)
        try:
            lock = _lock_run_dir(st.load_recipe(None, [f"train.output_dir={run}"]), args)
            outcome = f"locked by {json.loads((run / '.lock').read_text())['pid']}"
            dist.barrier()  # both have read the lock before rank 0 lets it go
            lock.release()
        except st.ConfigError as e:
            outcome = str(e)
        Path(root, f"{name}-rank{rank}.txt").write_text(outcome)
    dist.destroy_process_group()


@pytest.mark.slow
def test_under_two_ranks_rank_0_takes_the_lock_and_every_rank_learns_the_verdict(tmp_path):
    import torch.multiprocessing as mp

    lock = RunLock(tmp_path / "taken")
    lock.acquire()  # another run holds this folder
    mp.spawn(_rank, args=(f"file://{tmp_path / 'rendezvous'}", str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        assert (tmp_path / f"taken-rank{rank}.txt").read_text().startswith(
            f"train.output_dir: {tmp_path / 'taken'} is in use by another run (pid {os.getpid()} on "), rank
    took = {(tmp_path / f"free-rank{rank}.txt").read_text() for rank in (0, 1)}
    assert len(took) == 1 and took.pop().startswith("locked by ")  # one lock, rank 0's, seen by both
    assert not (tmp_path / "free").exists()  # released, and the folder it made gone with it
    lock.release()


def test_decided_by_main_runs_once_in_one_process():
    calls = []
    assert decided_by_main(lambda: calls.append(1) or "x") == "x" and calls == [1]
    with pytest.raises(st.ConfigError, match="no"):
        decided_by_main(lambda: (_ for _ in ()).throw(st.ConfigError("no")))


# ---------------------------------------------------------------- 3: what is given at resume takes effect
CHANGES = {  # optimizer and schedule: (the first run's settings, those given at resume)
    "adamw-linear": (["train.lr_scheduler_type=linear", "train.learning_rate=1e-2", "train.weight_decay=0.0"],
                     ["train.lr_scheduler_type=linear", "train.learning_rate=2e-3", "train.weight_decay=0.1"]),
    "sgd-steplr": (["--fsdp_config.optimizer", "SGD", "train.learning_rate=1e-1", "train.gamma=0.9",
                    "train.momentum=0.9"],
                   ["--fsdp_config.optimizer", "SGD", "train.learning_rate=2e-2", "train.gamma=0.5",
                    "train.momentum=0.5"]),
}


def _rates(trainer) -> dict[int, float]:
    return {h["step"]: h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(CHANGES))
def test_hyperparameters_given_at_resume_take_effect(kind, tiny_model_dir, tmp_path, capsys):
    """A run saved at step 2 and resumed with another learning rate (and weight decay, momentum, StepLR gamma)
    trains steps 3-6 at the rates an uninterrupted run with the new settings has there, with the new values in
    its optimizer, and says so."""
    data = write_jsonl(tmp_path / "d", "train", synthetic_rows(16)).parent  # 4 steps an epoch: StepLR decays at 5
    first, given = CHANGES[kind]
    common = ["train.max_steps=6", "train.save_strategy=steps", "train.save_steps=2", "train.save_total_limit=5"]

    def run(out, settings, *extra):
        r = st.load_recipe(None, _args(tiny_model_dir, data, out, *common, *settings, *extra))
        trainer = st.build_trainer(r)
        st.train(r, trainer=trainer)
        return trainer

    run(tmp_path / "first", first)
    capsys.readouterr()
    resumed = run(tmp_path / "resumed", given, f"resume={tmp_path / 'first' / 'checkpoint-2'}")
    out = capsys.readouterr().out
    straight = run(tmp_path / "straight", given)
    want = {s: lr for s, lr in _rates(straight).items() if s > 2}
    assert len(want) == 4 and len(set(want.values())) > 1  # the schedule moves in these steps
    assert {s: lr for s, lr in _rates(resumed).items() if s > 2} == pytest.approx(want, rel=1e-12)
    group = resumed.optimizer.param_groups[0]
    if kind == "sgd-steplr":
        assert group["momentum"] == 0.5 and group["initial_lr"] == 2e-2
        lines = ["learning_rate 0.1 -> 0.02", "momentum 0.9 -> 0.5", "gamma 0.9 -> 0.5"]
    else:
        assert group["weight_decay"] == 0.1 and group["initial_lr"] == 2e-3
        lines = ["learning_rate 0.01 -> 0.002", "weight_decay 0 -> 0.1"]
    for line in lines:
        assert f"samsum_tuner: resume: {line} (from the recipe)\n" in out, out


# ---------------------------------------------------------------- 4, 6: checkpoints resume can use all of
@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tokenizer) -> tuple[Path, Path, Path]:
    """(model folder, data, a finished LoRA run with checkpoint-1 and checkpoint-2), trained once for the module."""
    root = tmp_path_factory.mktemp("lora-run")
    model = root / "model"
    tiny_llama().save_pretrained(model)
    tokenizer.save_pretrained(model)
    data = write_jsonl(root / "data", "train", synthetic_rows(16)).parent
    r = st.load_recipe(None, _args(model, data, root / "run", "train.max_steps=2", "train.save_strategy=steps",
                                   "train.save_steps=1"))
    st.train(r)
    assert [p.name for p in ck.complete_checkpoints(root / "run")] == ["checkpoint-1", "checkpoint-2"]
    return model, data, root / "run"


def _copy(run: Path, dest: Path, link: bool = True) -> Path:
    # Hard links where nothing trains in the copy: a damaged file is replaced, never written to.
    shutil.copytree(run, dest, copy_function=os.link if link else shutil.copy2)
    return dest


def _damage(file: Path, how: str, rng: random.Random) -> None:
    data = file.read_bytes()
    file.unlink()
    if how == "deleted":
        return
    new = {"truncated": data[: len(data) // 2], "empty": b"",
           "garbage": rng.randbytes(len(data)),  # the same size: only reading it can tell
           "bit-flipped-header": bytes([data[0] ^ 0xFF]) + data[1:]}[how]
    file.write_bytes(new)


FILES = ["optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "adapter_model.safetensors",
         "adapter_config.json"]
DAMAGES = ["truncated", "empty", "garbage", "bit-flipped-header", "deleted"]


# A checkpoint without trainer_state.json is no checkpoint at all (test_resume's half saves).
DAMAGED = [pytest.param(name, how, manifest, id=f"{name}-{how}-{'ours' if manifest else 'no-manifest'}")
           for name in FILES for how in DAMAGES for manifest in (True, False)
           if (name, how) != ("trainer_state.json", "deleted")]


@pytest.mark.parametrize("name,how,manifest", DAMAGED)
def test_a_damaged_checkpoint_file_is_named_and_never_resumed(name, how, manifest, lora_run, tmp_path, capsys,
                                                              no_model):
    """Each file resume reads, damaged each way, in our checkpoints and in ones without a manifest (another
    writer's): an explicit resume is refused in one line naming the file (exit 2); resume=auto skips to the
    checkpoint before with a note naming it, and refuses naming it when there is none."""
    model, data, run = lora_run
    rng = random.Random(f"{name}-{how}")
    out = _copy(run, tmp_path / "run")
    for c in ck.complete_checkpoints(out):
        if not manifest:
            (c / ck.MANIFEST).unlink()
    bad = out / "checkpoint-2"
    _damage(bad / name, how, rng)
    r = st.load_recipe(None, _args(model, data, out, "train.max_steps=4"))

    assert _train(model, data, out, "train.max_steps=4", f"resume={bad}") == 2
    err = _error(capsys)
    assert err.startswith(f"samsum-tuner: error: train.resume_from_checkpoint: {bad} ") and name in err, err
    assert err.endswith(f"; the last complete one is {out / 'checkpoint-1'}"), err

    notes: list[str] = []
    assert check_output_dir(out, overwrite=False, resume="auto", settings=r.to_dict(),
                            notes=notes) == out / "checkpoint-1"
    assert len(notes) == 1 and notes[0].startswith(f"skipping {bad}: it ") and name in notes[0], notes

    shutil.rmtree(out / "checkpoint-1")
    assert _train(model, data, out, "train.max_steps=4", "resume=auto") == 2
    err = _error(capsys)
    assert f"resume=auto has nothing to resume in {out}" in err and f"skipping {bad}: it " in err and name in err


MISMATCHES = {  # the override given at resume: (key, saved, given)
    "lora.r=16": ("lora.r", "8", "16"),
    "lora.alpha=8": ("lora.alpha", "32", "8"),
    "lora.target_modules=q_proj,k_proj": ("lora.target_modules", "['q_proj', 'v_proj']", "['k_proj', 'q_proj']"),
    "lora.enabled=false": ("lora.enabled", "True", "False"),
    "train.optim=sgd": ("train.optim", "adamw_torch", "sgd"),
    "quantization.bits=4": ("quantization.bits", "None", "4"),
}


# Another writer's checkpoint shows no quantization: nothing to compare there.
OTHER_RECIPES = [pytest.param(override, recorded, id=f"{override}-{'ours' if recorded else 'another-writer'}")
                 for override in MISMATCHES for recorded in (True, False)
                 if recorded or not override.startswith("quantization")]


@pytest.mark.parametrize("override,recorded", OTHER_RECIPES)
def test_a_checkpoint_of_another_recipe_is_refused_naming_the_difference(override, recorded, lora_run, tmp_path,
                                                                         capsys, no_model):
    model, data, run = lora_run
    out = _copy(run, tmp_path / "run")
    key, was, now = MISMATCHES[override]
    if not recorded:  # what another writer's checkpoint shows: adapter_config.json, the optimizer's groups
        for c in ck.complete_checkpoints(out):
            (c / ck.RECIPE_FILE).unlink()
            (c / ck.MANIFEST).unlink()
        was = {"train.optim": "adamw", "lora.target_modules": "['q_proj', 'v_proj']"}.get(key, was)
        now = {"train.optim": "sgd"}.get(key, now)
    for resume in (out / "checkpoint-2", "auto"):
        assert _train(model, data, out, "train.max_steps=4", override, f"resume={resume}") == 2
        err = _error(capsys)
        assert err == (f"samsum-tuner: error: train.resume_from_checkpoint: {out / 'checkpoint-2'} was saved with "
                       f"{key}={was}, this run has {key}={now}: resume with the same {key}, or start a new run "
                       "(another train.output_dir, or train.overwrite_output_dir=true)"), err


def test_a_checkpoint_without_its_optimizer_is_skipped_by_auto_and_refused_when_named(lora_run, tmp_path, capsys):
    """The resume that goes on: auto skips the incomplete checkpoint-2 and trains on from checkpoint-1."""
    model, data, run = lora_run
    out = _copy(run, tmp_path / "run", link=False)
    (out / "checkpoint-2" / "optimizer.pt").unlink()
    assert _train(model, data, out, "train.max_steps=3", "resume=auto") == 0
    printed = capsys.readouterr().out
    assert (f"samsum_tuner: note: skipping {out / 'checkpoint-2'}: it misses optimizer.pt\n"
            f"samsum_tuner: resuming from {out / 'checkpoint-1'}\n") in printed
    assert json.loads((out / "run_summary.json").read_text())["step"] == 3


# ---------------------------------------------------------------- 9: disk full while saving
@pytest.fixture
def small_disk(tmp_path):
    """A real 24 MiB filesystem (tmpfs), mounted for the test."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({p.stderr.strip()}): needs root, as CI runs")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


def _fill(folder: Path, leave: int) -> Path:
    """Take all the free space of folder's filesystem but `leave` bytes."""
    filler = folder / "filler"
    with filler.open("wb") as f:
        f.truncate(0)
        free = shutil.disk_usage(folder).free - leave
        f.write(b"\0" * max(free, 0))
    return filler


def test_torch_save_running_out_of_space_is_told_apart(small_disk):
    """torch.save's stream error carries no errno: the full filesystem behind it is what tells."""
    _fill(small_disk, 0)
    with pytest.raises(RuntimeError) as e:
        torch.save({"x": torch.zeros(2**20)}, small_disk / "x.pt")
    assert ck.is_disk_full(e.value, small_disk)
    assert not ck.is_disk_full(RuntimeError("unexpected pos 576 vs 534"), ROOT)  # the same error, space left


def test_disk_full_while_saving_stops_cleanly_and_the_run_resumes_once_space_is_back(tiny_model_dir, tiny_data,
                                                                                     small_disk):
    from transformers import TrainerCallback

    out = small_disk / "run"

    class FillAfterFirstSave(TrainerCallback):
        filler = None

        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 1:  # checkpoint-1 is published: the disk fills up before the next save
                self.filler = _fill(small_disk, leave=64 * 1024)

    r = st.load_recipe(None, _args(tiny_model_dir, tiny_data, out, "train.max_steps=3", "train.save_strategy=steps",
                                   "train.save_steps=1"))
    fill = FillAfterFirstSave()
    with pytest.raises(DiskFull) as e:
        st.train(r, trainer=st.build_trainer(r, callbacks=[fill]))
    message = str(e.value)
    assert e.value.exit_code == 5 and "\n" not in message
    assert message.startswith(f"no space left on the device of {out} while saving checkpoint-2 ("), message
    assert message.endswith(f"the last complete checkpoint is {out / 'checkpoint-1'}; free some space and run again "
                            "with resume=auto"), message
    assert not (out / ck.STAGING).exists() and not (out / "checkpoint-2").exists() and not (out / ".lock").exists()
    assert rs.unusable(out / "checkpoint-1", lora=True) is None

    fill.filler.unlink()  # space is back
    r = st.load_recipe(None, _args(tiny_model_dir, tiny_data, out, "train.max_steps=3", "train.save_strategy=steps",
                                   "train.save_steps=1", "resume=auto"))
    trainer = st.build_trainer(r)
    st.train(r, trainer=trainer)
    assert trainer.state.global_step == 3
    assert [p.name for p in ck.complete_checkpoints(out)] == ["checkpoint-2", "checkpoint-3"]
