"""What a user sees: no library noise they cannot act on, Ctrl-C as one line naming the last complete checkpoint,
and a refused input as one line on stderr, through the console script and `python -m samsum_tuner.train`."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import QUIET_RUN, ROOT, cli_in_fresh_processes

# A progress bar's frame ("Loading weights:  48%|####  | 10/21 [00:00<00:00, 41.53it/s]"): information, not noise.
PROGRESS = re.compile(r"\d+%\|.*\| *\d+/\d+ \[")


def lines_but_progress(text: str) -> list[str]:
    """The non-empty lines of `text`, progress-bar frames (separated by carriage returns) left out."""
    return [s.strip() for s in re.split(r"[\r\n]", text) if s.strip() and not PROGRESS.search(s)]


def tiny_run(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [f"model.name={model_dir}", f"data.source={data}", f"train.output_dir={out}", "train.report_to=[]",
            "train.disable_tqdm=true", "train.per_device_train_batch_size=2", "train.gradient_accumulation_steps=1",
            *extra]


@pytest.mark.slow
def test_a_qlora_run_with_checkpointing_prints_no_library_noise(tiny_model_dir, tiny_data, tmp_path):
    """QLoRA with gradient checkpointing on a CPU reaches every notice seen before: bitsandbytes' kernel fetch (peft
    imports it on every run), transformers' gradient_checkpointing deprecations (TrainingArguments, peft's
    prepare_model_for_kbit_training and get_peft_model) and the Trainer's pin-memory advice on a CPU."""
    out = tmp_path / "run"
    p = subprocess.run(["samsum-tuner", "train", "--use_peft", "--quantization", "True",
                        *tiny_run(tiny_model_dir, tiny_data, out, "model.gradient_checkpointing=true",
                                  "train.max_steps=2", "train.logging_steps=1")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert lines_but_progress(p.stderr) == []
    for noise in ("Warning", "deprecated", "kernels-community", "pin_memory", "trust_remote_code"):
        assert noise not in p.stdout + p.stderr


@pytest.mark.slow
def test_a_quantized_model_still_checkpoints_its_activations(tiny_model_dir, tiny_data, tmp_path):
    """peft no longer switches checkpointing on for a 4-bit model (its switch is transformers' deprecated one):
    the Trainer does, as for every other model."""
    import samsum_tuner as st

    recipe = st.load_recipe(None, ["--use_peft", "--quantization", "True", "model.gradient_checkpointing=true",
                                   "train.max_steps=1", *QUIET_RUN,
                                   *tiny_run(tiny_model_dir, tiny_data, tmp_path / "run")])
    trainer = st.build_trainer(recipe)
    st.train(recipe, trainer=trainer)
    layers = [m for m in trainer.model.modules() if type(m).__name__ == "LlamaDecoderLayer"]
    assert layers and all(layer.gradient_checkpointing for layer in layers)


def _bad_data(folder: Path) -> Path:
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"id": "1", "dialogue": "Ann: hi", "summary": "Ann says hi."}\n{oops\n')
    return folder


def test_a_refusal_is_the_only_line_on_stderr(tiny_model_dir, tmp_path):
    """Nothing a library prints while loading comes before the one error line (peft's import of bitsandbytes
    printed two lines before a merge's refusal; eval of a missing folder printed transformers' traceback). The
    first case runs the console script itself; the others run its entry function in fresh processes forked
    after the import (conftest.cli_in_fresh_processes), whose own output must be empty too."""
    missing = tmp_path / "no-such-model"
    cases = {
        "unknown key": ["train", "train.no_such_key=1"],
        "bad data file": ["train", f"model.name={tiny_model_dir}", f"data.source={_bad_data(tmp_path / 'data')}",
                          f"train.output_dir={tmp_path / 'run'}"],
        "missing model folder": ["train", f"model.name={missing}"],
        "eval of a missing folder": ["eval", str(missing)],
        "merge of a folder that is no run": ["merge", str(tmp_path), str(tmp_path / "merged")],
        "plan with an unknown key": ["plan", "train.bogus=1"],
    }
    p = subprocess.run(["samsum-tuner", *cases["unknown key"]], cwd=ROOT, capture_output=True, text=True, timeout=300)
    imported, results = cli_in_fresh_processes(list(cases.values()))
    assert imported == ""
    assert results[0] == (p.returncode, p.stdout, p.stderr)  # the fork gives what the console script gives
    for case, (code, out, err) in zip(cases, results):
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and out == "" and len(lines) == 1 and lines[0].startswith("samsum-tuner: error: "), (case, err)
        if "missing" in case:
            assert str(missing) in lines[0], case


def _interrupt_when(cmd: list[str], ready: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `cmd`, send it SIGINT (a Ctrl-C) once `ready` exists, and collect what it printed and its exit code."""
    # Ctrl-C's default action in the child, even under a runner whose own SIGINT is ignored (a background job).
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        start = time.monotonic()
        while not ready.exists():
            assert p.poll() is None, p.communicate()[1][-3000:]
            assert time.monotonic() - start < timeout, f"{ready} never appeared"
            time.sleep(0.1)
        p.send_signal(signal.SIGINT)
        stdout, stderr = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    return subprocess.CompletedProcess(cmd, p.returncode, stdout, stderr)


def _assert_interrupted(p: subprocess.CompletedProcess, out: Path) -> str:
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    assert p.returncode == 130, p.stderr[-3000:]
    lines = lines_but_progress(p.stderr)
    assert len(lines) == 1 and lines[0].startswith("samsum-tuner: interrupted after step "), p.stderr[-3000:]
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["status"] == "interrupted" and f"after step {summary['step']};" in lines[0]
    return lines[0]


@pytest.mark.slow
def test_ctrl_c_names_the_last_complete_checkpoint(tiny_model_dir, tiny_data, tmp_path):
    from samsum_tuner.checkpoint import latest_checkpoint

    out = tmp_path / "run"
    p = _interrupt_when(["samsum-tuner", "train", "--use_peft",
                         *tiny_run(tiny_model_dir, tiny_data, out, "train.max_steps=100000",
                                   "train.save_strategy=steps", "train.save_steps=2", "train.eval_strategy=no")],
                        ready=out / "checkpoint-2" / "trainer_state.json")
    line = _assert_interrupted(p, out)
    last = latest_checkpoint(out)
    assert last is not None
    assert line.endswith(f"; last complete checkpoint: {last} (resume with resume=auto)"), line
    assert json.loads((out / "run_summary.json").read_text())["last_checkpoint"] == str(last)


@pytest.mark.slow
def test_ctrl_c_before_any_checkpoint_says_there_is_nothing_to_resume(tiny_model_dir, tiny_data, tmp_path):
    out = tmp_path / "run"
    p = _interrupt_when([sys.executable, "-m", "samsum_tuner.train", "--use_peft",
                         *tiny_run(tiny_model_dir, tiny_data, out, "train.max_steps=100000", "train.save_strategy=no",
                                   "train.eval_strategy=no", "memory.log_every_steps=1")],
                        ready=out / "memory.jsonl")  # written at the end of the first step
    line = _assert_interrupted(p, out)
    assert line.endswith("; no complete checkpoint: nothing to resume"), line
    assert not list(out.glob("checkpoint-*"))
