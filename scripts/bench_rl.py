"""Preference-optimisation throughput: dromedary dpo's step against TRL's DPOTrainer, in one run;
and the rl stage's own rollout and optimisation rates where that stage exists.

DPO. Both train the same random LLaMA (ours from a Meta-layout checkpoint, TRL's
LlamaForCausalLM from the same weights in HF layout) with the same LoRA (rank, alpha, dropout, all
seven projections), the same batches of pairs (a prompt, a chosen and a rejected answer, every
pair the same length so both see the same tokens per step whatever their order), micro-batch
size, beta and AdamW; the reference is the model with its adapter off on both sides (TRL's choice
for a PEFT model without a ref_model). One timed step = the policy and reference forwards and
the backward of every micro-batch of one global batch, then the optimizer step; for TRL the time
from its on_step_begin to on_step_end callbacks. Printed: optimisation tokens/s (prompt and
answer tokens of both sequences) per step, median over the steps after the first, and the ratio.

TRL is not a dependency of dromedary. Install it beside the venv's transformers, accelerate and
datasets without pulling anything else:

    .venv/bin/pip install --no-deps trl

Without it the TRL column is skipped. The rl section runs `dromedary rl` for a few steps on the
embedded default model (against a reward model trained for two steps here, unless --rl_flags
names one with --rm) and prints the rollout_tokens_per_s and opt_tokens_per_s it logs; extra
flags for it go in --rl_flags.

    .venv/bin/python scripts/bench_rl.py                    # CPU, fp32
    .venv/bin/python scripts/bench_rl.py --device cuda --dtype bf16 --dim 2048 --n_layers 16
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dromedary.engine import builder  # noqa: E402
from dromedary.llama import checkpoint, lora  # noqa: E402
from dromedary.llama.model import ModelArgs  # noqa: E402
from dromedary.stages import dpo as dpo_stage  # noqa: E402

from bench_finetune import _tiny_tokenizer  # noqa: E402  (scripts/ is on the path: this script's folder)

EOS = 2
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def synthetic_pairs(n: int, prompt_len: int, answer_len: int, vocab: int, seed: int = 0) -> list[dict]:
    """Pairs of token ids: a prompt and two answers of answer_len tokens ending in EOS."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda k: torch.randint(3, vocab, (k,), generator=g).tolist()  # noqa: E731
    return [{"prompt": ids(prompt_len), "chosen": ids(answer_len - 1) + [EOS], "rejected": ids(answer_len - 1) + [EOS]}
            for _ in range(n)]


def _sync(device: str):
    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


def ours(ckpt: Path, a, pairs: list[dict]) -> list[float]:
    """Seconds per optimizer step of dromedary dpo's step on the pairs, in batches of a.batch_size."""
    loaded = builder.build(str(ckpt), model_parallel_size=1, dtype=a.dtype, device=a.device, train=True)
    model = lora.add_lora(loaded.model, r=a.lora_r, alpha=a.lora_alpha, dropout=a.lora_dropout,
                          targets=list(lora.MODULES))
    lora.init_lora(model, 0, loaded.world)
    model.gradient_checkpointing = a.gradient_checkpointing
    named = lora.trainable(model)
    opt = torch.optim.AdamW([p for _, p, _ in named], lr=1e-4)
    autocast = torch.autocast(a.device, dtype=torch.bfloat16) if a.dtype == "bf16" else nullcontext()
    data = [((p["prompt"] + p["chosen"], len(p["prompt"])), (p["prompt"] + p["rejected"], len(p["prompt"])))
            for p in pairs]
    sync, times = _sync(a.device), []
    for s in range(0, len(data), a.batch_size):
        sync()
        start = time.perf_counter()
        dpo_stage.backward_batch(model, data[s : s + a.batch_size], a.micro_batch_size, loaded.world, seed=s,
                                 autocast=autocast, beta=a.beta, loss_type="sigmoid", label_smoothing=0.0)
        lora.clip_grad_norm(named, 1.0, loaded.world)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - start)
    del model, loaded
    return times


def trl_available() -> bool:
    try:
        import trl  # noqa: F401
    except ImportError:
        return False
    return True


def trl(ckpt: Path, a, pairs: list[dict], tmp: Path) -> list[float]:
    """Seconds per optimizer step of TRL's DPOTrainer on the same pairs (a word-level tokenizer
    whose words are the token ids, so its tokenization gives exactly our ids)."""
    from datasets import Dataset
    from peft import LoraConfig
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    # Special tokens are matched inside words: their names must not be the prefix of another word.
    word = lambda i: {0: "<pad>", EOS: "</s>"}.get(i, f"t{i}")  # noqa: E731
    core = Tokenizer(models.WordLevel({word(i): i for i in range(a.vocab)}, unk_token=word(0)))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=word(EOS), pad_token=word(0), unk_token=word(0))
    text = lambda ids: "".join(" " + word(i) for i in ids)  # noqa: E731 - prompt + answer concatenate cleanly
    rows = [{"prompt": text(p["prompt"]), "chosen": text(p["chosen"]), "rejected": text(p["rejected"])} for p in pairs]
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    model = LlamaForCausalLM.from_pretrained(str(ckpt), dtype=dtype, attn_implementation="sdpa")
    config = DPOConfig(output_dir=str(tmp / "trl"), per_device_train_batch_size=a.micro_batch_size,
                       gradient_accumulation_steps=a.batch_size // a.micro_batch_size,
                       max_steps=len(pairs) // a.batch_size, learning_rate=1e-4, lr_scheduler_type="constant",
                       warmup_steps=0, beta=a.beta, loss_type=["sigmoid"], max_length=None, max_grad_norm=1.0,
                       gradient_checkpointing=a.gradient_checkpointing, bf16=a.dtype == "bf16",
                       use_cpu=not a.device.startswith("cuda"), report_to=[], save_strategy="no", logging_steps=10**6,
                       dataloader_num_workers=0, disable_tqdm=True, seed=0, precompute_ref_log_probs=False)
    peft = LoraConfig(r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=a.lora_dropout, bias="none",
                      task_type="CAUSAL_LM", target_modules=HF_TARGETS)
    sync, times = _sync(a.device), []

    class Clock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            sync()
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            sync()
            times.append(time.perf_counter() - self.start)

    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=peft, callbacks=[Clock()])
    first = trainer.train_dataset[0]
    if [first["prompt_ids"], first["chosen_ids"], first["rejected_ids"]] != [pairs[0][k] for k in ("prompt", "chosen",
                                                                                                  "rejected")]:
        raise RuntimeError("TRL tokenized the pairs into other ids than ours: the comparison would not be fair")
    trainer.train()
    return times


def dpo_section(a, tmp: Path) -> None:
    args = ModelArgs(dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads, vocab_size=a.vocab, multiple_of=256,
                     max_seq_len=a.prompt_len + a.answer_len)
    state = checkpoint.init_state(args, seed=0)
    checkpoint.save_checkpoint(checkpoint.StateReader(args, state), tmp / "meta", layout="meta")
    checkpoint.save_checkpoint(checkpoint.StateReader(args, state), tmp / "hf", layout="hf")
    del state
    _tiny_tokenizer(tmp / "meta" / "tokenizer.model")  # the builder wants a tokenizer file; the ids are synthetic
    pairs = synthetic_pairs(a.batch_size * (a.steps + 1), a.prompt_len, a.answer_len, a.vocab)
    tokens_per_step = a.batch_size * 2 * (a.prompt_len + a.answer_len)
    rates = {"dromedary": [tokens_per_step / t for t in ours(tmp / "meta", a, pairs)[1:]]}  # the first is warm-up
    if trl_available():
        import trl as trl_module

        theirs = trl(tmp / "hf", a, pairs, tmp)
        rates[f"trl {trl_module.__version__} DPOTrainer"] = [tokens_per_step / t for t in theirs[1:]]
    dev = torch.cuda.get_device_name() if a.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"DPO: model dim {a.dim}, {a.n_layers} layers, vocab {a.vocab}; pairs of a {a.prompt_len}-token prompt and "
          f"two {a.answer_len}-token answers, batch {a.batch_size} in micro-batches of {a.micro_batch_size}; LoRA "
          f"r={a.lora_r} alpha={a.lora_alpha} dropout={a.lora_dropout} on 7 projections; beta {a.beta}; {a.dtype}; "
          f"{dev}; checkpointing {a.gradient_checkpointing}; {a.steps} timed steps each")
    width = max(map(len, rates))
    for name, r in rates.items():
        print(f"  {name:{width}s} {statistics.median(r):10.1f} optimisation tokens/s median, {max(r):10.1f} best")
    if len(rates) == 1:
        print("  trl: not installed, TRL column skipped (install: .venv/bin/pip install --no-deps trl)")
        return
    mine, theirs = (statistics.median(r) for r in rates.values())
    print(f"ratio dromedary / TRL DPOTrainer: {mine / theirs:.2f}x")


def rl_section(a, tmp: Path) -> None:
    """`dromedary rl` for a few steps on the embedded default model: its logged rates per step."""
    if importlib.util.find_spec("dromedary.stages.rl") is None:
        print("RL: the rl stage (dromedary.stages.rl) is absent; nothing to measure")
        return
    prompts = tmp / "rl_prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "instruction": f"Tell me about topic {i}.", "input": ""})
                               + "\n" for i in range(16)))
    root = Path(__file__).resolve().parents[1]
    extra = shlex.split(a.rl_flags)
    if "--rm" not in extra:
        rm = _tiny_reward_model(tmp, root)
        if rm is None:
            return
        extra += ["--rm", str(rm)]
    out = tmp / "rl"
    cmd = [sys.executable, "-m", "dromedary", "rl", "--input", str(prompts), "--output_dir", str(out),
           "--max_steps", str(a.rl_steps), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
    log = out / "train_log.jsonl"
    if proc.returncode != 0 or not log.exists():
        print(f"RL: `{shlex.join(cmd)}` failed (exit {proc.returncode}); pass what it needs in --rl_flags:\n"
              + "\n".join(proc.stderr.strip().splitlines()[-5:]))
        return
    entries = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    print(f"RL: dromedary rl on the embedded default model, {len(entries)} steps")
    for e in entries:
        print(f"  step {e.get('step')}: rollout {e.get('rollout_tokens_per_s')} tokens/s, "
              f"optimisation {e.get('opt_tokens_per_s')} tokens/s")


def _tiny_reward_model(tmp: Path, root: Path):
    """Without --rl_flags "--rm DIR": a reward model trained for two steps on synthetic preference
    records (it only has to be a reward model: the rates do not depend on what it learned)."""
    principles = tmp / "rm_principles.json"
    principles.write_text(json.dumps({"principles": [{"name": "brief", "definition": "The reply is brief.",
                                                      "negative": "The reply is long-winded."}]}))
    prefs = tmp / "rm_prefs.jsonl"
    with prefs.open("w") as f:
        for i in range(16):
            m = 1.0 if i % 2 else -1.0
            f.write(json.dumps({"id": f"r{i}", "instruction": f"Say something about topic {i}.", "input": "",
                                "output_1": "Sure.", "output_2": "Well, there is a great deal one could say here.",
                                "scores": {"brief": [m, m]}}) + "\n")
    rm = tmp / "rm"
    cmd = [sys.executable, "-m", "dromedary", "reward-model", "--input", str(prefs), "--principles", str(principles),
           "--output_dir", str(rm), "--max_steps", "2", "--batch_size", "8", "--micro_batch_size", "8",
           "--passes", "1", "--max_len", "256"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
    if proc.returncode != 0:
        print(f"RL: making a tiny reward model failed (exit {proc.returncode}):\n"
              + "\n".join(proc.stderr.strip().splitlines()[-5:]))
        return None
    return rm


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--n_layers", type=int, default=4)
    p.add_argument("--n_heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--prompt_len", type=int, default=96)
    p.add_argument("--answer_len", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--micro_batch_size", type=int, default=4)
    p.add_argument("--lora_r", type=int, default=16)
    p.add_argument("--lora_alpha", type=float, default=32.0)
    p.add_argument("--lora_dropout", type=float, default=0.0)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--steps", type=int, default=4, help="timed optimizer steps (after one warm-up step)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--skip_dpo", action="store_true")
    p.add_argument("--skip_rl", action="store_true")
    p.add_argument("--rl_steps", type=int, default=2)
    p.add_argument("--rl_flags", default="", help="extra flags for `dromedary rl`, as one string")
    a = p.parse_args()
    if a.batch_size % a.micro_batch_size:
        p.error("--batch_size must be a multiple of --micro_batch_size")
    if a.threads:
        torch.set_num_threads(a.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench-rl-"))
    try:
        if not a.skip_dpo:
            dpo_section(a, tmp)
        if not a.skip_rl:
            rl_section(a, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
