"""`dromedary generate-prompts`: filters, ROUGE-L, source importers, and each method end to end."""

import json
import random
from pathlib import Path

import pytest
from helpers_ckpt import REPO, free_port, python_m, read_jsonl, run, torchrun

from dromedary import cli, distributed, records
from dromedary.recipe import filters, importers, templates
from dromedary.stages.generate_prompts import prompt_id

DATA = REPO / "tests" / "data" / "import"


@pytest.fixture(scope="module")
def default_model() -> Path:
    """The embedded default model, built once (into the session's cache) before any CLI run."""
    from dromedary.default_model import ensure_default_model

    return ensure_default_model()


def gp(*args, check=True, **kwargs):
    return run(python_m() + ["generate-prompts", *args], check=check, **kwargs)


def main(args, capsys) -> tuple[int, str]:
    """`dromedary generate-prompts ...` in this process (flag checks: no model is loaded)."""
    had_world = distributed._WORLD is not None
    try:
        code = cli.main(["generate-prompts", *map(str, args)])
    finally:
        if had_world:  # the CLI tears the process groups down; other tests' models need them
            distributed.setup(1, "cpu")
    return code, capsys.readouterr().err


# --------------------------------------------------------------------------- ROUGE-L


def test_rouge_l_on_crafted_pairs():
    assert filters.rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    # LCS "the cat on the mat" = 5 of 6 and 6 tokens: F = 2 * 5 / 12.
    assert filters.rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(10 / 12)
    # Case and punctuation do not count; order does: LCS of (a b c d) and (d c b a) is 1.
    assert filters.rouge_l("Hello, World!", "hello world") == 1.0
    assert filters.rouge_l("a b c d", "d c b a") == pytest.approx(2 / 8)
    assert filters.rouge_l("alpha beta", "gamma delta") == 0.0
    assert filters.rouge_l("", "anything") == 0.0 and filters.rouge_l("...", "...") == 0.0
    # Unequal lengths: LCS 3, lengths 3 and 9.
    assert filters.rouge_l("write a poem", "please write me a short poem about the sea") == pytest.approx(6 / 12)
    assert filters.rouge_tokens("Café au-lait, 2 cups") == ["café", "au", "lait", "2", "cups"]


def test_rouge_index_matches_pairwise_dynamic_programming():
    rng = random.Random(0)
    words = "a b c d e f g h".split()
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 150))) for _ in range(50)]
    texts += ["", "zzz unseen words only"]
    index = filters.RougeLIndex(texts)
    assert len(index) == len(texts)
    for _ in range(12):  # queries up to 200 tokens: bit masks of several 64-bit words
        query = " ".join(rng.choice(words + ["q"]) for _ in range(rng.randint(0, 200)))
        expected = [filters.rouge_l(query, t) for t in texts]
        assert index.scores(query).tolist() == pytest.approx(expected, abs=1e-12)


def test_rouge_index_most_similar_and_growth():
    index = filters.RougeLIndex()
    assert index.max_score("anything") == (0.0, None)
    for text in ["Give three tips for staying healthy.", "Translate the sentence into French.",
                 "Write a haiku about autumn leaves."]:
        index.add(text)
    score, best = index.max_score("Give three tips for staying calm.")
    assert index.texts[best] == "Give three tips for staying healthy." and score == pytest.approx(10 / 12)
    for i in range(40):  # past the first bucket's capacity: the arrays grow and keep order
        index.add(f"task number {i} about topic {i}")
    assert index.max_score("task number 17 about topic 17") == (1.0, 3 + 17)


# --------------------------------------------------------------------------- text filters


@pytest.mark.parametrize("instruction, reason", [
    ("Write a haiku about the sea.", None),
    ("Summarise the passage below in two sentences.", None),
    ("Write a poem.", "too_short"),
    (" ".join(["word"] * 151), "too_long"),
    ("- List three fruits that are red.", "punctuation_start"),
    ("\"Explain why the sky is blue.\"", "punctuation_start"),
    ("Ünderstand the text and summarise it.", "non_ascii_start"),
    ("Describe the image below in detail.", "unactionable:image"),
    ("Draw a cat using only the letters.", "unactionable:draw"),
    ("Please GO   TO the store and buy milk.", "unactionable:go to"),
    ("Plot the monthly sales for this year.", "unactionable:plot"),
    ("Create a flowchart of the hiring process.", "unactionable:flowchart"),
    # Whole words only: "profile", "mapping" and "filed" are fine.
    ("Write a short profile of a mapping expert who filed a patent.", None),
])
def test_instruction_filter(instruction, reason):
    assert filters.InstructionFilter().reject_reason(instruction) == reason


def test_instruction_filter_bounds_are_checked():
    assert filters.InstructionFilter(min_words=1, max_words=2).reject_reason("Sum these") is None
    with pytest.raises(ValueError, match="min_words"):
        filters.InstructionFilter(min_words=5, max_words=4)


def test_clean_text_and_dedupe_key():
    raw = "  How do I  make \t a starter?\r\n\r\n\r\n\r\ndef f():\r\n    return 1   \r\n\x00"
    assert filters.clean_text(raw) == "How do I make a starter?\n\ndef f():\n    return 1"
    assert filters.clean_text("name\tage\nAda\t36") == "name\tage\nAda\t36"  # one tab: a table
    assert filters.dedupe_key("Name three  primary colors.") == filters.dedupe_key("name three primary colors")
    assert filters.dedupe_key("ﬁve") == filters.dedupe_key("five")  # NFKC
    assert filters.blocked_word("see the attached files") == "attached"


# --------------------------------------------------------------------------- importers


def write_parquet(rows: list[dict], path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture(scope="module")
def orca_parquet(tmp_path_factory) -> Path:
    """OpenOrca ships as parquet: the same rows as openorca.jsonl, in that format."""
    return write_parquet(read_jsonl(DATA / "openorca.jsonl"), tmp_path_factory.mktemp("orca") / "orca.parquet")


def all_sources(orca_parquet) -> dict:
    return {"sharegpt": str(DATA / "sharegpt.json"), "dolly": str(DATA / "dolly.jsonl"),
            "oasst1": str(DATA / "oasst1.jsonl"), "openorca": str(orca_parquet)}


def test_json_array_rows_carry_the_line_they_start_on():
    rows = list(importers.read_rows(DATA / "sharegpt.json"))
    assert [str(where) for where, _ in rows][:3] == [f"{DATA / 'sharegpt.json'}:{n}" for n in (2, 11, 18)]
    assert [obj["id"] for _, obj in rows] == ["QWJ9x1k", "b7Hk2Pz_0", "Zz81QaS", "dupe01", "empty1", "nohuman",
                                              "short1"]


def test_parquet_and_jsonl_give_the_same_rows(orca_parquet):
    assert [o for _, o in importers.read_rows(orca_parquet)] == read_jsonl(DATA / "openorca.jsonl")
    assert str(next(importers.read_rows(orca_parquet))[0]) == f"{orca_parquet}:row 1"


def test_first_human_turn_rules():
    where = importers.Location("x.json", line=1)
    sharegpt = {"id": 7, "conversations": [{"from": "system", "value": "Be brief."},
                                           {"from": "human", "value": "Hi there, how are you?"},
                                           {"from": "gpt", "value": "Fine."},
                                           {"from": "human", "value": "Later turn"}]}
    assert importers.first_turn("sharegpt", sharegpt, where) == ("7", "Hi there, how are you?", "")
    gpt_first = {"id": "a", "conversations": [{"from": "gpt", "value": "..."}, {"from": "human", "value": "So?"}]}
    assert importers.first_turn("sharegpt", gpt_first, where) == "assistant_first"
    assert importers.first_turn("dolly", {"instruction": "Summarise.", "context": "Text.", "response": "T.",
                                          "category": "summarization"}, where) == ("x.json:1", "Summarise.", "Text.")
    rows = read_jsonl(DATA / "oasst1.jsonl")
    assert importers.first_turn("oasst1", rows[0], where)[0] == rows[0]["message_id"]
    assert importers.first_turn("oasst1", rows[1], where) == "not_first_turn"  # assistant reply
    assert importers.first_turn("oasst1", rows[2], where) == "not_first_turn"  # prompter follow-up
    assert importers.first_turn("oasst1", rows[4], where) == "deleted_or_rejected"
    orca = read_jsonl(DATA / "openorca.jsonl")[1]
    assert importers.first_turn("openorca", orca, where) == ("flan.564327", orca["question"], "")


def test_collect_cleans_dedupes_filters_and_keeps_source_order(orca_parquet):
    prompts, stats = importers.collect(all_sources(orca_parquet), min_chars=10, max_chars=4000,
                                       per_source=None, seed=0)
    assert [(p.source, p.source_id) for p in prompts] == [
        ("sharegpt", "QWJ9x1k"), ("sharegpt", "Zz81QaS"),
        ("dolly", "dolly.jsonl:1"), ("dolly", "dolly.jsonl:2"), ("dolly", "dolly.jsonl:3"), ("dolly", "dolly.jsonl:5"),
        ("oasst1", "6ab24d72-0181-4594-a9cd-deaf170242fb"), ("oasst1", "e4a3b0a5-1d1c-4d3e-9c5a-3f0d8b7a2c11"),
        ("openorca", "niv.242684"), ("openorca", "flan.564327"),
    ]
    assert prompts[0].instruction == "How do I make a sourdough starter from scratch?"  # stripped, collapsed
    assert prompts[1].instruction == "Fix this Python function:\n\ndef add(a, b):\n    return a - b\n\nIt should add."
    assert prompts[2].input.startswith("Virgin Australia, the trading name")  # Dolly's context is the input
    skipped = {f"{s}:{r}": n for (s, r), n in stats.skipped.items()}
    assert skipped == {"sharegpt:assistant_first": 1, "sharegpt:duplicate": 1, "sharegpt:empty": 1,
                       "sharegpt:no_human_turn": 1, "sharegpt:too_short": 1, "dolly:duplicate": 1,
                       "oasst1:not_first_turn": 2, "oasst1:deleted_or_rejected": 1,
                       "openorca:duplicate": 2}  # both also in Dolly, which is read first
    assert stats.rows == {"sharegpt": 7, "dolly": 5, "oasst1": 5, "openorca": 4}


def test_collect_length_limits_and_seeded_subsample(orca_parquet):
    sources = all_sources(orca_parquet)
    long_ones, _ = importers.collect(sources, min_chars=60, max_chars=200, per_source=None, seed=0)
    assert all(60 <= len(p.instruction) + len(p.input) <= 200 for p in long_ones) and long_ones
    one, stats = importers.collect(sources, min_chars=10, max_chars=4000, per_source=1, seed=3)
    assert [p.source for p in one] == ["sharegpt", "dolly", "oasst1", "openorca"]
    assert stats.skipped["dolly", "subsampled"] == 3
    again, _ = importers.collect(sources, min_chars=10, max_chars=4000, per_source=2, seed=3)
    assert again == importers.collect(sources, min_chars=10, max_chars=4000, per_source=2, seed=3)[0]
    seeds = {tuple(p.source_id for p in importers.collect(sources, min_chars=10, max_chars=4000, per_source=2,
                                                         seed=s)[0]) for s in range(8)}
    assert len(seeds) > 1  # the seed picks the sample


@pytest.mark.parametrize("name, text, message", [
    ("bad.jsonl", '{"instruction": "a", "context": ""}\n\n{"instruction": "b", "context": ""\n', ":3: not valid JSON"),
    ("bad.jsonl", '{"instruction": "a"}\n["a list"]\n', ":2: expected a JSON object, got list"),
    ("bad.jsonl", '{"instruction": 5, "context": ""}\n', ":1: field 'instruction' must be string, got int"),
    ("bad.json", '[\n  {"instruction": "a"},\n  {"context": "b"}\n]\n', ":3: missing required field 'instruction'"),
    ("bad.json", '[\n  {"instruction": "a"},\n  {"instruction": \n', ":4: not valid JSON"),
    ("bad.json", '[\n  {"instruction": "a"}\n  {"instruction": "b"}\n]', ":3: not valid JSON (expected ','"),
])
def test_bad_rows_stop_with_file_and_line(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError) as err:
        importers.collect({"dolly": str(path)}, min_chars=0, max_chars=100, per_source=None, seed=0)
    assert str(err.value).startswith(f"{path}{message}")


def test_bad_parquet_row_names_the_row(tmp_path):
    path = write_parquet([{"id": "a", "question": "What is two plus two?"}, {"id": "b", "question": None}],
                         tmp_path / "orca.parquet")
    with pytest.raises(ValueError, match=rf"^{path}:row 2: field 'question' must be string, got NoneType"):
        importers.collect({"openorca": str(path)}, min_chars=0, max_chars=100, per_source=None, seed=0)


def test_hub_name_without_network_fails_with_the_fix(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="cannot load the Hugging Face dataset 'someone/no-such-set'.*local path"):
        importers.collect({"dolly": "someone/no-such-set"}, min_chars=0, max_chars=100, per_source=None, seed=0)
    with pytest.raises(FileNotFoundError, match="missing.jsonl: no such input file"):
        importers.collect({"dolly": "missing.jsonl"}, min_chars=0, max_chars=100, per_source=None, seed=0)


# --------------------------------------------------------------------------- flags


@pytest.mark.parametrize("args, message", [
    (["--method", "magic"], "--method 'magic': choose one of tgrt, self-instruct, import"),
    (["--method", "import"], "--method import needs --sources"),
    (["--method", "import", "--sources", '{"dolly": "d.jsonl"}', "--ckpt_dir", "x"], "runs no model: drop --ckpt_dir"),
    (["--method", "import", "--sources", '{"dolly": "d.jsonl"}', "--include_seeds"], "--include_seeds is for"),
    (["--method", "import", "--sources", '{"wiki": "w.jsonl"}'], "unknown source(s) wiki"),
    (["--method", "tgrt"], "--method tgrt needs --num_prompts"),
    (["--method", "tgrt", "--num_prompts", 3, "--sources", '{"dolly": "d"}'], "--sources and --per_source are for"),
    (["--method", "self-instruct", "--num_prompts", 3, "--temperature", 0], "--temperature must be > 0"),
    (["--method", "self-instruct", "--num_prompts", 3, "--similarity_threshold", 1.5], "--similarity_threshold"),
    (["--method", "self-instruct", "--num_prompts", 3, "--seeds_per_request", 999], "there are only"),
    (["--method", "self-instruct", "--num_prompts", 3, "--min_words", 9, "--max_words", 3], "min_words"),
])
def test_bad_flag_combinations_fail_before_any_model_work(tmp_path, capsys, args, message):
    out = tmp_path / "out.jsonl"
    code, err = main([*args, "--output", out], capsys)
    assert code == 2
    assert message in err
    assert not out.exists()


# --------------------------------------------------------------------------- import end to end


def test_cli_import_end_to_end(tmp_path, orca_parquet):
    out = tmp_path / "prompts.jsonl"
    sources = json.dumps(all_sources(orca_parquet))
    first = gp("--method", "import", "--sources", sources, "--output", out)
    assert "writing 10 records" in first.stderr
    rows = records.read_kind(out, "prompts")
    assert [r["source"] for r in rows] == ["sharegpt"] * 2 + ["dolly"] * 4 + ["oasst1"] * 2 + ["openorca"] * 2
    for r in rows:
        assert r["id"] == prompt_id(r["source"], r["instruction"], r["input"])
    assert rows[2]["input"].startswith("Virgin Australia")
    assert json.loads(Path(f"{out}.provenance.json").read_text())[-1]["import"]["kept"]["dolly"] == 4
    text = out.read_text()
    again = gp("--method", "import", "--sources", sources, "--output", out)
    assert "nothing to do" in again.stderr and out.read_text() == text
    # A subsample asked later appends nothing new (its prompts are already there).
    gp("--method", "import", "--sources", sources, "--output", out, "--per_source", 1)
    assert out.read_text() == text
    # Stable ids: a rerun from scratch writes the same records; a smaller run writes a subset.
    gp("--method", "import", "--sources", sources, "--output", out, "--overwrite")
    assert out.read_text() == text
    small = tmp_path / "small.jsonl"
    gp("--method", "import", "--sources", sources, "--output", small, "--num_prompts", 4, "--seed", 1)
    assert len(read_jsonl(small)) == 4 and all(r in rows for r in read_jsonl(small))


def test_cli_import_bad_file_exits_with_file_line(tmp_path):
    bad = tmp_path / "sharegpt.json"
    bad.write_text('[\n {"id": "a", "conversations": []},\n {"id": "b"}\n]\n', encoding="utf-8")
    out = tmp_path / "out.jsonl"
    proc = gp("--method", "import", "--sources", json.dumps({"sharegpt": str(bad)}), "--output", out, check=False)
    assert proc.returncode == 2
    assert f"{bad}:3: missing required field 'conversations'" in proc.stderr
    assert not out.exists()


# --------------------------------------------------------------------------- model methods end to end

SELF_INSTRUCT = ["--method", "self-instruct", "--num_prompts", 5, "--tasks_per_request", 2, "--seed", 7]


@pytest.fixture(scope="module")
def self_instruct_run(default_model, tmp_path_factory) -> tuple[Path, list[dict], str]:
    out = tmp_path_factory.mktemp("self_instruct") / "prompts.jsonl"
    proc = gp(*SELF_INSTRUCT, "--output", out)
    return out, read_jsonl(out), proc.stderr


def test_cli_self_instruct_writes_filtered_model_tasks(self_instruct_run):
    out, rows, stderr = self_instruct_run
    assert len(rows) == 5, stderr  # the tiny model's tasks are poor, but some pass the filters
    records.read_kind(out, "prompts")
    check = filters.InstructionFilter()
    kept = filters.RougeLIndex(t["instruction"] for t in templates.load_seed_tasks())
    for r in rows:
        assert r["source"] == "self-instruct" and r["id"] == prompt_id("self-instruct", r["instruction"], r["input"])
        assert check.reject_reason(r["instruction"]) is None
        scores = kept.scores(r["instruction"])
        assert scores.max() <= 0.7
        assert r["avg_similarity"] == round(float(scores.mean()), 4)
        assert r["most_similar"] == kept.texts[int(scores.argmax())]
        kept.add(r["instruction"])
    provenance = json.loads(Path(f"{out}.provenance.json").read_text())[-1]
    assert provenance["counts"]["candidates"] >= 5 and provenance["options"]["method"] == "self-instruct"


def test_cli_self_instruct_reruns_are_stable_and_resume(self_instruct_run, tmp_path):
    out, rows, _ = self_instruct_run
    text = out.read_text()
    assert "nothing to do" in gp(*SELF_INSTRUCT, "--output", out).stderr
    assert out.read_text() == text
    # The seed makes a run repeatable, ids included.
    fresh = tmp_path / "fresh.jsonl"
    gp(*SELF_INSTRUCT, "--output", fresh)
    assert fresh.read_text() == text
    # Asking for more continues from the recorded rounds and keeps what is there.
    gp(*SELF_INSTRUCT[:3], 8, *SELF_INSTRUCT[4:], "--output", fresh)
    more = read_jsonl(fresh)
    assert len(more) == 8 and more[:5] == rows and len({r["id"] for r in more}) == 8
    # A crash: the last records lost, a partial line left behind, the state file gone.
    lines = fresh.read_text().splitlines(keepends=True)
    fresh.write_text("".join(lines[:2]) + lines[2][:30])
    Path(f"{fresh}.state.json").unlink()
    gp(*SELF_INSTRUCT[:3], 8, *SELF_INSTRUCT[4:], "--output", fresh)
    resumed = records.read_kind(fresh, "prompts")
    assert len(resumed) == 8 and resumed[:2] == rows[:2] and len({r["id"] for r in resumed}) == 8


def test_cli_self_instruct_data_parallel_matches_one_process(self_instruct_run, tmp_path):
    """Two data-parallel groups split the requests; rank 0 filters, so the output is the same."""
    _, rows, _ = self_instruct_run
    out = tmp_path / "dp.jsonl"
    run(torchrun() + ["--nproc_per_node", 2, "--master_port", free_port(), "-m", "dromedary", "generate-prompts",
                      *SELF_INSTRUCT, "--output", out, "--model_parallel_size", 1])
    assert read_jsonl(out) == rows
    assert json.loads(Path(f"{out}.provenance.json").read_text())[-1]["world_size"] == 2


def test_cli_tgrt_writes_questions_about_their_topics(default_model, tmp_path):
    out = tmp_path / "tgrt.jsonl"
    # The tiny model writes about one question in several hundred that is a line about its topic:
    # big batches and enough rounds, so that the run is short and still certain to find some.
    args = ["--method", "tgrt", "--num_prompts", 1, "--output", out, "--max_batch_size", 32,
            "--topics_per_type", 6, "--topic_rounds", 1, "--max_rounds", 8]
    proc = gp(*args)
    rows = records.read_kind(out, "prompts")
    assert len(rows) == 1, proc.stderr
    state = json.loads(Path(f"{out}.state.json").read_text())
    types = {t.name for t in templates.load_question_types()}
    for r in rows:
        assert r["source"] == "tgrt" and r["question_type"] in types and r["input"] == ""
        assert r["topic"] in state["topics"][r["question_type"]]
        assert templates.parse_tgrt_question(r["instruction"], r["topic"]) == r["instruction"]
        assert r["id"] == prompt_id("tgrt", r["instruction"])
    counts = json.loads(Path(f"{out}.provenance.json").read_text())[-1]["counts"]
    assert counts["requests"] > counts["candidates"] > 0  # brainstorm requests are not candidates
    text = out.read_text()
    assert "nothing to do" in gp(*args).stderr and out.read_text() == text
    # Seeds on request, added to a finished run without loading the model.
    proc = gp(*args, "--include_seeds")
    assert "wrote 60 seed records" in proc.stderr
    after = records.read_kind(out, "prompts")
    assert after[:1] == rows and {r["source"] for r in after[1:]} == {"tgrt-seed"}
    assert {r["instruction"] for r in after[1:]} == {s.question for t in templates.load_question_types()
                                                      for s in t.seeds}


def test_cli_generating_methods_check_the_output_before_the_model(tmp_path, orca_parquet):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"id": "a", "instruction": "x", "input": "", "source": "tgrt"}\n{"id": \n'
                      '{"id": "b", "instruction": "y", "input": "", "source": "tgrt"}\n')
    proc = gp("--method", "tgrt", "--num_prompts", 3, "--output", broken, "--ckpt_dir", tmp_path / "no-model",
              check=False)
    assert proc.returncode == 2 and f"{broken}:2: " in proc.stderr
    imported = tmp_path / "imported.jsonl"
    gp("--method", "import", "--sources", json.dumps({"dolly": str(DATA / "dolly.jsonl")}), "--output", imported)
    proc = gp("--method", "self-instruct", "--num_prompts", 3, "--output", imported,
              "--ckpt_dir", tmp_path / "no-model", check=False)
    assert proc.returncode == 2 and "already holds dolly prompts" in proc.stderr
