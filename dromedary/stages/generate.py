"""dromedary generate: batch completions over a JSONL of {"id", "prompt"} records."""

from __future__ import annotations

from typing import Optional

from .. import records
from ..engine.builder import build, peek
from ..engine.generation import Engine, SamplingParams, refuse_overlong, row_seed
from ..engine.scheduler import Request, Scheduler, kv_budget_bytes
from ..jobs import RecordJob, already_done


def generate(
    input: str,
    output: str,
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    adapter: Optional[str] = None,
    model_parallel_size: Optional[int] = None,
    max_new_tokens: int = 256,
    min_new_tokens: int = 0,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop: Optional[list[str]] = None,
    max_batch_size: int = 8,
    kv_cache_gb: Optional[float] = None,
    max_seq_len: Optional[int] = None,
    dtype: Optional[str] = None,
    seed: int = 0,
    overwrite: bool = False,
) -> None:
    """Complete every prompt of INPUT and append {"id", "prompt", "completion"} records to OUTPUT.

    Resumable: ids already in OUTPUT are skipped. Under torchrun, the world is split into
    data-parallel groups of MODEL_PARALLEL_SIZE processes, each completing its share of the records.

    Args:
      input: JSONL file of {"id": str, "prompt": str} records.
      output: JSONL file to append completions to (created if missing; never truncated unless --overwrite).
      ckpt_dir: LLaMA checkpoint directory, Meta (params.json + consolidated.NN.pth) or HF (config.json + *.safetensors) layout. Default: the embedded tiny model.
      tokenizer_path: tokenizer.json or tokenizer.model (SentencePiece or tiktoken). Default: CKPT_DIR's own.
      adapter: PEFT LoRA adapter directory to apply on load (from `dromedary finetune`).
      model_parallel_size: processes sharing one model copy (tensor parallelism). Default: the whole world.
      max_new_tokens: most tokens to generate per record.
      min_new_tokens: end-of-sequence is not allowed before this many tokens.
      temperature: sampling temperature; 0 means greedy decoding.
      top_p: nucleus sampling: keep the smallest set of tokens whose probability reaches this.
      top_k: keep only the K most likely tokens (0: no limit).
      stop: stop strings, e.g. --stop '["\\n\\n### User"]'; the completion is cut before the first one.
      max_batch_size: records generated together (sequences in flight: a finished one's slot goes to the next record at once).
      kv_cache_gb: most GB (10^9 bytes) the KV cache of the sequences in flight may take; a record waits for room. Default: no cap.
      max_seq_len: context window (prompt + completion). Default: the checkpoint's.
      dtype: fp32, bf16 or fp16. Default: bf16 on GPUs that support it, fp32 on CPU.
      seed: sampling seed; each record samples from a seed derived from this and its id, so reruns and resumed runs repeat exactly.
      overwrite: start OUTPUT afresh instead of resuming it (the old output is moved to OUTPUT.bak-TIME). A resume of records made from other input, model or sampling options is refused.
    """
    options = dict(locals())
    stops = [stop] if isinstance(stop, str) else list(stop or ())  # Fire gives one string as a str
    params = SamplingParams(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, temperature=temperature,
                            top_p=top_p, top_k=top_k, stop=tuple(str(s) for s in stops))
    params.check()
    if max_batch_size < 1:
        raise ValueError(f"--max_batch_size must be at least 1, got {max_batch_size}")
    budget = kv_budget_bytes(kv_cache_gb)
    inputs = records.read_kind(input, "completion-input")  # bad input stops before any model work
    if already_done(output, inputs, overwrite, options):
        return
    # Every record is checked before the weights load: one that cannot fit would stop the run
    # halfway, and every rerun there. A row's budget is what its own prompt leaves of the window.
    view = peek(ckpt_dir, tokenizer_path, max_seq_len)
    refuse_overlong([(r["id"], len(view.tokenizer.encode(r["prompt"]))) for r in inputs], view.window, 1,
                    source=input, what="record",
                    fix="shorten or drop such records, or give a larger --max_seq_len if the model supports it",
                    note=view.note)
    loaded = build(ckpt_dir, tokenizer_path=tokenizer_path, adapter=adapter, model_parallel_size=model_parallel_size,
                   seed=seed, dtype=dtype, max_seq_len=max_seq_len)
    engine = Engine(loaded.model, loaded.tokenizer)
    with RecordJob(output, inputs, loaded.world, overwrite=overwrite, options=options, model=loaded.name,
                   desc="generate") as job:
        # Records are written as they finish (resume goes by id, not by order).
        requests = (Request(r["prompt"], params, seed=row_seed(seed, r["id"]), key=r) for r in job.todo)
        for req in Scheduler(engine, max_in_flight=max_batch_size, kv_budget_bytes=budget).run(requests):
            rec = req.key
            job.write({"id": rec["id"], "prompt": rec["prompt"], "completion": req.result.text})
            job.advance(1, tokens=len(req.result.tokens))
