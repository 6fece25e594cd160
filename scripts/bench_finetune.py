"""LoRA training throughput: dromedary finetune's step against HF transformers + peft, in one run.

Both train the same random LLaMA (ours from a Meta-layout checkpoint, HF's LlamaForCausalLM from
the same weights in HF layout) on the same global batches of SFT-shaped examples (a prompt, then an
answer that carries the loss), with the same LoRA configuration (rank, alpha, dropout, all seven
projections), micro-batch size and AdamW. One timed step = forward + backward of every micro-batch
of one global batch, then the optimizer step. HF is driven the way its recipes drive it:
`model(input_ids, labels=labels).loss` with -100 on the prompt and padding, micro-batches in data
order. A third row runs our model on exactly HF's micro-batches, to separate the per-token speed
from the length grouping. Rounds alternate so that machine noise hits every runner alike.

    .venv/bin/python scripts/bench_finetune.py                   # CPU, fp32
    .venv/bin/python scripts/bench_finetune.py --device cuda --dtype bf16 --dim 2048 --n_layers 16
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dromedary.engine import builder
from dromedary.llama import checkpoint, lora
from dromedary.llama.model import ModelArgs  # noqa: E402
from dromedary.recipe import sft  # noqa: E402


def synthetic_batches(n: int, size: int, seq_len: int, vocab: int, seed: int = 0) -> list[list[sft.Example]]:
    """Global batches of (ids, n_source): rows of 25-100% of seq_len, the prompt 30-60% of each."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        batch = []
        for _ in range(size):
            length = int(torch.randint(seq_len // 4, seq_len + 1, (), generator=g))
            n_src = int(length * (0.3 + 0.3 * torch.rand((), generator=g).item()))
            batch.append((torch.randint(3, vocab, (length,), generator=g).tolist(), n_src))
        batches.append(batch)
    return batches


def _micro(batch, size):
    return [batch[i : i + size] for i in range(0, len(batch), size)]


def ours(ckpt: Path, a, device: str, grouped: bool = True):
    loaded = builder.build(str(ckpt), model_parallel_size=1, dtype=a.dtype, device=device, train=True)
    model = lora.add_lora(loaded.model, r=a.lora_r, alpha=a.lora_alpha, dropout=a.lora_dropout,
                          targets=list(lora.MODULES))
    lora.init_lora(model, 0, loaded.world)
    model.gradient_checkpointing = a.gradient_checkpointing
    opt = torch.optim.AdamW([p for _, p, _ in lora.trainable(model)], lr=1e-4)
    autocast = torch.autocast(device, dtype=torch.bfloat16) if a.dtype == "bf16" else nullcontext()

    def step(batch):
        if grouped:  # what the finetune stage runs
            sft.backward_batch(model, batch, a.micro_batch_size, loaded.world, seed=0, autocast=autocast)
        else:  # HF's micro-batches, HF's loss normalisation
            for micro in _micro(batch, a.micro_batch_size):
                tokens, labels = sft.collate(micro, device)
                loss = sft.loss_sum(model, tokens, labels, autocast) / (labels != sft.IGNORE).sum()
                (loss / len(batch) * len(micro)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def hf(ckpt: Path, a, device: str):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    model = LlamaForCausalLM.from_pretrained(str(ckpt), dtype=dtype, attn_implementation="sdpa").to(device)
    if a.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    cfg = LoraConfig(r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=a.lora_dropout, bias="none",
                     task_type="CAUSAL_LM", target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                            "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, cfg)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    autocast = torch.autocast(device, dtype=torch.bfloat16) if a.dtype == "bf16" else nullcontext()

    def step(batch):
        for micro in _micro(batch, a.micro_batch_size):
            tokens, labels = sft.collate(micro, device)
            with autocast:
                loss = model(input_ids=tokens, labels=labels).loss
            (loss / len(batch) * len(micro)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def timed(step, batches, device: str, clock) -> float:
    """Real (non-padding) tokens per second over `batches`."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    start = clock()
    for batch in batches:
        step(batch)
    sync()
    return sum(len(ids) for batch in batches for ids, _ in batch) / (clock() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--n_layers", type=int, default=6)
    p.add_argument("--n_heads", type=int, default=6)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--micro_batch_size", type=int, default=4)
    p.add_argument("--lora_r", type=int, default=16)
    p.add_argument("--lora_alpha", type=float, default=32.0)
    p.add_argument("--lora_dropout", type=float, default=0.05)
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--steps", type=int, default=2, help="timed optimizer steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: this process's CPU time, steadier than wall time on a shared machine (use with --threads 1)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    args = ModelArgs(dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads, vocab_size=a.vocab, multiple_of=256,
                     max_seq_len=a.seq_len)
    tmp = Path(tempfile.mkdtemp(prefix="bench-finetune-"))
    try:
        run(a, args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(a, args: ModelArgs, tmp: Path) -> None:
    state = checkpoint.init_state(args, seed=0)
    checkpoint.save_checkpoint(checkpoint.StateReader(args, state), tmp / "meta", layout="meta")
    checkpoint.save_checkpoint(checkpoint.StateReader(args, state), tmp / "hf", layout="hf")
    del state
    # builder wants a tokenizer file; any SentencePiece model with <= vocab pieces will do.
    _tiny_tokenizer(tmp / "meta" / "tokenizer.model")

    runners = {"dromedary": ours(tmp / "meta", a, a.device),
               "hf+peft": hf(tmp / "hf", a, a.device),
               "dromedary on HF's micro-batches": ours(tmp / "meta", a, a.device, grouped=False)}
    batches = synthetic_batches(a.steps, a.batch_size, a.seq_len, a.vocab)
    for step in runners.values():  # warm-up (allocator, autotuning, lazy init)
        step(batches[0])
    rates: dict[str, list[float]] = {k: [] for k in runners}
    clock = time.process_time if a.clock == "cpu" else time.perf_counter
    for _ in range(a.rounds):
        for name, step in runners.items():
            rates[name].append(timed(step, batches, a.device, clock))
    dev = torch.cuda.get_device_name() if a.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"{a.clock} clock; model dim {a.dim}, {a.n_layers} layers, vocab {a.vocab}; rows of {a.seq_len // 4}-{a.seq_len} tokens, "
          f"batch {a.batch_size} in micro-batches of {a.micro_batch_size}; LoRA r={a.lora_r} alpha={a.lora_alpha} "
          f"dropout={a.lora_dropout} on 7 projections; {a.dtype}; {dev}; checkpointing {a.gradient_checkpointing}")
    width = max(map(len, rates))
    for name, r in rates.items():
        print(f"  {name:{width}s} {statistics.median(r):10.1f} tokens/s median, {max(r):10.1f} best  "
              f"(rounds: {', '.join(f'{x:.0f}' for x in r)})")
    base = statistics.median(rates["hf+peft"])
    print(f"ratio dromedary / hf+peft: {statistics.median(rates['dromedary']) / base:.2f}x "
          f"(on HF's micro-batches: {statistics.median(rates[list(rates)[2]]) / base:.2f}x)")


def _tiny_tokenizer(path: Path) -> None:
    import sentencepiece as spm

    words = "the camel walks across desert sand water river city people good helpful honest answer".split()
    lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(8)) for i in range(300)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(path.with_suffix("")),
                                   vocab_size=300, model_type="bpe", byte_fallback=True, minloglevel=2,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1)


if __name__ == "__main__":
    main()
