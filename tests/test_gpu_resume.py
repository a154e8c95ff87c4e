"""On the device machine: `python -m pytest -m gpu tests/test_gpu_resume.py`. Skipped without CUDA.

An FSDP run through accelerate (one process, fsdp4.yaml) saves sharded checkpoints; a copy of the run
directory as it was at checkpoint-2 resumes with resume=auto and follows the same loss curve."""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from samsum_tuner import checkpoint as ck

from .conftest import GPU_PROCESSES, ROOT

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
FAST = ["train.report_to=[]", "train.disable_tqdm=true", "train.logging_steps=1", "data.max_length=256",
        "train.eval_strategy=no", "data.eval_split=null", "train.per_device_train_batch_size=4",
        "train.gradient_accumulation_steps=1", "train.lr_scheduler_type=linear", "train.learning_rate=1e-3",
        "train.save_strategy=steps", "train.save_steps=2", "train.save_total_limit=5", "train.max_steps=6"]


def _launch(model_dir, data, out, *extra, nproc=1):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_", "SAMSUM_DATA_DIR"))}
    cmd = ["accelerate", "launch", "--config_file", "accelerate_configs/fsdp4.yaml", "--num_processes", str(nproc),
           "-m", "samsum_tuner.train", "--enable_fsdp", "--use_peft", "--use_fp16", f"model.name={model_dir}",
           f"data.source={data}", f"train.output_dir={out}", *FAST, *extra]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    return p


def _curve(run) -> list[tuple[int, float]]:
    state = json.loads((ck.latest_checkpoint(run) / ck.STATE_FILE).read_text())
    return [(h["step"], h["loss"]) for h in state["log_history"] if "loss" in h]


@pytest.mark.parametrize("nproc", GPU_PROCESSES)
def test_fsdp_through_accelerate_resumes_from_its_sharded_checkpoint(tiny_model_dir, tiny_data, tmp_path, nproc):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    p = _launch(tiny_model_dir, tiny_data, straight, nproc=nproc)
    assert f"accelerate, {nproc} process(es), FSDP FULL_SHARD" in p.stdout
    ckpt = straight / "checkpoint-2"
    names = {x.name for x in ckpt.iterdir()}
    assert any(n.startswith("pytorch_model_fsdp") for n in names), names  # sharded model (DCP folder)
    assert any(n.startswith("optimizer") for n in names) and "scaler.pt" in names and ck.STATE_FILE in names
    assert not (straight / ck.STAGING).exists()
    resumed.mkdir()
    shutil.copytree(ckpt, resumed / "checkpoint-2")
    p = _launch(tiny_model_dir, tiny_data, resumed, "resume=auto", nproc=nproc)
    assert f"resuming from {resumed / 'checkpoint-2'}" in p.stdout
    want, got = _curve(straight), _curve(resumed)
    assert [s for s, _ in got] == [s for s, _ in want] == list(range(1, 7))
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-4)
    a, b = load_file(straight / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


def test_fp16_scaler_skipping_stops_a_real_run(tiny_model_dir, tiny_data, tmp_path):
    """Gradients made infinite by a hook: the loss stays finite, the fp16 GradScaler skips every step."""
    import samsum_tuner as st

    r = st.load_recipe(None, [f"model.name={tiny_model_dir}", f"data.source={tiny_data}",
                              f"train.output_dir={tmp_path / 'run'}", *FAST[:8], "--use_peft", "--use_fp16",
                              "train.max_steps=20", "train.save_strategy=no", "guard.max_skipped_steps=5",
                              "memory.preflight=false"])
    trainer = st.build_trainer(r)
    param = next(q for q in trainer.model.parameters() if q.requires_grad)
    param.register_hook(lambda g: g * float("inf"))
    with pytest.raises(st.SamsumTunerError, match=r"training stopped at step 5: the fp16 loss scaler skipped 5 steps "
                                                  r"in a row \(guard.max_skipped_steps=5\)"):
        st.train(r, trainer=trainer)
