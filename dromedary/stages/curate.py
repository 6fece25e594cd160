"""dromedary curate: self-align generations -> the sft records principle engraving trains on.

Each generation is split into internal thoughts and answer (templates.parse_self_align), the
answer is cut and checked, and the internal codename becomes the assistant's public name. What
fails a check goes to the rejected file with its reason. No model runs here, so no torchrun.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Optional

from .. import records
from ..recipe import templates, textfilters

MIX_SOURCE = "sharegpt-mix"
MIX_ID_PREFIX = "sharegpt:"
# Fields of a self-align record that describe the generation, not the request: not carried into sft.
_GENERATION_FIELDS = ("generation", "prompt_version", "model")


def curate(
    input: str,
    output: str,
    rejected: Optional[str] = None,
    assistant_name: str = templates.DEFAULT_ASSISTANT_NAME,
    prompt_name: Optional[str] = None,
    knowledge_cutoff: str = templates.DEFAULT_KNOWLEDGE_CUTOFF,
    mix: Optional[str] = None,
    min_repeat_words: int = 4,
    overwrite: bool = False,
) -> None:
    """Turn the self-align records of INPUT into sft records in OUTPUT; failures go to REJECTED with a reason.

    An answer is kept only if: the internal thoughts begin with the exemplars' self-identification
    sentence; an answer follows them; after cutting it at any next turn and at the first repeated
    sentence something is left; it does more than echo the instruction or input; it contains none
    of the exemplars' tell-tale phrases (principle citations, exemplar sentences, role markers); and
    its request is not a duplicate of one kept before. The internal codename becomes ASSISTANT_NAME.
    Prints a table of reasons and counts. Resumable: ids already in OUTPUT or REJECTED are skipped.

    Args:
      input: JSONL self-align records (from `dromedary self-align`).
      output: JSONL file to append sft records {"id", "instruction", "input", "output", "thoughts", "source"} to.
      rejected: JSONL file to append rejected records (the self-align record + "reject_reason") to. Default: rejected records are only counted.
      assistant_name: the assistant's public name, which replaces the internal codename in answers and thoughts.
      prompt_name: the name the assistant had inside the self-align prompt (self-align's --assistant_name). Default: the internal codename of prompts/self_align.json.
      knowledge_cutoff: as given to self-align; the exemplar phrases are checked with it filled in.
      mix: a ShareGPT-layout JSON file [{"id", "conversations": [{"from": "human"|"gpt", "value"}, ...]}]; the first human/gpt pair of each conversation is appended as an sft record with source "sharegpt-mix" and id "sharegpt:ID".
      min_repeat_words: sentences shorter than this may repeat; a longer sentence that repeats an earlier one cuts the answer there.
      overwrite: start OUTPUT (and REJECTED) afresh instead of resuming (the old files are moved to FILE.bak-TIME). A resume of records curated from another input or with other options is refused.
    """
    options = dict(locals())
    internal = prompt_name or templates.internal_codename()
    # The names are checked (one line, not "User") by the template functions that use them.
    telltales = templates.exemplar_telltale_phrases(internal, knowledge_cutoff)
    templates.assistant_marker(assistant_name)
    if min_repeat_words < 1:
        raise ValueError(f"--min_repeat_words must be at least 1, got {min_repeat_words}")
    if rejected is not None and Path(rejected).resolve() == Path(output).resolve():
        raise ValueError("--rejected must be a different file from --output")
    if Path(input).resolve() in {Path(p).resolve() for p in (output, rejected) if p}:
        raise ValueError("--input must differ from --output and --rejected")

    inputs = records.read_kind(input, "self-align")  # bad input stops here, before anything is written
    mixed = read_sharegpt(mix) if mix else []
    clashes = {r["id"] for r in inputs} & {r["id"] for r in mixed}
    if clashes:
        raise ValueError(f"{mix}: id {sorted(clashes)[0]!r} is also an id of {input}")
    # The --mix file, like the input, counts by content (per id), not by its path.
    settings = records.fingerprint_settings(options, ignore=records.RUN_ONLY + ("mix",))
    if not overwrite:  # records curated from other input or with other options are not added to
        done = set().union(*(records.scan_done_ids(p) for p in (output, rejected) if p))
        records.check_fingerprint(output, settings, inputs + mixed, done, input_name=input)

    curator = Curator(internal, assistant_name, telltales, min_repeat_words)
    reasons: Counter[str] = Counter()  # reject reason kinds of self-align records
    kept = mixed_in = mix_duplicates = 0
    writer = records.open_output(output, overwrite=overwrite)
    reject_writer = records.open_output(rejected, overwrite=overwrite) if rejected else None
    records.write_fingerprint(output, settings, inputs + mixed)
    with writer, (reject_writer or contextlib.nullcontext()):
        # Without --rejected, rejected ids are not stored: a rerun checks them again, with the same result.
        done = writer.done_ids | (reject_writer.done_ids if reject_writer else set())
        todo, todo_mix = records.pending(inputs, done), records.pending(mixed, done)
        print(records.resume_message(output, len(inputs) + len(mixed), len(todo) + len(todo_mix)), file=sys.stderr)
        if not todo and not todo_mix:
            return
        # Requests kept by an earlier run still count for the duplicate check.
        for old in records.read_kind(output, "sft"):
            curator.seen_requests.add(request_key(old["instruction"], old["input"]))
        for record in todo:
            sft, reason = curator.curate(record)
            if sft is not None:
                writer.write(sft)
                kept += 1
                continue
            reasons[reason_code(reason)] += 1
            if reject_writer is not None:
                reject_writer.write({**record, "reject_reason": reason})
        for sft in todo_mix:
            if not curator.new_request(sft):
                mix_duplicates += 1  # already answered by a self-align record or an earlier conversation
                continue
            writer.write(sft)
            mixed_in += 1
    marker = templates.answer_marker(internal)
    if todo and not kept and not any(marker in r["generation"] for r in todo):
        print(f"note: no generation contains {marker!r}; if self-align ran with --assistant_name NAME, "
              "pass --prompt_name NAME", file=sys.stderr)
    summary = {"kept": kept, "rejected": dict(reasons), "mixed_in": mixed_in, "mix_duplicates": mix_duplicates}
    for path in (output, rejected):
        if path:
            records.write_provenance(path, command=sys.argv, options=options, model=None, extra=summary)
    print(report_table(kept, reasons, mixed_in, mix_duplicates), file=sys.stderr)


def request_key(instruction: str, input: str) -> tuple[str, ...]:
    return tuple(textfilters.words(instruction)) + ("\0",) + tuple(textfilters.words(input))


def reason_code(reason: str) -> str:
    """The part of a reject reason that the table counts ("telltale phrase: (1 ethical)" -> its kind)."""
    return reason.split(":", 1)[0]


class Curator:
    """The checks, in order, for one self-align record; keeps the requests it has accepted."""

    def __init__(self, internal_name: str, assistant_name: str, telltales: list[str], min_repeat_words: int):
        self.internal, self.public = internal_name, assistant_name
        self.self_id = templates.self_identification_sentence()
        self.telltales = telltales
        self.min_repeat_words = min_repeat_words
        # A next turn by either side, under either name, ends the answer.
        self.roles = ("User", internal_name, assistant_name)
        self.stops = (templates.conversation_divider(),)
        self.seen_requests: set[tuple[str, ...]] = set()

    def curate(self, record: dict) -> tuple[Optional[dict], str]:
        """(sft record, "") or (None, reason)."""
        parsed = templates.parse_self_align(record["generation"], self.internal)
        thoughts, answer = parsed["thoughts"], parsed["answer"]
        # The exemplars all think in the same voice; thoughts that do not start with it did not
        # follow the exemplars, and their answers rarely do either.
        if not " ".join(thoughts.split()).startswith(self.self_id):
            return None, "no self-identification"
        if answer is None:
            return None, "no answer"
        # parse_self_align cut at the exact markers; models also drop the '#'s or the case.
        answer = textfilters.cut_at_next_turn(answer, self.roles, self.stops)
        # Looping models repeat a sentence until the budget runs out: keep what came before.
        answer, _ = textfilters.cut_repeated_sentences(answer, self.min_repeat_words)
        answer = answer.strip()
        if not answer:
            return None, "no answer"
        if textfilters.is_echo(answer, (record["instruction"], record["input"])):
            return None, "echo"
        # Checked before renaming: the telltales are written with the internal codename.
        phrase = textfilters.find_phrase(answer, self.telltales)
        if phrase is not None:
            return None, f"telltale phrase: {phrase}"
        if not self.new_request(record):
            return None, "duplicate request"
        extra = {k: v for k, v in record.items() if k not in _GENERATION_FIELDS}
        sft = {**extra, "id": record["id"], "instruction": record["instruction"], "input": record["input"],
               "output": textfilters.rename(answer, self.internal, self.public),
               "thoughts": textfilters.rename(thoughts, self.internal, self.public), "source": record["source"]}
        return sft, ""


    def new_request(self, record: dict) -> bool:
        """True the first time an (instruction, input) is seen, ignoring case and punctuation."""
        key = request_key(record["instruction"], record["input"])
        if key in self.seen_requests:
            return False
        self.seen_requests.add(key)
        return True


def read_sharegpt(path: str) -> list[dict]:
    """sft records from the first human/gpt pair of each ShareGPT conversation.

    A malformed file stops the stage (`FILE: item N: reason`); a conversation without a non-empty
    human turn directly followed by a gpt turn is skipped, as ShareGPT dumps have many.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such --mix file") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of conversations")
    out: list[dict] = []
    seen: set[str] = set()
    skipped = 0
    for index, item in enumerate(data):
        where = f"{path}: item {index}"
        if not isinstance(item, dict) or not isinstance(item.get("id"), (str, int)) or item["id"] in ("", None):
            raise ValueError(f"{where}: expected an object with a non-empty \"id\"")
        turns = item.get("conversations")
        if not isinstance(turns, list) or not all(
                isinstance(t, dict) and isinstance(t.get("from"), str) and isinstance(t.get("value"), str)
                for t in turns):
            raise ValueError(f"{where}: expected \"conversations\": [{{\"from\": str, \"value\": str}}, ...]")
        rid = MIX_ID_PREFIX + str(item["id"])
        if rid in seen:
            raise ValueError(f"{where}: duplicate id {item['id']!r}")
        seen.add(rid)
        pair = next(((h["value"].strip(), g["value"].strip()) for h, g in zip(turns, turns[1:])
                     if h["from"] == "human" and g["from"] == "gpt" and h["value"].strip() and g["value"].strip()),
                    None)
        if pair is None:
            skipped += 1
            continue
        out.append({"id": rid, "instruction": pair[0], "input": "", "output": pair[1], "thoughts": "",
                    "source": MIX_SOURCE})
    if skipped:
        print(f"{path}: skipped {skipped} conversation(s) without a human turn answered by gpt", file=sys.stderr)
    return out


def report_table(kept: int, reasons: Counter, mixed_in: int = 0, mix_duplicates: int = 0) -> str:
    """Outcomes of this run's self-align records (count and share), then the mixed-in conversations."""
    total = kept + sum(reasons.values())
    rows = [("kept", kept)] + [(f"rejected: {reason}", n) for reason, n in reasons.most_common()]
    lines = [(label, f"{n:>7}", f"{100 * n / total:5.1f}%" if total else "") for label, n in rows]
    lines.append(("total", f"{total:>7}", ""))
    if mixed_in or mix_duplicates:
        lines += [("mixed in (sharegpt)", f"{mixed_in:>7}", ""), ("mix: duplicate request", f"{mix_duplicates:>7}", "")]
    width = max(len(label) for label, _, _ in lines)
    return "\n".join(f"{label.ljust(width)}  {count}  {share}".rstrip() for label, count, share in lines)
