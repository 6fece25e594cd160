"""dromedary reward-model: an instructable reward model trained on principle-driven preferences.

load (preference records -> training pairs, kept as OUTPUT_DIR/pairs.jsonl; the backbone) ->
transform (Bradley-Terry training of a LoRA adapter and a scalar head) -> write (PEFT adapter,
reward_head.safetensors, log, instructability, provenance). The pairs come from
recipe.preferences.training_pairs; the model pieces from engine.reward and llama.lora.

Each pair is two reward prompts (the pair's principles, the request, one reply); the loss is
-log sigmoid(r(preferred) - r(other)). Micro-batches and their dropout seeds depend only on the
step, so any data-parallel split trains the same model, and a resumed run continues exactly.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import distributed, records
from ..engine import reward
from ..engine.builder import build, resolve_ckpt_dir
from ..llama import lora
from ..recipe import preferences as salmon
from ..recipe import sft
from .finetune import (_WHAT, _is_rank0, _latest_checkpoint, _prepare_output, _save, check_training_world,
                       lr_factor, open_log, restore)

_RESUME_KEYS = ("passes", "max_principles", "geometric_p", "negate_p", "language_rule", "disclaimer_rule",
                "label_noise", "eval_fraction", "max_len", "lora_r", "lora_alpha", "lora_dropout",
                "lora_target_modules", "batch_size", "micro_batch_size", "learning_rate", "warmup_ratio",
                "weight_decay", "max_grad_norm", "seed", "total_steps", "pairs_digest", "base_model", "tokenizer",
                "sft_adapter")
PREFERENCE_FIELDS = ("id", "instruction", "input", "output_1", "output_2", "scores")
_OUTPUTS = ("checkpoints", "pairs.jsonl", lora.CONFIG_FILE, lora.WEIGHTS_FILE, reward.HEAD_FILE, reward.META_FILE,
            "train_log.jsonl", "instructability.json", "reward_model.provenance.json")
# What the resume check names for the keys that are not flags.
_NAMES = {**_WHAT, "pairs_digest": "preference records or pair settings (--input, --passes, --principles, ...)",
          "sft_adapter": "--adapter (its content)"}


def reward_model(
    input: str,
    output_dir: str,
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    adapter: Optional[str] = None,
    principles: Optional[str] = None,
    passes: int = 2,
    max_principles: int = 4,
    geometric_p: float = 0.5,
    negate_p: float = 0.5,
    language_rule: bool = True,
    disclaimer_rule: bool = True,
    label_noise: float = 0.0,
    eval_fraction: float = 0.1,
    max_len: int = 1024,
    lora_r: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    lora_target_modules: str = "wq,wk,wv,wo,w1,w2,w3",
    num_epochs: Optional[float] = None,
    max_steps: Optional[int] = None,
    batch_size: int = 16,
    micro_batch_size: int = 4,
    learning_rate: float = 1e-4,
    warmup_ratio: float = 0.03,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    eval_steps: int = 50,
    save_steps: int = 100,
    model_parallel_size: Optional[int] = None,
    dtype: Optional[str] = None,
    seed: int = 0,
    resume: bool = False,
    overwrite: bool = False,
) -> None:
    """Make reward-model training pairs from INPUT's preference records and train a principle-following reward model on them into OUTPUT_DIR.

    The pairs (OUTPUT_DIR/pairs.jsonl, deterministic for --seed): in each of PASSES passes every
    preference record is shown under k sampled principles (k geometric with GEOMETRIC_P, at most
    MAX_PRINCIPLES), each negated with probability NEGATE_P, and labelled by the principle with
    the largest margin normalised by its spread over the file (ties dropped); the language and
    disclaimer rules override the judge; LABEL_NOISE flips labels at random. Then a LoRA adapter
    (with --adapter, the SFT adapter itself, further trained) and a scalar head on the last
    token's hidden state learn -log sigmoid(r(preferred) - r(other)). Held-out accuracy is
    logged as it trains; at the end, held-out accuracy with the labelling principles is compared
    with accuracy under the same principles negated (an instructable reward model flips).

    Args:
      input: JSONL preference records (from `dromedary preferences`).
      output_dir: where pairs.jsonl, the adapter (PEFT format), reward_head.safetensors, reward_model.json, train_log.jsonl, instructability.json and checkpoints/ go.
      ckpt_dir: base checkpoint. Default: the embedded tiny model.
      tokenizer_path: tokenizer file. Default: CKPT_DIR's own.
      adapter: start from this LoRA adapter (finetune's, the engraved model); its rank and targets are kept. Default: a fresh adapter.
      principles: the reward-principles JSON the scores were made with. Default: prompts/salmon/reward_principles.json.
      passes: passes over the preference records, each a fresh draw of principles.
      max_principles: most principles shown per pair.
      geometric_p: k principles with probability (1-p)^(k-1) p.
      negate_p: probability of negating each shown principle.
      language_rule: an answer in another script than the request loses.
      disclaimer_rule: an answer falling back on a stock disclaimer loses.
      label_noise: probability of flipping a pair's label.
      eval_fraction: held-out share of the preference records (all passes of a record go to the same side).
      max_len: most tokens of a reward prompt (longer ones lose the start of their principle list).
      lora_r: LoRA rank (without --adapter).
      lora_alpha: LoRA scaling numerator (without --adapter).
      lora_dropout: dropout on the LoRA input while training.
      lora_target_modules: projections to adapt (without --adapter).
      num_epochs: passes over the pairs. Default when neither this nor --max_steps is given: one epoch.
      max_steps: optimizer steps, instead of --num_epochs.
      batch_size: pairs per optimizer step over all data-parallel groups.
      micro_batch_size: pairs per forward pass (two sequences each).
      learning_rate: AdamW peak learning rate (adapter and head).
      warmup_ratio: linear warm-up share of the steps; cosine decay follows.
      weight_decay: AdamW weight decay.
      max_grad_norm: clip the gradient's global norm (0: off).
      eval_steps: held-out accuracy every this many steps (0: only at the end).
      save_steps: checkpoint every this many steps (0: only at the end).
      model_parallel_size: processes sharing one model copy. Default: the whole world.
      dtype: fp32 or bf16 for the frozen base weights. Default: bf16 on recent GPUs, fp32 on CPU.
      seed: seed for the pairs, the split, the head and LoRA initialisation, the order and dropout.
      resume: continue from the latest checkpoint in OUTPUT_DIR (exactly where an uninterrupted run would be).
      overwrite: start afresh in a non-empty OUTPUT_DIR (earlier outputs move to OUTPUT_DIR.bak-TIME).
    """
    options = dict(locals())
    settings = salmon.PairSettings(passes=passes, geometric_p=geometric_p, max_principles=max_principles,
                                   negate_p=negate_p, language_rule=language_rule, disclaimer_rule=disclaimer_rule,
                                   label_noise=label_noise, seed=seed)
    settings.check()
    targets = _check_flags(options)
    dims = salmon.load_reward_principles(principles)
    prefs = records.read_records(input, PREFERENCE_FIELDS, field_types={"scores": dict, "instruction": str,
                                                                        "input": str, "output_1": str, "output_2": str})
    for r in prefs:
        bad = [d for d, s in r["scores"].items() if not (isinstance(s, list) and len(s) == 2
                                                          and all(isinstance(x, (int, float)) for x in s))]
        if bad:
            raise ValueError(f"{input}: record {r['id']!r}: scores[{bad[0]!r}] must be [s12, s21], two numbers")
    pairs, counts = salmon.training_pairs(prefs, dims, settings)
    train, held = _split(pairs, eval_fraction, seed)
    if not train:
        raise ValueError(f"{input}: no training pairs ({counts['ties']} ties dropped)")
    total_samples = max_steps * batch_size if max_steps else max(1, math.ceil(round((num_epochs or 1.0) * len(train), 6)))
    total_steps = math.ceil(total_samples / batch_size)
    options.update(total_steps=total_steps, lora_target_modules=list(targets),
                   pairs_digest=records.record_digest({"pairs": [records.record_digest(p) for p in pairs]}),
                   base_model=records.path_identity(resolve_ckpt_dir(ckpt_dir)),
                   tokenizer=records.path_identity(tokenizer_path), sft_adapter=records.path_identity(adapter))
    out = Path(output_dir)
    resume_from = _latest_checkpoint(out, options, _RESUME_KEYS, _NAMES) if resume else None
    if not resume:
        _prepare_output(out, overwrite, _OUTPUTS)
    if _is_rank0():
        print(f"reward-model: {len(pairs)} pairs from {len(prefs)} preference records ({len(train)} train, "
              f"{len(held)} held out); " + ", ".join(f"{k} {v}" for k, v in counts.items() if k != "pairs"),
              file=sys.stderr)

    loaded = build(ckpt_dir, tokenizer_path=tokenizer_path, adapter=adapter, model_parallel_size=model_parallel_size,
                   seed=seed, dtype=dtype, max_seq_len=max_len, train=True)
    world, model, tok = loaded.world, loaded.model, loaded.tokenizer
    # Written only now: build() joined every rank, so each has checked the directory above before
    # anything lands in it (a rank checking after rank 0 wrote would see it "not empty").
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        records.write_jsonl_atomic(out / "pairs.jsonl", pairs, overwrite=True)
    if not lora.padding_is_harmless(loaded.source_args, world.mp_size):
        raise ValueError(lora._padding_message(loaded.source_args, world.mp_size))
    if not adapter:
        lora.add_lora(model, r=lora_r, alpha=lora_alpha, dropout=lora_dropout, targets=targets)
        lora.init_lora(model, seed, world)
    head = reward.RewardHead(loaded.args.dim).to(world.device)
    head.reset(seed)
    named = lora.trainable(model) + [(f"head.{n}", p, None) for n, p in head.named_parameters()]
    params = [p for _, p, _ in named]
    opt = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    warmup = math.ceil(warmup_ratio * total_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup, total_steps))
    encode = lambda p: _encode_pair(tok, p, max_len)  # noqa: E731
    train_data, held_data = [encode(p) for p in train], [encode(p) for p in held]
    autocast = (torch.autocast(world.device.type, dtype=torch.bfloat16)
                if next(model.parameters()).dtype == torch.bfloat16 else nullcontext())

    start = restore(resume_from, opt, sched, named, world, params_key="params")
    if start >= total_steps:
        if world.is_main:
            print(f"{out}: already trained {total_steps} steps; nothing to do", file=sys.stderr)
        return
    log = open_log(out / "train_log.jsonl", start, world)
    order = sft.DataOrder(len(train_data), seed)
    bar = tqdm(total=total_steps, initial=start, desc="reward-model", unit="step", dynamic_ncols=True,
               disable=not world.is_main, file=sys.stderr)
    # Absolute paths: `dromedary reward` and `rl` read them back from any working directory.
    where = lambda p: str(Path(p).expanduser().resolve()) if p else None  # noqa: E731
    meta = {"ckpt_dir": where(ckpt_dir), "tokenizer_path": where(tokenizer_path), "max_len": max_len,
            "principles": where(principles), "sft_adapter": where(adapter)}
    kill_after = int(os.environ.get("DROMEDARY_KILL_AFTER_STEP", 0))  # tests: a real SIGKILL mid-run
    for step in range(start, total_steps):
        model.train()
        batch = [train_data[i] for i in order.batch(step, batch_size, end=total_samples)]
        stats = _backward_batch(model, head, batch, micro_batch_size, world, seed=sft.hash_seed(seed, step),
                                autocast=autocast)
        lora.all_reduce_grads(params, world)
        grad_norm = lora.clip_grad_norm(named, max_grad_norm, world)
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss, correct = (sft.dp_sum(stats, world) / len(batch)).tolist()
        entry = {"step": step + 1, "loss": round(loss, 6), "train_accuracy": round(correct, 4), "lr": lr,
                 "grad_norm": round(grad_norm, 6)}
        done = step + 1 == total_steps
        if held_data and (done or (eval_steps and (step + 1) % eval_steps == 0)):
            entry["eval_accuracy"] = round(accuracy(model, head, held_data, micro_batch_size, world, autocast), 4)
        log(entry)
        bar.set_postfix_str(f"loss {loss:.4f}" + (f" eval acc {entry['eval_accuracy']:.3f}" if "eval_accuracy" in entry
                                                  else ""), refresh=False)
        bar.update(1)
        if done or (save_steps and (step + 1) % save_steps == 0):
            _save(out, step + 1, model, opt, sched, named, world, options, loaded.name, _RESUME_KEYS,
                  params_key="params", write_extra=lambda d: reward.save_head(d, head, meta))
        if kill_after and step + 1 == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    bar.close()
    report = instructability(model, head, tok, held, dims, max_len, micro_batch_size, world, autocast)
    if world.is_main:
        for name in (lora.CONFIG_FILE, lora.WEIGHTS_FILE, reward.HEAD_FILE, reward.META_FILE):
            shutil.copyfile(out / "checkpoints" / f"step-{total_steps:07d}" / name, out / name)
        (out / "instructability.json").write_text(json.dumps(report, indent=2) + "\n")
        records.write_provenance(out / "reward_model", command=sys.argv, options=options, model=loaded.name,
                                 extra={"world_size": world.world_size, "model_parallel_size": world.mp_size,
                                        "pairs": counts, "steps": [start, total_steps]})
        if report["pairs"]:
            print(f"reward-model: instructability on {report['pairs']} held-out pairs: accuracy "
                  f"{report['accuracy']:.3f} with their principles, {report['accuracy_negated']:.3f} with them "
                  f"negated (flipped choices: {report['flipped']:.3f})", file=sys.stderr)
        print(f"wrote reward model to {out}", file=sys.stderr)
    distributed.barrier()


Encoded = tuple[list[int], list[int], int]  # (ids of output_1's prompt, of output_2's, preference)


def _encode_pair(tok, pair: dict, max_len: int) -> Encoded:
    texts = [salmon.reward_prompt(pair["instruction"], pair["input"], pair[f"output_{i}"], pair["principles"])
             for i in (1, 2)]
    return tok.encode_tail(texts[0], max_len), tok.encode_tail(texts[1], max_len), int(pair["preference"])


def _rewards(model, head, micro: list[Encoded], device, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """(r(preferred), r(other)), each (m,), for m pairs run as one batch of 2m sequences."""
    rows = [e[0] for e in micro] + [e[1] for e in micro]
    tokens, lengths = reward.pad(rows, device)
    r = head(reward.last_hidden(model, tokens, lengths, autocast))  # (2m,)
    r1, r2 = r[: len(micro)], r[len(micro):]
    first = torch.tensor([e[2] == 1 for e in micro], device=r.device)
    return torch.where(first, r1, r2), torch.where(first, r2, r1)


def _backward_batch(model, head, batch: list[Encoded], micro_batch_size: int, world, *, seed: int,
                    autocast) -> torch.Tensor:
    """Forward and backward of this rank's share of a global batch; returns (summed loss, correct)
    of the share. Micro-batches and their dropout seeds are the same for any data-parallel size."""
    micros = [batch[j : j + micro_batch_size] for j in range(0, len(batch), micro_batch_size)]
    owners = sft.deal_micro_batches([len(m) * max(len(e[0]) + len(e[1]) for e in m) for m in micros], world.dp_size)
    stats = torch.zeros(2)
    for j, micro in enumerate(micros):
        if owners[j] != world.dp_rank:
            continue
        torch.manual_seed(sft.hash_seed(seed, j))
        good, bad = _rewards(model, head, micro, world.device, autocast)
        loss = -F.logsigmoid(good - bad).sum()
        (loss / len(batch)).backward()
        stats += torch.tensor([loss.item(), float((good > bad).sum())])
    for p in list(model.parameters()) + list(head.parameters()):
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    return stats


@torch.no_grad()
def accuracy(model, head, data: list[Encoded], micro_batch_size: int, world, autocast=nullcontext()) -> float:
    """Share of pairs whose preferred reply gets the higher reward (split between the DP groups)."""
    model.eval()
    mine = records.split_for_data_parallel(data, world.dp_rank, world.dp_size)
    stats = torch.zeros(2)
    for j in range(0, len(mine), micro_batch_size):
        good, bad = _rewards(model, head, mine[j : j + micro_batch_size], world.device, autocast)
        stats += torch.tensor([float((good > bad).sum()), float(len(good))])
    model.train()
    stats = sft.dp_sum(stats, world)
    return (stats[0] / stats[1].clamp(min=1)).item()


def instructability(model, head, tok, held: list[dict], dims, max_len: int, micro_batch_size: int, world,
                    autocast) -> dict:
    """On the held-out pairs a principle labelled (not a rule, no noise): accuracy with their
    principles, accuracy against the flipped label with every principle negated, and the share
    whose choice flipped."""
    judged = [p for p in held if not p["label"].startswith("rule:") and not p["label"].endswith("+noise")]
    if not judged:
        return {"pairs": 0}
    plain = [_encode_pair(tok, p, max_len) for p in judged]
    negated = [_encode_pair(tok, salmon.negate_pair(p, dims), max_len) for p in judged]
    model.eval()
    margins = []
    with torch.no_grad():
        for data in (plain, negated):
            m = []
            for j in range(0, len(data), micro_batch_size):
                micro = [(a, b, 1) for a, b, _ in data[j : j + micro_batch_size]]  # r(output_1) - r(output_2)
                one, two = _rewards(model, head, micro, world.device, autocast)
                m += (one - two).tolist()
            margins.append(m)
    want = [p["preference"] for p in judged]
    hit = lambda ms, labels: sum((m > 0) == (y == 1) for m, y in zip(ms, labels)) / len(labels)  # noqa: E731
    return {"pairs": len(judged), "accuracy": hit(margins[0], want),
            "accuracy_negated": hit(margins[1], [3 - y for y in want]),
            "flipped": sum((a > 0) != (b > 0) for a, b in zip(*margins)) / len(judged)}


# ---------------------------------------------------------------------------------------------
# Flags, split, output directory, checkpoints.


def _check_flags(o: dict) -> tuple[str, ...]:
    if o["max_steps"] is not None and o["num_epochs"] is not None:
        raise ValueError("pass either --max_steps or --num_epochs, not both")
    for name in ("batch_size", "micro_batch_size", "max_len"):
        if o[name] < 1:
            raise ValueError(f"--{name} must be at least 1, got {o[name]}")
    if o["max_steps"] is not None and o["max_steps"] < 1 or o["num_epochs"] is not None and o["num_epochs"] <= 0:
        raise ValueError("--max_steps and --num_epochs must be positive")
    if not 0 <= o["lora_dropout"] < 1 or not 0 <= o["warmup_ratio"] < 1 or not 0 <= o["eval_fraction"] < 1:
        raise ValueError("--lora_dropout, --warmup_ratio and --eval_fraction must lie in [0, 1)")
    if o["resume"] and o["overwrite"]:
        raise ValueError("--resume continues OUTPUT_DIR and --overwrite starts it afresh: pass one of them")
    check_training_world(o, "reward-model", o["micro_batch_size"])
    return lora.parse_targets(o["lora_target_modules"])


def _split(pairs: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out the pairs of ceil(fraction * N) preference records (smallest hash of (seed, id)):
    a record's passes share its two replies, so they stay on one side."""
    if not fraction:
        return pairs, []
    sources = sorted({p["id"].rsplit("#", 1)[0] for p in pairs},
                     key=lambda s: hashlib.sha256(f"{seed}\0{s}".encode()).digest())
    held = set(sources[: math.ceil(fraction * len(sources))])
    return ([p for p in pairs if p["id"].rsplit("#", 1)[0] not in held],
            [p for p in pairs if p["id"].rsplit("#", 1)[0] in held])

