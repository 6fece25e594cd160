"""dromedary preferences: two answers per prompt from the policy, judged on every reward principle.

For each prompt record the policy (the engraved model: base + finetune's adapter) answers twice in
the chat format, each answer from its own seed; both requests go through the continuous-batching
scheduler and start with the same system prompt, whose keys and values are computed once
(the engine's shared-prefix cache). Then, per reward principle (prompts/salmon/reward_principles.json),
the judge (default: the same model) reads the judging prompt with the two answers in both orders;
each score is the log-probability of the label naming output_1 minus that of the label naming
output_2, so scores = {dimension: [s12, s21]}, both positive when output_1 is better, and the judge's
preference for whichever reply comes first cancels in their mean. Judging prompts are scored through
eval.scoring.Scorer: their common header is cached once, and the long part a pair's prompts share
(request and replies) runs once per batch.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections import Counter
from typing import Optional

from .. import distributed, records
from ..engine import builder
from ..engine.backends import open_engine, open_scheduler
from ..engine.generation import Engine, SamplingParams, refuse_overlong, row_seed
from ..engine.scheduler import Request, kv_budget_bytes
from ..eval.scoring import Scorer
from ..jobs import RecordJob, check_resume
from ..recipe import preferences as salmon
from ..recipe import templates, textfilters


def preferences(
    input: str,
    output: str,
    rejected: Optional[str] = None,
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    adapter: Optional[str] = None,
    judge_adapter: Optional[str] = None,
    principles: Optional[str] = None,
    model_parallel_size: Optional[int] = None,
    assistant_name: str = templates.DEFAULT_ASSISTANT_NAME,
    knowledge_cutoff: str = templates.DEFAULT_KNOWLEDGE_CUTOFF,
    system: str = "standard",
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_p: float = 1.0,
    min_words: int = 3,
    max_batch_size: int = 8,
    chunk_size: int = 32,
    kv_cache_gb: Optional[float] = None,
    max_seq_len: Optional[int] = None,
    dtype: Optional[str] = None,
    seed: int = 0,
    overwrite: bool = False,
) -> None:
    """Answer every prompt record of INPUT twice with the policy and score the pair on each reward principle; append preference records to OUTPUT.

    Each record is the prompt record plus output_1, output_2, scores {dimension: [s12, s21]} (the
    judge's log-probability margin for output_1, read with output_1 first and then second),
    `model`, `judge` and `prompt_version`. A pair where either answer has fewer than MIN_WORDS
    words or the two are the same is dropped: the prompt record + output_1, output_2 and
    reject_reason go to REJECTED. Resumable (ids in OUTPUT or REJECTED are skipped), and data/model parallel under torchrun like
    self-align; each answer samples from a seed derived from SEED, the id and its number.

    Args:
      input: JSONL prompt records {"id", "instruction", "input", "source"}.
      output: JSONL file to append preference records to.
      rejected: JSONL file for the dropped pairs. Default: OUTPUT with .jsonl replaced by .rejected.jsonl.
      ckpt_dir: the base model (Meta, HF or GGUF). Default: the embedded tiny model.
      tokenizer_path: tokenizer file. Default: CKPT_DIR's own.
      adapter: the policy's LoRA adapter (finetune's output, the engraved model).
      judge_adapter: a LoRA adapter on the same base for the judge. Default: the judge is the policy itself.
      principles: a reward-principles JSON file. Default: prompts/salmon/reward_principles.json.
      model_parallel_size: processes sharing one model copy. Default: the whole world.
      assistant_name: the assistant's name in the chat format (as finetune used).
      knowledge_cutoff: the date the system prompt says the assistant's knowledge ends.
      system: the policy's system prompt: standard, concise, verbose, multilingual or a text file.
      max_new_tokens: most tokens per answer.
      temperature: sampling temperature of the two answers (0: greedy, which makes them identical).
      top_p: nucleus sampling of the two answers.
      min_words: an answer shorter than this drops its pair.
      max_batch_size: sequences in flight while sampling; judging rows per forward pass.
      chunk_size: prompt records sampled, then judged, then written together.
      kv_cache_gb: most GB the KV cache of the sequences in flight may take. Default: no cap.
      max_seq_len: context window. Default: the checkpoint's.
      dtype: fp32, bf16 or fp16. Default: bf16 on GPUs that support it, fp32 on CPU.
      seed: sampling seed.
      overwrite: start OUTPUT afresh (the old one is moved to OUTPUT.bak-TIME).
    """
    options = dict(locals())
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                            stop=(templates.NextTurn(assistant_name),))
    params.check()
    for flag, value in (("max_batch_size", max_batch_size), ("chunk_size", chunk_size), ("min_words", min_words)):
        if value < 1:
            raise ValueError(f"--{flag} must be at least 1, got {value}")
    budget = kv_budget_bytes(kv_cache_gb)
    dims = salmon.load_reward_principles(principles)  # a bad principles file stops here
    system_text = templates.load_system_prompt(system, assistant_name, knowledge_cutoff)
    inputs = records.read_kind(input, "prompts")  # bad input stops here, before any model work
    empty = [r["id"] for r in inputs if not r["instruction"].strip()]
    if empty:
        raise ValueError(f"{input}: record {empty[0]!r} has an empty instruction ({len(empty)} record(s) in all)")
    version = records.record_digest({"system": system_text, "judge": salmon.judge_prompt("{i}", "", "{a}", "{b}", dims[0]),
                                     "principles": [vars(p) for p in dims]})
    fingerprint = {"prompt_version": version}
    rejected = rejected or (output[: -len(".jsonl")] if output.endswith(".jsonl") else output) + ".rejected.jsonl"
    if os.path.abspath(rejected) == os.path.abspath(output):
        raise ValueError("--rejected must be a different file from --output")
    if not overwrite:  # a resume of pairs made differently stops here, before the model loads
        check_resume(output, inputs, options, fingerprint, also_done=[rejected])
    if _all_done(output, rejected, inputs, overwrite):
        return

    def policy_prompt(r: dict) -> str:
        turn = {"role": "user", "content": templates.user_message(r["instruction"], r["input"])}
        return templates.format_conversation(system_text, [turn], assistant_name)

    view = builder.peek(ckpt_dir, tokenizer_path, max_seq_len)
    tok = view.tokenizer
    fix = "shorten or drop such records, or lower --max_new_tokens"
    refuse_overlong([(r["id"], len(tok.encode(policy_prompt(r)))) for r in inputs], view.window, max_new_tokens,
                    source=input, what="record", fix=fix, note=view.note)
    # The judging prompt holds both answers: reserve room for two full ones (and the label).
    widest = max(dims, key=lambda p: len(p.definition))
    refuse_overlong([(r["id"], len(tok.encode(salmon.judge_prompt(r["instruction"], r["input"], "", "", widest))) + 4)
                     for r in inputs], view.window, 2 * max_new_tokens, source=input, what="judging prompt of record",
                    fix=fix, note=view.note)

    loaded, engine = open_engine("our", ckpt_dir, tokenizer_path=tokenizer_path, adapter=adapter,
                                 model_parallel_size=model_parallel_size, seed=seed, dtype=dtype, max_seq_len=max_seq_len)
    judge_engine, judge_name = engine, loaded.name
    if judge_adapter:
        judged = builder.build(ckpt_dir, tokenizer_path=tokenizer_path, adapter=judge_adapter,
                               model_parallel_size=model_parallel_size, seed=seed, dtype=dtype, max_seq_len=max_seq_len)
        judge_engine, judge_name = Engine(judged.model, judged.tokenizer), judged.name
    scorer = Scorer(judge_engine, max_batch_size=max_batch_size)
    scheduler = open_scheduler(engine, max_in_flight=max_batch_size, kv_budget_bytes=budget)
    sample = policy_prompt({"instruction": "", "input": ""})
    shared = sample[: sample.index(templates.user_marker()) + len(templates.user_marker()) + 1]
    world = loaded.world
    # The rejected file is resumed and sharded like the output: cleared once, scanned by every
    # rank before any rank writes, merged by rank 0 at the end.
    if overwrite and world.is_main:
        records.clear_output(rejected)
    distributed.barrier()
    done_rejected = records.scan_done_ids(rejected)
    todo = [r for r in inputs if r["id"] not in done_rejected]
    reject_writer = records.open_output(rejected, shard=(world.dp_rank, world.dp_size)) if world.is_group_writer else None
    dropped: Counter = Counter()
    with RecordJob(output, todo, world, overwrite=overwrite, options=options, model=loaded.name,
                   desc="preferences", unit="pair", fingerprint=fingerprint, resume_inputs=inputs,
                   also_done=[rejected]) as job, (reject_writer or contextlib.nullcontext()):
        for chunk in job.batches(chunk_size):
            engine.cache_prefix(shared)  # the system prompt, computed once for both answers of every record
            requests = [Request(policy_prompt(r), params, seed=row_seed(seed, f"{r['id']}:{k}"), key=(r["id"], k))
                        for r in chunk for k in (1, 2)]
            answers, tokens = {}, 0
            for req in scheduler.run(requests):
                answers[req.key] = templates.parse_reply(req.result.text, assistant_name)
                tokens += len(req.result.tokens)
            pairs = []
            for r in chunk:
                a, b = answers[(r["id"], 1)], answers[(r["id"], 2)]
                reason = drop_reason(a, b, min_words)
                if reason:
                    dropped[reason] += 1
                    if reject_writer is not None:
                        reject_writer.write({**r, "output_1": a, "output_2": b, "reject_reason": reason})
                else:
                    pairs.append({**r, "output_1": a, "output_2": b})
            for pair, scores in zip(pairs, judge_scores(scorer, pairs, dims)):
                job.write({**pair, "scores": scores, "model": loaded.name, "judge": judge_name,
                           "prompt_version": version})
            job.advance(len(chunk), tokens=tokens)
    distributed.barrier()
    if world.is_main:
        records.merge_shards(rejected, order=[r["id"] for r in inputs])
    if dropped and world.is_main and world.dp_size == 1:  # under data parallelism each group knows only its share
        print("preferences: dropped " + ", ".join(f"{n} ({why})" for why, n in dropped.most_common())
              + f" -> {rejected}", file=sys.stderr)


def _all_done(output: str, rejected: str, inputs: list[dict], overwrite: bool) -> bool:
    """True (and says so) when OUTPUT and REJECTED hold every input id: checked before the model loads."""
    if overwrite or records.shard_files(output) or records.shard_files(rejected):
        return False
    done = records.scan_done_ids(output) | records.scan_done_ids(rejected)
    if records.pending(inputs, done):
        return False
    if int(os.environ.get("RANK", 0)) == 0:  # before the process groups exist: torchrun's rank
        print(records.resume_message(output, len(inputs), 0), file=sys.stderr)
    return True


def drop_reason(a: str, b: str, min_words: int) -> Optional[str]:
    if min(len(textfilters.words(a)), len(textfilters.words(b))) < min_words:
        return "too short"
    if " ".join(a.split()) == " ".join(b.split()):
        return "identical"
    return None


def judge_scores(scorer: Scorer, pairs: list[dict], dims: list[salmon.RewardPrinciple]) -> list[dict[str, list[float]]]:
    """Per pair {dimension: [s12, s21]}: s12 = log p("1") - log p("2") after the judging prompt
    with output_1 shown first; s21 = log p("2") - log p("1") with output_2 shown first (output_1
    is then reply 2). Both are positive when the judge prefers output_1."""
    one, two = salmon.JUDGE_LABELS
    items = []
    for p in pairs:
        for d in dims:
            for first, second in ((p["output_1"], p["output_2"]), (p["output_2"], p["output_1"])):
                context = salmon.judge_prompt(p["instruction"], p["input"], first, second, d)
                items += [(context, one), (context, two)]
    if not items:
        return []
    scorer.share(salmon.judge_header(), items)
    lls = [ll for ll, _ in scorer.loglikelihoods(items)]
    out, i = [], 0
    for _ in pairs:
        scores = {}
        for d in dims:
            a1, a2, b1, b2 = lls[i : i + 4]  # (first order: "1", "2"), (second order: "1", "2")
            scores[d.name] = [a1 - a2, b2 - b1]
            i += 4
        out.append(scores)
    return out
