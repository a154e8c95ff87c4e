"""Fuzz: hundreds of broken recipes, overrides, data files, paths and model folders. The CLI's entry function answers
every one with one line `samsum-tuner: error: ...` and exit code 2, before any model is loaded, and leaves an existing
run directory exactly as it was. A few go through fresh processes."""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import pytest

from samsum_tuner import checkpoint as ck
from samsum_tuner import cli

from .conftest import ROOT, cli_in_fresh_processes, synthetic_rows, write_jsonl, write_small_checkpoint

SEED, N_CASES = 16, 440
NUMERIC = {  # key: (a valid value, an out-of-range value the message must name)
    "train.learning_rate": -1e-4, "train.per_device_train_batch_size": 0, "train.gradient_accumulation_steps": -2,
    "train.num_train_epochs": 0, "train.logging_steps": 0, "data.max_length": -5, "lora.r": 0, "lora.alpha": -1,
    "lora.dropout": 1.5, "train.gamma": 2.0, "train.max_steps": -7, "train.save_total_limit": 0,
    "train.eval_steps": -1, "train.weight_decay": -0.1, "memory.gpu_limit_gib": -3, "guard.max_nonfinite_steps": -1,
    "guard.max_skipped_steps": -4, "quantization.bits": 3, "fsdp.version": 5, "train.warmup_steps": -1,
    "memory.log_every_steps": -1,
}
FLOATS = ["train.learning_rate", "train.num_train_epochs", "lora.dropout", "train.gamma", "train.weight_decay",
          "memory.sample_interval_s", "train.max_grad_norm", "train.momentum"]
INTS = ["train.per_device_train_batch_size", "data.max_length", "lora.r", "train.max_steps", "train.seed",
        "guard.max_skipped_steps", "train.logging_steps"]
KEYS = ["train.learning_rate", "train.per_device_train_batch_size", "train.gradient_accumulation_steps",
        "data.max_length", "lora.target_modules", "lora.dropout", "model.gradient_checkpointing",
        "train.num_train_epochs", "data.split_slice", "train.save_total_limit", "memory.gpu_limit_gib",
        "quantization.quant_type", "train.overwrite_output_dir", "guard.max_nonfinite_steps",
        "data.completion_only_loss"]


@dataclass
class Case:
    name: str
    args: list[str]  # after `train`
    expect: str  # a piece of the one-line message
    tokenizer: bool = False  # the fault is in the tokenizer, so the tokenizer may load (the model never does)


class World:
    """The paths every case points at: a good model folder and data, an existing run, a scratch folder."""

    def __init__(self, tmp: Path, model_dir: Path, data: Path, run: Path):
        self.tmp, self.model_dir, self.data, self.run, self.n = tmp, model_dir, data, run, 0

    def fresh(self, name: str) -> Path:
        self.n += 1
        p = self.tmp / f"{self.n:03d}-{name}"
        p.mkdir()
        return p

    def base(self, rng: random.Random, data: Path | None = None) -> list[str]:
        # Half the cases aim at the existing run (with a flag that allows writing into it), half at a new folder.
        out = rng.choice([[f"train.output_dir={self.run}", "train.overwrite_output_dir=true"],
                          [f"train.output_dir={self.run}", "resume=auto"],
                          [f"train.output_dir={self.tmp / 'never-created'}"]])
        return [f"model.name={self.model_dir}", f"data.source={data or self.data}", *out]


# ---------------------------------------------------------------- broken data files
def _data_with(w: World, rng: random.Random, name: str, lines: list[bytes] | bytes, fname: str = "train.jsonl") -> Path:
    d = w.fresh(name)
    write_jsonl(d, "validation", synthetic_rows(4))
    (d / fname).write_bytes(lines if isinstance(lines, bytes) else b"\n".join(lines) + b"\n")
    return d


def _good_lines(rng: random.Random) -> list[bytes]:
    return [json.dumps(r).encode() for r in synthetic_rows(rng.randint(3, 12))]


def malformed_line(w, rng):
    lines = _good_lines(rng)
    k = rng.randrange(len(lines))
    junk = rng.choice([b'{"dialogue": "a", "summary": ', b"{dialogue: 1}", b"[1, 2", b"\"unterminated", b"{,}",
                       lines[k][: rng.randint(1, len(lines[k]) - 1)], b"NaNx", b'{"a": 1}}'])
    if k == 0 and junk.startswith(b"["):  # a first line that opens with [ makes the file read as one JSON array
        junk = b"{,}"
    lines[k] = junk
    return Case("malformed-json", w.base(rng, _data_with(w, rng, "malformed", lines)),
                f"train.jsonl:{k + 1}: malformed JSON line")


def missing_key(w, rng):
    lines, k = _good_lines(rng), None
    k = rng.randrange(len(lines))
    row = json.loads(lines[k])
    key = rng.choice(["dialogue", "summary"])
    del row[key]
    lines[k] = json.dumps(row).encode()
    return Case("missing-key", w.base(rng, _data_with(w, rng, "missing", lines)),
                f"train.jsonl:{k + 1}: missing key '{key}'")


def wrong_type(w, rng):
    lines = _good_lines(rng)
    k = rng.randrange(len(lines))
    row = json.loads(lines[k])
    key = rng.choice(["dialogue", "summary"])
    value = rng.choice([1, 2.5, None, True, ["a"], {"t": "a"}])
    row[key] = value
    lines[k] = json.dumps(row).encode()
    tname = {int: "int", float: "float", type(None): "NoneType", bool: "bool", list: "list", dict: "dict"}[type(value)]
    return Case("wrong-type", w.base(rng, _data_with(w, rng, "wrongtype", lines)),
                f"train.jsonl:{k + 1}: '{key}' must be a string, got {tname}")


def not_an_object(w, rng):
    lines = _good_lines(rng)
    k = rng.randrange(len(lines))
    lines[k] = rng.choice([b"[1, 2]", b"42", b'"text"', b"null", b"true"])
    if k == 0 and lines[0].startswith(b"["):  # a first line that opens with [ makes the file read as one JSON array
        lines[0] = b"42"
    return Case("not-object", w.base(rng, _data_with(w, rng, "notobj", lines)),
                f"train.jsonl:{k + 1}: expected a JSON object")


def empty_file(w, rng):
    return Case("empty-file", w.base(rng, _data_with(w, rng, "empty", rng.choice([b"", b"\n\n", b"   \n\t\n"]))),
                "train.jsonl: file is empty")


def empty_after_cleaning(w, rng):
    rows = [{"dialogue": rng.choice(["", "  ", "\r\n"]), "summary": "s"} if rng.random() < 0.5 else
            {"dialogue": "Ann: hi", "summary": rng.choice(["", " \ufeff "])} for _ in range(rng.randint(1, 6))]
    return Case("empty-after-cleaning",
                w.base(rng, _data_with(w, rng, "cleaned", [json.dumps(r).encode() for r in rows])),
                "split 'train' has no usable rows")


def empty_after_slicing(w, rng):
    d = _data_with(w, rng, "sliced", _good_lines(rng)[:3])
    return Case("empty-after-slicing", [*w.base(rng, d), f"data.split_slice={rng.choice(['1%', '10%', '0.5%'])}"],
                "has no usable rows after slicing")


def invalid_utf8(w, rng):
    lines = _good_lines(rng)
    k = rng.randrange(len(lines))
    cut = rng.randint(1, len(lines[k]) - 2)
    lines[k] = lines[k][:cut] + rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80\x80"]) + lines[k][cut:]
    return Case("invalid-utf8", w.base(rng, _data_with(w, rng, "utf8", lines)), f"train.jsonl:{k + 1}: invalid UTF-8")


def lone_surrogate(w, rng):
    lines = _good_lines(rng)
    k = rng.randrange(len(lines))
    key = rng.choice(["dialogue", "summary"])
    lines[k] = ('{"%s": "x\\ud800y", "%s": "ok"}' % (key, "summary" if key == "dialogue" else "dialogue")).encode()
    return Case("lone-surrogate", w.base(rng, _data_with(w, rng, "surrogate", lines)),
                f"train.jsonl:{k + 1}: '{key}' holds an invalid")


def deeply_nested(w, rng):
    lines = _good_lines(rng)
    k = rng.randrange(len(lines))
    depth = rng.randint(20_000, 60_000)
    lines[k] = b'{"a": [' * depth + b"1" + b"]}" * depth  # an object, so the file still reads as JSON Lines
    return Case("deep-json", w.base(rng, _data_with(w, rng, "deep", lines)),
                f"train.jsonl:{k + 1}: malformed JSON line")


def bad_gzip(w, rng):
    good = gzip.compress(b"\n".join(_good_lines(rng)))
    blob = rng.choice([b"not gzip at all", good[: len(good) // 2]])
    d = _data_with(w, rng, "gz", blob, fname="train.jsonl.gz")
    return Case("bad-gzip", w.base(rng, d), "train.jsonl.gz: cannot read")


def bad_json_array(w, rng):
    text = json.dumps(synthetic_rows(3), indent=1)
    cut = rng.randint(2, len(text) - 2)
    d = _data_with(w, rng, "array", text[:cut].encode(), fname="train.json")
    return Case("bad-json-array", w.base(rng, d), "train.json:")


def missing_split(w, rng):
    d = w.fresh("nosplit")
    write_jsonl(d, "train", synthetic_rows(3))
    return Case("missing-split", w.base(rng, d), "no validation.jsonl")


def missing_data_folder(w, rng):
    return Case("missing-data", w.base(rng, w.tmp / f"no-such-data-{rng.randrange(10**6)}"), "does not exist")


# ---------------------------------------------------------------- broken recipes and overrides
def _recipe(w: World, rng, name: str, body: bytes) -> str:
    p = w.fresh(name) / rng.choice(["recipe.yaml", "r.yml"])
    p.write_bytes(body)
    return str(p)


def invalid_yaml(w, rng):
    body = rng.choice([b"train: [1, 2\n", b"train:\n  lr: 1\n\tbad: 2\n", b"a: b: c\n", b"{unclosed\n",
                       b"train:\n  - x\n  y: 2\n", b"!!python/object/apply:os.system ['true']\n", b"key: 'open\n",
                       b"train: !!python/name:os.system\n", b"%YAML 9.9\n---\na: 1\n"])
    return Case("invalid-yaml", [_recipe(w, rng, "yaml", body), *w.base(rng)], "invalid YAML")


def yaml_not_mapping(w, rng):
    body = rng.choice([b"- 1\n- 2\n", b"42\n", b"just text\n", b"[train, lora]\n"])
    return Case("yaml-not-mapping", [_recipe(w, rng, "notmap", body), *w.base(rng)], "a recipe is a mapping")


def yaml_not_utf8(w, rng):
    return Case("yaml-not-utf8",
                [_recipe(w, rng, "latin", "train:\n  description: caf\xe9\n".encode("latin-1") + b"\xff"),
                 *w.base(rng)], "not UTF-8")


def missing_recipe(w, rng):
    return Case("missing-recipe", [str(w.tmp / f"nope-{rng.randrange(10**6)}.yaml"), *w.base(rng)],
                "recipe file not found")


def _misspell(rng, key: str) -> str:
    section, leaf = key.split(".")
    for _ in range(50):
        i = rng.randrange(len(leaf))
        op = rng.choice(["drop", "swap", "double", "replace"])
        if op == "drop":
            new = leaf[:i] + leaf[i + 1:]
        elif op == "swap" and i < len(leaf) - 1:
            new = leaf[:i] + leaf[i + 1] + leaf[i] + leaf[i + 2:]
        elif op == "double":
            new = leaf[:i] + leaf[i] + leaf[i:]
        else:
            new = leaf[:i] + rng.choice("aeiouxz") + leaf[i + 1:]
        if new != leaf and new:
            return f"{section}.{new}"
    raise AssertionError(key)


def misspelt_key(w, rng):
    key = rng.choice(KEYS)
    bad = _misspell(rng, key)
    value = "1"
    if rng.random() < 0.5:
        section, leaf = bad.split(".")
        args = [_recipe(w, rng, "typo", f"{section}:\n  {leaf}: {value}\n".encode()), *w.base(rng)]
    else:
        args = [*w.base(rng), f"{bad}={value}"]
    return Case("misspelt-key", args, f"unknown key '{bad}'; did you mean {key}")


def out_of_range(w, rng):
    key = rng.choice(sorted(NUMERIC))
    extra = ["train.save_strategy=steps", "train.save_steps=5"] if key == "train.save_total_limit" else []
    extra += ["train.eval_strategy=steps"] if key == "train.eval_steps" else []
    return Case("out-of-range", [*w.base(rng), *extra, f"{key}={NUMERIC[key]}"], key)


def non_finite(w, rng):
    key = rng.choice(FLOATS)
    value = rng.choice([".nan", ".inf", "-.inf", "nan", "inf"])
    return Case("non-finite", [*w.base(rng), f"{key}={value}"], key)


def wrong_value_type(w, rng):
    key, value, expect = rng.choice([
        (rng.choice(INTS), rng.choice(["abc", "[1, 2]", "1.5", "true", "{a: 1}"]), "expected an integer"),
        (rng.choice(FLOATS), rng.choice(["abc", "[1]", "{a: 1}", "true"]), "expected a number"),
        ("model.gradient_checkpointing", rng.choice(["maybe", "2", "[true]"]), "expected true or false"),
        ("lora.target_modules", rng.choice(["{a: 1}", "5"]), "expected a list"),
        ("model.name", rng.choice(["{a: 1}", "[x, y]"]), "expected a string"),
    ])
    return Case("wrong-value-type", [*w.base(rng), f"{key}={value}"], key)


def section_not_mapping(w, rng):
    section = rng.choice(["train", "lora", "data", "model", "guard"])
    body = f"{section}: {rng.choice(['5', '[1, 2]', 'text'])}\n".encode()
    return Case("section-not-mapping", [_recipe(w, rng, "section", body), *w.base(rng)], f"unknown key '{section}'")


def bad_override_syntax(w, rng):
    tok = rng.choice(["justaword", "train", "lr", "a.b.c"])
    return Case("bad-override", [*w.base(rng), tok], f"argument '{tok}': expected key=value")


def bad_flag_value(w, rng):
    flag = rng.choice(["--dry-run=yes", "--force=1"])
    return Case("bad-flag", [*w.base(rng), flag], "ignored explicit argument")


def bad_alias_value(w, rng):
    arg, expect = rng.choice([(["--peft_method", "prefix"], "only 'lora'"),
                              (["--fsdp_config.optimizer", "Adam8"], "unknown optimizer"),
                              (["--dataset", "cnn_dailymail"], "SAMSum only"),
                              (["--split_slice", "abc"], "data.split_slice"),
                              (["--quantization", "3bit"], "expected true or false"),
                              (["--batch_size_training", "3", "--micro_batch_size", "2"], "positive multiple")])
    return Case("bad-alias", [*w.base(rng), *arg], expect)


def impossible_combination(w, rng):
    args, expect = rng.choice([(["--quantization", "4bit"], "full fine-tuning of a 4-bit"),
                               (["train.fp16=true", "train.bf16=true"], "both set"),
                               (["fsdp.cpu_offload=true"], "needs FSDP"),
                               (["train.fp16=true", "--use_peft"], "needs a CUDA GPU"),
                               (["data.prompt_template=no placeholder"], "must contain {dialog}"),
                               (["train.save_strategy=steps"], "needs train.save_steps")])
    return Case("impossible", [*w.base(rng), *args], expect)


def missing_model(w, rng):
    args = [a for a in w.base(rng) if not a.startswith("model.name=")]
    path = rng.choice([w.tmp / f"no-model-{rng.randrange(10**6)}", w.tmp])  # absent, or a folder without config.json
    what = "does not exist" if not path.exists() else "has no config.json"
    return Case("missing-model", [f"model.name={path}", *args], f"local model folder {path} {what}")


def bad_resume(w, rng):
    target = rng.choice([w.tmp / f"no-ckpt-{rng.randrange(10**6)}", w.run / "checkpoint-9"])
    expect = "is not a complete checkpoint" if target.exists() else "does not exist"
    args = [a for a in w.base(rng) if a != "resume=auto"]
    return Case("bad-resume", [*args, f"resume={target}"], expect)


def output_dir_is_file(w, rng):
    args = [a for a in w.base(rng) if not a.startswith("train.output_dir")]
    return Case("output-is-file", [*args, f"train.output_dir={w.run / 'metrics.json'}"], "is not a folder")


# ---------------------------------------------------------------- data that does not decode
def gzip_corrupt_body(w, rng):
    good = bytearray(gzip.compress(b"\n".join(_good_lines(rng))))
    if rng.random() < 0.5:  # deflate data damaged mid-stream (zlib's error, or a CRC mismatch at the end)
        for i in rng.sample(range(10, len(good) - 8), 3):
            good[i] ^= rng.randrange(1, 256)
    else:  # the CRC-32 or length of the trailer
        good[rng.randrange(len(good) - 8, len(good))] ^= rng.randrange(1, 256)
    d = _data_with(w, rng, "gzbody", bytes(good), fname="train.jsonl.gz")
    return Case("gzip-corrupt-body", w.base(rng, d), "train.jsonl.gz: cannot read")


def gzip_not_utf8(w, rng):
    lines = _good_lines(rng)
    k = rng.randrange(len(lines))
    lines[k] = lines[k][:5] + rng.choice([b"\xff", b"\xfe\xfe", b"\xc3(", b"\xe2\x28\xa1"]) + lines[k][5:]
    d = _data_with(w, rng, "gzutf8", gzip.compress(b"\n".join(lines)), fname="train.jsonl.gz")
    return Case("gzip-not-utf8", w.base(rng, d), f"train.jsonl.gz:{k + 1}: invalid UTF-8")


OUT_OF_RANGE = {"1e999": "number out of range", "-1e400": "number out of range", "2.5e308": "number out of range",
                "9" * 150: "number out of range", "-" + "7" * 400: "number out of range",
                **{c: f"malformed JSON line ({c} is not JSON)" for c in ("NaN", "Infinity", "-Infinity")}}


def number_out_of_range(w, rng):
    lines = _good_lines(rng)
    k = rng.randrange(len(lines))
    field_, number = rng.choice(["id", "turns", "meta"]), rng.choice(sorted(OUT_OF_RANGE))
    lines[k] = ('{"%s": %s, "dialogue": "Ann: hi", "summary": "Ann says hi."}' % (field_, number)).encode()
    return Case("number-out-of-range", w.base(rng, _data_with(w, rng, "range", lines)),
                f"train.jsonl:{k + 1}: {OUT_OF_RANGE[number]}")


def number_out_of_range_array(w, rng):
    rows = [json.dumps(r) for r in synthetic_rows(rng.randint(2, 6))]
    rows.insert(rng.randrange(len(rows) + 1),
                '{"id": %s, "dialogue": "a", "summary": "b"}' % rng.choice([n for n, e in OUT_OF_RANGE.items()
                                                                           if e.startswith("number")]))
    d = _data_with(w, rng, "rangearr", ("[\n" + ",\n".join(rows) + "\n]").encode(), fname="train.json")
    return Case("number-out-of-range-array", w.base(rng, d), "train.json: number out of range in JSON")


def data_source_wrong_kind(w, rng):
    args = [a for a in w.base(rng) if not a.startswith("data.source=")]
    source, expect = rng.choice([(w.data / "train.jsonl", "is a file; expected a folder"),
                                 (w.run / "metrics.json", "is a file; expected a folder"),
                                 ("", "data.source is empty"), ("  ", "data.source is empty")])
    return Case("data-source-wrong-kind", [*args, f"data.source={source}"], expect)


# ---------------------------------------------------------------- values refused before any weights load
def seed_out_of_range(w, rng):
    seed = rng.choice([-1, -rng.randrange(2, 2**31), 2**32, 2**32 + rng.randrange(10**6), 2**40, 2**63 - 1])
    return Case("seed-out-of-range", [*w.base(rng), f"train.seed={seed}"], "train.seed must be in [0, 2**32 - 1]")


def _names(what: str) -> list[str]:
    from samsum_tuner.checks import _library_names

    return _library_names(what)


def unknown_name(w, rng):
    key, what = rng.choice([("train.lr_scheduler_type", "scheduler"), ("train.optim", "optimizer"),
                            ("model.attn_implementation", "attention implementation"),
                            ("train.report_to", "integration")])
    valid = _names(what)
    for _ in range(100):
        bad = _misspell(rng, "x." + rng.choice([n for n in valid if "|" not in n])).split(".", 1)[1]
        if bad not in valid and "/" not in bad and "," not in bad:
            break
    return Case("unknown-name", [*w.base(rng), f"{key}={bad}"], f"{key}: unknown {what} '{bad}'")


def lora_options(w, rng):
    key, value, expect = rng.choice([
        ("lora.bias", rng.choice(["some", "lora", "None ", "true", "full"]), "lora.bias must be none, all or lora_"),
        ("lora.method", rng.choice(["prefix", "ia3", "LoRA", "qlora"]), "lora.method: only 'lora'"),
        ("lora.target_modules", rng.choice(["[]", "[' ']", "['q_proj', '']"]), "lora.target_modules: name the modules"),
        ("lora.r", rng.choice(["1.5", "r8", "[8]"]), "lora.r: expected an integer"),
        ("lora.alpha", rng.choice(["16.5", "big"]), "lora.alpha: expected an integer"),
    ])
    return Case("lora-options", [*w.base(rng), "--use_peft", f"{key}={value}"], expect)


ABSENT_MODULES = ["w_proj", "c_attn", "query_key_value", "dense_h_to_4h", "fc1", "Wqkv", "qproj", "self_attn.qkv"]


def lora_target_absent(w, rng):
    absent = rng.sample(ABSENT_MODULES, rng.randint(1, 2))
    targets = [*rng.sample(["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"], rng.randint(0, 2)), *absent]
    rng.shuffle(targets)
    # A new run directory: the existing run's checkpoint is a full fine-tune, which a LoRA resume would refuse first.
    args = [a for a in w.base(rng) if not a.startswith(("train.output_dir=", "resume=", "train.overwrite"))]
    return Case("lora-target-absent", [*args, f"train.output_dir={w.tmp / 'never-created'}", "--use_peft",
                                       f"lora.target_modules={','.join(targets)}"],
                f"lora.target_modules: {', '.join(t for t in targets if t in absent)} not in {w.model_dir}; its "
                "linear layers are down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj")


def worker_counts(w, rng):
    key, value, expect = rng.choice([
        ("train.dataloader_num_workers", rng.choice([257, 1000, 10**5]), "must be at most 256"),
        ("train.dataloader_num_workers", rng.choice([-1, -8]), "must be >= 0"),
        ("data.num_proc", rng.choice([0, -1, 257, 10**4]), "must be null or 1 to 256"),
        ("train.dataloader_num_workers", rng.choice(["two", "1.5"]), "expected an integer"),
    ])
    return Case("worker-counts", [*w.base(rng), f"{key}={value}"], f"{key}")


def int_overflow(w, rng):
    key = rng.choice([*INTS, "train.eval_rouge_rows", "data.max_tokens_per_batch", "train.save_steps"])
    value = 10**rng.randint(19, 60)
    extra = ["train.save_strategy=steps"] if key == "train.save_steps" else []
    expect = "train.seed" if key == "train.seed" else f"{key} is out of range"
    return Case("int-overflow", [*w.base(rng), *extra, f"{key}={value}"], expect)


# ---------------------------------------------------------------- paths
def empty_or_nul_path(w, rng):
    key = rng.choice(["train.output_dir", "data.source", "model.name", "train.resume_from_checkpoint"])
    value, expect = rng.choice([("", f"{key} is empty"), ("   ", f"{key} is empty"),
                                (f"{w.tmp}/a\x00b", f"{key}: a path cannot hold a NUL"),
                                ("\x00", f"{key}: a path cannot hold a NUL")])
    if key == "train.resume_from_checkpoint" and not value.strip():
        expect = f"{key}: expected auto or a checkpoint folder"
    args = [a for a in w.base(rng) if not a.startswith((key + "=", "resume="))]
    return Case("empty-or-nul-path", [*args, f"{key}={value}"], expect)


def path_too_long(w, rng):
    key = rng.choice(["train.output_dir", "data.source", "model.name", "train.resume_from_checkpoint", "recipe"])
    name = "n" * rng.randint(256, 600) if rng.random() < 0.6 else "/".join(["d" * 200] * rng.randint(21, 30))
    path = f"{w.tmp}/{name}"
    if key == "recipe":
        return Case("path-too-long", [path + ".yaml", *w.base(rng)], "cannot read the recipe (File name too long)")
    args = [a for a in w.base(rng) if not a.startswith((key + "=", "resume="))]
    return Case("path-too-long", [*args, f"{key}={path}"], f"{key}: path too long")


def output_not_creatable(w, rng):
    variants = [(w.data / "train.jsonl" / "run", f"{w.data / 'train.jsonl'} is a file, not a folder"),
                (w.run / "metrics.json" / "deeper" / "run", f"{w.run / 'metrics.json'} is a file, not a folder"),
                (Path("/proc") / f"samsum-{rng.randrange(10**6)}" / "run", "cannot create /proc/samsum-"),
                (Path("/sys") / f"samsum-{rng.randrange(10**6)}", "cannot create /sys/samsum-")]
    if os.geteuid() != 0:  # permission bits stop everyone but root
        locked = w.fresh("locked")
        locked.chmod(0o555)
        variants.append((locked / "run", f"cannot create {locked / 'run'}"))
    target, expect = rng.choice(variants)
    args = [a for a in w.base(rng) if not a.startswith(("train.output_dir=", "resume=", "train.overwrite"))]
    return Case("output-not-creatable", [*args, f"train.output_dir={target}"], f"train.output_dir: {expect}")


# ---------------------------------------------------------------- broken model folders
def _model_folder(w: World, name: str, config: dict | bytes | None = None, weights: bool = True,
                  tokenizer: bool = True) -> Path:
    """A copy of the tiny model folder: config.json as given (dict or raw bytes), the rest linked to the original."""
    d = w.fresh(name)
    original = json.loads((w.model_dir / "config.json").read_text())
    body = config if isinstance(config, bytes) else json.dumps(original if config is None else config).encode()
    (d / "config.json").write_bytes(body)
    for f in w.model_dir.iterdir():
        if f.name == "config.json" or (f.suffix == ".safetensors" and not weights) or \
                (f.name.startswith("tokenizer") and not tokenizer):
            continue
        (d / f.name).symlink_to(f)
    return d


def _with_model(w, rng, folder: Path) -> list[str]:
    return [a for a in w.base(rng) if not a.startswith("model.name=")] + [f"model.name={folder}"]


def broken_config_json(w, rng):
    text = (w.model_dir / "config.json").read_bytes()
    body, expect = rng.choice([
        (text[: rng.randint(1, len(text) - 2)], "config.json:"),
        (b"", "config.json:1: malformed JSON"),
        (rng.choice([b"[1, 2]", b"42", b'"llama"', b"null"]), "config.json: expected a JSON object"),
        (text.replace(b'"llama"', b'"ll\xffma"'), "config.json is not UTF-8 text"),
        (b'{"a": ' * 30000 + b"1" + b"}" * 30000, "config.json: malformed JSON"),
        (text.replace(b'"hidden_size": 64', b'"hidden_size": ' + b"6" * 5000), "config.json: malformed JSON"),
    ])
    d = _model_folder(w, "badcfg", body)
    return Case("broken-config-json", _with_model(w, rng, d), f"model.name: {d}/{expect}")


def config_wrong_values(w, rng):
    cfg = json.loads((w.model_dir / "config.json").read_text())
    change = rng.choice(["no-type", "unknown-type", "bad-size", "wrong-type"])
    if change == "no-type":
        cfg.pop("model_type")
        expect = "config.json has no model_type"
    elif change == "unknown-type":
        cfg["model_type"] = rng.choice(["llamma", "gpt-7", "foobar", "LLAMA"])
        expect = f"unknown model_type '{cfg['model_type']}'"
    elif change == "bad-size":
        key = rng.choice(["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"])
        cfg[key] = rng.choice([0, -1, -64])
        expect = f"{key} must be a positive integer"
    else:
        key = rng.choice(["hidden_size", "num_hidden_layers", "vocab_size"])
        cfg[key] = rng.choice(["big", [64], {"n": 1}, 1.5, None, True])
        expect = f"{key} must be a positive integer"
    d = _model_folder(w, "values", cfg)
    return Case("config-wrong-values", _with_model(w, rng, d), expect)


def model_not_usable(w, rng):
    cfg = json.loads((w.model_dir / "config.json").read_text())
    if rng.random() < 0.5:  # an architecture only its own code defines, and a recipe that does not trust it
        cfg.update(model_type=f"custom-{rng.randrange(1000)}", auto_map={"AutoConfig": "modeling.MyConfig"})
        expect = "defines its architecture in its own Python code (config.json auto_map)"
    else:
        cfg = {"model_type": rng.choice(["vit", "resnet", "wav2vec2"])}
        expect = "which transformers has no causal-LM class for"
    d = _model_folder(w, "unusable", cfg)
    return Case("model-not-usable", _with_model(w, rng, d), expect)


def missing_weights(w, rng):
    kind = rng.choice(["none", "index-missing-shard", "index-malformed", "truncated", "not-safetensors"])
    d = _model_folder(w, "weights", weights=False)
    if kind == "none":
        expect = f"{d} holds no weights"
    elif kind == "index-missing-shard":
        shard = f"model-0000{rng.randint(1, 3)}-of-00003.safetensors"
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": shard}}))
        expect = f"{shard}, a shard named in {d}'s weight index, is missing"
    elif kind == "index-malformed":
        (d / "model.safetensors.index.json").write_text(rng.choice(["{", "[]", '{"weight_map": 5}', '{"a": 1}']))
        expect = f"{d}/model.safetensors.index.json is not a weight index"
    else:
        blob = (w.model_dir / "model.safetensors").read_bytes()[: rng.randint(10, 4000)] if kind == "truncated" \
            else rng.choice([b"", b"PK\x03\x04 not tensors", b"\x00" * 64])
        (d / "model.safetensors").write_bytes(blob)
        expect = f"{d}/model.safetensors is not a readable safetensors file"
    return Case("missing-weights", _with_model(w, rng, d), f"model.name: {expect}")


def broken_tokenizer(w, rng):
    d = _model_folder(w, "tok", tokenizer=False)
    kind = rng.choice(["none", "corrupt", "config-only"])
    if kind == "none":
        expect = "(no tokenizer.json, tokenizer.model, vocab.json, vocab.txt, spiece.model)"
    else:
        (d / "tokenizer_config.json").symlink_to(w.model_dir / "tokenizer_config.json")
        if kind == "corrupt":
            text = (w.model_dir / "tokenizer.json").read_bytes()
            (d / "tokenizer.json").write_bytes(rng.choice([text[: rng.randint(1, 5000)], b"{bad", b"[]"]))
        expect = ""
    return Case("broken-tokenizer", _with_model(w, rng, d), f"model.name: cannot load a tokenizer from {d} {expect}"
                .rstrip(), tokenizer=True)


# ---------------------------------------------------------------- YAML that reads as too much
def yaml_bomb(w, rng):
    width, depth = rng.randint(4, 10), rng.randint(9, 14)
    lines = [f"  - &a0 [{', '.join(['lol'] * width)}]"]
    lines += [f"  - &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, depth)]
    section = rng.choice(["description:", "train:\n  report_to:", "lora:\n  target_modules:"])
    body = f"{section}\n" + "\n".join(lines) + "\n"
    return Case("yaml-bomb", [_recipe(w, rng, "bomb", body.encode()), *w.base(rng)],
                "refused: its YAML aliases expand to more than 100,000 values")


def yaml_cycle(w, rng):
    body = rng.choice([b"description: &a [*a]\n", b"lora:\n  target_modules: &t [q_proj, *t]\n",
                       b"train: &t\n  x: *t\n", b"description: &d {k: [1, {j: *d}]}\n"])
    return Case("yaml-cycle", [_recipe(w, rng, "cycle", body), *w.base(rng)], "an alias refers to the node")


def yaml_too_deep(w, rng):
    n = rng.randint(3000, 20000)
    body = rng.choice([f"description: {'[' * n}{']' * n}\n", f"description: {'{a: ' * n}1{'}' * n}\n",
                       "train:\n  seed: " + "9" * rng.randint(4400, 6000) + "\n"])
    return Case("yaml-too-deep", [_recipe(w, rng, "deep", body.encode()), *w.base(rng)], "invalid YAML:")


GENERATORS = [malformed_line, missing_key, wrong_type, not_an_object, empty_file, empty_after_cleaning,
              empty_after_slicing, invalid_utf8, lone_surrogate, deeply_nested, bad_gzip, bad_json_array, missing_split,
              missing_data_folder, invalid_yaml, yaml_not_mapping, yaml_not_utf8, missing_recipe, misspelt_key,
              out_of_range, non_finite, wrong_value_type, section_not_mapping, bad_override_syntax, bad_flag_value,
              bad_alias_value, impossible_combination, missing_model, bad_resume, output_dir_is_file,
              gzip_corrupt_body, gzip_not_utf8, number_out_of_range, number_out_of_range_array, data_source_wrong_kind,
              seed_out_of_range, unknown_name, lora_options, lora_target_absent, worker_counts, int_overflow,
              empty_or_nul_path, path_too_long, output_not_creatable, broken_config_json, config_wrong_values,
              model_not_usable, missing_weights, broken_tokenizer, yaml_bomb, yaml_cycle, yaml_too_deep]


# ---------------------------------------------------------------- the world and the run
def _snapshot(root: Path) -> dict[str, tuple[int, str]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file()
                                       else "dir") for p in sorted(root.rglob("*"))}


@pytest.fixture
def world(tmp_path, tiny_model_dir, tiny_data) -> World:
    run = tmp_path / "existing-run"
    with ck.atomic_checkpoint(run, 3) as stage:  # one resume=auto can use: the cases' errors come first
        write_small_checkpoint(stage, 3)
    (run / "checkpoint-9").mkdir()  # a half save left by an older writer
    (run / "metrics.json").write_text("{}")
    cases = tmp_path / "cases"
    cases.mkdir()
    return World(cases, tiny_model_dir, tiny_data, run)


def _cases(world: World) -> list[Case]:
    rng = random.Random(SEED)
    return [GENERATORS[i % len(GENERATORS)](world, rng) for i in range(N_CASES)]


class _Loads:
    """What a case may load: never the model; the tokenizer only where the fault is in the tokenizer."""

    tokenizer = False


@pytest.fixture
def no_model(monkeypatch):
    import samsum_tuner.model
    import samsum_tuner.model_source

    allowed, real_tokenizer = _Loads(), samsum_tuner.model_source.load_tokenizer

    def refuse(*a, **k):
        raise AssertionError("a model was loaded")

    def tokenizer(*a, **k):
        if not allowed.tokenizer:
            raise AssertionError("a tokenizer was loaded")  # errors come before even the tokenizer
        return real_tokenizer(*a, **k)

    monkeypatch.setattr(samsum_tuner.model, "load_model", refuse)
    monkeypatch.setattr(samsum_tuner.model_source, "load_tokenizer", tokenizer)
    return allowed


def test_every_broken_input_is_one_line_and_exit_2(world, no_model, capsys):
    import time

    # transformers' trainer modules (the lists of scheduler, optimizer and integration names) import peft and
    # bitsandbytes, whose import-time messages are not this test's subject: imported before the cases run.
    import transformers.integrations.integration_utils  # noqa: F401
    import transformers.training_args  # noqa: F401

    cases = _cases(world)
    assert len(cases) >= 400
    capsys.readouterr()
    before = _snapshot(world.run)
    failures = []
    start = time.perf_counter()
    for case in cases:
        no_model.tokenizer = case.tokenizer
        try:
            code = cli.main(["train", *case.args])
        except Exception as e:  # a traceback: what no case may end in
            code = f"{type(e).__name__}: {e}"
        out = capsys.readouterr()
        lines = out.err.splitlines()
        ok = (code == 2 and len(lines) == 1 and lines[0].startswith("samsum-tuner: error: ")
              and case.expect in lines[0] and "Traceback" not in out.out + out.err)
        if not ok:
            failures.append(f"{case.name} {case.args[-2:]}: code {code}, expected {case.expect!r}, got {out.err!r}")
    elapsed = time.perf_counter() - start
    assert not failures, f"{len(failures)} of {len(cases)}:\n" + "\n".join(failures[:20])
    assert _snapshot(world.run) == before
    assert not (world.tmp / "never-created").exists()
    assert len({c.name for c in cases}) == len(GENERATORS)
    assert elapsed < 120, f"{len(cases)} cases took {elapsed:.0f} s"  # every refusal is quick, the YAML bombs too


@pytest.mark.slow
def test_fresh_processes_answer_broken_files_in_one_line(world):
    """The faults read from files, each in a fresh process (conftest.cli_in_fresh_processes): no traceback, exit 2,
    one line. (test_noise.py sends an unknown key, a malformed data line and a missing model folder the same way.)"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_", "SAMSUM_DATA_DIR"))}
    env.update(PYTHONPATH=f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    rng = random.Random(SEED + 1)
    picked = [g(world, rng) for g in (invalid_yaml, yaml_bomb, output_not_creatable, broken_config_json)]
    before = _snapshot(world.run)
    imported, results = cli_in_fresh_processes([["train", *case.args] for case in picked], env=env)
    assert imported == ""
    for case, (code, out, err) in zip(picked, results):
        assert code == 2 and len(err.splitlines()) == 1, (case, err[-2000:])
        assert err.startswith("samsum-tuner: error: ") and case.expect in err, (case, err)
    assert _snapshot(world.run) == before


def test_a_100k_token_dialogue_is_truncated_not_fatal(tmp_path, tiny_model_dir, tokenizer, capsys):
    import resource

    d = tmp_path / "long"
    long = "Ann: " + " ".join(f"word{i % 977}" for i in range(40_000))
    write_jsonl(d, "train", [{"dialogue": long, "summary": "Ann talks a lot."}, *synthetic_rows(3)])
    assert len(tokenizer(long)["input_ids"]) > 100_000
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    code = cli.main(["train", f"model.name={tiny_model_dir}", f"data.source={d}", "data.eval_split=null",
                     "data.max_length=512", "memory.preflight=false", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0
    import re

    assert "truncated_dialogue=1" in out and "dropped_too_long=0" in out
    longest = int(re.search(r"tokens train: rows 4, .* max (\d+)", out).group(1))
    assert 400 < longest <= 512  # cut to data.max_length, dialogue side only
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 1024 * 1024  # < 1 GiB more (KiB units)
