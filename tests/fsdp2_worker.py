"""Run under `torchrun --nproc_per_node 2` (gloo, CPU): FSDP2 (`fully_shard`) over our LoRA'd tiny Llama, trained
N steps with sharded, atomic checkpoints (tests/sharded.py, through samsum_tuner.checkpoint); optionally SIGKILLs
itself after a step and optionally resumes from the last complete checkpoint. Used by tests/test_resume.py.

    worker.py MODEL_DIR RUN_DIR STEPS [--kill-after K] [--resume] [--dropout P] [--compile]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard

from samsum_tuner import checkpoint as ck
from samsum_tuner.recipe import build_recipe
from samsum_tuner.model import load_model
from samsum_tuner.resolve import model_load
from tests.sharded import load_sharded, save_sharded

SAVE_EVERY, BATCH, SEQ = 2, 2, 24


def batch(step: int, rank: int, vocab: int) -> torch.Tensor:
    # The data position is the step: each rank's batch is a function of (step, rank) alone.
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, vocab, (BATCH, SEQ), generator=g)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model_dir")
    p.add_argument("run_dir")
    p.add_argument("steps", type=int)
    p.add_argument("--kill-after", type=int, default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--compile", action="store_true", help="model.compile: decoder layers compiled before sharding")
    a = p.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    recipe = build_recipe(None, [f"model.name={a.model_dir}", "--use_peft", f"lora.dropout={a.dropout}",
                                 "lora.target_modules=q_proj,v_proj,gate_proj", f"model.compile={a.compile}"])
    model = load_model(model_load(recipe))  # the library's LoRA wrapping
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-2)
    start = 0
    latest = ck.latest_checkpoint(a.run_dir) if a.resume else None
    if latest is not None:
        start = load_sharded(latest, model, opt)["global_step"]
    else:
        torch.manual_seed(1 + rank)  # per-rank dropout streams, restored from rng_state_{rank}.pth on resume
    vocab = model.config.vocab_size
    Path(a.run_dir).mkdir(parents=True, exist_ok=True)
    log = Path(a.run_dir) / "losses.jsonl"
    model.train()
    for step in range(start + 1, a.steps + 1):
        ids = batch(step, rank, vocab)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        if rank == 0:
            with log.open("a") as fh:
                fh.write(json.dumps({"step": step, "loss": mean.item() / dist.get_world_size()}) + "\n")
        if step % SAVE_EVERY == 0:
            save_sharded(a.run_dir, step, model, opt, keep=2)
        if a.kill_after is not None and step == a.kill_after:
            dist.barrier()
            os.kill(os.getpid(), signal.SIGKILL)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        from safetensors.torch import save_file

        trainable = {n for n, q in model.named_parameters() if q.requires_grad}
        save_file({k: v.contiguous() for k, v in full.items() if k in trainable},
                  str(Path(a.run_dir) / "final.safetensors"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
