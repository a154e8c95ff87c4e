"""eval_loss as the Trainer averaged it before 9dcf27a (each 16k-token evaluation row's mean loss weighted alike)
against the mean over every supervised token, for SmolLM2 on the whole validation split, on the CPU:

    SAMSUM_DATA_DIR=../shared/data/samsum python benchmarks/results/2026-12-07e-cpu/eval_loss_weighting.py

Each sample's loss is computed alone (a packed sample attends only to itself), then grouped as each seed's
evaluation batches group it. About 10 minutes on 2 cores; writes eval_loss_weighting.json beside this file."""
import json
from pathlib import Path

import torch

import samsum_tuner as st
from samsum_tuner.batching import TokenBudgetBatchSampler
from samsum_tuner.data import IGNORE_INDEX

recipe = st.load_recipe("recipes/smollm2_gpu.yaml", [
    "model.attn_implementation=sdpa", "train.bf16=false", "model.compile=false", "train.output_dir=/tmp/evw",
    "train.overwrite_output_dir=true", "memory.preflight=false"])
trainer = st.build_trainer(recipe)
dataset, model = trainer.eval_dataset, trainer.model.eval()
per_sample = []  # (summed loss, supervised tokens)
with torch.no_grad():
    for ids, labels in zip(dataset["input_ids"], dataset["labels"]):
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
        targets = torch.tensor(labels[1:])
        loss = torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
        per_sample.append((float(loss), int((targets != IGNORE_INDEX).sum())))
lengths = [len(ids) for ids in dataset["input_ids"]]
out = {"token_mean": sum(s for s, _ in per_sample) / sum(n for _, n in per_sample)}
for seed in (42, 1):
    rows = list(TokenBudgetBatchSampler(lengths, 16384, packed=True, seed=seed, multiple=16384))
    means = [sum(per_sample[i][0] for i in row) / sum(per_sample[i][1] for i in row) for row in rows]
    out[f"row_mean_seed{seed}"] = sum(means) / len(means)
    out[f"rows_seed{seed}"] = [round(m, 4) for m in means]
    out[f"last_row_samples_seed{seed}"] = len(rows[-1])
print(json.dumps(out))
(Path(__file__).parent / "eval_loss_weighting.json").write_text(json.dumps(out, indent=1))
