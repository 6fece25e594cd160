"""User prompts from public conversation collections, in each source's own field layout.

The Dromedary-2 recipe starts from prompts people actually wrote: ShareGPT, Dolly-15k,
OpenAssistant oasst1 and OpenOrca. Each is read from a local file (JSON array, JSONL, optionally
gzipped, or parquet) or, where the network allows, from the Hugging Face Hub through `datasets`.
Only the first human turn of each conversation is kept (a later turn leans on answers we drop),
cleaned, length-filtered, deduplicated across all sources and optionally subsampled per source.

Structurally bad rows (not JSON, not an object, a missing or mistyped field) stop the import with
`FILE:LINE: reason`; rows that are well-formed but unusable (a conversation that opens with the
assistant, an empty message, a deleted oasst1 message) are skipped and counted.
"""

from __future__ import annotations

import gzip
import json
import random
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from ..records import RecordError
from . import filters

Source = Literal["sharegpt", "dolly", "oasst1", "openorca"]
SOURCES: tuple[Source, ...] = get_args(Source)

# Turn speakers that are the human in ShareGPT dumps (the exporters disagree on the word).
_SHAREGPT_HUMAN = {"human", "user"}
_SHAREGPT_SYSTEM = {"system"}
_HF_NAME = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass(frozen=True)
class Location:
    """Where a row came from, for error messages: FILE:LINE for JSON text, FILE:row N otherwise."""

    name: str
    line: int | None = None
    row: int | None = None

    def __str__(self) -> str:
        return f"{self.name}:{self.line}" if self.line is not None else f"{self.name}:row {self.row}"

    def short(self) -> str:
        """The location with the file's name only: an id for rows that have none (Dolly)."""
        return str(Location(Path(self.name).name, self.line, self.row))

    def error(self, reason: str) -> ValueError:
        if self.line is not None:
            return RecordError(self.name, self.line, reason)
        return ValueError(f"{self}: {reason}")


@dataclass(frozen=True)
class ImportedPrompt:
    source: str
    source_id: str  # the source's own id; Dolly has none, so FILE_NAME:LINE (or :row N)
    instruction: str
    input: str


@dataclass
class ImportStats:
    rows: Counter = field(default_factory=Counter)  # per source
    kept: Counter = field(default_factory=Counter)  # per source
    skipped: Counter = field(default_factory=Counter)  # per (source, reason)

    def summary(self) -> str:
        parts = []
        for source in self.rows:
            skipped = ", ".join(f"{r} {n}" for (s, r), n in sorted(self.skipped.items()) if s == source)
            parts.append(f"{source}: {self.kept[source]} of {self.rows[source]} rows kept"
                         + (f" (skipped: {skipped})" if skipped else ""))
        return "; ".join(parts)


# --------------------------------------------------------------------------- reading rows

def read_rows(path: str | Path) -> Iterator[tuple[Location, Any]]:
    """Every row of a local file: a JSON array, JSON lines (both optionally .gz), or parquet."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such input file")
    if path.suffix == ".parquet":
        yield from _parquet_rows(path)
        return
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8-sig") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if text.lstrip().startswith("["):
        yield from _json_array_rows(str(path), text)
    else:
        yield from _json_lines_rows(str(path), text)


def _json_lines_rows(name: str, text: str) -> Iterator[tuple[Location, Any]]:
    for number, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                yield Location(name, line=number), json.loads(line)
            except json.JSONDecodeError as e:
                raise RecordError(name, number, f"not valid JSON ({e.msg} at column {e.colno})") from None


def _json_array_rows(name: str, text: str) -> Iterator[tuple[Location, Any]]:
    """The elements of a top-level JSON array one at a time, each with the line it starts on."""
    decoder = json.JSONDecoder()
    ws = re.compile(r"\s*")
    pos = ws.match(text, text.index("[") + 1).end()
    line, counted = 1, 0  # `line` is the line number of offset `counted`

    def line_at(offset: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, offset)
        counted = offset
        return line

    if text[pos : pos + 1] == "]":
        return
    while True:
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise RecordError(name, e.lineno, f"not valid JSON ({e.msg} at column {e.colno})") from None
        yield Location(name, line=line_at(pos)), obj
        pos = ws.match(text, end).end()
        if text[pos : pos + 1] == ",":
            pos = ws.match(text, pos + 1).end()
        elif text[pos : pos + 1] == "]":
            return
        else:
            raise RecordError(name, line_at(pos), "not valid JSON (expected ',' or ']' after an array element)")


def _parquet_rows(path: Path) -> Iterator[tuple[Location, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        raise ValueError(f"{path}: not a readable parquet file ({e})") from None
    row = 0
    for batch in table.iter_batches(batch_size=4096):
        for obj in batch.to_pylist():
            row += 1
            yield Location(str(path), row=row), obj


def _no_remote_code(datasets) -> dict:
    """load_dataset keywords under which no Hub dataset runs its own loading script: a mistyped
    name must not run a stranger's Python. datasets 4.0 removed loading scripts altogether (what
    pyproject requires); 2.16 to 3.x honour trust_remote_code=False; older ones cannot refuse."""
    major, minor = (int(part) for part in re.findall(r"\d+", datasets.__version__)[:2])
    if major >= 4:
        return {}
    if (major, minor) >= (2, 16):
        return {"trust_remote_code": False}
    raise ValueError(f"datasets {datasets.__version__} may run a Hub dataset's own loading script: "
                     "pip install 'datasets>=4' (or pass a local file in --sources)")


def _hub_rows(name: str, source: str) -> Iterator[tuple[Location, Any]]:
    try:
        import datasets
    except ImportError as e:
        raise ValueError(f"cannot load the Hugging Face dataset {name!r}: {e}; pass a local file instead") from None
    safe = _no_remote_code(datasets)
    try:
        data = datasets.load_dataset(name, split="train", **safe)
    except Exception as e:  # noqa: BLE001 - offline, unknown name, auth: all end the same way
        raise ValueError(
            f"cannot load the Hugging Face dataset {name!r} for source {source!r} "
            f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else 'no details'}). "
            f"Without network access, download its files elsewhere and pass a local path instead, "
            f"e.g. --sources '{{\"{source}\": \"path/to/{source}.jsonl\"}}'"
        ) from None
    for row, obj in enumerate(data, 1):
        yield Location(name, row=row), obj


def source_rows(spec: str, source: str) -> Iterator[tuple[Location, Any]]:
    """Rows of a local file, or of a Hub dataset when `spec` is an owner/name that is no file."""
    if Path(spec).expanduser().exists():
        return read_rows(Path(spec).expanduser())
    if _HF_NAME.match(spec) and not Path(spec).suffix:
        return _hub_rows(spec, source)
    raise FileNotFoundError(f"{spec}: no such input file for source {source!r} "
                            "(and not a Hugging Face dataset name such as owner/name)")


# --------------------------------------------------------------------------- first human turns

def _field(obj: Mapping, key: str, types: type | tuple[type, ...], where: Location, *, optional: bool = False):
    if key not in obj:
        if optional:
            return None
        raise where.error(f"missing required field {key!r}")
    value = obj[key]
    if value is None and optional:
        return None
    if not isinstance(value, types) or isinstance(value, bool):
        names = "/".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise where.error(f"field {key!r} must be {names.replace('str', 'string')}, got {type(value).__name__}")
    return value


def first_turn(source: str, obj: Any, where: Location) -> tuple[str, str, str] | str:
    """(source id, instruction, input) of the conversation's first human turn, or why it has
    none. Raises FILE:LINE errors for rows that do not have the source's layout."""
    if not isinstance(obj, Mapping):
        raise where.error(f"expected a JSON object, got {type(obj).__name__}")
    if source == "sharegpt":
        turns = _field(obj, "conversations", list, where)
        sid = _field(obj, "id", (str, int), where, optional=True)
        for index, turn in enumerate(turns):
            if not isinstance(turn, Mapping):
                raise where.error(f"conversations[{index}] must be an object")
            speaker = _field(turn, "from", str, where)
            if speaker.lower() in _SHAREGPT_SYSTEM:
                continue
            if speaker.lower() not in _SHAREGPT_HUMAN:
                return "assistant_first"  # the human turns that follow answer to a missing context
            return (str(sid) if sid is not None else where.short()), _field(turn, "value", str, where), ""
        return "no_human_turn"
    if source == "dolly":
        instruction = _field(obj, "instruction", str, where)
        context = _field(obj, "context", str, where, optional=True) or ""
        return where.short(), instruction, context
    if source == "oasst1":
        mid = _field(obj, "message_id", str, where)
        if "parent_id" not in obj:
            raise where.error("missing required field 'parent_id'")
        role = _field(obj, "role", str, where)
        text = _field(obj, "text", str, where)
        if role != "prompter" or obj["parent_id"] is not None:
            return "not_first_turn"
        if obj.get("deleted") is True or obj.get("review_result") is False:
            return "deleted_or_rejected"
        return mid, text, ""
    if source == "openorca":
        oid = _field(obj, "id", (str, int), where)
        return str(oid), _field(obj, "question", str, where), ""
    raise ValueError(f"unknown source {source!r}: one of {', '.join(SOURCES)}")


# --------------------------------------------------------------------------- the whole import

def collect(
    sources: Mapping[str, str | Sequence[str]],
    *,
    min_chars: int,
    max_chars: int,
    per_source: int | None,
    seed: int,
    progress: bool = False,
) -> tuple[list[ImportedPrompt], ImportStats]:
    """Cleaned, length-filtered, deduplicated first human turns of every source, in a fixed order
    (sources in SOURCES order, rows in file order), optionally subsampled to `per_source` each.

    A prompt already seen (same normalised text, in any source read earlier) is dropped, so the
    result does not depend on which duplicate a subsample would have picked.
    """
    from tqdm import tqdm

    unknown = sorted(set(sources) - set(SOURCES))
    if unknown:
        raise ValueError(f"unknown source(s) {', '.join(unknown)} in --sources: use {', '.join(SOURCES)}")
    stats = ImportStats()
    seen: set[str] = set()
    prompts: list[ImportedPrompt] = []
    for source in (s for s in SOURCES if s in sources):
        specs = [sources[source]] if isinstance(sources[source], str) else list(sources[source])
        mine: list[ImportedPrompt] = []
        for spec in specs:
            rows = tqdm(source_rows(str(spec), source), desc=f"import {source}", unit="row",
                        disable=not progress, dynamic_ncols=True)
            for where, obj in rows:
                stats.rows[source] += 1
                turn = first_turn(source, obj, where)
                if isinstance(turn, str):
                    stats.skipped[source, turn] += 1
                    continue
                sid, instruction, input = turn
                instruction, input = filters.clean_text(instruction), filters.clean_text(input)
                reason = _reject_reason(instruction, input, min_chars, max_chars, seen)
                if reason:
                    stats.skipped[source, reason] += 1
                    continue
                mine.append(ImportedPrompt(source, sid, instruction, input))
        if per_source is not None and len(mine) > per_source:
            # Seeded per source, and kept in file order, so a rerun picks the same rows.
            picked = sorted(random.Random(f"{seed}:{source}").sample(range(len(mine)), per_source))
            stats.skipped[source, "subsampled"] += len(mine) - per_source
            mine = [mine[i] for i in picked]
        stats.kept[source] += len(mine)
        prompts += mine
    return prompts, stats


def prompt_key(instruction: str, input: str) -> str:
    """The dedupe key of a prompt: its normalised instruction and input together."""
    return filters.dedupe_key(f"{instruction}\n{input}")


def _reject_reason(instruction: str, input: str, min_chars: int, max_chars: int, seen: set[str]) -> str | None:
    if not instruction:
        return "empty"
    size = len(instruction) + len(input)
    if size < min_chars:
        return "too_short"
    if size > max_chars:
        return "too_long"
    key = prompt_key(instruction, input)
    if key in seen:
        return "duplicate"
    seen.add(key)
    return None
