"""The compiled CPU decoding step (native.py): as accurate as the PyTorch bf16 step, independent of
the rest of the batch, and used only while the weights it packed are the model's."""

import copy

import pytest
import torch

from dromedary.engine import builder
from dromedary.engine.generation import Engine, SamplingParams
from dromedary.llama import checkpoint
from dromedary.llama.kernels import native
from dromedary.llama.model import KVCache, ModelArgs, Transformer

pytestmark = pytest.mark.usefixtures("world")

PROMPTS = ["The camel", "Hello there friend, what is the answer?", "日本 café €", "Water"]


@pytest.fixture(scope="module")
def lib():
    lib = native.library()
    if lib is None:
        pytest.skip("no native step here (needs an AVX512-BF16 CPU and a C compiler)")
    before = lib.products
    yield lib
    native.set_products(lib, before)


@pytest.fixture
def bf16(ckpts, lib):
    return builder.build(str(ckpts["gqa_meta"]), model_parallel_size=1, dtype="bf16", device="cpu")


@pytest.fixture(params=["head16", "head64"])
def model(request, bf16):
    """The GQA test checkpoint (head_dim 16, FFN 170: products on FMAs even with AMX) and a model
    with LLaMA's multiples of 32 (head_dim 64, FFN 512: every product on AMX tiles where present)."""
    if request.param == "head16":
        return bf16.model
    args = ModelArgs(dim=128, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=bf16.model.args.vocab_size,
                     multiple_of=256, norm_eps=1e-5, max_seq_len=256)
    state = checkpoint.init_state(args, seed=3, std=0.1)
    for name, t in state.items():
        if "norm" in name:
            t.copy_(1 + 0.1 * torch.randn(t.shape, generator=torch.Generator().manual_seed(len(name))))
    m = Transformer(args)
    m.load_state_dict(state)
    return m.to(torch.bfloat16).eval()


def test_pack_puts_sixteen_rows_by_column_pairs_in_each_block():
    w = torch.randn(37, 10).bfloat16()
    p = native.pack(w)
    assert p.shape == (3, 5, 16, 2)  # 37 rows padded to 48
    for nb, j, c, e in [(0, 0, 0, 0), (0, 4, 15, 1), (1, 2, 3, 0), (2, 1, 4, 1)]:
        assert p[nb, j, c, e] == w[16 * nb + c, 2 * j + e]
    assert not p[2, :, 5:].any()  # rows 37..47 are zero
    stacked = torch.randn(2, 3, 20, 8).bfloat16()  # leading dims: one pack per matrix
    assert torch.equal(native.pack(stacked)[1, 2], native.pack(stacked[1, 2]))


def _filled_cache(model, slots, with_prefix, seed=0):
    """A cache whose rows hold a prompt pass of random tokens (and a shared prefix), plus a twin."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.args.vocab_size
    cache = KVCache.allocate(model, len(slots), max(24, max(slots) + 8), device="cpu", dtype=model.output.weight.dtype)
    p_len = 0
    if with_prefix:
        model(torch.randint(3, vocab, (1, 20), generator=g), cache=cache, prefix_only=True)
        p_len = 20
    width = max(slots)
    prompt = torch.randint(3, vocab, (len(slots), width), generator=g)
    model(prompt, p_len + torch.arange(width)[None].expand(len(slots), width), cache)
    tokens = torch.randint(3, vocab, (len(slots),), generator=g)
    return cache, tokens, p_len


def _twin(cache):
    return KVCache([k.clone() for k in cache.k], [v.clone() for v in cache.v], cache.prefix_k, cache.prefix_v)


@pytest.mark.parametrize("products", native.PRODUCTS)
@pytest.mark.parametrize("with_prefix", [True, False], ids=["prefix", "no-prefix"])
# "long": rows whose own keys run past one or several blocks of 16 (dots_bf16's blocked path and its prefetches).
@pytest.mark.parametrize("slots", [[5, 5, 5], [3, 9, 5, 1], [40, 16, 3, 97]], ids=["uniform", "ragged", "long"])
def test_native_step_is_as_accurate_as_the_pytorch_step(model, lib, products, with_prefix, slots):
    # Against the same bf16 weights run in fp32, the native step's error is no larger than the
    # PyTorch bf16 forward's (they round at the same points; only the order of sums differs).
    _use(lib, products)
    step = native.NativeDecoder.build(model)
    exact = copy.deepcopy(model).float()
    with torch.inference_mode():
        cache, tokens, p_len = _filled_cache(model, slots, with_prefix)
        twin, ref_cache = _twin(cache), _twin(cache)
        got = step.step(tokens, slots, cache).float()
        pos = (p_len + torch.tensor(slots))[:, None]
        torch_bf16 = model(tokens[:, None], pos, twin)[:, -1].float()
        ref_cache.k = [k.float() for k in ref_cache.k]
        ref_cache.v = [v.float() for v in ref_cache.v]
        ref_cache.prefix_k = [k.float() for k in ref_cache.prefix_k]
        ref_cache.prefix_v = [v.float() for v in ref_cache.prefix_v]
        ref = exact(tokens[:, None], pos, ref_cache)[:, -1]
    err_native = (got - ref).abs().max()
    err_torch = (torch_bf16 - ref).abs().max()
    assert err_native <= 2 * err_torch + 1e-3, (err_native, err_torch)
    # The new token's keys and values land in each row's slot, as accurate as PyTorch's; nothing
    # else in the cache changes.
    rows = torch.arange(len(slots))
    for a, b, r in zip(cache.k + cache.v, twin.k + twin.v, ref_cache.k + ref_cache.v):
        new_a, new_b, new_r = (t[rows, :, slots].float() for t in (a, b, r))
        assert (new_a - new_r).abs().max() <= 2 * (new_b - new_r).abs().max() + 1e-2
        a, b = a.clone(), b.clone()
        a[rows, :, slots] = b[rows, :, slots] = 0
        assert torch.equal(a, b)


def test_the_default_products_by_cpu():
    avx = {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"}
    amx = avx | {"amx_tile", "amx_bf16"}
    assert native.default_products(amx, "GenuineIntel") == "amx"
    assert native.default_products(amx, "GenuineIntel", amx=False) == "fma"
    assert native.default_products(avx, "GenuineIntel") == "fma"
    assert native.default_products(avx, "AuthenticAMD") == "dpbf16"


def _use(lib, products):
    if native.set_products(lib, products) != products:
        pytest.skip(f"this CPU has no {products}")


@pytest.mark.parametrize("products", native.PRODUCTS)
def test_a_rows_logits_do_not_depend_on_the_rest_of_the_batch(model, lib, products):
    # 19 rows: more than one group of rows in every kernel, ragged slots; and runs of 2, 3 and 5
    # rows, which the kernels tile differently again (vdpbf16ps: 8 blocks for 1-2 rows, 4 for 3-4).
    _use(lib, products)
    step = native.NativeDecoder.build(model)
    slots = [(7 * i) % 11 + 1 for i in range(19)]
    with torch.inference_mode():
        cache, tokens, _ = _filled_cache(model, slots, with_prefix=True)
        alone = []
        for i in range(len(slots)):
            row = KVCache([k[i : i + 1].clone() for k in cache.k], [v[i : i + 1].clone() for v in cache.v],
                          cache.prefix_k, cache.prefix_v)
            alone.append(step.step(tokens[i : i + 1], slots[i : i + 1], row))
        runs = []
        for a, b in [(0, 2), (2, 5), (5, 10)]:
            part = KVCache([k[a:b].clone() for k in cache.k], [v[a:b].clone() for v in cache.v],
                           cache.prefix_k, cache.prefix_v)
            runs.append(step.step(tokens[a:b], slots[a:b], part))
        together = step.step(tokens, slots, cache)
    assert torch.equal(together, torch.cat(alone))
    assert torch.equal(together[:10], torch.cat(runs))


def test_a_new_shared_prefix_is_packed_afresh(bf16, lib):
    # The step packs the prefix once and keeps it while the engine reuses the same prefix cache.
    model = bf16.model
    step = native.NativeDecoder.build(model)
    slots = [4, 6]
    with torch.inference_mode():
        first, tokens, _ = _filled_cache(model, slots, with_prefix=True, seed=1)
        second, _, _ = _filled_cache(model, slots, with_prefix=True, seed=2)
        step.step(tokens, slots, _twin(first))
        again = step.step(tokens, slots, _twin(first))
        got = step.step(tokens, slots, _twin(second))
        fresh = native.NativeDecoder.build(model).step(tokens, slots, _twin(second))
        assert torch.equal(again, native.NativeDecoder.build(model).step(tokens, slots, _twin(first)))
    assert torch.equal(got, fresh)
    assert not torch.equal(got, again)


def test_engine_decodes_natively_and_steps_aside_when_a_weight_changes(bf16, lib):
    model, tok = bf16.model, bf16.tokenizer
    engine = Engine(model, tok, prepack=True)
    assert isinstance(engine._fast_step, native.NativeDecoder)
    assert not engine._fast_step.usable()  # autograd on: a training step, not decoding
    params = SamplingParams(max_new_tokens=12)
    gens = engine.generate(PROMPTS, params)
    assert all(len(g.tokens) == 12 or g.finish_reason != "length" for g in gens)
    with torch.no_grad():
        assert engine._fast_step.usable()
        model.layers[0].attention.wk.weight.add_(0.5)  # in place: the pack is now stale
        assert not engine._fast_step.usable()
    plain = Engine(model, tok, prepack=False)
    assert [g.tokens for g in engine.generate(PROMPTS, params)] == [g.tokens for g in plain.generate(PROMPTS, params)]


def test_the_native_step_can_be_turned_off(monkeypatch, bf16):
    native.library.cache_clear()
    monkeypatch.setenv("DROMEDARY_NATIVE", "0")
    try:
        assert native.library() is None
        engine = Engine(bf16.model, bf16.tokenizer, prepack=True)
        assert engine._fast_step is not None and not isinstance(engine._fast_step, native.NativeDecoder)
    finally:
        native.library.cache_clear()
