"""LoRA training throughput: dromedary finetune's step against HF transformers + peft, in one run.

Both train the same random LLaMA (ours from a Meta-layout checkpoint, HF's LlamaForCausalLM from
the same weights in HF layout), on the same token ids with the same source/target split, at the
same micro-batch size, with the same LoRA configuration (rank, alpha, dropout, all seven
projections) and AdamW. One timed step = forward + backward + optimizer step of one micro-batch.
HF is driven the way its own recipes drive it: `model(input_ids, labels=labels).loss` with -100
on the prompt and padding. Rounds alternate between the two so that machine noise hits both alike.

    .venv/bin/python scripts/bench_finetune.py                   # CPU, fp32
    .venv/bin/python scripts/bench_finetune.py --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dromedary import builder, checkpoint, lora  # noqa: E402
from dromedary.model import ModelArgs  # noqa: E402
from dromedary.sft import IGNORE, loss_sum  # noqa: E402


def synthetic_batches(n: int, micro: int, seq_len: int, vocab: int, seed: int = 0):
    """SFT-shaped micro-batches: a prompt of 30-60% of the row, then the answer; rows of 60-100% of
    seq_len, right-padded; labels -100 on prompt and padding."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lengths = torch.randint(int(0.6 * seq_len), seq_len + 1, (micro,), generator=g).tolist()
        width = max(lengths)
        tokens = torch.zeros(micro, width, dtype=torch.long)
        labels = torch.full((micro, width), IGNORE, dtype=torch.long)
        for row, length in enumerate(lengths):
            ids = torch.randint(3, vocab, (length,), generator=g)
            src = int(length * (0.3 + 0.3 * torch.rand((), generator=g).item()))
            tokens[row, :length] = ids
            labels[row, src:length] = ids[src:]
        out.append((tokens, labels))
    return out


def ours(ckpt: Path, a, device: str):
    loaded = builder.build(str(ckpt), model_parallel_size=1, dtype=a.dtype, device=device, train=True)
    model = lora.add_lora(loaded.model, r=a.lora_r, alpha=a.lora_alpha, dropout=a.lora_dropout,
                          targets=list(lora.MODULES))
    lora.init_lora(model, 0, loaded.world)
    model.gradient_checkpointing = a.gradient_checkpointing
    params = [p for _, p, _ in lora.trainable(model)]
    opt = torch.optim.AdamW(params, lr=1e-4)
    bf16 = a.dtype == "bf16"
    autocast = torch.autocast(device, dtype=torch.bfloat16) if bf16 else nullcontext()

    def step(tokens, labels):
        tokens, labels = tokens.to(device), labels.to(device)
        loss = loss_sum(model, tokens, labels, autocast) / (labels != IGNORE).sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

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

    def step(tokens, labels):
        tokens, labels = tokens.to(device), labels.to(device)
        with autocast:
            loss = model(input_ids=tokens, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def timed(step, batches, device: str) -> float:
    """Tokens (non-padding) per second over `batches`."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    tokens = 0
    for t, l in batches:
        step(t, l)
        tokens += int((t != 0).sum())
    sync()
    return tokens / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--n_layers", type=int, default=8)
    p.add_argument("--n_heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--micro_batch_size", type=int, default=4)
    p.add_argument("--lora_r", type=int, default=16)
    p.add_argument("--lora_alpha", type=float, default=32.0)
    p.add_argument("--lora_dropout", type=float, default=0.05)
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--steps", type=int, default=4, help="timed micro-batches per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    args = ModelArgs(dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads, vocab_size=a.vocab, multiple_of=256,
                     max_seq_len=a.seq_len)
    tmp = Path(tempfile.mkdtemp(prefix="bench-finetune-"))
    state = checkpoint.init_state(args, seed=0)
    checkpoint.save_checkpoint(checkpoint.StateReader(args, state), tmp / "meta", layout="meta")
    checkpoint.save_checkpoint(checkpoint.StateReader(args, state), tmp / "hf", layout="hf")
    del state
    # builder wants a tokenizer file; any SentencePiece model with <= vocab pieces will do.
    _tiny_tokenizer(tmp / "meta" / "tokenizer.model")

    runners = {"dromedary": ours(tmp / "meta", a, a.device), "hf+peft": hf(tmp / "hf", a, a.device)}
    batches = synthetic_batches(a.steps, a.micro_batch_size, a.seq_len, a.vocab)
    for step in runners.values():  # warm-up (allocator, autotuning, lazy init)
        step(*batches[0])
    rates: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(a.rounds):
        for name, step in runners.items():
            rates[name].append(timed(step, batches, a.device))
    dev = torch.cuda.get_device_name() if a.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"model dim {a.dim}, {a.n_layers} layers, vocab {a.vocab}; seq_len <= {a.seq_len}, micro-batch "
          f"{a.micro_batch_size}; LoRA r={a.lora_r} alpha={a.lora_alpha} dropout={a.lora_dropout} on 7 "
          f"projections; {a.dtype}; {dev}; checkpointing {a.gradient_checkpointing}")
    for name, r in rates.items():
        print(f"  {name:10s} {statistics.median(r):10.1f} tokens/s  (rounds: {', '.join(f'{x:.0f}' for x in r)})")
    ratio = statistics.median(rates["dromedary"]) / statistics.median(rates["hf+peft"])
    print(f"ratio dromedary / hf+peft: {ratio:.2f}x")


def _tiny_tokenizer(path: Path) -> None:
    import sentencepiece as spm

    words = "the camel walks across desert sand water river city people good helpful honest answer".split()
    lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(8)) for i in range(300)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(path.with_suffix("")),
                                   vocab_size=300, model_type="bpe", byte_fallback=True, minloglevel=2,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1)


if __name__ == "__main__":
    main()
