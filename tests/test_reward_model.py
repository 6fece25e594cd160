"""dromedary reward-model and dromedary reward: learning a synthetic principle-following task,
exact resume, DP=2 / MP=2 first-step loss, and rewards against transformers + peft."""

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers_ckpt import (GQA, free_port, python_m, read_jsonl, run, torchrun, write_checkpoint, write_jsonl,
                          run_cli as main)

from dromedary.default_model import ensure_default_model
from dromedary.recipe import preferences as salmon

CAMEL = ["The camel walks across the desert sand.", "A camel can carry water for days.",
         "Camels rest at night in the desert."]
OTHER = ["The river runs past the city.", "People drink tea in the morning.", "Bread is sold at the market."]
PRINCIPLES = {"principles": [{"name": "camels", "definition": "The reply talks about camels.",
                              "negative": "The reply never mentions camels."}]}


def synthetic(n: int, seed: int = 0) -> list[dict]:
    """The judge liked whichever reply is about camels; with the principle negated half the time,
    a reward model can only be right by reading its principle."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        camel_first = rng.random() < 0.5
        c, o = rng.choice(CAMEL), rng.choice(OTHER)
        m = rng.uniform(1, 3) * (1 if camel_first else -1)
        out.append({"id": f"s{i}", "instruction": "Tell me something.", "input": "", "source": "synthetic",
                    "output_1": c if camel_first else o, "output_2": o if camel_first else c,
                    "scores": {"camels": [m, m]}})
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm_data")
    (root / "principles.json").write_text(json.dumps(PRINCIPLES))
    return write_jsonl(root / "prefs.jsonl", synthetic(120)), root / "principles.json"


@pytest.fixture(scope="module")
def default_model():
    return ensure_default_model()


def flags(data, *extra):
    prefs, principles = data
    return ["--input", prefs, "--principles", principles, "--passes", 1, "--batch_size", 8, "--micro_batch_size", 4,
            "--learning_rate", 1e-3, *extra]


def test_training_learns_the_principle_and_follows_its_negation(default_model, data, tmp_path, capsys):
    out = tmp_path / "rm"
    assert main(["reward-model", *flags(data), "--output_dir", out, "--max_steps", 40, "--eval_steps", 10,
                 "--micro_batch_size", 8, "--batch_size", 16]) == 0
    err = capsys.readouterr().err
    log = read_jsonl(out / "train_log.jsonl")
    first, last = sum(e["loss"] for e in log[:5]) / 5, sum(e["loss"] for e in log[-5:]) / 5
    evals = [e["eval_accuracy"] for e in log if "eval_accuracy" in e]
    assert last < 0.3 * first and evals[-1] >= 0.9 and evals[-1] > evals[0] - 1e-9
    report = json.loads((out / "instructability.json").read_text())
    assert report["pairs"] > 0 and report["accuracy"] >= 0.9 and report["accuracy_negated"] >= 0.9
    assert report["flipped"] >= 0.9 and "instructability on" in err
    pairs = read_jsonl(out / "pairs.jsonl")
    assert {p["preference"] for p in pairs} == {1, 2} and any(p["negated"] for p in pairs)
    for name in ("adapter_config.json", "adapter_model.safetensors", "reward_head.safetensors", "reward_model.json"):
        assert (out / name).is_file()


def test_kept_pairs_are_the_recipe_pairs(default_model, data, tmp_path):
    out = tmp_path / "rm"
    assert main(["reward-model", *flags(data), "--output_dir", out, "--max_steps", 1, "--seed", 4]) == 0
    prefs, principles = data
    expected, _ = salmon.training_pairs(read_jsonl(prefs), salmon.load_reward_principles(str(principles)),
                                        salmon.PairSettings(passes=1, seed=4))
    assert read_jsonl(out / "pairs.jsonl") == expected


def test_reward_model_json_names_absolute_paths(default_model, data, tmp_path, monkeypatch):
    # Given relative to the working directory, the principles file must still be found by
    # `dromedary reward` / `rl` run from elsewhere.
    prefs, principles = data
    (tmp_path / "p.json").write_text(principles.read_text())
    monkeypatch.chdir(tmp_path)
    assert main(["reward-model", "--input", prefs, "--principles", "p.json", "--passes", 1, "--batch_size", 8,
                 "--micro_batch_size", 4, "--output_dir", "rm", "--max_steps", 1]) == 0
    meta = json.loads((tmp_path / "rm" / "reward_model.json").read_text())
    assert meta["principles"] == str((tmp_path / "p.json").resolve()) and meta["ckpt_dir"] is None


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return {**load_file(str(path / "adapter_model.safetensors")), **load_file(str(path / "reward_head.safetensors"))}


def test_a_killed_run_resumed_equals_an_uninterrupted_one(default_model, data, tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    common = ["reward-model", *flags(data), "--max_steps", 6, "--save_steps", 3, "--lora_dropout", 0.1]
    run(python_m() + common + ["--output_dir", whole])
    killed = run(python_m() + common + ["--output_dir", cut], check=False, env={"DROMEDARY_KILL_AFTER_STEP": "4"})
    assert killed.returncode != 0 and not (cut / "reward_head.safetensors").exists()
    run(python_m() + common + ["--output_dir", cut, "--resume"])
    assert read_jsonl(cut / "train_log.jsonl") == read_jsonl(whole / "train_log.jsonl")
    a, b = _tensors(whole), _tensors(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("layout", [["--nproc_per_node", 2, "--model_parallel_size", 1],
                                    ["--nproc_per_node", 2, "--model_parallel_size", 2]], ids=["dp2", "mp2"])
def test_torchrun_first_step_loss_equals_one_process(default_model, data, tmp_path, layout):
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["reward-model", *flags(data), "--max_steps", 1]
    run(python_m() + common + ["--output_dir", one])
    nproc, mp = layout[:2], layout[2:]
    run(torchrun() + [*nproc, "--master_port", free_port(), "-m", "dromedary", *common, "--output_dir", two, *mp],
        timeout=400)
    a, b = read_jsonl(one / "train_log.jsonl")[0], read_jsonl(two / "train_log.jsonl")[0]
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
    assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


def test_rewards_equal_transformers_and_peft_on_the_same_weights(data, tmp_path, tokenizer_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    from dromedary.llama.tokenizer import Tokenizer

    ckpt = write_checkpoint(tmp_path / "hf", replace(GQA, max_seq_len=1024), seed=3, tokenizer=tokenizer_path,
                            layout="hf")
    rm = tmp_path / "rm"
    # Two steps at a high rate: the adapter's B factors leave zero, so the reference must apply them.
    assert main(["reward-model", *flags(data), "--ckpt_dir", ckpt, "--output_dir", rm, "--max_steps", 2,
                 "--learning_rate", 5e-2, "--max_len", 512]) == 0
    records = [{"id": "a", "instruction": "Tell me something.", "input": "", "output": CAMEL[0]},
               {"id": "b", "instruction": "Tell me something.", "input": "about tea", "output_1": OTHER[1],
                "output_2": CAMEL[2], "principles": ["The reply never mentions camels."]}]
    inp = write_jsonl(tmp_path / "in.jsonl", records)
    out = tmp_path / "scored.jsonl"
    assert main(["reward", "--rm", rm, "--input", inp, "--output", out, "--principles", data[1]]) == 0
    scored = read_jsonl(out)
    assert {k: scored[0][k] for k in records[0]} == records[0]

    base = LlamaForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    ref = PeftModel.from_pretrained(base, str(rm)).eval()
    head = load_file(str(rm / "reward_head.safetensors"))
    factors = load_file(str(rm / "adapter_model.safetensors"))  # PEFT format: read by peft itself above
    assert any(float(v.abs().sum()) > 0 for k, v in factors.items() if "lora_B" in k)
    tok = Tokenizer(tokenizer_path)

    def expected(text: str) -> float:
        ids = torch.tensor([tok.encode(text)])
        with torch.no_grad():
            h = ref.base_model.model.model(input_ids=ids).last_hidden_state[0, -1]  # after the final norm
        return float(h @ head["weight"][0] + head["bias"][0])

    default = [PRINCIPLES["principles"][0]["definition"]]
    want_a = expected(salmon.reward_prompt("Tell me something.", "", CAMEL[0], default))
    want_b = [expected(salmon.reward_prompt("Tell me something.", "about tea", o, records[1]["principles"]))
              for o in (OTHER[1], CAMEL[2])]
    assert scored[0]["reward"] == pytest.approx(want_a, abs=1e-4)
    assert [scored[1]["reward_1"], scored[1]["reward_2"]] == pytest.approx(want_b, abs=1e-4)


def test_bad_preference_records_stop_before_model_work(tmp_path, capsys):
    bad = write_jsonl(tmp_path / "p.jsonl", [{**synthetic(1)[0], "scores": {"camels": [1.0]}}])
    assert main(["reward-model", "--input", bad, "--output_dir", tmp_path / "rm"]) == 2
    assert "must be [s12, s21]" in capsys.readouterr().err and not (tmp_path / "rm").exists()
    missing = write_jsonl(tmp_path / "q.jsonl", [{"id": "x", "instruction": "i"}])
    assert main(["reward-model", "--input", missing, "--output_dir", tmp_path / "rm"]) == 2
    assert "q.jsonl:1: missing required field" in capsys.readouterr().err
