"""LoRA on the fairscale LLaMA through peft, and PEFT-format adapters in and out.

peft supplies the LoRA layer (its `lora.Linear`: A/B factors, dropout, scaling, merge); what it
cannot know is how fairscale splits a projection across the model-parallel (MP) group. The two
subclasses below size the factors for this rank's shard and add the one collective each needs, so
that MP=K trains and runs exactly the model MP=1 does:

  column-parallel base (wq wk wv w1 w3): y_k = x W_k^T for this rank's output rows.
      A (r, in) replicated, B_k (out/K, r) this rank's rows:  y_k += s * B_k (A x).
      Each rank's loss only reaches A through its own B_k, so A x passes an identity-forward /
      all-reduce-backward region: every rank then holds A's full (identical) gradient.
  row-parallel base (wo w2): y = sum_k x_k W_k^T (all-reduced by the base layer).
      A_k (r, in/K) this rank's input columns, B (out, r) replicated:  y += s * B (sum_k A_k x_k).
      The rank-r partial sums are all-reduced before B, so B sees the full A x and its gradient is
      already identical on every rank.

On disk an adapter is what HF peft writes for LlamaForCausalLM: adapter_config.json plus
adapter_model.safetensors with full (unsharded) factors under HF module names, and the q/k lora_B
rows in HF's half-split rotary order (`checkpoint.hf_permute`), so `PeftModel.from_pretrained` on
the HF-layout base gives the same logits as our model with the adapter.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import nn

from .. import distributed
from . import checkpoint

# fairscale stays behind model.py: its parallel layers and region mappings come from there.
from .model import ColumnParallelLinear, ModelArgs, RowParallelLinear, fs_mappings

ADAPTER = "default"  # peft's adapter name inside the model
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"

# Meta short name -> (module path inside a block, HF module path inside a decoder layer)
MODULES = {
    "wq": ("attention.wq", "self_attn.q_proj"),
    "wk": ("attention.wk", "self_attn.k_proj"),
    "wv": ("attention.wv", "self_attn.v_proj"),
    "wo": ("attention.wo", "self_attn.o_proj"),
    "w1": ("feed_forward.w1", "mlp.gate_proj"),
    "w2": ("feed_forward.w2", "mlp.down_proj"),
    "w3": ("feed_forward.w3", "mlp.up_proj"),
}
_HF_SHORT = {hf.split(".")[-1]: short for short, (_, hf) in MODULES.items()}
_HF_KEY = re.compile(r"(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.\w+)?\.weight")


def parse_targets(spec: str | Sequence[str]) -> tuple[str, ...]:
    """Meta short names (wq ... w3) from Meta or HF names, given as "wq,wv" or a list; in MODULES order."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if str(s).strip()]
    shorts = set()
    for n in names:
        short = n if n in MODULES else _HF_SHORT.get(n)
        if short is None:
            raise ValueError(f"--lora_target_modules: unknown module {n!r}; choose from "
                             f"{', '.join(MODULES)} (or HF names {', '.join(_HF_SHORT)})")
        shorts.add(short)
    if not shorts:
        raise ValueError("--lora_target_modules is empty; name at least one of " + ", ".join(MODULES))
    return tuple(s for s in MODULES if s in shorts)


# --------------------------------------------------------------------------------------------
# peft layers for fairscale's parallel linears.


class _ParallelLora(PeftLoraLinear):
    def _combine(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _keep_mask(self, x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
        """(0/1 mask of the elements dropout keeps, in x's dtype; 1 / keep probability).

        Drawn at the FULL input width and sliced, so every rank of the MP group (and MP=1) draws the
        same numbers in the same order: the same masks at any MP size. The draw is 16-bit lanes of
        random 64-bit words, four elements per generator call: on the CPU, bernoulli_ costs about
        four times as much and was an eighth of a LoRA training step. So p is rounded to a multiple
        of 1/65536 (0.05 -> 0.0500031), and the kept elements are scaled by the exact 1 / (1 - p).
        """
        full = self.get_base_layer().in_features
        n = x[..., :1].numel() * full
        drop = min(round(p * 65536), 65535)
        words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
        lanes = words.view(torch.int16)[:n].view(*x.shape[:-1], full)  # uniform on [-32768, 32767]
        # P(keep) = 1 - drop / 65536. Written straight into x's dtype: x * bool_mask costs twice x * float_mask.
        mask = torch.ge(lanes, drop - 32768, out=torch.empty(lanes.shape, dtype=x.dtype, device=x.device))
        if full != x.shape[-1]:
            mask = mask.chunk(full // x.shape[-1], dim=-1)[distributed.world().mp_rank]
        return mask, 65536 / (65536 - drop)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters or self.merged:
            return super().forward(x, *args, **kwargs)  # peft unmerges / skips as needed
        result = self.base_layer(x)
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            a, b = self.lora_A[name], self.lora_B[name]
            xa, scale = x.to(a.weight.dtype), self.scaling[name]
            p = getattr(self.lora_dropout[name], "p", 0.0)
            if p and self.training:
                mask, rescale = self._keep_mask(xa, p)
                xa, scale = xa * mask, scale * rescale
            # peft computes B(A(x)) * s: same value, but scaling the rank-r activations instead
            # of the (B, T, out) result (and the dropout's 1/(1-p) with them) saves two full-size
            # elementwise passes per adapted projection, forward and backward.
            h = self._combine(a(xa)) * scale  # (B, T, r)
            result = result + b(h).to(result.dtype)
        return result


class ColumnParallelLora(_ParallelLora):
    """LoRA on a ColumnParallelLinear: A replicated, B holds this rank's output rows."""

    shard = ("B", 0)

    def _get_in_out_features(self, module):
        return module.in_features, module.output_size_per_partition

    def _combine(self, h):
        return fs_mappings.copy_to_model_parallel_region(h)  # backward: sum the ranks' shares of d loss / d(A x)


class RowParallelLora(_ParallelLora):
    """LoRA on a RowParallelLinear: A holds this rank's input columns, B replicated."""

    shard = ("A", 1)

    def _get_in_out_features(self, module):
        return module.input_size_per_partition, module.out_features

    def _combine(self, h):
        return fs_mappings.reduce_from_model_parallel_region(h)  # sum_k A_k x_k


def _peft_config(r: int, alpha: float, dropout: float, targets: Sequence[str], rslora: bool = False) -> LoraConfig:
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none",
                     use_rslora=rslora, init_lora_weights=False)  # we initialise, identically on every rank
    cfg._register_custom_module({ColumnParallelLinear: ColumnParallelLora, RowParallelLinear: RowParallelLora})
    return cfg


def lora_layers(model: nn.Module) -> Iterator[tuple[str, _ParallelLora]]:
    """(module name, e.g. "layers.0.attention.wq", layer) for every LoRA layer."""
    for name, module in model.named_modules():
        if isinstance(module, _ParallelLora):
            yield name, module


def add_lora(model: nn.Module, *, r: int, alpha: float, dropout: float, targets: Sequence[str],
             rslora: bool = False, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Inject LoRA layers (untrained, factors uninitialised) into `model` in place; base frozen."""
    if r < 1:
        raise ValueError(f"--lora_r must be at least 1, got {r}")
    model.requires_grad_(False)
    inject_adapter_in_model(_peft_config(r, alpha, dropout, targets, rslora), model, adapter_name=ADAPTER)
    for _, layer in lora_layers(model):
        # peft casts the factors to the base dtype; keep them in `dtype` (fp32 master weights to train).
        layer.lora_A[ADAPTER].to(dtype)
        layer.lora_B[ADAPTER].to(dtype)
    return model


def init_lora(model: nn.Module, seed: int, world: distributed.World) -> None:
    """peft's default init (A ~ kaiming-uniform over the FULL fan-in, B = 0), drawn per module from
    a generator seeded by (seed, module name), then sliced: every MP size starts from the same adapter."""
    for name, layer in lora_layers(model):
        a = layer.lora_A[ADAPTER].weight
        fan_in = layer.get_base_layer().in_features
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        full = (torch.rand(a.shape[0], fan_in, generator=g) * 2 - 1) / math.sqrt(fan_in)
        if layer.shard == ("A", 1):
            full = full.chunk(world.mp_size, dim=1)[world.mp_rank]
        with torch.no_grad():
            a.copy_(full)
            layer.lora_B[ADAPTER].weight.zero_()


@contextmanager
def adapters_off(model: nn.Module):
    """Within the block the model runs without its LoRA updates: the base alone (the reference
    model of the policy stages, without a second copy of the weights). peft's
    `enable_adapters(False)` would also clear the factors' requires_grad, so the flag is set
    directly and restored as it was."""
    layers = [layer for _, layer in lora_layers(model)]
    before = [layer._disable_adapters for layer in layers]
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield model
    finally:
        for layer, was in zip(layers, before):
            layer._disable_adapters = was


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter, Optional[int]]]:
    """(name, parameter, dim it is split along across the MP group or None) for every LoRA factor."""
    out = []
    for name, layer in lora_layers(model):
        for factor in ("A", "B"):
            p = getattr(layer, f"lora_{factor}")[ADAPTER].weight
            out.append((f"{name}.lora_{factor}", p, layer.shard[1] if layer.shard[0] == factor else None))
    return out


def padding_is_harmless(source: ModelArgs, k: int) -> bool:
    """Training needs heads and FFN width that K divides: LoRA on a padded zero head or FFN row would
    make it non-zero (vocabulary padding is harmless, embeddings are not adapted)."""
    pad = checkpoint.plan_padding(source, k)
    return (pad.q_src == list(range(source.n_heads)) and pad.kv_src == list(range(source.kv_heads))
            and pad.args.ffn_size == source.ffn_size)


# --------------------------------------------------------------------------------------------
# Gradients under data and model parallelism.


def all_reduce_grads(params: Sequence[nn.Parameter], world: distributed.World) -> None:
    """Sum LoRA gradients over this rank's data-parallel group (one flat all-reduce)."""
    if world.dp_size == 1:
        return
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=distributed.dp_group())
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def clip_grad_norm(named: Sequence[tuple[str, nn.Parameter, Optional[int]]], max_norm: float,
                   world: distributed.World) -> float:
    """Clip to the global norm of the full (unsharded) adapter; returns that norm before clipping."""
    sq_shared = sum((p.grad.float().pow(2).sum() for _, p, dim in named if dim is None), torch.zeros(()))
    sq_split = sum((p.grad.float().pow(2).sum() for _, p, dim in named if dim is not None), torch.zeros(()))
    sq_split = sq_split.to(world.device)
    if world.mp_size > 1:
        dist.all_reduce(sq_split, group=distributed.mp_group())
    norm = (sq_shared.to(world.device) + sq_split).sqrt().item()
    if max_norm > 0 and norm > max_norm:
        for _, p, _ in named:
            p.grad.mul_(max_norm / (norm + 1e-6))
    return norm


# --------------------------------------------------------------------------------------------
# PEFT-format adapters on disk.


def _hf_key(layer: int, short: str, factor: str) -> str:
    return f"base_model.model.model.layers.{layer}.{MODULES[short][1]}.lora_{factor}.weight"


def _q_or_k_heads(short: str, args: ModelArgs) -> Optional[int]:
    return {"wq": args.n_heads, "wk": args.kv_heads}.get(short)


def full_state(model: nn.Module, world: distributed.World) -> dict[str, torch.Tensor]:
    """The whole adapter as HF-named fp32 CPU tensors (every MP rank must call it: it gathers)."""
    args = model.args
    state = {}
    for name, layer in lora_layers(model):
        i, short = int(name.split(".")[1]), name.split(".")[-1]
        for factor in ("A", "B"):
            t = getattr(layer, f"lora_{factor}")[ADAPTER].weight.detach().float()
            if layer.shard[0] == factor and world.mp_size > 1:
                parts = [torch.empty_like(t) for _ in range(world.mp_size)]
                dist.all_gather(parts, t.contiguous(), group=distributed.mp_group())
                t = torch.cat(parts, dim=layer.shard[1])
            heads = _q_or_k_heads(short, args)
            if factor == "B" and heads:
                t = checkpoint.hf_permute(t, heads)  # our interleaved rotary rows -> HF's half-split
            state[_hf_key(i, short, factor)] = t.cpu().contiguous()
    return state


def _config_of(model: nn.Module) -> dict:
    _, layer = next(lora_layers(model))
    return {"r": layer.r[ADAPTER], "lora_alpha": layer.lora_alpha[ADAPTER],
            "use_rslora": layer.use_rslora[ADAPTER],
            "lora_dropout": getattr(layer.lora_dropout[ADAPTER], "p", 0.0),
            "targets": sorted({n.split(".")[-1] for n, _ in lora_layers(model)}, key=list(MODULES).index)}


def write_adapter(out_dir, state: dict[str, torch.Tensor], model: nn.Module, base: str) -> None:
    """adapter_config.json + adapter_model.safetensors, as HF peft's save_pretrained writes them."""
    from safetensors.torch import save_file

    c = _config_of(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    LoraConfig(r=c["r"], lora_alpha=c["lora_alpha"], lora_dropout=c["lora_dropout"], use_rslora=c["use_rslora"],
               target_modules=[MODULES[s][1].split(".")[-1] for s in c["targets"]], bias="none",
               task_type="CAUSAL_LM", base_model_name_or_path=base).save_pretrained(str(out))
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt"})


def read_adapter(adapter_dir) -> tuple[dict, dict[tuple[int, str], dict[str, torch.Tensor]]]:
    """(config, {(layer, short): {"A": (r, in), "B": (out, r)}}) with B rows in Meta's rotary order."""
    path = Path(adapter_dir)
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path}: not a PEFT adapter directory ({CONFIG_FILE} missing)")
    cfg = json.loads(cfg_file.read_text())
    unsupported = {"peft_type": cfg.get("peft_type", "LORA") != "LORA", "use_dora": cfg.get("use_dora"),
                   "bias": cfg.get("bias", "none") != "none", "modules_to_save": cfg.get("modules_to_save"),
                   "rank_pattern": cfg.get("rank_pattern"), "alpha_pattern": cfg.get("alpha_pattern")}
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"{cfg_file}: unsupported adapter options {bad} (plain LoRA on the attention/FFN projections only)")
    if (path / WEIGHTS_FILE).is_file():
        from safetensors.torch import load_file

        tensors = load_file(str(path / WEIGHTS_FILE))
    elif (path / "adapter_model.bin").is_file():
        tensors = torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{path}: no {WEIGHTS_FILE} or adapter_model.bin")
    factors: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _HF_KEY.fullmatch(key)
        if m is None or m.group(3) not in _HF_SHORT:
            raise ValueError(f"{path / WEIGHTS_FILE}: unexpected tensor {key} (only LoRA factors of "
                             f"{', '.join(_HF_SHORT)} are supported)")
        factors.setdefault((int(m.group(1)), _HF_SHORT[m.group(3)]), {})[m.group(4)] = t.float()
    for (i, short), f in factors.items():
        if set(f) != {"A", "B"}:
            raise ValueError(f"{path}: layer {i} {MODULES[short][1]} has lora_{''.join(f)} but not both factors")
    return cfg, factors


def stack_adapters(out_dir, lower, upper, base: str) -> None:
    """Write one adapter equal to applying LOWER and then UPPER: W + s1 B1 A1 + s2 B2 A2.

    The policy stages train UPPER on the base with LOWER (the engraving) merged in; the stacked
    adapter applies to the plain base, so HF peft, `chat`, `generate` and `evaluate` take it like
    any other. The sum is exact as one LoRA of rank r1 + r2: A = [A1; A2], B = [s1 B1, s2 B2],
    scaling 1 (lora_alpha = r). A projection only one of them adapts gets zero factors from the other.
    """
    from safetensors.torch import save_file

    parts = []
    for adapter_dir in (lower, upper):
        cfg, factors = read_adapter(adapter_dir)
        parts.append((cfg["r"], _scaling(cfg), factors))
    keys = sorted(set(parts[0][2]) | set(parts[1][2]), key=lambda k: (k[0], list(MODULES).index(k[1])))
    state = {}
    for i, short in keys:
        present = next(f[(i, short)] for _, _, f in parts if (i, short) in f)
        rows, cols = present["B"].shape[0], present["A"].shape[1]
        a_parts, b_parts = [], []
        for r, scale, factors in parts:
            f = factors.get((i, short))
            a_parts.append(f["A"] if f else torch.zeros(r, cols))
            b_parts.append(scale * f["B"] if f else torch.zeros(rows, r))
        state[_hf_key(i, short, "A")] = torch.cat(a_parts, 0).contiguous()
        state[_hf_key(i, short, "B")] = torch.cat(b_parts, 1).contiguous()
    rank = parts[0][0] + parts[1][0]
    targets = sorted({short for _, short in keys}, key=list(MODULES).index)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, use_rslora=False,
               target_modules=[MODULES[s][1].split(".")[-1] for s in targets], bias="none",
               task_type="CAUSAL_LM", base_model_name_or_path=base).save_pretrained(str(out))
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt"})


def _scaling(cfg: dict) -> float:
    r, alpha = cfg["r"], cfg.get("lora_alpha", 8)
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def _to_meta_layout(factors: dict, args: ModelArgs, where) -> dict:
    """Unpermute q/k B rows and check every factor against the base model's sizes."""
    shapes = checkpoint.expected_shapes(args)
    out = {}
    for (i, short), f in factors.items():
        name = f"layers.{i}.{MODULES[short][0]}.weight"
        if name not in shapes:
            raise ValueError(f"{where}: adapter has layer {i} but the base model has {args.n_layers} layers")
        rows, cols = shapes[name]
        a, b = f["A"], f["B"]
        if a.shape[1] != cols or b.shape[0] != rows or a.shape[0] != b.shape[1]:
            raise ValueError(f"{where}: {MODULES[short][1]} of layer {i}: lora_A {tuple(a.shape)}, lora_B "
                             f"{tuple(b.shape)} do not fit the base weight {(rows, cols)}; wrong base model?")
        heads = _q_or_k_heads(short, args)
        out[name] = (a, checkpoint.hf_unpermute(b, heads) if heads else b)
    return out


def load_adapter(model: nn.Module, adapter_dir, *, world: distributed.World, trainable: bool = False,
                 base_args: Optional[ModelArgs] = None) -> nn.Module:
    """Apply a PEFT-format adapter (ours, or HF peft's on the HF layout) to `model` at any MP size.

    `base_args`: the checkpoint's unpadded sizes (default `model.args`): the factors are padded like
    the base weights, then each rank keeps its slice. Layers the adapter lacks get zero factors.
    """
    cfg, factors = read_adapter(adapter_dir)
    base_args = base_args or model.args
    full = _to_meta_layout(factors, base_args, adapter_dir)
    if trainable and not padding_is_harmless(base_args, world.mp_size):
        raise ValueError(_padding_message(base_args, world.mp_size))
    targets = sorted({short for _, short in factors}, key=list(MODULES).index)
    dtype = torch.float32 if trainable else next(model.parameters()).dtype
    add_lora(model, r=cfg["r"], alpha=cfg.get("lora_alpha", 8), dropout=cfg.get("lora_dropout", 0.0) if trainable else 0.0,
             targets=targets, rslora=bool(cfg.get("use_rslora")), dtype=dtype)
    pad = checkpoint.plan_padding(base_args, world.mp_size)
    for name, layer in lora_layers(model):
        a, b = full.get(name + ".weight", (None, None))
        factor, _ = layer.shard
        with torch.no_grad():
            for f, t in (("A", a), ("B", b)):
                p = getattr(layer, f"lora_{f}")[ADAPTER].weight
                if t is None:
                    p.zero_()
                    continue
                if f == factor:  # padded and split exactly like the base weight's split dim
                    t = checkpoint.local_slice(name + ".weight", checkpoint.pad_tensor(name + ".weight", t, pad),
                                               world.mp_rank, world.mp_size)
                p.copy_(t)
        for f in ("A", "B"):
            getattr(layer, f"lora_{f}")[ADAPTER].weight.requires_grad_(trainable)
    return model


def _padding_message(args: ModelArgs, k: int) -> str:
    return (f"--model_parallel_size {k} does not divide the model's heads ({args.n_heads} query, {args.kv_heads} "
            f"key/value) and FFN width ({args.ffn_size}); LoRA training needs a size that divides all three")


def merge_function(adapter_dir, args: ModelArgs) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """`adjust(name, full Meta-layout tensor)` -> W + s * B A for adapted weights, W otherwise."""
    cfg, factors = read_adapter(adapter_dir)
    full = _to_meta_layout(factors, args, adapter_dir)
    scale = _scaling(cfg)

    def adjust(name: str, t: torch.Tensor) -> torch.Tensor:
        if name not in full:
            return t
        a, b = full[name]
        return (t.float() + scale * (b @ a)).to(t.dtype)

    return adjust


def summary(named: Iterable[tuple[str, nn.Parameter, Optional[int]]], world: distributed.World) -> int:
    """Trainable parameter count of the full adapter (sharded factors counted once over the MP group)."""
    return sum(p.numel() * (world.mp_size if dim is not None else 1) for _, p, dim in named)
