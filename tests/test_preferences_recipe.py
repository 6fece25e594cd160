"""The SALMON text logic: principles file, prompt builders, and the scores -> pairs arithmetic on
crafted scores (normalisation, negation, ties, each override rule, determinism)."""

import json
import statistics

import pytest

from dromedary.recipe import preferences as P

PRINCIPLES = [P.RewardPrinciple("a", "A good.", "A bad."), P.RewardPrinciple("b", "B good.", "B bad."),
              P.RewardPrinciple("c", "C good.", "C bad.")]


def rec(i, scores, out1="first answer here", out2="second answer here", instruction="Say something."):
    return {"id": str(i), "instruction": instruction, "input": "", "source": "t", "output_1": out1,
            "output_2": out2, "scores": scores}


def test_shipped_principles_have_ten_dimensions_with_negatives():
    ps = P.load_reward_principles()
    assert len(ps) >= 10
    assert all(p.definition and p.negative and p.definition != p.negative for p in ps)
    assert len({p.name for p in ps}) == len(ps)


def test_principles_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps([{"name": "x", "definition": "d"}]))
    with pytest.raises(ValueError, match=r"p\.json: principle 0 needs"):
        P.load_reward_principles(str(bad))
    with pytest.raises(FileNotFoundError, match="no such file"):
        P.load_reward_principles(str(tmp_path / "missing.json"))


def test_judge_prompt_ends_on_the_label_cue_and_orders_the_replies():
    p = P.load_reward_principles()[0]
    text = P.judge_prompt("Add 2 and 2.", "", "It is 4.", "It is 5.", p)
    assert text.endswith("Reply (") and text.startswith(P.judge_header())
    assert text.index("It is 4.") < text.index("It is 5.") and p.definition in text
    swapped = P.judge_prompt("Add 2 and 2.", "", "It is 5.", "It is 4.", p)
    assert swapped.index("It is 5.") < swapped.index("It is 4.")


def test_reward_prompt_lists_each_principle_and_ends_on_a_fixed_cue():
    a = P.reward_prompt("Q?", "ctx", "Answer.", ["One.", "Two."])
    b = P.reward_prompt("Other?", "", "Else.", ["Three."])
    assert "- One.\n- Two." in a and "Q?\n\nctx" in a
    cue = a.splitlines()[-1]
    assert cue and b.splitlines()[-1] == cue and a.endswith(cue)


def test_margins_are_normalised_by_the_spread_over_the_file():
    records = [rec(0, {"a": [2.0, 4.0]}), rec(1, {"a": [-1.0, -1.0]}), rec(2, {"a": [0.0, 2.0]})]
    # margins 3, -1, 1 -> population std
    assert P.spreads(records)["a"] == pytest.approx(statistics.pstdev([3, -1, 1]))
    pairs, counts = P.training_pairs(records, PRINCIPLES, P.PairSettings(passes=1, negate_p=0.0))
    assert [p["preference"] for p in pairs] == [1, 2, 1] and counts["pairs"] == 3
    assert all(p["principles"] == ["A good."] and p["label"] == "a" for p in pairs)


def test_largest_normalised_margin_decides_not_the_raw_one():
    # Dimension a has large raw margins but a large spread too; b's margin is small in raw terms
    # yet far larger relative to its spread, so b decides record 0.
    records = [rec(0, {"a": [10.0, 10.0], "b": [-1.0, -1.0]}), rec(1, {"a": [-30.0, -30.0], "b": [0.0, 0.0]}),
               rec(2, {"a": [30.0, 30.0], "b": [0.05, 0.05]})]
    z = {d: P.margins(records[0])[d] / s for d, s in P.spreads(records).items()}
    assert abs(z["b"]) > abs(z["a"])
    pairs, _ = P.training_pairs(records, PRINCIPLES, P.PairSettings(passes=20, negate_p=0.0, geometric_p=0.01,
                                                                      max_principles=2))
    both = [p for p in pairs if p["id"].startswith("0#") and len(p["principles"]) == 2]
    assert both and all(p["label"] == "b" and p["preference"] == 2 for p in both)


def test_negation_flips_the_label_and_shows_the_negative_definition():
    records = [rec(0, {"a": [1.0, 1.0]}), rec(1, {"a": [-1.0, -1.0]})]
    pairs, _ = P.training_pairs(records, PRINCIPLES, P.PairSettings(passes=1, negate_p=1.0))
    assert [p["preference"] for p in pairs] == [2, 1]
    assert all(p["principles"] == ["A bad."] and p["label"] == "-a" and p["negated"] == ["a"] for p in pairs)
    back = P.negate_pair(pairs[0], PRINCIPLES)
    assert back["principles"] == ["A good."] and back["preference"] == 1


def test_ties_are_dropped():
    # Zero margin (no signal) and two shown principles with equal strength but opposite signs.
    records = [rec(0, {"a": [0.0, 0.0], "b": [1.0, 1.0]}), rec(1, {"a": [1.0, 1.0], "b": [-1.0, -1.0]}),
               rec(2, {"a": [-1.0, -1.0], "b": [0.0, 0.0]})]
    pairs, counts = P.training_pairs(records, PRINCIPLES, P.PairSettings(passes=30, negate_p=0.0, geometric_p=0.5,
                                                                         max_principles=2))
    ids = {p["id"].split("#")[0] for p in pairs}
    # record 1 under both a and b ties; record 0 under a alone ties (margin 0).
    for p in pairs:
        if p["id"].startswith("1#"):
            assert len(p["principles"]) == 1
        if p["id"].startswith("0#"):
            assert "B good." in p["principles"]
    assert counts["ties"] > 0 and counts["ties"] + counts["pairs"] == 90 and ids


def test_opposite_order_scores_cancel():
    # s12 and s21 disagree by the same amount: the judge only preferred whatever came first.
    records = [rec(0, {"a": [2.0, -2.0]}), rec(1, {"a": [1.0, 1.0]}), rec(2, {"a": [-1.0, -1.0]})]
    pairs, counts = P.training_pairs(records, PRINCIPLES, P.PairSettings(passes=1, negate_p=0.0))
    assert [p["id"] for p in pairs] == ["1#0", "2#0"] and counts["ties"] == 1


def test_language_rule_overrides_the_judge():
    records = [rec(0, {"a": [5.0, 5.0]}, out1="这是一个中文的回答。", out2="This answer is in English.",
                   instruction="Please answer in plain words."), rec(1, {"a": [-1.0, -1.0]})]
    pairs, counts = P.training_pairs(records, PRINCIPLES, P.PairSettings(passes=1, negate_p=0.0))
    assert pairs[0]["preference"] == 2 and pairs[0]["label"] == "rule:language" and counts["rule:language"] == 1
    off, _ = P.training_pairs(records, PRINCIPLES, P.PairSettings(passes=1, negate_p=0.0, language_rule=False))
    assert off[0]["preference"] == 1 and off[0]["label"] == "a"


def test_disclaimer_rule_overrides_the_judge():
    records = [rec(0, {"a": [-5.0, -5.0]}, out1="Paris is the capital.",
                   out2="As an AI language model, I cannot know that."), rec(1, {"a": [1.0, 1.0]})]
    pairs, counts = P.training_pairs(records, PRINCIPLES, P.PairSettings(passes=1, negate_p=1.0))
    assert pairs[0]["preference"] == 1 and pairs[0]["label"] == "rule:disclaimer" and counts["rule:disclaimer"] == 1
    off, _ = P.training_pairs(records, PRINCIPLES, P.PairSettings(passes=1, negate_p=1.0, disclaimer_rule=False))
    assert off[0]["preference"] == 1 and off[0]["label"] == "-a"  # negated a prefers output_1 too
    off, _ = P.training_pairs(records, PRINCIPLES, P.PairSettings(passes=1, negate_p=0.0, disclaimer_rule=False))
    assert off[0]["preference"] == 2


def test_label_noise_flips_labels():
    records = [rec(i, {"a": [float(i % 3 - 1) or 0.5] * 2}) for i in range(40)]
    clean, _ = P.training_pairs(records, PRINCIPLES, P.PairSettings(passes=1, negate_p=0.0))
    noisy, counts = P.training_pairs(records, PRINCIPLES, P.PairSettings(passes=1, negate_p=0.0, label_noise=0.5))
    flipped = [c["id"] for c, n in zip(clean, noisy) if c["preference"] != n["preference"]]
    assert flipped == [n["id"] for n in noisy if n["label"].endswith("+noise")] and 5 < counts["noise"] < 35
    all_, _ = P.training_pairs(records, PRINCIPLES, P.PairSettings(passes=1, negate_p=0.0, label_noise=1.0))
    assert all(c["preference"] != n["preference"] for c, n in zip(clean, all_))


def test_pairs_are_deterministic_for_a_seed_and_independent_of_record_order():
    records = [rec(i, {"a": [i - 5.0, i - 4.0], "b": [3.0 - i, 2.0], "c": [0.5 * i, -1.0]}) for i in range(12)]
    s = P.PairSettings(passes=3, seed=7)
    one, _ = P.training_pairs(records, PRINCIPLES, s)
    again, _ = P.training_pairs(list(reversed(records)), PRINCIPLES, s)
    assert sorted(one, key=lambda p: p["id"]) == sorted(again, key=lambda p: p["id"])
    other, _ = P.training_pairs(records, PRINCIPLES, P.PairSettings(passes=3, seed=8))
    assert other != one
    assert {len(p["principles"]) for p in one} <= {1, 2, 3}


def test_k_is_geometric_and_capped():
    import random
    rng = random.Random(0)
    ks = [P.draw_k(rng, 0.5, 4) for _ in range(4000)]
    assert max(ks) == 4 and min(ks) == 1
    assert ks.count(1) / len(ks) == pytest.approx(0.5, abs=0.03)
    assert ks.count(2) / len(ks) == pytest.approx(0.25, abs=0.03)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="--passes"):
        P.training_pairs([rec(0, {"a": [1, 1]})], PRINCIPLES, P.PairSettings(passes=0))
    with pytest.raises(ValueError, match="no dimension"):
        P.training_pairs([rec(0, {"zz": [1, 1]})], PRINCIPLES)
