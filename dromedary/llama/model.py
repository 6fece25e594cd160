"""LLaMA-1/2 on fairscale's parallel layers: pure compute, no file I/O, no device or dtype choice.

One definition runs at any model-parallel size K. Query/key/value/FFN projections are split by
output features (ColumnParallelLinear), their inverses by input features (RowParallelLinear), the
vocabulary by rows. Sizes that K does not divide are padded by the checkpoint loader before the
model is built (see `checkpoint.pad_for_parallel`); the module only needs every partitioned size to
be a multiple of K.

The key/value cache lives outside the module: the generation engine allocates a `KVCache` per run
and passes it to `forward`, so the same module also serves training (no cache, all logits).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel import initialize as fs_init
from fairscale.nn.model_parallel import layers as fs_layers
from fairscale.nn.model_parallel import mappings as fs_mappings
from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    # Set by the loader when padding for a model-parallel size (zero heads / FFN rows / vocab
    # rows that contribute nothing); None means "derive from the fields above".
    head_dim: Optional[int] = None
    hidden_dim: Optional[int] = None
    padded_vocab_size: Optional[int] = None
    # Rotary scaling as `rope.py` reads it ({"rope_type": "llama3", "factor": 8.0, ...}); None is
    # plain theta. The model computes no table itself for a scaled spec: the builder hands it
    # `rope.model_table` (see `Transformer`).
    rope_scaling: Optional[dict] = None
    # Where max_seq_len came from, when no file stated it: appended to every message that cites
    # the window ("" when a file states it or --max_seq_len set it).
    window_note: str = ""

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.dim // self.n_heads

    @property
    def ffn_size(self) -> int:
        if self.hidden_dim:
            return self.hidden_dim
        return ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)

    @property
    def vocab_rows(self) -> int:
        return self.padded_vocab_size or self.vocab_size


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float]) -> int:
    """LLaMA's SwiGLU width: 2/3 of 4*dim, scaled, rounded up to a multiple of `multiple_of`."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass
class KVCache:
    """Per-layer key/value buffers for one generation run, plus an optional shared prefix.

    `k[i]`, `v[i]`: (B, n_local_kv_heads, S, head_dim) for the rows' own tokens. Heads come before
    slots so that the slots [0, span) read by a pass are a strided view that attention kernels
    take as it is (no per-step copy of the cache).
    `prefix_k[i]`, `prefix_v[i]`: (1, n_local_kv_heads, P, head_dim), computed once and attended by
    every row, so a long shared prompt is never copied per row or per step.
    """

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    prefix_k: list[torch.Tensor] = field(default_factory=list)
    prefix_v: list[torch.Tensor] = field(default_factory=list)

    @property
    def prefix_len(self) -> int:
        return self.prefix_k[0].shape[2] if self.prefix_k else 0

    @classmethod
    def allocate(cls, model: "Transformer", batch: int, length: int, *, device, dtype) -> "KVCache":
        shape = (batch, model.layers[0].attention.n_local_kv_heads, length, model.args.head_size)
        n = model.args.n_layers
        # Zeros, not empty: masked slots get zero weight, and 0 * NaN garbage would still be NaN.
        return cls(
            k=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(n)],
            v=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(n)],
        )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 as LLaMA does; bf16 variance loses too much.
        return torch.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


def plain_rope_table(args: ModelArgs, length: int, seq_len: Optional[int] = None) -> torch.Tensor:
    """Rotations e^(i * pos * freq) of shape (length, head_dim // 2), complex64, for Meta's
    interleaved rotary layout: plain theta only. Scaled specs are computed by `rope.model_table`,
    which the builder passes to the model (this module imports nothing of the package)."""
    if args.rope_scaling is not None:
        raise ValueError(f"rope scaling {args.rope_scaling.get('rope_type')!r} needs the table of "
                         "dromedary.llama.rope: build the model with Transformer(args, rope_table=rope.model_table)")
    hd = args.head_size
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)  # float32, as rope.table
    return torch.polar(torch.ones_like(angles), angles)


RopeTable = Callable[[ModelArgs, int, Optional[int]], torch.Tensor]  # (args, length, seq_len) -> table


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1), (x2, x3), ... of x: (B, T, H, D) by rope: (B|1, T, D/2).

    As complex numbers x0 + i x1: one multiply instead of a dozen real elementwise ops per call,
    and the same fp32 results (x0 cos - x1 sin, x0 sin + x1 cos).
    """
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * rope[:, :, None, :]).flatten(-2).type_as(x)


def _no_init(tensor: torch.Tensor) -> torch.Tensor:
    # Weights come from a checkpoint or from an explicit init; skip fairscale's default init.
    return tensor


@contextlib.contextmanager
def _without_fairscale_init():
    """fairscale's layers fill a full-size "master" weight per layer and scatter it when K > 1,
    allocating and touching memory for weights that the loader replaces anyway. Skip that: the
    layers' own buffers are then never written and cost no resident memory before `assign`."""
    saved = fs_layers._initialize_affine_weight
    fs_layers._initialize_affine_weight = lambda *args, **kwargs: None
    try:
        yield
    finally:
        fs_layers._initialize_affine_weight = saved


# --------------------------------------------------------------------------------------------
# CPU inference: projection weights pre-packed for oneDNN.
#
# A bf16 projection on the CPU re-lays its weight into oneDNN's blocked (AMX/VNNI) layout on every
# call; decoding a few rows per step is bound by reading weights, so that copy costs about a third
# of each step. Packing once keeps a blocked copy beside each weight (the plain weight stays what
# training, saving and LoRA use). wq|wk|wv and w1|w3 are packed as one matrix each: fewer, larger
# matmuls per step. Only passes of at most PACKED_MAX_ROWS token rows use the packs: those are the
# weight-bound ones, and there the results are bit-identical to the plain layers (oneDNN blocks
# larger products differently).

PACKED_MAX_ROWS = 256


@dataclass
class PackedFrom:
    """The projections a packed copy of weights was made from, in order. The copy is stale once
    any of them changed: a layer replaced (e.g. LoRA-wrapped), its weight reassigned, or updated
    in place (its `_version` moved)."""

    layers: tuple[nn.Module, ...]
    weights: tuple[torch.Tensor, ...]
    versions: tuple[int, ...]

    @classmethod
    def of(cls, *layers: nn.Module) -> "PackedFrom":
        weights = tuple(m.weight for m in layers)
        return cls(layers, weights, tuple(w._version for w in weights))

    def current(self, layers: tuple[nn.Module, ...]) -> bool:
        return all(a is b and a.weight is w and w._version == v
                   for a, b, w, v in zip(layers, self.layers, self.weights, self.versions))


@dataclass
class _Packed:
    weight: torch.Tensor  # opaque oneDNN tensor: the layers' (out, in) weights stacked by rows
    source: PackedFrom
    combine: Optional[Callable[[torch.Tensor], torch.Tensor]]  # fairscale's all-reduce / gather (MP > 1)

    def usable(self, layers: tuple[nn.Module, ...], x: torch.Tensor) -> bool:
        return (not torch.is_grad_enabled() and x.numel() <= PACKED_MAX_ROWS * x.shape[-1]
                and self.source.current(layers))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.ops.mkldnn._linear_pointwise(x, self.weight, None, "none", [], "")
        return out if self.combine is None else self.combine(out)


def can_prepack(model: "Transformer") -> bool:
    w = model.output.weight
    return (w.device.type == "cpu" and w.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def prepack_weights(model: "Transformer", batch_hint: int = 8) -> int:
    """Pack the model's projection weights for CPU bf16 decoding; returns the bytes it adds.

    Only plain fairscale projections are packed (a LoRA-wrapped one runs as it is). Packs are used
    outside autograd only, and only while their layers and weights are the same, unmodified.
    """
    if not can_prepack(model):
        return 0
    parallel = fs_init.get_model_parallel_world_size() > 1

    def pack(*layers: nn.Module) -> Optional[_Packed]:
        if any(type(m) not in (ColumnParallelLinear, RowParallelLinear) or m.bias is not None for m in layers):
            return None
        # What fairscale's forward adds around its matmul; identities, so skipped, at MP size 1.
        combine = None
        if parallel and isinstance(layers[0], RowParallelLinear):
            combine = fs_mappings.reduce_from_model_parallel_region
        elif parallel and layers[0].gather_output:
            combine = fs_mappings.gather_from_model_parallel_region
        source = PackedFrom.of(*layers)
        stacked = torch.cat([w.detach() for w in source.weights]) if len(layers) > 1 else source.weights[0].detach()
        blocked = torch.ops.mkldnn._reorder_linear_weight(stacked, batch_hint)
        return _Packed(blocked, source, combine)

    drop_packed_weights(model)
    packs = {model.output: pack(model.output)}
    for block in model.layers:
        a, f = block.attention, block.feed_forward
        packs.update({a: pack(a.wq, a.wk, a.wv), a.wo: pack(a.wo), f: pack(f.w1, f.w3), f.w2: pack(f.w2)})
    added = 0
    for owner, packed in packs.items():
        if packed is not None:
            owner._packed = packed
            added += sum(w.numel() * w.element_size() for w in packed.source.weights)
    return added


def drop_packed_weights(model: "Transformer") -> None:
    for module in model.modules():
        module.__dict__.pop("_packed", None)


def project(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)`, through the layer's packed weight when it has a usable one."""
    packed: Optional[_Packed] = layer.__dict__.get("_packed")
    if packed is not None and packed.usable((layer,), x):
        return packed(x)
    return layer(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        mp = fs_init.get_model_parallel_world_size()
        self.n_local_heads = args.n_heads // mp
        self.n_local_kv_heads = args.kv_heads // mp
        self.head_dim = args.head_size
        q_out, kv_out = args.n_heads * self.head_dim, args.kv_heads * self.head_dim
        self.wq = ColumnParallelLinear(args.dim, q_out, bias=False, gather_output=False, init_method=_no_init)
        self.wk = ColumnParallelLinear(args.dim, kv_out, bias=False, gather_output=False, init_method=_no_init)
        self.wv = ColumnParallelLinear(args.dim, kv_out, bias=False, gather_output=False, init_method=_no_init)
        self.wo = RowParallelLinear(q_out, args.dim, bias=False, input_is_parallel=True, init_method=_no_init)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, step: Optional["Step"]) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        packed: Optional[_Packed] = self.__dict__.get("_packed")
        if packed is not None and packed.usable((self.wq, self.wk, self.wv), x):
            # One matmul for wq|wk|wv, (B, T, H + 2 kvh, D), and one rotation for q|k.
            qkv = packed(x).view(bsz, seqlen, -1, self.head_dim)
            n_qk = self.n_local_heads + self.n_local_kv_heads
            q, k = apply_rope(qkv[:, :, :n_qk], rope).split((self.n_local_heads, self.n_local_kv_heads), dim=2)
            v = qkv[:, :, n_qk:]
        else:
            q = self.wq(x).view(bsz, seqlen, self.n_local_heads, self.head_dim)
            k = self.wk(x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
            v = self.wv(x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        q = q.transpose(1, 2)  # (B, H, T, D)

        if step is None or step.prefix_only:
            # Training, scoring, or filling the shared prefix: plain causal attention.
            k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, kvh, T, D)
            if step is not None:
                # Contiguous once here, as every later pass reads them as GEMM operands.
                step.cache.prefix_k[step.layer] = k.contiguous()
                step.cache.prefix_v[step.layer] = v.contiguous()
            out = F.scaled_dot_product_attention(q, k, v, is_causal=seqlen > 1, enable_gqa=True)
        else:
            out = self._cached_attention(q, k, v, step)
        return project(self.wo, out.transpose(1, 2).reshape(bsz, seqlen, -1))

    def _cached_attention(self, q, k, v, step: "Step") -> torch.Tensor:
        cache, layer, bsz = step.cache, step.layer, q.shape[0]
        if step.start is not None:
            # Every row writes the same slots (equal lengths): a plain strided copy.
            cache.k[layer][:bsz, :, step.start : step.start + k.shape[1]] = k.transpose(1, 2)
            cache.v[layer][:bsz, :, step.start : step.start + v.shape[1]] = v.transpose(1, 2)
        else:
            # Each row writes its new keys at its own slots (rows have different lengths). A slice
            # between the two index tensors puts the indexed dims first: the target is
            # (B, T, kvh, D), which is k's own layout.
            cache.k[layer][step.rows, :, step.slots] = k
            cache.v[layer][step.rows, :, step.slots] = v
        keys = cache.k[layer][:bsz, :, : step.span]  # (B, kvh, span, D), a strided view
        values = cache.v[layer][:bsz, :, : step.span]
        folded = step.cuda_mask(self.n_local_heads // self.n_local_kv_heads) if _cuda_kernels(q.device) else None
        if not cache.prefix_k:
            return gqa_attention(q, keys, values, step.mask, folded, causal=step.causal)
        return merge_attention(q, keys, values, step.mask, cache.prefix_k[layer], cache.prefix_v[layer], folded,
                               causal=step.causal)


# --------------------------------------------------------------------------------------------
# Attention kernels by device.
#
# CUDA: no fused SDPA kernel takes a mask together with `enable_gqa`, so PyTorch runs its math
# kernel (every score materialised) for ragged rows. Folding the `rep` query heads of each kv group
# into query rows, (B, H, T, D) -> (B, kvh, rep * T, D), turns grouped-query attention into plain
# attention with kvh heads, which the memory-efficient kernel runs with a mask (and with the
# log-sum-exp that the shared-prefix merge needs): no key or value is copied, only the mask is
# repeated for the folded rows, once per pass. CPU: the flash kernel takes GQA and a mask as they
# are; it is kept (measured faster there).
#
# `causal` (every function below): the mask is exactly the causal one (query t sees keys 0..t,
# T == S). The CPU flash kernel then runs causal and skips the blocks the mask hides, with the
# masked run's bits (tests/test_attention.py); CUDA and the math path apply the mask as it is (a
# causal flag would pick other CUDA kernels, whose bits against these are unchecked on a device).


def _cuda_kernels(device: torch.device) -> bool:
    return device.type == "cuda"


def fold_heads(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, H, T, D) -> (B, kvh, rep * T, D): query head g * rep + r, row t becomes head g, row r * T + t."""
    bsz, n_heads, seqlen, head_dim = q.shape
    return q.reshape(bsz, kv_heads, (n_heads // kv_heads) * seqlen, head_dim)


def unfold_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, kvh, rep * T, ...) -> (B, H, T, ...), the inverse of `fold_heads` (also for the lse)."""
    bsz, kv_heads, rows = x.shape[:3]
    return x.reshape(bsz, n_heads, rows * kv_heads // n_heads, *x.shape[3:])


def fold_mask(mask: torch.Tensor, rep: int) -> torch.Tensor:
    """Additive mask (B|1, 1, T, S) -> (B|1, 1, rep * T, S) for folded query rows, with its rows
    16-element aligned as the memory-efficient kernel needs (a view into a padded buffer)."""
    m, _, seqlen, span = mask.shape
    buf = mask.new_empty(m, 1, rep * seqlen, -(-span // 16) * 16)[..., :span]
    buf.unflatten(2, (rep, seqlen)).copy_(mask[:, :, None])  # (m, 1, rep, T, S) <- (m, 1, 1, T, S)
    return buf


def gqa_attention(q, k, v, mask: Optional[torch.Tensor], folded_mask: Optional[torch.Tensor] = None,
                  causal: bool = False):
    """SDPA of q (B, H, T, D) over k, v (B, kvh, S, D) under an additive mask (B|1, 1, T, S) or
    none; `folded_mask`: `fold_mask(mask, H // kvh)` when the caller keeps one per pass."""
    if causal and not _cuda_kernels(q.device):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    if mask is None or not _cuda_kernels(q.device):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    return _fused_with_lse(q, k, v, mask, folded_mask)[0]


def _fused_with_lse(q, k, v, mask, folded_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    """`attention_with_lse` through the memory-efficient kernel, query heads folded (CUDA)."""
    n_heads, kv_heads = q.shape[1], k.shape[1]
    bias = None
    if mask is not None:
        bias = folded_mask if folded_mask is not None else fold_mask(mask, n_heads // kv_heads)
    folded = fold_heads(q, kv_heads)  # (B, kvh, rep * T, D)
    bsz, _, rows, _ = folded.shape
    if bias is not None:
        bias = bias.expand(bsz, kv_heads, rows, bias.shape[-1])  # strides 0: no copy
    global _FUSED_REFUSED
    if _FUSED_REFUSED is None:
        try:
            out, lse = _EFFICIENT(folded, k, v, bias, True)[:2]
        except RuntimeError as e:  # a shape or GPU the kernel does not take: slower, still exact
            if isinstance(e, torch.OutOfMemoryError):
                raise
            _FUSED_REFUSED = str(e).splitlines()[0]
            warnings.warn(f"the memory-efficient attention kernel refused ({_FUSED_REFUSED}); "
                          "attention with a mask runs on PyTorch's math path from now on")
    if _FUSED_REFUSED is not None:
        return _math_with_lse(q, k, v, mask)
    # The kernel pads the lse rows (to a multiple of 32): keep the real ones.
    return unfold_heads(out, n_heads), unfold_heads(lse[..., :rows].float(), n_heads)


def merge_attention(q, keys, values, mask, prefix_k, prefix_v, folded_mask=None, causal: bool = False) -> torch.Tensor:
    """Attention of q (B, H, T, D) over a shared prefix (1, kvh, P, D) and each row's own keys
    and values (B, kvh, S, D) under one softmax: each block is attended separately and the two
    are merged by their log-sum-exps. The prefix is the same for every row, so the batch is folded
    into its query rows, (1, kvh, B * rep * T, D): it is read once per pass, where broadcasting it
    over the batch would copy it B times per layer per step. `causal`: of the own block's mask."""
    bsz, n_heads, seqlen, head_dim = q.shape
    kvh = prefix_k.shape[1]
    folded = q.reshape(bsz, kvh, -1, head_dim).transpose(0, 1).reshape(1, kvh, -1, head_dim)
    out_p, lse_p = attention_with_lse(folded, prefix_k, prefix_v)
    out_p = out_p.view(kvh, bsz, -1, head_dim).transpose(0, 1).reshape(q.shape)  # (B, H, T, D)
    lse_p = lse_p.view(kvh, bsz, -1).transpose(0, 1).reshape(bsz, n_heads, seqlen)  # (B, H, T)
    out_s, lse_s = attention_with_lse(q, keys, values, mask, folded_mask, causal=causal)
    lse = torch.logaddexp(lse_p, lse_s)
    out = out_p * (lse_p - lse).exp()[..., None] + out_s * (lse_s - lse).exp()[..., None]
    return out.type_as(q)


def attention_with_lse(q, k, v, mask: Optional[torch.Tensor] = None, folded_mask: Optional[torch.Tensor] = None,
                       causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention over one key block that also returns the block's log-sum-exp
    of scores, so that blocks attended separately merge exactly.

    q: (B, H, T, D); k, v: (B, kvh, S, D), query head h reading kv head h // (H / kvh);
    mask: additive (B|1, 1, T, S) in q's dtype (`folded_mask`: as in `gqa_attention`). Returns
    out (B, H, T, D) and lse (B, H, T) in fp32.
    """
    if _cuda_kernels(q.device):
        return _fused_with_lse(q, k, v, mask, folded_mask)
    if q.device.type == "cpu" and _FLASH_CPU is not None:
        # The kernel behind CPU SDPA: fp32 accumulation, strided k/v and GQA taken as they are.
        out, lse = _FLASH_CPU(q, k, v, 0.0, causal, attn_mask=None if causal else mask)[:2]
        return out, lse
    return _math_with_lse(q, k, v, mask)


def _math_with_lse(q, k, v, mask) -> tuple[torch.Tensor, torch.Tensor]:
    bsz, n_heads, seqlen, head_dim = q.shape
    # Scores are materialised in fp32 here: take the query rows in chunks that keep them near
    # SCORE_CHUNK_BYTES (the rows of a 64-prompt self-align batch over a 3k-token prefix would
    # otherwise need gigabytes at once).
    rows = max(1, SCORE_CHUNK_BYTES // (4 * bsz * n_heads * k.shape[2]))
    if seqlen > rows:
        parts = [_math_with_lse(q[:, :, i : i + rows], k, v, None if mask is None else mask[:, :, i : i + rows])
                 for i in range(0, seqlen, rows)]
        return torch.cat([o for o, _ in parts], dim=2), torch.cat([lse for _, lse in parts], dim=2)
    qg = q.unflatten(1, (k.shape[1], -1))  # (B, kvh, rep, T, D): kv broadcasts over rep
    s = (qg @ k.unsqueeze(2).transpose(-1, -2)).float() / math.sqrt(head_dim)  # (B, kvh, rep, T, S)
    if mask is not None:
        s = s + mask.unsqueeze(2)
    lse = torch.logsumexp(s, dim=-1)
    out = (s - lse[..., None]).exp().type_as(q) @ v.unsqueeze(2)
    return out.flatten(1, 2), lse.flatten(1, 2)


_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
# (q, k, v, bias, compute_log_sumexp) -> (out, lse padded, ...): equal head counts, CUDA only.
_EFFICIENT = torch.ops.aten._scaled_dot_product_efficient_attention
_FUSED_REFUSED: Optional[str] = None  # why the kernel refused once, after which it is not tried again
SCORE_CHUNK_BYTES = 256 << 20


@dataclass
class Step:
    """What one cached forward pass needs, shared by every layer (built once per pass)."""

    cache: KVCache
    rows: torch.Tensor  # (B, 1) row indices
    slots: torch.Tensor  # (B, T) cache slots written by the new tokens
    span: int  # slots [0, span) are read
    mask: Optional[torch.Tensor]  # (B, 1, T, span) additive, model dtype; None: every slot < span visible
    start: Optional[int] = None  # set when every row writes slots [start, start + T)
    causal: bool = False  # `mask` is exactly the causal one: every row writes slots [0, T)
    prefix_only: bool = False
    layer: int = 0
    _folded: Optional[torch.Tensor] = None

    def cuda_mask(self, rep: int) -> Optional[torch.Tensor]:
        """`fold_mask(mask, rep)`, made once per pass for every layer (the CUDA kernels)."""
        if self.mask is not None and self._folded is None:
            self._folded = fold_mask(self.mask, rep)
        return None if self.mask is None else self._folded


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = ColumnParallelLinear(dim, hidden_dim, bias=False, gather_output=False, init_method=_no_init)
        self.w2 = RowParallelLinear(hidden_dim, dim, bias=False, input_is_parallel=True, init_method=_no_init)
        self.w3 = ColumnParallelLinear(dim, hidden_dim, bias=False, gather_output=False, init_method=_no_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed: Optional[_Packed] = self.__dict__.get("_packed")
        if packed is not None and packed.usable((self.w1, self.w3), x):
            gate, up = packed(x).chunk(2, dim=-1)  # one matmul for w1|w3
        else:
            gate, up = self.w1(x), self.w3(x)
        return project(self.w2, F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_size)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x, rope, step: Optional[Step] = None):
        if step is not None:
            step.layer = self.layer_id
        h = x + self.attention(self.attention_norm(x), rope, step)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, rope_table: Optional[RopeTable] = None):
        super().__init__()
        self.args = args
        self.mp_size = fs_init.get_model_parallel_world_size()  # the K its layers are split for
        with _without_fairscale_init():
            self._build(args)
        self.gradient_checkpointing = False
        self.rope_table: RopeTable = rope_table or plain_rope_table
        self._rope: Optional[torch.Tensor] = None
        self._rope_long: Optional[tuple[int, torch.Tensor]] = None  # (seq_len, table) past the window
        scaling = args.rope_scaling or {}
        # Dynamic NTK: the frequencies depend on the sequence length once it passes this window.
        self.rope_window: Optional[int] = (scaling.get("original_max_position_embeddings")
                                           if scaling.get("rope_type") == "dynamic" else None)

    def _build(self, args: ModelArgs) -> None:
        self.tok_embeddings = VocabParallelEmbedding(args.vocab_rows, args.dim, init_method=_no_init)
        self.layers = nn.ModuleList(TransformerBlock(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = ColumnParallelLinear(args.dim, args.vocab_rows, bias=False, gather_output=True, init_method=_no_init)

    @property
    def rope_varies_with_length(self) -> bool:
        """True for dynamic NTK, whose table past the original window depends on the sequence
        length: the one-token kernels (lean.py, native.py), which hold one table, step aside."""
        return self.rope_window is not None

    def rope(self, device, seq_len: Optional[int] = None) -> torch.Tensor:
        """The rotation table (L, D/2) complex64. `seq_len`: the length the pass serves (largest
        position + 1); it matters only past a dynamic spec's original window, where, as in
        transformers, every position of the pass is rotated with the frequencies of that length.
        Keys already in a KV cache keep the rotation of the pass that wrote them (transformers'
        cache does the same), so a cached decode past the window differs from one full forward
        over the same tokens; each matches transformers doing the same thing."""
        # Kept off the state dict and built lazily on the weights' device (the module may be
        # built on the meta device and filled in by the loader).
        length = self.args.max_seq_len * 2
        if self.rope_window is not None and seq_len is not None and seq_len > self.rope_window:
            if self._rope_long is None or self._rope_long[0] != seq_len or self._rope_long[1].device != torch.device(device):
                self._rope_long = (seq_len, self.rope_table(self.args, max(length, seq_len), seq_len).to(device))
            return self._rope_long[1]
        if self._rope is None or self._rope.device != torch.device(device):
            self._rope = self.rope_table(self.args, length, None).to(device)
        return self._rope

    def forward(
        self,
        tokens: torch.Tensor,
        positions: Optional[torch.Tensor] = None,
        cache: Optional[KVCache] = None,
        *,
        prefix_only: bool = False,
        output_index: Optional[torch.Tensor] = None,
        output_mask: Optional[torch.Tensor] = None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """Logits over the real vocabulary (padding rows never reach the output).

        Training and scoring: `model(tokens)` -> (B, T, vocab), causal attention, no cache.
        Inference: `positions` (B, T) are each new token's absolute position (counting a shared
        prefix). With `prefix_only` the tokens (1, P) fill `cache`'s shared prefix; otherwise each
        row's keys go to cache slot `position - prefix_len` and attend to the prefix plus that row's
        earlier slots. `output_index` (B,) picks one position per row -> logits (B, 1, vocab);
        `output_mask` (B, T) bool picks the positions where it is True, in row-major order -> (N,
        vocab): the output projection (vocab x dim) runs only where logits are wanted.
        `return_hidden`: the final-normed hidden states of those positions instead, (..., dim), and
        no output projection at all (reward and value heads read them).
        """
        bsz, seqlen = tokens.shape
        h = self.tok_embeddings(tokens)
        seq_len = None
        if self.rope_window is not None:  # one device sync, for dynamic NTK only
            seq_len = seqlen if positions is None else int(positions.max()) + 1
        table = self.rope(h.device, seq_len)
        rope = table[:seqlen][None] if positions is None else table[positions]  # (B|1, T, D/2)
        step = None
        if cache is not None:
            step = self._step(cache, positions, bsz, seqlen, prefix_only, h.device, h.dtype)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and step is None:
                h = checkpoint(layer, h, rope, use_reentrant=False)
            else:
                h = layer(h, rope, step)
        if output_index is not None:
            h = h[torch.arange(bsz, device=h.device), output_index][:, None]
        elif output_mask is not None:
            h = h[output_mask]  # (N, dim)
        h = self.norm(h)
        if return_hidden:
            return h
        logits = project(self.output, h)
        return logits[..., : self.args.vocab_size]

    def _step(self, cache: KVCache, positions, bsz: int, seqlen: int, prefix_only: bool, device, dtype) -> Step:
        if prefix_only:
            cache.prefix_k = [None] * self.args.n_layers
            cache.prefix_v = [None] * self.args.n_layers
            return Step(cache, rows=None, slots=None, span=0, mask=None, prefix_only=True)
        slots = positions - cache.prefix_len  # (B, T)
        lo, hi = slots.aminmax()
        uniform = (slots == lo + torch.arange(seqlen, device=device)).all()
        start, last, uniform = torch.stack((lo, hi, uniform.long())).tolist()  # one device sync
        span = last + 1
        rows = torch.arange(bsz, device=device)[:, None]
        if uniform and seqlen == 1:
            # One new token per row, all at the last slot: every slot read is visible.
            return Step(cache, rows=rows, slots=slots, span=span, mask=None, start=start)
        # A row's query at slot t sees its own slots <= t (slots past it hold padding or stale
        # values from another row's longer prompt); the whole shared prefix is always visible.
        visible = torch.arange(span, device=device)[None, None, :] <= slots[:, :, None]  # (B, T, S)
        mask = torch.zeros(bsz, 1, seqlen, span, device=device, dtype=dtype)
        mask.masked_fill_(~visible[:, None], float("-inf"))
        return Step(cache, rows=rows, slots=slots, span=span, mask=mask, start=start if uniform else None,
                    causal=bool(uniform) and start == 0)
