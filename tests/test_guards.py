"""NaN guard on the tiny model: a real non-finite loss (huge learning rate, NaN weights), a real fp16 GradScaler."""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from samsum_tuner import checkpoint as ck
from samsum_tuner import cli
from samsum_tuner.config import GuardConfig
from samsum_tuner.errors import TrainingDiverged
from samsum_tuner.guards import NonFiniteGuard

from .conftest import tiny_llama

FAST = ["train.report_to=[]", "train.disable_tqdm=true", "train.logging_steps=1", "memory.preflight=false",
        "data.max_length=128", "train.eval_strategy=no", "data.eval_split=null", "train.per_device_train_batch_size=4",
        "train.gradient_accumulation_steps=1", "train.lr_scheduler_type=constant"]


def _error(capsys) -> str:
    """The error line; the rest of stderr is progress bars."""
    lines = [x for x in capsys.readouterr().err.splitlines() if "error" in x]
    assert len(lines) == 1, lines
    return lines[0]


def _train(model_dir, data, out, *extra) -> int:
    return cli.main(["train", f"model.name={model_dir}", f"data.source={data}", f"train.output_dir={out}", *FAST,
                     *extra])


def test_diverging_run_stops_naming_the_last_good_checkpoint(tiny_model_dir, tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    code = _train(tiny_model_dir, tiny_data, out, "--fsdp_config.optimizer", "SGD", "train.learning_rate=3e3",
                  "train.max_steps=10", "train.save_strategy=steps", "train.save_steps=1", "train.save_total_limit=10")
    err = _error(capsys)
    assert code == 4, err
    m = re.fullmatch(r"samsum-tuner: error: training stopped at step (\d+): loss is (nan|inf) for 1 step\(s\) in a row "
                     r"\(guard.max_nonfinite_steps=1\); last good checkpoint: (\S+) \(resume from it with .*", err)
    assert m, err
    step, good = int(m.group(1)), m.group(3)
    assert step >= 3 and good == str(out / f"checkpoint-{step - 2}")
    # Nothing from the bad step on was saved; the named checkpoint's weights are finite.
    assert [ck.step_of(p) for p in ck.complete_checkpoints(out)] == list(range(1, step))
    assert all(torch.isfinite(t).all() for t in load_file(f"{good}/model.safetensors").values())
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["status"] == "diverged" and summary["step"] == step and good in summary["error"]
    assert summary["last_good_checkpoint"] == good


# The rate jumps from 0 (warm-up step 1) to 5e37 at step 2: finite loss at step 2, non-finite gradients at step 3.
DIVERGING = ["--fsdp_config.optimizer", "SGD", "train.max_steps=6", "train.save_strategy=steps", "train.save_steps=1",
             "train.save_total_limit=10", "train.lr_scheduler_type=constant_with_warmup", "train.warmup_steps=2"]


def test_the_guards_advice_works_as_printed(tiny_model_dir, tiny_data, tmp_path, capsys):
    """A real divergence (SGD, fp32, a huge learning rate), then what its message says: resume from the named
    checkpoint after lowering the learning rate. The new rate is the one trained with, the schedule goes on from it,
    and the run finishes. resume=auto after the divergence goes back to the same checkpoint, not to the newer one the
    guard suspects (its weights are not finite)."""
    out = tmp_path / "run"
    assert _train(tiny_model_dir, tiny_data, out, *DIVERGING, "train.learning_rate=1e38") == 4
    err = _error(capsys)
    assert "at step 3: gradients are not finite (loss " in err, err
    good = Path(re.search(r"resume from it with train.resume_from_checkpoint=(\S+), after lowering "
                          r"train.learning_rate\)$", err).group(1))
    assert good == out / "checkpoint-1"
    assert [p.name for p in ck.complete_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
    shutil.copytree(out, tmp_path / "auto")

    code = _train(tiny_model_dir, tiny_data, out, *DIVERGING, f"train.resume_from_checkpoint={good}",
                  "train.learning_rate=1e-3")
    printed = capsys.readouterr()
    assert code == 0, printed.err[-3000:]
    assert "samsum_tuner: resume: learning_rate 1e+38 -> 0.001 (from the recipe)" in printed.out
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["status"] == "ok" and summary["step"] == 6 and math.isfinite(summary["metrics"]["last_loss"])
    rates = {h["step"]: h["learning_rate"] for h in _log(out) if "learning_rate" in h}
    # the warm-up goes on from the new rate: half of it at step 2, all of it after
    assert {s: rates[s] for s in range(2, 7)} == {s: 1e-3 * min(1.0, (s - 1) / 2) for s in range(2, 7)}
    [aside] = (out / ".overwritten").iterdir()  # the diverged trajectory, kept, out of resume=auto's way
    assert sorted(p.name for p in aside.iterdir()) == ["checkpoint-2", "log_history.json", "metrics.json",
                                                       "run_summary.json"]

    auto = tmp_path / "auto"
    code = _train(tiny_model_dir, tiny_data, auto, *DIVERGING, "resume=auto", "train.learning_rate=1e-3")
    printed = capsys.readouterr()
    assert code == 0, printed.err[-3000:]
    assert ("samsum_tuner: note: the last run diverged: resuming from the checkpoint the NaN guard named, "
            "checkpoint-1, not the newer checkpoint-2\n") in printed.out
    assert f"samsum_tuner: resuming from {auto / 'checkpoint-1'}\n" in printed.out


def _log(out: Path) -> list[dict]:
    return json.loads((out / "log_history.json").read_text())


@pytest.fixture
def nan_model_dir(tmp_path, tokenizer):
    model = tiny_llama()
    with torch.no_grad():
        model.model.norm.weight[3] = math.nan  # every forward pass is NaN from the first step
    d = tmp_path / "nan-llama"
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


def test_nan_weights_stop_at_the_threshold_and_zero_turns_the_guard_off(nan_model_dir, tiny_data, tmp_path, capsys):
    code = _train(nan_model_dir, tiny_data, tmp_path / "a", "--use_peft", "train.max_steps=6",
                  "guard.max_nonfinite_steps=3", "train.save_strategy=no")
    err = _error(capsys)
    assert code == 4 and err == ("samsum-tuner: error: training stopped at step 3: loss is nan for 3 step(s) in a row "
                                 "(guard.max_nonfinite_steps=3); no good checkpoint was saved before it")
    code = _train(nan_model_dir, tiny_data, tmp_path / "b", "--use_peft", "train.max_steps=2",
                  "guard.max_nonfinite_steps=0", "train.save_strategy=no")
    assert code == 0, capsys.readouterr().err


def test_fp16_scaler_skipping_in_a_row_stops_a_real_grad_scaler():
    """A real torch GradScaler inside accelerate's AcceleratedOptimizer, fed overflowing gradients."""
    from accelerate.optimizer import AcceleratedOptimizer
    from transformers import TrainerControl, TrainerState

    lin = torch.nn.Linear(4, 1)
    opt = AcceleratedOptimizer(torch.optim.SGD(lin.parameters(), lr=0.1), device_placement=False,
                               scaler=torch.amp.GradScaler("cpu", init_scale=2.0**16))
    guard = NonFiniteGuard(GuardConfig(max_skipped_steps=4), "/nonexistent")
    state, control = TrainerState(), TrainerControl()

    def step(overflow: bool) -> None:
        loss = lin(torch.ones(1, 4)).sum() * (1e38 if overflow else 1.0)  # finite loss, overflowing gradients
        opt.scaler.scale(loss).backward()
        opt.step()
        opt.zero_grad()
        guard.observe(loss)
        state.global_step += 1
        guard.on_step_end(None, state, control, optimizer=opt)

    for _ in range(3):
        step(True)
    assert guard.skipped == 3 and opt.step_was_skipped
    step(False)  # a good step ends the streak
    assert guard.skipped == 0 and not opt.step_was_skipped
    for _ in range(3):
        step(True)
    with pytest.raises(TrainingDiverged, match=r"at step 8: the fp16 loss scaler skipped 4 steps in a row "
                                               r"\(guard.max_skipped_steps=4\); no good checkpoint"):
        step(True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_the_guard_reads_the_loss_back_late_but_always_before_a_save(nan_model_dir, tiny_data, tmp_path,
                                                                              capsys):
    """On CUDA a step's loss is read back once the GPU has got there, and waited for at a save step."""
    out = tmp_path / "run"
    code = _train(nan_model_dir, tiny_data, out, "--use_peft", "train.max_steps=12", "train.logging_steps=1000",
                  "train.save_strategy=steps", "train.save_steps=4", "guard.max_nonfinite_steps=2")
    err = _error(capsys)
    # step 1 logs (logging_first_step), step 4 saves: the streak reached at step 2 stops the run at step 4
    assert code == 4 and err == ("samsum-tuner: error: training stopped at step 4: loss is nan for 2 step(s) in a row "
                                 "up to step 2 (guard.max_nonfinite_steps=2); no good checkpoint was saved before it")
    assert ck.complete_checkpoints(out) == []


def _drive(guard, losses, args=None):
    """Optimizer steps of a real Trainer's callback order: a micro-batch loss each, then on_step_end."""
    from transformers import TrainerControl, TrainerState

    state, control = TrainerState(), TrainerControl()
    guard.on_train_begin(args, state, control)
    for loss in losses:
        guard.observe(torch.tensor(loss))
        state.global_step += 1
        guard.on_step_end(args, state, control)


def test_a_tripped_guard_starts_afresh_with_the_next_training_run():
    guard = NonFiniteGuard(GuardConfig(max_nonfinite_steps=1), "/nonexistent")
    with pytest.raises(TrainingDiverged, match="at step 2: loss is nan"):
        _drive(guard, [1.0, math.nan, 1.0])
    _drive(guard, [1.0, 1.0, 1.0])  # the same trainer, resumed with a lower learning rate: nothing left over


def _rank_of_two(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist
    from transformers import TrainingArguments

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    guard = NonFiniteGuard(GuardConfig(max_nonfinite_steps=1), f"{out}/run")
    args = TrainingArguments(f"{out}/args", use_cpu=True, report_to=[])
    try:
        _drive(guard, [1.0, 1.0, math.nan if rank == 1 else 1.0, 1.0], args)
        message = "not stopped"
    except TrainingDiverged as e:
        message = str(e)
    Path(out, f"rank{rank}.txt").write_text(message)
    dist.destroy_process_group()


def test_when_one_process_trips_every_process_stops_naming_the_same_checkpoint(tmp_path):
    """An fp16 overflow in one rank's batch: both ranks stop at the same step, and rank 0 (whose message the CLI
    shows) names the checkpoint before the bad step too."""
    import torch.multiprocessing as mp

    for step in (1, 2):
        (tmp_path / "run" / f"checkpoint-{step}").mkdir(parents=True)
        (tmp_path / "run" / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    mp.spawn(_rank_of_two, args=(f"file://{tmp_path / 'rendezvous'}", str(tmp_path)), nprocs=2)
    good = f"last good checkpoint: {tmp_path / 'run' / 'checkpoint-1'} "
    assert (tmp_path / "rank1.txt").read_text().startswith("training stopped at step 3: loss is nan for 1 step(s) "
                                                           "in a row (guard.max_nonfinite_steps=1); " + good)
    assert (tmp_path / "rank0.txt").read_text().startswith("training stopped at step 3: the NaN guard tripped on "
                                                           "another process; " + good)
