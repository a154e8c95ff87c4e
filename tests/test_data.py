"""SAMSum pipeline: reading, cleaning real quirks, slicing, prompts, exact label masks, errors with file:line."""
from __future__ import annotations

import gzip
import json

import pytest

from samsum_tuner.config import DataConfig
from samsum_tuner.data import (CleanReport, IGNORE_INDEX, clean_rows, find_split_file, load_clean_split, parse_slice,
                               read_rows, read_splits, slice_count, tokenize_row, tokenize_rows, tokenize_splits)
from samsum_tuner.errors import ConfigError, DataError

from .conftest import synthetic_rows, write_jsonl


def _cfg(source, **kw) -> DataConfig:
    return DataConfig(source=str(source), **kw)


def test_real_samsum_quirks_are_cleaned(real_samsum):
    rows, report, origin = load_clean_split(_cfg(real_samsum), "train")
    assert origin.endswith("train.jsonl.gz")
    assert report.rows_in == 14732
    assert report.dropped_empty_dialogue == 1  # id 13828807
    assert report.dropped_empty_summary == 0
    assert report.crlf_normalized >= 12844  # dialogues with \r\n, plus summaries with \r\n
    assert report.rows_out == 14731 == len(rows)
    assert all("\r" not in r["dialogue"] and "\r" not in r["summary"] for r in rows)
    assert all(r["dialogue"] == r["dialogue"].strip() and r["summary"] for r in rows)
    by_id = {r["id"]: r for r in rows}
    assert "13828807" not in by_id
    assert by_id["13818513"]["dialogue"] == ("Amanda: I baked  cookies. Do you want some?\nJerry: Sure!\n"
                                             "Amanda: I'll bring you tomorrow :-)")
    assert by_id["13731310"]["summary"] == by_id["13731310"]["summary"].strip()
    assert "\ufeff" not in by_id["13821722"]["dialogue"]
    assert "13731370-1" in by_id  # odd ids survive


def test_slicing_like_the_original(real_samsum):
    raw = read_splits(_cfg(real_samsum, split_slice="1%"))
    assert raw["train"][1].rows_in == 147 and raw["eval"][1].rows_in == 8
    raw = read_splits(_cfg(real_samsum, split_slice="[:100]"))
    assert raw["train"][1].rows_in == 100 and raw["eval"][1].rows_in == 100
    raw = read_splits(_cfg(real_samsum, eval_slice="16"))
    assert raw["train"][1].rows_in == 14732 and raw["eval"][1].rows_in == 16
    assert slice_count(818, "10") == 10 and slice_count(5, "10") == 5
    assert parse_slice("1%") == (1.0, True) and parse_slice("[:100]") == (100.0, False)
    for bad in ("0", "101%", "[:10", "1.5", "abc"):
        with pytest.raises(ConfigError):
            parse_slice(bad)


def test_original_file_names_and_formats(tmp_path):
    rows = synthetic_rows(3)
    d = tmp_path / "a"
    d.mkdir()
    (d / "samsun_train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (d / "val.json").write_text(json.dumps(rows))
    with gzip.open(d / "test.jsonl.gz", "wt") as fh:
        fh.write(json.dumps(rows[0]) + "\n")
    assert find_split_file(d, "train").name == "samsun_train.jsonl"
    assert find_split_file(d, "validation").name == "val.json"
    assert len(read_rows(d / "val.json")) == 3 and len(read_rows(d / "test.jsonl.gz")) == 1


def test_cleaning_synthetic_bad_rows():
    report = CleanReport()
    rows = [
        {"id": "1", "dialogue": "  A: hi\r\nB: yo  ", "summary": " They greet.\r\n"},
        {"id": "2", "dialogue": "", "summary": "x"},
        {"id": "3", "dialogue": "A: hi", "summary": "   "},
        {"id": "4", "dialogue": "\ufeffA: ok", "summary": "ok"},
    ]
    out = clean_rows(rows, report)
    assert out == [{"id": "1", "dialogue": "A: hi\nB: yo", "summary": "They greet."},
                   {"id": "4", "dialogue": "A: ok", "summary": "ok"}]
    assert (report.dropped_empty_dialogue, report.dropped_empty_summary, report.crlf_normalized) == (1, 1, 1)
    assert report.whitespace_stripped == 3


@pytest.mark.parametrize("lines, message", [
    (['{"id": "1", "dialogue": "a", "summary": "b"}', '{"id": 2, "dialogue": "a"'],
     "train.jsonl:2: malformed JSON line"),
    (['{"id": "1", "dialogue": "a"}'], "train.jsonl:1: missing key 'summary'"),
    (['{"id": "1", "dialogue": 5, "summary": "b"}'], "train.jsonl:1: 'dialogue' must be a string, got int"),
    (['[1, 2]'], "train.jsonl: item 1: expected a JSON object"),
    ([''], "train.jsonl: file is empty"),
    (['{"id": 1e999, "dialogue": "a", "summary": "b"}'], "train.jsonl:1: number out of range in JSON line: 1e999"),
    (['{"id": "1", "dialogue": "a", "summary": "b"}', '{"id": ' + "9" * 5000 + ', "dialogue": "a", "summary": "b"}'],
     "train.jsonl:2: number out of range in JSON line: 99999999999999999999..."),
    (['{"id": "1", "dialogue": "a", "summary": "b", "score": -Infinity}'],
     "train.jsonl:1: malformed JSON line (-Infinity is not JSON)"),
    (['[{"id": NaN, "dialogue": "a", "summary": "b"}]'], "train.jsonl: malformed JSON (NaN is not JSON)"),
    (['[{"id": "1", "dialogue": "a",', ' "summary": "b", "n": 1e400}]'],
     "train.jsonl: number out of range in JSON: 1e400"),
])
def test_data_errors_name_file_and_line(tmp_path, lines, message):
    write_jsonl(tmp_path, "train", [], raw_lines=lines)
    with pytest.raises(DataError) as e:
        load_clean_split(_cfg(tmp_path), "train")
    assert message in str(e.value)


def test_invalid_utf8_and_empty_after_cleaning(tmp_path):
    (tmp_path / "train.jsonl").write_bytes(b'{"dialogue": "a", "summary": "b"}\n{"dialogue": "\xff", "summary": "b"}\n')
    with pytest.raises(DataError, match=r"train.jsonl:2: invalid UTF-8"):
        load_clean_split(_cfg(tmp_path), "train")
    write_jsonl(tmp_path, "train", [{"dialogue": " ", "summary": "x"}])
    with pytest.raises(DataError, match="has no usable rows"):
        load_clean_split(_cfg(tmp_path), "train")
    with pytest.raises(DataError, match="no validation.jsonl"):
        load_clean_split(_cfg(tmp_path), "validation")
    with pytest.raises(DataError, match="folder ./nowhere does not exist"):
        load_clean_split(_cfg("./nowhere"), "train")


def test_gzip_bodies_damaged_mid_stream_name_the_file(tmp_path):
    body = gzip.compress(b"\n".join(json.dumps(r).encode() for r in synthetic_rows(200)))
    damaged = bytearray(body)
    damaged[len(body) // 2] ^= 0xFF  # the deflate stream itself: zlib's error, not gzip's
    damaged[len(body) // 2 + 1] ^= 0xFF
    crc = bytearray(body)
    crc[-8] ^= 0xFF  # the trailer's CRC-32
    path = tmp_path / "train.jsonl.gz"
    for blob, message in [(bytes(damaged), f"{path}: cannot read (Error -3 while decompressing data"),
                          (bytes(crc), f"{path}: cannot read (CRC check failed"),
                          (body[: len(body) // 2], f"{path}: cannot read (Compressed file ended"),
                          (gzip.compress(b'{"dialogue": "a", "summary": "b"}\n{"dialogue": "\xff"}'),
                           f"{path}:2: invalid UTF-8")]:
        path.write_bytes(blob)
        with pytest.raises(DataError) as e:
            load_clean_split(_cfg(tmp_path), "train")
        assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_a_data_source_that_is_a_file_says_so(tmp_path):
    write_jsonl(tmp_path, "train", synthetic_rows(2))
    with pytest.raises(DataError, match=rf"^data.source: {tmp_path / 'train.jsonl'} is a file; expected a folder"):
        load_clean_split(_cfg(tmp_path / "train.jsonl"), "train")


@pytest.mark.parametrize("damage", ["cut in half", "garbage", "empty"])
def test_a_corrupt_tokenized_cache_is_rebuilt_with_a_note(tmp_path, tokenizer, monkeypatch, capsys, damage):
    monkeypatch.setenv("SAMSUM_TUNER_CACHE", str(tmp_path / "cache"))
    write_jsonl(tmp_path / "d", "train", synthetic_rows(12))
    cfg = _cfg(tmp_path / "d", eval_split=None, max_length=128)
    first = tokenize_splits(cfg, tokenizer, read_splits(cfg))["train"]
    ids, lengths = list(first.dataset["input_ids"]), first.lengths  # copied out: the dataset maps the file in
    del first
    [cached] = (tmp_path / "cache" / "tokenized").glob("*.arrow")
    data = cached.read_bytes()
    cached.write_bytes({"cut in half": data[: len(data) // 2], "garbage": b"not arrow" * 50, "empty": b""}[damage])
    capsys.readouterr()
    again = tokenize_splits(cfg, tokenizer, read_splits(cfg))["train"]
    assert list(again.dataset["input_ids"]) == ids and again.lengths == lengths
    note = [line for line in capsys.readouterr().out.splitlines() if "tokenized cache" in line]
    assert len(note) == 1 and note[0].startswith(f"samsum_tuner: note: the tokenized cache of train ({cached}) is "
                                                 "unreadable (") and note[0].endswith("); tokenizing again")
    assert cached.read_bytes() == data  # written anew, whole
    capsys.readouterr()
    tokenize_splits(cfg, tokenizer, read_splits(cfg))  # and read back from then on, without a note
    assert "tokenized cache" not in capsys.readouterr().out


def test_samsum_data_dir_overrides_source(monkeypatch, tiny_data):
    monkeypatch.setenv("SAMSUM_DATA_DIR", str(tiny_data))
    rows, report, origin = load_clean_split(_cfg("knkarthick/samsum"), "train")
    assert origin == str(tiny_data / "train.jsonl") and len(rows) == 40
    # An explicit folder is the user's choice: the variable only stands in for SAMSum on the hub.
    other = tiny_data.parent / "other"
    write_jsonl(other, "train", synthetic_rows(5))
    assert len(load_clean_split(_cfg(str(other)), "train")[0]) == 5
    with pytest.raises(DataError, match="data/samsun"):  # a misspelt relative folder is not silently replaced
        load_clean_split(_cfg("data/samsun"), "train")
    # The variable names a folder: one that does not exist is said so, never read as a hub id (the hub's retries)
    monkeypatch.setenv("SAMSUM_DATA_DIR", "data/samsum")
    with pytest.raises(DataError, match=r"^SAMSUM_DATA_DIR: data/samsum is not a folder \(it stands in for "):
        load_clean_split(_cfg("knkarthick/samsum"), "train")


def test_label_mask_is_exact(tokenizer):
    cfg = DataConfig()
    row = {"dialogue": "Ann: lunch?\nBob: sure", "summary": "Ann and Bob will have lunch."}
    out = tokenize_row(cfg, tokenizer, row)
    prompt_ids = tokenizer("Summarize this dialog:\nAnn: lunch?\nBob: sure\n---\nSummary:\n",
                           add_special_tokens=False)["input_ids"]
    summary_ids = tokenizer("Ann and Bob will have lunch.", add_special_tokens=False)["input_ids"]
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token_id == eos == 2
    assert out["input_ids"] == prompt_ids + summary_ids + [eos]
    assert out["labels"] == [IGNORE_INDEX] * len(prompt_ids) + summary_ids + [eos]
    assert out["n_prompt"] == len(prompt_ids) and not out["truncated"]
    all_tokens = tokenize_row(DataConfig(completion_only_loss=False), tokenizer, row)
    assert all_tokens["labels"] == all_tokens["input_ids"]


def test_chat_template_prompt(tokenizer):
    out = tokenize_row(DataConfig(chat_template=True), tokenizer, {"dialogue": "A: hi", "summary": "A greets."})
    text = tokenizer.decode(out["input_ids"][: out["n_prompt"]])
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    assert "Summarize this dialog:\nA: hi\n---\nSummary:" in text
    assert tokenizer.decode(out["labels"][out["n_prompt"]:]) == "A greets.<|im_end|>"


def test_truncation_shortens_the_dialogue_never_the_summary(tokenizer):
    cfg = DataConfig(max_length=64)
    summary = "Ann tells Bob a long story about her week."
    row = {"dialogue": "Ann: " + " ".join(f"word{i}" for i in range(400)), "summary": summary}
    out = tokenize_row(cfg, tokenizer, row)
    assert out["truncated"] and len(out["input_ids"]) <= 64
    assert tokenizer.decode(out["labels"][out["n_prompt"]:]) == summary + "<|im_end|>"
    assert tokenizer.decode(out["input_ids"][: out["n_prompt"]]).endswith("\n---\nSummary:\n")
    huge = tokenize_row(DataConfig(max_length=8), tokenizer, row)
    assert huge["dropped"]


def test_tokenized_splits_report_counts_and_cache(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("SAMSUM_TUNER_CACHE", str(tmp_path / "cache"))
    rows = synthetic_rows(6)
    rows[0]["dialogue"] = "Ann: " + "blah " * 3000  # a very long dialogue: truncated, no error
    write_jsonl(tmp_path / "d", "train", rows)
    cfg = _cfg(tmp_path / "d", eval_split=None, max_length=128)
    splits = tokenize_splits(cfg, tokenizer, read_splits(cfg))
    s = splits["train"]
    assert s.report.truncated_dialogue == 1 and len(s.dataset) == 6 and max(s.lengths) <= 128
    assert s.stats()["rows"] == 6
    assert len(list((tmp_path / "cache" / "tokenized").glob("*.arrow"))) == 1
    again = tokenize_splits(cfg, tokenizer, read_splits(cfg))["train"]
    assert again.dataset["input_ids"] == s.dataset["input_ids"]
    assert len(list((tmp_path / "cache" / "tokenized").glob("*.arrow"))) == 1  # read back, not rebuilt


@pytest.mark.parametrize("chat_template", [False, True])
def test_a_split_is_tokenized_in_batches_exactly_as_row_by_row(tmp_path, tokenizer, monkeypatch, real_samsum,
                                                               chat_template):
    """One tokenizer call per batch, not per row (a fresh machine's wait before the first step), with the same ids,
    labels and truncation as tokenize_row: 300 real rows, among them a long one truncated and one too long to keep."""
    monkeypatch.setenv("SAMSUM_TUNER_CACHE", str(tmp_path / "cache"))
    rows, _, _ = load_clean_split(_cfg(real_samsum), "train", "[:300]")
    rows[5] = {**rows[5], "dialogue": "Ann: " + "blah " * 3000}  # truncated
    rows[9] = {**rows[9], "summary": "Bob " * 1100}  # its summary alone exceeds max_length: dropped
    write_jsonl(tmp_path / "d", "train", rows)
    cfg = _cfg(tmp_path / "d", eval_split=None, max_length=1024, chat_template=chat_template)
    calls = []
    real_call = type(tokenizer).__call__
    monkeypatch.setattr(type(tokenizer), "__call__", lambda self, *a, **k: calls.append(a) or real_call(self, *a, **k))
    split = tokenize_splits(cfg, tokenizer, read_splits(cfg))["train"]
    monkeypatch.undo()
    # 2 calls per batch of 1,000 rows, and the truncating path's few for row 5 (its prompt re-encoded per try)
    assert len(calls) < 30, len(calls)
    per_row = [tokenize_row(cfg, tokenizer, r) for r in read_splits(cfg)["train"][0]]
    kept = [r for r in per_row if not r["dropped"]]
    assert split.report.dropped_too_long == 1 and split.report.truncated_dialogue == sum(r["truncated"] for r in kept)
    assert split.report.truncated_dialogue == 1
    assert list(split.dataset["input_ids"]) == [r["input_ids"] for r in kept]
    assert list(split.dataset["labels"]) == [r["labels"] for r in kept]
    assert split.lengths == [len(r["labels"]) for r in kept]
    assert split.supervised == [sum(t != IGNORE_INDEX for t in r["labels"]) for r in kept]
    batch = {"dialogue": [r["dialogue"] for r in rows[:12]], "summary": [r["summary"] for r in rows[:12]]}
    assert tokenize_rows(cfg, tokenizer, batch)["input_ids"] == [r["input_ids"] for r in per_row[:12]]
