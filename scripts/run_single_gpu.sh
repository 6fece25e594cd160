#!/usr/bin/env bash
# The whole Dromedary recipe on ONE GPU: prompts -> self-align -> curate -> LoRA finetune
# (principle engraving) -> verbose cloning -> second finetune -> a sample chat turn.
#
#   scripts/run_single_gpu.sh /models/llama-2-7b runs/llama2-7b
#
# One GPU holds a 7B model in bf16 (about 14 GB of weights; 24 GB cards work, 40/80 GB cards batch
# more). For a 13B model use 40 GB or more, or see run_torchrun_8gpu.sh for model parallelism.
# The checkpoint may be in Meta layout (params.json + consolidated.00.pth + tokenizer.model) or
# HF layout (config.json + *.safetensors + tokenizer.model); pass --tokenizer_path if the
# tokenizer lives elsewhere.
#
# Rerunning the same command after a crash or a preemption resumes: finished stages are skipped
# (WORKDIR/pipeline_state.json), the interrupted one continues where it stopped.
set -euo pipefail

CKPT_DIR=${1:?usage: $0 CKPT_DIR [WORKDIR]}
WORKDIR=${2:-runs/$(basename "$CKPT_DIR")}
NUM_PROMPTS=${NUM_PROMPTS:-2000}   # a pilot run; the paper used ~360k prompts (TGRT + self-instruct)

# One process uses every CPU thread by default; tokenization and sampling do not need more than a few.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

# --method tgrt: topic-guided red-teaming prompts written by the base model itself.
#   Alternatives: --method self-instruct, or --method import --sources '{"dolly": "dolly.jsonl"}'.
# --stage_flags passes any flag of any stage (see `dromedary STAGE --help`); here:
#   self-align and verbose-clone batch 16 prompts per step (the shared principles+exemplars prefix
#   is computed once and attended by the whole batch), and finetune runs two epochs over the curated
#   records with micro-batches of 4 and gradient checkpointing to fit activations next to the weights.
dromedary pipeline \
  --workdir "$WORKDIR" \
  --ckpt_dir "$CKPT_DIR" \
  --method tgrt \
  --num_prompts "$NUM_PROMPTS" \
  --verbose_clone \
  --stage_flags '{
    "self-align":       {"max_batch_size": 16, "max_new_tokens": 512},
    "verbose-clone":    {"max_batch_size": 16, "max_new_tokens": 768},
    "finetune":         {"num_epochs": 2, "micro_batch_size": 4, "gradient_checkpointing": true},
    "finetune-verbose": {"num_epochs": 2, "micro_batch_size": 4, "gradient_checkpointing": true}
  }'

# Then talk to the result (the verbose-cloned adapter; use $WORKDIR/adapter for the engraved one):
echo "chat with: dromedary chat --ckpt_dir $CKPT_DIR --adapter $WORKDIR/adapter_verbose"
