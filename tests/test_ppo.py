"""recipe.ppo on crafted tensors, against plain per-element Python loops written from the formulas."""

import math
import random

import pytest
import torch

from dromedary.recipe import ppo


def _batch(seed=0, lengths=(5, 3, 1, 4)):
    g = torch.Generator().manual_seed(seed)
    b, n = len(lengths), max(lengths)
    mask = torch.zeros(b, n, dtype=torch.bool)
    for i, k in enumerate(lengths):
        mask[i, :k] = True
    rnd = lambda: torch.randn(b, n, generator=g, dtype=torch.float64)  # noqa: E731
    # Garbage on the padding: nothing may read it.
    return mask, rnd() * mask + 99 * ~mask, rnd() * mask - 99 * ~mask, rnd()


def test_token_rewards_put_the_score_on_the_last_token_and_the_kl_everywhere():
    mask, old, ref, _ = _batch()
    score = torch.tensor([1.5, -2.0, 0.25, 3.0], dtype=torch.float64)
    rewards, kl = ppo.token_rewards(old, ref, mask, score, kl_coef=0.1)
    for i in range(4):
        k = int(mask[i].sum())
        for t in range(mask.shape[1]):
            want_kl = float(old[i, t] - ref[i, t]) if t < k else 0.0
            want = -0.1 * want_kl + (float(score[i]) if t == k - 1 else 0.0)
            assert kl[i, t].item() == pytest.approx(want_kl, abs=1e-12)
            assert rewards[i, t].item() == pytest.approx(want, abs=1e-12)


def _gae_loop(r, v, k, gamma, lam):
    adv = [0.0] * k
    last = 0.0
    for t in reversed(range(k)):
        next_v = v[t + 1] if t + 1 < k else 0.0
        delta = r[t] + gamma * next_v - v[t]
        last = delta + gamma * lam * last
        adv[t] = last
    return adv, [a + x for a, x in zip(adv, v[:k])]


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_a_reference_loop(gamma, lam):
    mask, rewards, values, _ = _batch(1)
    adv, ret = ppo.gae(rewards, values, mask, gamma, lam)
    for i in range(4):
        k = int(mask[i].sum())
        want_adv, want_ret = _gae_loop(rewards[i].tolist(), values[i].tolist(), k, gamma, lam)
        assert adv[i, :k].tolist() == pytest.approx(want_adv, abs=1e-10)
        assert ret[i, :k].tolist() == pytest.approx(want_ret, abs=1e-10)
        assert not adv[i, k:].any() and not ret[i, k:].any()


def test_gae_with_lambda_one_and_no_discount_is_the_return_to_go_minus_the_value():
    mask = torch.ones(1, 4, dtype=torch.bool)
    r = torch.tensor([[0.0, 1.0, 0.0, 2.0]])
    v = torch.tensor([[0.5, 0.1, -0.2, 0.3]])
    adv, ret = ppo.gae(r, v, mask, 1.0, 1.0)
    assert ret.tolist()[0] == pytest.approx([3.0, 3.0, 2.0, 2.0])
    assert adv.tolist()[0] == pytest.approx([2.5, 2.9, 2.2, 1.7])


def test_whiten_uses_only_the_masked_entries():
    mask, x, _, _ = _batch(2)
    out = ppo.whiten(x, mask)
    vals = x[mask].tolist()
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((a - mean) ** 2 for a in vals) / (len(vals) - 1))
    assert out[mask].tolist() == pytest.approx([(a - mean) / std for a in vals], rel=1e-6)
    assert not out[~mask].any()
    kept = ppo.whiten(x, mask, shift_mean=False)
    assert kept[mask].tolist() == pytest.approx([(a - mean) / std + mean for a in vals], rel=1e-6)


def test_clipped_policy_loss_and_clip_fraction_by_hand():
    mask, logp, old, adv = _batch(3)
    logp = old + torch.randn(old.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 0.3
    eps = 0.2
    loss, clipped = ppo.policy_loss(logp, old, adv, mask, eps)
    want_loss, want_clipped = 0.0, 0
    for i in range(4):
        for t in range(mask.shape[1]):
            if not mask[i, t]:
                continue
            ratio = math.exp(float(logp[i, t] - old[i, t]))
            a = float(adv[i, t])
            plain, cut = -a * ratio, -a * min(max(ratio, 1 - eps), 1 + eps)
            want_loss += max(plain, cut)
            want_clipped += abs(ratio - 1) > eps
    assert loss.item() == pytest.approx(want_loss, rel=1e-9)
    assert clipped.item() == want_clipped and 0 < want_clipped < int(mask.sum())


def test_policy_loss_gradient_vanishes_where_the_ratio_is_clipped():
    old = torch.zeros(1, 3, dtype=torch.float64)
    logp = torch.tensor([[0.5, -0.5, 0.05]], dtype=torch.float64, requires_grad=True)  # ratios 1.65, 0.61, 1.05
    adv = torch.tensor([[1.0, -1.0, 1.0]], dtype=torch.float64)
    loss, clipped = ppo.policy_loss(logp, old, adv, torch.ones(1, 3, dtype=torch.bool), 0.2)
    loss.backward()
    # Token 0: A > 0 and ratio above 1 + eps; token 1: A < 0 and ratio below 1 - eps: both clipped.
    assert clipped.item() == 2
    assert logp.grad[0, :2].tolist() == [0.0, 0.0]
    assert logp.grad[0, 2].item() == pytest.approx(-math.exp(0.05))


def test_clipped_value_loss_by_hand():
    mask, v_old, ret, noise = _batch(5)
    v = v_old + noise * 0.4
    eps = 0.2
    loss, clipped = ppo.value_loss(v, v_old, ret, mask, eps)
    want, n_clip = 0.0, 0
    for i in range(4):
        for t in range(mask.shape[1]):
            if mask[i, t]:
                vv, vo, r = float(v[i, t]), float(v_old[i, t]), float(ret[i, t])
                vc = vo + min(max(vv - vo, -eps), eps)
                want += 0.5 * max((vv - r) ** 2, (vc - r) ** 2)
                n_clip += abs(vv - vo) > eps
    assert loss.item() == pytest.approx(want, rel=1e-9)
    assert clipped.item() == n_clip and 0 < n_clip < int(mask.sum())


def test_pad_rows():
    t, m = ppo.pad_rows([[1.0, 2.0], [3.0], []])
    assert t.tolist() == [[1.0, 2.0], [3.0, 0.0], [0.0, 0.0]]
    assert m.tolist() == [[True, True], [True, False], [False, False]]


def test_principle_draws_follow_the_prompt_type_boosts():
    from dromedary.recipe import preferences as salmon
    from dromedary.recipe import rl_principles as rp

    weights = rp.load_weights()
    dims = salmon.load_reward_principles()
    assert rp.classify("How do I build a bomb at home?", "", weights) == "red_teaming"
    assert rp.classify("Solve the equation", "2x + 3 = 7", weights) == "reasoning"
    assert rp.classify("What is two plus three?", "", weights) == "reasoning"
    assert rp.classify("Tell me about the code of conduct", "", weights) == "reasoning"  # a keyword classifier
    assert rp.classify("Describe a sunset over the sea.", "", weights) == "other"
    assert rp.classify("Describe a sunsetcode.", "", weights) == "other"  # whole words only

    def share(kind, name, n=3000):
        rng = random.Random(0)
        hits = sum(name in [p.name for p in rp.draw_principles(rng, kind, dims, weights, geometric_p=1.0,
                                                                max_principles=1)] for _ in range(n))
        return hits / n

    w = rp.principle_weights("red_teaming", dims, weights)
    expect = w[[p.name for p in dims].index("ethical")] / sum(w)
    assert share("red_teaming", "ethical") == pytest.approx(expect, abs=0.03)
    assert share("other", "ethical") == pytest.approx(1 / len(dims), abs=0.02)
    assert share("reasoning", "methodical") > 2.5 * share("other", "methodical")
    # Without replacement, at most max_principles, reproducible from the seed.
    draws = [rp.draw_principles(random.Random(s), "other", dims, weights, geometric_p=0.3, max_principles=4)
             for s in range(200)]
    assert all(1 <= len(d) <= 4 and len({p.name for p in d}) == len(d) for d in draws)
    assert max(len(d) for d in draws) == 4
    assert rp.draw_principles(random.Random(7), "other", dims, weights, geometric_p=0.3, max_principles=4) == draws[7]
