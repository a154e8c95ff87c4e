"""Safety: weights as safetensors, training state read with weights_only, remote code only on request,
an existing run directory written only when asked."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import samsum_tuner as st
from samsum_tuner import checkpoint as ck
from samsum_tuner import resume as rs

from .conftest import tiny_llama

FAST = ["train.report_to=[]", "train.disable_tqdm=true", "train.logging_steps=1", "memory.preflight=false",
        "data.max_length=128", "train.eval_strategy=no", "data.eval_split=null", "train.per_device_train_batch_size=4",
        "train.gradient_accumulation_steps=1", "--use_peft", "train.save_strategy=steps", "train.save_steps=1"]


def _recipe(model_dir, data, out, *extra):
    return st.load_recipe(None, [f"model.name={model_dir}", f"data.source={data}", f"train.output_dir={out}", *FAST,
                                 *extra])


class _Payload:
    """Unpickling this runs code: what a tampered optimizer.pt would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def test_checkpoints_hold_safetensors_and_plain_tensors_and_a_tampered_one_is_refused(tiny_model_dir, tiny_data,
                                                                                      tmp_path):
    out = tmp_path / "run"
    r = _recipe(tiny_model_dir, tiny_data, out, "train.max_steps=2")
    st.train(r)
    ckpt = out / "checkpoint-2"
    names = sorted(p.name for p in ckpt.iterdir())
    assert "adapter_model.safetensors" in names and not [n for n in names if n.endswith((".bin", ".pkl"))]
    state_files = [p for p in ckpt.iterdir() if p.suffix in (".pt", ".pth")]
    assert {p.name for p in state_files} >= {"optimizer.pt", "scheduler.pt", "rng_state.pth"}
    from transformers.trainer_pt_utils import safe_globals  # numpy arrays and dtypes (RNG state): data, not code

    with safe_globals():
        for p in state_files:  # every piece of training state loads without unpickling objects
            torch.load(p, weights_only=True)
    assert json.loads((ckpt / "training_args.json").read_text())["seed"] == 42  # not a pickled training_args.bin
    assert (out / "adapter_model.safetensors").is_file() and not list(out.glob("*.bin"))

    marker = tmp_path / "PWNED"
    torch.save({"state": {}, "param_groups": [], "x": _Payload(marker)}, ckpt / "optimizer.pt")
    # Named and refused before any model loads; resume=auto goes back to the checkpoint before it instead.
    with pytest.raises(st.ConfigError, match=r"^train.resume_from_checkpoint: .*checkpoint-2 has optimizer.pt at \d+ "
                                             r"bytes, saved with \d+; the last complete one is .*checkpoint-1$"):
        st.prepare(_recipe(tiny_model_dir, tiny_data, out, "train.max_steps=4", f"resume={ckpt}"))
    (ckpt / ck.MANIFEST).unlink()  # a checkpoint of another writer: no sizes to compare, the file itself is read
    with pytest.raises(st.ConfigError, match=r"checkpoint-2 has an unreadable optimizer.pt \(UnpicklingError: Weights "
                                             r"only load failed"):
        st.prepare(_recipe(tiny_model_dir, tiny_data, out, "train.max_steps=4", f"resume={ckpt}"))
    resumed = _recipe(tiny_model_dir, tiny_data, out, "train.max_steps=4", "resume=auto")
    trainer = st.build_trainer(resumed)
    st.train(resumed, trainer=trainer)
    assert trainer.state.global_step == 4 and not marker.exists()
    assert (out / ".overwritten").is_dir() and not ckpt.exists()  # the tampered checkpoint kept aside, not resumed


@pytest.fixture
def remote_code_model_dir(tmp_path, tokenizer):
    """A model folder whose config asks for its own Python code (auto_map), which writes a marker on import."""
    d = tmp_path / "remote-code"
    tiny_llama().save_pretrained(d)
    tokenizer.save_pretrained(d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (d / "config.json").write_text(json.dumps(cfg))
    marker = tmp_path / "RAN"
    # Subclasses, not aliases: loading registers them for auto classes, which must not touch the real Llama.
    (d / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                               "print('evil.py ran', flush=True)\n"
                               "from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast\n"
                               "class EvilConfig(LlamaConfig):\n    pass\n"
                               "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n"
                               "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    return d, marker


def test_remote_code_runs_only_when_the_recipe_asks(remote_code_model_dir, tiny_data, tmp_path):
    from samsum_tuner.model import load_model
    from samsum_tuner.model_source import load_tokenizer
    from samsum_tuner.resolve import model_load

    d, marker = remote_code_model_dir
    r = _recipe(d, tiny_data, tmp_path / "run")
    assert r.model.trust_remote_code is False
    load_tokenizer(r.model)
    load_model(model_load(r))
    assert not marker.exists()
    r.model.trust_remote_code = True
    load_model(model_load(r))
    assert marker.read_text() == "ran"  # the same folder does run code once the recipe says so


@pytest.mark.parametrize("code_in", ["config", "tokenizer"])
def test_dry_run_and_plan_run_no_model_folder_code_even_when_trusted(remote_code_model_dir, tiny_data, capsys,
                                                                     code_in):
    from samsum_tuner import cli

    d, marker = remote_code_model_dir
    if code_in == "tokenizer":  # the tokenizer's own class, which AutoTokenizer imports from the folder when trusted
        cfg = json.loads((d / "config.json").read_text())
        del cfg["auto_map"]
        (d / "config.json").write_text(json.dumps(cfg))
        tok = json.loads((d / "tokenizer_config.json").read_text())
        tok["auto_map"] = {"AutoTokenizer": [None, "evil.EvilTokenizer"]}
        (d / "tokenizer_config.json").write_text(json.dumps(tok))
    args = [f"model.name={d}", f"data.source={tiny_data}", "model.trust_remote_code=true", "--use_peft"]
    assert cli.main(["train", *args, "--dry-run"]) == 0
    assert cli.main(["plan", *args]) == 0
    assert cli.main(["plan", *args, "--lengths", "default"]) == 0
    out = capsys.readouterr().out
    assert not marker.exists() and "evil.py ran" not in out
    notes = [line for line in out.splitlines() if "trust_remote_code" in line and "note" in line]
    assert len(notes) == 3 and notes[0] == (
        f"samsum_tuner: note: model.trust_remote_code=true: a training run would run the Python code that {d} ships"
        f"{' (evil.py, named in its config.json auto_map)' if code_in == 'config' else ''}; a dry run or a plan runs "
        "none of it")


def test_trusted_remote_code_is_announced_before_it_runs(remote_code_model_dir, tiny_data, tmp_path, capsys):
    d, marker = remote_code_model_dir
    st.prepare(_recipe(d, tiny_data, tmp_path / "run", "model.trust_remote_code=true"))  # checks, data, tokenizer
    out = capsys.readouterr().out.splitlines()
    warning = f"samsum_tuner: warning: model.trust_remote_code=true: loading {d} runs the Python code it ships " \
              "(evil.py, named in its config.json auto_map); use it only with a model you trust"
    assert marker.read_text() == "ran" and out.index(warning) < out.index("evil.py ran")
    st.prepare(_recipe(d, tiny_data, tmp_path / "run2"))  # untrusted: no warning, no code
    assert "trust_remote_code" not in capsys.readouterr().out


def test_overwrite_moves_the_old_checkpoints_aside_and_resume_never_mixes_runs(tiny_model_dir, tiny_data, tmp_path):
    out = tmp_path / "run"
    st.train(_recipe(tiny_model_dir, tiny_data, out, "train.max_steps=3"))
    before = (out / "checkpoint-3" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(st.ConfigError, match="already holds a run"):
        st.build_trainer(_recipe(tiny_model_dir, tiny_data, out, "train.max_steps=2"))
    st.train(_recipe(tiny_model_dir, tiny_data, out, "train.max_steps=2", "train.overwrite_output_dir=true"))
    [aside] = (out / ".overwritten").iterdir()
    assert (aside / "checkpoint-3" / "adapter_model.safetensors").read_bytes() == before
    assert [p.name for p in ck.complete_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
    assert rs.resolve_resume("auto", out) == out / "checkpoint-2"
    shutil.rmtree(out)
