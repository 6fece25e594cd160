import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dromedary import records as R
from dromedary.records import (REQUIRED_FIELDS, RecordError, clear_output, merge_shards,
                               open_output, pending, read_kind, read_records, resume_message,
                               scan_done_ids, shard_files, shard_path, split_for_data_parallel,
                               write_jsonl_atomic, write_provenance)

REPO = Path(__file__).resolve().parents[1]


def lines(*objs) -> str:
    return "".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs)


def ids(path) -> list[str]:
    return [r["id"] for r in read_records(path)]


def prompt(i, **extra) -> dict:
    return {"id": f"p{i}", "instruction": f"question {i}", "input": "", "source": "test", **extra}


# ------------------------------------------------------------------------------------- reading

def test_read_records_skips_blank_lines_and_keeps_extra_fields(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("\n" + lines(prompt(1, topic="t")) + "  \n" + lines(prompt(2)) + "\n")
    got = read_kind(path, "prompts")
    assert [r["id"] for r in got] == ["p1", "p2"]
    assert got[0]["topic"] == "t"


@pytest.mark.parametrize("content, required, types, line, reason", [
    ('{"id": "a"}\nnot json\n', ("id",), None, 2,
     "not valid JSON (Expecting value at column 1)"),
    ('{"id": "a"}\n{"id": "b"\n{"id": "c"}\n', ("id",), None, 2,
     "not valid JSON (Expecting ',' delimiter at column 11)"),
    ('\n[1, 2]\n', ("id",), None, 2, "expected a JSON object, got array"),
    ('"text"\n', ("id",), None, 1, "expected a JSON object, got string"),
    ('{"instruction": "x"}\n', ("id",), None, 1, "missing required field 'id'"),
    ('{"id": "a", "instruction": "x"}\n', REQUIRED_FIELDS["prompts"], None, 1,
     "missing required fields 'input', 'source'"),
    ('{"id": "a", "input": "", "source": "s"}\n', REQUIRED_FIELDS["prompts"], None, 1,
     "missing required field 'instruction'"),
    ('{"id": 7}\n', ("id",), None, 1, "field 'id' must be a non-empty string, got integer"),
    ('{"id": null}\n', ("id",), None, 1, "field 'id' must be a non-empty string, got null"),
    ('{"id": ""}\n', ("id",), None, 1,
     "field 'id' must be a non-empty string, got an empty string"),
    ('{"id": "a", "n": "3"}\n', ("id",), {"n": int}, 1, "field 'n' must be integer, got string"),
    ('{"id": "a", "n": true}\n', ("id",), {"n": int}, 1, "field 'n' must be integer, got boolean"),
    ('{"id": "a", "input": null}\n', ("id",), {"input": str}, 1,
     "field 'input' must be string, got null"),
    ('{"id": "x"}\n{"id": "y"}\n\n{"id": "x"}\n', ("id",), None, 4,
     "duplicate id 'x' (first seen on line 1)"),
])
def test_bad_input_gives_file_line_reason(tmp_path, content, required, types, line, reason):
    path = tmp_path / "in.jsonl"
    path.write_text(content)
    with pytest.raises(RecordError) as e:
        read_records(path, required, field_types=types)
    assert str(e.value) == f"{path}:{line}: {reason}"
    assert (e.value.line, e.value.reason) == (line, reason)
    assert isinstance(e.value, ValueError)


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"id": "a"}\n{"id": "\xff"}\n')
    with pytest.raises(RecordError, match=rf"^{path}:2: not valid UTF-8 "):
        read_records(path)


def test_field_types_accept_integers_as_numbers_and_absent_optional_fields(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(lines({"id": "a", "score": 1}, {"id": "b", "score": 0.5}, {"id": "c"}))
    assert len(read_records(path, field_types={"score": float})) == 3


def test_whole_file_is_validated_before_returning(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(lines(*[prompt(i) for i in range(1000)], "{broken"))
    with pytest.raises(RecordError, match=r":1001: not valid JSON"):
        read_records(path)


def test_missing_input_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl: no such input file"):
        read_records(tmp_path / "nope.jsonl")


def test_required_fields_match_the_typed_dicts():
    kinds = {"prompts": R.PromptRecord, "self-align": R.SelfAlignRecord, "sft": R.SFTRecord,
             "rejected": R.RejectedRecord, "completion-input": R.CompletionInput,
             "completions": R.CompletionRecord}
    for kind, typed in kinds.items():
        assert set(REQUIRED_FIELDS[kind]) == typed.__required_keys__, kind
    assert R.PromptRecord.__optional_keys__ == {"topic", "question_type"}


def test_unicode_round_trips_including_line_separators(tmp_path):
    out = tmp_path / "out.jsonl"
    text = "日本語 ✓ émoji 🐪 line\u2028sep para\u2029sep nel\x85"
    with open_output(out) as w:
        w.write({"id": "ü-1", "instruction": text})
    assert text in out.read_text(encoding="utf-8")  # written as UTF-8, not \u escapes
    with open_output(out) as w:
        w.write({"id": "tab", "instruction": "a\tb\nc"})
    assert read_records(out) == [{"id": "ü-1", "instruction": text},
                                 {"id": "tab", "instruction": "a\tb\nc"}]


def test_module_imports_without_torch():
    code = "import sys, dromedary.records; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


# ------------------------------------------------------------------------------ append, resume

def test_resume_skips_done_ids_and_appends(tmp_path):
    out = tmp_path / "out.jsonl"
    records = [prompt(i) for i in range(5)]
    with open_output(out) as w:
        assert w.done_ids == set()
        for r in records[:2]:
            w.write(r)
    before = out.read_bytes()
    with open_output(out) as w:
        assert w.done_ids == {"p0", "p1"}
        todo = pending(records, w.done_ids)
        assert [r["id"] for r in todo] == ["p2", "p3", "p4"]
        for r in todo:
            w.write(r)
        with pytest.raises(ValueError, match="'p0' is already written"):
            w.write(records[0])
    assert out.read_bytes().startswith(before)  # appended, never rewritten
    assert read_records(out) == records
    with open_output(out) as w:
        assert pending(records, w.done_ids) == []


def test_write_flushes_each_line_immediately(tmp_path):
    out = tmp_path / "out.jsonl"
    with open_output(out, fsync_every=2) as w:
        for i in range(3):
            w.write(prompt(i))
            assert ids(out) == [f"p{j}" for j in range(i + 1)]


def test_write_rejects_records_without_string_id(tmp_path):
    with open_output(tmp_path / "out.jsonl") as w:
        with pytest.raises(ValueError, match="non-empty string"):
            w.write({"instruction": "x"})
        with pytest.raises(TypeError):
            w.write({"id": "a", "bad": object()})
        assert w.written == 0
    assert (tmp_path / "out.jsonl").read_bytes() == b""  # no half line left behind


def test_trailing_partial_line_is_dropped_then_append_is_valid(tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    out.write_text(lines(prompt(0), prompt(1)) + '{"id": "p2", "instruction": "qu')
    with open_output(out) as w:
        assert w.done_ids == {"p0", "p1"}
        w.write(prompt(2))
    assert f"{out}:3: warning: dropping a partial last line" in capsys.readouterr().err
    assert read_records(out) == [prompt(0), prompt(1), prompt(2)]


def test_trailing_garbage_with_newline_is_dropped(tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    out.write_bytes(lines(prompt(0)).encode() + b"\x00\x00\x00\n\n")
    with open_output(out) as w:
        w.write(prompt(1))
    assert "dropping a partial last line" in capsys.readouterr().err
    assert ids(out) == ["p0", "p1"]


def test_complete_last_record_without_newline_is_kept(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text(lines(prompt(0)) + json.dumps(prompt(1)))
    with open_output(out) as w:
        assert w.done_ids == {"p0", "p1"}
        w.write(prompt(2))
    assert ids(out) == ["p0", "p1", "p2"]


@pytest.mark.parametrize("middle, reason", [
    ('{"id": "p1", "instr', "not valid JSON (Unterminated string starting at column 14)"),
    ('{"id": "p0"}', "duplicate id 'p0' (first seen on line 1)"),
    ('{"instruction": "no id"}', "missing required field 'id'"),
])
def test_corrupt_middle_line_is_an_error_and_nothing_changes(tmp_path, middle, reason):
    out = tmp_path / "out.jsonl"
    out.write_text(lines(prompt(0), middle, prompt(2)) + '{"id": "p3", "partial')
    before = out.read_bytes()
    for attempt in (lambda: open_output(out), lambda: scan_done_ids(out),
                    lambda: open_output(out, shard=(1, 2))):
        with pytest.raises(RecordError) as e:
            attempt()
        assert str(e.value) == f"{out}:2: {reason}"
    assert out.read_bytes() == before


def test_no_clobber_without_overwrite(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text(lines(prompt(0), prompt(1)))
    before = out.read_bytes()
    w = open_output(out)
    w.close()
    assert out.read_bytes() == before
    with pytest.raises(FileExistsError, match="use --overwrite"):
        write_jsonl_atomic(out, [prompt(9)])
    assert out.read_bytes() == before


def test_overwrite_starts_fresh_and_keeps_a_backup(tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    out.write_text(lines(prompt(0), prompt(1)))
    old = out.read_bytes()
    shard_path(out, 1, 4).write_text(lines(prompt(7)))
    with open_output(out, overwrite=True) as w:
        assert w.done_ids == set()
        w.write(prompt(5))
    assert ids(out) == ["p5"]
    (backup,) = [p for p in tmp_path.iterdir() if re.fullmatch(r"out\.jsonl\.bak-\d{8}-\d{6}", p.name)]
    assert backup.read_bytes() == old
    assert shard_files(out) == [] and [p.name for p in shard_files(backup)] == [f"{backup.name}.shard-01-of-04"]
    assert f"moved the old output and 1 unmerged shard file(s) to {backup}" in capsys.readouterr().err


def test_overwrite_under_data_parallelism_must_be_cleared_once(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text(lines(prompt(0)))
    with pytest.raises(ValueError, match="clear_output"):
        open_output(out, overwrite=True, shard=(0, 2))
    assert ids(out) == ["p0"]
    clear_output(out)  # rank 0, then barrier
    with open_output(out, shard=(0, 2)) as w:
        assert w.done_ids == set()


def test_output_directory_is_created(tmp_path):
    with open_output(tmp_path / "a" / "b" / "out.jsonl") as w:
        w.write(prompt(0))
    assert ids(tmp_path / "a" / "b" / "out.jsonl") == ["p0"]


def test_resume_message():
    assert resume_message("output.jsonl", 120, 0) == (
        "output.jsonl: all 120 records already done; nothing to do (use --overwrite to redo)")
    assert resume_message("o.jsonl", 120, 120) == "o.jsonl: writing 120 records"
    assert resume_message("o.jsonl", 120, 80) == (
        "o.jsonl: 40 of 120 records already done; resuming 80")


# -------------------------------------------------------------------------- data parallelism

def run_shards(out, records, dp_size, stop_after=None):
    """Each data-parallel group writes its share; stop_after simulates a crash."""
    for rank in range(dp_size):
        with open_output(out, shard=(rank, dp_size)) as w:
            todo = pending(split_for_data_parallel(records, rank, dp_size), w.done_ids)
            for r in todo[:stop_after]:
                w.write(r)


def test_split_for_data_parallel_is_strided_and_covers_everything():
    items = list(range(10))
    shares = [split_for_data_parallel(items, r, 3) for r in range(3)]
    assert shares == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert split_for_data_parallel(items, 0, 1) == items
    with pytest.raises(ValueError):
        split_for_data_parallel(items, 3, 3)


def test_shards_merge_exactly_once_in_input_order(tmp_path):
    out = tmp_path / "out.jsonl"
    records = [prompt(i) for i in range(7)]
    run_shards(out, records, 2)
    assert [p.name for p in shard_files(out)] == ["out.jsonl.shard-00-of-02",
                                                  "out.jsonl.shard-01-of-02"]
    assert not out.exists()
    assert merge_shards(out, order=[r["id"] for r in records]) == 7
    assert read_records(out) == records
    assert shard_files(out) == []
    assert merge_shards(out, order=[r["id"] for r in records]) == 0
    assert read_records(out) == records
    with open_output(out, shard=(0, 2)) as w:  # a rerun finds everything done
        assert w.done_ids == {r["id"] for r in records}


def test_merge_with_nothing_to_merge_still_leaves_an_output(tmp_path):
    out = tmp_path / "out.jsonl"
    assert merge_shards(out) == 0
    assert out.read_bytes() == b""


def test_corrupt_shard_stops_merge_before_anything_changes(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text(lines(prompt(0)) + '{"id": "p9", "partial')
    before = out.read_bytes()
    shard_path(out, 0, 2).write_text(lines(prompt(2), "oops", prompt(4)))
    shard_path(out, 1, 2).write_text(lines(prompt(1)) + '{"id": "p3", "partial')
    for attempt in (lambda: merge_shards(out), lambda: open_output(out, shard=(1, 2))):
        with pytest.raises(RecordError, match=r"shard-00-of-02:2: not valid JSON"):
            attempt()
    assert out.read_bytes() == before
    assert shard_path(out, 1, 2).read_text().endswith('"partial')


def test_merge_without_order_keeps_shard_order(tmp_path):
    out = tmp_path / "out.jsonl"
    run_shards(out, [prompt(i) for i in range(4)], 2)
    merge_shards(out)
    assert ids(out) == ["p0", "p2", "p1", "p3"]


def test_crash_mid_merge_then_remerge_has_no_duplicates(tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    records = [prompt(i) for i in range(9)]
    order = [r["id"] for r in records]
    run_shards(out, records, 3)
    # The merge was killed after appending three records and half of the fourth.
    out.write_text(lines(*records[:3]) + json.dumps(records[3])[:10])
    assert merge_shards(out, order=order) == 6
    assert read_records(out) == records
    assert "dropping a partial last line" in capsys.readouterr().err
    # Killed after the whole append but before removing the shards.
    out.unlink()
    run_shards(out, records, 3)
    merge_shards(out, order=order)
    out_bytes = out.read_bytes()
    run_shards(out, records, 3)  # nothing left to write...
    for p in shard_files(out):
        p.write_text(lines(*[r for r in records if int(r["id"][1:]) % 3 == int(p.name[-8:-6])]))
    assert merge_shards(out, order=order) == 0  # ...and leftover shards add nothing
    assert out.read_bytes() == out_bytes and shard_files(out) == []


def test_shard_partial_last_line_is_redone_not_merged(tmp_path):
    out = tmp_path / "out.jsonl"
    records = [prompt(i) for i in range(4)]
    run_shards(out, records, 2, stop_after=1)
    with open(shard_path(out, 1, 2), "a") as f:
        f.write('{"id": "p3", "ins')  # killed mid-line
    assert scan_done_ids(out) == {"p0", "p1"}
    run_shards(out, records, 2)
    merge_shards(out, order=[r["id"] for r in records])
    assert read_records(out) == records


def test_resume_with_a_different_dp_size(tmp_path):
    out = tmp_path / "out.jsonl"
    records = [prompt(i) for i in range(12)]
    run_shards(out, records, 4, stop_after=2)  # crashed: 8 of 12 written into 4 shards
    assert len(scan_done_ids(out)) == 8
    with open_output(out, shard=(0, 3)) as w:
        assert w.done_ids == scan_done_ids(out)
    run_shards(out, records, 3)  # resumed with 3 groups
    assert merge_shards(out, order=[r["id"] for r in records]) == 12
    assert read_records(out) == records
    assert shard_files(out) == []


def test_resume_without_data_parallelism_after_a_sharded_crash(tmp_path):
    out = tmp_path / "out.jsonl"
    records = [prompt(i) for i in range(6)]
    run_shards(out, records, 2, stop_after=1)
    with open_output(out) as w:
        assert w.done_ids == {"p0", "p1"}
        for r in pending(records, w.done_ids):
            w.write(r)
    assert merge_shards(out) == 2  # always call it at the end: leftover shards join the output
    assert sorted(ids(out)) == sorted(r["id"] for r in records)


def test_sigkill_mid_run_then_resume_loses_and_repeats_nothing(tmp_path):
    out = tmp_path / "out.jsonl"
    records = [prompt(i, output="x" * 5000) for i in range(400)]
    inp = tmp_path / "in.jsonl"
    write_jsonl_atomic(inp, records)
    stage = (
        "import sys, time\n"
        "from dromedary.records import read_records, open_output, pending\n"
        "inp, out = sys.argv[1:]\n"
        "records = read_records(inp)\n"
        "with open_output(out) as w:\n"
        "    for r in pending(records, w.done_ids):\n"
        "        w.write(r)\n"
        "        time.sleep(0.005)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", stage, str(inp), str(out)], env=env)
    deadline = time.monotonic() + 60
    while (not out.exists() or out.read_bytes().count(b"\n") < 50) and time.monotonic() < deadline:
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL
    killed_at = len(scan_done_ids(out))
    assert 50 <= killed_at < len(records)
    subprocess.run([sys.executable, "-c", stage, str(inp), str(out)], env=env, check=True)
    assert read_records(out) == records


# --------------------------------------------------------------------- whole files, provenance

def test_write_jsonl_atomic(tmp_path):
    path = tmp_path / "sft.jsonl"
    assert write_jsonl_atomic(path, [prompt(0), prompt(1)]) == 2
    before = path.read_bytes()
    with pytest.raises(TypeError):  # a failure mid-write leaves the old file whole
        write_jsonl_atomic(path, [prompt(2), {"id": "p3", "bad": object()}], overwrite=True)
    with pytest.raises(ValueError, match="duplicate id 'p2'"):
        write_jsonl_atomic(path, [prompt(2), prompt(2)], overwrite=True)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["sft.jsonl"]  # no temp files left
    write_jsonl_atomic(path, [prompt(3)], overwrite=True)
    assert ids(path) == ["p3"]


def test_provenance_accumulates_runs(tmp_path):
    out = tmp_path / "out.jsonl"
    p = write_provenance(out, command=["dromedary", "self-align", "--ckpt_dir", "m"],
                         options={"ckpt_dir": Path("m"), "temperature": 0.7}, model="m",
                         extra={"input": "in.jsonl"})
    assert p == tmp_path / "out.jsonl.provenance.json"
    write_provenance(out, command=["dromedary", "self-align", "--overwrite"],
                     options={"overwrite": True}, model=None)
    runs = json.loads(p.read_text())
    assert [r["command"][-1] for r in runs] == ["m", "--overwrite"]
    first = runs[0]
    assert first["options"] == {"ckpt_dir": "m", "temperature": 0.7}
    assert first["model"] == "m" and first["input"] == "in.jsonl"
    for key in ("time", "version", "hostname", "python", "git_commit"):
        assert key in first
    with pytest.raises(ValueError, match="clash"):
        write_provenance(out, command=[], options={}, model=None, extra={"time": "now"})
    assert len(json.loads(p.read_text())) == 2
