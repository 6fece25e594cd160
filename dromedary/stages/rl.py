"""dromedary rl: PPO of the engraved policy against the instructable reward model (SALMON's RL step).

load (prompt records; the policy; the reward model) -> transform (per step: rollouts through the
engine, scores under sampled principles, PPO epochs) -> write (PEFT adapter on the plain base,
rollouts/step-N.jsonl, train_log.jsonl, checkpoints, provenance). The arithmetic is in
recipe.ppo, the principle draw in recipe.rl_principles, the answer log-probabilities in
recipe.policy.

Models (two copies of base weights in all):
- The policy is the base with the SFT adapter (--adapter) folded into its weights
  (`build(merge_adapter=)`) and a fresh LoRA on top; the reference is the same model with that
  LoRA switched off (`lora.adapters_off`), exactly the model the run started from.
- The reward model and the value model share one copy: the reward model's adapter is folded into
  its base (`build(merge_adapter=rm)`), a fresh LoRA goes on top, and the value head starts as a
  copy of the reward head. With the LoRA off and the reward head, it is the reward model
  (scoring the reward prompt); with the LoRA on and the value head, the value model (reading
  every response position of the policy's own token sequence, which uses the same tokenizer).
  At the start the value model is the reward model exactly, as "a value head initialised from the
  reward model" asks, without a third copy of the weights and with the same trainable capacity
  as a trainable copy of the reward adapter would have on top of it.

Every random choice depends on (seed, step, place in the batch, prompt id) or (seed, step, epoch), never on the
data-parallel split: each group generates and scores its share of the step's prompts, the
rollouts are gathered on every rank, and each mini-batch's loss is divided by its token count
over all groups, so any split computes the same update (up to float summation order).
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from .. import distributed, records
from ..engine import reward
from ..engine.builder import build, resolve_ckpt_dir
from ..engine.generation import Engine, SamplingParams, row_seed
from ..llama import lora
from ..recipe import policy as policy_lp
from ..recipe import ppo, rl_principles, sft, templates
from ..recipe import preferences as salmon
from .finetune import (_latest_checkpoint, _prepare_output, _publish, _save, check_training_world, lr_factor,
                       open_log, restore)

_RESUME_KEYS = ("assistant_name", "knowledge_cutoff", "source_max_len", "max_new_tokens", "temperature", "top_p",
                "max_principles", "geometric_p", "kl_coef", "gamma", "lam", "cliprange", "cliprange_value",
                "vf_coef", "length_bonus", "unfinished_penalty", "batch_size", "mini_batch_size", "ppo_epochs",
                "lora_r", "lora_alpha", "lora_target_modules", "learning_rate", "warmup_ratio", "weight_decay",
                "max_grad_norm", "seed", "max_steps", "prompts", "base_model", "tokenizer", "sft_adapter", "rm_model",
                "principles_file", "weights_file")
_WHAT = {"prompts": "--input (its records)", "base_model": "--ckpt_dir (its content)",
         "tokenizer": "--tokenizer_path (its content)", "sft_adapter": "--adapter (its content)",
         "rm_model": "--rm (its content)", "principles_file": "--principles (its content)",
         "weights_file": "--principle_weights (its content)"}
_OUTPUTS = ("checkpoints", "rollouts", lora.CONFIG_FILE, lora.WEIGHTS_FILE, "train_log.jsonl", "rl.provenance.json")


def rl(
    input: str,
    rm: str,
    output_dir: str,
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    adapter: Optional[str] = None,
    principles: Optional[str] = None,
    principle_weights: Optional[str] = None,
    assistant_name: str = templates.DEFAULT_ASSISTANT_NAME,
    knowledge_cutoff: str = templates.DEFAULT_KNOWLEDGE_CUTOFF,
    source_max_len: int = 512,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_principles: int = 3,
    geometric_p: float = 0.5,
    max_steps: int = 100,
    batch_size: int = 16,
    mini_batch_size: int = 8,
    micro_batch_size: int = 4,
    ppo_epochs: int = 2,
    kl_coef: float = 0.05,
    gamma: float = 1.0,
    lam: float = 0.95,
    cliprange: float = 0.2,
    cliprange_value: float = 0.2,
    vf_coef: float = 0.1,
    length_bonus: float = 0.0,
    unfinished_penalty: float = 1.0,
    lora_r: int = 8,
    lora_alpha: float = 16.0,
    lora_target_modules: str = "wq,wk,wv,wo,w1,w2,w3",
    learning_rate: float = 1e-5,
    warmup_ratio: float = 0.0,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    save_steps: int = 10,
    gradient_checkpointing: bool = False,
    model_parallel_size: Optional[int] = None,
    dtype: Optional[str] = None,
    seed: int = 0,
    resume: bool = False,
    overwrite: bool = False,
) -> None:
    """PPO of a LoRA adapter on the (engraved) policy against the reward model RM, on INPUT's prompts; the adapter goes to OUTPUT_DIR.

    Each step takes BATCH_SIZE prompts (a seeded shuffle per pass over INPUT), samples one answer
    to each from the current policy (the chat format finetune trains on), shows the reward model
    the answer under principles drawn for the prompt's type, and adds a per-token KL penalty to the
    reference model. PPO_EPOCHS passes of clipped policy and value updates over mini-batches of
    MINI_BATCH_SIZE rollouts follow (GAE advantages, whitened over the step's batch).

    Args:
      input: JSONL prompt records (id, instruction, input), as generate-prompts writes them.
      rm: the reward model directory (from `dromedary reward-model`); its base checkpoint and tokenizer are the ones it names.
      output_dir: where the adapter (PEFT format, for the plain base), rollouts/, train_log.jsonl, checkpoints/ and provenance go.
      ckpt_dir: the policy's base checkpoint. Default: the embedded tiny model.
      tokenizer_path: tokenizer file. Default: CKPT_DIR's own (it must tokenize as the reward model's does).
      adapter: the SFT adapter (finetune's): folded into the base; the published adapter then stacks it with the one trained here.
      principles: the reward-principles JSON to draw from. Default: the one RM was trained with, else prompts/salmon/reward_principles.json.
      principle_weights: prompt types, their keywords and principle boosts. Default: prompts/salmon/rl_principle_weights.json.
      assistant_name: the assistant's name in the system prompt and the "### NAME:" marker.
      knowledge_cutoff: filled into the system prompts.
      source_max_len: most tokens of system prompt + user turn (longer ones lose their beginning).
      max_new_tokens: most tokens of an answer; an answer that reaches it without ending is "unfinished".
      temperature: sampling temperature of the rollouts (0: greedy).
      top_p: nucleus sampling of the rollouts.
      max_principles: most principles shown to the reward model per answer.
      geometric_p: k principles with probability (1-p)^(k-1) p.
      max_steps: PPO steps (one rollout batch each).
      batch_size: rollouts per step, over all data-parallel groups.
      mini_batch_size: rollouts per optimizer update.
      micro_batch_size: sequences per forward pass on each data-parallel group.
      ppo_epochs: passes over each rollout batch.
      kl_coef: weight of the per-token KL penalty to the reference.
      gamma: discount.
      lam: GAE lambda.
      cliprange: policy ratio clip.
      cliprange_value: value clip around the rollout's values.
      vf_coef: weight of the value loss.
      length_bonus: added to the score: LENGTH_BONUS x answer tokens / MAX_NEW_TOKENS (0: off).
      unfinished_penalty: subtracted from the score of an answer that hit MAX_NEW_TOKENS without ending (0: off).
      lora_r: rank of the policy's and the value model's LoRA.
      lora_alpha: LoRA scaling numerator.
      lora_target_modules: projections to adapt.
      learning_rate: AdamW peak learning rate.
      warmup_ratio: linear warm-up share of the updates; cosine decay to zero follows.
      weight_decay: AdamW weight decay.
      max_grad_norm: clip the gradient's global norm (policy and value together; 0: off).
      save_steps: checkpoint every this many steps (and at the end).
      gradient_checkpointing: recompute activations in the backward pass (policy and value model): much less memory, about a third more compute.
      model_parallel_size: processes sharing one model copy. Default: the whole world.
      dtype: fp32 or bf16 for the frozen weights. Default: bf16 on recent GPUs, fp32 on CPU.
      seed: seed for the prompt order, the principle draws, the sampling and the LoRA initialisation.
      resume: continue from the latest checkpoint in OUTPUT_DIR.
      overwrite: start afresh in a non-empty OUTPUT_DIR (earlier outputs move to OUTPUT_DIR.bak-TIME).
    """
    options = dict(locals())
    targets = _check_flags(options)
    meta_path = Path(rm) / reward.META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"--rm {rm}: not a reward model directory ({reward.META_FILE} missing; "
                                "make one with `dromedary reward-model`)")
    rm_meta = json.loads(meta_path.read_text())
    principles = principles or rm_meta.get("principles")
    dims = salmon.load_reward_principles(principles)
    weights = rl_principles.load_weights(principle_weights)
    prompts = records.read_records(input, ("id", "instruction"), field_types={"instruction": str, "input": str})
    if not prompts:
        raise ValueError(f"{input}: no prompt records")
    for r in prompts:
        r.setdefault("input", "")
    options.update(lora_target_modules=list(targets),
                   prompts=records.record_digest({"p": [records.record_digest(r) for r in prompts]}),
                   base_model=records.path_identity(resolve_ckpt_dir(ckpt_dir)),
                   tokenizer=records.path_identity(tokenizer_path), sft_adapter=records.path_identity(adapter),
                   rm_model=records.path_identity(rm), principles_file=records.path_identity(principles),
                   weights_file=records.path_identity(principle_weights))
    out = Path(output_dir)
    resume_from = _latest_checkpoint(out, options, _RESUME_KEYS, _WHAT) if resume else None
    if not resume:
        _prepare_output(out, overwrite, _OUTPUTS)

    max_len = source_max_len + max_new_tokens + 1
    loaded = build(ckpt_dir, tokenizer_path=tokenizer_path, merge_adapter=adapter,
                   model_parallel_size=model_parallel_size, seed=seed, dtype=dtype, max_seq_len=max_len, train=True)
    world, model, tok = loaded.world, loaded.model, loaded.tokenizer
    if not lora.padding_is_harmless(loaded.source_args, world.mp_size):
        raise ValueError(lora._padding_message(loaded.source_args, world.mp_size))
    lora.add_lora(model, r=lora_r, alpha=lora_alpha, dropout=0.0, targets=targets)
    lora.init_lora(model, seed, world)
    rm_max_len = int(rm_meta["max_len"])
    critic = build(rm_meta.get("ckpt_dir"), tokenizer_path=rm_meta.get("tokenizer_path"), merge_adapter=rm,
                   model_parallel_size=model_parallel_size, seed=seed, dtype=dtype,
                   max_seq_len=max(max_len, rm_max_len), train=True)
    _check_same_tokenizer(tok, critic.tokenizer, rm)
    lora.add_lora(critic.model, r=lora_r, alpha=lora_alpha, dropout=0.0, targets=targets)
    lora.init_lora(critic.model, seed + 1, world)
    rm_head = reward.load_head(rm, critic.args.dim, world.device)
    rm_head.requires_grad_(False)
    model.gradient_checkpointing = critic.model.gradient_checkpointing = gradient_checkpointing
    value_head = reward.load_head(rm, critic.args.dim, world.device).train()
    value_head.requires_grad_(True)
    scorer = reward.RewardModel(critic, rm_head, rm_max_len)

    named = ([(f"policy.{n}", p, d) for n, p, d in lora.trainable(model)]
             + [(f"value.{n}", p, d) for n, p, d in lora.trainable(critic.model)]
             + [(f"value_head.{n}", p, None) for n, p in value_head.named_parameters()])
    params = [p for _, p, _ in named]
    opt = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    updates_per_step = ppo_epochs * math.ceil(batch_size / mini_batch_size)
    steps = max_steps
    total_updates = steps * updates_per_step
    warmup = math.ceil(warmup_ratio * total_updates)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup, total_updates))
    autocast = (torch.autocast(world.device.type, dtype=torch.bfloat16)
                if next(model.parameters()).dtype == torch.bfloat16 else nullcontext())

    # Checkpoints as finetune's: the policy's adapter (on the SFT-merged base) in PEFT format, and
    # per MP rank every trained tensor (policy LoRA, value LoRA and head), optimizer, scheduler, RNG.
    start = restore(resume_from, opt, sched, named, world)
    if start >= steps:
        if world.is_main:
            print(f"{out}: already trained {steps} steps; nothing to do", file=sys.stderr)
        _publish(out, steps, world, stage="rl", below=adapter, base=str(loaded.ckpt_dir), provenance=None)
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / "rollouts").mkdir(exist_ok=True)
    log = open_log(out / "train_log.jsonl", start, world)
    # The rotation table is built lazily and kept; built inside the engine's inference mode it
    # could not take part in the training forward, so it is built here first.
    model.rope(world.device)
    engine = Engine(model, tok, max_seq_len=max_len, prepack=False)
    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                              stop=[templates.NextTurn(assistant_name)])
    text = dict(assistant_name=assistant_name, knowledge_cutoff=knowledge_cutoff)
    sources = {r["id"]: _source_ids(tok, r, source_max_len, **text) for r in prompts}
    order = sft.DataOrder(len(prompts), seed)
    cfg = dict(kl_coef=kl_coef, gamma=gamma, lam=lam, cliprange=cliprange, cliprange_value=cliprange_value,
               vf_coef=vf_coef, mini_batch_size=mini_batch_size, micro_batch_size=micro_batch_size,
               ppo_epochs=ppo_epochs, max_grad_norm=max_grad_norm, seed=seed)
    if world.is_main:
        print(f"rl: {len(prompts)} prompts, {steps} steps of {batch_size} rollouts, {updates_per_step} updates each; "
              f"{lora.summary(named[: len(lora.trainable(model))], world):,} trainable policy LoRA parameters; world "
              f"{world.world_size} (model parallel {world.mp_size}, data parallel {world.dp_size})", file=sys.stderr)
    bar = tqdm(total=steps, initial=start, desc="rl", unit="step", dynamic_ncols=True, disable=not world.is_main,
               file=sys.stderr)
    kill_after = int(os.environ.get("DROMEDARY_KILL_AFTER_STEP", 0))  # tests: a real SIGKILL mid-run
    started = time.time()
    for step in range(start, steps):
        batch = [prompts[i] for i in order.batch(step, batch_size)]
        t0 = time.time()
        mine = _rollouts(records.split_for_data_parallel(list(enumerate(batch)), world.dp_rank, world.dp_size),
                         step, engine, sampling, sources, scorer, model, critic.model, value_head, dims, weights,
                         options, autocast, world)
        rolls = sorted(_gather(mine, world), key=lambda r: r["slot"])
        t1 = time.time()
        stats = _ppo_step(rolls, step, model, critic.model, value_head, opt, sched, named, params, cfg, autocast,
                          world, sources)
        t2 = time.time()
        n_tokens = sum(len(r["actions"]) for r in rolls)
        entry = {"step": step + 1, **_rollout_stats(rolls), **stats,
                 "rollout_tokens_per_s": round(n_tokens / max(t1 - t0, 1e-9), 1),
                 "opt_tokens_per_s": round(ppo_epochs * n_tokens / max(t2 - t1, 1e-9), 1)}
        log(entry)
        if world.is_main:
            records.write_jsonl_atomic(out / "rollouts" / f"step-{step + 1:07d}.jsonl",
                                       [_rollout_record(r) for r in rolls], overwrite=True)
        bar.set_postfix_str(f"reward {entry['reward']:.3f} kl {entry['kl']:.3f}", refresh=False)
        bar.update(1)
        done = step + 1 == steps
        if done or (save_steps and (step + 1) % save_steps == 0):
            _save(out, step + 1, model, opt, sched, named, world, options, loaded.name, _RESUME_KEYS)
        if kill_after and step + 1 == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    bar.close()
    _publish(out, steps, world, stage="rl", below=adapter, base=str(loaded.ckpt_dir), provenance=dict(
        command=sys.argv, options=options, model=loaded.name,
        extra={"world_size": world.world_size, "model_parallel_size": world.mp_size, "reward_model": critic.name,
               "steps": [start, steps], "seconds": round(time.time() - started, 2)}))


# ---------------------------------------------------------------------------------------------
# Rollouts


def _source_ids(tok, record: dict, source_max_len: int, *, assistant_name: str, knowledge_cutoff: str) -> list[int]:
    """The chat-format prompt finetune trains on, cut as sft.encode cuts sources."""
    text = sft.prompt(record, assistant_name=assistant_name, knowledge_cutoff=knowledge_cutoff)
    return tok.encode_tail(text, source_max_len)


def _rollouts(share, step, engine, sampling, sources, scorer, model, critic, value_head, dims, weights, o,
              autocast, world) -> list[dict]:
    """This group's rollouts of the step: answers, scores, and the training forward's exact
    log-probabilities (policy and reference) and values of every answer token."""
    if not share:
        return []
    recs = [r for _, r in share]
    # Keyed by the place in the step's batch too: a batch larger than the prompt file holds a
    # prompt twice, and the two samples must differ.
    seeds = [row_seed(o["seed"], f"{step}:{slot}:{r['id']}") for slot, r in share]
    model.eval()
    gens = engine.generate([sources[r["id"]] for r in recs], sampling, seeds=seeds)
    model.train()
    tok = engine.tok
    out = []
    for (slot, r), g in zip(share, gens):
        rng = random.Random(f"{o['seed']}:{step}:{slot}:{r['id']}")
        kind = rl_principles.classify(r["instruction"], r["input"], weights)
        shown = rl_principles.draw_principles(rng, kind, dims, weights, geometric_p=o["geometric_p"],
                                              max_principles=o["max_principles"])
        # The actions: every sampled token, the end-of-sequence token included when it was
        # sampled; an answer cut at the next-turn marker keeps the marker's tokens (sampling them
        # is how it ended), its text does not.
        actions = list(g.tokens) + ([tok.eos_id] if g.finish_reason == "eos" else [])
        out.append({"slot": slot, "id": r["id"], "instruction": r["instruction"], "input": r["input"],
                    "kind": kind, "principles": [p.name for p in shown],
                    "definitions": [p.definition for p in shown], "response": g.text.strip(), "actions": actions,
                    "finished": g.finish_reason != "length"})
    texts = [salmon.reward_prompt(r["instruction"], r["input"], r["response"], r["definitions"]) for r in out]
    with lora.adapters_off(critic):  # the reward model: its adapter merged, the value LoRA off
        scores = scorer.score(texts)
    with torch.no_grad():
        for j in range(0, len(out), o["micro_batch_size"]):
            micro = out[j : j + o["micro_batch_size"]]
            tokens, labels = sft.collate([_example(sources, r) for r in micro], world.device)
            logp, mask, ent = policy_lp.token_logprobs(model, tokens, labels, autocast, entropy=True)
            with lora.adapters_off(model):
                ref, _, _ = policy_lp.token_logprobs(model, tokens, labels, autocast)
            values = _values(critic, value_head, tokens, mask, autocast)
            counts = mask.sum(-1).tolist()
            for r, lp, rf, v, e in zip(micro, logp[mask].split(counts), ref[mask].split(counts),
                                       values.split(counts), ent[mask].split(counts)):
                r.update(logp_old=lp.tolist(), logp_ref=rf.tolist(), values=v.tolist(), entropy=float(e.mean()))
    for r, s in zip(out, scores):
        r["score"] = float(s)
        r["length_bonus"] = o["length_bonus"] * len(r["actions"]) / o["max_new_tokens"]
        r["unfinished_penalty"] = 0.0 if r["finished"] else o["unfinished_penalty"]
    return out


def _example(sources, r) -> sft.Example:
    src = sources[r["id"]]
    return src + r["actions"], len(src)


def _values(critic, head, tokens: torch.Tensor, mask: torch.Tensor, autocast) -> torch.Tensor:
    """(N,) values of the N masked positions of tokens[:, :-1] (each the state before the answer
    token it predicts): the value head on the final-normed hidden state there."""
    with autocast:
        return head(critic(tokens[:, :-1], output_mask=mask, return_hidden=True))


def _gather(mine: list[dict], world) -> list[dict]:
    if world.dp_size == 1:
        return mine
    parts: list = [None] * world.dp_size
    dist.all_gather_object(parts, mine, group=distributed.dp_group())
    return [r for part in parts for r in part]


def _rollout_stats(rolls: list[dict]) -> dict:
    n = len(rolls)
    mean = lambda key: round(sum(r[key] for r in rolls) / n, 6)  # noqa: E731
    return {"reward": mean("score"), "kl": round(sum(sum(a - b for a, b in zip(r["logp_old"], r["logp_ref"]))
                                                     for r in rolls) / n, 6),
            "entropy": round(sum(r["entropy"] * len(r["actions"]) for r in rolls)
                             / sum(len(r["actions"]) for r in rolls), 6),
            "response_length": round(sum(len(r["actions"]) for r in rolls) / n, 3),
            "finished": round(sum(r["finished"] for r in rolls) / n, 4),
            "length_bonus": mean("length_bonus"), "unfinished_penalty": mean("unfinished_penalty")}


def _rollout_record(r: dict) -> dict:
    return {"id": f"{r['id']}#{r['slot']}", "prompt_id": r["id"], "instruction": r["instruction"],
            "input": r["input"], "prompt_type": r["kind"],
            "response": r["response"], "principles": r["principles"],
            "reward": round(r["score"] + r["length_bonus"] - r["unfinished_penalty"], 6), "score": round(r["score"], 6),
            "kl": round(sum(a - b for a, b in zip(r["logp_old"], r["logp_ref"])), 6), "length": len(r["actions"]),
            "finished": r["finished"]}


# ---------------------------------------------------------------------------------------------
# PPO


def _ppo_step(rolls, step, model, critic, value_head, opt, sched, named, params, c, autocast, world, sources) -> dict:
    """Advantages over the whole (gathered) batch, then PPO_EPOCHS passes of mini-batch updates;
    returns the step's loss statistics (means over every update's tokens)."""
    logp_old, mask = ppo.pad_rows([r["logp_old"] for r in rolls])
    logp_ref, _ = ppo.pad_rows([r["logp_ref"] for r in rolls])
    values, _ = ppo.pad_rows([r["values"] for r in rolls])
    score = torch.tensor([r["score"] + r["length_bonus"] - r["unfinished_penalty"] for r in rolls])
    rewards, _ = ppo.token_rewards(logp_old, logp_ref, mask, score, c["kl_coef"])
    adv, returns = ppo.gae(rewards, values, mask, c["gamma"], c["lam"])
    adv = ppo.whiten(adv, mask)
    row = lambda t, i: t[i][mask[i]]  # noqa: E731 - row i's answer tokens, (n_i,)
    sums = torch.zeros(6)  # policy loss, value loss, clipped policy tokens, clipped value tokens, tokens, updates
    norms = []
    model.train()
    for epoch in range(c["ppo_epochs"]):
        g = torch.Generator().manual_seed(sft.hash_seed(c["seed"], "ppo", step, epoch))
        perm = torch.randperm(len(rolls), generator=g).tolist()
        for m0 in range(0, len(perm), c["mini_batch_size"]):
            mb = perm[m0 : m0 + c["mini_batch_size"]]
            denom = float(mask[mb].sum())
            mine = records.split_for_data_parallel(mb, world.dp_rank, world.dp_size)
            local = torch.zeros(4)
            for j in range(0, len(mine), c["micro_batch_size"]):
                micro = mine[j : j + c["micro_batch_size"]]
                tokens, labels = sft.collate([_example(sources, rolls[i]) for i in micro], world.device)
                logp, m, _ = policy_lp.token_logprobs(model, tokens, labels, autocast)
                v = _values(critic, value_head, tokens, m, autocast)
                cat = lambda t: torch.cat([row(t, i) for i in micro]).to(world.device)  # noqa: E731
                ones = torch.ones_like(v, dtype=torch.bool)
                pg, pg_clip = ppo.policy_loss(logp[m], cat(logp_old), cat(adv), ones, c["cliprange"])
                vf, vf_clip = ppo.value_loss(v, cat(values), cat(returns), ones, c["cliprange_value"])
                ((pg + c["vf_coef"] * vf) / denom).backward()
                local += torch.tensor([pg.item(), vf.item(), pg_clip.item(), vf_clip.item()])
            for p in params:  # a group without a share of this mini-batch adds zeros
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            lora.all_reduce_grads(params, world)
            norms.append(lora.clip_grad_norm(named, c["max_grad_norm"], world))
            lr = sched.get_last_lr()[0]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            sums += torch.cat([sft.dp_sum(local, world), torch.tensor([denom, 1.0])])
    pg, vf, pg_clip, vf_clip, n, _ = sums.tolist()
    return {"policy_loss": round(pg / n, 6), "value_loss": round(vf / n, 6), "clip_fraction": round(pg_clip / n, 4),
            "value_clip_fraction": round(vf_clip / n, 4), "lr": lr, "grad_norm": round(sum(norms) / len(norms), 6)}


# ---------------------------------------------------------------------------------------------
# Flags, output directory, checkpoints, the published adapter.


def _check_flags(o: dict) -> tuple[str, ...]:
    for name in ("max_steps", "batch_size", "mini_batch_size", "micro_batch_size", "ppo_epochs", "max_new_tokens",
                 "source_max_len", "max_principles", "lora_r"):
        if o[name] < 1:
            raise ValueError(f"--{name} must be at least 1, got {o[name]}")
    if o["mini_batch_size"] > o["batch_size"]:
        raise ValueError(f"--mini_batch_size {o['mini_batch_size']} exceeds --batch_size {o['batch_size']}")
    if not 0 < o["geometric_p"] <= 1:
        raise ValueError(f"--geometric_p must be in (0, 1], got {o['geometric_p']}")
    for name in ("gamma", "lam"):
        if not 0 <= o[name] <= 1:
            raise ValueError(f"--{name} must be in [0, 1], got {o[name]}")
    for name in ("cliprange", "cliprange_value"):
        if o[name] <= 0:
            raise ValueError(f"--{name} must be positive, got {o[name]}")
    for name in ("kl_coef", "vf_coef", "length_bonus", "unfinished_penalty", "temperature"):
        if o[name] < 0:
            raise ValueError(f"--{name} must be >= 0, got {o[name]}")
    if not 0 < o["top_p"] <= 1:
        raise ValueError(f"--top_p must be in (0, 1], got {o['top_p']}")
    if not 0 <= o["warmup_ratio"] < 1:
        raise ValueError(f"--warmup_ratio must lie in [0, 1), got {o['warmup_ratio']}")
    if o["resume"] and o["overwrite"]:
        raise ValueError("--resume continues OUTPUT_DIR and --overwrite starts it afresh: pass one of them")
    check_training_world(o, "rl", None)
    return lora.parse_targets(o["lora_target_modules"])


def _check_same_tokenizer(tok, rm_tok, rm: str) -> None:
    probe = "Hello there, friend: 12 camels?\n### User:"
    if tok.n_words != rm_tok.n_words or tok.encode(probe) != rm_tok.encode(probe):
        raise ValueError(f"--rm {rm}: its tokenizer differs from the policy's; the value model reads the policy's "
                         "tokens, so train the reward model on the policy's base (or pass the matching "
                         "--ckpt_dir/--tokenizer_path)")
