"""On the device machine: `python -m pytest -m gpu tests/test_gpu.py`. Skipped without CUDA."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import samsum_tuner as st

from .conftest import GPU_PROCESSES, ROOT

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
FAST = ["train.report_to=[]", "train.disable_tqdm=true", "train.logging_steps=1", "train.save_strategy=no",
        "data.max_length=256", "train.eval_strategy=no"]


def _recipe(model_dir, data, out, *extra):
    return st.load_recipe(None, [f"model.name={model_dir}", f"data.source={data}", f"train.output_dir={out}",
                                 *FAST, *extra])


def test_qlora_step_on_gpu_with_memory_figures(tiny_model_dir, tiny_data, tmp_path):
    r = _recipe(tiny_model_dir, tiny_data, tmp_path / "q", "--use_peft", "--quantization", "True", "--use_fp16",
                "train.max_steps=3")
    metrics = st.train(r)
    assert metrics["last_loss"] > 0
    mem = [json.loads(x) for x in (tmp_path / "q" / "memory.jsonl").read_text().splitlines()]
    last = [m for m in mem if m["event"] == "epoch" and m["rank"] == 0][-1]
    assert last["gpu_peak_allocated_gib"] > 0 and last["gpu_peak_reserved_gib"] >= last["gpu_peak_allocated_gib"]
    assert last["gpu_malloc_retries"] is not None and last["host_peak_rss_gib"] > 0
    import bitsandbytes as bnb

    summary = json.loads((tmp_path / "q" / "run_summary.json").read_text())
    assert summary["status"] == "ok" and summary["trainable_params"] < summary["total_params"]
    assert bnb is not None


def test_capped_run_reports_oom_cleanly(tiny_model_dir, tiny_data, tmp_path, capsys):
    from samsum_tuner import cli

    code = cli.main(["train", f"model.name={tiny_model_dir}", f"data.source={tiny_data}",
                     f"train.output_dir={tmp_path / 'oom'}", *FAST, "train.max_steps=2", "--force",
                     "train.per_device_train_batch_size=40", "data.packing=false", "memory.gpu_limit_gib=0.3"])
    assert code == 3
    err = capsys.readouterr().err
    assert "out of GPU memory at step 0: peak allocated" in err and "0.3 GiB cap" in err
    summary = json.loads((tmp_path / "oom" / "run_summary.json").read_text())
    assert summary["status"] == "oom" and summary["memory"]["gpu_peak_allocated_gib"] > 0
    # Alone on its card (the cap is a fraction, not another process): only the CUDA context is outside.
    assert 0 < summary["memory"]["gpu_held_outside_gib"] < 4 and "outside this process" not in err


@pytest.mark.parametrize("nproc", GPU_PROCESSES)
@pytest.mark.parametrize("recipe_extra", [["--use_peft", "--use_fp16"],
                                          ["--use_peft", "--quantization", "True", "--use_fp16"]],
                         ids=["fsdp_lora", "fsdp_qlora"])
def test_fsdp_step_through_accelerate(tiny_model_dir, tiny_data, tmp_path, recipe_extra, nproc):
    """One process, and two on two GPUs: FSDP + QLoRA with the second rank on its own GPU is where the
    original's "Inconsistent compute_device and device_id" came from."""
    out = tmp_path / "fsdp"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    cmd = ["accelerate", "launch", "--config_file", "accelerate_configs/fsdp4.yaml", "--num_processes", str(nproc),
           "-m", "samsum_tuner.train", "--enable_fsdp", *recipe_extra, f"model.name={tiny_model_dir}",
           f"data.source={tiny_data}", f"train.output_dir={out}", *FAST, "train.max_steps=3"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    assert f"accelerate, {nproc} process(es), FSDP FULL_SHARD" in p.stdout
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["status"] == "ok" and summary["metrics"]["last_loss"] > 0
    assert (out / "adapter_model.safetensors").is_file()
    assert sys.executable
