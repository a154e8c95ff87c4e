"""`samsum-tuner report RUN_DIR`: a markdown summary and PNG plots of a finished (or stopped) run.

Reads what training leaves in the run directory: run_summary.json, log_history.json (the Trainer's log
lines), memory.jsonl (the memory callback) and eval_metrics_*.json (samsum-tuner eval), if present.
"""
from __future__ import annotations

import json
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import ConfigError


def _read_json(path: Path, default, expect: type):
    from .evaluation import read_json

    return read_json(path, expect) if path.exists() else default


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            except ValueError as e:  # an integer of more digits than Python converts (4300)
                raise ConfigError(f"{path}:{n}: not valid JSON ({str(e).partition(':')[0]})") from None
            except RecursionError:
                raise ConfigError(f"{path}:{n}: not valid JSON (nested too deeply)") from None
            if not isinstance(row, dict):
                raise ConfigError(f"{path}:{n}: expected an object, got {type(row).__name__}")
            _check_numbers(row, f"{path}:{n}", MEMORY_NUMBERS)
            rows.append(row)
    return rows


# The fields the report computes with or plots: each a number (or null), whatever else a row holds.
HISTORY_NUMBERS = ("step", "loss", "eval_loss", "ppl", "eval_ppl", "learning_rate")
MEMORY_NUMBERS = ("step", "epoch", "rank", "gpu_peak_allocated_gib", "gpu_peak_reserved_gib", "gpu_peak_active_gib",
                  "gpu_malloc_retries", "gpu_malloc_retries_total", "host_peak_rss_gib", "host_peak_rss_node_gib")


def _check_numbers(row: dict[str, Any], where: str, keys) -> None:
    for k in keys:
        v = row.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ConfigError(f"{where}: '{k}' must be a number, got {v!r}")


def _read_history(path: Path) -> list[dict[str, Any]]:
    history = _read_json(path, [], list)
    for i, h in enumerate(history, 1):
        if not isinstance(h, dict):
            raise ConfigError(f"{path}: entry {i}: expected an object, got {type(h).__name__}")
        _check_numbers(h, f"{path}: entry {i}", HISTORY_NUMBERS)
    return history


def _read_summary(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path.parent}: no run_summary.json: not a samsum_tuner run directory (or the run never "
                          "started)")
    summary = _read_json(path, None, dict)
    for key, kind in (("recipe", dict), ("metrics", dict), ("trainable_params", int), ("total_params", int)):
        value = summary.setdefault(key, kind())
        if value is None:  # null reads as absent
            value = summary[key] = kind()
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ConfigError(f"{path}: '{key}' must be {'an object' if kind is dict else 'an integer'}, got {value!r}")
    if not isinstance(summary["recipe"].get("model") or {}, dict):
        raise ConfigError(f"{path}: 'recipe.model' must be an object")
    return summary


PLOTS = ("loss.png", "perplexity.png", "learning_rate.png", "memory.png", "malloc_retries.png")


def _series(history: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(h["step"], h[key]) for h in history if h.get(key) is not None and "step" in h]
    return [p[0] for p in pts], [p[1] for p in pts]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def _figure(title: str, ylabel: str):
    fig, ax = _pyplot().subplots(figsize=(7, 4), dpi=110)
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def _save(fig, ax, path: Path) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    _pyplot().close(fig)


@contextmanager
def _or_skip(path: Path):
    """Draws one plot. Valid numbers matplotlib cannot place (a loss of 1e308, a step of 10**400) leave that plot
    out with a note, not the whole report; a plot that could not be written (OSError) still stops it."""
    plt = _pyplot()
    before = set(plt.get_fignums())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # numpy's overflows on the way there
            yield
    except (ValueError, ArithmeticError) as e:
        for num in set(plt.get_fignums()) - before:  # its figure only: a notebook's own stay open
            plt.close(num)
        path.unlink(missing_ok=True)  # half written, or an older report's
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        print(f"samsum_tuner: report: {path.name} left out: its values cannot be drawn ({why})", flush=True)


def _plots(out: Path, history: list[dict[str, Any]], memory: list[dict[str, Any]]) -> list[str]:
    made: list[str] = []
    for name, draw in (("loss.png", _loss_plot), ("perplexity.png", _perplexity_plot),
                       ("learning_rate.png", _learning_rate_plot), ("memory.png", _memory_plot),
                       ("malloc_retries.png", _retries_plot)):
        with _or_skip(out / name):
            if draw(out / name, history, memory):
                made.append(name)
    return made


def _train_and_eval(path: Path, history: list[dict[str, Any]], keys: tuple[str, str], what: str, title: str,
                    ylabel: str) -> bool:
    """One plot of a training series and its evaluation series (markers: one point per evaluation)."""
    curves = [(k, f"{split} {what}") for k, split in zip(keys, ("train", "eval")) if _series(history, k)[0]]
    if not curves:
        return False
    fig, ax = _figure(title, ylabel)
    for key, label in curves:
        x, y = _series(history, key)
        ax.plot(x, y, marker="o" if key == keys[1] else None, markersize=4, label=label)
    if what == "perplexity":
        ax.set_yscale("log")
    _save(fig, ax, path)
    return True


def _loss_plot(path: Path, history: list[dict[str, Any]], memory: list[dict[str, Any]]) -> bool:
    return _train_and_eval(path, history, ("loss", "eval_loss"), "loss", "Loss (mean over supervised tokens)",
                           "cross-entropy (nats/token)")


def _perplexity_plot(path: Path, history: list[dict[str, Any]], memory: list[dict[str, Any]]) -> bool:
    return _train_and_eval(path, history, ("ppl", "eval_ppl"), "perplexity", "Perplexity = exp(loss)",
                           "perplexity (log scale)")


def _learning_rate_plot(path: Path, history: list[dict[str, Any]], memory: list[dict[str, Any]]) -> bool:
    x, y = _series(history, "learning_rate")
    if not x:
        return False
    fig, ax = _figure("Learning rate", "learning rate")
    ax.plot(x, y, label="learning rate")
    _save(fig, ax, path)
    return True


def _ranks(memory: list[dict[str, Any]]) -> list:
    return sorted({m["rank"] for m in memory if m.get("rank") is not None})


def _memory_plot(path: Path, history: list[dict[str, Any]], memory: list[dict[str, Any]]) -> bool:
    ranks = _ranks(memory)
    if not ranks:
        return False
    # The every-N-steps windows make the timeline; epoch peaks span a whole epoch and would overlap them.
    window = "step" if any(m.get("event") == "step" for m in memory) else "epoch"
    fig, ax = _figure(f"Memory: peaks per {'logging window' if window == 'step' else 'epoch'}", "GiB")
    for rank in ranks:
        mine = [m for m in memory if m.get("rank") == rank and m.get("event") == window]
        # rows of older runs may lack the host peak; a damaged row its step
        mine = [m for m in mine if m.get("host_peak_rss_gib") is not None and m.get("step") is not None]
        steps = [m.get("step") for m in mine]
        suffix = f" (rank {rank})" if len(ranks) > 1 else ""
        if any(m.get("gpu_peak_allocated_gib") is not None for m in mine):
            ax.plot(steps, [m.get("gpu_peak_allocated_gib") for m in mine], marker="o",
                    label="GPU allocated" + suffix)
            ax.plot(steps, [m.get("gpu_peak_reserved_gib") for m in mine], marker="s",
                    label="GPU reserved" + suffix)
        ax.plot(steps, [m["host_peak_rss_gib"] for m in mine], marker="^", label="host RSS" + suffix)
    if not any(m.get("gpu_peak_allocated_gib") is not None for m in memory):
        ax.set_title(ax.get_title() + " (no CUDA: host only)")
    ax.set_ylim(bottom=0)
    _save(fig, ax, path)
    return True


def _retries_plot(path: Path, history: list[dict[str, Any]], memory: list[dict[str, Any]]) -> bool:
    ranks = _ranks(memory)
    epochs = [m for m in memory if ranks and m.get("event") == "epoch" and m.get("rank") == ranks[0]
              and m.get("gpu_malloc_retries") is not None and m.get("epoch") is not None]
    if not epochs:
        return False
    fig, ax = _figure("CUDA malloc retries per epoch (rank %d)" % ranks[0], "retries")
    ax.bar([m["epoch"] for m in epochs], [m["gpu_malloc_retries"] for m in epochs], label="within the epoch")
    ax.set_xlabel("epoch")
    _save(fig, ax, path)
    return True


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def report(run_dir: str | Path) -> Path:
    """Write report.md and PNG plots into the run directory; return the markdown's path."""
    out = Path(run_dir)
    if not out.is_dir():
        raise ConfigError(f"{out}: {'is not a folder' if out.exists() else 'no such run directory'}")
    summary = _read_summary(out / "run_summary.json")
    history = _read_history(out / "log_history.json")
    memory = _read_jsonl(out / "memory.jsonl")
    evals = [(p, _read_json(p, {}, dict)) for p in sorted(out.glob("eval_metrics_*.json"))]
    for name in ("report.md", *PLOTS):  # every file it writes, checked before it writes any
        if (out / name).exists() and not (out / name).is_file():
            raise ConfigError(f"{out / name}: exists and is not a file")
    try:
        plots = _plots(out, history, memory)
    except OSError as e:
        raise ConfigError(f"{e.filename or out}: cannot write ({e.strerror or e})") from None
    recipe, m = summary["recipe"], summary["metrics"]
    lines = [f"# Run report: {out.name}", "",
             f"- status: **{summary.get('status')}**" + (f" ({summary['error']})" if summary.get("error") else ""),
             f"- model: {(recipe.get('model') or {}).get('name')}; trainable {summary['trainable_params']:,} "
             f"of {summary['total_params']:,} parameters",
             f"- device: {summary.get('device')}; {summary.get('world_size')} process(es); "
             f"versions {summary.get('versions')}", ""]
    keys = [k for k in ("first_loss", "last_loss", "train_loss", "train_ppl", "eval_loss", "eval_ppl", "s_per_step",
                        "real_tokens_per_s", "train_runtime") if k in m]
    if keys:
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {_fmt(m[k])} |" for k in keys] + [""]
    epochs = [r for r in memory if r.get("event") == "epoch" and r.get("rank") is not None]
    if epochs:
        lines += ["## Memory per epoch", "", "| epoch | rank | GPU allocated GiB | reserved GiB | active GiB | "
                  "malloc retries (epoch / total) | host peak RSS GiB | node host peak GiB |",
                  "|---|---|---|---|---|---|---|---|"]
        na = lambda v: "n/a" if v is None else v  # noqa: E731  (null on CPU: never a zero that pretends)
        for r in epochs:
            g = lambda k: na(r.get(k))  # noqa: E731
            lines.append(f"| {g('epoch')} | {g('rank')} | {g('gpu_peak_allocated_gib')} | "
                         f"{g('gpu_peak_reserved_gib')} | {g('gpu_peak_active_gib')} | "
                         f"{g('gpu_malloc_retries')} / {g('gpu_malloc_retries_total')} | "
                         f"{g('host_peak_rss_gib')} | {g('host_peak_rss_node_gib')} |")
        lines.append("")
    for path, ev in evals:
        lines += [f"## ROUGE ({path.stem.removeprefix('eval_metrics_')}, {ev.get('rows')} rows)", "",
                  "| ROUGE-1 | ROUGE-2 | ROUGE-L | ROUGE-Lsum | ended at EOS % | mean new tokens |",
                  "|---|---|---|---|---|---|",
                  f"| {ev.get('rouge1')} | {ev.get('rouge2')} | {ev.get('rougeL')} | {ev.get('rougeLsum')} | "
                  f"{ev.get('ended_at_eos')} | {ev.get('mean_new_tokens')} |", ""]
    lines += [f"![{p.removesuffix('.png')}]({p})" for p in plots]
    if not history:
        lines.append("(no log_history.json: no loss curves)")
    try:
        (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{out / 'report.md'}: cannot write ({e.strerror})") from None
    return out / "report.md"
