"""The sampling engine: shared-prefix cache, stops, EOS, biases, penalties, seeds, streaming."""

import pytest
import torch

from dromedary.engine import generation
from dromedary.engine.generation import Engine, SamplingParams

pytestmark = pytest.mark.usefixtures("world")

SHARED = "Every helpful assistant should read the principle, think about the user, and answer honestly. "
BATCH_A = [SHARED + "The camel", SHARED + "Which river runs through the city at night?", SHARED + "Tea"]
BATCH_B = [SHARED + "Good morning", SHARED + "The camel walks across the desert sand, slowly"]
# Shares a longer prefix than BATCH_A's cached one: the cached block is reused, the rest is per row.
BATCH_C = [SHARED + "The camel walks", SHARED + "The camel walks across", SHARED + "The camel walks across the"]
PLAIN = ["The camel", "Hello there friend, what is the answer?", "日本 café €", "Water", "One two three"]

GREEDY = SamplingParams(max_new_tokens=16)
SAMPLED = SamplingParams(max_new_tokens=16, temperature=1.0)


@pytest.fixture
def engine(gqa_loaded):
    return Engine(gqa_loaded.model, gqa_loaded.tokenizer)


class Uncached(Engine):
    """An engine that never builds a shared-prefix block (MIN_PREFIX_TOKENS patched per call)."""

    def generate(self, *args, **kwargs):
        saved = generation.MIN_PREFIX_TOKENS
        generation.MIN_PREFIX_TOKENS = 10**9
        try:
            return super().generate(*args, **kwargs)
        finally:
            generation.MIN_PREFIX_TOKENS = saved


@pytest.fixture
def uncached(gqa_loaded):
    return Uncached(gqa_loaded.model, gqa_loaded.tokenizer)


def texts(gens):
    return [g.text for g in gens]


def run(engine, prompts, params, seeds=None):
    seeds = seeds if seeds is not None else list(range(100, 100 + len(prompts)))
    return [(g.tokens, g.text, g.finish_reason) for g in engine.generate(prompts, params, seeds=seeds)]


# ------------------------------------------------------------------------------ prefix cache

@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_prefix_cache_matches_uncached_generation_across_calls(engine, uncached, params):
    expected = [run(uncached, batch, params) for batch in (BATCH_A, BATCH_B, BATCH_C, BATCH_A[:1])]
    assert uncached._prefix is None

    got = [run(engine, BATCH_A, params)]
    cached = engine._prefix
    assert cached is not None and len(cached.tokens) >= generation.MIN_PREFIX_TOKENS
    for batch in (BATCH_B, BATCH_C, BATCH_A[:1]):
        got.append(run(engine, batch, params))
        assert engine._prefix is cached  # reused, not recomputed
    assert got == expected


def test_prefix_cache_is_replaced_by_a_different_prefix(engine, uncached):
    other = ["A different long shared preamble about water, rivers and the city markets. " + s
             for s in ("Tea", "Bread and coffee")]
    engine.generate(BATCH_A, GREEDY)
    first = engine._prefix
    got = run(engine, other, GREEDY)
    assert engine._prefix is not first
    assert got == run(uncached, other, GREEDY)
    # ...and a batch without the cached prefix runs uncached and correctly.
    assert run(engine, PLAIN, GREEDY) == run(uncached, PLAIN, GREEDY)


def test_prompt_one_token_longer_than_the_cached_prefix(engine, uncached, tokenizer):
    engine.generate(BATCH_A, GREEDY)
    n = len(engine._prefix.tokens)
    ids = tokenizer.encode(BATCH_A[0])[: n + 1]  # every row keeps one token of its own
    assert run(engine, [ids], GREEDY) == run(uncached, [ids], GREEDY)


def test_a_growing_conversation_extends_the_cached_prefix(engine, uncached, tokenizer, monkeypatch):
    """Chat: each turn's prompt extends the previous one; the cached prefix grows by the new
    shared tokens instead of being recomputed, and generations stay those of an uncached run."""
    fills = []
    real = engine.model.forward
    monkeypatch.setattr(engine.model, "forward", lambda *a, **k: fills.append(k.get("prefix_only")) or real(*a, **k))
    turn = BATCH_A[0]
    engine.generate([turn, turn + " more"], GREEDY)  # rows share `turn`: it becomes the prefix
    before = engine._prefix
    grown = turn
    while len(tokenizer.encode(grown)) < len(before.tokens) + 70:
        grown += " The camel walks across the desert sand to the river city."
    prompts = [grown + " Tea", grown + " Bread and coffee"]
    got = run(engine, prompts, GREEDY)
    after = engine._prefix
    assert after is not before and after.tokens[: len(before.tokens)] == before.tokens
    assert len(after.tokens) >= len(before.tokens) + 64
    assert fills.count(True) == 1  # the prefix was filled once, then only extended
    assert got == run(uncached, prompts, GREEDY)


# ------------------------------------------------------------------------------------- stops

def stop_candidates(text: str) -> list[tuple[int, str]]:
    """(first index, 2-char string) for substrings of `text` usable as stop strings."""
    out = []
    for k in range(1, len(text) - 1):
        s = text[k : k + 2]
        if "\ufffd" not in s and text.find(s) == k:
            out.append((k, s))
    return out


def expected_cut(text: str, stops) -> tuple[str, str]:
    hits = [text.find(s) for s in stops if text.find(s) >= 0]
    return (text[: min(hits)], "stop") if hits else (text, None)


@pytest.mark.parametrize("batch", [1, 3, 5])
def test_stop_strings_cut_before_the_first_stop_at_any_batch_size(engine, batch):
    params = SamplingParams(max_new_tokens=24)
    prompts = PLAIN[:batch]
    full = engine.generate(prompts, params)
    cands = stop_candidates(full[0].text)
    assert len(cands) >= 3, full[0].text
    # Two stops that occur in row 0 (the later one listed first) and one that never occurs.
    early, late = cands[len(cands) // 3], cands[-1]
    stops = [late[1], "\x00never\x00", early[1]]
    got = engine.generate(prompts, SamplingParams(max_new_tokens=24, stop=stops))
    assert got[0].text == full[0].text[: early[0]] and got[0].finish_reason == "stop"
    for g, f in zip(got, full):
        text, reason = expected_cut(f.text, stops)
        assert g.text == text
        assert g.finish_reason == (reason or f.finish_reason)


def test_stop_string_found_within_one_token(engine):
    full = engine.generate(PLAIN[:1], SamplingParams(max_new_tokens=24))[0]
    k, s = stop_candidates(full.text)[0]
    got = engine.generate(PLAIN[:1], SamplingParams(max_new_tokens=24, stop=[s[0]]))[0]
    assert got.text == full.text[: full.text.find(s[0])]


def test_streamed_deltas_concatenate_to_each_rows_text(engine):
    streamed = {i: "" for i in range(len(PLAIN))}

    def on_text(row, delta):
        streamed[row] += delta

    gens = engine.generate(PLAIN, SamplingParams(max_new_tokens=24), on_text=on_text)
    assert [streamed[i] for i in range(len(PLAIN))] == texts(gens)


def spanning_stop(tokenizer, tokens):
    """A 2-char stop string whose first char ends one token's text and whose second begins the
    next token's, first occurring there."""
    for i in range(1, len(tokens)):
        before, after = tokenizer.decode(tokens[:i]), tokenizer.decode(tokens[: i + 1])
        if len(after) > len(before) and before and "\ufffd" not in after[len(before) - 1 : len(before) + 1]:
            stop = after[len(before) - 1 : len(before) + 1]
            if after.find(stop) == len(before) - 1:
                return stop, len(before) - 1
    raise AssertionError("no token boundary to put a stop string across")


def test_stop_string_spanning_two_tokens_is_never_streamed(engine, tokenizer):
    """What chat shows while streaming must be exactly the final text: a stop string is never
    shown, not even its first characters (e.g. the "\n\n" of "\n\n### User")."""
    full = engine.generate(PLAIN[:1], SamplingParams(max_new_tokens=24))[0]
    stop, at = spanning_stop(tokenizer, full.tokens)
    shown = []
    g = engine.generate(PLAIN[:1], SamplingParams(max_new_tokens=24, stop=[stop]),
                        on_text=lambda row, delta: shown.append(delta))[0]
    assert g.text == full.text[:at] and g.finish_reason == "stop"
    assert "".join(shown) == g.text


# ----------------------------------------------------------------- EOS, biases, penalties, limits

def test_eos_finishes_a_row_and_is_not_part_of_the_output(engine, tokenizer):
    params = SamplingParams(max_new_tokens=8, logit_bias={tokenizer.eos_id: 100.0})
    g = engine.generate(["The camel"], params)[0]
    assert (g.tokens, g.text, g.finish_reason) == ([], "", "eos")


def test_min_new_tokens_holds_off_eos(engine, tokenizer):
    params = SamplingParams(max_new_tokens=8, min_new_tokens=3, logit_bias={tokenizer.eos_id: 100.0})
    gens = engine.generate(["The camel", "Hello there friend"], params)
    for g in gens:
        assert len(g.tokens) == 3 and g.finish_reason == "eos"
        assert tokenizer.eos_id not in g.tokens


def test_rows_finishing_early_do_not_disturb_the_others(engine, tokenizer):
    # Row 0 stops at once (a stop string that is its whole first token); the others must be the
    # same as when generated alone.
    alone = [engine.generate([p], GREEDY)[0] for p in PLAIN]
    first = alone[0].text[:1]
    gens = engine.generate(PLAIN, SamplingParams(max_new_tokens=16, stop=[first]))
    assert gens[0].finish_reason == "stop"
    for g, a in zip(gens[1:], alone[1:]):
        assert g.text == expected_cut(a.text, [first])[0]


def test_logit_bias_forces_a_token(engine, tokenizer):
    token = tokenizer.encode("camel", bos=False)[0]
    g = engine.generate(["Water"], SamplingParams(max_new_tokens=6, logit_bias={token: 100.0}))[0]
    assert g.tokens == [token] * 6
    assert g.text == " " + tokenizer.decode([token] * 6)  # "▁c" after the prompt keeps its space
    g = engine.generate(["Water"], SamplingParams(max_new_tokens=6, temperature=1.0, logit_bias={token: 100.0}))[0]
    assert g.tokens == [token] * 6


def repeats(tokens, n):
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(grams) - len(set(grams))


def test_ngram_penalties_change_the_output(engine):
    params = SamplingParams(max_new_tokens=40)
    base = engine.generate(PLAIN, params)
    # The random model repeats itself under greedy decoding (that is what the penalties are for).
    assert sum(repeats(g.tokens, 1) for g in base) > 0
    assert sum(repeats(g.tokens, 2) for g in base) > 0
    unigram = engine.generate(PLAIN, SamplingParams(max_new_tokens=40, ngram_penalties=(100.0, 0, 0, 0)))
    assert all(repeats(g.tokens, 1) == 0 for g in unigram)
    # n = 2: a token that already followed the current last token is penalised.
    bigram = engine.generate(PLAIN, SamplingParams(max_new_tokens=40, ngram_penalties=(0, 100.0, 0, 0)))
    assert all(repeats(g.tokens, 2) == 0 for g in bigram)
    assert [g.tokens for g in bigram] != [g.tokens for g in base]
    # The penalty changes nothing before the first repeat.
    for b, u in zip(base, unigram):
        seen, k = set(), 0
        while k < len(b.tokens) and b.tokens[k] not in seen:
            seen.add(b.tokens[k])
            k += 1
        assert u.tokens[:k] == b.tokens[:k]


def test_max_new_tokens_and_length_finish(engine):
    gens = engine.generate(PLAIN, SamplingParams(max_new_tokens=5))
    for g in gens:
        if g.finish_reason == "length":
            assert len(g.tokens) == 5
        else:
            assert len(g.tokens) < 5
    assert any(g.finish_reason == "length" for g in gens)


def test_prompt_longer_than_the_context_is_refused(engine, tokenizer):
    long = "camel " * 400
    assert len(tokenizer.encode(long)) >= engine.max_seq_len
    with pytest.raises(ValueError, match="context window"):
        engine.generate([long], GREEDY)


def test_generation_stops_at_the_context_window(gqa_loaded, tokenizer):
    engine = Engine(gqa_loaded.model, tokenizer, max_seq_len=24)
    ids = tokenizer.encode("The camel")
    g = engine.generate([ids], SamplingParams(max_new_tokens=100))[0]
    assert len(ids) + len(g.tokens) == 24 and g.finish_reason == "length"


@pytest.mark.parametrize("bad, match", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(min_new_tokens=5, max_new_tokens=4), "min_new_tokens"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_k=-1), "top_k"),
])
def test_bad_sampling_params_are_refused(engine, bad, match):
    with pytest.raises(ValueError, match=match):
        engine.generate(["x"], SamplingParams(**bad))


# ------------------------------------------------------------------------------------- seeds

def test_same_seed_same_text_and_different_seed_different_text(engine):
    a = engine.generate(PLAIN, SAMPLED, seed=7)
    b = engine.generate(PLAIN, SAMPLED, seed=7)
    c = engine.generate(PLAIN, SAMPLED, seed=8)
    assert texts(a) == texts(b)
    assert texts(a) != texts(c)
    assert texts(a) != texts(engine.generate(PLAIN, GREEDY))


def test_row_seed_makes_a_row_independent_of_its_batch(engine):
    seeds = [11, 22, 33, 44, 55]
    together = engine.generate(PLAIN, SAMPLED, seeds=seeds)
    for i, prompt in enumerate(PLAIN):
        alone = engine.generate([prompt], SAMPLED, seeds=[seeds[i]])[0]
        assert alone.tokens == together[i].tokens
    shuffled = engine.generate(PLAIN[::-1], SAMPLED, seeds=seeds[::-1])
    assert [g.tokens for g in shuffled[::-1]] == [g.tokens for g in together]


def test_draw_follows_the_distribution_and_never_picks_a_zero():
    # Unnormalised weights, zeros in front, between and at the end (top-k / top-p leave zeros).
    weights = torch.tensor([0.0, 1.0, 0.0, 0.6, 0.4, 0.0])
    n = 4000
    picked = torch.cat([generation.draw(weights[None].repeat(50, 1), range(k, k + 50), step=k % 7)
                        for k in range(0, n, 50)])
    counts = torch.bincount(picked, minlength=6).double() / n
    assert counts[[0, 2, 5]].sum() == 0
    # Binomial standard deviation is <= 0.008 here: 5 of them is a failure, not noise.
    torch.testing.assert_close(counts[[1, 3, 4]], torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64),
                               atol=0.04, rtol=0)


def test_uniforms_are_in_the_half_open_unit_interval_and_spread():
    us = [generation.uniform(seed, step) for seed in range(200) for step in range(20)]
    assert all(0 < u <= 1 for u in us)
    assert abs(sum(us) / len(us) - 0.5) < 0.02
    assert len(set(us)) == len(us)


def test_row_seed_is_stable_and_depends_on_seed_and_key():
    assert generation.row_seed(0, "r1") == generation.row_seed(0, "r1")
    assert len({generation.row_seed(0, "r1"), generation.row_seed(1, "r1"), generation.row_seed(0, "r2")}) == 3
    assert 0 <= generation.row_seed(123, "x") < 2**63


def test_top_k_1_and_tiny_top_p_equal_greedy(engine):
    greedy = engine.generate(PLAIN, GREEDY)
    for params in (SamplingParams(max_new_tokens=16, temperature=1.5, top_k=1),
                   SamplingParams(max_new_tokens=16, temperature=1.5, top_p=1e-6)):
        got = engine.generate(PLAIN, params, seeds=[1, 2, 3, 4, 5])
        assert [g.tokens for g in got] == [g.tokens for g in greedy]


def test_top_k_limits_sampling_to_the_k_most_likely(engine, gqa_loaded, tokenizer):
    ids = tokenizer.encode("The camel")
    with torch.no_grad():
        logits = gqa_loaded.model(torch.tensor([ids]))[0, -1]
    top3 = set(torch.topk(logits, 3).indices.tolist())
    firsts = {engine.generate([ids], SamplingParams(max_new_tokens=1, temperature=5.0, top_k=3), seeds=[s])[0].tokens[0]
              for s in range(40)}
    assert firsts <= top3 and len(firsts) >= 2


def test_ids_past_the_tokenizer_vocabulary_are_never_sampled(world, tokenizer):
    """A checkpoint may have more embedding rows than the tokenizer has pieces (LLaMA-2 HF)."""
    from dataclasses import replace

    from helpers_ckpt import GQA

    from dromedary.llama import checkpoint
    from dromedary.llama.model import Transformer

    args = replace(GQA, vocab_size=tokenizer.n_words + 10)
    model = Transformer(args)
    model.load_state_dict(checkpoint.init_state(args, seed=3, std=0.3))
    model.eval()
    engine = Engine(model, tokenizer)
    g = engine.generate(["Water"], SamplingParams(max_new_tokens=5, temperature=1.0,
                                                  logit_bias={tokenizer.n_words + 3: 1000.0}))[0]
    assert all(t < tokenizer.n_words for t in g.tokens)


# ------------------------------------------------------- a row never depends on its neighbours

NO_EOS = {2: float("-inf")}  # the fixture tokenizer's EOS: rows run to their budgets


def test_a_rows_budget_is_its_own_whatever_its_batch(gqa_loaded, tokenizer):
    """Window 64: a short prompt gets the whole rest of the window beside a long prompt, and both
    rows are bit for bit what they are alone (fp32)."""
    engine = Engine(gqa_loaded.model, tokenizer, max_seq_len=64)
    short = tokenizer.encode("The camel walks")
    long = tokenizer.encode(" ".join(["water river city people"] * 12))[:45]
    params = SamplingParams(max_new_tokens=100, logit_bias=NO_EOS)
    alone = [engine.generate([p], params, seeds=[5])[0] for p in (short, long)]
    assert [len(a.tokens) for a in alone] == [64 - len(short), 64 - 45]
    for batch in ([short, long], [long, short]):
        together = engine.generate(batch, params, seeds=[5, 5])
        for g in together:
            a = alone[0] if len(g.tokens) == 64 - len(short) else alone[1]
            assert (g.tokens, g.text, g.finish_reason) == (a.tokens, a.text, "length")
    # Sampled, and with a shared prefix (rows start alike): the same rule.
    shared = tokenizer.encode(SHARED)[:20]
    rows = [shared + short[1:], (shared + long[1:])[:58]]
    sampled = SamplingParams(max_new_tokens=100, temperature=1.0, logit_bias=NO_EOS)
    alone = [Engine(gqa_loaded.model, tokenizer, max_seq_len=64).generate([r], sampled, seeds=[i])[0]
             for i, r in enumerate(rows)]
    together = engine.generate(rows, sampled, seeds=[0, 1])
    assert engine._prefix is not None  # the rows went through the shared-prefix path
    assert [g.tokens for g in together] == [a.tokens for a in alone]
    assert [len(g.tokens) for g in together] == [64 - len(r) for r in rows]


class LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes of tensor storage allocated under the mode and still alive, and their peak."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.owners = 0, 0, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import weakref

        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                key = t.untyped_storage().data_ptr()
                if key not in self.owners and t.untyped_storage().nbytes():
                    n = t.untyped_storage().nbytes()
                    self.owners[key] = n
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(t, self._free, key)
        return out

    def _free(self, key):
        self.live -= self.owners.pop(key, 0)


def test_rows_leaving_the_batch_do_not_raise_peak_memory(gqa_loaded, tokenizer):
    """Rows finish one after another (each at its own budget); the KV cache is never held twice."""
    engine = Engine(gqa_loaded.model, tokenizer)
    # Short prompts (2-5 tokens), so that the cache, not the first pass's activations, is the peak.
    prompts = [tokenizer.encode("The camel walks across the desert")[:n] for n in (2, 3, 4, 5)]
    params = SamplingParams(max_new_tokens=1000, logit_bias=NO_EOS)
    expected = [engine.generate([p], params)[0].tokens for p in prompts]
    engine.model.rope("cpu")  # the rotary table exists before the measure
    args = gqa_loaded.model.args
    slots = engine.max_seq_len  # each row's prompt + budget
    cache_bytes = 2 * args.n_layers * len(prompts) * args.kv_heads * slots * args.head_size * 4
    with LiveBytes() as mem:
        gens = engine.generate(prompts, params)
    assert [g.tokens for g in gens] == expected
    assert [len(g.tokens) for g in gens] == [engine.max_seq_len - len(p) for p in prompts]
    # The cache plus the first pass's activations (under 10% here); a second copy of the live rows
    # at the first finished row would be 1.75x.
    assert mem.peak < 1.25 * cache_bytes, (mem.peak, cache_bytes)


def test_compaction_moves_rows_within_the_same_buffers():
    from dromedary.llama.model import KVCache

    k = [torch.arange(5.0)[:, None, None, None].expand(5, 2, 6, 3).contiguous() for _ in range(2)]
    cache = KVCache(k=list(k), v=[t.clone() for t in k])
    ptrs = [t.data_ptr() for t in cache.k + cache.v]
    keep = generation._compact(cache, finished=[1, 3], n_slots=5, span=4)
    assert keep == [0, 4, 2]
    assert [t.data_ptr() for t in cache.k + cache.v] == ptrs and all(t.is_contiguous() for t in cache.k)
    for t in cache.k + cache.v:
        assert t.shape[0] == 3
        assert t[:, 0, :4, 0].tolist() == [[0.0] * 4, [4.0] * 4, [2.0] * 4]


# --------------------------------------------------------------- pinned and stale prefixes

def test_a_batch_sharing_more_than_the_pinned_prefix_keeps_the_pin(engine, uncached, tokenizer, monkeypatch):
    pin = tokenizer.encode(SHARED)
    engine.cache_prefix(pin)
    fills = []
    real = engine.model.forward
    monkeypatch.setattr(engine.model, "forward", lambda *a, **k: fills.append(k.get("prefix_only")) or real(*a, **k))
    grown = SHARED
    while len(tokenizer.encode(grown)) < len(pin) + 70:
        grown += " The camel walks across the desert sand to the river city."
    long_batch = [grown + " Tea", grown + " Bread and coffee"]
    assert run(engine, long_batch, GREEDY) == run(uncached, long_batch, GREEDY)
    # The next ordinary batch attends the pinned block: nothing is filled again.
    fills.clear()
    assert run(engine, BATCH_A, GREEDY) == run(uncached, BATCH_A, GREEDY)
    assert True not in fills
    assert engine._prefix.tokens == tuple(pin)


def fresh_engine(tokenizer, seed=3):
    from helpers_ckpt import GQA

    from dromedary.llama import checkpoint
    from dromedary.llama.model import Transformer

    model = Transformer(GQA)
    model.load_state_dict(checkpoint.init_state(GQA, seed=seed, std=0.3))
    model.eval()
    return Engine(model, tokenizer), Uncached(model, tokenizer)


@pytest.mark.parametrize("change", ["in_place", "reassigned", "pinned"])
def test_a_weight_change_drops_the_cached_prefix(world, tokenizer, change):
    engine, uncached = fresh_engine(tokenizer)
    if change == "pinned":
        engine.cache_prefix(tokenizer.encode(SHARED))
    engine.generate(BATCH_A, GREEDY)
    assert engine._prefix is not None
    wk = engine.model.layers[0].attention.wk
    with torch.no_grad():
        if change == "reassigned":
            wk.weight = torch.nn.Parameter(wk.weight * 3.0, requires_grad=False)
        else:
            wk.weight.mul_(3.0)
    assert run(engine, BATCH_B, GREEDY) == run(uncached, BATCH_B, GREEDY)
    if change == "pinned":
        assert engine._pinned.tokens == tuple(tokenizer.encode(SHARED))


# ------------------------------------------------------------------------------- bad logits

def test_nan_logits_are_an_error_not_the_last_token(world, tokenizer):
    engine, _ = fresh_engine(tokenizer)
    with torch.no_grad():
        engine.model.norm.weight[3] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN"):
        engine.generate(["The camel"], GREEDY)
    with pytest.raises(FloatingPointError, match="NaN"):
        engine.generate(["The camel"], SAMPLED)


def test_every_token_excluded_is_an_error(engine, tokenizer):
    everything = {t: float("-inf") for t in range(tokenizer.n_words)}
    for params in (SamplingParams(max_new_tokens=4, logit_bias=everything),
                   SamplingParams(max_new_tokens=4, temperature=1.0, logit_bias=everything)):
        with pytest.raises(ValueError, match="every token is excluded"):
            engine.generate(["Water", "The camel"], params)


class Substring:
    """A StopRule standing for a pattern: any of `options`, held back while a prefix of one."""

    def __init__(self, *options):
        self.options = options

    def find(self, text, start):
        hits = [i for o in self.options if (i := text.find(o, max(0, start - len(o)))) >= 0]
        return min(hits) if hits else None

    def partial(self, text):
        return generation.stop_prefix_len(text, self.options)


def test_a_stop_rule_cuts_and_streams_like_a_stop_string(engine, tokenizer):
    full = engine.generate(PLAIN[:1], SamplingParams(max_new_tokens=24))[0]
    stop, at = spanning_stop(tokenizer, full.tokens)
    shown = []
    g = engine.generate(PLAIN[:1], SamplingParams(max_new_tokens=24, stop=[Substring("\x00never", stop)]),
                        on_text=lambda row, delta: shown.append(delta))[0]
    assert g.text == full.text[:at] and g.finish_reason == "stop"
    assert "".join(shown) == g.text
