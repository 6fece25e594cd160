"""dromedary preferences: judge margins against transformers, the records, drops, resume, DP=2."""

import json
from dataclasses import replace

import pytest
import torch
from helpers_ckpt import (GQA, free_port, python_m, read_jsonl, run, torchrun, write_checkpoint, write_jsonl,
                          run_cli as main)

from dromedary.default_model import ensure_default_model
from dromedary.recipe import preferences as salmon
from dromedary.recipe import templates
from dromedary.stages import preferences as stage

N = 6
FLAGS = ["--max_new_tokens", 24, "--min_words", 1, "--seed", 5, "--max_batch_size", 4, "--chunk_size", 4]


def prompt_records(n):
    tasks = templates.load_seed_tasks()
    return [{"id": f"p{i}", "instruction": tasks[i]["instruction"], "input": tasks[i]["input"], "source": "t"}
            for i in range(n)]


@pytest.fixture(scope="module")
def default_model():
    return ensure_default_model()


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", prompt_records(N))


@pytest.fixture(scope="module")
def reference(default_model, prompts, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "prefs.jsonl"
    run(python_m() + ["preferences", "--input", prompts, "--output", out, *FLAGS])
    return out


def test_judge_margins_equal_the_labels_log_probabilities_under_transformers(tmp_path, tokenizer_path, world):
    from transformers import LlamaForCausalLM

    from dromedary.engine.builder import build
    from dromedary.engine.generation import Engine
    from dromedary.eval.scoring import Scorer

    ckpt = write_checkpoint(tmp_path / "hf", replace(GQA, max_seq_len=4096), seed=9, tokenizer=tokenizer_path,
                            layout="hf")
    loaded = build(str(ckpt), model_parallel_size=1, dtype="fp32", device="cpu")
    engine = Engine(loaded.model, loaded.tokenizer, prepack=False)
    ref = LlamaForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    tok = loaded.tokenizer
    dims = salmon.load_reward_principles()[:3]
    pairs = [{"id": "a", "instruction": "Name a large animal.", "input": "", "output_1": "The camel walks.",
              "output_2": "Water river city."},
             {"id": "b", "instruction": "Tell a story.", "input": "about tea", "output_1": "Hello there friend.",
              "output_2": "One two three four."}]
    got = stage.judge_scores(Scorer(engine, max_batch_size=3), pairs, dims)

    def label_logprob(context: str, label: str) -> float:
        head = tok.encode(context)
        whole = tok.encode(context + label)
        assert whole[: len(head)] == head
        with torch.no_grad():
            lp = torch.log_softmax(ref(torch.tensor([whole])).logits[0].float(), -1)
        return sum(float(lp[i - 1, whole[i]]) for i in range(len(head), len(whole)))

    for pair, scores in zip(pairs, got):
        assert list(scores) == [d.name for d in dims]
        for d in dims:
            forward = salmon.judge_prompt(pair["instruction"], pair["input"], pair["output_1"], pair["output_2"], d)
            backward = salmon.judge_prompt(pair["instruction"], pair["input"], pair["output_2"], pair["output_1"], d)
            s12 = label_logprob(forward, "1") - label_logprob(forward, "2")
            s21 = label_logprob(backward, "2") - label_logprob(backward, "1")
            assert scores[d.name] == pytest.approx([s12, s21], abs=1e-4)


def test_records_carry_both_order_scores_for_every_dimension(reference, prompts):
    out = read_jsonl(reference)
    inputs = {r["id"]: r for r in read_jsonl(prompts)}
    dims = [p.name for p in salmon.load_reward_principles()]
    assert out, "every pair was dropped"
    for r in out:
        assert {k: r[k] for k in inputs[r["id"]]} == inputs[r["id"]]
        assert r["output_1"] != r["output_2"] and r["output_1"] and r["output_2"]
        assert list(r["scores"]) == dims and all(len(s) == 2 for s in r["scores"].values())
        assert r["model"] == r["judge"] and r["prompt_version"]
    assert (reference.parent / (reference.name + ".provenance.json")).exists()


def test_short_or_identical_pairs_are_dropped_with_a_reason():
    assert stage.drop_reason("one two three", "one  two three", 1) == "identical"
    assert stage.drop_reason("ok", "a longer answer here", 3) == "too short"
    assert stage.drop_reason("a b c", "c b a", 3) is None


def test_greedy_answers_are_identical_and_dropped(default_model, prompts, tmp_path, capsys):
    out = tmp_path / "p.jsonl"
    assert main(["preferences", "--input", prompts, "--output", out, *FLAGS, "--temperature", 0]) == 0
    assert out.read_text() == ""
    assert "(identical)" in capsys.readouterr().err
    dropped = read_jsonl(tmp_path / "p.rejected.jsonl")
    assert [r["id"] for r in dropped] == [f"p{i}" for i in range(N)]
    assert all(r["reject_reason"] == "identical" and r["output_1"] == r["output_2"] for r in dropped)
    # Dropped pairs count as done: a rerun loads no model.
    assert main(["preferences", "--input", prompts, "--output", out, *FLAGS, "--temperature", 0]) == 0
    assert "nothing to do" in capsys.readouterr().err


def test_a_run_cut_short_resumes_to_what_one_run_writes(reference, prompts, tmp_path, capsys):
    import shutil

    out = tmp_path / "p.jsonl"
    shutil.copy(reference, out)
    shutil.copy(str(reference) + ".fingerprint.json", str(out) + ".fingerprint.json")
    lines = reference.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:2]) + lines[2][:40])  # two records and a partial line from a crash
    assert main(["preferences", "--input", prompts, "--output", out, *FLAGS]) == 0
    assert "resuming" in capsys.readouterr().err
    assert read_jsonl(out) == read_jsonl(reference)
    assert main(["preferences", "--input", prompts, "--output", out, *FLAGS]) == 0
    assert "nothing to do" in capsys.readouterr().err


def test_bad_input_stops_before_model_work(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "instruction": "x", "input": "", "source": "s"}\nnot json\n')
    out = tmp_path / "o.jsonl"
    assert main(["preferences", "--input", bad, "--output", out]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err and not out.exists()
    principles = tmp_path / "p.json"
    principles.write_text(json.dumps([{"name": "x"}]))
    good = write_jsonl(tmp_path / "good.jsonl", prompt_records(1))
    assert main(["preferences", "--input", good, "--output", out, "--principles", principles]) == 2
    assert "principle 0 needs" in capsys.readouterr().err and not out.exists()


def test_torchrun_data_parallel_2_matches_one_process(reference, prompts, tmp_path):
    out = tmp_path / "p.jsonl"
    run(torchrun() + ["--nproc_per_node", 2, "--master_port", free_port(), "-m", "dromedary", "preferences",
                      "--input", prompts, "--output", out, "--model_parallel_size", 1, *FLAGS], timeout=400)
    assert read_jsonl(out) == read_jsonl(reference)


def test_torchrun_model_parallel_2_matches_one_process(reference, prompts, tmp_path):
    out = tmp_path / "p.jsonl"
    run(torchrun() + ["--nproc_per_node", 2, "--master_port", free_port(), "-m", "dromedary", "preferences",
                      "--input", prompts, "--output", out, "--model_parallel_size", 2, *FLAGS], timeout=400)
    got, want = read_jsonl(out), read_jsonl(reference)
    assert [r["id"] for r in got] == [r["id"] for r in want]
    # Split over two ranks the fp32 sums round differently (logits ~4e-6 apart), so a sampled draw
    # that lands between the two can take another token (it does on AMD's oneDNN kernels, at one
    # token of one answer here); every other answer must be the same, and its scores too.
    same = [(a, b) for a, b in zip(got, want) if (a["output_1"], a["output_2"]) == (b["output_1"], b["output_2"])]
    assert len(same) >= len(want) - 1, [(a["output_1"], b["output_1"]) for a, b in zip(got, want)]
    for a, b in zip(got, want):
        for key in ("output_1", "output_2"):
            assert a[key][:16] == b[key][:16]
    for a, b in same:
        for d in b["scores"]:
            assert a["scores"][d] == pytest.approx(b["scores"][d], abs=1e-3)
