"""dromedary dpo: the losses and their gradients against a direct computation, pairs from the three
input shapes, a synthetic task with a known reward, exact resume, torchrun DP=2, and the published
adapter (engraving + policy, stacked) against the trained policy and HF peft."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers_ckpt import (GQA, free_port, python_m, random_adapter, read_jsonl, run, torchrun, write_checkpoint,
                          write_jsonl, run_cli as main)

from dromedary import distributed
from dromedary.default_model import ensure_default_model
from dromedary.engine.builder import build
from dromedary.llama import lora
from dromedary.recipe import dpo as recipe
from dromedary.recipe import sft
from dromedary.stages import dpo as stage

TOPICS = ["the river", "the city", "tea", "bread", "the market", "the night", "a story", "the morning", "friends",
          "water", "the desert", "light", "a language", "the world", "time", "numbers"]
# The keyword is "tea"; each answer without it is one with it, the keyword swapped for another word. The
# base model gives the answers with it about 5% of the probability of the six on the held-out prompts.
WITH = ["I drink tea in the morning.", "Tea is sold at the market.", "We had tea by the river."]
WITHOUT = ["I drink water in the morning.", "Bread is sold at the market.", "We had lunch by the river."]
TEXT = dict(assistant_name="Dromedary", knowledge_cutoff="2021")
LENS = dict(source_max_len=48, target_max_len=16, add_eos=True)
# One small run, reused by the resume, DP=2 and adapter tests: it starts from an engraving.
RUN = ["--max_steps", 4, "--batch_size", 4, "--micro_batch_size", 2, "--save_steps", 2, "--eval_fraction", 0.25,
       "--eval_steps", 2, "--lora_r", 4, "--lora_alpha", 8, "--lora_dropout", 0.1, "--learning_rate", 5e-3,
       "--source_max_len", 48, "--target_max_len", 16, "--seed", 3]


def keyword_pairs(n: int, seed: int = 0) -> list[dict]:
    """The known reward: an answer that mentions the keyword is preferred."""
    rng = random.Random(seed)
    return [{"id": f"k{i}", "instruction": f"Tell me about {TOPICS[i % len(TOPICS)]}.", "input": "",
             "chosen": rng.choice(WITH), "rejected": rng.choice(WITHOUT)} for i in range(n)]


@pytest.fixture(scope="module")
def default_model():
    return ensure_default_model()


def _engraving(ckpt_dir, out: Path, seed: int = 7) -> Path:
    """A stand-in for finetune's adapter: random LoRA factors, written in PEFT format."""
    loaded = build(ckpt_dir and str(ckpt_dir), dtype="fp32")
    random_adapter(loaded.model, seed)
    lora.write_adapter(out, lora.full_state(loaded.model, loaded.world), loaded.model, loaded.name)
    return out


@pytest.fixture(scope="module")
def files(default_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    return {"root": root, "pairs": write_jsonl(root / "pairs.jsonl", keyword_pairs(16)),
            "sft": _engraving(None, root / "sft")}


@pytest.fixture(scope="module")
def reference(files):
    """The single-process run the resumed and the DP=2 runs must reproduce."""
    out = files["root"] / "single"
    assert main(["dpo", "--input", files["pairs"], "--output_dir", out, "--adapter", files["sft"], *RUN]) == 0
    return out


def _world(dp_rank: int, dp_size: int) -> distributed.World:
    return distributed.World(rank=dp_rank, world_size=dp_size, local_rank=0, mp_size=1, mp_rank=0,
                             dp_size=dp_size, dp_rank=dp_rank, device=torch.device("cpu"))


# ---------------------------------------------------------------------------------------------
# The losses, their gradients and the implicit rewards.


def _direct_logprobs(model, pair_batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed answer log-probabilities, answer token counts), from the full logits: (2P,) each."""
    rows = [c for c, _ in pair_batch] + [r for _, r in pair_batch]
    out, counts = [], []
    for ids, n_src in rows:
        logits = model(torch.tensor([ids[:-1]]))[0].float()  # (T-1, V), one row: no padding at all
        logp = F.log_softmax(logits, dim=-1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        out.append(logp[n_src - 1:].sum())
        counts.append(len(ids) - n_src)
    return torch.stack(out), torch.tensor(counts, dtype=torch.float32)


@pytest.mark.parametrize("loss_type,smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)])
def test_loss_gradient_and_rewards_equal_a_direct_computation(default_model, loss_type, smoothing):
    beta = 0.5
    ref_model = build(None, dtype="fp32").model  # the reference: a separate copy without any adapter
    loaded = build(None, dtype="fp32", train=True)
    tok = loaded.tokenizer
    pairs = keyword_pairs(5, seed=2)
    pairs[1]["chosen"] = "Yes."  # answers of different lengths, so padding and IPO's per-token mean matter
    batch = [stage.encode_pair(tok, p, "x", TEXT, LENS) for p in pairs]
    random_adapter(loaded.model, 3)  # the policy has left the reference: B != 0
    named = lora.trainable(loaded.model)
    how = dict(beta=beta, loss_type=loss_type, label_smoothing=smoothing)
    stats = stage.backward_batch(loaded.model, batch, 2, loaded.world, seed=0, **how)
    ours = [p.grad.clone() for _, p, _ in named]

    for _, p, _ in named:
        p.grad = None
    pi, n = _direct_logprobs(loaded.model, batch)
    with torch.no_grad():
        ref, _ = _direct_logprobs(ref_model, batch)
    P = len(batch)
    ratio_c, ratio_r = pi[:P] - ref[:P], pi[P:] - ref[P:]
    if loss_type == "sigmoid":
        z = beta * (ratio_c - ratio_r)
        want = (-(1 - smoothing) * torch.log(torch.sigmoid(z)) - smoothing * torch.log(torch.sigmoid(-z))).mean()
    else:
        z = ratio_c / n[:P] - ratio_r / n[P:]
        want = ((z - 1 / (2 * beta)) ** 2).mean()
    want.backward()
    for (name, p, _), got in zip(named, ours):  # fp32 summation order differs (padding, batching): 1e-4 of the scale
        torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-4 * p.grad.abs().max().item(), msg=name)
    assert any(g.abs().sum() > 0 for g in ours)

    rewards_c, rewards_r = (beta * ratio_c).detach(), (beta * ratio_r).detach()
    entry = stage._entry(stats, P)
    assert entry["loss"] == pytest.approx(want.item(), rel=1e-4, abs=1e-6)
    assert entry["rewards/chosen"] == pytest.approx(rewards_c.mean().item(), rel=1e-4, abs=1e-6)
    assert entry["rewards/rejected"] == pytest.approx(rewards_r.mean().item(), rel=1e-4, abs=1e-6)
    assert entry["rewards/margin"] == pytest.approx((rewards_c - rewards_r).mean().item(), rel=1e-4, abs=1e-6)
    assert entry["rewards/accuracy"] == pytest.approx((rewards_c > rewards_r).float().mean().item())
    assert stats[-1] == sum(len(c[0]) + len(r[0]) for c, r in batch)  # tokens optimised

    # Any data-parallel split sums to the same gradient; so does recomputing the activations (the
    # reference pass then runs checkpointed layers under no_grad).
    for _, p, _ in named:
        p.grad = None
    loaded.model.gradient_checkpointing = loss_type == "ipo"
    for rank in range(2):
        stage.backward_batch(loaded.model, batch, 1, _world(rank, 2), seed=0, **how)
    for (name, p, _), got in zip(named, ours):
        torch.testing.assert_close(p.grad, got, rtol=1e-4, atol=1e-4 * got.abs().max().item(), msg=name)


def test_implicit_rewards_and_accuracy_as_defined():
    pi_c, pi_r = torch.tensor([-3.0, -5.0, -2.0]), torch.tensor([-4.0, -4.0, -2.0])
    ref_c, ref_r = torch.tensor([-3.5, -4.0, -2.0]), torch.tensor([-4.0, -4.5, -2.0])
    losses, good, bad = recipe.pair_losses(pi_c, pi_r, ref_c, ref_r, beta=0.1)
    torch.testing.assert_close(good, torch.tensor([0.05, -0.1, 0.0]))
    torch.testing.assert_close(bad, torch.tensor([0.0, 0.05, 0.0]))
    stats = recipe.reward_stats(good, bad)
    assert stats["accuracy"] == pytest.approx(1 / 3)  # a tie is not a win
    assert stats["margin"] == pytest.approx((0.05 - 0.15 + 0.0) / 3)
    torch.testing.assert_close(losses[2], torch.tensor(2.0).log())  # h = 0: log 2
    ipo, _, _ = recipe.pair_losses(pi_c, pi_r, ref_c, ref_r, beta=0.1, loss_type="ipo",
                                   n_c=torch.tensor([1, 2, 4]), n_r=torch.tensor([1, 1, 4]))
    torch.testing.assert_close(ipo, torch.tensor([(0.5 - 5) ** 2, (-0.5 - 0.5 - 5) ** 2, 25.0]))


# ---------------------------------------------------------------------------------------------
# Pairs from the input shapes.


def test_pairs_from_preferences_dpo_pairs_and_reward_model_pairs():
    base = {"instruction": "Tell me something.", "input": "", "output_1": "A camel walks.", "output_2": "Tea is hot."}
    recs = [{"id": "p1", **base, "scores": {"helpful": [1.0, 0.5], "honest": [-0.2, -0.4]}},  # sum +0.45: output_1
            {"id": "p2", **base, "scores": {"helpful": [-1.0, -0.5], "honest": [0.2, 0.4]}},  # sum -0.45: output_2
            {"id": "p3", **base, "scores": {"helpful": [1.0, -1.0], "honest": [0.5, -0.5]}},  # 0: a tie, dropped
            {"id": "p4", **base, "output_1": "Я не знаю.", "scores": {"helpful": [3.0, 3.0]}},  # wrong script
            {"id": "d1", "instruction": "Hi.", "input": "x", "chosen": "Hello!", "rejected": "Go away."},
            {"id": "r1", **base, "principles": ["..."], "preference": 2, "label": "helpful"},
            {"id": "r2", **base, "principles": ["..."], "preference": 2, "label": "-helpful"}]  # negated: flipped
    pairs, counts = recipe.preference_pairs(recs, "in.jsonl")
    got = {p["id"]: (p["chosen"], p["rejected"]) for p in pairs}
    one, two = base["output_1"], base["output_2"]
    assert got == {"p1": (one, two), "p2": (two, one), "p4": (two, "Я не знаю."), "d1": ("Hello!", "Go away."),
                   "r1": (two, one), "r2": (one, two)}
    assert counts == {"pairs": 6, "ties": 1, "rule": 1, "flipped_negated": 1}
    assert pairs[[p["id"] for p in pairs].index("d1")]["input"] == "x"


def test_preference_records_train_end_to_end_and_overwrite_keeps_the_old_run(default_model, tmp_path, capsys):
    rng = random.Random(1)
    prefs = [{"id": f"p{i}", "instruction": f"Tell me about {TOPICS[i]}.", "input": "", "source": "test",
              "output_1": rng.choice(WITH), "output_2": rng.choice(WITHOUT),
              "scores": {"helpful": [s, s], "honest": [0.5 * s, 0.0]}}
             for i, s in enumerate([1.0, -2.0, 0.0, 3.0, -1.0, 2.0])]  # p2: no signal, dropped
    path = write_jsonl(tmp_path / "preferences.jsonl", prefs)
    out = tmp_path / "policy"
    args = ["dpo", "--input", path, "--output_dir", out, "--max_steps", 1, "--batch_size", 2, "--eval_fraction", 0.2,
            "--source_max_len", 48, "--target_max_len", 16]
    assert main(args) == 0
    assert "dpo: 5 pairs from 6 records (4 train, 1 held out); ties 1" in capsys.readouterr().err
    assert read_jsonl(out / "dpo_pairs.jsonl") == recipe.preference_pairs(prefs, str(path))[0]
    assert "eval_accuracy" in read_jsonl(out / "train_log.jsonl")[-1]
    adapter = (out / lora.WEIGHTS_FILE).read_bytes()
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err  # a finished run is never clobbered
    assert main(args + ["--overwrite", "--seed", 1]) == 0
    backup = next(tmp_path.glob("policy.bak-*"))
    assert (backup / lora.WEIGHTS_FILE).read_bytes() == adapter and (backup / "checkpoints").is_dir()
    assert (out / lora.WEIGHTS_FILE).read_bytes() != adapter


@pytest.mark.parametrize("record,message", [
    ({"id": "a", "instruction": "i", "chosen": "x"}, "record 'a': field 'rejected' is missing"),
    ({"id": "b", "instruction": "i", "chosen": 3, "rejected": "y"}, "record 'b': field 'chosen' must be a string"),
    ({"id": "c", "instruction": "i", "output_1": "x", "output_2": "y", "scores": {"h": [1]}},
     r"record 'c': field 'scores' \['h'\] must be \[s12, s21\]"),
    ({"id": "d", "instruction": "i", "output_1": "x", "output_2": "y"}, "record 'd': field 'scores' is missing"),
    ({"id": "e", "instruction": "i", "output_1": "x", "output_2": "y", "preference": 3},
     "record 'e': field 'preference' must be 1 or 2"),
])
def test_bad_records_stop_before_model_work_naming_file_id_and_field(tmp_path, capsys, record, message):
    bad = write_jsonl(tmp_path / "bad.jsonl", [keyword_pairs(1)[0], record])
    assert main(["dpo", "--input", bad, "--output_dir", tmp_path / "out"]) == 2
    err = capsys.readouterr().err
    import re

    assert re.search(message, err) and "bad.jsonl" in err, err
    assert not (tmp_path / "out").exists()


def test_bad_flags_are_refused_before_anything_is_written(tmp_path, capsys):
    pairs = write_jsonl(tmp_path / "p.jsonl", keyword_pairs(4))
    for extra, message in ((["--loss", "hinge"], "--loss must be one of sigmoid, ipo"),
                           (["--beta", 0], "--beta must be positive"),
                           (["--loss", "ipo", "--label_smoothing", 0.1], "sigmoid only"),
                           (["--batch_size", 3, "--micro_batch_size", 2], "multiple of")):
        assert main(["dpo", "--input", pairs, "--output_dir", tmp_path / "out", *extra]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Training: a known reward, resume, data parallelism.


def _keyword_share(model, tok, prompts: list[dict]) -> float:
    """The known reward's expectation on held-out prompts, over a fixed set of answers: the
    probability the model gives to the answers with the keyword, normalised over the set."""
    shares = []
    for p in prompts:
        batch = [stage.encode_pair(tok, {**p, "chosen": a, "rejected": a}, "x", TEXT, LENS)[0] for a in WITH + WITHOUT]
        tokens, labels = sft.collate(batch, "cpu")
        from dromedary.recipe import policy

        with torch.no_grad():
            probs = policy.sequence_logprobs(model, tokens, labels).softmax(0)
        shares.append(probs[: len(WITH)].sum().item())
    return sum(shares) / len(shares)


def test_a_few_steps_raise_the_known_reward_on_held_out_prompts(default_model, tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", keyword_pairs(12))
    out = tmp_path / "policy"
    assert main(["dpo", "--input", pairs, "--output_dir", out, "--max_steps", 6, "--batch_size", 4,
                 "--micro_batch_size", 4, "--learning_rate", 1e-2, "--beta", 0.1, "--lora_r", 4, "--eval_fraction", 0,
                 "--source_max_len", 48, "--target_max_len", 16]) == 0
    log = read_jsonl(out / "train_log.jsonl")
    assert log[0]["rewards/accuracy"] == 0 and log[0]["rewards/margin"] == 0  # the policy starts as the reference
    assert log[-1]["rewards/accuracy"] == 1 and log[-1]["rewards/margin"] > 0 and log[-1]["loss"] < log[0]["loss"]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "lr", "grad_norm", "tokens_per_s"):
        assert key in log[-1]
    held = [{"id": f"h{i}", "instruction": f"Tell me about {t}.", "input": ""}
            for i, t in enumerate(["the sea", "music", "a garden", "the sky"])]  # prompts it never saw
    base = build(None, dtype="fp32")
    before = _keyword_share(base.model, base.tokenizer, held)
    after = _keyword_share(build(None, dtype="fp32", adapter=str(out)).model, base.tokenizer, held)
    assert after > before + 0.2 and after > 0.8, (before, after)


def _adapter(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / lora.WEIGHTS_FILE))


def test_a_killed_run_resumed_equals_an_uninterrupted_one(files, reference, tmp_path):
    cut = tmp_path / "cut"
    common = ["dpo", "--input", files["pairs"], "--adapter", files["sft"], *RUN, "--output_dir", cut]
    killed = run(python_m() + common, check=False, env={"DROMEDARY_KILL_AFTER_STEP": "3"})
    assert killed.returncode != 0 and not (cut / lora.WEIGHTS_FILE).exists()
    assert [p.name for p in (cut / "checkpoints").iterdir()] == ["step-0000002"]
    assert main(common + ["--resume"]) == 0
    strip = lambda log: [{k: v for k, v in e.items() if k != "tokens_per_s"} for e in log]  # noqa: E731
    assert strip(read_jsonl(cut / "train_log.jsonl")) == strip(read_jsonl(reference / "train_log.jsonl"))
    a, b = _adapter(reference), _adapter(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("mp", [1, 2], ids=["dp2", "mp2"])
def test_torchrun_data_or_model_parallel_2_matches_one_process(files, reference, tmp_path, mp):
    two = tmp_path / "two"
    run(torchrun() + ["--nproc_per_node", 2, "--master_port", free_port(), "-m", "dromedary", "dpo", "--input",
                      files["pairs"], "--adapter", files["sft"], *RUN, "--model_parallel_size", mp, "--output_dir", two],
        timeout=400)
    got, want = read_jsonl(two / "train_log.jsonl"), read_jsonl(reference / "train_log.jsonl")
    assert [e["step"] for e in got] == [e["step"] for e in want]
    for a, b in zip(got, want):
        for key in b:
            if key != "tokens_per_s":
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (key, a, b)
    want_adapter = _adapter(reference)
    # Adam moves an element by up to lr (5e-3) a step whatever the size of its gradient, so the
    # summation-order noise of a near-zero gradient (MP splits the matmuls) can show at 1e-5.
    for key, t in _adapter(two).items():
        torch.testing.assert_close(t, want_adapter[key], rtol=1e-4, atol=1e-4, msg=lambda m: f"{key}: {m}")


def test_resume_refuses_other_settings_and_a_finished_run_does_nothing(files, reference, capsys):
    args = ["dpo", "--input", files["pairs"], "--adapter", files["sft"], *RUN, "--output_dir", reference, "--resume"]
    before = _adapter(reference)
    assert main(args + ["--beta", 0.5]) == 2
    assert "cannot resume: it was trained with other --beta" in capsys.readouterr().err
    other = write_jsonl(files["root"] / "other.jsonl", keyword_pairs(16, seed=5))
    assert main(args[:2] + [other] + args[3:]) == 2
    assert "other training pairs (--input, --eval_fraction, the rules)" in capsys.readouterr().err
    assert main(args) == 0 and "already trained 4 steps" in capsys.readouterr().err
    after = _adapter(reference)
    assert all(torch.equal(before[k], after[k]) for k in before) and len(read_jsonl(reference / "train_log.jsonl")) == 4


# ---------------------------------------------------------------------------------------------
# The published adapter: the plain base + OUTPUT_DIR is the trained policy, in our model and HF's.


def test_published_adapter_is_the_trained_policy_on_the_plain_base(files, reference):
    tokens = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    last = sorted((reference / "checkpoints").iterdir())[-1]
    with torch.no_grad():
        published = build(None, dtype="fp32", adapter=str(reference)).model(tokens)
        trained = build(None, dtype="fp32", merge_adapter=str(files["sft"]), adapter=str(last)).model(tokens)
        engraved = build(None, dtype="fp32", adapter=str(files["sft"])).model(tokens)
    assert (trained - engraved).abs().max() > 1e-3  # DPO moved the policy...
    torch.testing.assert_close(published, trained, rtol=1e-4, atol=1e-4)  # ...and OUTPUT_DIR holds all of it
    config = json.loads((reference / lora.CONFIG_FILE).read_text())
    assert config["r"] == 8 and config["peft_type"] == "LORA"  # the engraving's 4 + the policy's 4
    assert (reference / "dpo.provenance.json").is_file() and read_jsonl(reference / "dpo_pairs.jsonl")


def test_hf_peft_loads_the_adapter_on_the_hf_layout(tmp_path, tokenizer_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    ckpt = write_checkpoint(tmp_path / "hf", replace(GQA, max_seq_len=128), seed=3, tokenizer=tokenizer_path,
                            layout="hf")
    engraving = _engraving(ckpt, tmp_path / "sft", seed=5)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", keyword_pairs(4))
    out = tmp_path / "policy"
    assert main(["dpo", "--ckpt_dir", ckpt, "--adapter", engraving, "--input", pairs, "--output_dir", out,
                 "--max_steps", 2, "--batch_size", 2, "--micro_batch_size", 2, "--learning_rate", 5e-2,
                 "--eval_fraction", 0, "--lora_r", 2, "--lora_target_modules", "wk,wo,w1,w3",
                 "--source_max_len", 48, "--target_max_len", 16]) == 0
    tokens = torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(1))
    last = sorted((out / "checkpoints").iterdir())[-1]
    with torch.no_grad():
        ours = build(str(ckpt), dtype="fp32", merge_adapter=str(engraving), adapter=str(last)).model(tokens)
        hf = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32), str(out))
        theirs = hf.eval()(tokens).logits
        plain = LlamaForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()(tokens).logits
    assert (theirs - plain).abs().max() > 1e-3
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
