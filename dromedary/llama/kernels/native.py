"""The whole one-token decoding step in one native call, for bf16 on AVX512-BF16 CPUs.

`decode_cpu.c` runs every layer of a step (norms, projections, rotation, cache writes,
attention over the shared prefix and the row's own keys, SwiGLU, residuals) and the output
projection inside one OpenMP region; see its header for why and for the weight layout. It is
compiled on first use with the system C compiler ($CC, else cc; about a second) into the cache
directory the default model uses, and loaded from there only while that directory and the file
are the user's own and writable by nobody else (its path is predictable). It runs on `torch.get_num_threads()` OpenMP threads, in
PyTorch's own OpenMP runtime where PyTorch ships libgomp under its usual name (the CPU wheel of
torch 2.13 does; the library then links to the copy already loaded). Products run on the AMX tile
unit where the CPU has one, on vdpbf16ps on AMD, else on AVX512 FMAs (DROMEDARY_NATIVE_PRODUCTS=
amx|dpbf16|fma chooses; DROMEDARY_NATIVE_AMX=0 keeps them off the tile unit).

`NativeDecoder.step` has `LeanDecoder.step`'s contract: same inputs, the same logits up to bf16
rounding (sums run in another order; tests compare both). It is used only where it applies: a
CPU model in bf16 at model-parallel size 1, a CPU with AVX512-BF16, a working C compiler, and
DROMEDARY_NATIVE not set to 0; everywhere else the engine keeps the PyTorch step.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ...cache import cache_root
from ..model import ColumnParallelLinear, KVCache, PackedFrom, RowParallelLinear, Transformer

SOURCE = Path(__file__).parent / "decode_cpu.c"
CFLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mamx-tile", "-mamx-bf16", "-fopenmp",
          "-shared", "-fPIC"]
_CPU_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"}


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


class _Model(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int32) for name in
                ("dim", "n_heads", "n_kv_heads", "head_dim", "ffn", "vocab", "n_layers")] + [
        ("eps", ctypes.c_float),
        *[(name, ctypes.POINTER(ctypes.c_void_p)) for name in
          ("attention_norm", "ffn_norm", "wqkv", "wo", "w13", "w2")],
        ("norm", ctypes.c_void_p),
        ("output", ctypes.c_void_p),
    ]


class _Step(ctypes.Structure):
    _fields_ = [
        ("batch", ctypes.c_int32),
        ("threads", ctypes.c_int32),
        ("x", ctypes.c_void_p),
        ("slot", ctypes.c_void_p),
        ("pos", ctypes.c_void_p),
        ("rope", ctypes.c_void_p),
        ("k_cache", ctypes.POINTER(ctypes.c_void_p)),
        ("v_cache", ctypes.POINTER(ctypes.c_void_p)),
        ("cache_row", ctypes.c_int64),
        ("cache_head", ctypes.c_int64),
        ("prefix_k", ctypes.POINTER(ctypes.c_void_p)),
        ("prefix_v", ctypes.POINTER(ctypes.c_void_p)),
        ("prefix_len", ctypes.c_int64),
        ("max_span", ctypes.c_int64),
        ("logits", ctypes.c_void_p),
    ]


def _untrusted(path: Path) -> Optional[str]:
    """Why the library at (or the directory of) a predictable cache path must not be loaded, or
    None: whoever else owns it or may write to it could put any code there, run in this process."""
    st = path.stat()
    if st.st_uid != os.getuid():
        return f"it is owned by uid {st.st_uid}, not by you (uid {os.getuid()})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"others may write to it (mode {stat.filemode(st.st_mode)}; `chmod go-w` it if it is yours)"
    return None


@functools.lru_cache(maxsize=1)
def library() -> Optional[ctypes.CDLL]:
    """The compiled step, built once per source and compiler; None (with a warning saying why)
    where it cannot be had. DROMEDARY_NATIVE=0 turns it off."""
    flags = _cpu_flags()
    if os.environ.get("DROMEDARY_NATIVE", "1") == "0" or not _CPU_FLAGS <= flags:
        return None
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
        key = hashlib.sha256(SOURCE.read_bytes() + " ".join(CFLAGS).encode() + version.encode()).hexdigest()[:16]
        target = cache_root() / "native" / f"decode_cpu-{key}.so"
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        for path in (target.parent, target):
            reason = path.exists() and _untrusted(path)
            if reason:
                warnings.warn(f"native CPU decoding step: not loading {path}: {reason}; using the PyTorch step")
                return None
        if not target.exists():
            # Built beside the target and renamed into place: ranks building at once never load a half-written file.
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
            os.close(fd)
            try:
                subprocess.run([cc, *CFLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True, check=True)
                os.chmod(tmp, 0o755)  # whatever the umask: nobody else may write what we load
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", None) or str(e)
        warnings.warn(f"native CPU decoding step unavailable, using the PyTorch one ({detail.strip()[:500]})")
        return None
    lib.dromedary_decode_step.argtypes = [ctypes.POINTER(_Model), ctypes.POINTER(_Step)]
    lib.dromedary_decode_step.restype = ctypes.c_int
    lib.dromedary_set_amx.argtypes = [ctypes.c_int]
    lib.dromedary_set_dpbf16.argtypes = [ctypes.c_int]
    lib.has_amx = {"amx_tile", "amx_bf16"} <= flags
    lib.products = None
    wanted = os.environ.get("DROMEDARY_NATIVE_PRODUCTS", "auto")
    if wanted not in ("auto", *PRODUCTS):
        warnings.warn(f"DROMEDARY_NATIVE_PRODUCTS={wanted!r} is not one of auto, {', '.join(PRODUCTS)}; using auto")
        wanted = "auto"
    if os.environ.get("DROMEDARY_NATIVE_AMX", "1") == "0" and wanted in ("auto", "amx"):  # the older switch
        wanted = default_products(flags, _cpu_vendor(), amx=False)
    set_products(lib, default_products(flags, _cpu_vendor()) if wanted == "auto" else wanted)
    return lib


# Who takes the projections' products: the AMX tile unit, vdpbf16ps, or fp32 FMAs on converted
# inputs. All three sum each output in one lane, in an order that does not depend on the batch;
# they differ from each other in rounding order (tests run every one the CPU has).
PRODUCTS = ("amx", "dpbf16", "fma")


def default_products(flags: set[str], vendor: str, amx: bool = True) -> str:
    """AMX where the CPU has it. Otherwise vdpbf16ps on AMD (Zen 4 on: it issues at the FMA rate,
    so it does twice the FMA kernel's products per cycle; whole steps of 8 and 64 rows ran 1.4-1.5x
    faster on a 2-core Zen 4, W1-W3 7-19% faster), and FMAs on Intel (where it issues at half the
    FMA rate, and gains nothing)."""
    if amx and {"amx_tile", "amx_bf16"} <= flags:
        return "amx"
    return "dpbf16" if vendor == "AuthenticAMD" else "fma"


def set_products(lib: ctypes.CDLL, kind: str) -> str:
    """Run the products on `kind` (one of PRODUCTS) from now on; AMX falls back to the default
    without it where the CPU lacks it. Returns what is now in use."""
    if kind not in PRODUCTS:
        raise ValueError(f"products: {kind!r} is not one of {', '.join(PRODUCTS)}")
    if kind == "amx" and not (lib.has_amx and lib.dromedary_set_amx(1)):
        kind = default_products(set(), _cpu_vendor(), amx=False)
    if kind != "amx":
        lib.dromedary_set_amx(0)
    lib.dromedary_set_dpbf16(int(kind == "dpbf16"))
    lib.products = kind
    lib.amx = kind == "amx"
    return kind


def _cpu_vendor() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def pack(weight: torch.Tensor) -> torch.Tensor:
    """(..., N, K) bf16 -> blocks of 16 rows by pairs of columns, (..., ceil(N/16), K/2, 16, 2):
    element [..., nb, j, c, e] is weight[..., 16 nb + c, 2 j + e] (rows past N are zero)."""
    *lead, n, k = weight.shape
    padded = F.pad(weight.detach(), (0, 0, 0, -n % 16))
    return padded.reshape(*lead, -1, 16, k // 2, 2).transpose(-3, -2).contiguous()


def _pointers(tensors: Sequence[torch.Tensor]):
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


class NativeDecoder:
    @torch.no_grad()
    def __init__(self, model: Transformer, lib: ctypes.CDLL):
        self.model, self.lib = model, lib
        args = model.args
        self.vocab = args.vocab_size
        attention = model.layers[0].attention
        self.n_heads, self.n_kv_heads = attention.n_local_heads, attention.n_local_kv_heads
        self.head_dim = args.head_size
        blocks = list(model.layers)
        # (the projections' current modules, read afresh at each check; what was packed from them)
        self.sources: list[tuple[Callable[[], tuple[torch.nn.Module, ...]], PackedFrom]] = []
        self.packs: dict[str, list[torch.Tensor]] = {name: [] for name in ("wqkv", "wo", "w13", "w2")}
        for block in blocks:
            a, f = block.attention, block.feed_forward
            for name, now in (("wqkv", lambda a=a: (a.wq, a.wk, a.wv)), ("wo", lambda a=a: (a.wo,)),
                              ("w13", lambda f=f: (f.w1, f.w3)), ("w2", lambda f=f: (f.w2,))):
                self.packs[name].append(pack(torch.cat([m.weight for m in now()])))
                self.sources.append((now, PackedFrom.of(*now())))
        self.output = pack(model.output.weight)
        self.sources.append((lambda: (model.output,), PackedFrom.of(model.output)))
        self.norms = [(b, b.attention_norm.weight, b.ffn_norm.weight) for b in blocks]
        self.final_norm = model.norm.weight
        self.ffn = model.layers[0].feed_forward.w1.weight.shape[0]
        self.rope = torch.view_as_real(model.rope(model.output.weight.device)).contiguous()
        self._prefix_of: Optional[list] = None  # the prefix cache whose packs are below
        self._prefix_packed: tuple[torch.Tensor, ...] = ()
        self._prefix_pointers: list = []
        self._keep = [
            _pointers([b.attention_norm.weight for b in blocks]), _pointers([b.ffn_norm.weight for b in blocks]),
            *[_pointers(self.packs[name]) for name in ("wqkv", "wo", "w13", "w2")],
        ]
        self.spec = _Model(args.dim, self.n_heads, self.n_kv_heads, self.head_dim, self.ffn, self.vocab,
                           len(blocks), args.norm_eps, *self._keep, self.final_norm.data_ptr(), self.output.data_ptr())

    @classmethod
    def build(cls, model: Transformer) -> Optional["NativeDecoder"]:
        """The native step for `model`, or None where it does not apply."""
        w = model.output.weight
        if w.device.type != "cpu" or w.dtype != torch.bfloat16 or model.mp_size != 1:
            return None
        if model.rope_varies_with_length:
            return None  # dynamic NTK: one fixed table cannot serve every length
        read_as_is = [model.tok_embeddings.weight, model.norm.weight]
        read_as_is += [t for b in model.layers for t in (b.attention_norm.weight, b.ffn_norm.weight)]
        if any(t.dtype != torch.bfloat16 or not t.is_contiguous() for t in read_as_is):
            return None
        if model.args.dim % 2 or model.output.weight.shape[0] != model.args.vocab_size:
            return None
        if any(type(m) not in (ColumnParallelLinear, RowParallelLinear) or m.bias is not None
               for b in model.layers for m in (b.attention.wq, b.attention.wk, b.attention.wv, b.attention.wo,
                                                b.feed_forward.w1, b.feed_forward.w2, b.feed_forward.w3)):
            return None  # e.g. LoRA-wrapped: the packs would leave the adapter out
        if model.layers[0].feed_forward.w1.weight.shape[0] % 2 or model.args.head_size % 2 or model.args.head_size > 256:
            return None  # the kernel takes inputs in pairs and keeps a head's output in 16 registers
        lib = library()
        return None if lib is None else cls(model, lib)

    def usable(self) -> bool:
        """The packs still match the model's current, unmodified weights; no autograd."""
        m = self.model
        if torch.is_grad_enabled() or m.training or m.norm.weight is not self.final_norm:
            return False
        for block, attn, ffn in self.norms:
            if block.attention_norm.weight is not attn or block.ffn_norm.weight is not ffn:
                return False
        return all(source.current(now()) for now, source in self.sources)

    def step(self, tokens: torch.Tensor, slots: Sequence[int], cache: KVCache) -> torch.Tensor:
        """Logits (B, vocab) for one new token per row, as `LeanDecoder.step`."""
        bsz = tokens.shape[0]
        x = F.embedding(tokens, self.model.tok_embeddings.weight).contiguous()  # worked on in place
        slot = torch.tensor(slots, dtype=torch.int64)
        pos = slot + cache.prefix_len
        if int(pos.max()) >= self.rope.shape[0]:
            raise ValueError(f"position {int(pos.max())} is past the model's max_seq_len {self.rope.shape[0]}")
        logits = torch.empty(bsz, self.vocab, dtype=torch.bfloat16)
        k0 = cache.k[0]
        if not all(t.is_contiguous() for t in cache.k + cache.v):
            raise ValueError("the native step needs contiguous cache tensors")
        keep = [_pointers(cache.k), _pointers(cache.v)]
        if cache.prefix_k:
            keep += self._prefix_packs(cache)
        spec = _Step(
            bsz, torch.get_num_threads(), x.data_ptr(), slot.data_ptr(), pos.data_ptr(), self.rope.data_ptr(),
            keep[0], keep[1], k0.stride(0), k0.stride(1), *(keep[2:] or [None, None]), cache.prefix_len,
            max(slots) + 1, logits.data_ptr(),
        )
        if self.lib.dromedary_decode_step(ctypes.byref(self.spec), ctypes.byref(spec)) != 0:
            raise MemoryError("the native decoding step could not allocate its scratch memory")
        return logits

    def _prefix_packs(self, cache: KVCache) -> list:
        """Pointers to the shared prefix's keys and values packed for the step's products (see
        decode_cpu.c's Step): made once per prefix, which the engine keeps across calls."""
        if self._prefix_of is not cache.prefix_k:
            # Keys as weights of P outputs x head_dim inputs; values transposed, as weights of
            # head_dim outputs x P inputs, with zero inputs up to a multiple of 32 (whole tiles).
            k = pack(torch.stack(cache.prefix_k).squeeze(1))  # from (L, kvh, P, hd)
            v = torch.stack(cache.prefix_v).squeeze(1).transpose(-1, -2)  # (L, kvh, hd, P)
            v = pack(F.pad(v, (0, -v.shape[-1] % 32)))
            self._prefix_packed = (k, v)
            self._prefix_pointers = [_pointers(list(k)), _pointers(list(v))]
            self._prefix_of = cache.prefix_k
        return self._prefix_pointers
