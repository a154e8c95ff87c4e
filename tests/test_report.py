"""`samsum-tuner report`: markdown and plots from what a real (tiny, CPU) run leaves in its directory."""
from __future__ import annotations

import json

import samsum_tuner as st
from samsum_tuner import cli

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
