#!/usr/bin/env bash
# The one prepared check for a GPU machine (no GPU has run this code before it): about 7 minutes
# on one GPU, well under 9. Run it from the repository root whenever a session has a GPU:
#
#   scripts/gpu_check.sh              # on the GPU machine
#   scripts/gpu_check.sh --dry-run    # every piece on the CPU at small sizes (no GPU needed)
#
# 1. pytest -m cuda: the tests that run on CUDA when it is there (the fused masked-GQA attention
#    kernel against the math path, fp32 and bf16, and the shared-prefix merge).
# 2. torchrun over every GPU present (NCCL): `dromedary generate` at MP = #GPUs on a random GQA
#    checkpoint (ragged rows and a shared prefix), fp32, compared with the same run on the CPU.
# 3. scripts/bench_generate.py on a 1.1B model: W1, W2, W3 on the GPU against HF `generate`, and
#    decode bytes/s against the measured copy bandwidth and the GPU's nominal bandwidth.
# 3b. bench_generate W4 on the 1.1B model: the scheduler against fixed batches of 8.
# 4. scripts/bench_rl.py in bf16: dpo's optimisation tokens/s (against TRL's DPOTrainer where trl
#    is installed) and two steps of `dromedary rl` (rollout and optimisation tokens/s).
# It ends with one table: each piece, its status, its seconds and what it measured.
#
# Environment: PYTHON (default: python3, or .venv/bin/python when present), PEAK_GBS (nominal
# memory bandwidth in GB/s; default from the GPU's name for the common ones), BENCH_REPEATS (3).
set -uo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
PYTHON=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
export DROMEDARY_CACHE=${DROMEDARY_CACHE:-$WORK/cache}
trap 'rm -rf "$WORK"' EXIT

# ---------------------------------------------------------------- fail fast without a GPU
if [[ $DRY == 0 ]]; then
    if ! NGPU=$("$PYTHON" -c 'import torch; n = torch.cuda.device_count(); print(n); raise SystemExit(n == 0)' 2>/dev/null); then
        echo "gpu_check: no CUDA device is visible to $PYTHON (torch.cuda.device_count() is 0 or torch is missing)." >&2
        echo "gpu_check: run it on a GPU machine, or 'scripts/gpu_check.sh --dry-run' to try its pieces on the CPU." >&2
        exit 2
    fi
    GPU_NAME=$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name(0))')
    if [[ -z "${PEAK_GBS:-}" ]]; then
        case "$GPU_NAME" in
            *H200*) PEAK_GBS=4800 ;; *H100*SXM*|*H100\ 80GB\ HBM3*) PEAK_GBS=3350 ;; *H100*) PEAK_GBS=2000 ;;
            *A100*80GB*) PEAK_GBS=2039 ;; *A100*) PEAK_GBS=1555 ;; *L40S*|*L40*) PEAK_GBS=864 ;;
            *A10G*|*A10*) PEAK_GBS=600 ;; *L4*) PEAK_GBS=300 ;; *V100*) PEAK_GBS=900 ;; *T4*) PEAK_GBS=320 ;;
            *) PEAK_GBS="" ;;
        esac
    fi
    DEVICE=cuda; MP=$NGPU; DTYPE_NOTE="fp32 on $NGPU x $GPU_NAME (NCCL)"
else
    NGPU=0; GPU_NAME="none (dry run)"; PEAK_GBS=${PEAK_GBS:-}
    DEVICE=cpu; MP=2; DTYPE_NOTE="fp32 on the CPU, 2 processes (gloo)"
fi
echo "gpu_check: GPUs: $NGPU ($GPU_NAME); python $PYTHON; work dir $WORK"

ROWS=()  # "piece|status|seconds|detail"
row() { ROWS+=("$1|$2|$3|$4"); }

# ---------------------------------------------------------------- 1. the CUDA tests
start=$SECONDS
timeout 240 "$PYTHON" -m pytest -q -m cuda -p no:cacheprovider tests/ >"$WORK/pytest.log" 2>&1
rc=$?
summary=$(grep -E "passed|failed|skipped|error|no tests ran" "$WORK/pytest.log" | tail -1)
if [[ $rc == 0 ]]; then status=ok
elif [[ $DRY == 1 && $rc == 5 ]]; then status=ok  # no test selected
elif [[ $rc == 124 ]]; then status=TIMEOUT
else status=FAIL; fi
[[ $DRY == 1 ]] && summary="$summary (dry run: CUDA tests skip)"
row "pytest -m cuda" "$status" $((SECONDS - start)) "${summary:-see $WORK/pytest.log}"
[[ $status != ok ]] && tail -30 "$WORK/pytest.log"

# ---------------------------------------------------------------- 2. torchrun: generate at MP = #GPUs
start=$SECONDS
"$PYTHON" - "$WORK" <<'EOF' >"$WORK/ckpt.log" 2>&1
import json, random, sys
from pathlib import Path
import sentencepiece as spm
from dromedary.llama import checkpoint
from dromedary.llama.model import ModelArgs

work = Path(sys.argv[1])
rng = random.Random(0)
words = "the a camel walks across desert sand water river city people think about good helpful honest answer".split()
lines = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 14))).capitalize() + "." for _ in range(2000)]
spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(work / "tokenizer"), vocab_size=300,
                               model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                               num_threads=1, minloglevel=2, character_coverage=1.0)
args = ModelArgs(dim=256, n_layers=4, n_heads=8, n_kv_heads=2, vocab_size=300, multiple_of=32, max_seq_len=512)
checkpoint.save_checkpoint(checkpoint.StateReader(args, checkpoint.init_state(args, seed=7, std=0.3)), work / "ckpt",
                           layout="meta", tokenizer=work / "tokenizer.model")
shared = "Every helpful assistant should read the principle, think about the user, and answer honestly. " * 2
with open(work / "in.jsonl", "w") as f:
    for i in range(12):
        prompt = (shared if i % 3 else "") + " ".join(rng.choice(words) for _ in range(1 + 5 * (i % 4)))
        f.write(json.dumps({"id": f"r{i}", "prompt": prompt}) + "\n")
EOF
rc=$?
if [[ $rc == 0 ]]; then
    GEN=(generate --input "$WORK/in.jsonl" --ckpt_dir "$WORK/ckpt" --max_new_tokens 24 --max_batch_size 5 --dtype fp32)
    if [[ $DEVICE == cuda ]]; then
        timeout 180 "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$MP" -m dromedary "${GEN[@]}" \
            --output "$WORK/out_gpu.jsonl" --model_parallel_size "$MP" >"$WORK/torchrun.log" 2>&1
    else
        CUDA_VISIBLE_DEVICES="" timeout 180 "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$MP" \
            -m dromedary "${GEN[@]}" --output "$WORK/out_gpu.jsonl" --model_parallel_size "$MP" >"$WORK/torchrun.log" 2>&1
    fi
    rc=$?
    CUDA_VISIBLE_DEVICES="" timeout 180 "$PYTHON" -m dromedary "${GEN[@]}" --output "$WORK/out_cpu.jsonl" \
        >"$WORK/cpu.log" 2>&1 || rc=$((rc == 0 ? 1 : rc))
fi
if [[ $rc == 0 ]]; then
    detail=$("$PYTHON" - "$WORK" <<'EOF'
import json, sys
w = sys.argv[1]
read = lambda p: {r["id"]: r["completion"] for r in map(json.loads, open(f"{w}/{p}"))}
a, b = read("out_gpu.jsonl"), read("out_cpu.jsonl")
same = sum(a[k] == b.get(k) for k in a)
print(f"{len(a)} records; {same}/{len(a)} completions identical to the MP=1 CPU fp32 run")
EOF
)
    if [[ "$detail" =~ \ ([0-9]+)/([0-9]+)\ completions ]] && [[ ${BASH_REMATCH[1]} == "${BASH_REMATCH[2]}" ]]; then
        status=ok
    else
        status=CHECK  # fp32 near-ties may part a row or two; more than that is a bug
    fi
    detail="MP=$MP, $DTYPE_NOTE: $detail"
else
    status=$([[ $rc == 124 ]] && echo TIMEOUT || echo FAIL)
    detail="exit $rc; see below"
    tail -30 "$WORK/ckpt.log" "$WORK/torchrun.log" "$WORK/cpu.log" 2>/dev/null
fi
row "torchrun generate" "$status" $((SECONDS - start)) "$detail"

# A benchmark piece: NAME, time limit in seconds, the pattern of its summary lines, then the script
# and its arguments. Each summary line "HEAD: DETAIL" becomes a row of its own (once, however many
# times the log holds it).
bench() {
    local name=$1 limit=$2 pattern=$3 script=$4 log="$WORK/$1.log" start=$SECONDS rc line
    shift 4
    timeout "$limit" "$PYTHON" "$script" "$@" >"$log" 2>&1
    rc=$?
    cat "$log"
    if [[ $rc == 0 ]]; then
        row "$name" ok $((SECONDS - start)) "$*"
        while IFS= read -r line; do
            row "  ${line%%:*}" "" "" "${line#*: }"
        done < <(grep -E "$pattern" "$log" | awk '!seen[$0]++')
    else
        row "$name" "$([[ $rc == 124 ]] && echo TIMEOUT || echo FAIL)" $((SECONDS - start)) "exit $rc; see above"
    fi
}

# ---------------------------------------------------------------- 3. the generation benchmark
if [[ $DEVICE == cuda ]]; then
    BENCH=(--device cuda --model 1b --repeats "${BENCH_REPEATS:-3}" --fp32-check never)
    [[ -n "$PEAK_GBS" ]] && BENCH+=(--peak-bandwidth "$PEAK_GBS")
else
    BENCH=(--quick --repeats 1 --threads 1 --fp32-check never)
fi
bench bench_generate 300 '^W[123]: ' scripts/bench_generate.py "${BENCH[@]}"

# ---------------------------------------------------------------- 3b. continuous batching (W4)
# The scheduler against fixed batches of 8 where decoding is bound by the weight reads (on the
# CPUs measured so far the products set the pace, and the 2x target was not reached).
if [[ $DEVICE == cuda ]]; then
    W4=(--device cuda --model 1b --workloads W4 --repeats 1 --no-hf --no-vllm)
else
    W4=(--quick --workloads W4 --repeats 1 --no-hf --no-vllm --threads 1)
fi
bench bench_w4 200 '^W4 \(' scripts/bench_generate.py "${W4[@]}"

# ---------------------------------------------------------------- 4. policy optimisation: dpo (and TRL where installed), rl
if [[ $DEVICE == cuda ]]; then
    RLB=(--device cuda --dtype bf16 --steps 3 --rl_steps 2)
else
    RLB=(--threads 1 --steps 1 --rl_steps 1)
fi
bench bench_rl 240 '^(ratio|RL: |  step )' scripts/bench_rl.py "${RLB[@]}"

echo
echo "gpu_check on $GPU_NAME ($NGPU GPUs), $(date -u +%Y-%m-%dT%H:%MZ)$([[ $DRY == 1 ]] && echo ', DRY RUN on the CPU')"
printf '%-20s %-8s %5s  %s\n' piece status s detail
failed=0
for r in "${ROWS[@]}"; do
    IFS='|' read -r piece status secs detail <<<"$r"
    printf '%-20s %-8s %5s  %s\n' "$piece" "$status" "$secs" "$detail"
    [[ $status == FAIL || $status == TIMEOUT ]] && failed=1
done
exit $failed
