"""The pieces dpo and rl share: the engraving merged into the base, the adapter switched off for
the reference, and answer-token log-probabilities (checked against a direct log_softmax)."""

import torch
import torch.nn.functional as F
from helpers_ckpt import random_adapter

from dromedary.engine.builder import build
from dromedary.llama import lora
from dromedary.recipe import policy, sft


def _batch(tok):
    pairs = [("### User:\nName a colour.\n\n### Assistant:", " Blue, like the sky."),
             ("### User:\nSay hi.\n\n### Assistant:", " Hi!")]
    data = [sft.encode(tok, s, t, source_max_len=64, target_max_len=32, add_eos=True) for s, t in pairs]
    return sft.collate(data, "cpu")


def test_token_logprobs_match_a_direct_log_softmax():
    loaded = build(None, dtype="fp32")
    tokens, labels = _batch(loaded.tokenizer)
    logp, mask, ent = policy.token_logprobs(loaded.model, tokens, labels, entropy=True)
    with torch.no_grad():
        full = F.log_softmax(loaded.model(tokens[:, :-1]).float(), dim=-1)  # (B, T-1, V)
    target = labels[:, 1:]
    assert torch.equal(mask, target != sft.IGNORE)
    want = full.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    torch.testing.assert_close(logp, want, atol=1e-5, rtol=1e-5)
    want_ent = -(full.exp() * full).sum(-1) * mask
    torch.testing.assert_close(ent, want_ent, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(policy.sequence_logprobs(loaded.model, tokens, labels), want.sum(-1), atol=1e-4, rtol=1e-5)


def test_adapters_off_is_the_base_and_restores(tmp_path):
    base = build(None, dtype="fp32")
    tokens, labels = _batch(base.tokenizer)
    with torch.no_grad():
        want = base.model(tokens)
    random_adapter(base.model, 3)
    with torch.no_grad():
        on = base.model(tokens)
        with lora.adapters_off(base.model):
            off = base.model(tokens)
        again = base.model(tokens)
    assert not torch.allclose(on, want, atol=1e-3)
    torch.testing.assert_close(off, want, atol=0, rtol=0)
    torch.testing.assert_close(again, on, atol=0, rtol=0)
    assert all(p.requires_grad for _, p, _ in lora.trainable(base.model))  # still trainable after the block


def test_merged_adapter_equals_the_adapter_as_layers(tmp_path):
    loaded = build(None, dtype="fp32")
    random_adapter(loaded.model, 5)
    lora.write_adapter(tmp_path, lora.full_state(loaded.model, loaded.world), loaded.model, loaded.name)
    tokens, labels = _batch(loaded.tokenizer)
    as_layers = build(None, dtype="fp32", adapter=str(tmp_path))
    merged = build(None, dtype="fp32", merge_adapter=str(tmp_path))
    assert not list(lora.lora_layers(merged.model))
    with torch.no_grad():
        torch.testing.assert_close(merged.model(tokens), as_layers.model(tokens), atol=1e-4, rtol=1e-4)
    assert "merged adapter" in merged.name


def test_stacked_adapter_equals_the_upper_adapter_on_the_merged_lower(tmp_path):
    lower, upper, stacked = tmp_path / "sft", tmp_path / "dpo", tmp_path / "stacked"
    first = build(None, dtype="fp32")
    random_adapter(first.model, 7)
    lora.write_adapter(lower, lora.full_state(first.model, first.world), first.model, first.name)
    second = build(None, dtype="fp32", merge_adapter=str(lower))
    lora.add_lora(second.model, r=2, alpha=5, dropout=0.0, targets=("wk", "wv", "w1"))  # other rank, other modules
    lora.init_lora(second.model, 9, second.world)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p, _ in lora.trainable(second.model):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    lora.write_adapter(upper, lora.full_state(second.model, second.world), second.model, second.name)
    lora.stack_adapters(stacked, lower, upper, "base")
    tokens, _ = _batch(first.tokenizer)
    with torch.no_grad():
        want = second.model(tokens)
        got = build(None, dtype="fp32", adapter=str(stacked)).model(tokens)
        lower_only = build(None, dtype="fp32", adapter=str(lower)).model(tokens)
    assert not torch.allclose(want, lower_only, atol=1e-3)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
