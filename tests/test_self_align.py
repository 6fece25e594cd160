"""`dromedary self-align` on the embedded default model: records, torchrun MP/DP, resume, bad input,
the context-window check."""

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers_ckpt import (REPO, free_port, python_m, read_jsonl, run, subprocess_env, torchrun, write_jsonl,
                          run_cli as main)

from dromedary import records
from dromedary.default_model import ensure_default_model
from dromedary.llama.tokenizer import Tokenizer
from dromedary.recipe import templates

N = 40
# Sampled (the paper's temperature and top-p are the defaults) so that seeds are really tested.
FLAGS = ["--max_new_tokens", 12, "--seed", 3, "--max_batch_size", 4]


def prompt_records(n: int) -> list[dict]:
    tasks = templates.load_seed_tasks()
    out = []
    for i in range(n):
        task = tasks[i % len(tasks)]
        record = {"id": f"p{i:03d}", "instruction": task["instruction"], "input": task["input"],
                  "source": "self-instruct"}
        if i % 5 == 0:  # optional fields of a TGRT prompt travel through unchanged
            record.update(source="tgrt", topic="Camels", question_type="factual")
        out.append(record)
    return out


@pytest.fixture(scope="module")
def default_model() -> Path:
    """Built here, in-process, if the cache lacks it: not inside a CLI subprocess with a timeout."""
    return ensure_default_model()


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", prompt_records(N))


def args(inputs, output, *extra):
    return ["self-align", "--input", inputs, "--output", output, *FLAGS, *extra]


@pytest.fixture(scope="module")
def reference(default_model, prompts, tmp_path_factory) -> Path:
    """One process, `python -m dromedary`, batches of 4."""
    out = tmp_path_factory.mktemp("reference") / "self_align.jsonl"
    run(python_m() + args(prompts, out))
    return out


def test_records_are_the_prompt_records_plus_the_generation(default_model, reference, prompts):
    got = records.read_kind(reference, "self-align")
    inputs = read_jsonl(prompts)
    assert sorted(r["id"] for r in got) == sorted(r["id"] for r in inputs)  # written as they finish
    for record, prompt in zip(sorted(got, key=lambda r: r["id"]), sorted(inputs, key=lambda r: r["id"])):
        assert set(record) == set(prompt) | {"generation", "prompt_version", "model"}
        assert {k: record[k] for k in prompt} == prompt
        assert record["prompt_version"] == templates.self_align_prompt_version()
        assert record["model"] == str(default_model)
        # Cut before the next turn: no stop string survives in the stored text.
        assert not any(stop in record["generation"] for stop in templates.self_align_stop_strings())
    # Sampled with a seed per record: the tiny model repeats itself, but not for every record.
    assert len({r["generation"] for r in got}) > N // 8
    provenance = json.loads(Path(f"{reference}.provenance.json").read_text())
    assert provenance[-1]["options"]["temperature"] == 0.7 and provenance[-1]["options"]["top_p"] == 0.95


def test_generation_is_the_text_after_the_internal_thoughts_cue(reference, world):
    """The stage's text equals the engine's continuation of templates.self_align_prompt, per-record seed."""
    from dromedary.engine.builder import build
    from dromedary.engine.generation import Engine, SamplingParams, row_seed

    loaded = build(None, model_parallel_size=1, device="cpu")
    engine = Engine(loaded.model, loaded.tokenizer)
    params = SamplingParams(max_new_tokens=12, temperature=0.7, top_p=0.95,
                            stop=tuple(templates.self_align_stop_strings()))
    for record in read_jsonl(reference)[:3]:
        prompt = templates.self_align_prompt(record["instruction"], record["input"])
        assert prompt.endswith(templates.internal_thoughts_cue())
        gen = engine.generate([prompt], params, seeds=[row_seed(3, record["id"])])[0]
        assert record["generation"] == gen.text


# --------------------------------------------------------------------------- torchrun

def test_torchrun_model_parallel_2_matches_one_process(prompts, reference, tmp_path):
    out = tmp_path / "out.jsonl"
    run(torchrun() + ["--nproc_per_node", 2, "--master_port", free_port(), "-m", "dromedary"] + args(prompts, out))
    assert out.read_bytes() == reference.read_bytes()
    assert json.loads(Path(f"{out}.provenance.json").read_text())[-1]["model_parallel_size"] == 2


def test_torchrun_data_parallel_2_matches_one_process(prompts, reference, tmp_path):
    out = tmp_path / "out.jsonl"
    run(torchrun() + ["--nproc_per_node", 2, "--master_port", free_port(), "-m", "dromedary"]
        + args(prompts, out, "--model_parallel_size", 1))
    assert by_id(out) == by_id(reference)  # the shards merged in input order, one process's as they finished
    assert not list(tmp_path.glob("out.jsonl.shard-*"))
    entry = json.loads(Path(f"{out}.provenance.json").read_text())[-1]
    assert (entry["world_size"], entry["model_parallel_size"]) == (2, 1)


# ----------------------------------------------------------------------------- resume

def by_id(path: Path) -> list[dict]:
    """A file's records by id: one process writes them as they finish, not in input order."""
    return sorted(read_jsonl(path), key=lambda r: r["id"])


def count_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def test_killed_run_resumes_with_nothing_lost_or_repeated(prompts, reference, tmp_path):
    """SIGKILL mid-run, a torn last line, a rerun: the same file as an uninterrupted run (which
    also used other batches: a record's text depends only on its seed)."""
    out = tmp_path / "out.jsonl"
    cmd = list(map(str, python_m() + args(prompts, out, "--max_batch_size", 1)))
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while count_lines(out) < 3 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    written = count_lines(out)
    assert 3 <= written < N, f"the run was not killed mid-way ({written} of {N} records written)"
    with open(out, "ab") as f:
        f.write(b'{"id": "p999", "instruction": "torn')

    resumed = run(cmd)
    assert f"{written} of {N} records already done; resuming {N - written}" in resumed.stderr
    assert "partial last line" in resumed.stderr
    assert by_id(out) == by_id(reference)


def test_rerunning_a_finished_run_does_nothing_and_says_so(prompts, reference, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    out.write_bytes(reference.read_bytes())
    assert main(args(prompts, out)) == 0
    assert f"all {N} records already done; nothing to do" in capsys.readouterr().err
    assert out.read_bytes() == reference.read_bytes()
    assert not Path(f"{out}.provenance.json").exists()


# -------------------------------------------------------------------------- bad input

BAD_INPUTS = [
    ('{"id": "a", "instruction": "x", "input": "", "source": "s"}\n{"id": "b", "instruction": \n', 2,
     "not valid JSON"),
    ('{"id": "a", "instruction": "x", "input": "", "source": "s"}\n{"id": "b", "instruction": "y", "source": "s"}\n',
     2, "missing required field 'input'"),
    ('{"id": "a", "instruction": "x", "input": "", "source": "s"}\n\n'
     '{"id": "a", "instruction": "y", "input": "", "source": "s"}\n', 3, "duplicate id 'a' (first seen on line 1)"),
]


@pytest.mark.parametrize("content, line, reason", BAD_INPUTS, ids=["broken-line", "missing-field", "duplicate-id"])
def test_bad_input_stops_with_file_line_reason_and_leaves_the_output_alone(tmp_path, capsys, content, line, reason):
    bad = tmp_path / "in.jsonl"
    bad.write_text(content)
    out = tmp_path / "out.jsonl"
    out.write_bytes(b'{"id": "a", "instruction": "x", "input": "", "source": "s", "generation": "g", '
                    b'"prompt_version": "v", "model": "m"}\n{"id": "b", "instr')  # even a partial tail
    before = out.read_bytes()
    assert main(args(bad, out)) == 2
    assert capsys.readouterr().err.startswith(f"dromedary self-align: error: {bad}:{line}: {reason}")
    assert out.read_bytes() == before


def test_prompt_too_long_for_the_context_window_names_the_fix(default_model, prompts, tmp_path, capsys):
    tokenizer = Tokenizer(default_model / "tokenizer.model")

    def prefix_tokens(k):
        return len(tokenizer.encode(templates.self_align_prefix(None, templates.DEFAULT_KNOWLEDGE_CUTOFF, k)))

    window = prefix_tokens(5) + 12 + 5  # room for 5 exemplars and --max_new_tokens 12, not for 6
    out = tmp_path / "out.jsonl"
    assert main(args(prompts, out, "--max_seq_len", window)) == 2
    err = capsys.readouterr().err
    assert "does not fit the context window" in err and "use --max_exemplars 5" in err
    assert prefix_tokens(6) + 12 > window
    assert not out.exists()

    # The prefix fits with 5 exemplars, but one request is far too long: named before any model work.
    short = [{"id": f"s{i}", "instruction": f"Name colour number {i}.", "input": "", "source": "s"} for i in range(3)]
    long = write_jsonl(tmp_path / "long.jsonl", short + [
        {"id": "huge", "instruction": "Summarise this.", "input": "camel " * 400, "source": "s"}])
    assert main(args(long, out, "--max_seq_len", prefix_tokens(5) + 150, "--max_exemplars", 5)) == 2
    err = capsys.readouterr().err
    assert f"{long}: record 'huge'" in err and "exceeds the context window" in err and "(1 record(s)" in err
    assert not out.exists()


@pytest.mark.parametrize("flags, message", [
    (["--max_batch_size", 0], "--max_batch_size must be at least 1"),
    (["--max_exemplars", 0], "--max_exemplars must be at least 1"),
    (["--temperature", -1], "temperature must be >= 0"),
    (["--assistant_name", "User"], "invalid assistant name"),
])
def test_bad_flags_are_one_line_errors_before_any_work(prompts, tmp_path, capsys, flags, message):
    assert main(args(prompts, tmp_path / "out.jsonl", *flags)) == 2
    err = capsys.readouterr().err
    assert err.startswith("dromedary self-align: error: ") and message in err
    assert not (tmp_path / "out.jsonl").exists()
