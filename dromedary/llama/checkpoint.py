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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal, Optional

import torch

from . import rope
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
    """A checkpoint opened for reading. `args` has every size resolved from params and tensors.

    Besides the tensors, what the files say that is not a tensor size: `tied` (the output layer
    is the token embedding), `eos_token_ids` (every end-of-sequence id the config lists),
    `sliding_window` (Mistral's attention span; see `set_window`), `model_type`, and for the Meta
    layout `embedding_split` (the dim the token embedding is split by across shards)."""

    layout: Layout
    args: ModelArgs
    path: Path
    tied: bool = False
    sliding_window: Optional[int] = None
    sliding_source: str = ""
    model_type: str = "llama"
    _eos_ids: tuple[int, ...] = ()

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self._eos_ids)

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        """The full tensor's shape, from the files' metadata where they have it."""
        return tuple(self.get(name).shape)

    def names(self) -> list[str]:
        return list(expected_shapes(self.args))

    def checked(self, name: str) -> torch.Tensor:
        self.check_shape(name)
        return self.get(name)

    def check_shape(self, name: str) -> None:
        got, want = self.shape(name), expected_shapes(self.args)[name]
        if got != want:
            raise CheckpointError(
                f"{self.path}: {name} has shape {got} but the model config implies {want}" + self._shape_hint(name)
            )

    def read_local(self, name: str, rank: int, k: int) -> torch.Tensor:
        """Rank `rank`'s slice (of K, split as our model splits `name`) of the full tensor, for a
        layout that needs no padding. Readers that can, read only the slice (see MetaReader)."""
        return local_slice(name, self.checked(name), rank, k)

    def backs(self, name: str, t: torch.Tensor) -> bool:
        """Whether `t` still lives in the reader's own (file-mapped) memory for `name`."""
        return False

    def _shape_hint(self, name: str) -> str:
        return ""

    def release(self, name: str) -> None:
        """The caller has copied tensor `name` and no longer needs the reader's own."""

    def set_window(self, max_seq_len: Optional[int] = None) -> int:
        """Use `max_seq_len` as the context window (None: the files' own); returns the window.

        Refuses a window that a sliding-window attention span does not cover: the model here
        attends to every earlier token, which equals sliding-window attention only while no query
        is more than `sliding_window` positions past a key."""
        if max_seq_len:
            self.args.max_seq_len = int(max_seq_len)
            self.args.window_note = ""
        window = self.args.max_seq_len
        if self.sliding_window is not None and self.sliding_window < window:
            raise CheckpointError(
                f"{self.sliding_source}: sliding_window {self.sliding_window} is smaller than the context window "
                f"{window}{self.args.window_note}; this toolkit attends to every earlier token, so it would compute "
                f"another model past {self.sliding_window} tokens: pass --max_seq_len {self.sliding_window} or less"
            )
        return window


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

    def __init__(self, args: ModelArgs, state: dict[str, torch.Tensor], path="<memory>", *,
                 tied: bool = False, eos_token_ids: tuple[int, ...] = ()):
        self.args, self.state, self.path = args, state, Path(path)
        self.tied, self._eos_ids = tied, tuple(eos_token_ids)

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
    """The checkpoint's reader. Its window is the files' own until `set_window` (which also checks
    it against a sliding window) is called: every model-running path calls it."""
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


# params.json keys and what they are. Sizes are ModelArgs fields; `max_batch_size` only sizes
# Meta's own cache; the rotary keys are read by `_meta_rope`; `sliding_window` is Mistral's raw
# layout (checked by `set_window`). Anything else may change the computation and is refused.
_META_SIZE_KEYS = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
                   "norm_eps", "rope_theta", "max_seq_len", "head_dim", "hidden_dim"}
_META_OTHER_KEYS = {"max_batch_size", "use_scaled_rope", "rope_scaling_factor", "rope_high_freq_factor",
                    "sliding_window"}

# Llama-3.1's rotary constants in Meta's reference code (llama-models, models/llama3/model.py:
# apply_scaling); Llama-4's args add rope_scaling_factor / rope_high_freq_factor to params.json.
LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

LLAMA32_SMALL_SHAPES = {(2048, 16), (3072, 28)}  # (dim, n_layers) of Llama-3.2-1B and -3B


def _meta_rope(params: dict, where: str) -> Optional[dict]:
    scaled = params.get("use_scaled_rope", False)
    if scaled not in (True, False):
        raise CheckpointError(f"{where}: use_scaled_rope must be true or false, got {scaled!r}")
    extra = [k for k in ("rope_scaling_factor", "rope_high_freq_factor") if params.get(k) is not None]
    if not scaled:
        if extra:
            raise CheckpointError(f"{where}: {extra[0]} = {params[extra[0]]!r} is set but use_scaled_rope is not")
        return None
    spec = dict(LLAMA31_ROPE)
    # Llama-3.2's 1B and 3B text models scale by 32 (their HF config.json says so), yet Meta's
    # params.json for them carries no factor, only use_scaled_rope: told apart by their shapes.
    if (params.get("dim"), params.get("n_layers")) in LLAMA32_SMALL_SHAPES:
        spec["factor"] = 32.0
    if params.get("rope_scaling_factor") is not None:
        spec["factor"] = float(params["rope_scaling_factor"])
    if params.get("rope_high_freq_factor") is not None:
        spec["high_freq_factor"] = float(params["rope_high_freq_factor"])
    return spec


def _meta_window(params: dict, args: ModelArgs, where: str) -> tuple[int, str]:
    """The window and, when params.json does not state it, the note saying where it came from.

    Meta's LLaMA-1/2 and Llama-3 params.json files carry no max_seq_len (Meta's code takes it as
    an argument). A family default is used only where the files identify the family:
    Llama-3 by its 128256-token vocabulary with theta 500000 (3.1/3.2 also by use_scaled_rope);
    Code Llama by theta 1e6 with a 32000/32016 vocabulary; LLaMA-2 and LLaMA-1 (same sizes, 32000
    vocabulary, theta 10000) by norm_eps, 1e-5 and 1e-6 in Meta's releases."""
    if params.get("max_seq_len"):
        return int(params["max_seq_len"]), ""
    vocab, theta, eps = args.vocab_size, args.rope_theta, args.norm_eps
    family = None
    if vocab == 128256 and theta == 500000.0:
        family = ("Llama-3.1", 131072, "use_scaled_rope, a 128256-token vocabulary and theta 500000") \
            if args.rope_scaling else ("Llama-3", 8192, "a 128256-token vocabulary and theta 500000")
    elif vocab in (32000, 32016) and theta == 1000000.0:
        family = ("Code Llama", 16384, f"theta 1000000 and a {vocab}-token vocabulary")
    elif vocab == 32000 and theta == 10000.0 and eps == 1e-5:
        family = ("LLaMA-2", 4096, "norm_eps 1e-05, theta 10000 and a 32000-token vocabulary")
    elif vocab == 32000 and theta == 10000.0 and eps == 1e-6:
        family = ("LLaMA-1", 2048, "norm_eps 1e-06, theta 10000 and a 32000-token vocabulary")
    if family is None:
        return 2048, (f" ({where} states no max_seq_len and does not identify the model's family: 2048 assumed; "
                      "pass --max_seq_len)")
    name, window, why = family
    return window, (f" ({where} states no max_seq_len; {window} is {name}'s window, identified by {why}; "
                    "pass --max_seq_len to change it)")


def _eos_ids(*configs: tuple[dict, str]) -> tuple[int, ...]:
    """Every eos_token_id (an int or a list) of the configs, in order, without repeats."""
    out: list[int] = []
    for config, where in configs:
        value = config.get("eos_token_id")
        values = value if isinstance(value, list) else [] if value is None else [value]
        for v in values:
            if not isinstance(v, int) or isinstance(v, bool):
                raise CheckpointError(f"{where}: eos_token_id {value!r} is not an integer or a list of integers")
            if v not in out:
                out.append(v)
    return tuple(out)


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return value


def _generation_config(ckpt_dir: Path) -> tuple[dict, str]:
    path = ckpt_dir / "generation_config.json"
    return (_read_json(path) if path.exists() else {}), str(path)


# Rotary buffers some checkpoints carry (LLaMA-1's rope.freqs, HF's rotary_emb.inv_freq): recomputed
# from the config, so skipped rather than refused.
_ROTARY_BUFFER = re.compile(r"(^|\.)(rope\.freqs|rotary_emb\.inv_freq)$")


class MetaReader(Reader):
    """Meta's layout. Shards are memory-mapped and opened on first use, and `read_local` reads
    only the parts of the shards that a rank's slice overlaps, so at MP = shard count each rank
    reads its own shard only (as Meta's loader does)."""

    layout: Layout = "meta"

    def __init__(self, ckpt_dir: Path):
        self.path = ckpt_dir
        files = sorted(ckpt_dir.glob("consolidated.*.pth"))
        numbers = [int(m.group(1)) for f in files if (m := re.fullmatch(r"consolidated\.(\d+)\.pth", f.name))]
        for expected in range(max(numbers) + 1):
            if expected not in numbers:
                raise CheckpointError(f"{ckpt_dir}: missing shard consolidated.{expected:02d}.pth "
                                      f"(found {len(numbers)} of {max(numbers) + 1})")
        self.n_shards = len(numbers)
        self._shards: dict[int, dict[str, torch.Tensor]] = {}
        self.mapped = True
        params_path = ckpt_dir / "params.json"
        params = _read_json(params_path)
        self.args = self._resolve_args(params, str(params_path))
        generation, where = _generation_config(ckpt_dir)
        self._eos_ids = _eos_ids((generation, where))
        if params.get("sliding_window") is not None:
            self.sliding_window, self.sliding_source = int(params["sliding_window"]), str(params_path)
        for n in sorted(self._shards):
            self._check_names(n)

    @property
    def shards(self) -> list[dict[str, torch.Tensor]]:
        return [self._shard(n) for n in range(self.n_shards)]

    def _shard(self, n: int) -> dict[str, torch.Tensor]:
        if n not in self._shards:
            state, mapped = _torch_load(self.path / f"consolidated.{n:02d}.pth")
            self._shards[n] = state
            self.mapped = self.mapped and mapped
            if hasattr(self, "args"):  # shards opened later are checked as they open
                self._check_names(n)
        return self._shards[n]

    def _part(self, n: int, name: str) -> torch.Tensor:
        """Shard n's tensor `name` for its data (a view into the file, read as it is copied)."""
        return self._part_meta(n, name)

    def _check_names(self, n: int) -> None:
        shard = self._shard(n)
        unused = sorted(k for k in shard if k not in expected_shapes(self.args) and not _ROTARY_BUFFER.search(k))
        if unused:
            raise CheckpointError(
                f"{self.path}/consolidated.{n:02d}.pth: tensor(s) the model would not use: {', '.join(unused[:5])}"
                + (f" and {len(unused) - 5} more" if len(unused) > 5 else "")
                + " (biases, adapters or another architecture's weights: refusing rather than ignoring them)"
            )

    def _resolve_args(self, params: dict, where: str) -> ModelArgs:
        unknown = sorted(set(params) - _META_SIZE_KEYS - _META_OTHER_KEYS)
        if unknown:
            k = unknown[0]
            raise CheckpointError(f"{where}: key {k} = {json.dumps(params[k])} is not understood; it may change "
                                  "the computation, so the checkpoint is refused rather than run without it")
        args = ModelArgs(**{k: v for k, v in params.items() if k in _META_SIZE_KEYS - {"max_seq_len"} and v is not None})
        args.rope_scaling = _meta_rope(params, where)
        emb = self._part_meta(0, "tok_embeddings.weight").shape
        # LLaMA-1/2's ParallelEmbedding splits the embedding by columns across shards; Llama-3's
        # VocabParallelEmbedding by vocabulary rows. Each shard has the full width in the latter.
        self.embedding_split = 0 if self.n_shards > 1 and emb[1] == args.dim else 1
        if args.vocab_size in (-1, 0, None):  # LLaMA-1's params.json leaves it to the tokenizer
            args.vocab_size = self.shape("tok_embeddings.weight")[0]
        args.max_seq_len, args.window_note = _meta_window(params, args, where)
        w1 = self.shape("layers.0.feed_forward.w1.weight")
        if w1[0] != args.ffn_size and args.hidden_dim is None:
            raise CheckpointError(
                f"{where}: FFN width from multiple_of={args.multiple_of}, "
                f"ffn_dim_multiplier={args.ffn_dim_multiplier} is {args.ffn_size}, "
                f"but layers.0.feed_forward.w1.weight has {w1[0]} rows" + self._shape_hint("")
            )
        return args

    def split_dim(self, name: str) -> Optional[int]:
        if name == "tok_embeddings.weight":
            return self.embedding_split
        return meta_shard_dim(name)

    def shape(self, name: str) -> tuple[int, ...]:
        dim = self.split_dim(name)
        first = list(self._part_meta(0, name).shape)
        if dim is not None and self.n_shards > 1:
            first[dim] = sum(self._part_meta(n, name).shape[dim] for n in range(self.n_shards))
        return tuple(first)

    def get(self, name: str) -> torch.Tensor:
        dim = self.split_dim(name)
        if dim is None or self.n_shards == 1:
            for n in range(1, self.n_shards):
                self._part_meta(n, name)  # named if missing
            return self._part(0, name)
        parts = [self._part(n, name) for n in range(self.n_shards)]
        full = torch.cat(parts, dim=dim)
        if self.mapped:
            # The parts were copied: their file pages need not stay resident while the rest of
            # the model loads (read from the file again if touched).
            for part in parts:
                drop_mapped_pages(part)
        return full

    def read_local(self, name: str, rank: int, k: int) -> torch.Tensor:
        self.check_shape(name)
        want = local_shard_dim(name)
        if want is None:
            # Replicated: every shard holds it; take it from the shard this rank reads anyway.
            return self._part(rank * self.n_shards // k, name)
        full = self.shape(name)
        size = full[want] // k
        lo, hi = rank * size, (rank + 1) * size
        have = self.split_dim(name)
        if have is None or self.n_shards == 1:
            return self._part(0, name).narrow(want, lo, size)
        pieces = []
        if have == want:
            # Only the shards that overlap [lo, hi) along the split dim.
            start = 0
            for n in range(self.n_shards):
                part = self._part_meta(n, name)
                stop = start + part.shape[have]
                a, b = max(lo, start), min(hi, stop)
                if a < b:
                    pieces.append(self._part(n, name).narrow(have, a - start, b - a))
                start = stop
        else:
            # Split the other way (LLaMA-1/2's embedding): every shard, each narrowed to the slice.
            pieces = [self._part(n, name).narrow(want, lo, size) for n in range(self.n_shards)]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=have)

    def _part_meta(self, n: int, name: str) -> torch.Tensor:
        # A shape lookup only: separate from `_part` so that tests counting reads see reads only.
        shard = self._shard(n)
        if name not in shard:
            raise CheckpointError(f"{self.path}/consolidated.{n:02d}.pth: tensor {name} is missing")
        return shard[name]

    def backs(self, name: str, t: torch.Tensor) -> bool:
        ptr = t.untyped_storage().data_ptr()
        return any(name in shard and shard[name].untyped_storage().data_ptr() == ptr for shard in self._shards.values())

    def release(self, name: str) -> None:
        if self.mapped:
            for shard in self._shards.values():
                if name in shard:
                    drop_mapped_pages(shard[name])

    def _shape_hint(self, name: str) -> str:
        return f" ({self.n_shards} shard(s) found; is one missing?)" if self.n_shards else ""


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
        config_path = ckpt_dir / "config.json"
        config = _read_json(config_path)
        where = str(config_path)
        self.args = args_from_hf_config(config, where=where)
        self.model_type = config["model_type"]
        self.tied = bool(config.get("tie_word_embeddings", False))
        self.sliding_window = config.get("sliding_window", _HF_DEFAULTS[self.model_type]["sliding_window"])
        self.sliding_source = where
        generation, gen_where = _generation_config(ckpt_dir)
        self._eos_ids = _eos_ids((config, where), (generation, gen_where))
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
        unused = sorted(k for k in self._where if hf_to_meta_name(k) is None and not _ROTARY_BUFFER.search(k))
        if unused:
            raise CheckpointError(
                f"{ckpt_dir}: tensor(s) the model would not use: {', '.join(unused[:5])}"
                + (f" and {len(unused) - 5} more" if len(unused) > 5 else "")
                + " (biases, adapters or another architecture's weights: refusing rather than ignoring them)"
            )
        if self.tied and "lm_head.weight" in self._where:
            # transformers ties lm_head to the embedding; a different stored lm_head is ambiguous.
            if not torch.equal(self._raw("lm_head.weight"), self._raw("model.embed_tokens.weight")):
                raise CheckpointError(f"{where}: tie_word_embeddings is true but lm_head.weight differs from "
                                      "model.embed_tokens.weight in the files")

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

    def _key(self, name: str) -> str:
        key = self._meta_to_hf.get(name)
        if name == "output.weight" and self.tied:
            key = self._meta_to_hf.get("tok_embeddings.weight")
        if key is None:
            raise CheckpointError(f"{self.path}: tensor for {name} not found")
        return key

    def _raw(self, key: str) -> torch.Tensor:
        f = self._file(self._where[key])
        return f.get_tensor(key) if hasattr(f, "get_tensor") else f[key]

    def shape(self, name: str) -> tuple[int, ...]:
        key = self._key(name)
        f = self._file(self._where[key])
        if hasattr(f, "get_slice"):
            return tuple(f.get_slice(key).get_shape())
        return tuple(f[key].shape)

    def get(self, name: str) -> torch.Tensor:
        return self._unpermute(name, self._raw(self._key(name)))

    def _unpermute(self, name: str, t: torch.Tensor) -> torch.Tensor:
        # Per head, so a slice of whole heads unpermutes on its own.
        if name.endswith(("attention.wq.weight", "attention.wk.weight")):
            t = hf_unpermute(t, t.shape[0] // self.args.head_size)
        return t

    def read_local(self, name: str, rank: int, k: int) -> torch.Tensor:
        self.check_shape(name)
        dim = local_shard_dim(name)
        key = self._key(name)
        f = self._file(self._where[key])
        if dim is None or k == 1 or not hasattr(f, "get_slice"):
            return local_slice(name, self.get(name), rank, k)
        size = self.shape(name)[dim] // k
        piece = f.get_slice(key)
        # safetensors reads only the requested rows (or columns) from the file.
        t = piece[rank * size : (rank + 1) * size] if dim == 0 else piece[:, rank * size : (rank + 1) * size]
        return self._unpermute(name, t)


# What transformers' config classes default each field to, where config.json may leave it out.
_HF_DEFAULTS = {
    "llama": {"num_key_value_heads": None, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
              "sliding_window": None},
    "mistral": {"num_key_value_heads": 8, "max_position_embeddings": 4096 * 32, "rms_norm_eps": 1e-6,
                "sliding_window": 4096},
}
# The model types run here: LLaMA, and Mistral, which is LLaMA's computation plus a sliding
# attention window (accepted while it covers the window in use). Others of the family compute
# something model.py does not: qwen2 q/k/v biases, gemma (1 + w) norms, scaled embeddings and
# gelu, phi3 fused projections and longrope, olmo layer norms, mixtral experts; each is refused by
# name rather than half-run.
HF_MODEL_TYPES = tuple(_HF_DEFAULTS)
_ACTIVATIONS = ("silu", "swish")  # one function in transformers' ACT2FN


def hf_rope_spec(config: dict, where: str) -> tuple[float, Optional[dict]]:
    """(theta, normalised scaling spec) from config.json, as transformers reads them: v5's
    `rope_parameters` or v4's `rope_theta` + `rope_scaling`, the type under `rope_type` or `type`."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    field = "rope_parameters" if config.get("rope_parameters") else "rope_scaling"
    if not isinstance(params, dict):
        raise CheckpointError(f"{where}: {field} = {json.dumps(params)} is not an object")
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    if theta is None:
        theta = 10000.0
    partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise CheckpointError(f"{where}: partial_rotary_factor {partial} is not supported (only whole-head rotary)")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return float(theta), None
    spec = {k: v for k, v in params.items() if k not in ("rope_type", "type", "rope_theta", "partial_rotary_factor")}
    spec["rope_type"] = kind
    window = config.get("max_position_embeddings", _HF_DEFAULTS[config["model_type"]]["max_position_embeddings"])
    if kind == "dynamic":
        # transformers grows theta past max_position_embeddings itself (not a rope key).
        spec.setdefault("original_max_position_embeddings", window)
    if kind in ("llama3", "yarn"):
        # Priority as transformers': a top-level original_max_position_embeddings, then the
        # rope key, then max_position_embeddings.
        if config.get("original_max_position_embeddings") is not None:
            spec["original_max_position_embeddings"] = config["original_max_position_embeddings"]
        spec.setdefault("original_max_position_embeddings", window)
    if kind == "yarn" and spec.get("factor") is None:
        spec["factor"] = window / spec["original_max_position_embeddings"]
    problem = rope.check_spec(spec)
    if problem:
        raise CheckpointError(f"{where}: {field} {json.dumps(params)}: {problem}")
    return float(theta), spec


def args_from_hf_config(config: dict, where: str = "config.json") -> ModelArgs:
    """ModelArgs for an HF config.json, or CheckpointError naming the field that is not honoured."""
    model_type = config.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise CheckpointError(f"{where}: model_type {model_type!r} is not supported "
                              f"(supported: {', '.join(HF_MODEL_TYPES)})")
    defaults = _HF_DEFAULTS[model_type]
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise CheckpointError(f"{where}: {key} = {json.dumps(config[key])}: projections with biases are not supported")
    act = config.get("hidden_act", "silu")
    if act not in _ACTIVATIONS:
        raise CheckpointError(f"{where}: hidden_act {act!r} is not supported (the FFN here is SwiGLU: silu)")
    if config.get("quantization_config") is not None:
        method = config["quantization_config"].get("quant_method", "?") if isinstance(config["quantization_config"], dict) else "?"
        raise CheckpointError(f"{where}: quantization_config (quant_method {method!r}) is set: quantized weights are "
                              "not supported; use the unquantized checkpoint (or a GGUF file)")
    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "intermediate_size"):
        if not isinstance(config.get(key), int):
            raise CheckpointError(f"{where}: {key} is missing or not an integer")
    dim, n_heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or dim // n_heads
    theta, spec = hf_rope_spec(config, where)
    window = config.get("max_position_embeddings")
    note = ""
    if window is None:
        window = defaults["max_position_embeddings"]
        note = f" ({where} states no max_position_embeddings; {window} is transformers' default for {model_type})"
    return ModelArgs(
        dim=dim,
        n_layers=config["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or defaults["num_key_value_heads"] or n_heads,
        vocab_size=config["vocab_size"],
        norm_eps=config.get("rms_norm_eps", defaults["rms_norm_eps"]),
        rope_theta=theta,
        max_seq_len=window,
        head_dim=head_dim if head_dim != dim // n_heads else None,
        hidden_dim=config["intermediate_size"],
        rope_scaling=spec,
        window_note=note,
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
    Where no padding or adjustment is needed, each rank reads only its own slice from the files
    (`Reader.read_local`): at MP=8 on a 70B checkpoint, an eighth of it per rank.
    """
    pad = plan_padding(reader.args, k)
    direct = pad.is_identity and adjust is None

    def stream():
        for name in reader.names():
            if direct:
                t = reader.read_local(name, rank, k).to(device=device, dtype=dtype).contiguous()
                if t.device.type != "cpu" or not reader.backs(name, t):
                    reader.release(name)
                yield name, t
                continue
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


def meta_params(args: ModelArgs, *, sliding_window: Optional[int] = None) -> dict:
    """params.json contents that Meta's reference code reproduces the same sizes from, and our
    reader the same computation (rotary scaling as use_scaled_rope; CheckpointError for scaling
    params.json cannot express)."""
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
              "ffn_dim_multiplier": mult, "norm_eps": args.norm_eps, "rope_theta": args.rope_theta}
    if not args.window_note:  # a window no file stated stays unstated
        params["max_seq_len"] = args.max_seq_len
    if args.head_dim and args.head_dim != args.dim // args.n_heads:
        params["head_dim"] = args.head_dim
    spec = args.rope_scaling
    if spec is not None:
        fixed = {k: LLAMA31_ROPE[k] for k in ("rope_type", "low_freq_factor", "original_max_position_embeddings")}
        if any(spec.get(k) != v for k, v in fixed.items()):
            raise CheckpointError(f"params.json cannot express rope scaling {json.dumps(spec)} (only Llama-3.1's "
                                  "use_scaled_rope, with low_freq_factor 1 and an 8192 original window): "
                                  "write the HF layout instead")
        params["use_scaled_rope"] = True
        if spec["factor"] != LLAMA31_ROPE["factor"]:
            params["rope_scaling_factor"] = spec["factor"]
        if spec["high_freq_factor"] != LLAMA31_ROPE["high_freq_factor"]:
            params["rope_high_freq_factor"] = spec["high_freq_factor"]
    if sliding_window is not None:
        params["sliding_window"] = sliding_window
    return params


def hf_config(args: ModelArgs, dtype: torch.dtype, *, tied: bool = False, eos_token_ids=(),
              sliding_window: Optional[int] = None, bos_token_id: Optional[int] = None) -> dict:
    """config.json for transformers' LlamaForCausalLM (MistralForCausalLM with a sliding window).
    `bos_token_id`: the tokenizer's (128000 for Llama-3, 1 for LLaMA-1/2); left out when unknown."""
    window = args.max_seq_len
    scaling = None
    if args.rope_scaling is not None:
        scaling = dict(args.rope_scaling)
        if scaling["rope_type"] == "dynamic":
            # transformers takes dynamic NTK's original window from max_position_embeddings.
            window = scaling.pop("original_max_position_embeddings")
    config = {
        "architectures": ["MistralForCausalLM" if sliding_window is not None else "LlamaForCausalLM"],
        "model_type": "mistral" if sliding_window is not None else "llama",
        "hidden_size": args.dim, "intermediate_size": args.ffn_size,
        "num_attention_heads": args.n_heads, "num_hidden_layers": args.n_layers,
        "num_key_value_heads": args.kv_heads, "head_dim": args.head_size,
        "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
        "max_position_embeddings": window, "vocab_size": args.vocab_size,
        "tie_word_embeddings": bool(tied),
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if bos_token_id is not None:
        config["bos_token_id"] = int(bos_token_id)
    eos = list(eos_token_ids)
    if eos:
        config["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    if scaling is not None:
        config["rope_scaling"] = scaling
    if sliding_window is not None:
        config["sliding_window"] = sliding_window
    return config


def save_checkpoint(reader: Reader, out_dir, *, layout: Layout, num_shards: int = 1,
                    adjust: Optional[Callable[[str, torch.Tensor], torch.Tensor]] = None,
                    max_file_bytes: int = 5 * 2**30, tokenizer: Optional[Path] = None) -> None:
    """Write `reader`'s model to `out_dir` in `layout` with `num_shards` shards (Meta) or files (HF).

    Meta shards are split with `tensor_split`, so a shard count that does not divide a size gives
    shards of near-equal size (our loader concatenates any split).
    """
    out = Path(out_dir)
    args = reader.args
    # What the layout cannot express is refused before anything is made on disk.
    params = meta_params(args, sliding_window=reader.sliding_window) if layout == "meta" else None
    out.mkdir(parents=True, exist_ok=True)

    def full(name):
        t = reader.checked(name)
        return adjust(name, t) if adjust is not None else t

    eos = reader.eos_token_ids
    if layout == "meta":
        (out / "params.json").write_text(json.dumps(params, indent=2) + "\n")
        if eos:  # params.json has no place for them; our reader reads this file beside it
            (out / "generation_config.json").write_text(
                json.dumps({"eos_token_id": eos[0] if len(eos) == 1 else eos}, indent=2) + "\n")
        # The embedding split as read (Meta layouts), else as Meta's code for the family splits it:
        # vocabulary rows for Llama-3 (VocabParallelEmbedding), columns for LLaMA-1/2.
        emb_split = getattr(reader, "embedding_split", 0 if args.vocab_size == 128256 else 1)
        names = reader.names()
        if reader.tied and "output.weight" not in names:
            names.append("output.weight")
        for n in range(num_shards):
            shard = {}
            for name in names:
                t = full(name)
                dim = emb_split if name == "tok_embeddings.weight" else meta_shard_dim(name)
                shard[name] = (t if dim is None or num_shards == 1 else t.tensor_split(num_shards, dim)[n]).clone()
            torch.save(shard, out / f"consolidated.{n:02d}.pth")
            del shard
    elif layout == "hf":
        from safetensors.torch import save_file

        dtype = full("norm.weight").dtype
        bos = None
        if tokenizer is not None:  # the tokenizer copied beside the weights says which id BOS is
            from .tokenizer import load_tokenizer

            bos = load_tokenizer(Path(tokenizer)).bos_id
        config = hf_config(args, dtype, tied=reader.tied, eos_token_ids=eos, sliding_window=reader.sliding_window,
                           bos_token_id=bos)
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        groups: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name in reader.names():
            if name == "output.weight" and reader.tied:
                continue  # transformers ties lm_head to the embedding
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
    if tokenizer is not None:
        copy_tokenizer(Path(tokenizer), out)


# What a checkpoint's tokenizer is made of: the model file(s) and the configuration that says
# where BOS goes and which tokens are special (load_tokenizer reads tokenizer.json first).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


def copy_tokenizer(source: Path, out: Path) -> None:
    """Copy the tokenizer of `source` (a checkpoint directory, or one tokenizer file together with
    the configuration beside it) into `out`, so the written checkpoint tokenizes as the source did."""
    if source.is_dir():
        files = [source / name for name in TOKENIZER_FILES]
    elif source.is_file():
        name = "tokenizer.json" if source.suffix == ".json" else "tokenizer.model"
        shutil.copyfile(source, out / name)
        files = [source.parent / n for n in TOKENIZER_FILES[2:]]
    else:
        return
    for f in files:
        if f.is_file():
            shutil.copyfile(f, out / f.name)
