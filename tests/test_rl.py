"""dromedary rl on the embedded default model: outputs and reward-model scores, a known reward
raised on held-out prompts, rollouts that follow the updated adapter, exact resume, torchrun DP=2, MP=2 and MP=2 x DP=2,
the published adapter with --adapter, and bad input refused before model work."""

import json
import random
from pathlib import Path

import pytest
import torch
from helpers_ckpt import free_port, python_m, read_jsonl, run, torchrun, write_jsonl, run_cli as main
from test_reward_model import PRINCIPLES, synthetic

from dromedary.default_model import ensure_default_model
from dromedary.engine.builder import build
from dromedary.engine.generation import Engine, SamplingParams
from dromedary.engine.reward import RewardModel
from dromedary.llama import lora
from dromedary.recipe import preferences as salmon
from dromedary.stages import rl as rl_stage

TOPICS = ["the desert", "water", "the night", "a river", "bread", "tea", "the city", "a friend"]
HELD_OUT = ["the market", "coffee", "the morning", "a story"]
TIMING = ("rollout_tokens_per_s", "opt_tokens_per_s")


def prompt_records(topics, prefix="t"):
    return [{"id": f"{prefix}{i}", "instruction": f"Tell me about {t}.", "input": "", "source": "test"}
            for i, t in enumerate(topics)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The default model, a tiny reward model (two steps: it only has to be a reward model), and prompts."""
    ensure_default_model()
    root = tmp_path_factory.mktemp("rl")
    (root / "principles.json").write_text(json.dumps(PRINCIPLES))
    prefs = write_jsonl(root / "prefs.jsonl", synthetic(24))
    assert main(["reward-model", "--input", prefs, "--principles", root / "principles.json", "--output_dir",
                 root / "rm", "--max_steps", 2, "--batch_size", 8, "--micro_batch_size", 8, "--passes", 1,
                 "--max_len", 256]) == 0
    return {"rm": root / "rm", "prompts": write_jsonl(root / "prompts.jsonl", prompt_records(TOPICS)),
            "principles": root / "principles.json"}


def flags(setup, *extra):
    return ["rl", "--input", setup["prompts"], "--rm", setup["rm"], "--max_new_tokens", 10, "--batch_size", 4,
            "--mini_batch_size", 2, "--micro_batch_size", 2, "--learning_rate", 1e-3, *extra]


def no_timing(log):
    return [{k: v for k, v in e.items() if k not in TIMING} for e in log]


def test_outputs_and_reward_model_scores(setup, tmp_path):
    out = tmp_path / "policy"
    assert main(flags(setup, "--output_dir", out, "--max_steps", 2)) == 0
    for name in ("adapter_config.json", "adapter_model.safetensors", "rl.provenance.json"):
        assert (out / name).is_file()
    log = read_jsonl(out / "train_log.jsonl")
    assert [e["step"] for e in log] == [1, 2]
    for key in ("reward", "kl", "entropy", "value_loss", "policy_loss", "clip_fraction", "response_length",
                "length_bonus", "unfinished_penalty", "lr", "grad_norm", *TIMING):
        assert key in log[0], key
    assert log[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the first rollouts come from the reference itself
    rolls = read_jsonl(out / "rollouts" / "step-0000001.jsonl")
    assert len(rolls) == 4 and all(1 <= r["length"] <= 10 for r in rolls)
    assert {r["prompt_id"] for r in rolls} <= {p["id"] for p in prompt_records(TOPICS)}
    assert log[0]["reward"] == pytest.approx(sum(r["score"] for r in rolls) / 4, abs=1e-5)
    for r in rolls:
        want = r["score"] - (0.0 if r["finished"] else 1.0)  # default --unfinished_penalty 1, no length bonus
        assert r["reward"] == pytest.approx(want, abs=1e-5)
    # The scores are the reward model's (loaded as `dromedary reward` loads it) under the drawn
    # principles; the RM's own principles file is the default collection.
    rm = RewardModel.load(str(setup["rm"]), dtype="fp32")
    by_name = {p.name: p.definition for p in salmon.load_reward_principles(str(setup["principles"]))}
    texts = [salmon.reward_prompt(r["instruction"], r["input"], r["response"], [by_name[n] for n in r["principles"]])
             for r in rolls]
    assert rm.score(texts) == pytest.approx([r["score"] for r in rolls], abs=1e-4)


FIRST_PERSON = {"principles": [{"name": "first_person",
                                 "definition": "The reply speaks in the first person: it starts with the word I.",
                                 "negative": "The reply never starts with the word I."}]}


def first_person_preferences(n: int, seed: int = 0) -> list[dict]:
    """The judge liked whichever reply starts with "I"."""
    rng = random.Random(seed)
    words = "the a camel walks across desert sand water river city people think about good answer question".split()
    sentence = lambda first: " ".join([first] + [rng.choice(words) for _ in range(rng.randint(3, 9))]) + "."  # noqa: E731
    out = []
    for i in range(n):
        i_first = rng.random() < 0.5
        mine = sentence(rng.choice(["I", "I", "I'm", "I can"]))
        other = sentence(rng.choice(["The", "Who", "Las", "Yes", "For", "Keep", "You", "What", "A", "Sho"]))
        m = rng.uniform(1, 3) * (1 if i_first else -1)
        out.append({"id": f"f{i}", "instruction": "Tell me something.", "input": "", "scores": {"first_person": [m, m]},
                    "output_1": mine if i_first else other, "output_2": other if i_first else mine})
    return out


def test_ppo_raises_the_reward_models_preference_on_held_out_prompts(setup, tmp_path):
    """A reward model trained here to prefer replies that start with "I"; PPO against it raises
    the policy's probability of such a first token (computed exactly, not sampled) on prompts it
    never trained on."""
    (tmp_path / "fp.json").write_text(json.dumps(FIRST_PERSON))
    prefs = write_jsonl(tmp_path / "prefs.jsonl", first_person_preferences(160))
    rm = tmp_path / "rm"
    assert main(["reward-model", "--input", prefs, "--principles", tmp_path / "fp.json", "--output_dir", rm,
                 "--max_steps", 30, "--batch_size", 16, "--micro_batch_size", 16, "--passes", 1, "--max_len", 256,
                 "--learning_rate", 1e-3, "--negate_p", 0]) == 0
    assert read_jsonl(rm / "train_log.jsonl")[-1]["eval_accuracy"] >= 0.9
    out = tmp_path / "policy"
    assert main(["rl", "--input", setup["prompts"], "--rm", rm, "--output_dir", out, "--max_steps", 4,
                 "--batch_size", 16, "--mini_batch_size", 8, "--micro_batch_size", 8, "--max_new_tokens", 12,
                 "--learning_rate", 2e-3, "--lam", 1.0, "--kl_coef", 0.01, "--unfinished_penalty", 0]) == 0
    tok = build(None, dtype="fp32").tokenizer
    starts_with_i = [i for i in range(tok.n_words) if tok.decode([i]).startswith("I")]

    def p_first_person(adapter):
        loaded = build(None, adapter=adapter, dtype="fp32")
        total = 0.0
        for r in prompt_records(HELD_OUT, "h"):
            src = rl_stage._source_ids(loaded.tokenizer, r, 512, assistant_name="Dromedary",
                                       knowledge_cutoff="September 2021")
            with torch.no_grad():
                p = torch.softmax(loaded.model(torch.tensor([src]))[0, -1].float(), dim=-1)
            total += float(p[starts_with_i].sum())
        return total / len(HELD_OUT)

    before, after = p_first_person(None), p_first_person(str(out))
    assert after > 1.5 * before, (before, after)


def test_rollouts_follow_the_updated_adapter(setup):
    """The engine reuses cached prefix keys and values across calls: after an optimizer step
    changes the LoRA factors in place, its rollouts must be the new model's."""
    loaded = build(None, dtype="fp32", train=True)
    model, tok = loaded.model, loaded.tokenizer
    lora.add_lora(model, r=4, alpha=8, dropout=0.0, targets=("wq", "wv", "w2"))
    lora.init_lora(model, 0, loaded.world)
    model.rope(loaded.world.device)
    # One id for all three: the same system prompt, so the rows share a long cached prefix.
    prompts = [rl_stage._source_ids(tok, {**r, "id": "same"}, 512, assistant_name="Dromedary",
                                    knowledge_cutoff="September 2021") for r in prompt_records(TOPICS[:3])]
    params = SamplingParams(max_new_tokens=8, temperature=1.0)
    engine = Engine(model, tok, prepack=False)
    model.eval()
    first = [g.tokens for g in engine.generate(prompts, params, seeds=[1, 2, 3])]
    assert engine._prefix is not None  # the rows share their system prompt: a cached block
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p, _ in lora.trainable(model):
            if "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    again = [g.tokens for g in engine.generate(prompts, params, seeds=[1, 2, 3])]
    fresh = [g.tokens for g in Engine(model, tok, prepack=False).generate(prompts, params, seeds=[1, 2, 3])]
    assert again == fresh and again != first


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def test_a_killed_run_resumed_equals_an_uninterrupted_one(setup, tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    common = python_m() + flags(setup, "--max_steps", 3, "--save_steps", 1)
    run(common + ["--output_dir", whole])
    killed = run(common + ["--output_dir", cut], check=False, env={"DROMEDARY_KILL_AFTER_STEP": "2"})
    assert killed.returncode != 0 and not (cut / "adapter_model.safetensors").exists()
    run(common + ["--output_dir", cut, "--resume"])
    assert no_timing(read_jsonl(cut / "train_log.jsonl")) == no_timing(read_jsonl(whole / "train_log.jsonl"))
    for step in (1, 2, 3):
        name = f"rollouts/step-{step:07d}.jsonl"
        assert read_jsonl(cut / name) == read_jsonl(whole / name)
    a, b = _tensors(whole), _tensors(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    changed = run(common + ["--output_dir", cut, "--resume", "--kl_coef", 0.2], check=False)
    assert changed.returncode == 2 and "cannot resume" in changed.stderr and "--kl_coef" in changed.stderr


@pytest.mark.parametrize("nproc, mp", [(2, 1), (2, 2), (4, 2)], ids=["dp2", "mp2", "mp2xdp2"])
def test_torchrun_equals_one_process(setup, tmp_path, nproc, mp):
    one, two = tmp_path / "one", tmp_path / "two"
    common = flags(setup, "--max_steps", 2)
    run(python_m() + common + ["--output_dir", one])
    run(torchrun() + ["--nproc_per_node", nproc, "--master_port", free_port(), "-m", "dromedary", *common,
                      "--output_dir", two, "--model_parallel_size", mp], timeout=600)
    for step in (1, 2):
        a, b = (read_jsonl(d / f"rollouts/step-{step:07d}.jsonl") for d in (one, two))
        assert [r["response"] for r in a] == [r["response"] for r in b]
        assert [r["score"] for r in b] == pytest.approx([r["score"] for r in a], abs=1e-5)
    for x, y in zip(no_timing(read_jsonl(one / "train_log.jsonl")), no_timing(read_jsonl(two / "train_log.jsonl"))):
        assert y == pytest.approx(x, rel=1e-4, abs=1e-6)
    a, b = _tensors(one), _tensors(two)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4, msg=k)


def test_with_an_sft_adapter_the_published_adapter_applies_to_the_plain_base(setup, tmp_path):
    """--adapter: the policy trains on the base with SFT folded in; OUTPUT_DIR's adapter is the
    two stacked (the reward model's adapter stands in for an engraving here)."""
    out = tmp_path / "policy"
    sft = setup["rm"]
    assert main(flags(setup, "--output_dir", out, "--max_steps", 1, "--adapter", sft, "--lora_r", 4)) == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == json.loads((sft / "adapter_config.json").read_text())["r"] + 4
    tokens = torch.tensor([rl_stage._source_ids(build(None).tokenizer, prompt_records(TOPICS)[0], 512,
                                                assistant_name="Dromedary", knowledge_cutoff="September 2021")])
    with torch.no_grad():
        published = build(None, dtype="fp32", adapter=str(out)).model(tokens)
        trained = build(None, dtype="fp32", merge_adapter=str(sft),
                        adapter=str(out / "checkpoints" / "step-0000001")).model(tokens)
        engraved = build(None, dtype="fp32", merge_adapter=str(sft)).model(tokens)
    assert not torch.allclose(trained, engraved, atol=1e-4)  # the PPO step moved the policy
    torch.testing.assert_close(published, trained, atol=1e-4, rtol=1e-4)


def test_bad_input_and_flags_stop_before_model_work(setup, tmp_path, capsys):
    out = tmp_path / "policy"
    bad = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "input": ""}])
    assert main(["rl", "--input", bad, "--rm", setup["rm"], "--output_dir", out]) == 2
    assert "p.jsonl:1: missing required field 'instruction'" in capsys.readouterr().err
    assert main(["rl", "--input", setup["prompts"], "--rm", tmp_path, "--output_dir", out]) == 2
    assert "not a reward model directory" in capsys.readouterr().err
    assert main(flags(setup, "--output_dir", out, "--mini_batch_size", 8)) == 2
    assert "--mini_batch_size 8 exceeds --batch_size 4" in capsys.readouterr().err
    assert not out.exists()
