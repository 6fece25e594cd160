"""Resume and overwrite across the record stages: nothing lost, nothing mixed.

A resume adds records only to an output made from the same input records and settings (the
fingerprint beside it); --overwrite moves every earlier file (output, unmerged shards,
fingerprint, round state) to a new backup name and deletes nothing.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest
from helpers_ckpt import read_jsonl, write_jsonl, run_cli as main

from dromedary import records

DATA = Path(__file__).resolve().parent / "data" / "import"


def prompt(i: int, text: str = "question") -> dict:
    return {"id": f"p{i}", "instruction": f"{text} {i}?", "input": "", "source": "test"}


def backups(path: Path) -> list[Path]:
    return sorted(p for p in path.parent.iterdir() if p.name.startswith(path.name + ".bak-")
                  and ".shard-" not in p.name and not p.name.endswith((".json",)))


# ---------------------------------------------------------------------------- the fingerprint

SETTINGS = {"temperature": 0.7, "model": {"digest": "aaaa", "path": "/models/a"}}


def test_a_matching_resume_passes_and_a_changed_setting_is_named(tmp_path):
    out = tmp_path / "out.jsonl"
    inputs = [prompt(i) for i in range(4)]
    records.write_fingerprint(out, SETTINGS, inputs)
    records.check_fingerprint(out, SETTINGS, inputs, {"p0", "p1"})  # same: resumes
    # The same model moved elsewhere is the same model: only its content counts.
    records.check_fingerprint(out, {**SETTINGS, "model": {"digest": "aaaa", "path": "/elsewhere"}}, inputs, {"p0"})
    with pytest.raises(records.FingerprintError) as e:
        records.check_fingerprint(out, {**SETTINGS, "temperature": 1.0, "model": {"digest": "bbbb", "path": "/models/b"}},
                          inputs, {"p0", "p1"})
    message = str(e.value)
    assert message.startswith(f"{out}: cannot resume: its 2 records were made differently")
    assert "temperature was 0.7, now 1.0" in message
    assert "model was /models/a (content aaaa), now /models/b (content bbbb)" in message
    assert "--overwrite" in message


def test_an_edited_or_removed_input_record_is_refused_only_if_its_output_exists(tmp_path):
    out = tmp_path / "out.jsonl"
    inputs = [prompt(i) for i in range(4)]
    records.write_fingerprint(out, SETTINGS, inputs)
    edited = [inputs[0], prompt(1, "edited"), *inputs[2:]]
    records.check_fingerprint(out, SETTINGS, edited, {"p0", "p2"})  # p1 not made yet: its new text is used
    with pytest.raises(records.FingerprintError, match=r"1 record\(s\) of in.jsonl changed since their output was "
                                               r"made \(first: id 'p1'\)"):
        records.check_fingerprint(out, SETTINGS, edited, {"p0", "p1"}, input_name="in.jsonl")
    with pytest.raises(records.FingerprintError, match=r"ids no longer in the input \(first: id 'p3'\)"):
        records.check_fingerprint(out, SETTINGS, inputs[:3], {"p0", "p3"})


def test_unmerged_shards_of_a_data_parallel_run_count_as_made(tmp_path):
    out = tmp_path / "out.jsonl"
    inputs = [prompt(i) for i in range(4)]
    records.write_fingerprint(out, SETTINGS, inputs)
    for rank in range(2):  # an interrupted run of two groups: nothing merged yet
        with records.open_output(out, shard=(rank, 2)) as w:
            w.write(inputs[rank])
    done = records.scan_done_ids(out)
    assert done == {"p0", "p1"} and not out.exists()
    records.check_fingerprint(out, SETTINGS, inputs, done)
    with pytest.raises(records.FingerprintError, match="its 2 records were made differently: temperature"):
        records.check_fingerprint(out, {**SETTINGS, "temperature": 0.1}, inputs, done)


def test_an_output_from_before_fingerprints_is_adopted_with_a_warning(tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    records.check_fingerprint(out, SETTINGS, [prompt(0)], {"p0"})
    assert "no .fingerprint.json beside it" in capsys.readouterr().err


def test_path_identity_follows_content_not_names_or_logs(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "config.json").write_text('{"dim": 64}')
        (d / "model.safetensors").write_bytes(bytes(range(256)) * 40000)  # 10 MB: sampled
    (b / "train_log.jsonl").write_text("{}\n")  # logs and provenance do not count
    (b / "x.provenance.json").write_text("[]")
    assert records.path_identity(a)["digest"] == records.path_identity(b)["digest"]
    # Other weights of the same shapes (another fine-tune) differ all over the file; a change
    # confined between the sampled blocks would not be seen.
    data = bytearray((b / "model.safetensors").read_bytes())
    for i in range(0, len(data), 4096):
        data[i] ^= 1
    (b / "model.safetensors").write_bytes(bytes(data))
    assert records.path_identity(a)["digest"] != records.path_identity(b)["digest"]
    assert records.path_identity(tmp_path / "nothing")["digest"] == "missing"


# ---------------------------------------------------------------------------------- --overwrite

def test_overwrite_moves_output_shards_and_fingerprint_to_a_new_backup_every_time(tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    with records.open_output(out) as w:
        w.write(prompt(0))
    records.write_fingerprint(out, SETTINGS, [prompt(0), prompt(1), prompt(2)])
    Path(f"{out}.provenance.json").write_text("[]\n")
    # An interrupted data-parallel run: its records are only in the shards.
    with records.open_output(out, shard=(1, 2)) as w:
        w.write(prompt(1))
    with records.open_output(out, shard=(0, 2)) as w:
        w.write(prompt(2))
    first = records.clear_output(out)
    err = capsys.readouterr().err
    assert f"moved the old output and 2 unmerged shard file(s) to {first}" in err
    assert first.name.startswith("out.jsonl.bak-20") and not out.exists() and records.shard_files(out) == []
    assert not records.fingerprint_path(out).exists() and records.fingerprint_path(first).exists()
    assert Path(f"{out}.provenance.json").exists() and Path(f"{first}.provenance.json").exists()
    # The backup is a whole output: its shards merge into it.
    assert records.merge_shards(first) == 2 and {r["id"] for r in read_jsonl(first)} == {"p0", "p1", "p2"}
    # A second overwrite in the same second gets another name: no backup is ever replaced.
    for n in range(2):
        with records.open_output(out) as w:
            w.write(prompt(10 + n))
        records.clear_output(out)
    names = backups(out)
    assert len(names) == 3 and first in names
    assert sorted(r["id"] for b in names for r in read_jsonl(b)) == ["p0", "p1", "p10", "p11", "p2"]


def test_backup_names_are_never_reused(tmp_path, monkeypatch):
    class Frozen(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2024, 5, 6, 7, 8, 9)

    monkeypatch.setattr(records.datetime, "datetime", Frozen)
    out = tmp_path / "out.jsonl"
    assert records.backup_path(out).name == "out.jsonl.bak-20240506-070809"
    (tmp_path / "out.jsonl.bak-20240506-070809").write_text("older backup\n")
    (tmp_path / "out.jsonl.bak-20240506-070809-1.shard-00-of-02").write_text("")  # a backup's shard takes it too
    assert records.backup_path(out).name == "out.jsonl.bak-20240506-070809-2"


# ------------------------------------------------------------------------ stages, end to end

GREEDY = ["--max_new_tokens", 4, "--max_batch_size", 2]


def generate_args(ckpt, inputs, output, *extra):
    return ["generate", "--ckpt_dir", ckpt, "--input", inputs, "--output", output, *GREEDY, *extra]


def test_generate_refuses_to_mix_and_resumes_what_matches(ckpts, tmp_path, capsys, world):
    rows = [{"id": f"r{i}", "prompt": f"The camel number {i}"} for i in range(4)]
    inputs = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    assert main(generate_args(ckpts["gqa_meta"], write_jsonl(tmp_path / "two.jsonl", rows[:2]), out)) == 0
    made = out.read_bytes()
    capsys.readouterr()
    refused = [
        (write_jsonl(tmp_path / "edited.jsonl", [{**rows[0], "prompt": "Edited"}, *rows[1:]]), (),
         "1 record(s) of"),
        (inputs, ("--temperature", 0.5), "temperature was 0.0, now 0.5"),
        (inputs, ("--seed", 3), "seed was 0, now 3"),
    ]
    for path, extra, reason in refused:
        assert main(generate_args(ckpts["gqa_meta"], path, out, *extra)) != 0
        err = capsys.readouterr().err
        assert "cannot resume" in err and reason in err and "--overwrite" in err, err
        assert out.read_bytes() == made  # nothing written
    # Another checkpoint, even with every id already done ("nothing to do" is not said).
    assert main(generate_args(ckpts["llama1_hf"], tmp_path / "two.jsonl", out)) != 0
    err = capsys.readouterr().err
    assert "model was" in err and str(ckpts["llama1_hf"]) in err and "nothing to do" not in err
    # The same input (two records more) and settings resume; --max_batch_size may change.
    assert main(generate_args(ckpts["gqa_meta"], inputs, out, "--max_batch_size", 3)) == 0
    assert [r["id"] for r in read_jsonl(out)] == ["r0", "r1", "r2", "r3"] and out.read_bytes().startswith(made)
    # --overwrite starts afresh with the new settings and keeps the old records in a backup.
    assert main(generate_args(ckpts["gqa_meta"], inputs, out, "--seed", 3, "--temperature", 0.5)) != 0
    assert main(generate_args(ckpts["gqa_meta"], inputs, out, "--seed", 3, "--temperature", 0.5,
                              "--overwrite")) == 0
    assert f"moved the old output to {backups(out)[0]}" in capsys.readouterr().err
    assert len(read_jsonl(backups(out)[0])) == 4
    assert main(generate_args(ckpts["gqa_meta"], inputs, out, "--seed", 3, "--temperature", 0.5)) == 0


def test_curate_refuses_an_edited_input(tmp_path, capsys):
    gens = [{**prompt(i), "generation": "no thoughts here", "prompt_version": "v", "model": "m"} for i in range(3)]
    inputs = write_jsonl(tmp_path / "self_align.jsonl", gens)
    out, rejected = tmp_path / "sft.jsonl", tmp_path / "rejected.jsonl"
    args = ["curate", "--input", inputs, "--output", out, "--rejected", rejected]
    assert main(args) == 0 and len(read_jsonl(rejected)) == 3
    write_jsonl(inputs, [gens[0], {**gens[1], "generation": "regenerated"}, gens[2]])
    capsys.readouterr()
    assert main(args) != 0
    assert "1 record(s) of" in capsys.readouterr().err
    assert main(args + ["--min_repeat_words", 5, "--overwrite"]) == 0
    assert len(backups(rejected)) == 1 and len(read_jsonl(backups(rejected)[0])) == 3


def test_generate_prompts_refuses_other_sampling_and_continues_a_larger_run(tmp_path, capsys, world):
    from dromedary.default_model import ensure_default_model

    ensure_default_model()
    out = tmp_path / "prompts.jsonl"
    args = ["generate-prompts", "--method", "self-instruct", "--output", out, "--num_prompts", 50,
            "--tasks_per_request", 1, "--max_batch_size", 1, "--seed", 2]
    assert main(args + ["--max_rounds", 1]) == 0
    state = json.loads(Path(f"{out}.state.json").read_text())
    capsys.readouterr()
    assert main(args + ["--max_rounds", 2, "--temperature", 0.5]) != 0
    assert "temperature was 1.0, now 0.5" in capsys.readouterr().err
    assert json.loads(Path(f"{out}.state.json").read_text()) == state  # nothing ran
    assert main(args + ["--max_rounds", 2]) == 0  # more rounds of the same run: allowed
    assert json.loads(Path(f"{out}.state.json").read_text())["rounds_done"] == 2
    assert main(args + ["--max_rounds", 2, "--temperature", 0.5, "--overwrite"]) == 0
    (backup,) = backups(out)
    assert json.loads(Path(f"{backup}.state.json").read_text())["rounds_done"] == 2  # the state went with it
