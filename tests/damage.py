"""Damage done to a copy of a run directory or model folder, and the one-line refusal every command answers with.

Each maker returns `setup(folder, tmp)`: it changes `folder` (a copy) and may add files under `tmp`.
"""
from __future__ import annotations

import os
from pathlib import Path


def assert_refused(capsys, argv: list, expected: str) -> str:
    """`samsum-tuner ARGV` exits 2 with one stderr line that holds `expected`, and no traceback anywhere."""
    from samsum_tuner import cli

    capsys.readouterr()
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, (code, err)
    assert lines[0].startswith("samsum-tuner: error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in out + err
    return lines[0]


def files_of(folder: Path) -> dict[Path, bytes]:
    """Every file under folder with its bytes, not following links."""
    return {Path(d, f): Path(d, f).read_bytes() for d, _, names in os.walk(folder) for f in names
            if not Path(d, f).is_symlink()}


def cut(name: str, keep: float = 0.5):
    """The file cut to its first `keep` share of bytes, as a full disk or a killed copy leaves it."""
    def setup(folder, tmp):
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: int(len(data) * keep)])
    return setup


def write(name: str, data: bytes):
    return lambda folder, tmp: (folder / name).write_bytes(data)


def remove(*names: str):
    return lambda folder, tmp: [(folder / n).unlink() for n in names]


def edit(old: str, new: str, name: str = "recipe.yaml"):
    def setup(folder, tmp):
        text = (folder / name).read_text()
        assert old in text
        (folder / name).write_text(text.replace(old, new))
    return setup


def base(where):
    """The recipe's model.name set to `where(tmp)`."""
    def setup(folder, tmp):
        import yaml

        recipe = yaml.safe_load((folder / "recipe.yaml").read_text())
        recipe["model"]["name"] = str(where(tmp))
        (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return setup


def other_base(tmp):
    """A Llama of another width, saved under tmp: a LoRA adapter of the tiny Llama does not fit it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(cfg).save_pretrained(tmp / "other")
    return tmp / "other"


def nothing(folder, tmp):
    pass
