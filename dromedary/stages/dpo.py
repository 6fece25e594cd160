"""dromedary dpo: direct preference optimisation of the engraved model on preference pairs.

load (pairs -> chosen/rejected conversations, kept as OUTPUT_DIR/dpo_pairs.jsonl; the model) ->
transform (DPO or IPO training of a LoRA adapter) -> write (PEFT adapter for the plain base, log,
provenance). Pairs and losses live in dromedary.recipe.dpo, answer log-probabilities in
recipe.policy, the conversation format and its loss mask in recipe.sft (finetune's).

The policy and the reference are one model. `build(merge_adapter=SFT)` folds the engraving into
the frozen base weights as they load, and a fresh LoRA adapter goes on top; the reference pass is
the same model inside `lora.adapters_off` under no_grad. So the weights are in memory once (no
frozen copy, which for a 70B model would double it), the reference is exactly the model the run
started from (the fresh adapter's B factors are zero, so the policy starts equal to it), and the
price is one extra forward pass per micro-batch without gradients, in the same step. Without
--adapter the base itself is the start and the reference.

The adapter trained here applies to the merged model; OUTPUT_DIR gets one that applies to the
plain base (with --adapter, `lora.stack_adapters`: the engraving and this adapter as one exact
LoRA of rank r1 + r2), so `chat`, `generate`, `evaluate` and HF peft take it like finetune's.
Micro-batches and their dropout seeds depend only on the step, so any data-parallel split trains
the same model, and a resumed run continues exactly.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from .. import records
from ..engine.builder import build, resolve_ckpt_dir
from ..llama import lora
from ..recipe import dpo as dpo_recipe
from ..recipe import policy, sft, templates
from .finetune import (_latest_checkpoint, _prepare_output, _publish, _save, _split,
                       _WHAT, check_training_world, lr_factor, open_log, restore)

_OUTPUTS = ("checkpoints", "dpo_pairs.jsonl", lora.CONFIG_FILE, lora.WEIGHTS_FILE, "train_log.jsonl",
            "dpo.provenance.json")
_RESUME_KEYS = ("beta", "loss", "label_smoothing", "source_max_len", "target_max_len", "add_eos", "assistant_name",
                "knowledge_cutoff", "language_rule", "disclaimer_rule", "lora_r", "lora_alpha", "lora_dropout",
                "lora_target_modules", "batch_size", "learning_rate", "warmup_ratio", "weight_decay",
                "max_grad_norm", "seed", "total_steps", "total_samples", "train_pairs", "base_model", "tokenizer",
                "sft_adapter")
_NAMES = {**_WHAT, "train_pairs": "training pairs (--input, --eval_fraction, the rules)",
          "sft_adapter": "--adapter (its content)"}

Pair = tuple[sft.Example, sft.Example]  # (chosen, rejected): the same source, two answers


def dpo(
    input: str,
    output_dir: str,
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    adapter: Optional[str] = None,
    beta: float = 0.1,
    loss: str = "sigmoid",
    label_smoothing: float = 0.0,
    eval_fraction: float = 0.1,
    language_rule: bool = True,
    disclaimer_rule: bool = True,
    assistant_name: str = templates.DEFAULT_ASSISTANT_NAME,
    knowledge_cutoff: str = templates.DEFAULT_KNOWLEDGE_CUTOFF,
    source_max_len: int = 512,
    target_max_len: int = 512,
    add_eos: bool = True,
    lora_r: int = 16,
    lora_alpha: float = 32.0,
    lora_dropout: float = 0.0,
    lora_target_modules: str = "wq,wk,wv,wo,w1,w2,w3",
    num_epochs: Optional[float] = None,
    max_steps: Optional[int] = None,
    batch_size: int = 16,
    micro_batch_size: int = 2,
    learning_rate: float = 5e-5,
    warmup_ratio: float = 0.1,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    eval_steps: int = 50,
    save_steps: int = 100,
    gradient_checkpointing: bool = False,
    model_parallel_size: Optional[int] = None,
    dtype: Optional[str] = None,
    seed: int = 0,
    resume: bool = False,
    overwrite: bool = False,
) -> None:
    """Train the engraved model on INPUT's preference pairs by DPO (or IPO) and write the policy's LoRA adapter to OUTPUT_DIR.

    Each pair becomes two finetune-format conversations sharing one source (the engraving system
    prompt chosen by the id, the user turn), with the chosen and the rejected answer; their answer
    log-probabilities under the policy and under the reference (the starting model, frozen: the same
    weights with the new adapter switched off) give the loss. Logged per step: loss, the implicit
    rewards of chosen and rejected answers (beta times the policy/reference log-ratio), reward accuracy
    and margin, lr, grad_norm, tokens_per_s; held-out accuracy and margin every EVAL_STEPS.

    Args:
      input: JSONL of pairs: {id, instruction, input, chosen, rejected}; or `dromedary preferences` records (output_1, output_2, scores): a rule (language, disclaimer) decides first, else the answer favoured by the sum over principles of the judge's margins is chosen, a zero sum (a tie) is dropped; or reward-model's pairs.jsonl (output_1, output_2, preference).
      output_dir: where the adapter (PEFT format, for the plain base model), dpo_pairs.jsonl (the chosen/rejected pairs used), train_log.jsonl, checkpoints/ and provenance go.
      ckpt_dir: base LLaMA checkpoint (Meta, HF or GGUF). Default: the embedded tiny model.
      tokenizer_path: tokenizer file. Default: CKPT_DIR's own.
      adapter: the engraving (finetune's adapter): merged into the base weights as they load, the start and the reference; OUTPUT_DIR's adapter then includes it. Default: the base itself.
      beta: strength of the pull towards the reference (DPO's beta; IPO's tau): larger stays closer.
      loss: sigmoid (DPO: -log sigmoid(beta h), h the difference of the chosen and rejected log-ratios) or ipo ((h' - 1/(2 beta))^2, h' on the per-token mean log-ratios, as TRL computes it).
      label_smoothing: sigmoid only: the assumed share of wrong labels (conservative DPO); 0 is plain DPO.
      eval_fraction: hold out this fraction of the pairs (chosen by a hash of the id) for the held-out accuracy.
      language_rule: for preference records: an answer in another script than the request loses.
      disclaimer_rule: for preference records: an answer falling back on a stock disclaimer loses.
      assistant_name: the assistant's name in the system prompts and the "### NAME:" marker (as at finetune).
      knowledge_cutoff: filled into the system prompts (as at finetune).
      source_max_len: most tokens of system prompt + user turn; longer sources lose their beginning (BOS kept).
      target_max_len: most tokens of each answer (EOS included); longer answers lose their end.
      add_eos: end each answer with the end-of-sequence token (as at finetune).
      lora_r: rank of the policy's new LoRA adapter.
      lora_alpha: its scaling numerator (the update is scaled by alpha / r).
      lora_dropout: dropout on the LoRA input while training (the reference pass has none).
      lora_target_modules: projections to adapt, comma-separated: wq,wk,wv,wo,w1,w2,w3 or the HF names.
      num_epochs: passes over the training pairs (fractions allowed). Default when neither this nor --max_steps is given: one epoch.
      max_steps: optimizer steps, instead of --num_epochs.
      batch_size: pairs per optimizer step, over all data-parallel groups.
      micro_batch_size: pairs per forward pass on each data-parallel group (two sequences each, run twice: policy and reference).
      learning_rate: AdamW peak learning rate.
      warmup_ratio: fraction of the steps warming the learning rate up linearly; a cosine decay to zero follows.
      weight_decay: AdamW weight decay on the LoRA factors.
      max_grad_norm: clip the adapter's gradient to this global norm (0: no clipping).
      eval_steps: held-out accuracy every this many steps (0: only at the end).
      save_steps: checkpoint (adapter, optimizer, scheduler, RNG, data position) every this many steps (0: only at the end).
      gradient_checkpointing: recompute activations in the backward pass: much less memory, about a third more compute.
      model_parallel_size: processes sharing one model copy (tensor parallelism). Default: the whole world.
      dtype: fp32 or bf16 for the frozen weights (bf16 also runs the forward under autocast). Default: bf16 on GPUs of compute capability 8.0 or later, fp32 on CPU.
      seed: seed for the LoRA initialisation, the data order, the held-out split and dropout.
      resume: continue from the latest checkpoint in OUTPUT_DIR (ends exactly where an uninterrupted run would); refused when the pairs, the models or a training flag changed since.
      overwrite: start afresh in a non-empty OUTPUT_DIR (its earlier outputs move to OUTPUT_DIR.bak-TIME, nothing is deleted).
    """
    options = dict(locals())
    targets = _check_flags(options)
    raw = records.read_records(input)  # not JSON, no id, a duplicate id: FILE:LINE, before any model work
    pairs, counts = dpo_recipe.preference_pairs(raw, input, language_rule=language_rule,
                                                disclaimer_rule=disclaimer_rule)
    train, held = _split(pairs, eval_fraction, seed)
    if not train:
        raise ValueError(f"{input}: no training pairs ({counts['ties']} ties dropped"
                         + (", the rest held out by --eval_fraction)" if pairs else ")"))
    epochs = num_epochs or 1.0
    total_samples = max_steps * batch_size if max_steps else max(1, math.ceil(round(epochs * len(train), 6)))
    total_steps = math.ceil(total_samples / batch_size)
    options.update(total_steps=total_steps, total_samples=total_samples, lora_target_modules=list(targets),
                   train_pairs=records.record_digest({"pairs": [records.record_digest(p) for p in train]}),
                   base_model=records.path_identity(resolve_ckpt_dir(ckpt_dir)),
                   tokenizer=records.path_identity(tokenizer_path), sft_adapter=records.path_identity(adapter))
    out = Path(output_dir)
    resume_from = _latest_checkpoint(out, options, _RESUME_KEYS, _NAMES) if resume else None
    if not resume:
        _prepare_output(out, overwrite, _OUTPUTS)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"dpo: {len(pairs)} pairs from {len(raw)} records ({len(train)} train, {len(held)} held out); "
              + ", ".join(f"{k} {v}" for k, v in counts.items() if k != "pairs"), file=sys.stderr)

    loaded = build(ckpt_dir, tokenizer_path=tokenizer_path, merge_adapter=adapter,
                   model_parallel_size=model_parallel_size, seed=seed, dtype=dtype,
                   max_seq_len=source_max_len + target_max_len, train=True)
    world, model, tok = loaded.world, loaded.model, loaded.tokenizer
    if world.is_main:  # only now: build() joined every rank, each has checked the directory above
        out.mkdir(parents=True, exist_ok=True)
        records.write_jsonl_atomic(out / "dpo_pairs.jsonl", pairs, overwrite=True)
    if not lora.padding_is_harmless(loaded.source_args, world.mp_size):
        raise ValueError(lora._padding_message(loaded.source_args, world.mp_size))
    text = dict(assistant_name=assistant_name, knowledge_cutoff=knowledge_cutoff)
    lens = dict(source_max_len=source_max_len, target_max_len=target_max_len, add_eos=add_eos)
    encode = lambda p: encode_pair(tok, p, input, text, lens)  # noqa: E731
    train_data, held_data = [encode(p) for p in train], [encode(p) for p in held]

    lora.add_lora(model, r=lora_r, alpha=lora_alpha, dropout=lora_dropout, targets=targets)
    lora.init_lora(model, seed, world)
    model.gradient_checkpointing = gradient_checkpointing
    named = lora.trainable(model)
    params = [p for _, p, _ in named]
    opt = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    warmup = math.ceil(warmup_ratio * total_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup, total_steps))
    autocast = (torch.autocast(world.device.type, dtype=torch.bfloat16)
                if next(model.parameters()).dtype == torch.bfloat16 else nullcontext())
    how = dict(beta=beta, loss_type=loss, label_smoothing=label_smoothing)

    start = restore(resume_from, opt, sched, named, world)
    if start >= total_steps:
        if world.is_main:
            print(f"{out}: already trained {total_steps} steps; nothing to do", file=sys.stderr)
        # In case a crash came between the last checkpoint and the published adapter.
        _publish(out, total_steps, world, stage="dpo", below=adapter, base=str(loaded.ckpt_dir), provenance=None)
        return
    log = open_log(out / "train_log.jsonl", start, world)
    order = sft.DataOrder(len(train_data), seed)
    if world.is_main:
        print(f"dpo: {total_steps} steps of {batch_size} pairs ({total_samples / len(train_data):.4g} epochs), "
              f"{loss} loss, beta {beta}; {lora.summary(named, world):,} trainable LoRA parameters; world "
              f"{world.world_size} (model parallel {world.mp_size}, data parallel {world.dp_size})", file=sys.stderr)
    bar = tqdm(total=total_steps, initial=start, desc="dpo", unit="step", dynamic_ncols=True,
               disable=not world.is_main, file=sys.stderr)
    kill_after = int(os.environ.get("DROMEDARY_KILL_AFTER_STEP", 0))  # tests: a real SIGKILL mid-run
    started, seen_tokens = time.time(), 0
    for step in range(start, total_steps):
        model.train()
        batch = [train_data[i] for i in order.batch(step, batch_size, end=total_samples)]
        stats = backward_batch(model, batch, micro_batch_size, world, seed=sft.hash_seed(seed, step),
                               autocast=autocast, **how)
        lora.all_reduce_grads(params, world)
        grad_norm = lora.clip_grad_norm(named, max_grad_norm, world)
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        total = sft.dp_sum(stats, world)
        seen_tokens += int(total[-1])
        rate = seen_tokens / max(1e-9, time.time() - started)
        entry = {"step": step + 1, **_entry(total, len(batch)), "lr": lr, "grad_norm": round(grad_norm, 6),
                 "tokens_per_s": round(rate, 1)}
        done = step + 1 == total_steps
        if held_data and (done or (eval_steps and (step + 1) % eval_steps == 0)):
            entry.update({f"eval_{k}": v for k, v in evaluate(model, held_data, micro_batch_size, world, autocast,
                                                               **how).items()})
        log(entry)
        bar.set_postfix_str(f"loss {entry['loss']:.4f} acc {entry['rewards/accuracy']:.2f} "
                            f"margin {entry['rewards/margin']:.3f} {rate:.0f} tok/s", refresh=False)
        bar.update(1)
        if done or (save_steps and (step + 1) % save_steps == 0):
            _save(out, step + 1, model, opt, sched, named, world, options, loaded.name, _RESUME_KEYS)
        if kill_after and step + 1 == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    bar.close()
    _publish(out, total_steps, world, stage="dpo", below=adapter, base=str(loaded.ckpt_dir), provenance=dict(
        command=sys.argv, options=options, model=loaded.name,
        extra={"world_size": world.world_size, "model_parallel_size": world.mp_size, "pairs": counts,
               "train_pairs": len(train_data), "eval_pairs": len(held_data), "steps": [start, total_steps],
               "seconds": round(time.time() - started, 2)}))


def encode_pair(tok, pair: dict, path: str, text: dict, lens: dict) -> Pair:
    """Finetune's conversation and encoding for both answers; the source is shared (the system
    prompt is chosen by the pair's id, so both answers get the same one)."""
    source, chosen = sft.conversation({**pair, "output": pair["chosen"]}, path, **text)
    _, rejected = sft.conversation({**pair, "output": pair["rejected"]}, path, **text)
    return sft.encode(tok, source, chosen, **lens), sft.encode(tok, source, rejected, **lens)


# Per-step statistics, summed over the micro-batches and the data-parallel groups:
# [loss, chosen reward, rejected reward, correct, margin, tokens].
_STATS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin")


def _entry(total: torch.Tensor, n: int) -> dict:
    return {k: round(v / max(1, n), 6) for k, v in zip(_STATS, total[:5].tolist())}


def logprobs(model, micro: list[Pair], device, autocast) -> tuple[torch.Tensor, ...]:
    """(policy, reference) summed answer log-probabilities, each (2m,) (the m chosen rows, then the
    m rejected), the answers' token counts (2m,) and the rows' token counts (2m,). The reference
    is the same model with its adapter switched off, without gradients."""
    rows = [c for c, _ in micro] + [r for _, r in micro]
    tokens, labels = sft.collate(rows, device)
    with torch.no_grad(), lora.adapters_off(model):
        ref = policy.sequence_logprobs(model, tokens, labels, autocast)
    pi = policy.sequence_logprobs(model, tokens, labels, autocast)
    n_answer = (labels[:, 1:] != sft.IGNORE).sum(-1)
    return pi, ref, n_answer, torch.tensor([len(ids) for ids, _ in rows])


def _losses(model, micro: list[Pair], device, autocast, **how):
    pi, ref, n, lengths = logprobs(model, micro, device, autocast)
    m = len(micro)
    losses, good, bad = dpo_recipe.pair_losses(pi[:m], pi[m:], ref[:m], ref[m:], n_c=n[:m], n_r=n[m:], **how)
    return losses, good, bad, lengths


def _sums(losses, good, bad, lengths) -> torch.Tensor:
    return torch.tensor([losses.sum().item(), good.sum().item(), bad.sum().item(), (good > bad).sum().item(),
                         (good - bad).sum().item(), lengths.sum().item()], dtype=torch.float64)


def backward_batch(model, batch: list[Pair], micro_batch_size: int, world, *, seed: int, autocast=nullcontext(),
                   **how) -> torch.Tensor:
    """Forward and backward of this rank's share of one global batch (the loss is the batch's mean
    over pairs); returns the share's summed statistics (_STATS, then tokens). The batch is sorted
    by length and cut into micro-batches; these, and each one's dropout seed, are the same for any
    data-parallel size, so any split sums to the same gradient."""
    batch = sorted(batch, key=lambda p: max(len(p[0][0]), len(p[1][0])))
    micros = [batch[j : j + micro_batch_size] for j in range(0, len(batch), micro_batch_size)]
    longest = lambda m: max(len(m[-1][0][0]), len(m[-1][1][0]))  # noqa: E731 - sorted: the last pair is the longest
    owners = sft.deal_micro_batches([2 * len(m) * longest(m) for m in micros], world.dp_size)  # padded tokens
    stats = torch.zeros(6, dtype=torch.float64)
    for j, micro in enumerate(micros):
        if owners[j] != world.dp_rank:
            continue
        torch.manual_seed(sft.hash_seed(seed, j))
        losses, good, bad, lengths = _losses(model, micro, world.device, autocast, **how)
        (losses.sum() / len(batch)).backward()
        stats += _sums(losses, good, bad, lengths)
    for p in model.parameters():  # a group left without a micro-batch adds zeros
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    return stats


@torch.no_grad()
def evaluate(model, data: list[Pair], micro_batch_size: int, world, autocast=nullcontext(), **how) -> dict:
    """Held-out loss, rewards, accuracy and margin (split between the data-parallel groups)."""
    model.eval()
    stats = torch.zeros(6, dtype=torch.float64)
    mine = records.split_for_data_parallel(data, world.dp_rank, world.dp_size)
    for j in range(0, len(mine), micro_batch_size):
        stats += _sums(*_losses(model, mine[j : j + micro_batch_size], world.device, autocast, **how))
    model.train()
    return {k.replace("rewards/", ""): v for k, v in _entry(sft.dp_sum(stats, world), len(data)).items()}




def _check_flags(o: dict) -> tuple[str, ...]:
    if o["loss"] not in dpo_recipe.LOSS_TYPES:
        raise ValueError(f"--loss must be one of {', '.join(dpo_recipe.LOSS_TYPES)}, got {o['loss']!r}")
    if not o["beta"] > 0:
        raise ValueError(f"--beta must be positive, got {o['beta']}")
    if not 0 <= o["label_smoothing"] < 0.5:
        raise ValueError(f"--label_smoothing must lie in [0, 0.5), got {o['label_smoothing']}")
    if o["label_smoothing"] and o["loss"] != "sigmoid":
        raise ValueError("--label_smoothing applies to --loss sigmoid only")
    if o["max_steps"] is not None and o["num_epochs"] is not None:
        raise ValueError("pass either --max_steps or --num_epochs, not both")
    for name in ("source_max_len", "target_max_len", "batch_size", "micro_batch_size"):
        if o[name] < 1:
            raise ValueError(f"--{name} must be at least 1, got {o[name]}")
    if o["max_steps"] is not None and o["max_steps"] < 1 or o["num_epochs"] is not None and o["num_epochs"] <= 0:
        raise ValueError("--max_steps and --num_epochs must be positive")
    if not 0 <= o["lora_dropout"] < 1 or not 0 <= o["warmup_ratio"] < 1 or not 0 <= o["eval_fraction"] < 1:
        raise ValueError("--lora_dropout, --warmup_ratio and --eval_fraction must lie in [0, 1)")
    if o["resume"] and o["overwrite"]:
        raise ValueError("--resume continues OUTPUT_DIR and --overwrite starts it afresh: pass one of them")
    check_training_world(o, "dpo", o["micro_batch_size"])
    return lora.parse_targets(o["lora_target_modules"])
