"""Loss curves that should coincide, drawn from the GPU records, with their largest gaps printed:

    python benchmarks/curves.py parity      # packed vs padded SmolLM2 training (docs/parity.png)
    python benchmarks/curves.py fsdp_lora   # FSDP LoRA (GPU) vs plain LoRA (same command on a CPU)

Each record is a line of a `gpu_matrix.py` results file (its `log_history`), or a run directory's
log_history.json for a run made elsewhere.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SESSION = ROOT / "benchmarks" / "results" / "2026-11-29c-h200x2"


def history(source: Path, name: str | None = None) -> list[dict]:
    if name is None:
        return json.loads(source.read_text())
    return next(r["log_history"] for r in map(json.loads, source.read_text().splitlines()) if r["name"] == name)


def steps(h: list[dict], key: str = "loss") -> tuple[list[int], list[float]]:
    rows = [(x["step"], x[key]) for x in h if key in x]
    return [s for s, _ in rows], [v for _, v in rows]


def compare(a: list[dict], b: list[dict], labels: tuple[str, str], title: str, out: Path) -> dict:
    (sa, la), (sb, lb) = steps(a), steps(b)
    assert sa == sb, "the two runs logged different steps"
    rel = [abs(x - y) / y for x, y in zip(la, lb)]
    ea, eb = steps(a, "eval_loss")[1], steps(b, "eval_loss")[1]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(sa, la, label=f"{labels[0]} (train)", lw=1.2)
    ax.plot(sb, lb, label=f"{labels[1]} (train)", lw=1.2, ls="--")
    for xs, ys, lab, m in ((steps(a, "eval_loss")[0], ea, labels[0], "o"),
                           (steps(b, "eval_loss")[0], eb, labels[1], "x")):
        ax.scatter(xs, ys, marker=m, s=50, zorder=3, label=f"{lab} (eval_loss)")
    ax.set(title=title, xlabel="optimizer step", ylabel="loss (nats per summary token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    figures = {"steps": len(sa), "max_rel_step_gap": round(max(rel), 5),
               "mean_rel_step_gap": round(sum(rel) / len(rel), 5),
               "eval_loss": [ea[-1] if ea else None, eb[-1] if eb else None]}
    if ea and eb:
        figures["eval_rel_gap"] = round(abs(ea[-1] - eb[-1]) / eb[-1], 5)
    print(json.dumps({"plot": str(out.relative_to(ROOT)), **figures}))
    return figures


def main() -> None:
    which = sys.argv[1] if len(sys.argv) > 1 else "parity"
    if which == "parity":
        lane = SESSION / "call2_lane2.jsonl"
        compare(history(lane, "parity_packed"), history(lane, "parity_padded"), ("packed", "padded"),
                "SmolLM2-135M on an H200, bf16: packed vs padded, 16 rows per step", ROOT / "docs" / "parity.png")
    else:
        compare(history(SESSION / "call2.jsonl", "fsdp1_lora_fp16_smollm2"),
                history(SESSION / "lora_cpu_smollm2_log_history.json"),
                ("FSDP LoRA fp16, H200", "plain LoRA fp32, CPU"),
                "SmolLM2-135M LoRA: FSDP (1 process, accelerate) vs plain, same seed and data",
                ROOT / "docs" / "fsdp_lora_parity.png")


if __name__ == "__main__":
    main()
