"""`dromedary verbose-clone`: the answer filter on crafted generations, and the stage end to end on
the embedded default model (no adapter), in one process and data-parallel under torchrun."""

import json
from pathlib import Path

import pytest
from helpers_ckpt import free_port, python_m, read_jsonl, run, torchrun, write_jsonl, run_cli as main

from dromedary import records
from dromedary.default_model import ensure_default_model
from dromedary.engine.generation import Generation
from dromedary.recipe import templates
from dromedary.stages.verbose_clone import AnswerFilter

RECORD = {"id": "r1", "instruction": "Why do camels have humps?", "input": "", "output": "To store fat.",
          "thoughts": "t", "source": "tgrt"}
LONG = ("Camels have humps to store fat, which they can break down for energy when food is scarce. "
        "The hump does not hold water, despite the popular belief. In short, the hump is a pantry.")


def check(text, finish="stop", min_words=20, record=RECORD):
    f = AnswerFilter("Dromedary", templates.DEFAULT_KNOWLEDGE_CUTOFF, min_words, 4, 8)
    return f(Generation(text, [], finish, 0), record)


def test_a_finished_detailed_answer_passes():
    assert check(LONG) == (LONG, None)
    assert check(LONG + "\n\n", finish="eos") == (LONG, None)


@pytest.mark.parametrize("tail", ["\n\n### User:\nThanks!", "\n\n### Dromedary:\nAnd more.", "\n\n## user:\nok",
                                  "\nUser:\n"])
def test_the_answer_is_cut_at_the_next_turn(tail):
    assert check(LONG + tail) == (LONG, None)


def test_an_answer_stopped_by_the_token_budget_is_unfinished():
    assert check(LONG + " And also", finish="length")[1] == "unfinished"


def test_a_looping_answer_is_cut_and_kept_even_at_the_token_budget():
    loop = " The hump is a pantry for hard times." * 6
    assert check(LONG + loop + " The", finish="length") == (LONG + " The hump is a pantry for hard times.", None)


@pytest.mark.parametrize("text, reason", [
    ("", "empty"),
    ("\n### User:\nHi", "empty"),
    ("Fat, mostly.", "too short"),
    ("Why do camels have humps?\nWhy do camels have humps?", "echo"),
])
def test_empty_short_and_echoing_answers_are_rejected(text, reason):
    assert check(text, min_words=5)[1] == reason


def test_the_verbose_prompts_own_wording_is_rejected():
    system = templates.verbose_system_prompt()
    copied = " ".join(system.split()[20:32])
    answer, reason = check(f"{LONG} {copied}")
    assert reason.startswith("system prompt leak: ")
    assert reason.removeprefix("system prompt leak: ") in " ".join(system.casefold().replace(",", "").split())
    # A few words in common are not a leak.
    assert check(LONG + " If you are unsure, ask an expert.")[1] is None


def test_self_align_scaffolding_is_rejected():
    assert check(LONG + " This follows (3 helpful).")[1] == "telltale phrase: (3 helpful)"
    assert check(templates.self_identification_sentence() + " " + LONG)[1].startswith("telltale phrase: ")


# ------------------------------------------------------------------- end to end, CLI

N = 10
FLAGS = ["--max_new_tokens", 128, "--min_words", 5, "--max_batch_size", 4, "--seed", 1]


@pytest.fixture(scope="module")
def default_model() -> Path:
    """Built here, in-process, if the cache lacks it: not inside a CLI subprocess with a timeout."""
    return ensure_default_model()


@pytest.fixture(scope="module")
def sft(default_model, tmp_path_factory) -> Path:
    tasks = templates.load_seed_tasks()[:N]
    return write_jsonl(tmp_path_factory.mktemp("sft") / "sft.jsonl", [
        {"id": f"s{i}", "instruction": t["instruction"], "input": t["input"], "output": t["output"],
         "thoughts": "", "source": "self-instruct"} for i, t in enumerate(tasks)])


def args(inputs, output, rejected, *extra):
    return ["verbose-clone", "--input", inputs, "--output", output, "--rejected", rejected, *FLAGS, *extra]


@pytest.fixture(scope="module")
def reference(sft, tmp_path_factory):
    folder = tmp_path_factory.mktemp("verbose")
    out, rejected = folder / "verbose.jsonl", folder / "rejected.jsonl"
    proc = run(python_m() + args(sft, out, rejected))
    return out, rejected, proc.stderr


def test_detailed_answers_become_sft_records(sft, reference):
    out, rejected, stderr = reference
    inputs = {r["id"]: r for r in read_jsonl(sft)}
    kept = records.read_kind(out, "sft")
    dropped = read_jsonl(rejected)
    print(f"\nembedded default model, no adapter: kept {len(kept)} of {N}; {stderr.strip().splitlines()[-1]}")
    assert kept, "the embedded default model should pass the filters at least once"
    assert sorted(r["id"] for r in kept + dropped) == sorted(inputs)
    for record in kept:
        source = inputs[record["id"]]
        assert (record["instruction"], record["input"]) == (source["instruction"], source["input"])
        assert record["source"] == "verbose-clone" and record["thoughts"] == ""
        assert len(record["output"].split()) >= 5 and "### User:" not in record["output"]
    for record in dropped:
        assert {k: record[k] for k in inputs[record["id"]]} == inputs[record["id"]]
        assert record["reject_reason"] and isinstance(record["generation"], str)
    assert f"verbose-clone: kept {len(kept)} of {N}" in stderr


def test_data_parallel_2_matches_one_process(sft, reference, tmp_path):
    """The rejected file is sharded and merged beside the output."""
    out, rejected = tmp_path / "verbose.jsonl", tmp_path / "rejected.jsonl"
    run(torchrun() + ["--nproc_per_node", 2, "--master_port", free_port(), "-m", "dromedary"]
        + args(sft, out, rejected, "--model_parallel_size", 1))
    # One process writes records as they finish; the groups' shards are merged in input order.
    assert by_id(out) == by_id(reference[0])
    assert by_id(rejected) == by_id(reference[1])
    assert not list(tmp_path.glob("*.shard-*"))


def by_id(path) -> list[dict]:
    """A file's records by id: they are written as they finish, not in input order."""
    return sorted(read_jsonl(path), key=lambda r: r["id"])


def test_rerun_does_nothing_and_says_so(sft, reference, tmp_path, capsys):
    out, rejected = tmp_path / "verbose.jsonl", tmp_path / "rejected.jsonl"
    out.write_bytes(reference[0].read_bytes())
    rejected.write_bytes(reference[1].read_bytes())
    assert main(args(sft, out, rejected)) == 0
    assert "nothing to do" in capsys.readouterr().err
    assert (out.read_bytes(), rejected.read_bytes()) == (reference[0].read_bytes(), reference[1].read_bytes())


def test_bad_input_stops_with_file_line_reason(tmp_path, capsys):
    bad = tmp_path / "in.jsonl"
    bad.write_text('{"id": "a", "instruction": "x", "input": "", "output": "o", "thoughts": "", "source": "s"}\n'
                   '{"id": "a", "instruction": "y", "input": "", "output": "o", "thoughts": "", "source": "s"}\n')
    out = tmp_path / "out.jsonl"
    assert main(args(bad, out, tmp_path / "rejected.jsonl")) == 2
    assert capsys.readouterr().err.startswith(
        f"dromedary verbose-clone: error: {bad}:2: duplicate id 'a' (first seen on line 1)")
    assert not out.exists() and not (tmp_path / "rejected.jsonl").exists()


def test_same_file_for_output_and_rejected_is_refused(sft, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    assert main(args(sft, out, out)) == 2
    assert "--rejected must be a different file from --output" in capsys.readouterr().err


def test_a_run_cut_short_resumes_both_files(sft, reference, tmp_path, capsys):
    """As if killed after the first 5 records (and mid-line): the rerun writes exactly the rest."""
    out, rejected = tmp_path / "verbose.jsonl", tmp_path / "rejected.jsonl"
    first = {r["id"] for r in read_jsonl(sft)[:5]}
    for path, ref in ((out, reference[0]), (rejected, reference[1])):
        lines = ref.read_bytes().splitlines(keepends=True)
        path.write_bytes(b"".join(line for line in lines if json.loads(line)["id"] in first))
    with open(rejected, "ab") as f:
        f.write(b'{"id": "s7", "instr')
    assert main(args(sft, out, rejected)) == 0
    err = capsys.readouterr().err
    # Which of the first five were kept and which rejected depends on what the model sampled; the
    # two files together hold them, and only the other five are generated.
    assert f"resuming {N - 5}" in err or f"writing {N - 5} records" in err
    assert f"of {N} records already" in err
    assert (by_id(out), by_id(rejected)) == (by_id(reference[0]), by_id(reference[1]))


def test_a_record_too_long_for_the_context_window_is_named(tmp_path, capsys):
    inputs = write_jsonl(tmp_path / "in.jsonl", [
        {"id": "ok", "instruction": "Name a colour.", "input": "", "output": "Red.", "thoughts": "", "source": "s"},
        {"id": "huge", "instruction": "Summarise this.", "input": "camel " * 400, "output": "o", "thoughts": "",
         "source": "s"}])
    out = tmp_path / "out.jsonl"
    assert main(args(inputs, out, tmp_path / "rejected.jsonl", "--max_seq_len", 600)) == 2
    err = capsys.readouterr().err
    assert f"{inputs}: record 'huge'" in err and "exceeds the context window of 600 tokens" in err
    assert not out.exists() and not (tmp_path / "rejected.jsonl").exists()


def test_with_an_engraving_adapter(sft, tmp_path):
    """The stage's real use: the base model plus the LoRA adapter `finetune` wrote (two steps here)."""
    adapter = tmp_path / "adapter"
    run(python_m() + ["finetune", "--input", sft, "--output_dir", adapter, "--max_steps", 2, "--batch_size", 2])
    few = write_jsonl(tmp_path / "few.jsonl", read_jsonl(sft)[:4])
    out, rejected = tmp_path / "verbose.jsonl", tmp_path / "rejected.jsonl"
    run(python_m() + args(few, out, rejected, "--adapter", adapter))
    kept = records.read_kind(out, "sft")
    assert sorted(r["id"] for r in kept + read_jsonl(rejected)) == ["s0", "s1", "s2", "s3"]
    model = json.loads(Path(f"{out}.provenance.json").read_text())[-1]["model"]
    assert model.endswith(f" + adapter {adapter}")
