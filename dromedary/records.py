"""The one place that reads, validates, appends and resumes the JSONL records stages exchange.

No torch and no distributed calls here: the caller passes data-parallel rank/size as plain ints
and does the barriers. One process:

    records = read_kind(input_path, "prompts")    # validate ALL input before touching the output
    with open_output(out, overwrite=overwrite) as writer:
        todo = pending(records, writer.done_ids)
        ...

Data parallel (`world` from dromedary.distributed; one writer per data-parallel group):

    records = read_kind(input_path, "prompts")                   # every rank, before model work
    if overwrite and world.is_main: clear_output(out)
    barrier()
    writer = (open_output(out, shard=(world.dp_rank, world.dp_size))
              if world.is_group_writer else None)
    done = writer.done_ids if writer else scan_done_ids(out)
    barrier()                                     # every rank has scanned before any rank writes
    todo = pending(split_for_data_parallel(records, world.dp_rank, world.dp_size), done)
    ...; barrier(); if world.is_main: merge_shards(out, order=[r["id"] for r in records])

Split the FULL input, then drop done ids: done sets read at different moments may differ in
other groups' shares, never in a group's own, so all ranks of a group agree on what to run.
"""

import datetime
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

# No `from __future__ import annotations` in this module: TypedDict cannot see NotRequired in
# string annotations, and would make every optional field required.
if sys.version_info >= (3, 11):
    from typing import NotRequired, TypedDict
else:  # pragma: no cover  (typing.TypedDict of 3.10 does not know NotRequired)
    from typing_extensions import NotRequired, TypedDict

PathLike = str | os.PathLike


# Record kinds of DESIGN.md. Records may carry extra fields; stages pass them through unchanged.
class PromptRecord(TypedDict):
    id: str
    instruction: str
    input: str  # "" when none
    source: str
    topic: NotRequired[str]
    question_type: NotRequired[str]


class SelfAlignRecord(PromptRecord):
    generation: str  # raw text after the internal-thoughts cue
    prompt_version: str
    model: str


class RejectedRecord(SelfAlignRecord):
    reject_reason: str


class SFTRecord(TypedDict):
    id: str
    instruction: str
    input: str
    output: str
    thoughts: str
    source: str


class CompletionInput(TypedDict):
    id: str
    prompt: str


class CompletionRecord(CompletionInput):
    completion: str


_PROMPT = ("id", "instruction", "input", "source")
_SELF_ALIGN = _PROMPT + ("generation", "prompt_version", "model")
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "prompts": _PROMPT,
    "self-align": _SELF_ALIGN,
    "sft": ("id", "instruction", "input", "output", "thoughts", "source"),
    "rejected": _SELF_ALIGN + ("reject_reason",),
    "completion-input": ("id", "prompt"),
    "completions": ("id", "prompt", "completion"),
}


class RecordError(ValueError):
    """Bad record: the message is exactly `FILE:LINE: reason` (line 1-based)."""

    def __init__(self, path: PathLike, line: int, reason: str):
        super().__init__(f"{os.fspath(path)}:{line}: {reason}")
        self.path, self.line, self.reason = os.fspath(path), line, reason


# ---------------------------------------------------------------------------------------- reading

_JSON_NAMES = {str: "string", int: "integer", float: "number", bool: "boolean",
               list: "array", dict: "object", type(None): "null"}


def _json_name(t: type) -> str:
    return _JSON_NAMES.get(t, t.__name__)


def _lines(data: bytes) -> Iterable[tuple[int, int, bytes]]:
    """(1-based line number, byte offset, line) for each line. Split on b"\\n" only: a record
    written with ensure_ascii=False may hold U+2028 etc., which str.splitlines would split."""
    offset = 0
    for number, line in enumerate(data.split(b"\n"), 1):
        yield number, offset, line
        offset += len(line) + 1


def _parse(path: PathLike, number: int, line: bytes) -> dict:
    """One line -> a record with a non-empty string id, or RecordError."""
    try:
        obj = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise RecordError(path, number, f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:  # some msgs end in " at" ("Invalid control character at")
        where = f"{e.msg.removesuffix(' at')} at column {e.colno}"
        raise RecordError(path, number, f"not valid JSON ({where})") from None
    if not isinstance(obj, dict):
        raise RecordError(path, number, f"expected a JSON object, got {_json_name(type(obj))}")
    if "id" not in obj:
        raise RecordError(path, number, "missing required field 'id'")
    if not isinstance(obj["id"], str) or not obj["id"]:
        got = "an empty string" if obj["id"] == "" else _json_name(type(obj["id"]))
        raise RecordError(path, number, f"field 'id' must be a non-empty string, got {got}")
    return obj


def read_records(path: PathLike, required: Sequence[str] = ("id",), *,
                 field_types: Mapping[str, type] | None = None) -> list[dict]:
    """Read and validate a whole JSONL input file (blank lines skipped), so that a stage fails
    with `FILE:LINE: reason` before any model work. `id` is always required and unique."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{os.fspath(path)}: no such input file") from None
    data = data.removeprefix(b"\xef\xbb\xbf")  # editors on Windows add a BOM
    records: list[dict] = []
    first_seen: dict[str, int] = {}
    for number, _, line in _lines(data):
        if not line.strip():
            continue
        record = _parse(path, number, line)
        missing = [f for f in required if f not in record]
        if missing:
            s = "s" if len(missing) > 1 else ""
            raise RecordError(path, number, f"missing required field{s} "
                              + ", ".join(repr(f) for f in missing))
        for field, expected in (field_types or {}).items():
            value = record.get(field)
            # bool is an int in Python but not in JSON; an integer is a fine JSON number.
            ok = isinstance(value, expected) and (expected is bool or not isinstance(value, bool))
            ok = ok or (expected is float and type(value) is int)
            if field in record and not ok:
                raise RecordError(path, number, f"field {field!r} must be {_json_name(expected)}, "
                                  f"got {_json_name(type(value))}")
        if record["id"] in first_seen:
            raise RecordError(path, number, f"duplicate id {record['id']!r} "
                              f"(first seen on line {first_seen[record['id']]})")
        first_seen[record["id"]] = number
        records.append(record)
    return records


def read_kind(path: PathLike, kind: str) -> list[dict]:
    """read_records for a kind of DESIGN.md: its required fields, each a string."""
    fields = REQUIRED_FIELDS[kind]
    return read_records(path, fields, field_types=dict.fromkeys(fields, str))


def _scan_output(path: Path) -> tuple[list[dict], tuple[int, int] | None]:
    """Records of an existing output (or shard), and (byte offset, line number) of a partial last
    line left by a kill, to truncate at (else None). Only the LAST line may be broken: a broken
    line in the middle means the file was damaged or edited, and silently skipping it would lose
    or regenerate records, so that is a RecordError."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], None
    lines = [(n, off, line) for n, off, line in _lines(data) if line.strip()]
    records, first_seen, cut = [], {}, None
    for i, (number, offset, line) in enumerate(lines):
        try:
            record = _parse(path, number, line)
        except RecordError as e:
            if i == len(lines) - 1 and e.reason.startswith(("not valid JSON", "not valid UTF-8")):
                cut = (offset, number)
                break
            raise
        if record["id"] in first_seen:
            raise RecordError(path, number, f"duplicate id {record['id']!r} "
                              f"(first seen on line {first_seen[record['id']]})")
        first_seen[record["id"]] = number
        records.append(record)
    return records, cut


def _drop_partial_tail(path: Path, cut: tuple[int, int] | None) -> None:
    if cut is not None:
        offset, number = cut
        print(f"{path}:{number}: warning: dropping a partial last line "
              f"({path.stat().st_size - offset} bytes) left by an interrupted run", file=sys.stderr)
        os.truncate(path, offset)


# ---------------------------------------------------------------------------------------- writing

def shard_path(output: PathLike, dp_rank: int, dp_size: int) -> Path:
    """The file data-parallel group `dp_rank` of `dp_size` appends to."""
    return Path(f"{os.fspath(output)}.shard-{dp_rank:02d}-of-{dp_size:02d}")


def shard_files(output: PathLike) -> list[Path]:
    """Shard files of `output` left by runs of ANY data-parallel size, in name order."""
    output = Path(output)
    pattern = re.compile(re.escape(output.name) + r"\.shard-\d+-of-\d+")
    if not output.parent.is_dir():
        return []
    return sorted(p for p in output.parent.iterdir() if pattern.fullmatch(p.name))


def scan_done_ids(output: PathLike) -> set[str]:
    """Ids already in `output` and its shard files, read-only: for ranks that do not write."""
    return {r["id"] for p in [Path(output), *shard_files(output)] for r in _scan_output(p)[0]}


# Files that describe OUTPUT and go with it into a backup: what made its records (the
# fingerprint) and generate-prompts' round state. The provenance history is copied, not moved: it
# stays with OUTPUT (every run that wrote to it) and the backup gets its own copy.
COMPANIONS = (".fingerprint.json", ".state.json")
PROVENANCE = ".provenance.json"


def backup_path(path: PathLike) -> Path:
    """`PATH.bak-YYYYmmdd-HHMMSS`, with `-N` added where that name (or a companion of it) is taken:
    a backup is never replaced by a later one."""
    path = Path(path)
    stamp = f"{path.name}.bak-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    taken = {p.name for p in path.parent.iterdir()} if path.parent.is_dir() else set()
    for n in range(len(taken) + 1):
        name = stamp if n == 0 else f"{stamp}-{n}"
        if not any(t == name or t.startswith(name + ".") for t in taken):
            return path.with_name(name)
    raise AssertionError("unreachable: more names tried than files exist")


def clear_output(output: PathLike) -> Path | None:
    """--overwrite: move `output`, its unmerged shard files (an interrupted data-parallel run keeps
    records there) and its companions to one new backup name, `output.bak-TIME[-N]`; nothing is
    deleted. Returns the backup (None when there was nothing to move). Under data parallelism
    call it once, then barrier."""
    output = Path(output)
    shards = shard_files(output)
    companions = [Path(f"{output}{suffix}") for suffix in COMPANIONS]
    moving = [p for p in [output, *shards, *companions] if p.exists()]
    if not moving:
        return None
    backup = backup_path(output)
    for p in moving:  # shards and companions keep their suffix: the backup resumes like an output
        os.replace(p, backup.with_name(backup.name + p.name[len(output.name):]))
    provenance = Path(f"{output}{PROVENANCE}")
    if provenance.exists():
        shutil.copyfile(provenance, f"{backup}{PROVENANCE}")
    what = ("the old output" if output in moving else "the old files") + (
        f" and {len(shards)} unmerged shard file(s)" if shards else "")
    print(f"{output}: --overwrite: moved {what} to {backup}", file=sys.stderr)
    return backup


class RecordWriter:
    """Appends records to one file, one flushed line each, so a kill loses at most the line in
    flight. `done_ids` holds every id already in the output or any of its shards."""

    def __init__(self, path: Path, done_ids: set[str], fsync_every: int = 0):
        self.path, self.done_ids, self.fsync_every = path, done_ids, fsync_every
        self.written = 0
        self._file = open(path, "ab+")
        if self._file.seek(0, os.SEEK_END) > 0:
            self._file.seek(-1, os.SEEK_END)
            if self._file.read(1) != b"\n":  # a complete last record whose newline a kill cut off
                self._file.write(b"\n")

    def write(self, record: Mapping[str, Any]) -> None:
        rid = record.get("id")
        if not isinstance(rid, str) or not rid:
            raise ValueError(f"{self.path}: record id must be a non-empty string, got {rid!r}")
        if rid in self.done_ids:
            raise ValueError(f"{self.path}: id {rid!r} is already written")
        # Serialise before writing, so an unserialisable record cannot leave half a line.
        line = json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n"
        self._file.write(line.encode("utf-8"))
        self._file.flush()
        self.done_ids.add(rid)
        self.written += 1
        if self.fsync_every and self.written % self.fsync_every == 0:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_output(output: PathLike, *, overwrite: bool = False,
                shard: tuple[int, int] | None = None, fsync_every: int = 0) -> RecordWriter:
    """Open a stage's output for appending and resuming. With shard=(dp_rank, dp_size) and
    dp_size > 1 the writer appends to this group's shard file instead. Existing content is
    validated before anything is touched; only a partial last line is ever removed. Each write is
    flushed (survives a killed process); fsync_every=N also fsyncs (survives a lost machine)."""
    output = Path(output)
    dp_rank, dp_size = shard or (0, 1)
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"bad data-parallel shard {shard}: need 0 <= dp_rank < dp_size")
    if overwrite:
        if dp_size > 1:  # one rank clearing while another has started writing would lose data
            raise ValueError("with data parallelism, call clear_output(output) on rank 0, then "
                             "barrier, then open_output(output, shard=...) without overwrite")
        clear_output(output)
    target = shard_path(output, dp_rank, dp_size) if dp_size > 1 else output
    target.parent.mkdir(parents=True, exist_ok=True)
    # Validate every file before repairing any; only the writer's own file is repaired, since
    # other groups may be appending to theirs (their partial tails are just not counted).
    scans = {p: _scan_output(p) for p in dict.fromkeys([output, target, *shard_files(output)])}
    _drop_partial_tail(target, scans[target][1])
    done = {r["id"] for records, _ in scans.values() for r in records}
    return RecordWriter(target, done, fsync_every)


def merge_shards(output: PathLike, *, order: Sequence[str] | None = None) -> int:
    """Append the records of every shard file of `output` (any dp size) that are not in it yet,
    in `order` of ids when given (ids not in `order` go last), then remove the shards. Call on one
    rank after a barrier. Safe to rerun after a crash: shards are removed only after the output is
    fsynced, and ids already in the output are skipped. Returns the number of records appended."""
    output = Path(output)
    shards = shard_files(output)
    existing, cut = _scan_output(output)
    # A partial last line of a shard is ignored: its record was never finished.
    shard_records = [r for p in shards for r in _scan_output(p)[0]]
    _drop_partial_tail(output, cut)
    seen = {r["id"] for r in existing}
    new: list[dict] = []
    for record in shard_records:
        if record["id"] not in seen:
            seen.add(record["id"])
            new.append(record)
    if order is not None:
        rank = {rid: i for i, rid in enumerate(order)}
        new.sort(key=lambda r: rank.get(r["id"], len(rank)))  # stable: the rest keep shard order
    output.parent.mkdir(parents=True, exist_ok=True)
    # Opened even with nothing to merge: the next stage finds an (empty) output, not no file.
    with RecordWriter(output, {r["id"] for r in existing}) as writer:
        for record in new:
            writer.write(record)
    for p in shards:
        p.unlink()
    return len(new)


def split_for_data_parallel(items: Sequence, dp_rank: int, dp_size: int) -> list:
    """Strided share items[dp_rank::dp_size]: deterministic, balanced even when the input is sorted
    by length or source, and merge_shards(order=...) restores input order afterwards."""
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"need 0 <= dp_rank < dp_size, got dp_rank={dp_rank}, dp_size={dp_size}")
    return list(items[dp_rank::dp_size])


def pending(records: Iterable[Mapping[str, Any]], done_ids: set[str]) -> list:
    """Records whose id is not done yet, in input order."""
    return [r for r in records if r["id"] not in done_ids]


def resume_message(output: PathLike, total: int, todo: int) -> str:
    """What a (re)started stage tells the user; when todo == 0 it should stop after saying it."""
    if todo == 0:
        return (f"{os.fspath(output)}: all {total} records already done; nothing to do "
                "(use --overwrite to redo)")
    if todo == total:
        return f"{os.fspath(output)}: writing {total} records"
    return f"{os.fspath(output)}: {total - todo} of {total} records already done; resuming {todo}"


# ---------------------------------------------------------------------- whole files and provenance

def _replace_atomically(path: Path, data: bytes) -> None:
    """Temp file in the same directory + os.replace: readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_jsonl_atomic(path: PathLike, records: Iterable[Mapping[str, Any]], *,
                       overwrite: bool = False) -> int:
    """Write a whole (small) JSONL file at once; an existing file is replaced only with
    overwrite=True. Ids must be non-empty strings, unique. Returns the number of records."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists; use --overwrite to replace it")
    lines, seen = [], set()
    for i, record in enumerate(records, 1):
        rid = record.get("id")
        if not isinstance(rid, str) or not rid or rid in seen:
            raise ValueError(f"{path}: record {i} has a missing, empty or duplicate id {rid!r}")
        seen.add(rid)
        lines.append(json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n")
    _replace_atomically(path, "".join(lines).encode("utf-8"))
    return len(lines)


def _package_version() -> str:
    try:
        return metadata.version("dromedary")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _git_commit() -> str | None:
    """The source commit when running from a checkout (the version alone misses unreleased
    work); None when installed, even into a venv that sits inside some other repository."""
    here = Path(__file__).resolve()
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=here.parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.splitlines()
    if out.returncode != 0 or len(lines) != 2:
        return None
    top, commit = lines
    return commit if (Path(top) / "dromedary" / "records.py").resolve() == here else None


def write_provenance(output: PathLike, *, command: list[str], options: dict,
                     model: str | None, extra: dict | None = None) -> Path:
    """Append this run's provenance to `output.provenance.json` (a JSON list, one entry per run,
    so a resumed or overwritten output keeps the history of every run that wrote to it). Call it
    on one rank."""
    path = Path(f"{os.fspath(output)}.provenance.json")
    runs: list = []
    if path.exists():
        try:
            runs = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg}); move it aside") from None
        if not isinstance(runs, list):
            raise ValueError(f"{path}: expected a JSON list of runs; move it aside")
    entry = {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": list(command),
        "options": options,
        "model": model,
        "version": _package_version(),
        "git_commit": _git_commit(),
        "hostname": socket.gethostname(),
        "python": sys.version.split()[0],
    }
    clash = set(entry) & set(extra or {})
    if clash:
        raise ValueError(f"provenance extra fields clash with standard ones: {sorted(clash)}")
    entry.update(extra or {})
    # default=str: options often hold Paths; provenance should record them, not crash on them.
    data = json.dumps(runs + [entry], ensure_ascii=False, indent=2, default=str) + "\n"
    _replace_atomically(path, data.encode("utf-8"))
    return path


# ------------------------------------------------------------------------------- fingerprints
#
# Resume goes by id, so a rerun with an edited input, another model or other sampling options
# would add records made one way beside records made another. OUTPUT.fingerprint.json keeps what
# made the records (the settings, and a digest of each input record) and a resume must match it.

FINGERPRINT = ".fingerprint.json"
FINGERPRINT_VERSION = 1
# Options that decide how a stage runs, not what it writes (dtype and batch size change results
# only by rounding), or that name files whose content is fingerprinted instead (the input, per id).
RUN_ONLY = ("input", "output", "rejected", "overwrite", "max_batch_size", "kv_cache_gb", "model_parallel_size", "dtype")
_WHOLE_FILE = 8 << 20  # files up to this size are hashed whole; larger ones are sampled
_BLOCK, _BLOCKS = 64 << 10, 16
_NOT_MODEL_FILES = (PROVENANCE, FINGERPRINT, ".jsonl", ".tmp", ".lock", ".md", ".txt")


class FingerprintError(ValueError):
    """The existing output was made from other input or settings than this run's."""


def fingerprint_path(output: PathLike) -> Path:
    return Path(f"{os.fspath(output)}{FINGERPRINT}")


def record_digest(record: Mapping[str, Any]) -> str:
    data = json.dumps(record, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(data.encode("utf-8")).hexdigest()[:16]


def path_identity(path: PathLike | None) -> dict | None:
    """What a checkpoint, tokenizer or adapter path holds, cheaply even for a 140 GB checkpoint:
    each top-level file's name and size, the whole content of files up to 8 MiB (configs,
    tokenizers) and 16 evenly spaced 64 KiB blocks of larger ones (two fine-tunes of one
    architecture have the same sizes but differ everywhere). Logs and provenance do not count.
    The path is kept for messages; only the digest is compared."""
    if path is None:
        return None
    path = Path(path).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
                       and not p.name.endswith(_NOT_MODEL_FILES))
    else:
        files = [path] if path.exists() else []
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            if size <= _WHOLE_FILE:
                h.update(fh.read())
                continue
            for k in range(_BLOCKS):
                fh.seek((size - _BLOCK) * k // (_BLOCKS - 1))
                h.update(fh.read(_BLOCK))
    return {"digest": h.hexdigest()[:16] if files else "missing", "path": os.fspath(path)}


def fingerprint_settings(options: Mapping[str, Any], *, ignore: Sequence[str] = RUN_ONLY,
                         **extra: Any) -> dict:
    """The settings part of a fingerprint: a stage's options without the run-only ones, plus
    `extra` (identities of the model files, a prompt version), as JSON values."""
    settings = {k: v for k, v in options.items() if k not in ignore}
    settings.update(extra)
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


def _comparable(value: Any) -> Any:
    return value["digest"] if isinstance(value, dict) and "digest" in value else value


def _describe(value: Any) -> str:
    if isinstance(value, dict) and "digest" in value:
        return f"{value.get('path')} (content {value['digest']})"
    return json.dumps(value, ensure_ascii=False)


def check_fingerprint(output: PathLike, settings: dict, inputs: Sequence[Mapping[str, Any]] | None,
                      done_ids: set[str], *, input_name: str = "the input") -> None:
    """Refuse (FingerprintError) to add records to an output whose `done_ids` were made with
    other settings, or from input records that have changed or gone since. `inputs` None: the
    stage has no input file. Read-only: every rank may call it and reaches the same verdict."""
    if not done_ids:
        return
    path = fingerprint_path(output)
    if not path.exists():
        if int(os.environ.get("RANK", 0)) == 0:  # may run before the process groups exist
            print(f"{os.fspath(output)}: warning: no {FINGERPRINT} beside it (written before fingerprints "
                  f"existed); assuming its {len(done_ids)} records were made from this input and settings",
                  file=sys.stderr)
        return
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        old_settings, old_inputs = stored["settings"], stored["inputs"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise FingerprintError(f"{path}: not a fingerprint file ({e}); move it aside, or pass --overwrite "
                               "to start afresh") from None
    missing = object()
    problems = [f"{key} was {_describe(old_settings.get(key, None))}, now {_describe(settings.get(key, None))}"
                for key in sorted(set(old_settings) | set(settings))
                if _comparable(old_settings.get(key, missing)) != _comparable(settings.get(key, missing))]
    if inputs is not None and old_inputs is not None:
        digests = {r["id"]: record_digest(r) for r in inputs}
        changed = [rid for rid in digests if rid in done_ids and rid in old_inputs and old_inputs[rid] != digests[rid]]
        gone = sorted(rid for rid in done_ids if rid not in digests)
        if changed:
            problems.append(f"{len(changed)} record(s) of {input_name} changed since their output was made "
                            f"(first: id {changed[0]!r})")
        if gone:
            problems.append(f"{len(gone)} record(s) in the output have ids no longer in {input_name} "
                            f"(first: id {gone[0]!r})")
    if problems:
        raise FingerprintError(
            f"{os.fspath(output)}: cannot resume: its {len(done_ids)} records were made differently: "
            + "; ".join(problems) + ". Rerun with what made them, or pass --overwrite to start afresh "
            "(the old output is kept under a new backup name)")


def write_fingerprint(output: PathLike, settings: dict, inputs: Sequence[Mapping[str, Any]] | None) -> Path:
    """Record what this run's records are made from, before the first is written. Call on one
    rank, after check_fingerprint passed (or after --overwrite moved the old output away)."""
    path = fingerprint_path(output)
    data = {"version": FINGERPRINT_VERSION, "settings": settings,
            "inputs": None if inputs is None else {r["id"]: record_digest(r) for r in inputs}}
    _replace_atomically(path, (json.dumps(data, ensure_ascii=False, default=str) + "\n").encode("utf-8"))
    return path
