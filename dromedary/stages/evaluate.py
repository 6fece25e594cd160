"""dromedary evaluate: TruthfulQA MC1/MC2 and BIG-bench HHH on any model we load, the paper's table.

load (benchmark files, checked before any model work) -> score every item under a protocol
(eval/protocols.py) -> write one record per item to DIR/items.jsonl (resumable, data-parallel
shards like every record stage) -> DIR/results.json and a printed table; `--compare OTHER_DIR`
prints two runs side by side (`--compare A,B`: three, as `dromedary pipeline --salmon --evaluate` does).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Optional

from .. import distributed, records
from ..engine.builder import build
from ..engine.generation import Engine
from ..eval import data as readers
from ..eval import protocols, results
from ..eval.protocols import JudgePrompt, Protocol
from ..eval.scoring import Scorer
from ..jobs import RecordJob, already_done
from ..recipe import templates

ITEMS_FILE = "items.jsonl"
SETTINGS_FILE = "settings.json"
DEFAULT_DATA = {"truthfulqa": readers.TRUTHFULQA_HUB, "hhh": readers.HHH_HUB}


def evaluate(
    output_dir: str,
    tasks: str = "truthfulqa_mc1,truthfulqa_mc2,hhh",
    protocol: Protocol = "lm-eval",
    data: Optional[dict] = None,
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    adapter: Optional[str] = None,
    model_parallel_size: Optional[int] = None,
    limit: Optional[int] = None,
    compare: Optional[str | list[str]] = None,
    system: str = "standard",
    assistant_name: str = templates.DEFAULT_ASSISTANT_NAME,
    max_exemplars: Optional[int] = None,
    max_batch_size: int = 8,
    max_seq_len: Optional[int] = None,
    dtype: Optional[str] = None,
    seed: int = 0,
    overwrite: bool = False,
) -> None:
    """Score TASKS on a model into OUTPUT_DIR: items.jsonl (one record per item), results.json, a table.

    Resumable: items already in OUTPUT_DIR/items.jsonl are skipped, provided the run's settings
    (OUTPUT_DIR/settings.json) are the same. Under torchrun the world splits into data-parallel
    groups of MODEL_PARALLEL_SIZE processes, each scoring its share of the items.

    Args:
      output_dir: the directory for items.jsonl, results.json, settings.json (created if missing).
      tasks: comma-separated: truthfulqa_mc1, truthfulqa_mc2, hhh (lm-eval's bigbench_hhh_alignment_multiple_choice).
      protocol: lm-eval (exactly what lm-evaluation-harness computes, comparable with published figures) or dromedary (each candidate judged inside the assistant's own prompt, as in the paper).
      data: where each benchmark comes from, as --data '{"truthfulqa": PATH_OR_NAME, "hhh": PATH_OR_NAME}': a file or folder in any layout of eval/data.py, or a hub name read through `datasets` (needs the network). Default: truthfulqa/truthful_qa and HuggingFaceH4/hhh_alignment.
      ckpt_dir: LLaMA checkpoint, Meta or HF layout. Default: the embedded tiny model.
      tokenizer_path: SentencePiece tokenizer.model. Default: CKPT_DIR/tokenizer.model.
      adapter: PEFT LoRA adapter directory (from `dromedary finetune`); with --protocol dromedary the items are put in the chat format with --system, as the engraved model was trained.
      model_parallel_size: processes sharing one model copy (tensor parallelism). Default: the whole world.
      limit: score only the first N items of each task (of each HHH subset).
      compare: another evaluate OUTPUT_DIR: print both side by side, with the difference and whether it exceeds the noise. Several, comma-separated (e.g. base,engraved): all of them and this run side by side, each minus the one before.
      system: the engraved model's system prompt for --protocol dromedary with --adapter: standard, concise, verbose, multilingual, or a text file.
      assistant_name: the name the adapter was trained with (--protocol dromedary with --adapter).
      max_exemplars: --protocol dromedary on a base model: keep only the first N exemplars of the self-align prompt (for short context windows).
      max_batch_size: sequences scored together.
      max_seq_len: context window. Default: the checkpoint's.
      dtype: fp32, bf16 or fp16. Default: bf16 on GPUs that support it, fp32 on CPU.
      seed: process seed (scoring draws nothing at random).
      overwrite: start OUTPUT_DIR's items afresh (the old file is kept as items.jsonl.bak).
    """
    options = dict(locals())
    task_names = _task_list(tasks)
    if protocol not in protocols.PROTOCOLS:
        raise ValueError(f"--protocol {protocol!r}: choose lm-eval or dromedary")
    if max_batch_size < 1:
        raise ValueError(f"--max_batch_size must be at least 1, got {max_batch_size}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"--limit must be a positive integer, got {limit!r}")
    sources = {**DEFAULT_DATA, **_source_dict(data)}
    out = Path(output_dir)
    compare = _dir_list(compare)
    others = [results.read_results(c) for c in compare]  # a wrong --compare fails before any work

    judge = None
    if protocol == "dromedary":
        system_text = templates.load_system_prompt(system, assistant_name) if adapter else ""
        judge = JudgePrompt(engraved=bool(adapter), assistant_name=assistant_name, system=system_text,
                            max_exemplars=max_exemplars)
    # Every input is read and checked, and every prompt built once, before the model loads.
    loaded_items: dict[str, list[dict]] = {}
    inputs: list[dict] = []
    for task in task_names:
        bench = protocols.TASKS[task][0]
        if bench not in loaded_items:
            read = readers.truthfulqa_items if bench == "truthfulqa" else readers.hhh_items
            loaded_items[bench] = read(str(sources[bench]))
        inputs += protocols.task_items(task, loaded_items[bench], limit)
    for item in inputs:
        protocols.requests(item, protocol, judge)
    model_label = f"{ckpt_dir or 'embedded default model'}" + (f" + adapter {adapter}" if adapter else "")
    settings = {"protocol": protocol, "tasks": task_names, "model": model_label, "limit": limit,
                "data": {b: str(sources[b]) for b in loaded_items}, "data_sha256": _fingerprint(inputs),
                "system": system if (adapter and protocol == "dromedary") else None,
                "assistant_name": assistant_name if (adapter and protocol == "dromedary") else None,
                "max_exemplars": max_exemplars if protocol == "dromedary" else None,
                "dtype": dtype, "max_seq_len": max_seq_len}
    items_path = out / ITEMS_FILE
    if int(os.environ.get("RANK", 0)) == 0:  # before the process groups exist
        _check_settings(out, settings, inputs, overwrite)
    distributed.barrier()

    if not already_done(str(items_path), inputs, overwrite):
        loaded = build(ckpt_dir, tokenizer_path=tokenizer_path, adapter=adapter,
                       model_parallel_size=model_parallel_size, seed=seed, dtype=dtype, max_seq_len=max_seq_len)
        # Scoring runs the model's forward over whole rows; the packed decoding copy would not help.
        scorer = Scorer(Engine(loaded.model, loaded.tokenizer, prepack=False), max_batch_size)
        with RecordJob(str(items_path), inputs, loaded.world, overwrite=overwrite, options=options,
                       model=loaded.name, desc="evaluate", unit="item") as job:
            shared_for: Optional[str] = None
            for batch in job.batches(max(1, max_batch_size // 2)):
                for task in dict.fromkeys(r["task"] for r in batch):
                    part = [r for r in batch if r["task"] == task]
                    pairs = [protocols.requests(r, protocol, judge) for r in part]
                    key = f"{protocol}:{protocols.TASKS[task][0]}"
                    if key != shared_for:
                        scorer.share(_shared_text(task, protocol, judge), [p for ps in pairs for p in ps][:8])
                        shared_for = key
                    flat = [p for ps in pairs for p in ps]
                    lls = iter(scorer.loglikelihoods(flat))
                    for record, ps in zip(part, pairs):
                        scores = [next(lls)[0] for _ in ps]
                        job.write({"id": record["id"], "task": record["task"], "subset": record["subset"],
                                   "choices": record["choices"], "labels": record["labels"], "protocol": protocol,
                                   "loglikelihoods": scores, **protocols.verdict(record, protocol, scores)})
                job.advance(len(batch))
    if int(os.environ.get("RANK", 0)) != 0:
        return
    done = {r["id"]: r for r in records.read_records(items_path)} if items_path.exists() else {}
    rows = results.aggregate([done[r["id"]] for r in inputs if r["id"] in done], model_label, task_names)
    results.write_results(out, rows)
    print(results.table(rows), flush=True)
    if len(others) == 1:
        print("\n" + results.compare_table(others[0], rows, Path(compare[0]).name, out.name), flush=True)
    elif others:
        print("\n" + results.compare_runs([*others, rows], [*(Path(c).name for c in compare), out.name]), flush=True)


def _task_list(tasks) -> list[str]:
    # Fire turns "a,b,c" into a tuple and a lone name into a str.
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = [protocols.resolve_task(str(n).strip()) for n in names if str(n).strip()]
    if not names:
        raise ValueError("--tasks is empty: name at least one of " + ", ".join(protocols.TASKS))
    return list(dict.fromkeys(names))


def _dir_list(value) -> list[str]:
    # Fire turns "a,b" into a tuple; the pipeline passes a list.
    if not value:
        return []
    names = value.split(",") if isinstance(value, str) else list(value)
    return [str(n).strip() for n in names if str(n).strip()]


def _source_dict(value) -> dict:
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"--data is not valid JSON ({err.msg}): give {{\"truthfulqa\": PATH, \"hhh\": PATH}}") from None
    if not isinstance(value, dict) or not all(isinstance(v, str) and v for v in value.values()):
        raise ValueError("--data must be a JSON object {\"truthfulqa\": PATH_OR_NAME, \"hhh\": PATH_OR_NAME}")
    bad = set(value) - set(DEFAULT_DATA)
    if bad:
        raise ValueError(f"--data: unknown benchmark(s) {', '.join(sorted(bad))}; use truthfulqa and hhh")
    return dict(value)


def _shared_text(task: str, protocol: str, judge: Optional[JudgePrompt]) -> Optional[str]:
    if protocol == "dromedary":
        return judge.shared_prefix() if judge else None
    return protocols.QA_PRIMER if protocols.TASKS[task][0] == "truthfulqa" else None


def _fingerprint(items: list[dict]) -> str:
    text = json.dumps([[r["id"], r["input"], r["choices"], r["labels"], r.get("context")] for r in items],
                      ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _check_settings(out: Path, settings: dict, inputs: list[dict], overwrite: bool) -> None:
    """Resume only what the same settings and the same items made: a mismatch is refused, naming
    what differs."""
    path = out / SETTINGS_FILE
    items_path = out / ITEMS_FILE
    if not overwrite and items_path.exists():
        by_id = {r["id"]: r for r in inputs}
        # A partial last line left by a kill is no reason to refuse: the job drops it.
        for written in records._scan_output(items_path)[0]:
            mine = by_id.get(written["id"])
            if mine is not None and (written.get("choices"), written.get("labels")) != (mine["choices"], mine["labels"]):
                raise ValueError(f"{items_path}: item {written['id']!r} was scored on other data than {mine['where']} "
                                 "holds now: use another --output_dir, or --overwrite to start afresh")
    if path.exists() and not overwrite and items_path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err.msg}); move it aside") from None
        differ = [k for k in settings if old.get(k) != settings[k]]
        # More tasks or a larger --limit only add items; anything else changes the ones written.
        # (The items themselves were checked above, whatever path they were read from.)
        differ = [k for k in differ if k not in ("tasks", "limit", "data", "data_sha256")]
        if differ:
            was = "; ".join(f"{k}: {old.get(k)!r} then, {settings[k]!r} now" for k in differ)
            raise ValueError(f"{out} holds items scored with other settings ({was}): use another --output_dir, "
                             "or --overwrite to start afresh")
    out.mkdir(parents=True, exist_ok=True)
    records._replace_atomically(path, (json.dumps(settings, indent=2) + "\n").encode("utf-8"))
    print(f"{out}: {settings['protocol']} protocol, tasks {', '.join(settings['tasks'])}", file=sys.stderr)
