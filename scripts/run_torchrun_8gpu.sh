#!/usr/bin/env bash
# The whole Dromedary recipe on ONE NODE with 8 GPUs, under torchrun.
#
#   scripts/run_torchrun_8gpu.sh /models/llama-2-70b runs/llama2-70b          # MP 8, one model copy
#   MP=2 scripts/run_torchrun_8gpu.sh /models/llama-2-13b runs/llama2-13b     # MP 2 x 4 data-parallel groups
#
# How the 8 processes are used: --model_parallel_size K splits every weight matrix over K GPUs
# (tensor parallelism); the 8/K groups of K consecutive ranks each hold one copy of the model and
# split the records between them (data parallelism). Every stage of the pipeline runs in these
# same processes, so the sizes apply to all of them:
#   LLaMA-2-70B in bf16: 140 GB of weights -> K = 8 (17.5 GB per GPU, the rest is KV cache) on
#     80 GB cards; K = 4 also fits (35 GB per GPU) and doubles the throughput of self-align.
#   LLaMA-2-13B: K = 2 (13 GB per GPU) -> 4 data-parallel groups.
#   LLaMA-2-7B:  K = 1 -> 8 data-parallel groups.
# Any K works with any number of checkpoint shards on disk (the loader reshards in memory), so a
# Meta 70B checkpoint (8 shards) also loads at K = 4. K must divide 8.
#
# The final sample chat turn needs one model copy (K = 8); with K < 8 it is skipped, and you chat
# afterwards with:  torchrun --nproc_per_node K -m dromedary chat --ckpt_dir ... --adapter ...
#
# Rerunning the same command resumes (finished stages are skipped; the interrupted one continues).
set -euo pipefail

CKPT_DIR=${1:?usage: $0 CKPT_DIR [WORKDIR]}
WORKDIR=${2:-runs/$(basename "$CKPT_DIR")}
MP=${MP:-8}
NUM_PROMPTS=${NUM_PROMPTS:-20000}

# 8 processes on one node: keep each one's CPU threads modest.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

# --standalone: a single-node rendezvous on a free local port (no MASTER_ADDR needed).
torchrun --standalone --nproc_per_node 8 -m dromedary pipeline \
  --workdir "$WORKDIR" \
  --ckpt_dir "$CKPT_DIR" \
  --model_parallel_size "$MP" \
  --method tgrt \
  --num_prompts "$NUM_PROMPTS" \
  --verbose_clone \
  --stage_flags '{
    "self-align":       {"max_batch_size": 32},
    "verbose-clone":    {"max_batch_size": 32, "max_new_tokens": 768},
    "finetune":         {"batch_size": 64, "micro_batch_size": 4, "num_epochs": 2, "gradient_checkpointing": true},
    "finetune-verbose": {"batch_size": 64, "micro_batch_size": 4, "num_epochs": 2, "gradient_checkpointing": true}
  }'
# finetune's batch_size must be a multiple of micro_batch_size x the number of data-parallel groups
# (64 = 4 x 8/MP x ... for MP = 8, 4, 2 or 1).
