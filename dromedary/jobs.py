"""A record job: the resume / data-parallel / progress / provenance loop every record stage shares.

    records = read_kind(input, "prompts")                  # bad input stops here, before the model
    loaded = build(...)
    with RecordJob(output, records, loaded.world, overwrite=overwrite, options=opts, model=name) as job:
        for batch in job.batches(max_batch_size):          # this data-parallel group's pending share
            ...
            job.write(record); job.advance(tokens=n)

On exit rank 0 merges the groups' shard files into `output` (in input order) and records provenance.
Before anything is written the job checks that the records already in `output` were made from the
same input records and settings (records.check_fingerprint) and refuses a resume that would mix.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Iterator, Mapping, Optional, Sequence

from tqdm import tqdm

from . import distributed, records


def model_settings(options: Mapping[str, Any], *, ignore: Sequence[str] = records.RUN_ONLY, **extra: Any) -> dict:
    """The fingerprint settings of a model-running stage: its options, with the checkpoint,
    tokenizer and adapter paths replaced by digests of what they hold (records.path_identity)."""
    from .engine.builder import resolve_ckpt_dir  # the embedded default resolves to its directory

    rest = {k: v for k, v in options.items() if k not in ("ckpt_dir", "tokenizer_path", "adapter")}
    return records.fingerprint_settings(
        rest, ignore=ignore, model=records.path_identity(resolve_ckpt_dir(options.get("ckpt_dir"))),
        tokenizer=records.path_identity(options.get("tokenizer_path")),
        adapter=records.path_identity(options.get("adapter")), **extra)


def check_resume(output: str, inputs: Sequence[Mapping[str, Any]], options: Mapping[str, Any],
                 fingerprint: Optional[dict] = None, also_done: Sequence[Optional[str]] = ()) -> None:
    """check_fingerprint for a model stage, before its model loads: refuses a resume of OUTPUT
    (and of the other outputs in `also_done`, e.g. a rejected file) made differently."""
    done = set().union(*(records.scan_done_ids(p) for p in (output, *also_done) if p))
    if done:
        records.check_fingerprint(output, model_settings(options, **(fingerprint or {})), inputs, done,
                                  input_name=str(options.get("input", "the input")))


def already_done(output: str, inputs: Sequence[Mapping[str, Any]], overwrite: bool,
                 options: Optional[Mapping[str, Any]] = None, fingerprint: Optional[dict] = None) -> bool:
    """True (and says so) when OUTPUT already holds every input id: checked before loading a model,
    which can take minutes. With `options`, a resume that would mix records made differently is
    refused here too (check_resume). Every rank reads the same files, so every rank agrees."""
    if overwrite:
        return False
    if options is not None:
        check_resume(output, inputs, options, fingerprint)
    if records.shard_files(output):  # shards left unmerged: let the job merge them
        return False
    done = records.scan_done_ids(output)
    if records.pending(inputs, done):
        return False
    if int(os.environ.get("RANK", 0)) == 0:  # may run before the process groups exist
        print(records.resume_message(output, len(inputs), 0), file=sys.stderr)
    return True


class RecordJob:
    def __init__(
        self,
        output: str,
        inputs: Sequence[Mapping[str, Any]],
        world: distributed.World,
        *,
        overwrite: bool = False,
        options: Optional[dict] = None,
        model: Optional[str] = None,
        desc: str = "records",
        unit: str = "rec",
        fingerprint: Optional[dict] = None,
        resume_inputs: Optional[Sequence[Mapping[str, Any]]] = None,
        also_done: Sequence[Optional[str]] = (),
    ):
        """`fingerprint`: what else makes the records (a prompt version); `resume_inputs`: the
        input records whose content the fingerprint keeps (default `inputs`); `also_done`: other
        outputs of the same job (a rejected file) whose ids count as made by it."""
        self.output, self.inputs, self.world = output, inputs, world
        self.options, self.model, self.desc, self.unit = options or {}, model, desc, unit
        resume_inputs = inputs if resume_inputs is None else resume_inputs
        if overwrite and world.is_main:
            records.clear_output(output)
        distributed.barrier()
        if not overwrite:  # every rank checks the same files and reaches the same verdict
            check_resume(output, resume_inputs, self.options, fingerprint, also_done)
        distributed.barrier()
        if world.is_main:
            records.write_fingerprint(output, model_settings(self.options, **(fingerprint or {})), resume_inputs)
        self.writer = (
            records.open_output(output, shard=(world.dp_rank, world.dp_size)) if world.is_group_writer else None
        )
        done = self.writer.done_ids if self.writer else records.scan_done_ids(output)
        # Every rank has read the done set before any rank writes a record.
        distributed.barrier()
        mine = records.split_for_data_parallel(list(inputs), world.dp_rank, world.dp_size)
        self.todo = records.pending(mine, done)
        self.total_todo = len(records.pending(inputs, done))
        self.tokens = 0
        self.started = time.time()
        self.bar: Optional[tqdm] = None

    @property
    def nothing_to_do(self) -> bool:
        return self.total_todo == 0

    def __enter__(self) -> "RecordJob":
        if self.world.is_main:
            print(records.resume_message(self.output, len(self.inputs), self.total_todo), file=sys.stderr)
        self.bar = tqdm(total=len(self.todo), desc=self.desc, unit=self.unit, dynamic_ncols=True,
                        disable=not self.world.is_main or not self.todo, file=sys.stderr)
        return self

    def batches(self, size: int) -> Iterator[list[dict]]:
        for start in range(0, len(self.todo), size):
            yield self.todo[start : start + size]

    def write(self, record: Mapping[str, Any]) -> None:
        if self.writer is not None:
            self.writer.write(record)

    def advance(self, n: int = 1, tokens: int = 0) -> None:
        self.tokens += tokens
        if self.bar is not None:
            self.bar.update(n)
            if self.tokens:
                rate = self.tokens / max(1e-9, time.time() - self.started)
                self.bar.set_postfix_str(f"{rate:.1f} tok/s", refresh=False)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if exc_type is not None:
            return  # keep what was written; a rerun resumes
        distributed.barrier()
        if self.world.is_main:
            records.merge_shards(self.output, order=[r["id"] for r in self.inputs])
            if self.total_todo:
                records.write_provenance(self.output, command=sys.argv, options=self.options, model=self.model,
                                         extra={"world_size": self.world.world_size,
                                                "model_parallel_size": self.world.mp_size,
                                                "seconds": round(time.time() - self.started, 2),
                                                "generated_tokens": self.tokens})
        distributed.barrier()
