#!/usr/bin/env bash
# Issue 14 on a GPU, in one device call (~7 minutes on an H100): ours vs TRL's GRPOTrainer, side by side.
#
#   bash benchmarks/gpu_vs_trl.sh OUT_DIR [SFT_DIR]
#
# On the device machine (repo root as cwd). trl and datasets are not in the GPU image: carry their wheels in .whl/
# (trl, datasets, dill, multiprocess, pyarrow>=24; benchmarks/README.md says how); SFT_DIR is the quickstart SFT
# checkpoint built on CPU beforehand (`python -m grpo sft recipes/quickstart.yaml run.output_dir=.gpu/quickstart`),
# default .gpu/quickstart/sft/final. Each part has its own time limit and writes its log and JSON into OUT_DIR as
# it ends, so a part that fails or runs out of time loses none of the others. In order of priority:
#   1. gpu_check correctness (bf16 and fp32, chunked LM head included) and its attention section (the masked GQA
#      completion attention of the shared-prefix pass, four ways)
#   2. vs_trl, Qwen2.5-0.5B shape (hidden 896, 24 layers, 14 heads / 2 KV, FFN 4864, vocab 151936, tied), bf16,
#      8 prompts x G=8, 128-token prompts, 256 new tokens: step time and peak CUDA memory
#   3. time_to_accuracy on CUDA, seed 0, stop at 90%: the quickstart model (fp32)
#   4. vs_trl at 1,024 new tokens, 4 prompts x G=8, gradient checkpointing on both sides
set -u
OUT=${1:?usage: gpu_vs_trl.sh OUT_DIR [SFT_DIR]}
SFT=${2:-.gpu/quickstart/sft/final}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled
if [ -d .whl ]; then  # into python3's own environment: dill (datasets' hashing) pickles modules outside it by value,
  # which failed on pyarrow's types when they were installed with --target elsewhere
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade .whl/*.whl
fi
python3 -c "import trl, datasets, pyarrow, torch, transformers; print('trl', trl.__version__, 'datasets', datasets.__version__, 'pyarrow', pyarrow.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())" 2>&1 | tail -3
SHAPE="--vocab 151936 --hidden 896 --ffn 4864 --layers 24 --heads 14 --kv-heads 2 --tied --device cuda --dtype bfloat16 --optim adamw_fused --threads 8 --loss-types grpo --runners ours trl --prompt-len 128"
part() {  # name, seconds, command...
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s)"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - t0))s"
  tail -n 14 "$OUT/$name.log"
}
[ -n "${SKIP_CHECK:-}" ] || part check 110 python3 benchmarks/gpu_check.py --sections env,correctness_bf16,correctness_fp32,attention --budget 100 --out "$OUT/check"
part vs256 170 python3 benchmarks/vs_trl.py $SHAPE --prompts 8 --G 8 --new-tokens 256 --warmup 1 --steps 2 --json "$OUT/vs256.json"
part tta 120 python3 benchmarks/time_to_accuracy.py --device cuda --threads 8 --sft "$SFT" --seeds 0 --stop-at 0.9 --steps 120 --json "$OUT/tta.json"
part vs1024 170 python3 benchmarks/vs_trl.py $SHAPE --prompts 4 --G 8 --new-tokens 1024 --gradient-checkpointing --warmup 1 --steps 1 --json "$OUT/vs1024.json"
echo "=== done in ${SECONDS}s"
