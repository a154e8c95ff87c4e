"""SAMSum: resolve the source, validate, clean, slice, render prompts, tokenize with masked labels.

Everything here runs before a model is loaded, so data errors (with file:line) come first.
"""
from __future__ import annotations

import gzip
import json
import math
import os
import re
import statistics
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .config import DataConfig
from .errors import ConfigError, DataError
from .hub import cache_dir

SPLIT_ALIASES = {"validation": ("validation", "val", "dev"), "train": ("train",), "test": ("test",)}
EXTENSIONS = (".jsonl.gz", ".jsonl", ".json")
IGNORE_INDEX = -100


# ---------------------------------------------------------------- slicing
_SLICE = re.compile(r"^\s*(?:\[\s*:\s*)?(\d+(?:\.\d+)?)\s*(%?)\s*\]?\s*$")


def parse_slice(text: str | int, key: str = "data.split_slice") -> tuple[float, bool]:
    """`1%` -> (1.0, True); `10` or `[:10]` -> (10, False). The original's --split_slice syntax."""
    m = _SLICE.match(str(text))
    if not m or (str(text).strip().startswith("[") != str(text).strip().endswith("]")):
        raise ConfigError(f"{key}: expected '1%', '10' or '[:100]', got {text!r}")
    value, pct = float(m.group(1)), bool(m.group(2))
    if value <= 0 or (pct and value > 100) or (not pct and not value.is_integer()):
        raise ConfigError(f"{key}: {text!r} is out of range")
    return value, pct


def slice_count(n_rows: int, split_slice: str | None) -> int:
    if split_slice is None:
        return n_rows
    value, pct = parse_slice(split_slice)
    # datasets' `split[:1%]` rounds to the closest row count: 14732 -> 147, 818 -> 8.
    return min(n_rows, int(round(n_rows * value / 100)) if pct else int(value))


# ---------------------------------------------------------------- reading
class _OutOfRange(ValueError):
    """A JSON number no row can mean: past float range (1e999), or an integer of more than 100 digits."""


class _NotJson(ValueError):
    """NaN, Infinity, -Infinity: Python's json reads them, JSON has no such values."""


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _OutOfRange(text)
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > 100:  # int() refuses past 4,300 digits anyway; no count or id needs 100
        raise _OutOfRange(text[:20] + "...")
    return int(text)


def _not_json(text: str):
    raise _NotJson(text)


def _json(text: str, where, what: str):
    """json.loads with a one-line DataError; `where(error)` names the file and line (error None: unknown)."""
    try:
        return json.loads(text, parse_float=_finite_float, parse_int=_bounded_int, parse_constant=_not_json)
    except json.JSONDecodeError as e:
        raise DataError(f"{where(e)}: malformed {what} ({e.msg})") from None
    except _NotJson as e:
        raise DataError(f"{where(None)}: malformed {what} ({e} is not JSON)") from None
    except _OutOfRange as e:
        raise DataError(f"{where(None)}: number out of range in {what}: {e}") from None
    except RecursionError:
        raise DataError(f"{where(None)}: malformed {what} (nested too deeply)") from None


# The hub's copies of SAMSum: SAMSUM_DATA_DIR (a local folder) stands in for these and nothing else.
SAMSUM_HUB_IDS = ("knkarthick/samsum", "samsung/samsum", "samsum")


def resolve_source(cfg: DataConfig) -> str:
    """SAMSUM_DATA_DIR stands in for SAMSum from the hub (offline machines, CI). Any other source, a folder
    above all (even a misspelt one, which then fails naming itself), is the user's explicit choice."""
    env = os.environ.get("SAMSUM_DATA_DIR")
    if not (env and cfg.source.lower() in SAMSUM_HUB_IDS):
        return cfg.source
    if not Path(env).is_dir():  # a folder by definition: never read as a hub id (the hub's retries, then a wrong name)
        raise DataError(f"SAMSUM_DATA_DIR: {env} is not a folder (it stands in for {cfg.source}: point it at a folder "
                        "of train/validation/test .jsonl[.gz], or unset it to load from the hub)")
    return env


def find_split_file(folder: Path, split: str) -> Path | None:
    for name in SPLIT_ALIASES.get(split, (split,)):
        for stem in (name, f"samsun_{name}", f"samsum_{name}"):  # the original wrote samsun_{split}.jsonl
            for ext in EXTENSIONS:
                p = folder / f"{stem}{ext}"
                if p.is_file():
                    return p
    return None


def _open_bytes(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _check_row(obj: Any, where: str) -> dict[str, str]:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with dialogue and summary, got {type(obj).__name__}")
    for key in ("dialogue", "summary"):
        if key not in obj:
            raise DataError(f"{where}: missing key '{key}'")
        if not isinstance(obj[key], str):
            raise DataError(f"{where}: '{key}' must be a string, got {type(obj[key]).__name__}")
        try:  # JSON may escape a lone surrogate (\ud800): valid JSON, not text; tokenizers and Arrow choke on it
            obj[key].encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(f"{where}: '{key}' holds an invalid \\u escape (a lone surrogate)") from None
    return {"id": str(obj.get("id", "")), "dialogue": obj["dialogue"], "summary": obj["summary"]}


def read_rows(path: Path) -> list[dict[str, str]]:
    """JSON Lines (optionally gzip) or one JSON array; every error names file:line."""
    try:
        with _open_bytes(path) as fh:
            data = fh.read()
    except (OSError, EOFError, zlib.error) as e:  # zlib.error: a gzip body corrupt mid-stream
        raise DataError(f"{path}: cannot read ({e})") from None
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")  # a BOM some editors write
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: invalid UTF-8") from None
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    if text.lstrip().startswith("["):
        items = _json(text, lambda e: f"{path}:{e.lineno}" if e else str(path), "JSON")
        return [_check_row(obj, f"{path}: item {i + 1}") for i, obj in enumerate(items)]
    rows = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        obj = _json(line, lambda e, n=lineno: f"{path}:{n}", "JSON line")
        rows.append(_check_row(obj, f"{path}:{lineno}"))
    return rows


def load_split(cfg: DataConfig, split: str) -> tuple[list[dict[str, str]], str]:
    """Raw rows of one split and where they came from."""
    source = resolve_source(cfg)
    folder = Path(source).expanduser()
    if folder.exists() and not folder.is_dir():
        raise DataError(f"data.source: {folder} is a file; expected a folder of train/validation/test "
                        ".jsonl[.gz]/.json files or a hub dataset id")
    if folder.is_dir():
        path = find_split_file(folder, split)
        if path is None:
            raise DataError(f"{folder}: no {split}.jsonl, {split}.jsonl.gz or {split}.json found")
        return read_rows(path), str(path)
    if source.startswith((".", "/", "~")) or os.sep in source and not re.match(r"^[\w.-]+/[\w.-]+$", source):
        raise DataError(f"data.source: folder {source} does not exist")
    return _load_hub_split(source, split), f"{source}[{split}]"


def _load_hub_split(dataset_id: str, split: str) -> list[dict[str, str]]:
    import datasets

    try:
        ds = datasets.load_dataset(dataset_id, split=split)
    except Exception as e:  # offline, unknown id, unknown split: one line for people
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"data.source: cannot load hub dataset '{dataset_id}' split '{split}' ({first}); "
            "point SAMSUM_DATA_DIR or data.source at a local folder of train/validation/test .jsonl[.gz]"
        ) from None
    return [_check_row(obj, f"{dataset_id}[{split}] row {i + 1}") for i, obj in enumerate(ds)]


# ---------------------------------------------------------------- cleaning
@dataclass
class CleanReport:
    rows_in: int = 0
    rows_out: int = 0
    crlf_normalized: int = 0
    whitespace_stripped: int = 0
    dropped_empty_dialogue: int = 0
    dropped_empty_summary: int = 0
    truncated_dialogue: int = 0
    dropped_too_long: int = 0

    def line(self) -> str:
        parts = [f"{k}={v}" for k, v in self.__dict__.items()]
        return ", ".join(parts)


_INVISIBLE = str.maketrans({"\ufeff": None, "\u200e": None})


def clean_rows(rows: Iterable[dict[str, str]], report: CleanReport) -> list[dict[str, str]]:
    """SAMSum's real quirks: mixed \\r\\n, padding whitespace, empty dialogue/summary rows, stray BOMs."""
    out = []
    for row in rows:
        report.rows_in += 1
        dialogue, summary = row["dialogue"], row["summary"]
        if "\r" in dialogue or "\r" in summary:
            report.crlf_normalized += 1
            dialogue = dialogue.replace("\r\n", "\n").replace("\r", "\n")
            summary = summary.replace("\r\n", "\n").replace("\r", "\n")
        d2, s2 = dialogue.translate(_INVISIBLE).strip(), summary.translate(_INVISIBLE).strip()
        if (d2, s2) != (dialogue, summary):
            report.whitespace_stripped += 1
        if not d2:
            report.dropped_empty_dialogue += 1
            continue
        if not s2:
            report.dropped_empty_summary += 1
            continue
        out.append({"id": row["id"], "dialogue": d2, "summary": s2})
    report.rows_out = len(out)
    return out


# ---------------------------------------------------------------- prompts and tokens
def render_prompt(cfg: DataConfig, tokenizer, dialogue: str) -> str:
    text = cfg.prompt_template.replace("{dialog}", dialogue)
    if cfg.chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
    return text


def _with_bos(cfg: DataConfig, tokenizer, ids: list[int]) -> list[int]:
    # The original prepended BOS by hand; the chat template carries its own specials.
    if not cfg.chat_template and tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", True):
        return [tokenizer.bos_token_id] + ids
    return ids


def _encode_prompt(cfg: DataConfig, tokenizer, dialogue: str) -> list[int]:
    return _with_bos(cfg, tokenizer, tokenizer(render_prompt(cfg, tokenizer, dialogue), add_special_tokens=False)
                     ["input_ids"])


def tokenize_row(cfg: DataConfig, tokenizer, row: dict[str, str], encoded: tuple[list[int], list[int]] | None = None
                 ) -> dict[str, Any]:
    """input_ids = prompt + summary + EOS; labels -100 over the prompt (completion-only loss).

    Too long a row loses dialogue tokens from its end, never summary tokens. `encoded`: the row's prompt and
    summary ids already tokenized (tokenize_rows does a batch in one call).
    """
    prompt_ids, summary_ids = encoded or (_encode_prompt(cfg, tokenizer, row["dialogue"]),
                                          tokenizer(row["summary"], add_special_tokens=False)["input_ids"])
    summary_ids = summary_ids + [tokenizer.eos_token_id]
    truncated = False
    if len(prompt_ids) + len(summary_ids) > cfg.max_length:
        overhead = len(_encode_prompt(cfg, tokenizer, "")) + 2  # the template itself, plus a join margin
        budget = cfg.max_length - len(summary_ids) - overhead
        dialogue_ids = tokenizer(row["dialogue"], add_special_tokens=False)["input_ids"]
        while budget > 0:
            text = tokenizer.decode(dialogue_ids[:budget], skip_special_tokens=True)
            prompt_ids = _encode_prompt(cfg, tokenizer, text)
            if len(prompt_ids) + len(summary_ids) <= cfg.max_length:
                break
            budget -= max(1, len(prompt_ids) + len(summary_ids) - cfg.max_length)
        if budget <= 0:
            return {"input_ids": [], "labels": [], "n_prompt": 0, "truncated": False, "dropped": True}
        truncated = True
    prompt_labels = [IGNORE_INDEX] * len(prompt_ids) if cfg.completion_only_loss else list(prompt_ids)
    return {
        "input_ids": prompt_ids + summary_ids,
        "labels": prompt_labels + summary_ids,
        "n_prompt": len(prompt_ids),
        "truncated": truncated,
        "dropped": False,
    }


def tokenize_rows(cfg: DataConfig, tokenizer, batch: dict[str, list[str]]) -> dict[str, list]:
    """tokenize_row over a batch of rows (datasets' batched map): the prompts and the summaries each in one
    tokenizer call rather than one per row: less Python work per row, and the tokenizer can use its threads."""
    prompts = tokenizer([render_prompt(cfg, tokenizer, d) for d in batch["dialogue"]], add_special_tokens=False)
    summaries = tokenizer(batch["summary"], add_special_tokens=False)
    rows = [tokenize_row(cfg, tokenizer, {"dialogue": d, "summary": s}, (_with_bos(cfg, tokenizer, p), t))
            for d, s, p, t in zip(batch["dialogue"], batch["summary"], prompts["input_ids"], summaries["input_ids"])]
    return {key: [r[key] for r in rows] for key in ("input_ids", "labels", "n_prompt", "truncated", "dropped")}


# ---------------------------------------------------------------- the whole split
@dataclass
class PreparedSplit:
    name: str
    origin: str
    dataset: Any  # datasets.Dataset with input_ids, labels
    report: CleanReport
    lengths: list[int] = field(default_factory=list)
    supervised: list[int] = field(default_factory=list)  # per row: tokens with a label (the summary)

    def stats(self) -> dict[str, float]:
        return length_stats(self.lengths)


def length_stats(lengths: list[int]) -> dict[str, float]:
    if not lengths:
        return {}
    s = sorted(lengths)
    pick = lambda q: s[min(len(s) - 1, int(math.ceil(q * len(s))) - 1)]  # noqa: E731
    return {"rows": len(s), "tokens": sum(s), "min": s[0], "mean": round(statistics.fmean(s), 1),
            "p50": pick(0.5), "p99": pick(0.99), "max": s[-1]}


def load_clean_split(cfg: DataConfig, split: str, split_slice: str | None = None
                     ) -> tuple[list[dict[str, str]], CleanReport, str]:
    """Read, slice (as the original: before cleaning), clean; an empty result is an error."""
    rows, origin = load_split(cfg, split)
    n = slice_count(len(rows), split_slice)
    report = CleanReport()
    cleaned = clean_rows(rows[:n], report)
    if not cleaned:
        why = f" after slicing to {split_slice!r}" if split_slice else ""
        raise DataError(f"{origin}: split '{split}' has no usable rows{why} (cleaning: {report.line()})")
    return cleaned, report, origin


def _fingerprint(cfg: DataConfig, tokenizer, rows: list[dict[str, str]]) -> str:
    from datasets.fingerprint import Hasher

    settings = (cfg.prompt_template, cfg.chat_template, cfg.completion_only_loss, cfg.max_length)
    return Hasher.hash((rows, settings, Hasher.hash(tokenizer), tokenizer.eos_token_id, tokenizer.bos_token_id))


def tokenize_split(cfg: DataConfig, tokenizer, name: str, rows: list[dict[str, str]], report: CleanReport,
                   origin: str) -> PreparedSplit:
    """Tokenized once per (rows, tokenizer, settings): later runs read the datasets cache file."""
    import datasets
    import pyarrow.compute as pc

    fp = _fingerprint(cfg, tokenizer, rows)
    cache = cache_dir() / "tokenized"
    cache.mkdir(parents=True, exist_ok=True)

    def tokenized():
        ds = datasets.Dataset.from_list(rows).map(
            lambda batch: tokenize_rows(cfg, tokenizer, batch),
            batched=True,
            num_proc=cfg.num_proc,
            desc=f"tokenizing {name}",
            remove_columns=["dialogue", "summary"],
            cache_file_name=str(cache / f"{fp}.arrow"),
            new_fingerprint=fp,
        )
        return ds, ds["truncated"], ds["dropped"]  # read through: a damaged file fails here, not later

    cached = sorted(cache.glob(f"{fp}*.arrow"))  # one file, or one per process with data.num_proc
    try:
        ds, truncated, dropped = tokenized()
    except Exception as e:
        if not cached:
            raise
        # A cache file cut short (a killed run, a full disk) or overwritten: it is only a cache, so tokenize again.
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        print(f"samsum_tuner: note: the tokenized cache of {name} ({cached[0]}) is unreadable ({reason}); "
              "tokenizing again", flush=True)
        for f in cached:
            f.unlink(missing_ok=True)
        ds, truncated, dropped = tokenized()
    report.truncated_dialogue = sum(truncated)
    report.dropped_too_long = sum(dropped)
    if report.dropped_too_long:
        ds = ds.select([i for i, d in enumerate(dropped) if not d])
    report.rows_out = len(ds)
    if len(ds) == 0:
        raise DataError(f"{origin}: split '{name}' has no rows that fit data.max_length={cfg.max_length}")
    # Counted in Arrow rather than token by token in Python: the labels are the row's prompt (masked with
    # completion-only loss) and then its summary.
    counts = ds.select_columns(["labels", "n_prompt"]).with_format("arrow")[:]
    lengths = pc.list_value_length(counts["labels"])
    supervised = pc.subtract(lengths, counts["n_prompt"]) if cfg.completion_only_loss else lengths
    ds = ds.remove_columns(["id", "n_prompt", "truncated", "dropped"])  # the collators take input_ids + labels
    return PreparedSplit(name=name, origin=origin, dataset=ds, report=report, lengths=lengths.to_pylist(),
                         supervised=supervised.to_pylist())


def read_splits(cfg: DataConfig) -> dict[str, tuple[list[dict[str, str]], CleanReport, str]]:
    """Train (and eval, if configured) read, checked, sliced and cleaned: no tokenizer, no model."""
    raw = {"train": load_clean_split(cfg, cfg.train_split, cfg.split_slice)}
    if cfg.eval_split:
        raw["eval"] = load_clean_split(cfg, cfg.eval_split, cfg.eval_slice or cfg.split_slice)
    return raw


def tokenize_splits(cfg: DataConfig, tokenizer, raw) -> dict[str, PreparedSplit]:
    return {name: tokenize_split(cfg, tokenizer, name, rows, report, origin)
            for name, (rows, report, origin) in raw.items()}
