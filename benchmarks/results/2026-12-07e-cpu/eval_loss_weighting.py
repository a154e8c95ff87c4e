import json, sys, torch
import samsum_tuner as st
from samsum_tuner.batching import TokenBudgetBatchSampler
torch.set_num_threads(2)
r = st.load_recipe("/work/main/recipes/smollm2_gpu.yaml", ["model.attn_implementation=sdpa", "train.bf16=false",
    "model.compile=false", "train.output_dir=/tmp/evw", "train.overwrite_output_dir=true", "memory.preflight=false"])
t = st.build_trainer(r)
ds, m = t.eval_dataset, t.model.eval()
per = []
with torch.no_grad():
    for i, (ids, lab) in enumerate(zip(ds["input_ids"], ds["labels"])):
        logits = m(input_ids=torch.tensor([ids])).logits[0, :-1].float()
        y = torch.tensor(lab[1:])
        l = torch.nn.functional.cross_entropy(logits, y, ignore_index=-100, reduction="sum")
        per.append((float(l), int((y != -100).sum())))
        if i % 100 == 0: print(i, flush=True)
lengths = [len(x) for x in ds["input_ids"]]
out = {"token_mean": sum(a for a, _ in per) / sum(n for _, n in per)}
for seed in (42, 1):
    b = list(TokenBudgetBatchSampler(lengths, 16384, packed=True, seed=seed, multiple=16384))
    rows = [sum(per[i][0] for i in bb) / sum(per[i][1] for i in bb) for bb in b]
    out[f"row_mean_seed{seed}"] = sum(rows) / len(rows)
    out[f"rows_seed{seed}"] = [round(x, 4) for x in rows]
    out[f"last_row_samples_seed{seed}"] = len(b[-1])
print(json.dumps(out))
json.dump(out, open("/tmp/probe/evalweight.json", "w"), indent=1)
