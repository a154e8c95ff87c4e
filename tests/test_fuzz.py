"""Fuzz: hundreds of broken recipes, overrides and data files. The CLI's entry function answers every one
with one line `samsum-tuner: error: ...` and exit code 2, before any model is loaded, and leaves an existing
run directory exactly as it was. A few go through a real subprocess of the console script."""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from samsum_tuner import checkpoint as ck
from samsum_tuner import cli

from .conftest import ROOT, synthetic_rows, write_jsonl, write_small_checkpoint

SEED, N_CASES = 16, 240
NUMERIC = {  # key: (a valid value, an out-of-range value the message must name)
    "train.learning_rate": -1e-4, "train.per_device_train_batch_size": 0, "train.gradient_accumulation_steps": -2,
    "train.num_train_epochs": 0, "train.logging_steps": 0, "data.max_length": -5, "lora.r": 0, "lora.alpha": -1,
    "lora.dropout": 1.5, "train.gamma": 2.0, "train.max_steps": -7, "train.save_total_limit": 0,
    "train.eval_steps": -1, "train.weight_decay": -0.1, "memory.gpu_limit_gib": -3, "guard.max_nonfinite_steps": -1,
    "guard.max_skipped_steps": -4, "quantization.bits": 3, "fsdp.version": 5, "train.warmup_steps": -1,
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


GENERATORS = [malformed_line, missing_key, wrong_type, not_an_object, empty_file, empty_after_cleaning,
              empty_after_slicing, invalid_utf8, lone_surrogate, deeply_nested, bad_gzip, bad_json_array, missing_split,
              missing_data_folder, invalid_yaml, yaml_not_mapping, yaml_not_utf8, missing_recipe, misspelt_key,
              out_of_range, non_finite, wrong_value_type, section_not_mapping, bad_override_syntax, bad_flag_value,
              bad_alias_value, impossible_combination, missing_model, bad_resume, output_dir_is_file]


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


@pytest.fixture
def no_model(monkeypatch):
    import samsum_tuner.model

    def refuse(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(samsum_tuner.model, "load_model", refuse)
    monkeypatch.setattr(samsum_tuner.model, "load_tokenizer", refuse)  # errors come before even the tokenizer


def test_every_broken_input_is_one_line_and_exit_2(world, no_model, capsys):
    cases = _cases(world)
    assert len(cases) >= 200
    before = _snapshot(world.run)
    failures = []
    for case in cases:
        code = cli.main(["train", *case.args])
        out = capsys.readouterr()
        lines = out.err.splitlines()
        ok = (code == 2 and len(lines) == 1 and lines[0].startswith("samsum-tuner: error: ")
              and case.expect in lines[0] and "Traceback" not in out.out + out.err)
        if not ok:
            failures.append(f"{case.name} {case.args[-2:]}: code {code}, expected {case.expect!r}, got {out.err!r}")
    assert not failures, f"{len(failures)} of {len(cases)}:\n" + "\n".join(failures[:20])
    assert _snapshot(world.run) == before
    assert not (world.tmp / "never-created").exists()
    assert len({c.name for c in cases}) == len(GENERATORS)


@pytest.mark.slow
def test_console_script_answers_broken_input_in_one_line(world):
    """A handful of the cases through a real `samsum-tuner` process: no traceback, exit 2, one line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_", "SAMSUM_DATA_DIR"))}
    env.update(PYTHONPATH=f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    rng = random.Random(SEED + 1)
    picked = [g(world, rng) for g in (malformed_line, misspelt_key, invalid_yaml, missing_model, non_finite)]
    before = _snapshot(world.run)
    for case in picked:
        p = subprocess.run(["samsum-tuner", "train", *case.args], env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and len(p.stderr.splitlines()) == 1, (case, p.stderr[-2000:])
        assert p.stderr.startswith("samsum-tuner: error: ") and case.expect in p.stderr, (case, p.stderr)
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
