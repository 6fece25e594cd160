"""Generation throughput: dromedary's engine against Hugging Face `generate`, same weights, one run.

    python scripts/bench_generate.py                       # W1, W2, W3 at full size
    python scripts/bench_generate.py --quick               # smaller sizes, a smoke run
    python scripts/bench_generate.py --workloads W1 --repeats 5
    python scripts/bench_generate.py --device cuda --model 1b   # on a GPU (scripts/gpu_check.sh)

A random-weight LLaMA (dim 768, 12 layers, 12 heads, FFN 2048, vocab 32000) is written once in
Meta layout (loaded by `builder.build`, as every stage loads a model) and once in HF layout (loaded
by `LlamaForCausalLM`), both bf16 on the CPU. A 32000-piece SentencePiece word model stands in for
LLaMA's tokenizer so that every id the model can emit is a real token on both sides. Both sides
run greedy, produce exactly N new tokens (EOS is masked for all N steps on both), use the same
thread count, and are warmed up before timing; the runs of both sides are interleaved and the
reported figure is the median of --repeats. Our side decodes with the compiled step of
dromedary/native.py where the CPU has AVX512-BF16 and a C compiler is at hand, else with the
PyTorch step of lean.py (--no-native forces that one); the first lines say which ran. Wall-clock
and process CPU time are both shown: on a
machine shared with other jobs, CPU time (with --threads 1) is the steadier comparison, and more
than one thread per busy core makes OpenMP spin against the other jobs on both sides alike.

Tokens: bf16 rounding makes near-ties of these random-weight logits resolve differently in the two
implementations, so rows can part ways; "match" is the share of each row's tokens before the first
difference. --fp32-check reruns W1 in fp32 on both sides, where the tokens must agree. (HF's own
bf16 rows are the same whatever the batch here; ours are not always: the shared prefix changes
where each row's prompt is split and the shapes of the products, so a near-tie can go either way.)

Workloads:
  W1  the self-align shape: batch 8, a 1024-token prefix shared by every row + 32 own tokens,
      64 new tokens. Target: ours >= 4x HF, identical tokens.
  W2  batch 8 distinct 256-token prompts, 128 new tokens. Target: ours >= 1.5x HF.
  W3  batch 1 decode (128-token prompt, 128 new tokens): decode tokens/s x weight bytes as a
      fraction of the measured memory copy bandwidth. Target: >= 60%.
  W4  continuous batching: 64 requests, prompts of 64-256 tokens, outputs of 16-256 tokens (lengths
      drawn from --seed; each output forced to its length: EOS masked until then), greedy. Shown in
      one run: our scheduler (--in-flight rows in flight, refilled as rows finish), our engine in
      fixed batches of 8 (Engine.generate's batch path, rows leaving as they finish), and vLLM's
      CPU build on the HF copy where `import vllm` works. Target: the scheduler >= 2x the fixed
      batches and >= vLLM-CPU's throughput. Not in the default --workloads (it takes a while on
      two cores); --quick shrinks it to 16 requests of 16-64 + 4-64 tokens. --w4-prefill also
      times both sides on the prompts alone (one new token each), work no batching saves, and
      shows the speed-up of the rest, the decoding.

On a GPU (--device cuda): both sides run on the device, times are taken after a device
synchronize, CPU-time columns are the host's (not a measure of the GPU's work), and --model 1b (a
TinyLlama-shaped 1.1B GQA model: dim 2048, 22 layers, 32 heads, 4 kv heads, FFN 5632) is the size
to measure; --peak-bandwidth GB/s adds the device's nominal bandwidth (H200: 4800) to W3's line.

Bandwidth definition: a large (1 GiB) fp32 tensor `copy_` into a preallocated buffer, counting
the bytes read plus the bytes written, per second (median of copies timed between the W3 runs, so
under the same load, at the same thread count). Decode tokens/s is (N - 1) / (time of the N-token
run - time of a 1-token run), i.e. without the prefill. The decode figure counts
every weight matrix read once per token (all layers + the output projection; the embedding reads
one row and is left out) and nothing else, so it is a lower bound on the bytes a step moves. 100%
is not a ceiling: a copy also reads each destination line before overwriting it, traffic that the
read + written count leaves out, so a pure read stream can go faster (on the VMs these figures
come from, the native step streams a 2 GB model, 4x their reported L3, at 104-106%).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dromedary.engine import builder
from dromedary.engine.generation import Engine, SamplingParams, row_seed  # noqa: E402
from dromedary.engine.scheduler import Request, Scheduler  # noqa: E402
from dromedary.llama import checkpoint  # noqa: E402
from dromedary.llama.kernels.lean import LeanDecoder  # noqa: E402
from dromedary.llama.kernels.native import NativeDecoder  # noqa: E402
from dromedary.llama.model import ModelArgs  # noqa: E402

MODEL = dict(dim=768, n_layers=12, n_heads=12, vocab_size=32000, hidden_dim=2048, max_seq_len=2048)
QUICK_MODEL = dict(dim=256, n_layers=4, n_heads=4, vocab_size=32000, hidden_dim=768, max_seq_len=2048)
MODEL_1B = dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, vocab_size=32000, hidden_dim=5632, max_seq_len=2048)


@dataclass
class Workload:
    name: str
    batch: int
    shared: int  # tokens of prefix common to every row (0: distinct prompts)
    own: int  # tokens of each row's own
    new: int  # tokens generated per row
    target: float
    what: str  # "ratio" (ours / HF) or "bandwidth" (fraction of memory bandwidth)


WORKLOADS = {
    "W1": Workload("W1", batch=8, shared=1024, own=32, new=64, target=4.0, what="ratio"),
    "W2": Workload("W2", batch=8, shared=0, own=256, new=128, target=1.5, what="ratio"),
    "W3": Workload("W3", batch=1, shared=0, own=128, new=128, target=0.60, what="bandwidth"),
}
# W4: (requests, prompt lengths, output lengths), each length uniform in its range.
W4 = dict(requests=64, prompt=(64, 256), output=(16, 256), fixed_batch=8)
QUICK_W4 = dict(requests=16, prompt=(16, 64), output=(4, 64), fixed_batch=8)
QUICK = {
    "W1": Workload("W1", batch=4, shared=256, own=16, new=16, target=4.0, what="ratio"),
    "W2": Workload("W2", batch=4, shared=0, own=64, new=32, target=1.5, what="ratio"),
    "W3": Workload("W3", batch=1, shared=0, own=32, new=32, target=0.60, what="bandwidth"),
}


# --------------------------------------------------------------------------------------------
# Setup: tokenizer, checkpoints, both models.


def make_tokenizer(out: Path, vocab: int) -> Path:
    """A SentencePiece word model with exactly `vocab` pieces (trains in well under a second)."""
    import sentencepiece as spm

    rng = random.Random(0)
    words: set[str] = set()
    while len(words) < vocab + 1000:
        words.add("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8))))
    ordered = sorted(words)
    corpus = out / "corpus.txt"
    corpus.write_text("\n".join(" ".join(ordered[i : i + 20]) for i in range(0, len(ordered), 20)))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out / "tokenizer"), vocab_size=vocab, model_type="word",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, num_threads=1,
    )
    return out / "tokenizer.model"


def make_checkpoints(out: Path, args: ModelArgs, seed: int) -> tuple[Path, Path]:
    # bf16 on disk: what both sides run in, and half the bytes to write for the 1B model.
    reader = checkpoint.StateReader(args, checkpoint.init_state(args, seed, std=0.02, dtype=torch.bfloat16))
    meta_dir, hf_dir = out / "meta", out / "hf"
    checkpoint.save_checkpoint(reader, meta_dir, layout="meta")
    checkpoint.save_checkpoint(reader, hf_dir, layout="hf")
    return meta_dir, hf_dir


DEVICE = "cpu"  # --device


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def load_ours(meta_dir: Path, tokenizer: Path, dtype: str, native: bool = True) -> Engine:
    loaded = builder.build(str(meta_dir), tokenizer_path=str(tokenizer), dtype=dtype, device=DEVICE)
    return Engine(loaded.model, loaded.tokenizer, native=native)


def step_name(engine: Engine) -> str:
    step = engine._fast_step
    if isinstance(step, NativeDecoder):
        where = {"amx": "AMX tiles", "dpbf16": "vdpbf16ps", "fma": "AVX512 FMAs"}[step.lib.products]
        return f"native (native.py), products on {where}"
    if isinstance(step, LeanDecoder):
        return "PyTorch (lean.py) on oneDNN packs"
    return "Transformer.forward"


def load_hf(hf_dir: Path, dtype: torch.dtype):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(hf_dir), dtype=dtype).to(DEVICE)
    model.eval()
    return model


# --------------------------------------------------------------------------------------------
# Runs.


def make_prompts(w: Workload, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    # Ids 3.. are ordinary words (0 unk, 1 bos, 2 eos); every row starts with BOS.
    shared = [1] + torch.randint(3, vocab, (max(w.shared - 1, 0),), generator=g).tolist() if w.shared else []
    rows = []
    for _ in range(w.batch):
        own = torch.randint(3, vocab, (w.own,), generator=g).tolist()
        rows.append(shared + own if shared else [1] + own[1:])
    return rows


def run_ours(engine: Engine, prompts: list[list[int]], n: int, *, cold: bool = True):
    """(tokens per row, (wall s, CPU s)). `cold`: the shared prefix's prefill is timed too, as HF
    has no such cache; otherwise it is the one an earlier call left (as in a self-align run, where
    every batch shares the same principles and exemplars)."""
    # min_new_tokens = max_new_tokens masks EOS at every step, as HF's min_new_tokens does.
    params = SamplingParams(max_new_tokens=n, min_new_tokens=n, temperature=0.0)
    if cold:
        engine._prefix = engine._pinned = None
    sync()
    start, cpu = time.perf_counter(), time.process_time()
    gens = engine.generate(prompts, params)
    sync()
    return [g.tokens for g in gens], (time.perf_counter() - start, time.process_time() - cpu)


def run_hf(model, prompts: list[list[int]], n: int):
    # Every workload's rows have one length, so no padding and an all-ones attention mask.
    ids = torch.tensor(prompts, device=DEVICE)
    sync()
    start, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
            num_beams=1, eos_token_id=2, pad_token_id=0, use_cache=True,
        )
    sync()
    return out[:, ids.shape[1] :].tolist(), (time.perf_counter() - start, time.process_time() - cpu)


def w4_requests(spec: dict, vocab: int, seed: int) -> list[tuple[list[int], int]]:
    """(prompt ids, forced output length) per request."""
    g = random.Random(seed)
    out = []
    for _ in range(spec["requests"]):
        n_prompt, n_out = g.randint(*spec["prompt"]), g.randint(*spec["output"])
        out.append(([1] + [g.randrange(3, vocab) for _ in range(n_prompt - 1)], n_out))
    return out


def w4_scheduler(engine: Engine, reqs, in_flight: int):
    requests = [Request(p, SamplingParams(max_new_tokens=n, min_new_tokens=n), seed=row_seed(0, str(i)), key=i)
                for i, (p, n) in enumerate(reqs)]
    engine._prefix = engine._pinned = None
    sync()
    start, cpu = time.perf_counter(), time.process_time()
    for _ in Scheduler(engine, max_in_flight=in_flight).run(requests):
        pass
    sync()
    return [r.result.tokens for r in requests], (time.perf_counter() - start, time.process_time() - cpu)


def w4_fixed(engine: Engine, reqs, batch: int):
    """Engine.generate's batch path in fixed batches, each row with its own forced length (the
    per-row budgets of `_decode`; EOS masked throughout, as min_new_tokens = the longest does)."""
    longest = max(n for _, n in reqs)
    params = SamplingParams(max_new_tokens=longest, min_new_tokens=longest)
    engine._prefix = engine._pinned = None
    out = []
    sync()
    start, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for b in range(0, len(reqs), batch):
            chunk = reqs[b : b + batch]
            gens = engine._decode([p for p, _ in chunk], 0, None, params, [n for _, n in chunk],
                                  [row_seed(0, str(b + i)) for i in range(len(chunk))], None, [len(p) for p, _ in chunk])
            out += [g.tokens for g in gens]
    sync()
    return out, (time.perf_counter() - start, time.process_time() - cpu)


def w4_vllm(hf_dir: Path, tokenizer: Path, reqs, threads: int):
    """vLLM's offline LLM on the HF copy, or None (and why) where it cannot run."""
    try:
        import vllm  # noqa: F401
        from vllm import LLM
        from vllm import SamplingParams as VllmParams
    except Exception as e:  # noqa: BLE001 - any import failure means "not measured"
        return None, f"not measured (import vllm: {type(e).__name__}: {str(e)[:80]})"
    try:
        # Token ids in and out: no tokenizer (ours is a SentencePiece file, not an HF folder). On
        # CPU the memory share is of host memory; vLLM's default (0.92) fails beside anything else.
        llm = LLM(model=str(hf_dir), skip_tokenizer_init=True, dtype="bfloat16", max_num_seqs=len(reqs),
                  enforce_eager=False, gpu_memory_utilization=0.3 if not torch.cuda.is_available() else 0.9)
        prompts = [{"prompt_token_ids": p} for p, _ in reqs]
        params = [VllmParams(max_tokens=n, min_tokens=n, ignore_eos=True, temperature=0.0, detokenize=False)
                  for _, n in reqs]
        llm.generate(prompts[:2], params[:2], use_tqdm=False)  # warm-up
        start, cpu = time.perf_counter(), time.process_time()
        outs = llm.generate(prompts, params, use_tqdm=False)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        return ([list(o.outputs[0].token_ids) for o in outs], (wall, cpu)), None
    except Exception as e:  # noqa: BLE001
        return None, f"not measured (vLLM failed: {type(e).__name__}: {str(e)[:120]})"


def run_w4(ours: Engine, hf_dir: Path, tok: Path, args: ModelArgs, opts) -> list[str]:
    spec = QUICK_W4 if opts.quick else W4
    reqs = w4_requests(spec, args.vocab_size, opts.seed)
    total = sum(n for _, n in reqs)
    fns = {"scheduler": lambda: w4_scheduler(ours, reqs, opts.in_flight),
           "fixed": lambda: w4_fixed(ours, reqs, spec["fixed_batch"])}
    timed = dict(zip(fns, timed_pairs(list(fns.values()), opts.repeats)))
    (s_toks, t_s, c_s), (f_toks, t_f, c_f) = timed["scheduler"], timed["fixed"]
    assert [len(t) for t in s_toks] == [n for _, n in reqs], "the scheduler's outputs are not their forced lengths"
    match = sum(leading_match(a, b) for a, b in zip(s_toks, f_toks)) / total
    lines = [f"W4 ({spec['requests']} requests, prompts {spec['prompt'][0]}-{spec['prompt'][1]}, outputs "
             f"{spec['output'][0]}-{spec['output'][1]}, {total} new tokens): scheduler ({opts.in_flight} in flight) "
             f"{t_s:.2f} s = {total / t_s:.1f} tok/s (CPU {c_s:.2f} s); fixed batches of {spec['fixed_batch']} "
             f"{t_f:.2f} s = {total / t_f:.1f} tok/s (CPU {c_f:.2f} s); speed-up {t_f / t_s:.2f}x (target >= 2x); "
             f"tokens equal to the fixed batches' {match:.0%} (bf16 near-ties aside)"]
    if opts.w4_prefill:
        # The prompts alone (every output cut to one token): work both sides do whatever the
        # batching, which bounds the speed-up of the whole run; the rest is the decoding.
        ones = [(p, 1) for p, _ in reqs]
        pre = dict(zip(fns, timed_pairs([lambda: w4_scheduler(ours, ones, opts.in_flight),
                                         lambda: w4_fixed(ours, ones, spec["fixed_batch"])], opts.repeats)))
        p_s, p_f = pre["scheduler"][1], pre["fixed"][1]
        lines.append(f"W4 prompts alone (1 new token each): scheduler {p_s:.2f} s, fixed batches {p_f:.2f} s; "
                     f"the rest (decoding): scheduler {t_s - p_s:.2f} s, fixed batches {t_f - p_f:.2f} s, "
                     f"speed-up {(t_f - p_f) / max(t_s - p_s, 1e-9):.2f}x")
    if opts.no_vllm:
        lines.append("W4 vLLM-CPU: not measured (--no-vllm)")
        return lines
    result, why = w4_vllm(hf_dir, tok, reqs, opts.threads)
    if result is None:
        lines.append(f"W4 vLLM-CPU: {why}")
    else:
        _, (t_v, c_v) = result
        lines.append(f"W4 vLLM-CPU: {t_v:.2f} s = {total / t_v:.1f} tok/s (CPU {c_v:.2f} s, one run after a warm-up); "
                     f"scheduler / vLLM throughput {t_v / t_s:.2f} (target >= 1)")
    return lines


def leading_match(a: list[int], b: list[int]) -> int:
    """Tokens equal before the first difference (after one, greedy decoding goes its own way)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def timed_pairs(fns: list, repeats: int) -> list[tuple[object, float, float]]:
    """(result, median wall seconds, median CPU seconds) per function. Each is warmed up once
    (allocator, oneDNN kernels, lazily built tables), then the functions run interleaved, so that
    load from other processes on the machine falls on all of them alike."""
    for fn in fns:
        fn()
    results: list = [None] * len(fns)
    walls: list[list[float]] = [[] for _ in fns]
    cpus: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            results[i], (wall, cpu) = fn()
            walls[i].append(wall)
            cpus[i].append(cpu)
    return [(r, statistics.median(w), statistics.median(c)) for r, w, c in zip(results, walls, cpus)]


COPY_BYTES = 1 << 30


def make_copy(nbytes: int = COPY_BYTES):
    """A timed 1 GiB tensor copy into a preallocated buffer; bandwidth = 2 * nbytes / seconds
    (bytes read + bytes written). Timed alongside the decode runs so that both see the same load."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=DEVICE)
    dst = torch.empty_like(src)

    def run():
        sync()
        start, cpu = time.perf_counter(), time.process_time()
        dst.copy_(src)
        sync()
        return None, (time.perf_counter() - start, time.process_time() - cpu)

    return run


def decode_weight_bytes(args: ModelArgs, element_size: int) -> int:
    kv_dim = args.kv_heads * args.head_size
    per_layer = 2 * args.dim * args.dim + 2 * args.dim * kv_dim + 3 * args.dim * args.ffn_size  # wq wo, wk wv, w1 w2 w3
    return (args.n_layers * per_layer + args.vocab_size * args.dim) * element_size


# --------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="W1,W2,W3")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="smaller model and sizes: a smoke run")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--model", choices=("default", "1b"), default="default",
                    help="default: dim 768, 12 layers (CPU); 1b: TinyLlama-shaped 1.1B GQA model (GPU)")
    ap.add_argument("--peak-bandwidth", type=float, default=None,
                    help="the device's nominal memory bandwidth in GB/s, shown beside the measured copy")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-hf", action="store_true", help="time only our engine (profiling)")
    ap.add_argument("--in-flight", type=int, default=64, help="W4: the scheduler's rows in flight")
    ap.add_argument("--no-vllm", action="store_true", help="W4: do not try vLLM")
    ap.add_argument("--w4-prefill", action="store_true",
                    help="W4: also time each side on the prompts alone (1 new token each) and show the decoding's "
                         "own speed-up")
    ap.add_argument("--no-native", action="store_true",
                    help="decode with the PyTorch step (lean.py) instead of the compiled one (native.py)")
    ap.add_argument("--fp32-check", choices=("auto", "always", "never"), default="auto",
                    help="rerun a short W1 in fp32 on both sides to check token identity "
                         "(auto: when bf16 tokens differ)")
    opts = ap.parse_args()
    names = [n.strip().upper() for n in opts.workloads.split(",") if n.strip()]
    table = QUICK if opts.quick else WORKLOADS
    unknown = [n for n in names if n not in table and n != "W4"]
    if unknown:
        ap.error(f"--workloads: unknown {unknown}; choose from {sorted(table)}")
    global DEVICE
    DEVICE = opts.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False)")
    torch.set_num_threads(opts.threads)
    args = ModelArgs(**(QUICK_MODEL if opts.quick else MODEL_1B if opts.model == "1b" else MODEL))

    with tempfile.TemporaryDirectory(prefix="bench_generate_") as tmp:
        tmp = Path(tmp)
        tok = make_tokenizer(tmp, args.vocab_size)
        meta_dir, hf_dir = make_checkpoints(tmp, args, opts.seed)
        ours = load_ours(meta_dir, tok, "bf16", native=not opts.no_native)
        hf = None if opts.no_hf else load_hf(hf_dir, torch.bfloat16)
        where = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU"
        print(f"model: dim {args.dim}, {args.n_layers} layers, {args.n_heads} heads ({args.kv_heads} kv), "
              f"FFN {args.ffn_size}, vocab {args.vocab_size}, bf16 on {where} | torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, "
              f"repeats {opts.repeats} (median), load average {os.getloadavg()[0]:.1f}\n"
              f"our decoding step: {step_name(ours)}")
        summary, mismatched = [], False
        print(f"\n{'wl':3} {'shape':>20} {'ours s':>7} {'ours tok/s':>10} {'HF s':>7} {'HF tok/s':>9} "
              f"{'ratio':>6} {'cpu s ours/HF':>14} {'cpu ratio':>9}  match (leading tokens equal per row)")
        for name in names:
            if name == "W4":
                for line in run_w4(ours, hf_dir, tok, args, opts):
                    print(line, flush=True)
                    summary.append(line)
                continue
            w = table[name]
            prompts = make_prompts(w, args.vocab_size, opts.seed)
            total = w.batch * w.new
            fns = {"ours": lambda: run_ours(ours, prompts, w.new)}
            if hf is not None:
                fns["hf"] = lambda: run_hf(hf, prompts, w.new)
            if w.shared:
                fns["warm"] = lambda: run_ours(ours, prompts, w.new, cold=False)
            if w.what == "bandwidth":
                # The decode-only rate subtracts the prefill, timed as a one-token generation.
                fns["prefill"] = lambda: run_ours(ours, prompts, 1)
                fns["copy"] = make_copy()
            timed = dict(zip(fns, timed_pairs(list(fns.values()), opts.repeats)))
            (toks, t_ours, c_ours) = timed["ours"]
            ours_tps = total / t_ours
            shape = f"b{w.batch} " + (f"{w.shared}+{w.own}" if w.shared else f"{w.own}") + f" ->{w.new}"
            if hf is not None:
                (hf_toks, t_hf, c_hf) = timed["hf"]
                hf_tps = total / t_hf
                match = [leading_match(a, b) for a, b in zip(toks, hf_toks)]
                identical = all(m == w.new for m in match)
                mismatched |= not identical
                rates = " ".join(f"{m / w.new:.2f}" for m in match)
                print(f"{name:3} {shape:>20} {t_ours:7.2f} {ours_tps:10.1f} {t_hf:7.2f} {hf_tps:9.1f} "
                      f"{ours_tps / hf_tps:6.2f} {c_ours:6.2f}/{c_hf:<7.2f} {c_hf / c_ours:9.2f}  "
                      f"{'identical' if identical else 'DIFFER'}: {rates}", flush=True)
            else:
                hf_tps = None
                print(f"{name:3} {shape:>20} {t_ours:7.2f} {ours_tps:10.1f} {'':7} {'':9} {'':6} {c_ours:6.2f}",
                      flush=True)
            line = f"{name}: ours {ours_tps:.1f} tok/s"
            if hf_tps:
                line += f", HF {hf_tps:.1f} tok/s, ratio {ours_tps / hf_tps:.2f}"
            if w.what == "ratio":
                line += f" (target >= {w.target:g}x)"
                if hf_tps:
                    line += f"; CPU-time ratio {c_hf / c_ours:.2f}"
            if "warm" in timed:
                _, t_warm, c_warm = timed["warm"]
                line += f"; prefix cached by an earlier call: ours {total / t_warm:.1f} tok/s"
                if hf_tps:
                    line += f", ratio {t_hf / t_warm:.2f} (CPU-time {c_hf / c_warm:.2f})"
            if w.what == "bandwidth":
                weights = decode_weight_bytes(args, 2)
                bandwidth = 2 * COPY_BYTES / timed["copy"][1]
                decode_tps = (w.new - 1) / max(t_ours - timed["prefill"][1], 1e-9)
                moved = decode_tps * weights
                line += (f"; decode {decode_tps:.1f} tok/s x {weights / 1e6:.0f} MB weights = {moved / 1e9:.2f} GB/s "
                         f"= {moved / bandwidth:.0%} of copy bandwidth {bandwidth / 1e9:.2f} GB/s "
                         f"(read + written, 1 GiB copy_) (target >= {w.target:.0%})")
                cpu_bw = 2 * COPY_BYTES / timed["copy"][2]
                cpu_moved = (w.new - 1) / max(c_ours - timed["prefill"][2], 1e-9) * weights
                if DEVICE == "cpu":
                    line += f"; by CPU time {cpu_moved / cpu_bw:.0%}"
                if opts.peak_bandwidth:
                    line += (f"; {moved / 1e9 / opts.peak_bandwidth:.0%} of the nominal {opts.peak_bandwidth:g} GB/s "
                             f"(copy reaches {bandwidth / 1e9 / opts.peak_bandwidth:.0%} of it)")
            summary.append(line)

        if hf is not None and (opts.fp32_check == "always" or (opts.fp32_check == "auto" and mismatched)):
            del ours, hf
            w = replace(table["W1"], name="W1-fp32")
            prompts = make_prompts(w, args.vocab_size, opts.seed)
            toks, _ = run_ours(load_ours(meta_dir, tok, "fp32"), prompts, w.new)
            hf_toks, _ = run_hf(load_hf(hf_dir, torch.float32), prompts, w.new)
            match = [leading_match(a, b) for a, b in zip(toks, hf_toks)]
            verdict = "identical" if all(m == w.new for m in match) else "DIFFER"
            summary.append(f"fp32 check (b{w.batch} {w.shared}+{w.own} ->{w.new}): {verdict}, per-row match "
                           + " ".join(f"{m / w.new:.2f}" for m in match))

    print()
    for line in summary:
        print(line)


if __name__ == "__main__":
    main()
