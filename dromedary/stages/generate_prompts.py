"""dromedary generate-prompts: prompt records by TGRT or self-instruct, or imported from public sets.

Generating methods run in rounds. In each round the data-parallel groups split the round's requests
(batches of requests whose prompts share a prefix, so the engine computes it once), rank 0 gathers
every generation, filters them in request order (ROUGE-L and dedupe need one pass over everything
kept), appends the survivors to OUTPUT and records the finished round in OUTPUT.state.json. So the
output depends on the seed and the options but not on the world size, and a killed run resumes at
the round it was in.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, get_args

from tqdm import tqdm

from .. import distributed, records
from ..engine.generation import Engine, SamplingParams, refuse_overlong, row_seed
from ..engine.scheduler import Request, Scheduler
from ..errors import UserError
from ..jobs import model_settings
from ..recipe import filters, importers, templates

Method = Literal["tgrt", "self-instruct", "import"]
METHODS: tuple[Method, ...] = get_args(Method)
SEED_SOURCE = {"tgrt": "tgrt-seed", "self-instruct": "self-instruct-seed"}

# Generation budgets (tokens): a topic list, one question line, one instruction/input pair.
TOPIC_TOKENS, QUESTION_TOKENS, TASK_TOKENS = 128, 80, 96
NEW_TOPICS_PER_REQUEST = 10
TOPICS_SHOWN = 20  # existing topics shown to the brainstorm prompt (a seeded sample when longer)


def generate_prompts(
    method: Method,
    output: str,
    num_prompts: Optional[int] = None,
    seed: int = 0,
    include_seeds: bool = False,
    temperature: float = 1.0,
    top_p: float = 0.9,
    max_rounds: int = 100,
    topics_per_type: int = 20,
    topic_rounds: int = 5,
    seeds_per_request: int = 3,
    tasks_per_request: int = 8,
    similarity_threshold: float = 0.7,
    min_words: int = 4,
    max_words: int = 150,
    sources: Optional[dict] = None,
    per_source: Optional[int] = None,
    min_chars: int = 10,
    max_chars: int = 4000,
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    adapter: Optional[str] = None,
    model_parallel_size: Optional[int] = None,
    max_batch_size: int = 8,
    max_seq_len: Optional[int] = None,
    dtype: Optional[str] = None,
    overwrite: bool = False,
) -> None:
    """Write prompt records {id, instruction, input, source, ...} to OUTPUT.

    tgrt: topic-guided red-teaming. Brainstorm topics for every question type of
    prompts/tgrt/question_types.json, then ask for questions of each type about its topics; only
    questions that are one complete line about their topic are kept (records add topic and
    question_type). self-instruct: show a few sampled seed tasks as a numbered list and let the
    model continue it; new tasks pass text filters and a ROUGE-L novelty filter (records add
    avg_similarity, max_similarity, most_similar). import: the first human turn of each ShareGPT,
    Dolly-15k, OpenAssistant oasst1 or OpenOrca conversation, cleaned and deduplicated; no model.

    Ids are content hashes, so reruns give the same ids. Resumable: a rerun appends what is
    missing, and a finished run does nothing. Under torchrun the data-parallel groups split each
    round's generation requests; rank 0 filters and writes.

    Args:
      method: tgrt, self-instruct or import.
      output: JSONL file to append prompt records to (never truncated unless --overwrite).
      num_prompts: how many generated prompts to write (tgrt, self-instruct: required); for import, keep a seeded sample of this many (default: all).
      seed: makes sampling, seed-task choice and subsampling repeatable.
      include_seeds: also write the human-written seed questions (tgrt) or seed tasks (self-instruct), with source tgrt-seed / self-instruct-seed; they do not count towards NUM_PROMPTS.
      temperature: sampling temperature; must be > 0, since requests that share a prompt must be able to differ.
      top_p: nucleus sampling threshold.
      max_rounds: stop after this many generation rounds even if NUM_PROMPTS is not reached (a weak model may never get there); a rerun with a larger value continues.
      topics_per_type: tgrt: brainstorm until each question type has this many topics (the file's example topics count).
      topic_rounds: tgrt: at most this many brainstorm rounds.
      seeds_per_request: self-instruct: seed tasks shown in each request.
      tasks_per_request: self-instruct: new tasks asked for in each request.
      similarity_threshold: self-instruct: drop a task whose instruction has a ROUGE-L F-measure above this with any seed or kept instruction.
      min_words: self-instruct: shortest instruction kept, in words.
      max_words: self-instruct: longest instruction kept, in words.
      sources: import: {source: path or Hugging Face dataset name, or a list of them}, sources being sharegpt, dolly, oasst1, openorca; files are JSON arrays, JSON lines (.gz too) or parquet in the source's own layout, e.g. --sources '{"dolly": "dolly.jsonl", "oasst1": "OpenAssistant/oasst1"}'.
      per_source: import: keep a seeded sample of at most this many prompts per source.
      min_chars: import: shortest prompt kept (instruction + input), in characters.
      max_chars: import: longest prompt kept, in characters.
      ckpt_dir: LLaMA checkpoint directory, Meta or HF layout. Default: the embedded tiny model.
      tokenizer_path: tokenizer.json or tokenizer.model (SentencePiece or tiktoken). Default: CKPT_DIR's own.
      adapter: PEFT LoRA adapter directory to apply on load.
      model_parallel_size: processes sharing one model copy. Default: the whole world.
      max_batch_size: requests generated together. A round asks for what is missing at the yield seen so far, at most MAX_BATCH_SIZE requests per question type (tgrt) or 8 x MAX_BATCH_SIZE requests (self-instruct).
      max_seq_len: context window. Default: the checkpoint's.
      dtype: fp32, bf16 or fp16. Default: bf16 on GPUs that support it, fp32 on CPU.
      overwrite: start OUTPUT afresh (the old output and its round state are moved to OUTPUT.bak-TIME) instead of resuming it. A resume with other generation settings or another model is refused.
    """
    options = dict(locals())
    _check_options(options)
    if method == "import":
        _import(options)
        return
    world = distributed.setup(model_parallel_size)
    # Rank 0 validates the output and rebuilds the state before any model work; the other ranks
    # learn the outcome, a bad output included, from one broadcast.
    start, summary = None, None
    if world.is_main:
        try:
            start = _open_run(options)
            summary = start.summary()
        except UserError as err:
            distributed.broadcast_object({"error": str(err)})
            raise
    summary = distributed.broadcast_object(summary)
    if "error" in summary:
        raise ValueError(summary["error"])
    if summary["finished"]:
        if start:
            start.writer.close()
            print(summary["message"], file=sys.stderr)
            if start.written:  # --include_seeds added to a finished output
                print(f"{output}: wrote {start.written} seed records", file=sys.stderr)
                records.write_provenance(output, command=sys.argv, options=options, model=None)
        return
    from ..engine.builder import build, peek

    _check_context(options, peek(ckpt_dir, tokenizer_path, max_seq_len))
    loaded = build(ckpt_dir, tokenizer_path=tokenizer_path, adapter=adapter, model_parallel_size=model_parallel_size,
                   seed=seed, dtype=dtype, max_seq_len=max_seq_len)
    engine = Engine(loaded.model, loaded.tokenizer)
    run = start or _Run.follower(options, summary)
    run.generate(engine, world, loaded.name)


# --------------------------------------------------------------------------- options


def _check_options(o: dict) -> None:
    method = o["method"]
    if method not in METHODS:
        raise ValueError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    if method == "import":
        if not o["sources"]:
            raise ValueError("--method import needs --sources, e.g. --sources '{\"dolly\": \"dolly.jsonl\"}'")
        if not isinstance(o["sources"], dict):
            raise ValueError(f"--sources must be a mapping such as '{{\"sharegpt\": \"sg.json\"}}', got {o['sources']!r}")
        model_flags = [f for f in ("ckpt_dir", "tokenizer_path", "adapter", "model_parallel_size") if o[f] is not None]
        if model_flags:
            raise ValueError(f"--method import runs no model: drop --{', --'.join(model_flags)}")
        if o["include_seeds"]:
            raise ValueError("--include_seeds is for tgrt and self-instruct: drop it for --method import")
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:
            raise ValueError("--method import runs no model: run it as one process, not under torchrun")
        if o["num_prompts"] is not None and o["num_prompts"] < 1:
            raise ValueError(f"--num_prompts must be at least 1, got {o['num_prompts']}")
        if o["per_source"] is not None and o["per_source"] < 1:
            raise ValueError(f"--per_source must be at least 1, got {o['per_source']}")
        if not 0 <= o["min_chars"] <= o["max_chars"]:
            raise ValueError(f"need 0 <= --min_chars <= --max_chars, got {o['min_chars']} and {o['max_chars']}")
        return
    if o["sources"] is not None or o["per_source"] is not None:
        raise ValueError(f"--sources and --per_source are for --method import, not {method}")
    if o["num_prompts"] is None or o["num_prompts"] < 1:
        raise ValueError(f"--method {method} needs --num_prompts N (N >= 1): how many prompts to generate")
    if o["temperature"] <= 0:
        raise ValueError("--temperature must be > 0: greedy decoding gives every request of a prompt the same text")
    SamplingParams(temperature=o["temperature"], top_p=o["top_p"]).check()
    for name in ("max_rounds", "topics_per_type", "topic_rounds", "seeds_per_request", "tasks_per_request",
                 "max_batch_size"):
        if o[name] < 1:
            raise ValueError(f"--{name} must be at least 1, got {o[name]}")
    if o["seeds_per_request"] > len(templates.load_seed_tasks()):
        raise ValueError(f"--seeds_per_request {o['seeds_per_request']}: there are only "
                         f"{len(templates.load_seed_tasks())} seed tasks")
    if not 0 < o["similarity_threshold"] <= 1:
        raise ValueError(f"--similarity_threshold must be in (0, 1], got {o['similarity_threshold']}")
    filters.InstructionFilter(o["min_words"], o["max_words"])  # raises on a bad range


def _check_context(o: dict, view) -> None:
    """Before the weights load: the largest request a run can make, plus its token budget, fits
    the window (requests are built in rounds, so their worst case is checked: the longest seed
    tasks shown together; per question type, its longest topic and its brainstorm prompt)."""
    tok, window = view.tokenizer, view.window
    if o["method"] == "self-instruct":
        longest = sorted(templates.load_seed_tasks(), key=lambda t: -len(tok.encode(t["instruction"] + t["input"])))
        n = len(tok.encode(templates.self_instruct_prompt(longest[: o["seeds_per_request"]], o["tasks_per_request"])))
        refuse_overlong([(f"{o['seeds_per_request']} longest seed tasks", n)], window,
                        TASK_TOKENS * o["tasks_per_request"], source="self-instruct", what="a request showing the",
                        fix="lower --seeds_per_request or --tasks_per_request, or give a larger --max_seq_len", note=view.note)
        return
    for t in templates.load_question_types():
        topics = sorted(t.topics, key=lambda x: -len(x))[:TOPICS_SHOWN]
        asks = [(len(tok.encode(templates.tgrt_question_prompt(t, topics[0]))) if topics else 0, QUESTION_TOKENS),
                (len(tok.encode(templates.topic_brainstorm_prompt(t, topics, NEW_TOPICS_PER_REQUEST))), TOPIC_TOKENS)]
        for n, budget in asks:
            refuse_overlong([(t.name, n)], window, budget, source="tgrt", what="the prompt for question type",
                            fix="give a larger --max_seq_len (the TGRT prompts need it)", note=view.note)


# --------------------------------------------------------------------------- ids and records


def _digest(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest()[:16]


def prompt_id(prefix: str, instruction: str, input: str = "") -> str:
    """Stable across reruns and machines: the prefix and a hash of the normalised prompt."""
    return f"{prefix}-{_digest(importers.prompt_key(instruction, input))}"


def _seed_records(method: str) -> list[dict]:
    if method == "tgrt":
        return [{"id": prompt_id("tgrt-seed", s.question), "instruction": s.question, "input": "",
                 "source": "tgrt-seed", "topic": s.topic, "question_type": t.name}
                for t in templates.load_question_types() for s in t.seeds]
    return [{"id": prompt_id("self-instruct-seed", t["instruction"], t["input"]), "instruction": t["instruction"],
             "input": t["input"], "source": "self-instruct-seed"} for t in templates.load_seed_tasks()]


def _state_path(output: str) -> Path:
    return Path(f"{output}.state.json")


def _open_output(output: str, overwrite: bool, allowed_sources: set[str], method: str, settings: dict,
                 inputs: Optional[list[dict]] = None):
    """The writer (validating and repairing the existing output) and the records already in it.
    A resume of records made with other settings (or, for import, rows since changed) is refused."""
    writer = records.open_output(output, overwrite=overwrite)  # --overwrite moves the state file too
    existing = records.read_kind(output, "prompts")
    foreign = sorted({r["source"] for r in existing} - allowed_sources)
    try:
        if foreign:
            raise ValueError(f"{output} already holds {', '.join(foreign)} prompts: write {method} prompts to "
                             "another --output (concatenate the files later), or pass --overwrite")
        records.check_fingerprint(output, settings, inputs, writer.done_ids, input_name="--sources")
    except ValueError:
        writer.close()
        raise
    records.write_fingerprint(output, settings, inputs)
    return writer, existing


# What may change between runs that add to one output: where it goes, and how far it goes (a
# rerun with a larger --num_prompts or --max_rounds continues; seeds can be added later).
_RESUMABLE = ("output", "overwrite", "num_prompts", "max_rounds", "include_seeds", "model_parallel_size", "dtype")


# --------------------------------------------------------------------------- import (no model)


def _import(o: dict) -> None:
    prompts, stats = importers.collect(o["sources"], min_chars=o["min_chars"], max_chars=o["max_chars"],
                                       per_source=o["per_source"], seed=o["seed"], progress=True)
    if o["num_prompts"] is not None and len(prompts) > o["num_prompts"]:
        picked = sorted(random.Random(f"{o['seed']}:all").sample(range(len(prompts)), o["num_prompts"]))
        prompts = [prompts[i] for i in picked]
    print(f"import: {stats.summary()}", file=sys.stderr)
    rows = [{"id": prompt_id(p.source, p.instruction, p.input), "instruction": p.instruction, "input": p.input,
             "source": p.source, "source_id": p.source_id} for p in prompts]
    # An imported record is its source row, and its id a hash of its text: records imported with
    # other sources, filters or samples do not differ in kind, so they may share an output (a
    # subsample adds nothing to its superset). Only the method is fingerprinted.
    writer, _ = _open_output(o["output"], o["overwrite"], set(importers.SOURCES), "import", {"method": "import"})
    with writer:
        todo = records.pending(rows, writer.done_ids)
        print(records.resume_message(o["output"], len(rows), len(todo)), file=sys.stderr)
        for row in tqdm(todo, desc="write", unit="rec", disable=not todo, file=sys.stderr):
            writer.write(row)
    if todo:
        records.write_provenance(o["output"], command=sys.argv, options=o, model=None,
                                 extra={"import": {"rows": dict(stats.rows), "kept": dict(stats.kept),
                                                   "skipped": {f"{s}:{r}": n for (s, r), n in stats.skipped.items()}}})


# --------------------------------------------------------------------------- generation rounds


@dataclass
class _Request:
    key: str  # the request's sampling seed derives from it, so it samples the same text anywhere
    prompt: str
    kind: Literal["topics", "question", "tasks"]
    family: str  # requests of one family share their prompt's prefix: batched together
    meta: dict = field(default_factory=dict)


@dataclass
class _Run:
    """What a generating run knows between rounds. Rank 0 holds the writer and the filters; the
    other ranks hold only `state`, which rank 0 broadcasts after every round."""

    options: dict
    state: dict  # JSON: method, rounds_done, kept, and for tgrt topics, cursors, kept_per_type
    writer: Any = None
    seen: set = field(default_factory=set)  # tgrt: dedupe keys of seeds and kept questions
    index: Optional[filters.RougeLIndex] = None  # self-instruct: seed and kept instructions
    stats: Counter = field(default_factory=Counter)
    written: int = 0

    @classmethod
    def follower(cls, options: dict, summary: dict) -> "_Run":
        return cls(options, summary["state"])

    # ------------------------------------------------------------------ start (rank 0)

    def summary(self) -> dict:
        o, s = self.options, self.state
        target = o["num_prompts"]
        if s["kept"] >= target:
            message = f"{o['output']}: all {target} prompts already done; nothing to do (use --overwrite to redo)"
            return {"finished": True, "message": message, "state": s}
        if s["rounds_done"] >= o["max_rounds"]:
            message = (f"{o['output']}: {s['kept']} of {target} prompts after {s['rounds_done']} rounds, the "
                       "--max_rounds limit; raise --max_rounds to continue")
            return {"finished": True, "message": message, "state": s}
        return {"finished": False, "message": "", "state": s}

    def generate(self, engine: Engine, world: distributed.World, model_name: str) -> None:
        o, started = self.options, time.time()
        bar = None
        if world.is_main:
            print(f"{o['output']}: {self.state['kept']} of {o['num_prompts']} prompts done; generating", file=sys.stderr)
            bar = tqdm(total=o["num_prompts"], initial=self.state["kept"], desc=f"generate-prompts {o['method']}",
                       unit="prompt", dynamic_ncols=True, file=sys.stderr)
        try:
            while not self.summary()["finished"]:
                requests = self._requests()
                texts = _run_requests(engine, requests, o, world)
                if world.is_main:
                    before = self.state["kept"]
                    self._accept(requests, texts)
                    self.state["rounds_done"] += 1
                    _write_state(o["output"], self.state)
                    bar.update(self.state["kept"] - before)
                    bar.set_postfix_str(f"round {self.state['rounds_done']}, {self.stats['candidates']} candidates")
                self.state = distributed.broadcast_object(self.state)
        finally:
            if bar is not None:
                bar.close()
            if self.writer is not None:
                self.writer.close()
        if world.is_main:
            self._finish(model_name, time.time() - started, world)

    def _finish(self, model_name: str, seconds: float, world: distributed.World) -> None:
        o, s = self.options, self.state
        rejected = {k.removeprefix("rejected:"): v for k, v in sorted(self.stats.items()) if k.startswith("rejected:")}
        print(f"{o['output']}: wrote {self.written} records ({s['kept']} of {o['num_prompts']} generated prompts "
              f"after {s['rounds_done']} rounds); {self.stats['candidates']} candidates from "
              f"{self.stats['requests']} requests, rejected: {rejected or 'none'}", file=sys.stderr)
        if s["kept"] < o["num_prompts"]:
            print(f"{o['output']}: stopped at --max_rounds {o['max_rounds']}; raise it to continue", file=sys.stderr)
        if self.written:
            extra = {"world_size": world.world_size, "model_parallel_size": world.mp_size,
                     "seconds": round(seconds, 2), "counts": dict(self.stats), "rounds_done": s["rounds_done"]}
            if o["method"] == "tgrt":
                extra["topics_per_type"] = {t: len(v) for t, v in s["topics"].items()}
            records.write_provenance(o["output"], command=sys.argv, options=o, model=model_name, extra=extra)

    def _write(self, record: dict) -> None:
        self.writer.write(record)
        self.written += 1

    # ------------------------------------------------------------------ per method: requests, filters

    def _requests(self) -> list[_Request]:
        return _tgrt_requests(self) if self.options["method"] == "tgrt" else _self_instruct_requests(self)

    def _accept(self, requests: list[_Request], texts: list[tuple[str, str]]) -> None:
        self.stats["requests"] += len(requests)
        self.state["requests"] = self.state.get("requests", 0) + sum(r.kind != "topics" for r in requests)
        if self.options["method"] == "tgrt":
            _tgrt_accept(self, requests, texts)
        else:
            _self_instruct_accept(self, requests, texts)


def _open_run(o: dict) -> _Run:
    method = o["method"]
    writer, existing = _open_output(o["output"], o["overwrite"], {method, SEED_SOURCE[method]}, method,
                                    model_settings(o, ignore=_RESUMABLE))
    generated = [r for r in existing if r["source"] == method]
    state = _read_state(o["output"], method) or {"method": method, "rounds_done": 0}
    state["kept"] = len(generated)
    run = _Run(o, state, writer)
    if o["include_seeds"]:
        for record in records.pending(_seed_records(method), writer.done_ids):
            run._write(record)
    if method == "tgrt":
        types = templates.load_question_types()
        state.setdefault("topics", {t.name: list(t.topics) for t in types})
        state.setdefault("cursors", {t.name: 0 for t in types})
        state["kept_per_type"] = dict(Counter(r.get("question_type", "") for r in generated))
        run.seen = {filters.dedupe_key(s.question) for t in types for s in t.seeds}
        run.seen |= {filters.dedupe_key(r["instruction"]) for r in generated}
    else:
        run.index = filters.RougeLIndex(t["instruction"] for t in templates.load_seed_tasks())
        for r in generated:
            run.index.add(r["instruction"])
    return run


def _read_state(output: str, method: str) -> Optional[dict]:
    path = _state_path(output)
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); delete it to restart the rounds") from None
    if not isinstance(state, dict) or state.get("method") != method or not isinstance(state.get("rounds_done"), int):
        raise ValueError(f"{path}: not a {method} state file; delete it (or pass --overwrite)")
    return state


def _write_state(output: str, state: dict) -> None:
    # Written after the round's records, so a crash in between only makes the rerun redo a round
    # whose already written records are then dropped as duplicates. Temp file + rename: a kill
    # leaves the old state or the new one.
    path = _state_path(output)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(state, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _run_requests(engine: Engine, requests: list[_Request], o: dict,
                  world: distributed.World) -> list[tuple[str, str]]:
    """(text, finish reason) of every request, generated by the data-parallel groups in shares
    (continuous batching, max_batch_size in flight); every rank gets all of them."""
    budgets = {"topics": TOPIC_TOKENS, "question": QUESTION_TOKENS, "tasks": TASK_TOKENS * o["tasks_per_request"]}
    params: dict[tuple, SamplingParams] = {}  # one object per kind of request: sampled together

    def request(i: int) -> Request:
        r = requests[i]
        p = params.setdefault((r.kind, _stops(r)), SamplingParams(
            max_new_tokens=budgets[r.kind], temperature=o["temperature"], top_p=o["top_p"], stop=_stops(r)))
        return Request(r.prompt, p, seed=row_seed(o["seed"], r.key), key=i)

    texts: dict[int, tuple[str, str]] = {}
    mine = (request(i) for i in range(world.dp_rank, len(requests), world.dp_size))
    for done in Scheduler(engine, max_in_flight=o["max_batch_size"]).run(mine):
        texts[done.key] = (done.result.text, done.result.finish_reason)
    if world.world_size > 1:
        import torch.distributed as dist

        gathered: list = [None] * world.world_size
        dist.all_gather_object(gathered, texts if world.is_group_writer else {})
        for part in gathered:
            texts.update(part)
    return [texts[i] for i in range(len(requests))]


def _stops(request: _Request) -> tuple[str, ...]:
    if request.kind == "tasks":
        return (f"{request.meta['next']}. Instruction",)  # the model starts a task we did not ask for
    # A topic list ends at a blank line. A question is one line, written on the "Question:" line
    # as in the examples, so it ends at the first newline (a model that breaks the line first
    # gets an empty text, which the parser rejects, rather than 80 tokens of rambling).
    return ("\n\n",) if request.kind == "topics" else ("\n",)


def _requests_needed(state: dict, target: int, first_guess: float) -> int:
    """Requests for what is missing, at the yield (kept prompts per request) seen so far: a model
    whose outputs the filters mostly reject gets more requests per round, up to the round's cap."""
    made = state.get("requests", 0)
    rate = state["kept"] / made if made else first_guess
    return math.ceil((target - state["kept"]) / max(rate, 1e-6))


# --------------------------------------------------------------------------- tgrt


def _tgrt_requests(run: _Run) -> list[_Request]:
    o, s = run.options, run.state
    types = templates.load_question_types()
    rnd = s["rounds_done"]
    requests: list[_Request] = []
    if rnd < o["topic_rounds"]:
        for t in types:
            if len(s["topics"][t.name]) < o["topics_per_type"]:
                topics = s["topics"][t.name]
                shown = topics if len(topics) <= TOPICS_SHOWN else \
                    random.Random(row_seed(o["seed"], f"tgrt/shown/{t.name}/{rnd}")).sample(topics, TOPICS_SHOWN)
                prompt = templates.topic_brainstorm_prompt(t, shown, NEW_TOPICS_PER_REQUEST)
                requests.append(_Request(f"tgrt/topics/{t.name}/{rnd}", prompt, "topics", t.name, {"type": t.name}))
    per_type = min(o["max_batch_size"], math.ceil(_requests_needed(s, o["num_prompts"], 0.5) / len(types)))
    for t in (t for t in types if s["topics"][t.name]):
        topics, cursor = s["topics"][t.name], s["cursors"][t.name]
        for k in range(cursor, cursor + per_type):
            topic, attempt = topics[k % len(topics)], k // len(topics)
            requests.append(_Request(f"tgrt/question/{t.name}/{topic}/{attempt}",
                                     templates.tgrt_question_prompt(t, topic), "question", t.name,
                                     {"type": t.name, "topic": topic}))
        s["cursors"][t.name] = cursor + per_type
    return requests


def _tgrt_accept(run: _Run, requests: list[_Request], texts: list[tuple[str, str]]) -> None:
    s, stats = run.state, run.stats
    candidates: dict[str, list[tuple[str, str]]] = {}  # type -> [(topic, question)] in request order
    for request, (text, _) in zip(requests, texts):
        qtype = request.meta["type"]
        if request.kind == "topics":
            known = {t.casefold() for t in s["topics"][qtype]}
            new = [t for t in templates.parse_topics(text) if t.casefold() not in known]
            s["topics"][qtype] += new
            stats["new_topics"] += len(new)
            continue
        stats["candidates"] += 1
        question = templates.parse_tgrt_question(text, request.meta["topic"])
        if question is None:
            stats["rejected:not_a_question_about_the_topic"] += 1
            continue
        candidates.setdefault(qtype, []).append((request.meta["topic"], question))
    # Balance the types: the type with the fewest kept questions takes the next candidate.
    per_type = s["kept_per_type"]
    order = [t.name for t in templates.load_question_types()]
    while s["kept"] < run.options["num_prompts"] and any(candidates.values()):
        qtype = min((t for t in order if candidates.get(t)), key=lambda t: per_type.get(t, 0))
        topic, question = candidates[qtype].pop(0)
        key = filters.dedupe_key(question)
        if key in run.seen:
            stats["rejected:duplicate"] += 1
            continue
        run.seen.add(key)
        run._write({"id": prompt_id("tgrt", question), "instruction": question, "input": "", "source": "tgrt",
                    "topic": topic, "question_type": qtype})
        per_type[qtype] = per_type.get(qtype, 0) + 1
        s["kept"] += 1
    stats["rejected:over_quota"] += sum(len(v) for v in candidates.values())


# --------------------------------------------------------------------------- self-instruct


def _self_instruct_requests(run: _Run) -> list[_Request]:
    o, rnd = run.options, run.state["rounds_done"]
    seeds = templates.load_seed_tasks()
    n = min(8 * o["max_batch_size"], _requests_needed(run.state, o["num_prompts"], o["tasks_per_request"] / 2))
    requests = []
    for i in range(n):
        key = f"self-instruct/{rnd}/{i}"
        shown = random.Random(row_seed(o["seed"], key + "/seeds")).sample(seeds, o["seeds_per_request"])
        prompt = templates.self_instruct_prompt(shown, o["tasks_per_request"])
        # All requests share the prompt's header: one family, so their batches reuse its cache.
        requests.append(_Request(key, prompt, "tasks", "self-instruct",
                                 {"next": o["seeds_per_request"] + o["tasks_per_request"] + 1}))
    return requests


def _self_instruct_accept(run: _Run, requests: list[_Request], texts: list[tuple[str, str]]) -> None:
    o, s, stats, index = run.options, run.state, run.stats, run.index
    check = filters.InstructionFilter(o["min_words"], o["max_words"])
    for text, finish_reason in texts:
        for task in _parse_tasks(text, finish_reason):
            if s["kept"] >= o["num_prompts"]:
                stats["rejected:over_quota"] += 1
                continue
            stats["candidates"] += 1
            reason = check.reject_reason(task["instruction"])
            scores = None
            if reason is None:
                scores = index.scores(task["instruction"])
                if len(scores) and scores.max() > o["similarity_threshold"]:
                    reason = "too_similar"
            if reason is not None:
                stats[f"rejected:{reason.split(':')[0]}"] += 1
                continue
            best = int(scores.argmax()) if len(scores) else None
            run._write({"id": prompt_id("self-instruct", task["instruction"], task["input"]),
                        "instruction": task["instruction"], "input": task["input"], "source": "self-instruct",
                        "avg_similarity": round(float(scores.mean()), 4) if len(scores) else 0.0,
                        "max_similarity": round(float(scores[best]), 4) if best is not None else 0.0,
                        "most_similar": index.texts[best] if best is not None else ""})
            index.add(task["instruction"])
            s["kept"] += 1


def _parse_tasks(text: str, finish_reason: str) -> list[templates.NewTask]:
    """templates.parse_self_instruct, plus the last instruction when the model ended the list
    (end of text, or the next number) right after it: it was finished, and it has no input. The
    parser cannot tell that apart from an instruction cut off by the length limit; we can."""
    # No word limit in the parser: the instruction filter counts what it rejects.
    tasks = templates.parse_self_instruct(text, max_instruction_words=sys.maxsize)
    if finish_reason == "length":
        return tasks
    closed = templates.parse_self_instruct(f"{text.rstrip()}\nInput: {templates.NO_INPUT}", sys.maxsize)
    return closed if len(closed) > len(tasks) else tasks
