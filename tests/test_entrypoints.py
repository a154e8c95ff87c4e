"""Entrypoints as users run them: the console script, python -m, accelerate launch (CPU), accelerate configs."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from .conftest import ROOT

SMALL = ["data.split_slice=8", "data.eval_slice=[:4]", "train.max_steps=2", "train.per_device_train_batch_size=2",
         "train.per_device_eval_batch_size=4", "train.logging_steps=1", "train.report_to=[]", "data.max_length=256"]


def _env(real_samsum):
    env = dict(os.environ, SAMSUM_DATA_DIR=str(real_samsum), TOKENIZERS_PARALLELISM="false")
    for k in [k for k in env if k.startswith(("ACCELERATE_", "FSDP_"))]:
        env.pop(k)
    return env


@pytest.mark.parametrize("name", ["single_gpu", "fsdp4", "fsdp4_cpu_offload"])
def test_accelerate_configs_load_with_accelerates_own_loader(name):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(ROOT / "accelerate_configs" / f"{name}.yaml"))
    if name == "single_gpu":
        assert cfg.distributed_type == "NO" and cfg.num_processes == 1
        return
    assert cfg.distributed_type == "FSDP" and cfg.num_processes == 4 and cfg.mixed_precision == "no"
    f = cfg.fsdp_config
    assert f["fsdp_version"] == 2 and f["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
    assert f["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP" and f["fsdp_reshard_after_forward"] is True
    assert f["fsdp_offload_params"] is (name == "fsdp4_cpu_offload")
    assert f["fsdp_activation_checkpointing"] is False  # checkpointing is the recipe's (launch.py refuses true)


def test_recipe_contradicting_accelerate_config_is_refused(monkeypatch, capsys):
    from samsum_tuner import cli

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert cli.main(["train", str(ROOT / "recipes" / "full_sgd.yaml"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "recipe fsdp.cpu_offload=false but the accelerate config has fsdp_offload_params: true" in err
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    assert cli.main(["train", str(ROOT / "recipes" / "full_sgd.yaml"), "--dry-run"]) == 2
    assert "recipe fsdp.enabled=true but the accelerate config does not use FSDP" in capsys.readouterr().err
    # A config that asks accelerate to checkpoint: the checkpointing is the recipe's.
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "false")
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "true")
    assert cli.main(["train", str(ROOT / "recipes" / "full_sgd.yaml"), "--dry-run"]) == 2
    assert capsys.readouterr().err == (
        "samsum-tuner: error: the accelerate config has fsdp_activation_checkpointing: true, but activation "
        "checkpointing is the recipe's model.gradient_checkpointing (on under FSDP unless false): change the "
        "recipe or pick the matching accelerate_configs/ file\n")


@pytest.mark.slow
def test_accelerate_fsdp_runs_checkpoint_as_the_recipe_says(real_samsum, tokenizer):
    """Under the FSDP configs every decoder layer is checkpointed unless the recipe says false (a config that asks
    accelerate to checkpoint is refused: test_recipe_contradicting_accelerate_config_is_refused). On a CPU the FSDP
    run itself is refused, which --dry-run reports as a note after the launch check."""
    def dry_run(*overrides: str) -> subprocess.CompletedProcess:
        cmd = ["accelerate", "launch", "--config_file", "accelerate_configs/fsdp4.yaml", "--num_processes", "1",
               "-m", "samsum_tuner.train", "recipes/full_sgd.yaml", "model.name=random:llama2-7b",
               "data.split_slice=8", "data.eval_slice=[:4]", "--dry-run", *overrides]
        return subprocess.run(cmd, cwd=ROOT, env=_env(real_samsum), capture_output=True, text=True, timeout=300)

    p = dry_run()  # the mission's command as committed
    assert p.returncode == 0, p.stderr[-3000:]
    assert "launch: accelerate, 1 process(es), FSDP FULL_SHARD, every decoder layer checkpointed\n" in p.stdout
    p = dry_run("model.gradient_checkpointing=false")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "launch: accelerate, 1 process(es), FSDP FULL_SHARD\n" in p.stdout


@pytest.mark.slow
def test_console_script_dry_run(real_samsum, tokenizer):
    p = subprocess.run(["samsum-tuner", "train", "recipes/demo_cpu.yaml", "--dry-run", "--split_slice", "1%"],
                       cwd=ROOT, env=_env(real_samsum), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    # 1% of train; the recipe's own eval_slice ([:32]) takes precedence for the eval split
    assert "rows_in=147" in p.stdout and "rows_in=32" in p.stdout and "tokens train: rows 147" in p.stdout
    assert "precision: fp32: float32 weights" in p.stdout and "--- resolved recipe ---" in p.stdout


@pytest.mark.slow
def test_accelerate_launch_cpu_runs_the_demo_recipe(real_samsum, tmp_path, tokenizer):
    out = tmp_path / "run"
    cmd = ["accelerate", "launch", "--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "samsum_tuner.train", "recipes/demo_cpu.yaml", *SMALL,
           f"train.output_dir={out}"]
    p = subprocess.run(cmd, cwd=ROOT, env=_env(real_samsum), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "launch: accelerate, 1 process(es), no FSDP" in p.stdout
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["status"] == "ok" and summary["metrics"]["eval_loss"] > 0
    assert (out / "adapter_model.safetensors").is_file() and (out / "memory.jsonl").is_file()
    assert "Max CUDA memory allocated was n/a (no CUDA)" in p.stdout + p.stderr


def test_python_m_train_bad_input_is_one_line(tmp_path):
    p = subprocess.run([sys.executable, "-m", "samsum_tuner.train", "--lr", "-1"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip() == "samsum-tuner: error: train.learning_rate must be positive, got -1.0"


def _one_refusal_under_a_launcher(p: subprocess.CompletedProcess, refusal: str) -> None:
    """Local rank 0 printed the refusal, no other rank did; the launcher reported a worker's exit code 2. The launcher
    itself exits 1 after its own report (torch elastic raises ChildFailedError for any failed worker)."""
    out = p.stdout + p.stderr
    assert [line for line in out.splitlines() if line.startswith("samsum-tuner: error:")] == [
        f"samsum-tuner: error: {refusal}"], out[-3000:]
    assert p.returncode == 1 and "exitcode  : 2" in p.stderr, out[-3000:]


@pytest.mark.slow
def test_a_refusal_under_torchrun_is_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "samsum_tuner.train",
           "--lr", "-1", f"train.output_dir={tmp_path / 'run'}"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    _one_refusal_under_a_launcher(p, "train.learning_rate must be positive, got -1.0")


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is FSDP without CUDA")
def test_a_refusal_under_accelerate_launch_is_one_line(real_samsum, tmp_path):
    """The mission's launch (the FSDP config, two processes here), refused on a machine without CUDA."""
    cmd = ["accelerate", "launch", "--config_file", "accelerate_configs/fsdp4.yaml", "--num_processes", "2",
           "-m", "samsum_tuner.train", "recipes/full_sgd.yaml", f"train.output_dir={tmp_path / 'run'}"]
    p = subprocess.run(cmd, cwd=ROOT, env=_env(real_samsum), capture_output=True, text=True, timeout=300)
    _one_refusal_under_a_launcher(p, "refused: FSDP needs CUDA GPUs (accelerate does not engage FSDP on CPU); drop "
                                     "fsdp.enabled / --enable_fsdp to train on CPU")


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(tiny_model_dir, tiny_data, tmp_path):
    """The original's launcher: two ranks (DDP over gloo on the CPU), one run directory, node-summed memory."""
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_", "SAMSUM_DATA_DIR"))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "samsum_tuner.train",
           "--use_peft", f"model.name={tiny_model_dir}", f"data.source={tiny_data}", f"train.output_dir={out}",
           "train.max_steps=4", "train.per_device_train_batch_size=2", "train.gradient_accumulation_steps=1",
           "train.report_to=[]", "train.disable_tqdm=true", "train.logging_steps=1", "train.save_strategy=no",
           "data.max_length=128"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "launch: torchrun, 2 process(es), no FSDP" in p.stdout
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["status"] == "ok" and summary["world_size"] == 2
    # 4 steps x 2 ranks x 2 samples of the 40-row tiny split
    assert summary["metrics"]["epoch"] == pytest.approx(16 / 40)
    # tokens summed over both ranks: one rank's 8 samples could not make this many
    from samsum_tuner import load_recipe
    from samsum_tuner.planning import train_lengths

    lengths = train_lengths(load_recipe(out / "recipe.yaml"))[0]
    assert 8 * max(lengths) < 16 * min(lengths) <= summary["metrics"]["num_input_tokens_seen"] <= 16 * max(lengths)
    mem = [json.loads(x) for x in (out / "memory.jsonl").read_text().splitlines()]
    epoch = [m for m in mem if m["event"] == "epoch"]
    node = [m for m in mem if m["event"] == "node" and m["window"] == "epoch"][-1]
    assert {m["rank"] for m in epoch} == {0, 1} and node["ranks"] == [0, 1]
    assert node["host_peak_rss_node_bytes"] == sum(m["host_peak_rss_bytes"] for m in epoch if m["step"] == node["step"])
    assert (out / "adapter_model.safetensors").is_file()


def test_a_launched_run_closes_its_process_group(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    """A run that exits with its process group open could hang after "done" (NCCL on an H200): the CLI closes it."""
    import socket

    import torch.distributed as dist

    from samsum_tuner import cli

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
                 "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(k, v)
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        code = cli.main_train(["--use_peft", f"model.name={tiny_model_dir}", f"data.source={tiny_data}",
                               f"train.output_dir={tmp_path / 'run'}", "train.max_steps=1", "train.report_to=[]",
                               "train.disable_tqdm=true", "train.save_strategy=no", "data.max_length=128",
                               "data.eval_split=null", "train.save_model=false"])
        assert code == 0 and not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
