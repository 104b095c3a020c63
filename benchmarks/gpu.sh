#!/usr/bin/env bash
# BENCHMARKS.md's GPU figures in one run: cuDNN flash attention against XLA attention in
# pretrax's attention layer, the MLM step of BERT-base and BERT-large against Hugging Face
# BertForMaskedLM, the SimCLR step of ViT-B/16 against its PyTorch reference, and BERT-base
# once more with XLA attention. About 8 minutes on one H200, compiles included.
#
#     bash benchmarks/gpu.sh [LOGDIR]      # logs: LOGDIR (default $OUT, else /tmp/pretrax_gpu)
#
# Needs the CUDA builds of jax and torch, transformers, and pretrax's requirements (on this
# workplace's lent GPU, ml_collections/grain/array_record/portpicker carried as wheels:
# BENCHMARKS.md "GPU"). Each part runs under its own time limit, so one that hangs or fails
# leaves the others' figures.
set -u
logs=${1:-${OUT:-/tmp/pretrax_gpu}}
mkdir -p "$logs"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}." PYTHONUNBUFFERED=1

part() {  # part NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "### $name ($(date -u +%H:%M:%S), limit ${limit}s): $*"
  timeout "$limit" "$@" 2>&1 | tee "$logs/$name.log"
  echo "### $name exit ${PIPESTATUS[0]} ($(date -u +%H:%M:%S))"
}

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c 'import jax, flax, optax, torch, transformers; print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, "torch", torch.__version__, "transformers", transformers.__version__); print(jax.devices())'
} 2>&1 | tee "$logs/env.log"

part attention 50 python3 benchmarks/attention_check.py
part mlm 240 python3 benchmarks/mlm_step.py --sizes base,large --no-breakdown
part simclr 150 python3 benchmarks/simclr_step.py --sizes b
part mlm_xla 80 python3 benchmarks/mlm_step.py --sizes base --attention_impl xla \
  --no-breakdown --no-profile
