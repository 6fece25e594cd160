"""A lean one-token decoding step for the CPU in bf16.

Decoding a few rows on the CPU is bound by reading the weights: the packed projections (see
`model.prepack_weights`) stream them near the memory bandwidth, and what is left of a step is the
cost of everything between them. Through `Transformer.forward` that is about eighty small tensor
ops, a dozen module calls and the per-pass bookkeeping of `Step` for every layer, a third of a
batch-1 step. `LeanDecoder.step` does the same arithmetic on the same packed weights with that
machinery stripped: plain tensors fetched once, one rotation for q|k, the cache written in place,
the attention kernel called directly. Its logits equal `Transformer.forward`'s bit for bit (tested).

It runs only where the packs do (CPU, bf16, no autograd) and only while every projection has a
valid pack: a LoRA-wrapped layer or an updated weight sends the engine back to the model's forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..model import KVCache, Transformer, _Packed, merge_attention


@dataclass
class _Layer:
    attention_norm: torch.Tensor
    ffn_norm: torch.Tensor
    qkv: _Packed
    wo: _Packed
    w13: _Packed
    w2: _Packed


class LeanDecoder:
    def __init__(self, model: Transformer, layers: list[_Layer], output: _Packed):
        self.model = model
        self.layers = layers
        self.output = output
        args = model.args
        attention = model.layers[0].attention
        self.n_heads, self.n_kv_heads = attention.n_local_heads, attention.n_local_kv_heads
        self.head_dim = args.head_size
        self.eps = args.norm_eps
        self.dim = args.dim
        self.vocab = args.vocab_size
        self.embed_direct = model.mp_size == 1  # no vocabulary split: a plain row lookup

    @classmethod
    def build(cls, model: Transformer) -> Optional["LeanDecoder"]:
        """The lean step for `model`, or None when some projection has no pack or the rotation
        table depends on the sequence length (dynamic NTK: the model's forward picks it per pass)."""
        if model.rope_varies_with_length:
            return None
        layers = []
        for block in model.layers:
            a, f = block.attention, block.feed_forward
            packs = [m.__dict__.get("_packed") for m in (a, a.wo, f, f.w2)]
            if any(p is None for p in packs):
                return None
            layers.append(_Layer(block.attention_norm.weight, block.ffn_norm.weight, *packs))
        output = model.output.__dict__.get("_packed")
        if output is None:
            return None
        return cls(model, layers, output)

    def usable(self) -> bool:
        """Every pack still matches its layers' current, unmodified weights; no autograd."""
        if torch.is_grad_enabled() or self.model.training:
            return False
        m = self.model
        if not self.output.usable((m.output,), _PROBE):
            return False
        for block, layer in zip(m.layers, self.layers):
            a, f = block.attention, block.feed_forward
            if (block.attention_norm.weight is not layer.attention_norm or block.ffn_norm.weight is not layer.ffn_norm
                    or not layer.qkv.usable((a.wq, a.wk, a.wv), _PROBE) or not layer.wo.usable((a.wo,), _PROBE)
                    or not layer.w13.usable((f.w1, f.w3), _PROBE) or not layer.w2.usable((f.w2,), _PROBE)):
                return False
        return True

    def step(self, tokens: torch.Tensor, slots: Sequence[int], cache: KVCache) -> torch.Tensor:
        """Logits (B, vocab) for one new token per row: `tokens` (B,), row i's token going to cache
        slot `slots[i]` at position `cache.prefix_len + slots[i]`. The same as
        `model(tokens[:, None], positions, cache)[:, -1]`."""
        bsz = tokens.shape[0]
        heads, kvh, hd = self.n_heads, self.n_kv_heads, self.head_dim
        n_qk = heads + kvh
        dev = tokens.device
        if self.embed_direct:
            x = F.embedding(tokens, self.model.tok_embeddings.weight)
        else:
            x = self.model.tok_embeddings(tokens)
        p_len = cache.prefix_len
        first, span = slots[0], max(slots) + 1
        uniform = all(s == first for s in slots)
        slot_t = torch.tensor(slots, device=dev)
        rope = self.model.rope(dev)[slot_t + p_len][:, None]  # (B, 1, D/2): one rotation per row, all heads
        mask = rows = None
        if not uniform:
            rows = torch.arange(bsz, device=dev)
            visible = torch.arange(span, device=dev)[None, :] <= slot_t[:, None]  # (B, span)
            mask = torch.zeros(bsz, 1, 1, span, device=dev, dtype=x.dtype)
            mask.masked_fill_(~visible[:, None, None], float("-inf"))
        for i, layer in enumerate(self.layers):
            n = torch.rms_norm(x.float(), (self.dim,), eps=self.eps).type_as(x) * layer.attention_norm
            qkv = layer.qkv(n).view(bsz, n_qk + kvh, hd)
            qk = torch.view_as_complex(qkv[:, :n_qk].float().unflatten(-1, (-1, 2))) * rope
            qk = torch.view_as_real(qk).flatten(-2).type_as(x)
            k, v = qk[:, heads:], qkv[:, n_qk:]
            kc, vc = cache.k[i], cache.v[i]
            if uniform:
                kc[:, :, first] = k
                vc[:, :, first] = v
            else:
                kc[rows, :, slot_t] = k
                vc[rows, :, slot_t] = v
            q = qk[:, :heads, None]  # (B, H, 1, D)
            keys, values = kc[:, :, :span], vc[:, :, :span]
            if cache.prefix_k:
                out = merge_attention(q, keys, values, mask, cache.prefix_k[i], cache.prefix_v[i])
            else:
                out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
            h = x + layer.wo(out.reshape(bsz, heads * hd))
            n = torch.rms_norm(h.float(), (self.dim,), eps=self.eps).type_as(h) * layer.ffn_norm
            gate, up = layer.w13(n).chunk(2, dim=-1)
            x = h + layer.w2(F.silu(gate) * up)
        n = torch.rms_norm(x.float(), (self.dim,), eps=self.eps).type_as(x) * self.model.norm.weight
        return self.output(n)[:, : self.vocab]


# `_Packed.usable` looks at the input's size only to keep large passes off the packs; a one-row
# probe stands for a decoding step.
_PROBE = torch.empty(1, 1)
