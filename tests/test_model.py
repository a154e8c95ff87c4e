"""Model building: random Llama-2 shapes, 4-bit/8-bit through bitsandbytes, LoRA, FSDP placement rules."""
from __future__ import annotations

import pytest
import torch

from samsum_tuner.recipe import build_recipe
from samsum_tuner.errors import ConfigError
from samsum_tuner.model import apply_adapters, parameter_counts, pretrained_kwargs, quantize_linears
from samsum_tuner.model_source import check_model, check_model_source, load_model_config, load_tokenizer
from samsum_tuner.resolve import model_load

from .conftest import tiny_llama

LLAMA2_VOCAB, SMOL_VOCAB = 32000, 49152


def _checked(recipe):
    """check_model's arguments for a recipe: its model section and LoRA targets (as the API passes them)."""
    return recipe.model, recipe.lora.target_modules if recipe.lora.enabled else None


@pytest.mark.parametrize("shape, llama2_params", [("llama2-7b", 6_738_415_616), ("llama2-13b", 13_015_864_320),
                                                  ("llama2-70b", 68_976_648_192)])
def test_random_shapes_have_the_real_parameter_counts(shape, llama2_params):
    from transformers import AutoModelForCausalLM

    config = load_model_config(build_recipe(None, [f"model.name=random:{shape}"]).model)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    n = sum(p.numel() for p in model.parameters())
    # Same architecture with SmolLM2's vocabulary: embeddings and lm_head grow by (49152 - 32000) rows each.
    assert n == llama2_params + 2 * (SMOL_VOCAB - LLAMA2_VOCAB) * config.hidden_size
    assert 1.0 < n / llama2_params < 1.03


def test_unknown_random_shape_refused():
    with pytest.raises(ConfigError, match="unknown random shape 'random:llama3-8b'"):
        check_model_source(build_recipe(None, ["model.name=random:llama3-8b"]).model)


def _folder(tmp_path, model_dir, name: str, config=None, skip=()):
    """A copy of a model folder, its files linked, config.json written anew (dict or raw bytes) unless left out."""
    import json

    d = tmp_path / name
    d.mkdir()
    for f in model_dir.iterdir():
        if f.name not in skip and f.name != "config.json":
            (d / f.name).symlink_to(f)
    if "config.json" not in skip:
        body = json.loads((model_dir / "config.json").read_text()) if config is None else config
        (d / "config.json").write_bytes(body if isinstance(body, bytes) else json.dumps(body).encode())
    return d


def _refusal(d, *overrides, loading=True) -> str:
    with pytest.raises(ConfigError) as e:
        check_model(*_checked(build_recipe(None, [f"model.name={d}", *overrides])), loading=loading)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_a_broken_model_folder_is_named_before_any_weight_loads(tmp_path, tiny_model_dir):
    import json

    good = json.loads((tiny_model_dir / "config.json").read_text())
    cases = [
        (b'{"model_type": "llama",', "config.json:1: malformed JSON (Expecting property name"),
        (b"[1, 2]", "config.json: expected a JSON object, got list"),
        (b'{"model_type": "ll\xffama"}', "config.json is not UTF-8 text"),
        ({**good, "model_type": "llamma"}, "config.json: unknown model_type 'llamma' (transformers "),
        ({k: v for k, v in good.items() if k != "model_type"}, 'config.json has no model_type (e.g. "llama")'),
        ({**good, "num_attention_heads": 0}, "config.json: num_attention_heads must be a positive integer, got 0"),
        ({**good, "hidden_size": "64"}, "config.json: hidden_size must be a positive integer, got '64'"),
        ({**good, "rms_norm_eps": "small"}, "config.json: Validation error for field 'rms_norm_eps'"),
        ({**good, "model_type": "mine", "auto_map": {"AutoConfig": "mine.Config"}},
         "defines its architecture in its own Python code (config.json auto_map); set model.trust_remote_code=true"),
        ({"model_type": "vit"}, "is a vit model, which transformers has no causal-LM class for"),
        # values the config class accepts and the model cannot be built with (ZeroDivisionError, KeyError before)
        ({**good, "num_key_value_heads": 0}, "config.json: num_key_value_heads must be a positive integer, got 0"),
        ({**good, "head_dim": 0}, "config.json: head_dim must be a positive integer, got 0"),
        ({**good, "hidden_act": "bogus"}, "config.json: the model cannot be built from it: 'bogus'"),
    ]
    for i, (config, message) in enumerate(cases):
        d = _folder(tmp_path, tiny_model_dir, f"m{i}", config)
        assert message in _refusal(d), (config, message)
        assert _refusal(d).startswith("model.name: ")


def test_weights_are_checked_when_a_run_loads_them_only(tmp_path, tiny_model_dir):
    import json

    bare = _folder(tmp_path, tiny_model_dir, "bare", skip=("model.safetensors",))
    assert _refusal(bare) == (f"model.name: {bare} holds no weights (model.safetensors, pytorch_model.bin or a "
                              "sharded index)")
    # a dry run or a plan needs no weights
    check_model(*_checked(build_recipe(None, [f"model.name={bare}"])), loading=False)
    index = {"weight_map": {"lm_head.weight": "part-2.safetensors"}}
    (bare / "model.safetensors.index.json").write_text(json.dumps(index))
    assert _refusal(bare) == f"model.name: part-2.safetensors, a shard named in {bare}'s weight index, is missing"
    (bare / "model.safetensors.index.json").write_text('{"weight_map": [1]}')
    assert _refusal(bare).endswith("model.safetensors.index.json is not a weight index (JSON with a weight_map of "
                                   "tensor names to shard files)")
    cut = _folder(tmp_path, tiny_model_dir, "cut", skip=("model.safetensors",))
    (cut / "model.safetensors").write_bytes((tiny_model_dir / "model.safetensors").read_bytes()[:100_000])
    assert _refusal(cut).startswith(f"model.name: {cut / 'model.safetensors'} is not a readable safetensors file (")
    check_model(*_checked(build_recipe(None, [f"model.name={tiny_model_dir}"])), loading=True)  # the whole folder


def test_lora_targets_are_checked_against_the_models_module_names(tmp_path, tiny_model_dir):
    message = _refusal(tiny_model_dir, "--use_peft", "lora.target_modules=q_proj,c_attn,query_key_value")
    assert message == (f"lora.target_modules: c_attn, query_key_value not in {tiny_model_dir}; its linear layers are "
                       "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj")
    for targets in ("q_proj,v_proj", "self_attn.o_proj,mlp.up_proj,lm_head", "all-linear"):  # as peft matches them
        check_model(*_checked(build_recipe(None, [f"model.name={tiny_model_dir}", "--use_peft",
                                                  f"lora.target_modules={targets}"])))
    check_model(*_checked(build_recipe(None, [f"model.name={tiny_model_dir}", "lora.target_modules=nothing"])))  # off
    with pytest.raises(ConfigError, match="^lora.target_modules: wq not in random:llama2-70b; its linear layers are "):
        check_model(*_checked(build_recipe(None, ["model.name=random:llama2-70b", "--use_peft",
                                                  "lora.target_modules=wq"])))


def test_a_tokenizer_that_cannot_load_is_one_line(tmp_path, tiny_model_dir):
    none = _folder(tmp_path, tiny_model_dir, "none", skip=("tokenizer.json", "tokenizer_config.json"))
    with pytest.raises(ConfigError, match=rf"^model.name: cannot load a tokenizer from {none} \(no tokenizer.json, "
                                          r"tokenizer.model, vocab.json, vocab.txt, spiece.model\)$"):
        load_tokenizer(build_recipe(None, [f"model.name={none}"]).model)
    bad = _folder(tmp_path, tiny_model_dir, "bad", skip=("tokenizer.json",))
    (bad / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(ConfigError, match=rf"^model.name: cannot load a tokenizer from {bad} \(.+\)$"):
        load_tokenizer(build_recipe(None, [f"model.name={bad}"]).model)


def test_fsdp_loading_has_no_device_map_and_4bit_storage_in_compute_dtype():
    r = build_recipe(None, ["--use_peft", "--quantization", "True", "--use_fp16"])
    single = pretrained_kwargs(model_load(r, fsdp=False))
    fsdp = pretrained_kwargs(model_load(r, fsdp=True))
    assert "device_map" in single and single["quantization_config"].bnb_4bit_quant_storage == torch.uint8
    assert "device_map" not in fsdp  # device_map="auto" gave the original "Inconsistent compute_device and device_id"
    q = fsdp["quantization_config"]
    assert q.bnb_4bit_quant_storage == torch.float16 == q.bnb_4bit_compute_dtype and q.bnb_4bit_quant_type == "nf4"
    assert q.bnb_4bit_use_double_quant
    full = pretrained_kwargs(model_load(build_recipe(None, ["--use_fp16"]), fsdp=True))
    assert full["dtype"] == torch.float32 and "quantization_config" not in full  # fp16 = fp32 weights + autocast
    pure = pretrained_kwargs(model_load(build_recipe(None, ["--fsdp_config.pure_bf16"]), fsdp=True))
    assert pure["dtype"] == torch.bfloat16


def test_qlora_on_cpu_trains_only_the_adapter():
    r = build_recipe(None, ["--use_peft", "--quantization", "True", "lora.target_modules=q_proj,v_proj"])
    model = tiny_llama(vocab_size=256)
    quantize_linears(model, model_load(r, fsdp=False).quantization)
    import bitsandbytes as bnb

    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears) == 2 * 7  # q,k,v,o,gate,up,down per layer
    model = apply_adapters(model, model_load(r))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()
              if not p.requires_grad and p.dtype != torch.uint8}
    ids = torch.randint(0, 256, (2, 16))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    after = dict(model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)  # frozen stays frozen
    t, total = parameter_counts(model)
    assert 0 < t < total


@pytest.mark.parametrize("autocast", [True, False])
def test_adapter_dtype_is_pefts_autocast_adapter_dtype_and_the_planner_counts_it(autocast):
    from samsum_tuner.planner_terms import setup, weight_rows
    from samsum_tuner.shapes import shape_for_model_name

    r = build_recipe(None, ["--use_peft", "model.dtype=bfloat16", f"lora.autocast_adapter_dtype={autocast}"])
    model = apply_adapters(tiny_llama(vocab_size=256).to(torch.bfloat16), model_load(r))
    adapters = {p.dtype for n, p in model.named_parameters() if "lora_" in n}
    assert adapters == {torch.float32 if autocast else torch.bfloat16}
    su = setup(r, 1, shape_for_model_name("random:llama2-7b"))
    (label, size, _), = [row for row in weight_rows(su, 0.0) if row[0].startswith("LoRA")]
    assert label == f"LoRA adapters ({'fp32' if autocast else 'bfloat16'})"
    assert size == su.lora_n * (4 if autocast else 2) and su.state_b == (4 if autocast else 2)


def test_fp16_adapters_are_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"^refused: lora.autocast_adapter_dtype=false with model.dtype=float16 "):
        build_recipe(None, ["--use_peft", "model.dtype=float16", "train.fp16=true",
                            "lora.autocast_adapter_dtype=false"])
    build_recipe(None, ["--use_peft", "model.dtype=float16", "train.fp16=true"])  # peft's fp32 adapters: fine


def test_fsdp_random_model_is_real_on_rank_0_and_shapes_only_elsewhere(monkeypatch):
    """Under FSDP rank 0 holds the weights that accelerate broadcasts; the other ranks build shapes only,
    but with real buffers (accelerate re-registers the rotary inv_freq from each rank's own copy)."""
    from samsum_tuner.model import _build_context

    r = build_recipe(None, ["--enable_fsdp", "--use_peft"])
    monkeypatch.delenv("FSDP_CPU_RAM_EFFICIENT_LOADING", raising=False)
    monkeypatch.setenv("RANK", "1")
    with _build_context(model_load(r, fsdp=True)):  # nobody broadcasts rank 0's weights: every rank builds real ones
        assert {p.device.type for p in tiny_llama(vocab_size=256).parameters()} == {"cpu"}
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")  # what accelerate/our torchrun path export
    placed = {}
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        with _build_context(model_load(r, fsdp=True)):
            model = tiny_llama(vocab_size=256)
        placed[rank] = ({p.device.type for p in model.parameters()}, {b.device.type for b in model.buffers()})
    assert placed["0"] == ({"cpu"}, {"cpu"})
    assert placed["1"] == ({"meta"}, {"cpu"})
    rope = next(b for n, b in model.named_buffers() if n.endswith("inv_freq"))
    assert torch.isfinite(rope).all() and rope.abs().sum() > 0


@pytest.mark.slow
def test_other_fsdp_ranks_get_distinct_parameters_without_a_host_copy(monkeypatch):
    """accelerate maps the optimizer onto FSDP2's sharded parameters by data_ptr(); meta tensors all share 0, so a
    rank whose parameters stayed on meta trained one wrong parameter in every slot. Rank 1 of a 7B: distinct
    host storage for every parameter, yet (untouched pages) almost no resident memory."""
    import psutil

    from samsum_tuner.model import load_model

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")
    r = build_recipe(None, ["--enable_fsdp", "model.name=random:llama2-7b", "train.bf16=true"])
    before = psutil.Process().memory_info().rss
    model = load_model(model_load(r, fsdp=True))  # full fine-tune: every parameter is trainable
    grown = (psutil.Process().memory_info().rss - before) / 2**30
    params = list(model.parameters())
    assert all(p.device.type == "cpu" for p in params) and len({p.data_ptr() for p in params}) == len(params)
    assert sum(p.numel() for p in params) > 6.8e9 and grown < 2, grown  # 27 GB of fp32 weights, not resident
    rope = next(b for n, b in model.named_buffers() if n.endswith("inv_freq"))
    assert torch.isfinite(rope).all() and rope.abs().sum() > 0


def test_fsdp_4bit_built_model_stores_in_compute_dtype():
    r = build_recipe(None, ["--use_peft", "--quantization", "True", "--enable_fsdp", "train.bf16=true"])
    model = tiny_llama(vocab_size=256).to(torch.bfloat16)
    quantize_linears(model, model_load(r, fsdp=True).quantization)
    import bitsandbytes as bnb

    w = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)).weight
    assert w.dtype == torch.bfloat16 and w.quant_storage == torch.bfloat16


def test_8bit_layers_build():
    r = build_recipe(None, ["--use_peft", "--quantization", "8bit"])
    model = tiny_llama(vocab_size=256)
    quantize_linears(model, model_load(r, fsdp=False).quantization)
    import bitsandbytes as bnb

    assert sum(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules()) == 14
    assert model.is_loaded_in_8bit


@pytest.mark.slow
def test_embedded_smollm2_loads_through_gguf_path_and_takes_a_lora_step_on_real_rows(tokenizer, real_samsum,
                                                                                     tmp_path):
    import samsum_tuner as st
    from samsum_tuner.model import load_model

    r = build_recipe(None, ["model.name=smollm2-135m", "--use_peft"])
    model = load_model(model_load(r))
    t, total = parameter_counts(model)
    assert total - t == 134_515_008  # SmolLM2-135M: tied embeddings
    assert not hasattr(model.config, "quantization_config") or model.config.quantization_config is None
    assert getattr(model.base_model.model, "hf_quantizer", None) is None
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    # One LoRA step of the Trainer on the first real SAMSum rows, with the chat template: the adapter moves,
    # the base does not, and the loss is that of a model that already speaks English (not ~ln(49152) = 10.8).
    r = st.load_recipe(None, ["model.name=smollm2-135m", "--use_peft", f"data.source={real_samsum}",
                              "data.chat_template=true", "data.split_slice=[:4]", "data.eval_split=null",
                              "train.per_device_train_batch_size=4", "train.gradient_accumulation_steps=1",
                              "train.max_steps=1", "train.learning_rate=1e-3", "train.report_to=[]",
                              "train.save_strategy=no", "train.save_model=false", "train.disable_tqdm=true",
                              f"train.output_dir={tmp_path / 'run'}", "train.logging_steps=1"])
    trainer = st.build_trainer(r)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    metrics = st.train(r, trainer=trainer)
    assert 0.5 < metrics["first_loss"] < 5
    moved = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all("lora_" in n for n in moved)
    # lora_B starts at zero, so the first step's gradient reaches lora_B only (lora_A's is zero until then).
    assert moved == {n for n in before if "lora_B" in n}
