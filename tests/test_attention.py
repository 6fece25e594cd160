"""Attention kernels by device (llama/model.py): the CUDA arrangement (query heads of a kv group
folded into query rows, the memory-efficient kernel with a mask and its log-sum-exp) against the
CPU one, on the CPU with the CUDA kernel stood in for; and the real kernel where CUDA is present."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from dromedary.llama import model as M

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def efficient_stand_in(calls):
    """The contract of aten._scaled_dot_product_efficient_attention as _fused_with_lse uses it:
    equal head counts, a (B, H, M, N) bias whose rows are 16-aligned, the lse padded to 32 rows."""

    def run(q, k, v, bias, compute_lse):
        assert compute_lse and q.shape[1] == k.shape[1] == v.shape[1]
        if bias is not None:
            assert bias.shape == (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
            assert bias.stride(-1) == 1 and bias.stride(-2) % 16 == 0
        calls.append(q.shape)
        s = (q.float() @ k.float().transpose(-1, -2)) / q.shape[-1] ** 0.5
        if bias is not None:
            s = s + bias
        lse = torch.logsumexp(s, -1)
        out = (s - lse[..., None]).exp() @ v.float()
        pad = -q.shape[2] % 32
        lse = torch.cat([lse, torch.full((*lse.shape[:2], pad), float("nan"))], -1)
        return out.to(q.dtype), lse, None, None

    return run


@pytest.fixture
def as_cuda(monkeypatch):
    calls = []
    monkeypatch.setattr(M, "_cuda_kernels", lambda device: True)
    monkeypatch.setattr(M, "_EFFICIENT", efficient_stand_in(calls))
    return calls


def ragged(bsz=3, n_heads=8, kvh=2, t=5, s=11, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(bsz, n_heads, t, d, generator=g)
    k, v = torch.randn(bsz, kvh, s, d, generator=g), torch.randn(bsz, kvh, s, d, generator=g)
    ends = torch.tensor([s - 6, s - 1, s - 3])[:bsz]  # each row sees its own slots
    visible = torch.arange(s)[None, None, :] <= (ends[:, None] - t + 1 + torch.arange(t))[:, :, None]
    mask = torch.zeros(bsz, 1, t, s).masked_fill_(~visible[:, None], float("-inf"))
    return q, k, v, mask


def test_the_device_picks_the_kernels():
    assert M._cuda_kernels(torch.device("cuda")) and M._cuda_kernels(torch.device("cuda", 1))
    assert not M._cuda_kernels(torch.device("cpu"))


def test_folded_heads_and_mask_round_trip():
    q, _, _, mask = ragged()
    assert torch.equal(M.unfold_heads(M.fold_heads(q, 2), 8), q)
    folded = M.fold_mask(mask, 4)
    assert folded.shape == (3, 1, 20, 11) and folded.stride(-2) == 16
    assert torch.equal(folded.view(3, 1, 4, 5, 11)[:, :, 2], mask)


@pytest.mark.parametrize("kvh", [1, 2, 8])
def test_cuda_arrangement_equals_the_cpu_kernels(as_cuda, kvh):
    q, k, v, mask = ragged(kvh=kvh)
    with pytest.MonkeyPatch.context() as cpu:
        cpu.setattr(M, "_cuda_kernels", lambda device: False)
        out_cpu, lse_cpu = M.attention_with_lse(q, k, v, mask)
        plain = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        merged_cpu = M.merge_attention(q, k, v, mask, k[:1, :, :7], v[:1, :, :7])
    out, lse = M.attention_with_lse(q, k, v, mask)
    torch.testing.assert_close(out, out_cpu, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, lse_cpu, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(M.gqa_attention(q, k, v, mask), plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(M.merge_attention(q, k, v, mask, k[:1, :, :7], v[:1, :, :7]), merged_cpu,
                               atol=1e-5, rtol=1e-5)
    assert as_cuda, "the CUDA arrangement did not run"


def test_generation_on_the_cuda_arrangement_matches_the_cpu_one(world, gqa_loaded, tokenizer, as_cuda):
    """Ragged rows, the shared-prefix merge and one-row decoding, through the whole engine."""
    from dromedary.engine.generation import Engine, SamplingParams

    shared = "Every helpful assistant should read the principle, think about the user, and answer honestly. "
    prompts = [shared + "The camel", shared + "Which river runs through the city at night?", "Tea"]
    params = SamplingParams(max_new_tokens=12)
    got = [g.tokens for g in Engine(gqa_loaded.model, tokenizer).generate(prompts, params)]
    got += [g.tokens for g in Engine(gqa_loaded.model, tokenizer).generate(prompts[:2], params)]
    assert as_cuda
    with pytest.MonkeyPatch.context() as cpu:
        cpu.setattr(M, "_cuda_kernels", lambda device: False)
        want = [g.tokens for g in Engine(gqa_loaded.model, tokenizer).generate(prompts, params)]
        want += [g.tokens for g in Engine(gqa_loaded.model, tokenizer).generate(prompts[:2], params)]
    assert got == want


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kvh", [2, 8])
def test_the_cuda_kernel_is_fused_and_exact(dtype, kvh):
    q, k, v, mask = (t.cuda() for t in ragged(bsz=3, n_heads=8, kvh=kvh, t=5, s=37, d=64))
    q, k, v, mask = q.to(dtype), k.to(dtype), v.to(dtype), mask.to(dtype)
    out, lse = M.attention_with_lse(q, k, v, mask)
    assert M._FUSED_REFUSED is None, M._FUSED_REFUSED
    ref_out, ref_lse = M._math_with_lse(q, k, v, mask)
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.float(), ref_out.float(), **tol)
    torch.testing.assert_close(lse, ref_lse, **tol)
    torch.testing.assert_close(M.gqa_attention(q, k, v, mask).float(), ref_out.float(), **tol)
    pk, pv = k[:1, :, :20].contiguous(), v[:1, :, :20].contiguous()
    merged = M.merge_attention(q, k, v, mask, pk, pv)
    full_k = torch.cat([pk.expand(3, -1, -1, -1), k], 2)
    full_v = torch.cat([pv.expand(3, -1, -1, -1), v], 2)
    full_mask = torch.cat([torch.zeros(3, 1, 5, 20, dtype=dtype, device="cuda"), mask], -1)
    ref = F.scaled_dot_product_attention(q.float(), full_k.float(), full_v.float(), attn_mask=full_mask.float(),
                                         enable_gqa=True)
    torch.testing.assert_close(merged.float(), ref, **tol)


def _prefill(model, rows, prefix=None):
    """Right-padded prompts from slot 0 through the cache, over an optional shared prefix:
    the logits at each row's last token."""
    width = max(len(r) for r in rows)
    tokens = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    cache = M.KVCache.allocate(model, len(rows), width + 4, device="cpu", dtype=torch.float32)
    p_len = 0
    if prefix is not None:
        model(torch.tensor([prefix]), torch.arange(len(prefix))[None], cache, prefix_only=True)
        p_len = len(prefix)
    positions = p_len + torch.arange(width)[None].expand(len(rows), width)
    last = torch.tensor([len(r) - 1 for r in rows])
    return model(tokens, positions, cache, output_index=last)[:, 0]


@pytest.mark.parametrize("with_prefix", [False, True])
def test_prompts_from_slot_zero_take_the_causal_kernel_with_the_masks_bits(world, gqa_loaded, monkeypatch, with_prefix):
    """Rows that all start at slot 0 read the causal mask, so the kernels run causal (skipping the
    hidden blocks) instead of adding -inf: in fp32 the logits are the mask path's, bit for bit."""
    model = gqa_loaded.model
    rows = [list(range(5, 45)), list(range(7, 20)), list(range(60, 93))]
    prefix = list(range(100, 123)) if with_prefix else None
    seen = []
    real_step = M.Transformer._step

    def spy(self, *a, **k):
        step = real_step(self, *a, **k)
        seen.append(step.causal)
        return step

    with torch.inference_mode():
        monkeypatch.setattr(M.Transformer, "_step", spy)
        causal = _prefill(model, rows, prefix)
        assert seen[-1] is True
        monkeypatch.setattr(M.Transformer, "_step", lambda self, *a, **k: replace(real_step(self, *a, **k), causal=False))
        masked = _prefill(model, rows, prefix)
        # A row on its own, also from slot 0: the same again.
        alone = _prefill(model, rows[1:2], prefix)
    assert torch.equal(causal, masked)
    torch.testing.assert_close(alone[0], masked[1], rtol=1e-5, atol=1e-5)


def test_the_math_fallback_applies_the_causal_mask(monkeypatch):
    q, k, v, _ = ragged(t=9, s=9)
    visible = torch.arange(9)[None, :] <= torch.arange(9)[:, None]
    mask = torch.zeros(1, 1, 9, 9).masked_fill_(~visible, float("-inf"))
    flash = M.attention_with_lse(q, k, v, mask, causal=True)
    monkeypatch.setattr(M, "_FLASH_CPU", None)
    math = M.attention_with_lse(q, k, v, mask, causal=True)
    masked = M.attention_with_lse(q, k, v, mask)
    for a, b, c in zip(flash, math, masked):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert torch.equal(b, c)
