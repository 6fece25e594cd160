"""dromedary pipeline: the whole recipe in one command, every stage's output in one work directory.

generate-prompts -> self-align -> curate -> finetune [-> verbose-clone -> finetune] [-> preferences ->
reward-model -> dpo or rl] -> a sample chat turn [-> evaluations]. Stages are called through the
command table (stages never import each other), in this process, so the pipeline runs under
torchrun exactly like each stage does. A rerun skips the stages that DIR/pipeline_state.json marks
done and resumes the first unfinished one (record stages skip the ids already written; the training
stages continue from their last checkpoint). A stage whose input an earlier stage of this run
rewrote starts afresh where resuming would mix: the training stages after any earlier stage ran
again, verbose-clone, preferences and evaluate after a new adapter (the old outputs are kept in
OUTPUT.bak-TIME, evaluate's in items.jsonl.bak).

Stages may be added to a finished work directory (--verbose_clone, --salmon, --evaluate): they only
append. The options that must stay the same are kept in the state; --policy joins them when a run
first plans the SALMON stages, and a later --policy is refused while policy/ or eval_policy/ hold the
other one's output (move them aside to switch: the preferences and the reward model are kept).
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import io
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import torch.distributed as dist

from .. import cli, distributed, records
from ..engine.backends import check_backend
from ..recipe import templates

Method = Literal["tgrt", "self-instruct", "import"]
Policy = Literal["dpo", "rl"]
STATE_FILE = "pipeline_state.json"
STATE_VERSION = 1
SAMPLE_QUESTION = "What are three things to know before riding a camel?"

# Flags for the embedded tiny default model (no --ckpt_dir): small enough that the whole pipeline
# runs in a few minutes on two CPU cores, large enough that every stage writes something. With a
# real checkpoint the stages' own defaults apply, except --num_prompts (REAL_NUM_PROMPTS).
TINY_NUM_PROMPTS = 32
REAL_NUM_PROMPTS = 2000
TINY_FLAGS: dict[str, dict[str, Any]] = {
    # The tiny model rarely writes a usable question, so the 60 human-written seed questions come
    # too, and the rounds are few.
    "generate-prompts": {"include_seeds": True, "max_rounds": 2, "topic_rounds": 1, "max_batch_size": 4},
    "self-align": {"max_new_tokens": 160, "max_batch_size": 16},
    "finetune": {"max_steps": 24, "batch_size": 8, "micro_batch_size": 4, "source_max_len": 256,
                 "target_max_len": 128, "learning_rate": 1e-3, "save_steps": 8},
    "verbose-clone": {"max_new_tokens": 160, "max_batch_size": 16, "min_words": 3},
    "chat": {"max_new_tokens": 48},
    "preferences": {"max_new_tokens": 48, "max_batch_size": 16, "min_words": 1},
    "reward-model": {"max_steps": 16, "batch_size": 8, "micro_batch_size": 4, "learning_rate": 1e-3, "max_len": 512,
                     "save_steps": 8},
    # A few policy steps: enough to write, resume and stack an adapter, not to optimise anything.
    "dpo": {"max_steps": 4, "batch_size": 4, "micro_batch_size": 2, "source_max_len": 256, "target_max_len": 64,
            "learning_rate": 1e-3, "save_steps": 2, "eval_steps": 0},
    "rl": {"max_steps": 2, "batch_size": 4, "mini_batch_size": 4, "micro_batch_size": 2, "ppo_epochs": 1,
           "max_new_tokens": 48, "source_max_len": 256, "learning_rate": 1e-4, "save_steps": 1},
}
# Options of stages that a later run may add (--salmon's --policy): absent from the state until a
# run first plans those stages, then kept like the others.
LATE_KEYS = ("policy",)
POLICY_OUTPUTS = ("policy", "eval_policy")


@dataclass
class _Stage:
    name: str  # the state key, and what the table shows
    command: str  # the name in the command table
    output: str  # relative to the work directory; a directory ends with "/"
    flags: dict
    count_in: Optional[str] = None  # the records file whose size is "records in"
    rank0_only: bool = False  # no model and no collectives: one process does it
    extra_outputs: list = field(default_factory=list)


def pipeline(
    workdir: str,
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    method: Method = "tgrt",
    num_prompts: Optional[int] = None,
    sources: Optional[dict] = None,
    verbose_clone: bool = False,
    salmon: bool = False,
    policy: Policy = "dpo",
    assistant_name: str = templates.DEFAULT_ASSISTANT_NAME,
    sample_question: str = SAMPLE_QUESTION,
    stage_flags: Optional[dict] = None,
    model_parallel_size: Optional[int] = None,
    dtype: Optional[str] = None,
    seed: int = 0,
    max_seq_len: Optional[int] = None,
    evaluate: bool = False,
    eval_data: Optional[dict] = None,
    eval_protocol: str = "lm-eval",
    backend: str = "our",
) -> None:
    """Run the whole recipe into WORKDIR: prompts, self-align, curate, finetune (principle engraving),
    optionally verbose-clone and a second finetune, optionally SALMON (preferences, reward model,
    policy optimisation), and one sample chat turn; then print a table.

    Outputs, under stable names: prompts.jsonl, self_align.jsonl, sft.jsonl, rejected.jsonl,
    adapter/, with --verbose_clone verbose.jsonl, verbose_rejected.jsonl and adapter_verbose/, with
    --salmon preferences.jsonl, reward_model/ and policy/, with --evaluate eval_base/,
    eval_engraved/ (and eval_policy/); sample_chat.jsonl holds the sample turn,
    pipeline_state.json what is done. Rerunning the same command skips finished stages and resumes
    an interrupted one. Under torchrun every stage runs with the same model-parallel size (data
    parallelism takes the rest of the world).

    Without --ckpt_dir the embedded tiny model runs with small settings so that everything finishes
    in minutes on a laptop: 32 generated prompts plus the 60 human-written seed questions (tgrt),
    24 finetune steps of 8 records, 160-token generations, 4 dpo steps of 4 pairs (rl: 2 steps of
    4 rollouts). With --ckpt_dir the stages use their own defaults (one finetune epoch, 512-token
    generations) and --num_prompts defaults to 2000, a pilot-sized run (the Dromedary paper used
    about 360k prompts).

    Args:
      workdir: the directory for every output (created if missing).
      ckpt_dir: the base LLaMA checkpoint, Meta or HF layout. Default: the embedded tiny model, with tiny settings.
      tokenizer_path: tokenizer.json or tokenizer.model (SentencePiece or tiktoken). Default: CKPT_DIR's own.
      method: how prompts are made: tgrt (topic-guided red-teaming), self-instruct, or import (with --sources).
      num_prompts: prompts to generate (import: a sample of this many; default all). Default: 32 on the embedded model, 2000 with --ckpt_dir.
      sources: for --method import: {source: path or dataset}, see `dromedary generate-prompts --help`.
      verbose_clone: also run verbose cloning: the engraved model answers every sft record in detail, and a second adapter (adapter_verbose/) is trained on those answers, on the base model.
      salmon: after engraving, run Dromedary-2's SALMON stages: preferences (two answers per prompt from the engraved model, judged on every reward principle: preferences.jsonl), reward-model (an instructable reward model trained on them: reward_model/) and the policy optimisation of --policy (policy/, an adapter for the plain base that includes the engraving); the sample chat turn then uses policy/.
      policy: with --salmon (refused without it), how the engraved model is optimised into policy/: dpo (`dromedary dpo` on preferences.jsonl directly) or rl (`dromedary rl`: PPO on prompts.jsonl against reward_model/). Fixed for WORKDIR once policy/ holds its output (another is refused); to switch, move WORKDIR/policy (and eval_policy) aside.
      assistant_name: the assistant's public name (curate renames the self-align codename to it; finetune and chat use it).
      sample_question: the question of the final sample chat turn.
      stage_flags: extra flags per stage, e.g. --stage_flags '{"self-align": {"max_new_tokens": 384}, "finetune": {"learning_rate": 1e-4}}' (stages: generate-prompts, self-align, curate, finetune, verbose-clone, finetune-verbose, preferences, reward-model, dpo, rl, chat, evaluate-base, evaluate-engraved, evaluate-policy).
      model_parallel_size: processes sharing one model copy in every stage. Default: the whole world.
      dtype: fp32, bf16 or fp16 for the model-running stages (finetune refuses fp16). Default: bf16 on GPUs that support it, fp32 on CPU.
      seed: passed to every stage.
      max_seq_len: context window for the generating stages (generate-prompts, self-align, verbose-clone, chat); finetune sizes its own from its length flags. Default: the checkpoint's.
      evaluate: at the end, evaluate the base model (eval_base/) and the engraved one (eval_engraved/) with `dromedary evaluate` and print both side by side; with --salmon also the optimised one (eval_policy/), the three side by side.
      eval_data: the benchmarks for --evaluate, as `dromedary evaluate --data` takes them, e.g. '{"truthfulqa": PATH, "hhh": PATH}'. Default: the hub names (needs the network).
      eval_protocol: lm-eval or dromedary, as `dromedary evaluate --protocol`.
      backend: the engine of the stages that generate with one model (generate-prompts, self-align, verbose-clone): our (this package's, under torchrun) or vllm (one process; vLLM's tensor parallelism over MODEL_PARALLEL_SIZE GPUs; needs pip install 'dromedary[vllm]'). Same records either way, so a work directory may switch between runs. The training stages, preferences, chat and evaluate run on ours.
    """
    stages, key = _plan(locals())
    work = Path(workdir)
    world = distributed.setup(model_parallel_size)  # the stages join this world
    # Ranks wait here while rank 0 works alone (curate can take a while on a big run): a gloo group
    # with a long timeout, so that NCCL's watchdog does not end the waiting ranks.
    waiting = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=1)) if world.world_size > 1 else None

    def load() -> dict:
        work.mkdir(parents=True, exist_ok=True)
        return _load_state(work, key)  # a different run in WORKDIR stops here, before any model work

    state = _on_rank0(load, world, waiting)
    if any(s.command == "rl" for s in stages):
        _command("rl")  # an installation without it stops here, before any stage starts

    rows = []
    rerun_from = None
    for number, stage in enumerate(stages, start=1):
        done = state["stages"].get(stage.name)
        if rerun_from is None and done and _exists(work / stage.output):
            _say(world, f"pipeline [{number}/{len(stages)}] {stage.name}: done earlier, skipping ({stage.output})")
            rows.append(_row(stage, work, done["seconds"], skipped=True))
            continue
        rerun_from = rerun_from or stage.name  # later stages must see this stage's new output
        if stage.command == "chat" and world.dp_size > 1:
            _say(world, f"pipeline [{number}/{len(stages)}] chat: skipped, it needs one model copy "
                        f"(--model_parallel_size = world size); try `dromedary chat --adapter {work / stage.flags['adapter']}`")
            continue
        _say(world, f"pipeline [{number}/{len(stages)}] {stage.name} -> {work / stage.output}")
        started = time.time()
        _run(_afresh_if_inputs_changed(stage, stages[: number - 1], rerun_from), work, world, waiting)
        seconds = round(time.time() - started, 1)
        distributed.barrier()
        if world.is_main:
            state["stages"][stage.name] = {"seconds": seconds, "finished": _now()}
            for later in stages[number:]:
                state["stages"].pop(later.name, None)
            _write_state(work, state)
        rows.append(_row(stage, work, seconds, skipped=False))
        gc.collect()  # the stage's model goes before the next one loads
        if rows[-1][2] == "0" and number < len(stages):
            raise ValueError(f"{stage.name} wrote no records to {work / stage.output} (its messages above say why); "
                             "the next stages have nothing to work on")
    if world.is_main:
        print(_table(rows, work), flush=True)


# ---------------------------------------------------------------------------------------------
# The plan: which stages, with which flags
# ---------------------------------------------------------------------------------------------


def _plan(o: dict) -> tuple[list[_Stage], dict]:
    tiny = o["ckpt_dir"] is None
    num_prompts = o["num_prompts"]
    if num_prompts is None and o["method"] != "import":
        num_prompts = TINY_NUM_PROMPTS if tiny else REAL_NUM_PROMPTS
    if num_prompts is not None and num_prompts < 1:
        raise ValueError(f"--num_prompts must be at least 1, got {num_prompts}")
    if (o["method"] == "import") != bool(o["sources"]):
        raise ValueError("--sources goes with --method import (and --method import needs --sources)")
    extra = _json_literals(o["stage_flags"] or {})
    names = {"generate-prompts", "self-align", "curate", "finetune", "verbose-clone", "finetune-verbose", "chat",
             "evaluate-base", "evaluate-engraved", "evaluate-policy", "preferences", "reward-model", "dpo", "rl"}
    policy = o.get("policy", "dpo")
    if policy not in ("dpo", "rl"):
        raise ValueError(f"--policy must be dpo or rl, got {policy!r}")
    if policy != "dpo" and not o.get("salmon"):
        raise ValueError(f"--policy {policy} chooses how --salmon optimises the engraved model: add --salmon")
    if not isinstance(extra, dict) or set(extra) - names or not all(isinstance(v, dict) for v in extra.values()):
        raise ValueError(f"--stage_flags must be a JSON object {{stage: {{flag: value}}}} with stages among "
                         f"{', '.join(sorted(names))}")
    model = {"ckpt_dir": o["ckpt_dir"], "tokenizer_path": o["tokenizer_path"],
             "model_parallel_size": o["model_parallel_size"], "dtype": o["dtype"], "seed": o["seed"]}
    name = o["assistant_name"]
    window = {"max_seq_len": o.get("max_seq_len")}  # the generating stages; finetune sizes its own
    backend = o.get("backend", "our")
    check_backend(backend)
    # Named only when it is not the default, so the flags of earlier work directories stay as they were.
    engine = {"backend": backend} if backend != "our" else {}

    def flags(stage: str, command: str, base: dict) -> dict:
        preset = TINY_FLAGS.get(command, {}) if tiny and not (command == "generate-prompts" and o["method"] == "import") else {}
        return {**preset, **base, **extra.get(stage, {})}

    prompts = {"method": o["method"], "output": "prompts.jsonl", "num_prompts": num_prompts, **model, **window,
               **engine}
    if o["sources"]:
        prompts["sources"] = o["sources"]
    stages = [
        _Stage("generate-prompts", "generate-prompts", "prompts.jsonl", flags("generate-prompts", "generate-prompts", prompts)),
        _Stage("self-align", "self-align", "self_align.jsonl",
               flags("self-align", "self-align", {"input": "prompts.jsonl", "output": "self_align.jsonl", **model,
                                                  **window, **engine}),
               count_in="prompts.jsonl"),
        _Stage("curate", "curate", "sft.jsonl",
               flags("curate", "curate", {"input": "self_align.jsonl", "output": "sft.jsonl",
                                          "rejected": "rejected.jsonl", "assistant_name": name}),
               count_in="self_align.jsonl", rank0_only=True, extra_outputs=["rejected.jsonl"]),
        _Stage("finetune", "finetune", "adapter/",
               flags("finetune", "finetune", {"input": "sft.jsonl", "output_dir": "adapter", "resume": True,
                                              "assistant_name": name, **model}),
               count_in="sft.jsonl"),
    ]
    final_adapter = "adapter"
    if o["verbose_clone"]:
        stages += [
            _Stage("verbose-clone", "verbose-clone", "verbose.jsonl",
                   flags("verbose-clone", "verbose-clone", {"input": "sft.jsonl", "output": "verbose.jsonl",
                                                            "rejected": "verbose_rejected.jsonl", "adapter": "adapter",
                                                            "assistant_name": name, **model, **window, **engine}),
                   count_in="sft.jsonl", extra_outputs=["verbose_rejected.jsonl"]),
            # Verbose cloning trains a fresh adapter on the base model, as in the Dromedary recipe.
            _Stage("finetune-verbose", "finetune", "adapter_verbose/",
                   flags("finetune-verbose", "finetune", {"input": "verbose.jsonl", "output_dir": "adapter_verbose",
                                                          "resume": True, "assistant_name": name, **model}),
                   count_in="verbose.jsonl"),
        ]
        final_adapter = "adapter_verbose"
    if o.get("salmon"):
        stages += [
            _Stage("preferences", "preferences", "preferences.jsonl",
                   flags("preferences", "preferences", {"input": "prompts.jsonl", "output": "preferences.jsonl",
                                                        "adapter": final_adapter, "assistant_name": name,
                                                        **model, **window}),
                   count_in="prompts.jsonl"),
            _Stage("reward-model", "reward-model", "reward_model/",
                   flags("reward-model", "reward-model", {"input": "preferences.jsonl", "output_dir": "reward_model",
                                                          "adapter": final_adapter, "resume": True, **model}),
                   count_in="preferences.jsonl"),
        ]
        # The policy starts from the engraved model; policy/ is an adapter for the plain base that
        # includes the engraving (both stages stack it), so chat and evaluate take it alone.
        if policy == "dpo":
            stages.append(_Stage("dpo", "dpo", "policy/",
                                 flags("dpo", "dpo", {"input": "preferences.jsonl", "output_dir": "policy",
                                                      "adapter": final_adapter, "resume": True, "assistant_name": name,
                                                      **model}),
                                 count_in="preferences.jsonl"))
        else:
            stages.append(_Stage("rl", "rl", "policy/",
                                 flags("rl", "rl", {"input": "prompts.jsonl", "rm": "reward_model", "output_dir": "policy",
                                                    "adapter": final_adapter, "resume": True, "assistant_name": name,
                                                    **model}),
                                 count_in="prompts.jsonl"))
    engraved = final_adapter
    if o.get("salmon"):
        final_adapter = "policy"
    chat = {"prompt": str(o["sample_question"]), "adapter": final_adapter, "assistant_name": name,
            **{k: v for k, v in model.items()}, **window}
    stages.append(_Stage("chat", "chat", "sample_chat.jsonl", flags("chat", "chat", chat)))
    if o.get("evaluate"):
        # The engraved run prints itself beside the base run (`evaluate --compare`).
        ev = {"protocol": o.get("eval_protocol", "lm-eval"), "data": o.get("eval_data"), **model}
        stages += [
            _Stage("evaluate-base", "evaluate", "eval_base/", flags("evaluate-base", "evaluate", {"output_dir": "eval_base", **ev})),
            _Stage("evaluate-engraved", "evaluate", "eval_engraved/",
                   flags("evaluate-engraved", "evaluate", {"output_dir": "eval_engraved", "adapter": engraved,
                                                            "assistant_name": name, "compare": "eval_base", **ev})),
        ]
        if o.get("salmon"):  # the three side by side: base, engraved, optimised
            stages.append(_Stage("evaluate-policy", "evaluate", "eval_policy/",
                                 flags("evaluate-policy", "evaluate",
                                       {"output_dir": "eval_policy", "adapter": "policy", "assistant_name": name,
                                        "compare": ["eval_base", "eval_engraved"], **ev})))
    for stage in stages:
        stage.flags = {k: v for k, v in stage.flags.items() if v is not None}
    # What must not change between the runs that share a work directory (--verbose_clone, --salmon
    # and --evaluate may be added later: they only append stages; --policy is a LATE_KEYS one).
    key = {"ckpt_dir": o["ckpt_dir"], "tokenizer_path": o["tokenizer_path"], "method": o["method"],
           "num_prompts": num_prompts, "sources": o["sources"], "assistant_name": name, "seed": o["seed"],
           "stage_flags": extra}
    if o.get("max_seq_len") is not None:  # absent from the key otherwise: earlier work directories still match
        key["max_seq_len"] = o["max_seq_len"]
    if o.get("salmon"):
        key["policy"] = policy
    return stages, key


def _json_literals(value: Any) -> Any:
    """Fire reads --stage_flags '{"x": true}' as Python, where true/false/null are bare words that
    become strings: give them their JSON meaning."""
    if isinstance(value, str) and value.strip().startswith("{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"--stage_flags is not valid JSON: {err.msg}") from None
    if isinstance(value, dict):
        return {k: _json_literals(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_literals(v) for v in value]
    return {"true": True, "false": False, "null": None}.get(value, value) if isinstance(value, str) else value


# ---------------------------------------------------------------------------------------------
# Running a stage
# ---------------------------------------------------------------------------------------------


_PATH_FLAGS = ("input", "output", "rejected", "output_dir", "adapter", "compare", "rm")


def _afresh_if_inputs_changed(stage: _Stage, earlier: list[_Stage], rerun_from: str) -> _Stage:
    """The stage with --overwrite instead of a resume where an earlier stage ran again in this run
    and may have rewritten what it reads: finetune's checkpoint was trained on the old sft.jsonl,
    verbose-clone's answers came from the old adapter. Record stages otherwise resume: their
    fingerprint keeps what each record was made from, and new input records are simply added."""
    names = [s.name for s in earlier]
    ran = names[names.index(rerun_from):] if rerun_from in names else []
    if not ran or "overwrite" in stage.flags:
        return stage
    if stage.command in ("finetune", "reward-model", "dpo", "rl") and stage.flags.get("resume") is True:
        return replace(stage, flags={**stage.flags, "resume": False, "overwrite": True})
    adapter = stage.flags.get("adapter")
    # evaluate too: its items were scored with the old adapter, which has the same path.
    if stage.command in ("verbose-clone", "preferences", "evaluate") and any(s.output == f"{adapter}/" for s in earlier if s.name in ran):
        return replace(stage, flags={**stage.flags, "overwrite": True})
    return stage


def _command(name: str) -> Callable:
    try:
        return cli.load(name)
    except (KeyError, ImportError) as err:
        if name != "rl":
            raise
        # `dromedary rl` comes with its own module; an installation without it can still run --policy dpo.
        raise ValueError(f"--policy rl needs the rl stage (dromedary.stages.rl), which this installation cannot "
                         f"load ({type(err).__name__}: {err}): use --policy dpo, or a dromedary that has "
                         "`dromedary rl`") from None


def _in_work(work: Path, value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_in_work(work, v) for v in value]
    return str(work / value) if isinstance(value, str) and not os.path.isabs(value) else value


def _run(stage: _Stage, work: Path, world: distributed.World, waiting) -> None:
    flags = {k: (_in_work(work, v) if k in _PATH_FLAGS else v) for k, v in stage.flags.items()}
    command = _command(stage.command)
    if stage.command == "chat":
        _sample_chat(command, flags, work / stage.output, world)
    elif stage.rank0_only:
        _on_rank0(lambda: command(**flags), world, waiting)
    else:
        command(**flags)


def _on_rank0(fn: Callable, world: distributed.World, group) -> Any:
    """fn() on rank 0 only; its result, or its error, reaches every rank."""
    result = error = None
    if world.is_main:
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
            error = err
    result, error = distributed.broadcast_object((result, error), src=0, group=group)
    if error is not None:
        raise error
    return result


def _sample_chat(command: Callable, flags: dict, output: Path, world: distributed.World) -> None:
    """The sample turn streams to the terminal like `dromedary chat --prompt` and is kept as a
    transcript (the /save format)."""
    answer = io.StringIO()
    if world.is_main:
        print(f"\nUser: {flags['prompt']}\n{flags['assistant_name']}: ", end="", flush=True)
    with contextlib.redirect_stdout(_Tee(sys.stdout, answer)) if world.is_main else contextlib.nullcontext():
        command(**flags)
    if world.is_main:
        turns = [{"id": "0", "role": "user", "content": flags["prompt"]},
                 {"id": "1", "role": "assistant", "content": answer.getvalue().strip()}]
        records.write_jsonl_atomic(output, turns, overwrite=True)


class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text: str) -> int:
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self) -> None:
        for s in self.streams:
            s.flush()


# ---------------------------------------------------------------------------------------------
# State and the summary table
# ---------------------------------------------------------------------------------------------


def _load_state(work: Path, key: dict) -> dict:
    path = work / STATE_FILE
    if not path.exists():
        state = {"version": STATE_VERSION, "options": key, "command": sys.argv, "stages": {}}
        _write_state(work, state)
        return state
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg}); move it aside to start the pipeline afresh") from None
    stored = state.setdefault("options", {})
    late = {k: key[k] for k in LATE_KEYS if k in key and k not in stored}
    changed = [k for k in key if k not in late and stored.get(k) != key[k]]
    # The old policy's outputs: its adapter, and the items evaluate scored with it (same path, so
    # evaluate would resume them).
    made = [str(work / name) for name in POLICY_OUTPUTS if _exists(work / name)]
    if "policy" in changed and not made:
        # Nothing was made with the old policy (a run stopped before it, or its outputs were moved
        # aside): take the new one.
        changed.remove("policy")
        state["stages"].pop(stored["policy"], None)
        late["policy"] = key["policy"]
    if changed == ["policy"]:
        old, new = stored["policy"], key["policy"]
        raise ValueError(f"{work} holds the output of --policy {old} ({', '.join(made)}): rerun with --policy {old}, "
                         f"use another --workdir, or move {' and '.join(made)} aside to optimise with --policy {new} "
                         "(the preferences and the reward model are kept)")
    if changed:
        was = ", ".join(f"--{k} {state['options'].get(k)!r}" for k in changed)
        raise ValueError(f"{work} holds a pipeline run with other options ({was}): rerun with those, use another "
                         f"--workdir, or delete {path} and the outputs to start afresh")
    if late:
        stored.update(late)
        _write_state(work, state)
    return state


def _write_state(work: Path, state: dict) -> None:
    # Atomic: a crash leaves the previous state, never half a file.
    fd, tmp = tempfile.mkstemp(dir=work, prefix=f".{STATE_FILE}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(state, f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, work / STATE_FILE)


def _exists(path: Path) -> bool:
    return any(path.iterdir()) if path.is_dir() else path.is_file()


def _count(path: Path) -> Optional[int]:
    return len(records.scan_done_ids(path)) if path.is_file() else None


def _row(stage: _Stage, work: Path, seconds: float, skipped: bool) -> list[str]:
    records_in = _fmt(_count(work / stage.count_in)) if stage.count_in else "-"
    if stage.command == "chat":  # one question, one answer (if it was not empty)
        turns = records.read_records(work / stage.output) if (work / stage.output).is_file() else []
        records_in, records_out = "1", str(sum(1 for t in turns if t["role"] == "assistant" and t["content"]))
    elif stage.output.endswith("/"):
        records_out = "-"  # an adapter
    else:
        records_out = _fmt(_count(work / stage.output))
    where = str(work / stage.output)
    for extra in stage.extra_outputs:
        n = _count(work / extra)
        if n is not None:
            where += f" (+{n} in {extra})"
    time_text = f"{seconds:.1f}s" + (" (earlier)" if skipped else "")
    return [stage.name, records_in, records_out, time_text, where]


def _fmt(n: Optional[int]) -> str:
    return "-" if n is None else str(n)


def _table(rows: list[list[str]], work: Path) -> str:
    header = ["stage", "records in", "records out", "time", "output"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    lines = ["", f"pipeline finished in {work}"]
    for r in [header, *rows]:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     + "  " + r[-1])
    return "\n".join(lines)


def _say(world: distributed.World, text: str) -> None:
    if world.is_main:
        print(text, file=sys.stderr, flush=True)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
