"""dromedary finetune: principle engraving, i.e. LoRA fine-tuning on curated sft records.

load (records, model) -> transform (examples, training loop) -> write (PEFT adapter, log, provenance).
Records -> token ids and the loss live in dromedary.recipe.sft; LoRA layers, adapters on disk and
gradients under model/data parallelism in dromedary.llama.lora.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm import tqdm

from .. import distributed, records
from ..engine.builder import build, resolve_ckpt_dir
from ..llama import lora
from ..recipe import sft, templates

_OUTPUTS = ("checkpoints", lora.CONFIG_FILE, lora.WEIGHTS_FILE, "train_log.jsonl", "finetune.provenance.json")
# What must not change between a checkpoint and the run resuming it: the flags that shape the
# training, and what it trains on (a digest of the training records, in order) and from (the base
# model and tokenizer, records.path_identity).
_RESUME_KEYS = ("source_max_len", "target_max_len", "add_eos", "assistant_name", "knowledge_cutoff", "lora_r",
                "lora_alpha", "lora_dropout", "lora_target_modules", "batch_size", "learning_rate", "warmup_ratio",
                "weight_decay", "max_grad_norm", "seed", "total_steps", "total_samples", "train_records",
                "base_model", "tokenizer")
_WHAT = {"total_steps": "--max_steps/--num_epochs", "total_samples": "--max_steps/--num_epochs",
         "train_records": "training records (--input, --eval_fraction)", "base_model": "--ckpt_dir (its content)",
         "tokenizer": "--tokenizer_path (its content)"}


def finetune(
    input: str,
    output_dir: str,
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    eval_input: Optional[str] = None,
    eval_fraction: float = 0.0,
    assistant_name: str = templates.DEFAULT_ASSISTANT_NAME,
    knowledge_cutoff: str = templates.DEFAULT_KNOWLEDGE_CUTOFF,
    source_max_len: int = 512,
    target_max_len: int = 512,
    add_eos: bool = True,
    lora_r: int = 16,
    lora_alpha: float = 32.0,
    lora_dropout: float = 0.05,
    lora_target_modules: str = "wq,wk,wv,wo,w1,w2,w3",
    num_epochs: Optional[float] = None,
    max_steps: Optional[int] = None,
    batch_size: int = 16,
    micro_batch_size: int = 1,
    learning_rate: float = 2e-4,
    warmup_ratio: float = 0.03,
    weight_decay: float = 0.0,
    max_grad_norm: float = 0.3,
    eval_steps: int = 50,
    save_steps: int = 100,
    gradient_checkpointing: bool = False,
    model_parallel_size: Optional[int] = None,
    dtype: Optional[str] = None,
    seed: int = 0,
    resume: bool = False,
    overwrite: bool = False,
) -> None:
    """Train a LoRA adapter on INPUT's sft records and write it to OUTPUT_DIR in PEFT format.

    Each record becomes one chat-format conversation (the format `chat` uses): an engraving system
    prompt chosen by the record's id, the user turn (instruction, then input), and the output as the
    assistant turn; the loss is on the assistant tokens only. Under torchrun the world splits into
    data-parallel groups of MODEL_PARALLEL_SIZE processes; any split trains the same model.

    Args:
      input: JSONL of sft records (id, instruction, input, output, thoughts, source), as curate writes them.
      output_dir: where the adapter (adapter_config.json, adapter_model.safetensors), train_log.jsonl, checkpoints/ and provenance go.
      ckpt_dir: base LLaMA checkpoint, Meta or HF layout. Default: the embedded tiny model.
      tokenizer_path: tokenizer.json or tokenizer.model (SentencePiece or tiktoken). Default: CKPT_DIR's own.
      eval_input: JSONL of sft records for the held-out loss.
      eval_fraction: instead of --eval_input, hold out this fraction of INPUT (chosen by a hash of the id).
      assistant_name: the assistant's name in the system prompts and the "### NAME:" marker.
      knowledge_cutoff: filled into the system prompts.
      source_max_len: most tokens of system prompt + user turn; longer sources lose their beginning (the BOS token is kept).
      target_max_len: most tokens of the answer (EOS included); longer answers lose their end, EOS first.
      add_eos: end each answer with the end-of-sequence token, so the model learns to stop.
      lora_r: LoRA rank.
      lora_alpha: LoRA scaling numerator (the update is scaled by alpha / r).
      lora_dropout: dropout on the LoRA input during training.
      lora_target_modules: projections to adapt, comma-separated: wq,wk,wv,wo,w1,w2,w3 or HF names q_proj,k_proj,v_proj,o_proj,gate_proj,down_proj,up_proj.
      num_epochs: passes over INPUT (fractions allowed), counted exactly: the last step's batch is shorter where the epochs end inside it. Default when neither this nor --max_steps is given: one epoch.
      max_steps: optimizer steps to train, instead of --num_epochs.
      batch_size: records per optimizer step, over all data-parallel groups.
      micro_batch_size: records per forward pass on each data-parallel group; gradients accumulate up to --batch_size.
      learning_rate: AdamW peak learning rate.
      warmup_ratio: fraction of the steps spent warming the learning rate up linearly; a cosine decay to zero follows.
      weight_decay: AdamW weight decay on the LoRA factors.
      max_grad_norm: clip the adapter's gradient to this global norm (0: no clipping).
      eval_steps: held-out loss every this many steps (0: only at the end).
      save_steps: checkpoint (adapter, optimizer, scheduler, RNG, data position) every this many steps (0: only at the end).
      gradient_checkpointing: recompute activations in the backward pass: much less memory, about a third more compute.
      model_parallel_size: processes sharing one model copy (tensor parallelism). Default: the whole world.
      dtype: fp32 or bf16 for the frozen base weights (bf16 also runs the forward under autocast). Default: bf16 on GPUs of compute capability 8.0 or later, fp32 on CPU; on older GPUs (fp16) pass --dtype fp32.
      seed: seed for the LoRA initialisation, the data order, the eval split and dropout.
      resume: continue from the latest checkpoint in OUTPUT_DIR (ends exactly where an uninterrupted run would); refused when the training records, the base model or a training flag changed since.
      overwrite: start afresh in a non-empty OUTPUT_DIR (its checkpoints, adapter, log and provenance are moved to OUTPUT_DIR.bak-TIME, nothing is deleted).
    """
    targets = _check_flags(locals())
    options = {**locals(), "lora_target_modules": list(targets)}
    del options["targets"]
    train_records = records.read_kind(input, "sft")  # bad input stops here, before any model work
    if eval_input:
        held_out = records.read_kind(eval_input, "sft")
    else:
        train_records, held_out = _split(train_records, eval_fraction, seed)
    if not train_records:
        raise ValueError(f"{input}: no training records" + (" left after --eval_fraction" if eval_fraction else ""))
    text = dict(assistant_name=assistant_name, knowledge_cutoff=knowledge_cutoff)
    train_pairs = [sft.conversation(r, input, **text) for r in train_records]
    eval_pairs = [sft.conversation(r, eval_input or input, **text) for r in held_out]
    if max_steps:
        total_samples = max_steps * batch_size
    else:  # exactly this many epochs: the last step's batch is short when they end inside it
        total_samples = max(1, math.ceil(round((num_epochs or 1.0) * len(train_pairs), 6)))
    total_steps = math.ceil(total_samples / batch_size)
    options.update(total_steps=total_steps, total_samples=total_samples,
                   train_records=records.record_digest({"records": [records.record_digest(r) for r in train_records]}),
                   base_model=records.path_identity(resolve_ckpt_dir(ckpt_dir)),
                   tokenizer=records.path_identity(tokenizer_path))
    out = Path(output_dir)
    resume_from = _latest_checkpoint(out, options) if resume else None
    if not resume:
        _prepare_output(out, overwrite)

    loaded = build(ckpt_dir, tokenizer_path=tokenizer_path, model_parallel_size=model_parallel_size, seed=seed,
                   dtype=dtype, max_seq_len=source_max_len + target_max_len, train=True)
    world, model, tok = loaded.world, loaded.model, loaded.tokenizer
    if not lora.padding_is_harmless(loaded.source_args, world.mp_size):
        raise ValueError(lora._padding_message(loaded.source_args, world.mp_size))
    lens = dict(source_max_len=source_max_len, target_max_len=target_max_len, add_eos=add_eos)
    train_data = [sft.encode(tok, *pair, **lens) for pair in train_pairs]
    eval_data = sorted((sft.encode(tok, *pair, **lens) for pair in eval_pairs), key=lambda e: len(e[0]))

    lora.add_lora(model, r=lora_r, alpha=lora_alpha, dropout=lora_dropout, targets=targets)
    lora.init_lora(model, seed, world)
    model.gradient_checkpointing = gradient_checkpointing
    named = lora.trainable(model)
    params = [p for _, p, _ in named]
    opt = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    warmup = math.ceil(warmup_ratio * total_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup, total_steps))

    start = restore(resume_from, opt, sched, named, world)
    if start >= total_steps:
        print(f"{out}: already trained {total_steps} steps; nothing to do", file=sys.stderr)
        _publish(out, total_steps, world, provenance=None)  # in case a crash came between the two
        return
    out.mkdir(parents=True, exist_ok=True)
    log = open_log(out / "train_log.jsonl", start, world)
    autocast = (torch.autocast(world.device.type, dtype=torch.bfloat16)
                if next(model.parameters()).dtype == torch.bfloat16 else nullcontext())
    order = sft.DataOrder(len(train_data), seed)
    if world.is_main:
        print(f"finetune: {len(train_data)} records, {len(eval_data)} held out, {total_steps} steps of {batch_size} "
              f"({total_samples / len(train_data):.4g} epochs); "
              f"{lora.summary(named, world):,} trainable LoRA parameters; world {world.world_size} "
              f"(model parallel {world.mp_size}, data parallel {world.dp_size})", file=sys.stderr)
    bar = tqdm(total=total_steps, initial=start, desc="finetune", unit="step", dynamic_ncols=True,
               disable=not world.is_main, file=sys.stderr)
    kill_after = int(os.environ.get("DROMEDARY_KILL_AFTER_STEP", 0))  # tests: a real SIGKILL mid-run
    started, seen_tokens = time.time(), 0
    for step in range(start, total_steps):
        batch = [train_data[i] for i in order.batch(step, batch_size, end=total_samples)]
        stats = sft.backward_batch(model, batch, micro_batch_size, world, seed=sft.hash_seed(seed, step), autocast=autocast)
        lora.all_reduce_grads(params, world)
        grad_norm = lora.clip_grad_norm(named, max_grad_norm, world)
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss, tokens = sft.dp_sum(stats, world).tolist()
        seen_tokens += tokens
        rate = seen_tokens / max(1e-9, time.time() - started)
        entry = {"step": step + 1, "epoch": round(min((step + 1) * batch_size, total_samples) / len(train_data), 4),
                 "loss": round(loss, 6), "lr": lr, "grad_norm": round(grad_norm, 6), "tokens_per_s": round(rate, 1)}
        done = step + 1 == total_steps
        if eval_data and (done or (eval_steps and (step + 1) % eval_steps == 0)):
            entry["eval_loss"] = round(sft.evaluate(model, eval_data, micro_batch_size, world, autocast), 6)
        log(entry)
        bar.set_postfix_str(f"loss {entry['loss']:.4f} lr {lr:.2e} {rate:.0f} tok/s", refresh=False)
        bar.update(1)
        if done or (save_steps and (step + 1) % save_steps == 0):
            _save(out, step + 1, model, opt, sched, named, world, options, loaded.name)
        if kill_after and step + 1 == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    bar.close()
    _publish(out, total_steps, world, provenance=dict(
        command=sys.argv, options=options, model=loaded.name,
        extra={"world_size": world.world_size, "model_parallel_size": world.mp_size, "train_records": len(train_data),
               "eval_records": len(eval_data), "steps": [start, total_steps], "seconds": round(time.time() - started, 2)}))


def _publish(out: Path, steps: int, world, provenance: Optional[dict], *, stage: str = "finetune",
             below: Optional[str] = None, base: Optional[str] = None) -> None:
    """The final adapter is the last checkpoint's, put into OUTPUT_DIR (each file replaced whole),
    with STAGE.provenance.json. The policy stages train on the base with the engraving `below`
    merged in: with one, OUTPUT_DIR gets the two stacked (lora.stack_adapters on `base`), an
    adapter for the plain base."""
    if world.is_main:
        last = out / "checkpoints" / f"step-{steps:07d}"
        tmp = out / ".adapter.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        if below:
            lora.stack_adapters(tmp, below, last, base)
        else:
            tmp.mkdir()
            for name in (lora.CONFIG_FILE, lora.WEIGHTS_FILE):
                shutil.copyfile(last / name, tmp / name)
        for name in (lora.CONFIG_FILE, lora.WEIGHTS_FILE):
            os.replace(tmp / name, out / name)
        shutil.rmtree(tmp, ignore_errors=True)
        if provenance:
            records.write_provenance(out / stage, **provenance)
            print(f"wrote adapter to {out}" + (f" (the engraving {below} and the policy's adapter, stacked)"
                                               if below else ""), file=sys.stderr)
    distributed.barrier()


# ---------------------------------------------------------------------------------------------
# Flags and output directory.


def _check_flags(o: dict) -> tuple[str, ...]:
    if o["max_steps"] is not None and o["num_epochs"] is not None:
        raise ValueError("pass either --max_steps or --num_epochs, not both")
    for name in ("source_max_len", "target_max_len", "batch_size", "micro_batch_size"):
        if o[name] < 1:
            raise ValueError(f"--{name} must be at least 1, got {o[name]}")
    if o["max_steps"] is not None and o["max_steps"] < 1 or o["num_epochs"] is not None and o["num_epochs"] <= 0:
        raise ValueError("--max_steps and --num_epochs must be positive")
    if not 0 <= o["lora_dropout"] < 1 or not 0 <= o["warmup_ratio"] < 1 or not 0 <= o["eval_fraction"] < 1:
        raise ValueError("--lora_dropout, --warmup_ratio and --eval_fraction must lie in [0, 1)")
    if o["eval_input"] and o["eval_fraction"]:
        raise ValueError("pass either --eval_input or --eval_fraction, not both")
    if o["resume"] and o["overwrite"]:
        raise ValueError("--resume continues OUTPUT_DIR and --overwrite starts it afresh: pass one of them")
    check_training_world(o, "finetune", o["micro_batch_size"])
    return lora.parse_targets(o["lora_target_modules"])


def check_training_world(o: dict, stage: str, micro_batch_size: Optional[int]) -> int:
    """What every training stage checks before model work (finetune, reward-model, dpo, rl): no
    fp16, and a --batch_size that --micro_batch_size (None: no micro-batches) times the
    data-parallel groups divides. Returns the number of data-parallel groups."""
    # The dtype the builder will pick, not just the flag: without --dtype a GPU older than Ampere
    # gets fp16 (distributed.pick_dtype).
    if distributed.pick_dtype(distributed.pick_device(), o["dtype"]) == torch.float16:
        given = f"--dtype {o['dtype']}" if o["dtype"] else "fp16 (the default on a GPU without native bf16)"
        raise ValueError(f"{given} needs loss scaling, which {stage} does not do: pass --dtype fp32 "
                         "(or --dtype bf16 on a GPU of compute capability 8.0 or later)")
    world = int(os.environ.get("WORLD_SIZE", 1))
    mp = o["model_parallel_size"] or world
    dp = world // mp if mp and world % mp == 0 else 1  # a bad --model_parallel_size is reported by the builder
    if o["batch_size"] % ((micro_batch_size or 1) * dp):
        per = f"--micro_batch_size {micro_batch_size} x " if micro_batch_size else "the "
        raise ValueError(f"--batch_size {o['batch_size']} must be a multiple of {per}{dp} data-parallel groups")
    return dp


def _prepare_output(out: Path, overwrite: bool, outputs: tuple[str, ...] = _OUTPUTS) -> None:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out}: output directory is not empty (pass --resume to continue its run, "
                                  f"or --overwrite to start afresh)")
        if _is_rank0():  # the other ranks wait for it in build()
            _back_up(out, outputs)


def _back_up(out: Path, outputs: tuple[str, ...] = _OUTPUTS) -> Optional[Path]:
    """--overwrite: move what an earlier run wrote into a new sibling OUTPUT_DIR.bak-TIME[-N]."""
    old = [out / name for name in outputs if (out / name).exists()]
    if not old:
        return None
    backup = records.backup_path(out.resolve())
    backup.mkdir()
    for path in old:
        os.replace(path, backup / path.name)
    print(f"{out}: --overwrite: moved the old {', '.join(p.name for p in old)} to {backup}", file=sys.stderr)
    return backup


def _is_rank0() -> bool:
    return int(os.environ.get("RANK", 0)) == 0


def _split(recs: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out ceil(fraction * N) records: those whose hash of (seed, id) is smallest."""
    if not fraction:
        return recs, []
    n = math.ceil(fraction * len(recs))
    ranked = sorted(recs, key=lambda r: hashlib.sha256(f"{seed}\0{r['id']}".encode()).digest())
    held = {r["id"] for r in ranked[:n]}
    return [r for r in recs if r["id"] not in held], [r for r in recs if r["id"] in held]


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to zero at `total` (finetune, reward-model)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def open_log(path: Path, start: int, world):
    """Append-only JSONL log; on resume, entries past the checkpoint (work that is redone) are dropped."""
    if world.is_main and path.exists():
        kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= start]
        path.write_text("".join(line + "\n" for line in kept))

    def log(entry: dict) -> None:
        if world.is_main:
            with path.open("a") as f:
                f.write(json.dumps(entry) + "\n")

    return log


# ---------------------------------------------------------------------------------------------
# Checkpoints: checkpoints/step-NNNNNNN/ = the PEFT adapter, one state.mpKK.pt per model-parallel
# rank (its LoRA shards, optimizer and scheduler state, RNG) and trainer_state.json, written last.


def _save(out: Path, step: int, model, opt, sched, named, world, options: dict, base: str,
          keys: tuple[str, ...] = _RESUME_KEYS, *, params_key: str = "lora",
          write_extra: Optional[Callable[[Path], None]] = None) -> None:
    """Checkpoint `step`: NAMED's parameters under `params_key` (as `restore` reads them), and on
    rank 0 the adapter, `write_extra(dir)` (reward-model's head) and trainer_state.json, the
    directory renamed into place last and the older checkpoints removed."""
    ckpts = out / "checkpoints"
    tmp, final = ckpts / f"step-{step:07d}.tmp", ckpts / f"step-{step:07d}"
    if world.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier()
    state = lora.full_state(model, world)
    if world.dp_rank == 0:  # data-parallel replicas hold identical states
        rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        torch.save({params_key: {n: p.detach().cpu() for n, p, _ in named}, "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "rng": rng, "step": step}, tmp / f"state.mp{world.mp_rank:02d}.pt")
    if world.is_main:
        lora.write_adapter(tmp, state, model, base)
        if write_extra is not None:
            write_extra(tmp)
    distributed.barrier()
    if world.is_main:
        resumable = {k: options[k] for k in keys}
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "model_parallel_size": world.mp_size,
                                                            "options": resumable}, indent=2) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in ckpts.glob("step-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()


def _latest_checkpoint(out: Path, options: dict, keys: tuple[str, ...] = _RESUME_KEYS,
                       what: Optional[dict] = None) -> Optional[Path]:
    """The newest complete checkpoint to resume from, checked against this run's flags `keys`
    (None: none); `what` names the flags behind a key where it is not --KEY (default finetune's)."""
    done = sorted(p for p in (out / "checkpoints").glob("step-*") if (p / "trainer_state.json").exists()
                  and not p.name.endswith(".tmp"))
    if not done:
        if _is_rank0():  # before the builder, which silences the other ranks
            print(f"{out}: no checkpoint to resume; starting from step 0", file=sys.stderr)
        return None
    meta = json.loads((done[-1] / "trainer_state.json").read_text())
    digest = lambda v: v["digest"] if isinstance(v, dict) and "digest" in v else v  # noqa: E731 - paths may move
    changed = [k for k in keys if digest(meta["options"].get(k)) != digest(options[k])]
    if changed:
        what = list(dict.fromkeys((_WHAT if what is None else what).get(k, "--" + k) for k in changed))
        raise ValueError(f"{done[-1]}: cannot resume: it was trained with other {', '.join(what)} "
                         f"(was {', '.join(repr(meta['options'].get(k)) for k in changed)}); rerun with those, "
                         f"or pass --overwrite instead of --resume to start afresh (the old adapter and "
                         f"checkpoints are kept in {out}.bak-TIME)")
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if meta["model_parallel_size"] != (options["model_parallel_size"] or world_size):
        raise ValueError(f"{done[-1]}: saved at --model_parallel_size {meta['model_parallel_size']}; resume with that")
    return done[-1]


def restore(path: Optional[Path], opt, sched, named, world, *, params_key: str = "lora") -> int:
    """Load this rank's trained parameters (`state[params_key]`: the LoRA shards, and for
    reward-model its head too), optimizer, scheduler and RNG; returns the checkpoint's step."""
    if path is None:
        return 0
    state = torch.load(path / f"state.mp{world.mp_rank:02d}.pt", map_location="cpu", weights_only=True)
    with torch.no_grad():
        for name, p, _ in named:
            p.copy_(state[params_key][name])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["cpu"])
    if state["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    if world.is_main:
        print(f"{path.parent.parent}: resuming from step {state['step']}", file=sys.stderr)
    return state["step"]
