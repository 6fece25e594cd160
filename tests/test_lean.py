"""The CPU bf16 decoding path: packed weights and the lean one-token step give the same tokens and
logits as the model's own forward, and step aside when the weights change."""

import pytest
import torch

from dromedary.engine import builder
from dromedary.engine.generation import Engine, SamplingParams
from dromedary.llama.model import KVCache, can_prepack

pytestmark = pytest.mark.usefixtures("world")

SHARED = "Every helpful assistant should read the principle, think about the user, and answer honestly. "
WITH_PREFIX = [SHARED + "The camel", SHARED + "Which river runs through the city at night?", SHARED + "Tea"]
PLAIN = ["The camel", "Hello there friend, what is the answer?", "日本 café €", "Water"]


@pytest.fixture
def bf16(ckpts):
    loaded = builder.build(str(ckpts["gqa_meta"]), model_parallel_size=1, dtype="bf16", device="cpu")
    if not can_prepack(loaded.model):
        pytest.skip("this CPU has no oneDNN bf16 support")
    return loaded


def generate(engine, prompts, params):
    engine._prefix = None
    gens = engine.generate(prompts, params, seeds=list(range(len(prompts))))
    return [(g.tokens, g.finish_reason) for g in gens]


@pytest.mark.parametrize("prompts", [WITH_PREFIX, PLAIN, WITH_PREFIX[1:2]], ids=["prefix", "ragged", "one-row"])
@pytest.mark.parametrize("params", [SamplingParams(max_new_tokens=24),
                                    SamplingParams(max_new_tokens=24, temperature=1.0, top_p=0.9)],
                         ids=["greedy", "sampled"])
def test_lean_step_generates_what_the_model_forward_generates(bf16, prompts, params):
    engine = Engine(bf16.model, bf16.tokenizer, prepack=True, native=False)
    assert engine._fast_step is not None
    fast = generate(engine, prompts, params)
    engine._fast_step = None  # every step through Transformer.forward, on the same packs
    assert generate(engine, prompts, params) == fast
    plain = Engine(bf16.model, bf16.tokenizer, prepack=False)  # drops the packs: plain layers
    assert generate(plain, prompts, params) == fast


@pytest.mark.parametrize("with_prefix", [True, False], ids=["prefix", "no-prefix"])
@pytest.mark.parametrize("slots", [[5, 5, 5], [3, 7, 5]], ids=["uniform", "ragged"])
def test_lean_step_logits_equal_forward_bit_for_bit(bf16, with_prefix, slots):
    model, tok = bf16.model, bf16.tokenizer
    engine = Engine(model, tok, prepack=True, native=False)
    torch.manual_seed(0)
    vocab = model.args.vocab_size
    cache = KVCache.allocate(model, len(slots), 16, device="cpu", dtype=torch.bfloat16)
    p_len = 0
    with torch.inference_mode():
        if with_prefix:
            prefix = torch.randint(3, vocab, (1, 20))
            model(prefix, cache=cache, prefix_only=True)
            p_len = 20
        # Fill each row's slots before its next one with a prompt pass (stale values past a
        # shorter row's end stay in the cache, as in a real batch).
        width = max(slots)
        prompt = torch.randint(3, vocab, (len(slots), width))
        model(prompt, p_len + torch.arange(width)[None].expand(len(slots), width), cache)
        twin = KVCache([k.clone() for k in cache.k], [v.clone() for v in cache.v], cache.prefix_k, cache.prefix_v)
        tokens = torch.randint(3, vocab, (len(slots),))
        lean = engine._fast_step.step(tokens, slots, cache)
        slot_t = torch.tensor(slots)
        ref = model(tokens[:, None], (p_len + slot_t)[:, None], twin)[:, -1]
    assert torch.equal(lean, ref)
    for a, b in zip(cache.k + cache.v, twin.k + twin.v):
        assert torch.equal(a, b)


def test_an_updated_weight_sends_decoding_back_to_the_forward(bf16):
    model, tok = bf16.model, bf16.tokenizer
    engine = Engine(model, tok, prepack=True, native=False)
    assert not engine._fast_step.usable()  # autograd on: a training step, not decoding
    with torch.no_grad():
        assert engine._fast_step.usable()
        model.layers[1].feed_forward.w2.weight.mul_(2.0)  # in place: the pack is now stale
        assert not engine._fast_step.usable()
    params = SamplingParams(max_new_tokens=16)
    plain = Engine(model, tok, prepack=False)
    assert generate(engine, PLAIN, params) == generate(plain, PLAIN, params)
