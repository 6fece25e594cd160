"""LLaMA checkpoints on disk: Meta layout and Hugging Face layout, any shard count, any MP size.

Meta layout: params.json + consolidated.NN.pth, tensors split across NN by the model-parallel rule
of Meta's reference code. HF layout: config.json + model*.safetensors (with or without an index)
or pytorch_model*.bin, with q/k rows permuted for HF's half-split rotary embedding.

Every reader presents the same thing: full (unsharded) tensors under Meta's key names, one at a
time, read lazily through mmap or safetensors, so loading never holds a second copy of the model.
Nothing here executes pickled code (`weights_only=True`, or safetensors).
"""

from __future__ import annotations

import ctypes
import json
import math
import mmap
import pickle
import re
import shutil
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Iterator, Literal, Optional

import torch

from .model import ModelArgs, ffn_hidden_dim

Layout = Literal["meta", "hf"]


class CheckpointError(ValueError):
    """A checkpoint on disk that cannot be loaded as described; the message names the file."""


# --------------------------------------------------------------------------------------------
# Key names and how Meta's reference code splits each tensor across model-parallel shards.

_COLUMN = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3")
_ROW = ("attention.wo", "feed_forward.w2")


def meta_shard_dim(name: str) -> Optional[int]:
    """Concatenation dim of `name` across Meta shards (None: replicated in every shard)."""
    if name == "tok_embeddings.weight":
        return 1  # Meta's ParallelEmbedding splits the embedding dim
    if name == "output.weight" or any(f".{k}." in name for k in _COLUMN):
        return 0
    if any(f".{k}." in name for k in _ROW):
        return 1
    return None


def local_shard_dim(name: str) -> Optional[int]:
    """How *our* model splits `name` (VocabParallelEmbedding splits vocabulary rows)."""
    if name == "tok_embeddings.weight":
        return 0
    return meta_shard_dim(name)


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    hd, d = args.head_size, args.dim
    shapes: dict[str, tuple[int, ...]] = {
        "tok_embeddings.weight": (args.vocab_rows, d),
        "norm.weight": (d,),
        "output.weight": (args.vocab_rows, d),
    }
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "attention.wq.weight": (args.n_heads * hd, d),
            p + "attention.wk.weight": (args.kv_heads * hd, d),
            p + "attention.wv.weight": (args.kv_heads * hd, d),
            p + "attention.wo.weight": (d, args.n_heads * hd),
            p + "feed_forward.w1.weight": (args.ffn_size, d),
            p + "feed_forward.w2.weight": (d, args.ffn_size),
            p + "feed_forward.w3.weight": (args.ffn_size, d),
            p + "attention_norm.weight": (d,),
            p + "ffn_norm.weight": (d,),
        })
    return shapes


# --------------------------------------------------------------------------------------------
# Readers: full tensors under Meta names.


class Reader:
    """A checkpoint opened for reading. `args` has every size resolved from params and tensors."""

    layout: Layout
    args: ModelArgs

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def names(self) -> list[str]:
        return list(expected_shapes(self.args))

    def checked(self, name: str) -> torch.Tensor:
        t = self.get(name)
        want = expected_shapes(self.args)[name]
        if tuple(t.shape) != want:
            raise CheckpointError(
                f"{self.path}: {name} has shape {tuple(t.shape)} but the model config implies {want}"
                + self._shape_hint(name)
            )
        return t

    def _shape_hint(self, name: str) -> str:
        return ""

    def release(self, name: str) -> None:
        """The caller has copied tensor `name` and no longer needs the reader's own."""

    path: Path


def drop_mapped_pages(t: torch.Tensor) -> None:
    """Let the kernel take back the resident pages of a tensor memory-mapped from a file (they are
    read from the file again if touched). Only for tensors known to be file-mapped: on ordinary
    memory this would zero the pages."""
    if _madvise is None or t.numel() == 0:
        return
    page = mmap.PAGESIZE
    start = t.data_ptr()
    lo, hi = -(-start // page) * page, (start + t.numel() * t.element_size()) // page * page
    if hi > lo:  # whole pages only: a neighbouring tensor's partial page stays as it is
        _madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED)


def _libc_madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return fn


_madvise = _libc_madvise()
_MADV_DONTNEED = 4


class StateReader(Reader):
    """A model held in memory as full tensors under Meta names (fresh inits, merged models)."""

    layout: Layout = "meta"

    def __init__(self, args: ModelArgs, state: dict[str, torch.Tensor], path="<memory>"):
        self.args, self.state, self.path = args, state, Path(path)

    def get(self, name: str) -> torch.Tensor:
        return self.state[name]


def init_state(args: ModelArgs, seed: int = 0, std: float = 0.02, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Random full weights for `args` (norms at one): benchmarks, tests, the default model's init."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in expected_shapes(args).items():
        if len(shape) == 1:
            state[name] = torch.ones(shape, dtype=dtype)
        else:
            state[name] = (torch.randn(shape, generator=g) * std).to(dtype)
    return state


def detect_layout(ckpt_dir: Path) -> str:
    """"meta", "hf", or "gguf" (a single .gguf file, read by llama/gguf.py)."""
    ckpt_dir = Path(ckpt_dir)
    if ckpt_dir.is_file():
        from .gguf import is_gguf

        if is_gguf(ckpt_dir):
            return "gguf"
        raise CheckpointError(f"{ckpt_dir}: a file, but not a GGUF file; --ckpt_dir takes a checkpoint directory "
                              f"(Meta or HF layout) or a .gguf file")
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"{ckpt_dir}: checkpoint directory does not exist")
    if (ckpt_dir / "params.json").exists() and list(ckpt_dir.glob("consolidated.*.pth")):
        return "meta"
    if (ckpt_dir / "config.json").exists():
        return "hf"
    if (ckpt_dir / "params.json").exists():
        raise CheckpointError(f"{ckpt_dir}: params.json found but no consolidated.NN.pth shards")
    raise CheckpointError(
        f"{ckpt_dir}: not a LLaMA checkpoint (expected params.json + consolidated.NN.pth, "
        f"or config.json + model*.safetensors / pytorch_model*.bin)"
    )


def open_checkpoint(ckpt_dir) -> Reader:
    ckpt_dir = Path(ckpt_dir)
    layout = detect_layout(ckpt_dir)
    if layout == "gguf":
        from .gguf import GGUFReader

        return GGUFReader(ckpt_dir)
    return MetaReader(ckpt_dir) if layout == "meta" else HFReader(ckpt_dir)


def _torch_load(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """The file's tensors, and whether they are memory-mapped from it."""
    try:
        try:
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True), True
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            # Old zip-less pickles cannot be memory-mapped; still never unpickle code.
            return torch.load(path, map_location="cpu", weights_only=True), False
    except pickle.UnpicklingError as err:
        # torch's message advises weights_only=False; name the refused object, not that advice.
        detail = next((line.strip() for line in str(err).splitlines() if "GLOBAL" in line), "not plain tensors")
        raise CheckpointError(f"{path}: refusing to load: {detail} (only tensors are loaded, never code)") from None


class MetaReader(Reader):
    layout: Layout = "meta"

    def __init__(self, ckpt_dir: Path):
        self.path = ckpt_dir
        files = sorted(ckpt_dir.glob("consolidated.*.pth"))
        numbers = [int(m.group(1)) for f in files if (m := re.fullmatch(r"consolidated\.(\d+)\.pth", f.name))]
        for expected in range(max(numbers) + 1):
            if expected not in numbers:
                raise CheckpointError(f"{ckpt_dir}: missing shard consolidated.{expected:02d}.pth "
                                      f"(found {len(numbers)} of {max(numbers) + 1})")
        loaded = [_torch_load(ckpt_dir / f"consolidated.{n:02d}.pth") for n in sorted(numbers)]
        self.shards = [state for state, _ in loaded]
        self.mapped = all(mapped for _, mapped in loaded)
        params = json.loads((ckpt_dir / "params.json").read_text())
        self.args = self._resolve_args(params)

    def _resolve_args(self, params: dict) -> ModelArgs:
        known = {f.name for f in fields(ModelArgs)}
        args = ModelArgs(**{k: v for k, v in params.items() if k in known and v is not None})
        emb = self.get("tok_embeddings.weight")
        if args.vocab_size in (-1, 0, None):  # LLaMA-1's params.json leaves it to the tokenizer
            args.vocab_size = emb.shape[0]
        w1 = self.get("layers.0.feed_forward.w1.weight")
        if w1.shape[0] != args.ffn_size and args.hidden_dim is None:
            raise CheckpointError(
                f"{self.path}/params.json: FFN width from multiple_of={args.multiple_of}, "
                f"ffn_dim_multiplier={args.ffn_dim_multiplier} is {args.ffn_size}, "
                f"but layers.0.feed_forward.w1.weight has {w1.shape[0]} rows" + self._shape_hint("")
            )
        return args

    def get(self, name: str) -> torch.Tensor:
        parts = []
        for n, shard in enumerate(self.shards):
            if name not in shard:
                raise CheckpointError(f"{self.path}/consolidated.{n:02d}.pth: tensor {name} is missing")
            parts.append(shard[name])
        dim = meta_shard_dim(name)
        if dim is None or len(parts) == 1:
            return parts[0]
        full = torch.cat(parts, dim=dim)
        if self.mapped:
            # The parts were copied: their file pages need not stay resident while the rest of
            # the model loads (read from the file again if touched).
            for part in parts:
                drop_mapped_pages(part)
        return full

    def release(self, name: str) -> None:
        if self.mapped:
            for shard in self.shards:
                drop_mapped_pages(shard[name])

    def _shape_hint(self, name: str) -> str:
        return f" ({len(self.shards)} shard(s) found; is one missing?)" if len(self.shards) else ""


_HF_LAYER_NAMES = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
_HF_TOP_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
                 "lm_head.weight": "output.weight"}
_META_LAYER_NAMES = {v: k for k, v in _HF_LAYER_NAMES.items()}
_META_TOP_NAMES = {v: k for k, v in _HF_TOP_NAMES.items()}


def hf_to_meta_name(name: str) -> Optional[str]:
    if name in _HF_TOP_NAMES:
        return _HF_TOP_NAMES[name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    inner = _HF_LAYER_NAMES.get(m.group(2)) if m else None
    return f"layers.{m.group(1)}.{inner}" if inner else None


def meta_to_hf_name(name: str) -> str:
    if name in _META_TOP_NAMES:
        return _META_TOP_NAMES[name]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    return f"model.layers.{m.group(1)}.{_META_LAYER_NAMES[m.group(2)]}"


def hf_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved rotary rows -> HF's half-split rows, per head."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


class HFReader(Reader):
    layout: Layout = "hf"

    def __init__(self, ckpt_dir: Path):
        self.path = ckpt_dir
        config = json.loads((ckpt_dir / "config.json").read_text())
        self.args = args_from_hf_config(config)
        self.tied = bool(config.get("tie_word_embeddings", False))
        self._where: dict[str, Path] = {}
        self._open: dict[Path, object] = {}
        index = next(iter(sorted(ckpt_dir.glob("*.index.json"))), None)
        if index is not None:
            for key, file in json.loads(index.read_text())["weight_map"].items():
                if not (ckpt_dir / file).exists():
                    raise CheckpointError(f"{index}: lists {file}, which is missing from {ckpt_dir}")
                self._where[key] = ckpt_dir / file
        else:
            files = sorted(ckpt_dir.glob("model*.safetensors")) or sorted(ckpt_dir.glob("pytorch_model*.bin"))
            if not files:
                raise CheckpointError(f"{ckpt_dir}: config.json found but no model*.safetensors or pytorch_model*.bin")
            for f in files:
                for key in self._file_keys(f):
                    self._where[key] = f
        self._meta_to_hf = {m: k for k in self._where if (m := hf_to_meta_name(k))}

    def _file(self, path: Path):
        if path not in self._open:
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                self._open[path] = safe_open(str(path), framework="pt")
            else:
                self._open[path] = _torch_load(path)[0]
        return self._open[path]

    def _file_keys(self, path: Path) -> list[str]:
        f = self._file(path)
        return list(f.keys())

    def get(self, name: str) -> torch.Tensor:
        key = self._meta_to_hf.get(name)
        if key is None and name == "output.weight" and self.tied:
            key = self._meta_to_hf["tok_embeddings.weight"]
        if key is None:
            raise CheckpointError(f"{self.path}: tensor for {name} not found")
        f = self._file(self._where[key])
        t = f.get_tensor(key) if hasattr(f, "get_tensor") else f[key]
        if name.endswith("attention.wq.weight"):
            t = hf_unpermute(t, self.args.n_heads)
        elif name.endswith("attention.wk.weight"):
            t = hf_unpermute(t, self.args.kv_heads)
        return t


def args_from_hf_config(config: dict) -> ModelArgs:
    dim, n_heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or dim // n_heads
    return ModelArgs(
        dim=dim,
        n_layers=config["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads,
        vocab_size=config["vocab_size"],
        norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_theta=float(config.get("rope_theta", 10000.0)),
        max_seq_len=config.get("max_position_embeddings", 2048),
        head_dim=head_dim if head_dim != dim // n_heads else None,
        hidden_dim=config["intermediate_size"],
    )


# --------------------------------------------------------------------------------------------
# Padding for model-parallel sizes that do not divide the model.


@dataclass
class Padding:
    """How a checkpoint is laid out for K ranks: padded sizes and where each new head comes from.

    `q_src[n]` / `kv_src[n]`: the original head behind new head n, or None for an all-zero head. A
    zero query head's output meets a zero column of wo, and zero FFN rows meet zero columns of w2,
    so padding changes no output; padded vocabulary rows are cut from the logits by the model.
    """

    args: ModelArgs
    q_src: list[Optional[int]]
    kv_src: list[Optional[int]]

    @property
    def is_identity(self) -> bool:
        return (self.q_src == list(range(len(self.q_src))) and self.kv_src == list(range(len(self.kv_src)))
                and self.args.ffn_size == self.args.hidden_dim and self.args.padded_vocab_size is None)


def plan_padding(args: ModelArgs, k: int) -> Padding:
    h, g = args.n_heads, args.kv_heads
    r = h // g  # query heads per kv head
    # Each kv head is replicated f times (f copies share its r query heads, rq each) and dummy kv
    # groups fill up to a multiple of K; pick the f that pads least.
    best = None
    for f in range(1, k + 1):
        rq = math.ceil(r / f)
        g_new = math.ceil(g * f / k) * k
        cost = (g_new * rq, g_new)
        if best is None or cost < best[0]:
            best = (cost, f, rq, g_new)
    _, f, rq, g_new = best
    kv_src = [n // f if n < g * f else None for n in range(g_new)]
    q_src: list[Optional[int]] = []
    for n in range(g_new):
        for t in range(rq):
            j, c = divmod(n, f)
            within = c * rq + t
            q_src.append(j * r + within if n < g * f and within < r else None)
    hidden = math.ceil(args.ffn_size / k) * k
    vocab = math.ceil(args.vocab_size / k) * k
    padded = ModelArgs(**{**asdict(args), "n_heads": len(q_src), "n_kv_heads": g_new,
                          "head_dim": args.head_size, "hidden_dim": hidden,
                          "padded_vocab_size": vocab if vocab != args.vocab_size else None})
    return Padding(padded, q_src, kv_src)


def _take_heads(t: torch.Tensor, src: list[Optional[int]], head_dim: int, dim: int) -> torch.Tensor:
    if src == list(range(t.shape[dim] // head_dim)):
        return t
    heads = t.unflatten(dim, (-1, head_dim))
    zero = torch.zeros_like(heads.select(dim, 0))
    picked = [heads.select(dim, s) if s is not None else zero for s in src]
    return torch.stack(picked, dim=dim).flatten(dim, dim + 1)


def _pad_dim(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    if t.shape[dim] == size:
        return t
    shape = list(t.shape)
    shape[dim] = size - t.shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def pad_tensor(name: str, t: torch.Tensor, pad: Padding) -> torch.Tensor:
    hd, a = pad.args.head_size, pad.args
    if name.endswith("attention.wq.weight"):
        return _take_heads(t, pad.q_src, hd, 0)
    if name.endswith(("attention.wk.weight", "attention.wv.weight")):
        return _take_heads(t, pad.kv_src, hd, 0)
    if name.endswith("attention.wo.weight"):
        return _take_heads(t, pad.q_src, hd, 1)
    if name.endswith(("feed_forward.w1.weight", "feed_forward.w3.weight")):
        return _pad_dim(t, 0, a.ffn_size)
    if name.endswith("feed_forward.w2.weight"):
        return _pad_dim(t, 1, a.ffn_size)
    if name in ("tok_embeddings.weight", "output.weight"):
        return _pad_dim(t, 0, a.vocab_rows)
    return t


def local_slice(name: str, t: torch.Tensor, rank: int, k: int) -> torch.Tensor:
    dim = local_shard_dim(name)
    if dim is None or k == 1:
        return t
    return t.chunk(k, dim=dim)[rank]


def local_state(reader: Reader, rank: int, k: int, *, dtype: torch.dtype, device,
                adjust: Optional[Callable[[str, torch.Tensor], torch.Tensor]] = None
                ) -> tuple[ModelArgs, Iterator[tuple[str, torch.Tensor]]]:
    """Padded args for K ranks, and a lazy stream of this rank's (name, tensor) pairs.

    `adjust(name, full_tensor)` runs on each full tensor before padding (used to merge LoRA).
    Only one full tensor is alive at a time, so peak memory is the local model plus one tensor.
    """
    pad = plan_padding(reader.args, k)

    def stream():
        for name in reader.names():
            source = reader.checked(name)
            t = source if adjust is None else adjust(name, source)
            t = local_slice(name, pad_tensor(name, t, pad), rank, k)
            t = t.to(device=device, dtype=dtype).contiguous()
            if t.device.type != "cpu" or t.untyped_storage().data_ptr() != source.untyped_storage().data_ptr():
                reader.release(name)  # a copy: the source is done with
            yield name, t

    return pad.args, stream()


# --------------------------------------------------------------------------------------------
# Writers.


def meta_params(args: ModelArgs) -> dict:
    """params.json contents that Meta's reference code reproduces the same sizes from."""
    multiple_of, mult = args.multiple_of, args.ffn_dim_multiplier
    if ffn_hidden_dim(args.dim, multiple_of, mult) != args.ffn_size:
        # Sizes from an HF config: choose multiple_of so that rounding lands exactly on the width.
        base = int(2 * (4 * args.dim) / 3)
        multiple_of = args.ffn_size
        mult = None if args.ffn_size >= base else args.ffn_size / base
        if ffn_hidden_dim(args.dim, multiple_of, mult) != args.ffn_size:
            raise CheckpointError(f"cannot express FFN width {args.ffn_size} in params.json")
    params = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads,
              "n_kv_heads": args.kv_heads, "vocab_size": args.vocab_size, "multiple_of": multiple_of,
              "ffn_dim_multiplier": mult, "norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
              "max_seq_len": args.max_seq_len}
    if args.head_dim and args.head_dim != args.dim // args.n_heads:
        params["head_dim"] = args.head_dim
    return params


def hf_config(args: ModelArgs, dtype: torch.dtype) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": args.dim, "intermediate_size": args.ffn_size,
        "num_attention_heads": args.n_heads, "num_hidden_layers": args.n_layers,
        "num_key_value_heads": args.kv_heads, "head_dim": args.head_size,
        "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
        "max_position_embeddings": args.max_seq_len, "vocab_size": args.vocab_size,
        "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def save_checkpoint(reader: Reader, out_dir, *, layout: Layout, num_shards: int = 1,
                    adjust: Optional[Callable[[str, torch.Tensor], torch.Tensor]] = None,
                    max_file_bytes: int = 5 * 2**30, tokenizer: Optional[Path] = None) -> None:
    """Write `reader`'s model to `out_dir` in `layout` with `num_shards` shards (Meta) or files (HF).

    Meta shards are split with `tensor_split`, so a shard count that does not divide a size gives
    shards of near-equal size (our loader concatenates any split).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    args = reader.args

    def full(name):
        t = reader.checked(name)
        return adjust(name, t) if adjust is not None else t

    if layout == "meta":
        (out / "params.json").write_text(json.dumps(meta_params(args), indent=2) + "\n")
        for n in range(num_shards):
            shard = {}
            for name in reader.names():
                t, dim = full(name), meta_shard_dim(name)
                shard[name] = (t if dim is None or num_shards == 1 else t.tensor_split(num_shards, dim)[n]).clone()
            torch.save(shard, out / f"consolidated.{n:02d}.pth")
            del shard
    elif layout == "hf":
        from safetensors.torch import save_file

        dtype = full("norm.weight").dtype
        (out / "config.json").write_text(json.dumps(hf_config(args, dtype), indent=2) + "\n")
        groups: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name in reader.names():
            t = full(name)
            if name.endswith("attention.wq.weight"):
                t = hf_permute(t, args.n_heads)
            elif name.endswith("attention.wk.weight"):
                t = hf_permute(t, args.kv_heads)
            nbytes = t.numel() * t.element_size()
            if size and size + nbytes > max_file_bytes:
                groups.append({})
                size = 0
            groups[-1][meta_to_hf_name(name)] = t.contiguous().clone()
            size += nbytes
        if len(groups) == 1:
            save_file(groups[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, group in enumerate(groups):
                fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
                save_file(group, str(out / fname), metadata={"format": "pt"})
                weight_map.update({k: fname for k in group})
            index = {"metadata": {}, "weight_map": weight_map}
            (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    else:
        raise ValueError(f"--layout {layout!r}: choose meta or hf")
    if tokenizer is not None and Path(tokenizer).exists():
        shutil.copyfile(tokenizer, out / "tokenizer.model")
