"""`dromedary curate`: the filters on crafted generations, the ShareGPT mix, and the stage end to end
on what the embedded default model generates after the self-align prompt."""

import json
import re
from collections import Counter
from pathlib import Path

import pytest
from helpers_ckpt import python_m, read_jsonl, run, write_jsonl, run_cli as main

from dromedary import records
from dromedary.default_model import ensure_default_model
from dromedary.recipe import templates, textfilters
from dromedary.stages.curate import Curator, read_sharegpt, report_table

DATA = Path(__file__).resolve().parent / "data"
SELF_ID = templates.self_identification_sentence()
CODENAME = templates.internal_codename()
MARKER = templates.answer_marker()


def generation(answer=None, thoughts="The user asks a plain question; (3 helpful) applies.", self_id=True):
    """What a model writes after the internal-thoughts cue."""
    text = (f"{SELF_ID} " if self_id else "") + thoughts
    return text if answer is None else f"{text}\n\n{MARKER}\n{answer}"


def self_align_record(gen, rid="r1", instruction="What is the tallest mountain on Earth?", input="", **extra):
    return {"id": rid, "instruction": instruction, "input": input, "source": "tgrt", **extra,
            "generation": gen, "prompt_version": "abc", "model": "/models/llama"}


def curator(name="Dromedary", telltales=None):
    return Curator(CODENAME, name, templates.exemplar_telltale_phrases() if telltales is None else telltales, 4)


def curate_one(gen, **kwargs):
    return curator().curate(self_align_record(gen, **kwargs))


ANSWER = "Mount Everest, at 8,849 metres above sea level, is the tallest mountain on Earth."


# ----------------------------------------------------------------------------- the filters

def test_a_good_answer_becomes_an_sft_record():
    sft, reason = curate_one(generation(ANSWER), topic="Mountains", question_type="factual")
    assert reason == ""
    assert sft == {"id": "r1", "instruction": "What is the tallest mountain on Earth?", "input": "",
                   "output": ANSWER, "thoughts": f"{SELF_ID} The user asks a plain question; (3 helpful) applies.",
                   "source": "tgrt", "topic": "Mountains", "question_type": "factual"}


def test_the_codename_becomes_the_assistant_name_in_answer_and_thoughts():
    gen = generation(f"I am {CODENAME}, an AI assistant. {CODENAME}'s knowledge has a cutoff date.",
                     thoughts=f"They ask who {CODENAME} is.")
    sft, _ = curator("Zed").curate(self_align_record(gen, instruction="Who are you and what can you do?"))
    assert sft["output"] == "I am Zed, an AI assistant. Zed's knowledge has a cutoff date."
    assert sft["thoughts"] == f"{SELF_ID} They ask who Zed is."
    assert CODENAME not in json.dumps(sft)


@pytest.mark.parametrize("gen, reason", [
    (generation(), "no answer"),  # no answer marker at all
    (generation("   \n"), "no answer"),  # a marker and nothing after it
    (generation("\n### User:\nAnd another question?"), "no answer"),  # straight into the next turn
    (generation(ANSWER, self_id=False), "no self-identification"),
    (generation(ANSWER, thoughts="", self_id=False).replace(MARKER, "Hmm. " + SELF_ID + "\n" + MARKER),
     "no self-identification"),  # the sentence, but not first
    ("", "no self-identification"),
    (f"{SELF_ID[:30]}\n{MARKER}\n{ANSWER}", "no self-identification"),  # cut short
])
def test_malformed_generations_are_rejected(gen, reason):
    sft, got = curate_one(gen)
    assert (sft, got) == (None, reason)


@pytest.mark.parametrize("tail", [
    "\n\n### User:\nThanks! And the second tallest?",
    "\n\n## user:\nThanks!",  # the '#'s and the case changed
    "\nUser:\nThanks!",  # a turn header that lost its '#'s
    f"\n\n### {CODENAME} (internal thoughts):\n{SELF_ID}",
    f"\n\n{templates.conversation_divider()}\n\n### User:\nHi",
    f"\n\n{CODENAME}:\nAnother answer.",  # a second answer
])
def test_the_answer_is_cut_at_the_next_turn(tail):
    sft, reason = curate_one(generation(ANSWER + tail))
    assert reason == "" and sft["output"] == ANSWER


def test_user_colon_inside_an_answer_is_content_not_a_turn():
    answer = "Log in with these settings:\nUser: admin\nPassword: the one you chose at setup."
    sft, _ = curate_one(generation(answer), instruction="How do I log in to the router's admin page?")
    assert sft["output"] == answer


def test_repeated_sentences_are_cut():
    loop = " It is in the Himalayas on the border of Nepal and China." * 5
    sft, reason = curate_one(generation(ANSWER + loop + " Climbers"))
    assert reason == ""
    assert sft["output"] == ANSWER + " It is in the Himalayas on the border of Nepal and China."


def test_short_sentences_and_code_may_repeat():
    answer = ("Yes. Use a loop:\n```python\nfor i in range(3):\n    total += i\n    total += i\n```\n"
              "Yes. That adds each number twice.")
    sft, _ = curate_one(generation(answer), instruction="Can I add each number twice in Python?")
    assert sft["output"] == answer


@pytest.mark.parametrize("answer, instruction, input", [
    ("What is the tallest mountain on Earth?", "What is the tallest mountain on Earth?", ""),
    ("the tallest mountain", "What is the tallest mountain on Earth?", ""),
    ("Translate to French: 'good morning'", "Translate to French.", "good morning"),
    ("Summarize the text. Camels store fat in their humps.", "Summarize the text.",
     "Camels store fat in their humps."),
    ("Camels store fat in their humps. OK.", "Summarize the text.", "Camels store fat in their humps."),
])
def test_echoes_of_the_request_are_rejected(answer, instruction, input):
    assert curate_one(generation(answer), instruction=instruction, input=input) == (None, "echo")


def test_short_answers_that_copy_nothing_are_not_echoes():
    sft, reason = curate_one(generation("Paris."), instruction="What is the capital of France?")
    assert reason == "" and sft["output"] == "Paris."


def test_every_telltale_phrase_of_the_exemplars_is_rejected():
    phrases = templates.exemplar_telltale_phrases()
    # They come from prompts/: every citation of principles.txt and the self-identification sentence.
    principles = (templates.prompts_dir() / "principles.txt").read_text()
    for number, name in re.findall(r"^(\d+) \(([^()\n]+)\)\.", principles, re.MULTILINE):
        assert f"({number} {name})" in phrases
    assert SELF_ID in phrases
    # Markers and the divider end the answer before any check; every other phrase rejects it.
    checked = [p for p in phrases if not p.startswith(("###", templates.conversation_divider()))]
    assert len(checked) > 20
    for phrase in checked:
        sft, reason = curate_one(generation(f"Here is my answer for you. {phrase} That is all I know."))
        # The first phrase found is named: an exemplar sentence may be caught by its citation.
        assert sft is None and reason.startswith("telltale phrase: "), phrase
        assert reason.removeprefix("telltale phrase: ") in phrase


def test_telltales_are_checked_in_answers_only_and_before_renaming():
    # Thoughts are meant to cite principles.
    sft, reason = curate_one(generation(ANSWER, thoughts="By (2 informative) I give the height."))
    assert reason == ""
    # A phrase written with the codename is caught even though renaming would have hidden it.
    c = curator(telltales=[f"{CODENAME} will now answer"])
    sft, reason = c.curate(self_align_record(generation(f"{CODENAME} will now answer: Mount Everest.")))
    assert (sft, reason) == (None, f"telltale phrase: {CODENAME} will now answer")


def test_duplicate_requests_keep_the_first():
    c = curator()
    first, _ = c.curate(self_align_record(generation(ANSWER), rid="a"))
    dup = self_align_record(generation(ANSWER), rid="b", instruction="what is the TALLEST mountain on earth")
    assert first is not None and c.curate(dup) == (None, "duplicate request")


# ------------------------------------------------------------------------------ the mix

def test_sharegpt_mix_takes_the_first_human_gpt_pair():
    mixed = read_sharegpt(str(DATA / "sharegpt_mix.json"))
    assert mixed == [
        {"id": "sharegpt:mix-1", "instruction": "How many legs does a spider have?", "input": "",
         "output": "A spider has eight legs, unlike insects, which have six.", "thoughts": "",
         "source": "sharegpt-mix"},
        {"id": "sharegpt:mix-2", "instruction": "Give me a synonym for 'happy'.", "input": "",
         "output": "Cheerful, as in 'a cheerful morning'.", "thoughts": "", "source": "sharegpt-mix"},
        {"id": "sharegpt:mix-3", "instruction": "What is the boiling point of water at sea level?", "input": "",
         "output": "Water boils at 100 degrees Celsius (212 degrees Fahrenheit) at sea level.", "thoughts": "",
         "source": "sharegpt-mix"},
        {"id": "sharegpt:5", "instruction": "Name a primary colour, please.", "input": "",
         "output": "Red is a primary colour.", "thoughts": "", "source": "sharegpt-mix"},
    ]  # mix-4 has no answer


@pytest.mark.parametrize("content, message", [
    ('{"id": "x"}', "expected a JSON list of conversations"),
    ('[{"conversations": []}]', 'item 0: expected an object with a non-empty "id"'),
    ('[{"id": "a", "conversations": [{"from": "human"}]}]', "item 0: expected \"conversations\""),
    ('[{"id": "a", "conversations": []}, {"id": "a", "conversations": []}]', "item 1: duplicate id 'a'"),
    ('[{"id": "a", "conversations": [}', ":1: not valid JSON"),
])
def test_malformed_mix_files_are_named(tmp_path, content, message):
    path = tmp_path / "mix.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=re.escape(message)):
        read_sharegpt(str(path))


def test_report_table():
    table = report_table(3, Counter({"echo": 1, "no answer": 4}), mixed_in=2)
    assert table.splitlines() == [
        "kept                          3   37.5%",
        "rejected: no answer           4   50.0%",
        "rejected: echo                1   12.5%",
        "total                         8",
        "mixed in (sharegpt)           2",
        "mix: duplicate request        0",
    ]


# ------------------------------------------------------------------- end to end, CLI

@pytest.fixture(scope="module")
def default_model() -> Path:
    """Built here, in-process, if the cache lacks it: not inside a CLI subprocess with a timeout."""
    return ensure_default_model()


@pytest.fixture(scope="module")
def self_aligned(default_model, tmp_path_factory) -> Path:
    """What the embedded default model writes after the self-align prompt, for 32 seed tasks
    (greedy: the tiny model copies its training text most faithfully that way)."""
    folder = tmp_path_factory.mktemp("self-align")
    tasks = templates.load_seed_tasks()[:32]
    prompts = write_jsonl(folder / "prompts.jsonl", [
        {"id": f"q{i:02d}", "instruction": t["instruction"], "input": t["input"], "source": "self-instruct"}
        for i, t in enumerate(tasks)])
    out = folder / "self_align.jsonl"
    run(python_m() + ["self-align", "--input", prompts, "--output", out, "--temperature", 0,
                      "--max_new_tokens", 200, "--max_batch_size", 8])
    return out


@pytest.fixture(scope="module")
def curated(self_aligned, tmp_path_factory):
    folder = tmp_path_factory.mktemp("curate")
    sft, rejected = folder / "sft.jsonl", folder / "rejected.jsonl"
    proc = run(python_m() + ["curate", "--input", self_aligned, "--output", sft, "--rejected", rejected])
    return sft, rejected, proc.stderr


def test_curate_keeps_some_of_the_default_models_answers(self_aligned, curated):
    sft_path, rejected_path, stderr = curated
    inputs = records.read_kind(self_aligned, "self-align")
    kept = records.read_kind(sft_path, "sft")
    rejected = records.read_kind(rejected_path, "rejected")
    print(f"\nembedded default model, {len(inputs)} records: kept {len(kept)}, rejected "
          f"{dict(Counter(r['reject_reason'].split(':')[0] for r in rejected))}\n{stderr}")
    assert len(kept) >= 1
    assert sorted(r["id"] for r in kept + rejected) == sorted(r["id"] for r in inputs)
    by_id = {r["id"]: r for r in inputs}
    for record in kept:
        source = by_id[record["id"]]
        assert set(record) == {"id", "instruction", "input", "output", "thoughts", "source"}
        assert (record["instruction"], record["input"], record["source"]) == \
               (source["instruction"], source["input"], source["source"])
        parsed = templates.parse_self_align(source["generation"])
        assert parsed["thoughts"].startswith(SELF_ID) and record["output"].strip()
        assert CODENAME not in record["output"]
    for record in rejected:
        assert {k: v for k, v in record.items() if k != "reject_reason"} == by_id[record["id"]]
    reasons = {r["reject_reason"].split(":")[0] for r in rejected}
    assert reasons <= {"no self-identification", "no answer", "echo", "telltale phrase", "duplicate request"}
    assert re.search(rf"^kept +{len(kept)} ", stderr, re.MULTILINE)
    assert re.search(rf"^total +{len(inputs)}$", stderr, re.MULTILINE)
    assert json.loads(Path(f"{sft_path}.provenance.json").read_text())[-1]["kept"] == len(kept)


def test_rerun_does_nothing_and_a_cut_run_resumes(self_aligned, curated, tmp_path, capsys):
    sft_path, rejected_path, _ = curated
    sft, rejected = tmp_path / "sft.jsonl", tmp_path / "rejected.jsonl"
    sft.write_bytes(sft_path.read_bytes())
    rejected.write_bytes(rejected_path.read_bytes())
    argv = ["curate", "--input", self_aligned, "--output", sft, "--rejected", rejected]
    assert main(argv) == 0
    assert "nothing to do" in capsys.readouterr().err
    assert (sft.read_bytes(), rejected.read_bytes()) == (sft_path.read_bytes(), rejected_path.read_bytes())

    # A run killed after a few records, mid-line: the rerun writes exactly the rest.
    n = len(read_jsonl(self_aligned))
    lines = rejected_path.read_bytes().splitlines(keepends=True)
    rejected.write_bytes(b"".join(lines[:2]) + lines[2][:20])
    sft.write_bytes(b"")
    assert main(argv) == 0
    assert f"2 of {n} records already done; resuming {n - 2}" in capsys.readouterr().err
    assert sft.read_bytes() == sft_path.read_bytes()
    assert sorted(rejected.read_bytes().splitlines()) == sorted(rejected_path.read_bytes().splitlines())


def test_mix_appends_sharegpt_records(self_aligned, curated, tmp_path, capsys):
    sft = tmp_path / "sft.jsonl"
    assert main(["curate", "--input", self_aligned, "--output", sft, "--mix", DATA / "sharegpt_mix.json"]) == 0
    got = records.read_kind(sft, "sft")
    assert got[: -4] == records.read_kind(curated[0], "sft")
    assert [r["id"] for r in got[-4:]] == ["sharegpt:mix-1", "sharegpt:mix-2", "sharegpt:mix-3", "sharegpt:5"]
    assert {r["source"] for r in got[-4:]} == {"sharegpt-mix"}
    assert re.search(r"^mixed in \(sharegpt\) +4$", capsys.readouterr().err, re.MULTILINE)


BAD_INPUTS = [
    ('{"id": "a", "instruction": "x", "input": "", "source": "s", "generation": "g", "prompt_version": "v", '
     '"model": "m"}\n{"id": "b"', 2, "not valid JSON"),
    ('{"id": "a", "instruction": "x", "input": "", "source": "s", "prompt_version": "v", "model": "m"}\n', 1,
     "missing required field 'generation'"),
    ('{"id": "a", "instruction": "x", "input": "", "source": "s", "generation": "g", "prompt_version": "v", '
     '"model": "m"}\n' * 2, 2, "duplicate id 'a' (first seen on line 1)"),
]


@pytest.mark.parametrize("content, line, reason", BAD_INPUTS, ids=["broken-line", "missing-field", "duplicate-id"])
def test_bad_input_stops_with_file_line_reason_and_leaves_the_outputs_alone(tmp_path, capsys, content, line, reason):
    bad = tmp_path / "in.jsonl"
    bad.write_text(content)
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"id": "z", "instruction": "i", "input": "", "output": "o",
                                               "thoughts": "t", "source": "s"}])
    before = sft.read_bytes()
    assert main(["curate", "--input", bad, "--output", sft, "--rejected", tmp_path / "rejected.jsonl"]) == 2
    assert capsys.readouterr().err.startswith(f"dromedary curate: error: {bad}:{line}: {reason}")
    assert sft.read_bytes() == before
    assert not (tmp_path / "rejected.jsonl").exists()


def test_overwrite_moves_the_old_outputs_aside(self_aligned, curated, tmp_path):
    sft, rejected = tmp_path / "sft.jsonl", tmp_path / "rejected.jsonl"
    sft.write_text('{"id": "old", "instruction": "i", "input": "", "output": "o", "thoughts": "", "source": "s"}\n')
    assert main(["curate", "--input", self_aligned, "--output", sft, "--rejected", rejected, "--overwrite"]) == 0
    assert sft.read_bytes() == curated[0].read_bytes()
    (backup,) = tmp_path.glob("sft.jsonl.bak-*[0-9]")  # SFT.bak-TIME: a new name every time
    assert "old" in backup.read_text()


def test_filters_are_plain_functions_on_strings():
    # The pieces the two answer-producing stages share.
    assert textfilters.cut_at_next_turn("An answer.\n### Dromedary:\nmore", ["User", "Dromedary"]) == "An answer."
    assert textfilters.cut_repeated_sentences("One two three four. One two three four.") == ("One two three four.", True)
    assert textfilters.rename("Lodestar's, Lodestars", "Lodestar", "Zed") == "Zed's, Lodestars"
    assert textfilters.shared_run("so I say the cat sat on the mat today", "a cat sat on the mat", 5) == \
        "cat sat on the mat"


def test_a_prompt_name_mismatch_gets_a_hint(tmp_path, capsys):
    inputs = write_jsonl(tmp_path / "in.jsonl", [self_align_record(generation(ANSWER).replace(CODENAME, "Zed"))])
    argv = ["curate", "--input", inputs, "--output", tmp_path / "sft.jsonl"]
    assert main(argv) == 0
    assert "pass --prompt_name NAME" in capsys.readouterr().err
    assert main(argv + ["--prompt_name", "Zed", "--overwrite"]) == 0
    assert records.read_kind(tmp_path / "sft.jsonl", "sft")[0]["output"] == ANSWER
