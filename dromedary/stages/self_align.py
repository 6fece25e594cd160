"""dromedary self-align: principle-driven answers from a base model, one per prompt record.

Each record's prompt is the principles, the in-context exemplars, the record's request and the
internal-thoughts cue (templates.self_align_prompt). Everything before the request is the same
for every record, so its keys and values are computed once and attended by every batch through the
engine's shared-prefix cache. The raw text after the cue (internal thoughts, the answer marker,
the answer) is stored; `curate` takes it apart.
"""

from __future__ import annotations

from typing import Optional

from .. import records
from ..engine.builder import build, peek
from ..engine.generation import Engine, SamplingParams, row_seed
from ..engine.scheduler import Request, Scheduler, kv_budget_bytes
from ..jobs import RecordJob, already_done
from ..recipe import templates


def self_align(
    input: str,
    output: str,
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    adapter: Optional[str] = None,
    model_parallel_size: Optional[int] = None,
    assistant_name: Optional[str] = None,
    knowledge_cutoff: str = templates.DEFAULT_KNOWLEDGE_CUTOFF,
    max_exemplars: Optional[int] = None,
    max_new_tokens: int = 512,
    temperature: float = 0.7,
    top_p: float = 0.95,
    max_batch_size: int = 8,
    kv_cache_gb: Optional[float] = None,
    max_seq_len: Optional[int] = None,
    dtype: Optional[str] = None,
    seed: int = 0,
    overwrite: bool = False,
) -> None:
    """Answer every prompt record of INPUT under the principles and exemplars; append self-align records to OUTPUT.

    Each output record is the prompt record plus `generation` (the raw text after the
    internal-thoughts cue, cut before the next turn), `prompt_version` and `model`. Resumable: ids
    already in OUTPUT are skipped, and each record samples from its own seed, so a resumed run
    writes what an uninterrupted one would have. Under torchrun the world splits into
    data-parallel groups of MODEL_PARALLEL_SIZE processes, each answering its share.

    Args:
      input: JSONL prompt records {"id", "instruction", "input", "source"} (from `dromedary generate-prompts`).
      output: JSONL file to append self-align records to (created if missing; never truncated unless --overwrite).
      ckpt_dir: LLaMA base model, Meta (params.json + consolidated.NN.pth) or HF (config.json + *.safetensors) layout. Default: the embedded tiny model.
      tokenizer_path: tokenizer.json or tokenizer.model (SentencePiece or tiktoken). Default: CKPT_DIR's own.
      adapter: PEFT LoRA adapter directory to apply on load.
      model_parallel_size: processes sharing one model copy (tensor parallelism). Default: the whole world.
      assistant_name: the assistant's name inside the prompt. Default: the internal codename of prompts/self_align.json, which `curate` renames; if you change it, pass the same name to `curate --prompt_name`.
      knowledge_cutoff: the date the principles say the assistant's knowledge ends.
      max_exemplars: use only the first N in-context exemplars, for models whose context window cannot hold them all (LLaMA-1: 2048 tokens). Default: all.
      max_new_tokens: most tokens generated per record (thoughts and answer together).
      temperature: sampling temperature; 0 means greedy decoding.
      top_p: nucleus sampling: keep the smallest set of tokens whose probability reaches this.
      max_batch_size: records generated together (sequences in flight: a finished one's slot goes to the next record at once).
      kv_cache_gb: most GB (10^9 bytes) the KV cache of the sequences in flight may take; a record waits for room. Default: no cap.
      max_seq_len: context window (prompt + generation). Default: the checkpoint's.
      dtype: fp32, bf16 or fp16. Default: bf16 on GPUs that support it, fp32 on CPU.
      seed: sampling seed; each record samples from a seed derived from this and its id.
      overwrite: start OUTPUT afresh instead of resuming it (the old output is moved to OUTPUT.bak-TIME). A resume of records made from other input, model, prompt or sampling options is refused.
    """
    options = dict(locals())
    name = assistant_name or templates.internal_codename()
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                            stop=tuple(templates.self_align_stop_strings(name)))
    params.check()
    if max_batch_size < 1:
        raise ValueError(f"--max_batch_size must be at least 1, got {max_batch_size}")
    budget = kv_budget_bytes(kv_cache_gb)
    if max_exemplars is not None and max_exemplars < 1:
        raise ValueError(f"--max_exemplars must be at least 1 (or left out for all), got {max_exemplars}")

    inputs = records.read_kind(input, "prompts")  # bad input stops here, before any model work
    empty = [r["id"] for r in inputs if not r["instruction"].strip()]
    if empty:
        raise ValueError(f"{input}: record {empty[0]!r} has an empty instruction "
                         f"({len(empty)} record(s) in all); remove or fill them")
    version = templates.self_align_prompt_version(name, knowledge_cutoff, max_exemplars)
    if already_done(output, inputs, overwrite, options, {"prompt_version": version}):
        return

    prefix = templates.self_align_prefix(name, knowledge_cutoff, max_exemplars)
    check_context(inputs, input, name=name, knowledge_cutoff=knowledge_cutoff, max_exemplars=max_exemplars,
                  ckpt_dir=ckpt_dir, tokenizer_path=tokenizer_path, max_seq_len=max_seq_len,
                  max_new_tokens=max_new_tokens)

    loaded = build(ckpt_dir, tokenizer_path=tokenizer_path, adapter=adapter, model_parallel_size=model_parallel_size,
                   seed=seed, dtype=dtype, max_seq_len=max_seq_len)
    engine = Engine(loaded.model, loaded.tokenizer)
    scheduler = Scheduler(engine, max_in_flight=max_batch_size, kv_budget_bytes=budget)
    with RecordJob(output, inputs, loaded.world, overwrite=overwrite, options=options, model=loaded.name,
                   desc="self-align", fingerprint={"prompt_version": version}) as job:
        if job.todo:
            # Exactly the shared prefix, so every batch in every data-parallel group attends the
            # same cached block whatever words its records happen to share.
            engine.cache_prefix(prefix)
        # Records are written as they finish (resume goes by id, not by order).
        requests = (Request(prefix + templates.self_align_suffix(r["instruction"], r["input"], name), params,
                            seed=row_seed(seed, r["id"]), key=r) for r in job.todo)
        for req in scheduler.run(requests):
            job.write({**req.key, "generation": req.result.text, "prompt_version": version, "model": loaded.name})
            job.advance(1, tokens=len(req.result.tokens))


def check_context(inputs: list[dict], input: str, *, name: str, knowledge_cutoff: str,
                  max_exemplars: Optional[int], ckpt_dir: Optional[str], tokenizer_path: Optional[str],
                  max_seq_len: Optional[int], max_new_tokens: int) -> None:
    """Raise ValueError, before the weights load, unless every prompt + max_new_tokens fits the window.

    Reads only the checkpoint's config and the tokenizer. A prompt that does not fit would
    otherwise fail mid-run, or (the engine shortens a batch's budget to its longest row) change
    the other answers of its batch.
    """
    view = peek(ckpt_dir, tokenizer_path, max_seq_len)
    window, tokenizer = view.window, view.tokenizer
    note = view.note  # where the window came from, when no file states it

    def prefix_tokens(k: Optional[int]) -> int:
        return len(tokenizer.encode(templates.self_align_prefix(name, knowledge_cutoff, k)))

    prefix = prefix_tokens(max_exemplars)
    if prefix + max_new_tokens > window:
        total = len(templates.load_exemplars(name, knowledge_cutoff))
        used = min(max_exemplars or total, total)
        fits = next((k for k in range(used - 1, 0, -1) if prefix_tokens(k) + max_new_tokens <= window), None)
        fix = (f"use --max_exemplars {fits} (or lower --max_new_tokens)" if fits
               else "lower --max_new_tokens (even one exemplar leaves no room for this many)")
        raise ValueError(f"the self-align prompt ({prefix} tokens with {used} of {total} exemplars) plus "
                         f"--max_new_tokens {max_new_tokens} does not fit the context window of {window} tokens"
                         f"{note}; {fix}")
    # The prefix ends at a line break, a token boundary, so the suffix's tokens add up; +1 for the
    # word-start marker SentencePiece may put on the suffix's first piece when encoded alone.
    def prompt_tokens(record: dict) -> int:
        suffix = templates.self_align_suffix(record["instruction"], record["input"], name)
        return prefix + 1 + len(tokenizer.encode(suffix, bos=False))

    too_long = [(r["id"], n) for r in inputs if (n := prompt_tokens(r)) + max_new_tokens > window]
    if too_long:
        rid, n = too_long[0]
        raise ValueError(f"{input}: record {rid!r}: its self-align prompt has about {n} tokens, which with "
                         f"--max_new_tokens {max_new_tokens} exceeds the context window of {window} tokens{note} "
                         f"({len(too_long)} record(s) in all); shorten or drop such records, or lower "
                         "--max_new_tokens or --max_exemplars")
