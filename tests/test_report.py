"""`samsum-tuner report`: markdown and plots from what a real (tiny, CPU) run leaves in its directory."""
from __future__ import annotations

import json
import shutil

import pytest

import samsum_tuner as st
from samsum_tuner import cli

from .damage import assert_refused, cut, files_of, nothing, remove, write

FAST = ["train.report_to=[]", "train.disable_tqdm=true", "train.logging_steps=1", "memory.preflight=false"]


def test_report_of_a_real_run(tiny_model_dir, tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    r = st.load_recipe(None, [f"model.name={tiny_model_dir}", f"data.source={tiny_data}", f"train.output_dir={out}",
                              "data.max_length=128", *FAST, "--use_peft", "train.per_device_train_batch_size=8",
                              "train.gradient_accumulation_steps=1", "train.num_train_epochs=2",
                              "train.learning_rate=1e-2", "memory.log_every_steps=2", "train.save_strategy=no"])
    metrics = st.train(r)
    history = json.loads((out / "log_history.json").read_text())
    evals = [h for h in history if "eval_loss" in h]
    # One evaluation per epoch; the final weights are the last epoch's, so they are not scored twice.
    assert sum("loss" in h for h in history) == 10 and len(evals) == 2
    assert metrics["eval_loss"] == evals[-1]["eval_loss"] and metrics["eval_ppl"] == evals[-1]["eval_ppl"]
    assert cli.main(["report", str(out)]) == 0
    assert "report written to" in capsys.readouterr().out
    md = (out / "report.md").read_text()
    assert "status: **ok**" in md and "| eval_loss |" in md and "## Memory per epoch" in md
    # Two epoch rows for rank 0, GPU columns "n/a" on CPU (null, never a zero that pretends)
    rows = [ln for ln in md.splitlines() if ln.startswith("| 1 | 0 |") or ln.startswith("| 2 | 0 |")]
    assert len(rows) == 2 and all("| n/a | n/a | n/a | n/a / n/a |" in ln for ln in rows)
    from PIL import Image

    for name in ("loss.png", "perplexity.png", "learning_rate.png", "memory.png"):
        assert f"]({name})" in md
        with Image.open(out / name) as im:
            assert im.size == (770, 440)  # 7 x 4 inches at 110 dpi
    assert not (out / "malloc_retries.png").exists()  # no CUDA, no retries to draw


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no run_summary.json" in err[0]


def _json_in(name: str, value):
    return write(name, json.dumps(value).encode())


def _history_entry(entry):
    """log_history.json: the run's first entry, then `entry`."""
    def setup(run, tmp):
        history = json.loads((run / "log_history.json").read_text())
        (run / "log_history.json").write_text(json.dumps([history[0], entry]))
    return setup


def _summary_with(**fields):
    def setup(run, tmp):
        summary = json.loads((run / "run_summary.json").read_text())
        (run / "run_summary.json").write_text(json.dumps({**summary, **fields}))
    return setup


def _memory_line(line: bytes):
    """memory.jsonl: the run's first line, then `line`."""
    def setup(run, tmp):
        first = (run / "memory.jsonl").read_bytes().splitlines(keepends=True)[0]
        (run / "memory.jsonl").write_bytes(first + line)
    return setup


def _dir(name: str):
    return lambda run, tmp: (run / name).mkdir()


TOO_LONG = b"1" * 5000


# name: (setup(run, tmp), what the one line says, the arguments after `report` (default: RUN))
CASES = {
    "run-missing": (nothing, "nope: no such run directory", lambda run, tmp: [tmp / "nope"]),
    "run-is-a-file": (nothing, "recipe.yaml: is not a folder", lambda run, tmp: [run / "recipe.yaml"]),
    "summary-missing": (remove("run_summary.json"), "no run_summary.json"),
    "summary-truncated": (cut("run_summary.json"), "run_summary.json:"),
    "summary-empty": (write("run_summary.json", b""), "run_summary.json: empty file"),
    "summary-not-object": (write("run_summary.json", b"[1, 2]"), "run_summary.json: expected an object, got list"),
    "summary-not-utf8": (write("run_summary.json", b'{"status": "\xff"}'), "run_summary.json: not UTF-8 text"),
    "summary-is-a-folder": (lambda run, tmp: remove("run_summary.json")(run, tmp) or _dir("run_summary.json")(run, tmp),
                            "no run_summary.json"),
    "summary-metrics-not-object": (_summary_with(metrics=[1]), "'metrics' must be an object"),
    "summary-recipe-not-object": (_summary_with(recipe="lora"), "'recipe' must be an object"),
    "summary-params-not-integer": (_summary_with(trainable_params="many"), "'trainable_params' must be an integer"),
    "summary-model-not-object": (_summary_with(recipe={"model": "tiny"}), "'recipe.model' must be an object"),
    "history-truncated": (cut("log_history.json"), "log_history.json:"),
    "history-not-list": (write("log_history.json", b'{"loss": 1}'), "log_history.json: expected an array, got dict"),
    "history-entry-not-object": (_history_entry(3), "log_history.json: entry 2: expected an object, got int"),
    "history-loss-not-number": (_history_entry({"loss": "low", "step": 3}), "entry 2: 'loss' must be a number"),
    "history-step-not-number": (_history_entry({"loss": 1.0, "step": "3"}), "entry 2: 'step' must be a number"),
    "history-not-utf8": (write("log_history.json", b"[\xfe]"), "log_history.json: not UTF-8 text"),
    "memory-truncated-line": (_memory_line(b'{"event": "epoch", "rank": 0, "host_pe'),
                              "memory.jsonl:2: not valid JSON"),
    "memory-line-not-object": (_memory_line(b"[1]\n"), "memory.jsonl:2: expected an object, got list"),
    "memory-value-not-number": (_memory_line(b'{"event": "epoch", "rank": 0, "host_peak_rss_gib": "1 GiB"}\n'),
                                "memory.jsonl:2: 'host_peak_rss_gib' must be a number"),
    "memory-not-utf8": (_memory_line(b'{"host": "\xff"}\n'), "memory.jsonl: not UTF-8 text"),
    "eval-metrics-truncated": (write("eval_metrics_test.json", b'{"rouge1": 3'), "eval_metrics_test.json:1: not valid"),
    "eval-metrics-not-object": (_json_in("eval_metrics_test.json", [47.0]), "eval_metrics_test.json: expected an"),
    # Integers of more digits than Python converts (4300): a ValueError traceback before.
    "summary-int-too-long": (write("run_summary.json", b'{"status": "ok", "step": ' + TOO_LONG + b"}"),
                             "run_summary.json: not valid JSON (Exceeds the limit (4300 digits)"),
    "history-int-too-long": (write("log_history.json", b'[{"step": ' + TOO_LONG + b', "loss": 1}]'),
                             "log_history.json: not valid JSON (Exceeds the limit (4300 digits)"),
    "memory-int-too-long": (_memory_line(b'{"event": "epoch", "rank": ' + TOO_LONG + b"}\n"),
                            "memory.jsonl:2: not valid JSON (Exceeds the limit (4300 digits)"),
    "eval-metrics-int-too-long": (write("eval_metrics_test.json", b'{"rows": ' + TOO_LONG + b"}"),
                                  "eval_metrics_test.json: not valid JSON (Exceeds the limit (4300 digits)"),
    "report-md-is-a-folder": (_dir("report.md"), "report.md: exists and is not a file"),
    "plot-is-a-folder": (_dir("loss.png"), "loss.png: exists and is not a file"),
    "extra-argument": (nothing, "unrecognized arguments: more", lambda run, tmp: [run, "more"]),
}


@pytest.mark.parametrize("case", CASES)
def test_report_refuses_bad_input_in_one_line(case, lora_run, tmp_path, capsys):
    setup, expected, args = (*CASES[case], lambda run, tmp: [run])[:3]
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    setup(run, tmp_path)
    kept = files_of(tmp_path)
    assert_refused(capsys, ["report", *args(run, tmp_path)], expected)
    assert files_of(tmp_path) == kept  # no report.md, no plot written before the refusal


DAMAGED_ROWS = [b'{"event": "epoch", "rank": 0, "host_peak_rss_gib": 1.0, "gpu_malloc_retries": 0}',
                b'{"event": "epoch", "rank": 0, "epoch": null, "step": null, "host_peak_rss_gib": 1.0, '
                b'"gpu_malloc_retries": 0}']


@pytest.mark.parametrize("row", DAMAGED_ROWS, ids=["no-epoch-or-step", "null-epoch-and-step"])
def test_a_memory_row_without_its_epoch_or_step_is_left_out_of_the_plots(row, lora_run, tmp_path):
    """Such a row passes the number checks (null is allowed), and the plots read epoch and step: a KeyError or
    matplotlib's TypeError before."""
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    (run / "memory.jsonl").write_bytes((run / "memory.jsonl").read_bytes() + row + b"\n")
    assert cli.main(["report", str(run)]) == 0
    # the run's own rows (a CPU run: no retries) are plotted; the damaged row, the only one with retries, is not
    assert (run / "memory.png").is_file() and not (run / "malloc_retries.png").exists()


def test_report_without_history_or_memory_says_so(lora_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    for name in ("log_history.json", "memory.jsonl"):
        (run / name).unlink()
    assert cli.main(["report", str(run)]) == 0
    md = (run / "report.md").read_text()
    assert "(no log_history.json: no loss curves)" in md and "## Memory per epoch" not in md
    assert not list(run.glob("*.png"))


# log_history.json entries added to the run's, and the plot they are in
EXTREME = {"eval-loss-1e308": ([{"step": 3, "eval_loss": 1e308}, {"step": 4, "eval_loss": -1e308}], "loss.png"),
           "step-10e400": ([{"step": 10 ** 400, "loss": 1.0}], "loss.png"),
           "learning-rate-1e308": ([{"step": 3, "learning_rate": 1e308}, {"step": 4, "learning_rate": -1e308}],
                                   "learning_rate.png")}


@pytest.mark.parametrize("case", EXTREME)
def test_a_plot_of_values_matplotlib_cannot_draw_is_left_out_with_a_note(case, lora_run, tmp_path, capsys,
                                                                         recwarn):
    """Valid numbers at the edge of what a float holds: matplotlib raised (ValueError, OverflowError) and the report
    stopped with a traceback; now that one plot is left out, named, and the rest of the report is written."""
    entries, plot = EXTREME[case]
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    rows = json.loads((run / "log_history.json").read_text())
    (run / "log_history.json").write_text(json.dumps([*rows, *entries]))
    (run / plot).write_bytes(b"an older report's plot")
    capsys.readouterr()
    assert cli.main(["report", str(run)]) == 0
    out, err = capsys.readouterr()
    assert f"{plot} left out: its values cannot be drawn" in out and "Traceback" not in out + err
    assert not [w for w in recwarn if "overflow" in str(w.message)]  # numpy's on the way there: not for people
    md = (run / "report.md").read_text()
    assert f"]({plot})" not in md and not (run / plot).exists()
    drawn = [p for p in ("loss.png", "learning_rate.png", "memory.png") if p != plot]
    assert all(f"]({p})" in md and (run / p).is_file() for p in drawn)
