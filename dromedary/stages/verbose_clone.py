"""dromedary verbose-clone: detailed answers from the engraved model, for a second finetune.

The principle-engraved model tends to answer briefly. Asked under the verbose system prompt
(templates.verbose_clone_prompt), it writes longer answers; those that pass the filters become sft
records, and finetuning on them without the prompt clones the verbose behaviour into the model.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Optional

from .. import distributed, records
from ..engine.builder import build, peek
from ..engine.generation import Engine, Generation, SamplingParams, refuse_overlong, row_seed
from ..engine.scheduler import Request, Scheduler, kv_budget_bytes
from ..jobs import RecordJob, check_resume
from ..recipe import templates, textfilters

SOURCE = "verbose-clone"


def verbose_clone(
    input: str,
    output: str,
    rejected: Optional[str] = None,
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    adapter: Optional[str] = None,
    model_parallel_size: Optional[int] = None,
    assistant_name: str = templates.DEFAULT_ASSISTANT_NAME,
    knowledge_cutoff: str = templates.DEFAULT_KNOWLEDGE_CUTOFF,
    max_new_tokens: int = 512,
    temperature: float = 0.7,
    top_p: float = 0.95,
    min_words: int = 20,
    min_repeat_words: int = 4,
    leak_words: int = 8,
    max_batch_size: int = 8,
    kv_cache_gb: Optional[float] = None,
    max_seq_len: Optional[int] = None,
    dtype: Optional[str] = None,
    seed: int = 0,
    overwrite: bool = False,
) -> None:
    """Answer every sft record of INPUT in detail with the engraved model; append the answers that pass as sft records to OUTPUT.

    An answer is cut at any next turn and at its first repeated sentence, and kept only if it
    finished (did not run into --max_new_tokens, unless a repetition was cut off), has at least
    MIN_WORDS words, does not copy LEAK_WORDS consecutive words of the verbose system prompt or
    any of the self-align exemplars' tell-tale phrases, and does more than echo the request. Kept
    records keep the input record's id, instruction and input, with the new answer as `output` and
    source "verbose-clone". Resumable: ids already in OUTPUT or REJECTED are skipped. Runs under
    torchrun like self-align.

    Args:
      input: JSONL sft records (from `dromedary curate`).
      output: JSONL file to append the verbose sft records to.
      rejected: JSONL file to append rejected answers to (the input record + "generation" + "reject_reason"). Default: rejected answers are only counted.
      ckpt_dir: the base model the engraving adapter was trained on (Meta or HF layout). Default: the embedded tiny model.
      tokenizer_path: tokenizer.json or tokenizer.model (SentencePiece or tiktoken). Default: CKPT_DIR's own.
      adapter: the principle-engraving LoRA adapter (from `dromedary finetune`). Default: none (the bare model).
      model_parallel_size: processes sharing one model copy (tensor parallelism). Default: the whole world.
      assistant_name: the assistant's name, as used in finetune.
      knowledge_cutoff: the date the system prompt says the assistant's knowledge ends.
      max_new_tokens: most tokens generated per answer.
      temperature: sampling temperature; 0 means greedy decoding.
      top_p: nucleus sampling: keep the smallest set of tokens whose probability reaches this.
      min_words: shortest answer kept, in words.
      min_repeat_words: sentences shorter than this may repeat; a longer one that repeats an earlier one cuts the answer there.
      leak_words: an answer sharing this many consecutive words with the verbose system prompt is rejected.
      max_batch_size: records generated together (sequences in flight: a finished one's slot goes to the next record at once).
      kv_cache_gb: most GB (10^9 bytes) the KV cache of the sequences in flight may take; a record waits for room. Default: no cap.
      max_seq_len: context window (prompt + answer). Default: the checkpoint's.
      dtype: fp32, bf16 or fp16. Default: bf16 on GPUs that support it, fp32 on CPU.
      seed: sampling seed; each record samples from a seed derived from this and its id.
      overwrite: start OUTPUT (and REJECTED) afresh instead of resuming (the old files are moved to FILE.bak-TIME). A resume of answers made from other input, model, adapter or sampling options is refused.
    """
    options = dict(locals())
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                            stop=(templates.NextTurn(assistant_name),))
    params.check()
    for flag, value in (("max_batch_size", max_batch_size), ("min_words", min_words),
                        ("min_repeat_words", min_repeat_words), ("leak_words", leak_words)):
        if value < 1:
            raise ValueError(f"--{flag} must be at least 1, got {value}")
    if rejected is not None and Path(rejected).resolve() == Path(output).resolve():
        raise ValueError("--rejected must be a different file from --output")
    budget = kv_budget_bytes(kv_cache_gb)
    answer_filter = AnswerFilter(assistant_name, knowledge_cutoff, min_words, min_repeat_words, leak_words)

    inputs = records.read_kind(input, "sft")  # bad input stops here, before any model work
    fingerprint = {"prompt_version": records.record_digest(
        {"system": templates.verbose_system_prompt(assistant_name, knowledge_cutoff)})}
    if not overwrite:  # a resume of answers made differently stops here, before the model loads
        check_resume(output, inputs, options, fingerprint, also_done=[rejected])
    if _all_done(output, rejected, inputs, overwrite):
        return
    view = peek(ckpt_dir, tokenizer_path, max_seq_len)  # every prompt is checked before the weights load
    # The whole answer budget is reserved: an answer cut by the window would be rejected as unfinished.
    refuse_overlong([(r["id"], len(view.tokenizer.encode(templates.verbose_clone_prompt(
        r["instruction"], r["input"], assistant_name, knowledge_cutoff)))) for r in inputs],
        view.window, max_new_tokens, source=input, what="record",
        fix="shorten or drop such records, or lower --max_new_tokens", note=view.note)
    loaded = build(ckpt_dir, tokenizer_path=tokenizer_path, adapter=adapter, model_parallel_size=model_parallel_size,
                   seed=seed, dtype=dtype, max_seq_len=max_seq_len)
    world = loaded.world
    engine = Engine(loaded.model, loaded.tokenizer)
    # The rejected file is resumed and sharded like the output (which RecordJob handles): cleared
    # once, scanned by every rank before any rank writes, merged by rank 0 at the end.
    if rejected and overwrite and world.is_main:
        records.clear_output(rejected)
    distributed.barrier()
    done_rejected = records.scan_done_ids(rejected) if rejected else set()
    todo = [r for r in inputs if r["id"] not in done_rejected]
    if done_rejected and world.is_main:  # RecordJob then counts the rest against OUTPUT
        print(f"{rejected}: {len(inputs) - len(todo)} of {len(inputs)} records already rejected", file=sys.stderr)
    reject_writer = (records.open_output(rejected, shard=(world.dp_rank, world.dp_size))
                     if rejected and world.is_group_writer else None)
    kept, reasons = 0, Counter()
    with RecordJob(output, todo, world, overwrite=overwrite, options=options, model=loaded.name,
                   desc="verbose-clone", fingerprint=fingerprint, resume_inputs=inputs,
                   also_done=[rejected]) as job, (reject_writer or contextlib.nullcontext()):
        # Records are written as they finish (resume goes by id, not by order).
        requests = (Request(templates.verbose_clone_prompt(r["instruction"], r["input"], assistant_name,
                                                           knowledge_cutoff),
                            params, seed=row_seed(seed, r["id"]), key=r) for r in job.todo)
        for req in Scheduler(engine, max_in_flight=max_batch_size, kv_budget_bytes=budget).run(requests):
            record, gen = req.key, req.result
            answer, reason = answer_filter(gen, record)
            if reason is None:
                # The thoughts led to the concise answer, not to this one.
                job.write({**record, "output": answer, "thoughts": "", "source": SOURCE})
                kept += 1
            else:
                reasons[reason.split(":", 1)[0]] += 1
                if reject_writer is not None:
                    reject_writer.write({**record, "generation": gen.text, "reject_reason": reason})
            job.advance(1, tokens=len(gen.tokens))
    if rejected:
        distributed.barrier()
        if world.is_main:
            records.merge_shards(rejected, order=[r["id"] for r in inputs])
    if world.dp_size == 1 and world.is_main and job.todo:  # under data parallelism each group knows only its share
        summary = ", ".join(f"{reason} {n}" for reason, n in reasons.most_common())
        print(f"verbose-clone: kept {kept} of {len(job.todo)}" + (f"; rejected: {summary}" if summary else ""),
              file=sys.stderr)


def _all_done(output: str, rejected: Optional[str], inputs: list[dict], overwrite: bool) -> bool:
    """True (and says so) when OUTPUT and REJECTED already hold every input id: checked before
    the model loads. Every rank reads the same files, so every rank agrees."""
    paths = [p for p in (output, rejected) if p]
    if overwrite or any(records.shard_files(p) for p in paths):
        return False
    done = set().union(*(records.scan_done_ids(p) for p in paths))
    if records.pending(inputs, done):
        return False
    if int(os.environ.get("RANK", 0)) == 0:  # before the process groups exist: torchrun's rank
        print(records.resume_message(output, len(inputs), 0), file=sys.stderr)
    return True


class AnswerFilter:
    """The cuts and checks for one generated answer: (answer, None) or (text, reason)."""

    def __init__(self, assistant_name: str, knowledge_cutoff: str, min_words: int, min_repeat_words: int,
                 leak_words: int):
        self.name = assistant_name
        self.system = templates.verbose_system_prompt(assistant_name, knowledge_cutoff)
        # The engraved model learnt from curated answers, but a citation or exemplar sentence that
        # slipped through would be cloned again.
        self.telltales = templates.exemplar_telltale_phrases(assistant_name, knowledge_cutoff)
        self.min_words, self.min_repeat_words, self.leak_words = min_words, min_repeat_words, leak_words

    def __call__(self, gen: Generation, record: dict) -> tuple[str, Optional[str]]:
        answer = templates.parse_reply(gen.text, self.name)
        answer = textfilters.cut_at_next_turn(answer, ("User", self.name))
        answer, cut = textfilters.cut_repeated_sentences(answer, self.min_repeat_words)
        answer = answer.strip()
        if not answer:
            return answer, "empty"
        if gen.finish_reason == "length" and not cut:
            return answer, "unfinished"  # stopped by --max_new_tokens mid-answer
        if len(textfilters.words(answer)) < self.min_words:
            return answer, "too short"
        leak = textfilters.shared_run(answer, self.system, self.leak_words)
        if leak is not None:
            return answer, f"system prompt leak: {leak}"
        phrase = textfilters.find_phrase(answer, self.telltales)
        if phrase is not None:
            return answer, f"telltale phrase: {phrase}"
        if textfilters.is_echo(answer, (record["instruction"], record["input"])):
            return answer, "echo"
        return answer, None
