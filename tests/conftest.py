"""Shared fixtures: the real SmolLM2 tokenizer, a tiny random Llama built in-process, the real SAMSum files."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# One process, and two where the machine has two GPUs (one per process): the GPU tests' launch sizes.
GPU_PROCESSES = [pytest.param(n, id=f"{n}proc", marks=pytest.mark.skipif(
    torch.cuda.device_count() < n, reason=f"needs {n} GPUs")) for n in (1, 2)]
SHARED_SAMSUM = ROOT.parent / "shared" / "data" / "samsum"


def torchrun_two(script, *args, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`script args` on two local ranks (gloo on the CPU) under torch's own launcher. A rank that aborts in C++
    (CI saw one `terminate called without an active exception`) prints its Python stacks through faulthandler."""
    env = {**(os.environ if env is None else env), "PYTHONFAULTHANDLER": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout)


# One interpreter imports the CLI once, then forks a child per command line: each child runs it as the console
# script would (`sys.exit(main(argv))`, atexit handlers included) with its stdout/stderr in files of its own.
FORKED_CLI = r"""
import json, os, sys, tempfile, traceback
from samsum_tuner.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.dup2(out.fileno(), 1); os.dup2(err.fileno(), 2)
        try:
            code = main(argv)
        except BaseException:
            traceback.print_exc(); code = 1
        sys.exit(code)
    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    results.append([status] + [(f.seek(0), f.read().decode())[1] for f in (out, err)])
print(json.dumps(results))
"""


def cli_in_fresh_processes(argvs: list[list[str]], env: dict[str, str] | None = None,
                           cwd: Path = ROOT) -> tuple[str, list[tuple[int, str, str]]]:
    """(what importing the CLI printed, [(exit code, stdout, stderr) of each command line]): what a fresh
    `samsum-tuner ...` process gives for each, for one interpreter start instead of one per command line."""
    p = subprocess.run([sys.executable, "-c", FORKED_CLI, json.dumps([list(map(str, a)) for a in argvs])], cwd=cwd,
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    *imported, results = p.stdout.splitlines()
    return "\n".join(imported) + p.stderr, [tuple(r) for r in json.loads(results)]


def samsum_dir() -> Path:
    # Absolute: some tests run code from another working directory (the notebook runs in examples/).
    return Path(os.environ.get("SAMSUM_DATA_DIR", SHARED_SAMSUM)).resolve()


@pytest.fixture(scope="session")
def real_samsum() -> Path:
    d = samsum_dir()
    if not (d / "train.jsonl.gz").is_file():
        pytest.fail(f"real SAMSum not found at {d}: set SAMSUM_DATA_DIR (CI uses ../shared/data/samsum)")
    return d


@pytest.fixture(autouse=True)
def _samsum_env(monkeypatch):
    # Tests choose their data explicitly; an inherited SAMSUM_DATA_DIR would override data.source.
    monkeypatch.delenv("SAMSUM_DATA_DIR", raising=False)
    for k in [k for k in os.environ if k.startswith(("ACCELERATE_", "FSDP_"))]:
        monkeypatch.delenv(k, raising=False)


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's real tokenizer (from the embedded GGUF, converted once into the cache)."""
    from samsum_tuner.config import Recipe
    from samsum_tuner.model_source import load_tokenizer

    r = Recipe()
    r.model.name = "smollm2-135m"
    return load_tokenizer(r.model)


def tiny_llama(vocab_size: int = 49152, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False,
                      initializer_range=0.2)  # logits wide enough for a small LoRA to steer
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg)


@pytest.fixture
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama saved as a local HF folder with SmolLM2's tokenizer (the original's model-7b layout)."""
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory, tokenizer) -> Path:
    """A real LoRA run directory (adapter, tokenizer, recipe, summary, logs) of a tiny random Llama trained for
    two steps with the chat template; built once per session: copy it before changing it."""
    import samsum_tuner as st

    root = tmp_path_factory.mktemp("lora-run")
    tiny_llama().save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    write_jsonl(root / "samsum", "train", synthetic_rows(8))
    write_jsonl(root / "samsum", "validation", synthetic_rows(4, offset=1000))
    write_jsonl(root / "samsum", "test", synthetic_rows(6, offset=2000))
    r = st.load_recipe(None, [f"model.name={root / 'base'}", f"data.source={root / 'samsum'}", "--use_peft",
                              f"train.output_dir={root / 'run'}", "data.chat_template=true", "data.max_length=128",
                              "train.max_steps=2", "train.per_device_train_batch_size=4",
                              "train.gradient_accumulation_steps=1", "train.learning_rate=1e-2", *QUIET_RUN,
                              "train.save_model=true"])
    st.train(r)
    return root / "run"


def write_jsonl(folder: Path, split: str, rows: list[dict], raw_lines: list[str] | None = None) -> Path:
    import json

    folder.mkdir(parents=True, exist_ok=True)
    p = folder / f"{split}.jsonl"
    lines = raw_lines if raw_lines is not None else [json.dumps(r) for r in rows]
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


# A short training run that writes no logs, checkpoints or model and skips the memory preflight.
QUIET_RUN = ["train.report_to=[]", "train.disable_tqdm=true", "train.logging_steps=1", "train.save_strategy=no",
             "train.save_model=false", "memory.preflight=false"]


def varied_rows(n: int) -> list[dict]:
    """Dialogues from 3 to 42 words: batches of them are mostly padding when padded."""
    return [{"id": str(i), "dialogue": "Ann: " + "so " * (3 + (i * 11) % 40), "summary": f"Ann talks {i}."}
            for i in range(n)]


def synthetic_rows(n: int, offset: int = 0) -> list[dict]:
    return [{"id": str(offset + i), "dialogue": f"Ann: hello {i}\r\nBob: hi, see you at {i % 12 + 1} pm",
             "summary": f"Ann and Bob meet at {i % 12 + 1} pm."} for i in range(n)]


@pytest.fixture
def tiny_data(tmp_path) -> Path:
    d = tmp_path / "samsum"
    write_jsonl(d, "train", synthetic_rows(40))
    write_jsonl(d, "validation", synthetic_rows(8, offset=1000))
    write_jsonl(d, "test", synthetic_rows(8, offset=2000))
    return d


def write_small_checkpoint(folder: Path, step: int) -> Path:
    """What resume reads from a full fine-tune's Trainer checkpoint, each file real and readable: the weights of a
    small linear layer (model.safetensors), its AdamW and schedule states, the RNG state, trainer_state.json (as the
    Trainer writes it: its resume reads train_batch_size and stateful_callbacks)."""
    from safetensors.torch import save_file
    from transformers.trainer_callback import TrainerControl, TrainerState

    folder.mkdir(parents=True, exist_ok=True)
    layer = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    save_file({k: v.detach().contiguous() for k, v in layer.state_dict().items()}, str(folder / "model.safetensors"))
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    torch.save(scheduler.state_dict(), folder / "scheduler.pt")
    torch.save({"cpu": torch.get_rng_state()}, folder / "rng_state.pth")
    state = TrainerState(global_step=step, train_batch_size=4, stateful_callbacks=[TrainerControl()])
    state.save_to_json(str(folder / "trainer_state.json"))
    return folder
