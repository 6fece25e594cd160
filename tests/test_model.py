"""Our fairscale LLaMA against Hugging Face's LlamaForCausalLM on the same random weights."""

import pytest
import torch

from dromedary.engine import builder
from dromedary.engine.generation import Engine, SamplingParams

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("world")

PROMPTS = [
    "The camel",
    "Hello there friend, what is the answer to every question about the desert?",
    "日本 café €",
    "Water",
]
# Long shared prefix: the engine computes it once as a broadcast cache block.
SHARED = "Every helpful assistant should read the principle, think about the user, and answer honestly. "
PREFIXED = [SHARED + "The camel", SHARED + "Which river runs through the city at night", SHARED + "Tea"]


@pytest.fixture(scope="module", params=["llama1_hf", "gqa_hf"])
def pair(request, ckpts):
    """(our model loaded from the HF layout, HF's model from the same files, checkpoint name)."""
    from dromedary import distributed

    distributed.setup(1, "cpu")
    ours = builder.build(str(ckpts[request.param]), model_parallel_size=1, dtype="fp32", device="cpu")
    hf = transformers.LlamaForCausalLM.from_pretrained(str(ckpts[request.param]), dtype=torch.float32)
    hf.eval()
    return ours, hf, request.param


def test_fixture_configs_are_what_the_tests_claim(pair):
    ours, hf, name = pair
    cfg = hf.config
    if name == "llama1_hf":
        assert cfg.num_key_value_heads == cfg.num_attention_heads == ours.args.kv_heads
    else:
        assert cfg.num_key_value_heads < cfg.num_attention_heads
        assert ours.args.kv_heads == cfg.num_key_value_heads


def test_logits_match_hf(pair, tokenizer):
    ours, hf, _ = pair
    ids = [tokenizer.encode(p) for p in PROMPTS]
    for row in ids:
        x = torch.tensor([row])
        with torch.no_grad():
            a = ours.model(x)
            b = hf(x).logits
        assert a.shape == b.shape == (1, len(row), tokenizer.n_words)
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        # Not trivially equal: the logits spread enough that argmax is meaningful.
        assert a.std() > 0.5


def test_right_padded_batch_logits_match_hf_rows(pair, tokenizer):
    ours, hf, _ = pair
    ids = [tokenizer.encode(p) for p in PROMPTS]
    width = max(map(len, ids))
    x = torch.zeros(len(ids), width, dtype=torch.long)
    for i, row in enumerate(ids):
        x[i, : len(row)] = torch.tensor(row)
    with torch.no_grad():
        a = ours.model(x)
    for i, row in enumerate(ids):
        with torch.no_grad():
            b = hf(torch.tensor([row])).logits[0]
        # Causal attention: padding after a row's tokens cannot change that row's logits.
        torch.testing.assert_close(a[i, : len(row)], b, atol=1e-4, rtol=1e-4)


def hf_greedy(hf, tokenizer, prompt: str, n: int) -> list[int]:
    ids = tokenizer.encode(prompt)
    out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                      do_sample=False, max_new_tokens=n, min_new_tokens=0, eos_token_id=tokenizer.eos_id,
                      pad_token_id=0, top_k=None, top_p=None, temperature=None)
    new = out[0, len(ids):].tolist()
    return new[: new.index(tokenizer.eos_id)] if tokenizer.eos_id in new else new


@pytest.mark.parametrize("prompts", [PROMPTS, PREFIXED], ids=["mixed-lengths", "shared-prefix"])
def test_greedy_generation_matches_hf(pair, tokenizer, prompts):
    ours, hf, _ = pair
    n = 12
    engine = Engine(ours.model, tokenizer)
    gens = engine.generate(prompts, SamplingParams(max_new_tokens=n))
    if prompts is PREFIXED:
        assert engine._prefix is not None and len(engine._prefix.tokens) >= 16
    for prompt, gen in zip(prompts, gens):
        expected = hf_greedy(hf, tokenizer, prompt, n)
        assert gen.tokens == expected, prompt
        assert gen.text == tokenizer.decode_after(tokenizer.encode(prompt)[-1:], expected)
        assert gen.finish_reason == ("length" if len(expected) == n else "eos")
        assert gen.prompt_tokens == len(tokenizer.encode(prompt))


def test_score_is_hf_log_probability_of_the_target(pair, tokenizer):
    # Multiple-choice targets start with a space; the target's tokens are those of the joined text
    # after the prompt's own tokens (lm-evaluation-harness's rule).
    ours, hf, _ = pair
    prompts = ["The camel walks", "Hello there", "Good"]
    targets = [" across the desert", " friend", " answer 日本"]
    scores = Engine(ours.model, tokenizer).score(prompts, targets, max_batch_size=2)
    for p, t, s in zip(prompts, targets, scores):
        pi, whole = tokenizer.encode(p), tokenizer.encode(p + t)
        assert whole[: len(pi)] == pi and len(whole) > len(pi)
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([whole])).logits[0].double(), dim=-1)
        expected = sum(float(logp[j - 1, whole[j]]) for j in range(len(pi), len(whole)))
        assert s == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize("gqa", [False, True], ids=["mha", "gqa"])
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
def test_attention_without_a_fused_kernel_takes_queries_in_bounded_chunks(monkeypatch, gqa, masked):
    # Off the CPU, attention with log-sum-exp materialises fp32 scores: long query blocks (a big
    # self-align batch folded over its prefix) are taken in chunks, with the same result.
    from dromedary.llama import model

    torch.manual_seed(0)
    heads, kvh, t, s, d = 4, 2 if gqa else 4, 37, 23, 8
    q, k, v = torch.randn(2, heads, t, d), torch.randn(2, kvh, s, d), torch.randn(2, kvh, s, d)
    mask = None
    if masked:
        mask = torch.zeros(2, 1, t, s).masked_fill_(torch.rand(2, 1, t, s) < 0.3, float("-inf"))
        mask[..., 0] = 0.0  # every query sees at least one key
    monkeypatch.setattr(model, "_FLASH_CPU", None)
    whole_out, whole_lse = model.attention_with_lse(q, k, v, mask)
    monkeypatch.setattr(model, "SCORE_CHUNK_BYTES", 4 * 2 * heads * s * 5)  # 5 query rows at a time
    out, lse = model.attention_with_lse(q, k, v, mask)
    torch.testing.assert_close(out, whole_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse, whole_lse, rtol=1e-6, atol=1e-6)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
