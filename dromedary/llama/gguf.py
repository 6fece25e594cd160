"""GGUF files (llama.cpp's format): the LLaMA configuration, dequantized tensors and the tokenizer,
all from the one file's metadata and tensors.

`GGUFReader` presents a `.gguf` file like the Meta and HF readers of checkpoint.py: full tensors
under Meta's key names, one at a time, dequantized with llama.cpp's own `gguf` package.

Two facts make the weights line up with our model without any reordering:
- GGUF lists a tensor's dims innermost first (ne = [in_features, out_features]); the `gguf` package
  hands the data back with numpy's order (out_features, in_features), which is torch's.
- llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel.permute) turns HF's half-split q/k rows
  back into Meta's interleaved rotary order, which llama.cpp's "normal" rope (and ours) rotates;
  GGUFs made from Meta's .pth files were never permuted. So q/k rows are used as stored
  (transformers, which rotates halves, permutes them; parity with it is tested).

RoPE scaling, as llama.cpp computes it:
- `llama.rope.scaling.type = linear` with `llama.rope.scaling.factor` F (a factor without a type is
  linear too, as llama.cpp reads it; type `none`, or a factor of 0 or 1, scales nothing) becomes
  rope_scaling {"rope_type": "linear", "factor": F}.
- `rope_freqs.weight` (llama.cpp's converter writes it for Llama-3.1/3.2: one factor per frequency,
  which llama.cpp divides the frequency by) is recognised as Llama-3's blend when the factors equal
  base / llama3 frequencies for one of the known constant sets (factor 8 for 3.1 or 32 for 3.2, low 1,
  high 4, an original window of 8192 or the file's `rope.scaling.original_context_length`), and
  becomes that llama3 spec; all ones scale nothing; other factors are refused. It is not a weight.
Everything else in the metadata that changes the computation is refused by name: an architecture
other than `llama`, yarn and other scaling types, partial rotary dims, MoE experts, per-layer head
counts that vary, tensors the model has no place for, quantization types we have not tested.

The tokenizer (`gguf_tokenizer`) is rebuilt as a `tokenizers.Tokenizer` from `tokenizer.ggml.*`:
byte-level BPE (`gpt2`, with `tokenizer.ggml.pre` choosing llama.cpp's pre-tokenizer split) and
SentencePiece-style BPE (`llama`: scores give the merge order, `<0xNN>` byte fallback), with the
control and user-defined tokens as added tokens, the BOS rule and the end-of-generation ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from . import rope
from .checkpoint import CheckpointError, Reader, expected_shapes
from .model import ModelArgs

GGUF_MAGIC = b"GGUF"

# Tensor types we dequantize (gguf.quants, llama.cpp's own numpy code) and test against
# transformers' loading of the same file.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K",
                   "Q4_K", "Q5_K", "Q6_K")

_LAYER_NAMES = {
    "attn_norm": "attention_norm",
    "attn_q": "attention.wq",
    "attn_k": "attention.wk",
    "attn_v": "attention.wv",
    "attn_output": "attention.wo",
    "ffn_norm": "ffn_norm",
    "ffn_gate": "feed_forward.w1",
    "ffn_down": "feed_forward.w2",
    "ffn_up": "feed_forward.w3",
}
_TOP_NAMES = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
              "output.weight": "output.weight"}
# Per-frequency RoPE divisors (llama.cpp's LLM_TENSOR_ROPE_FREQS): read into the rotary spec, not a weight.
ROPE_FREQS = "rope_freqs.weight"

# (factor, low_freq_factor, high_freq_factor) of Llama-3.1 and Llama-3.2 (their config.json
# rope_scaling), and the original window llama.cpp's converter computes the factors with (8192,
# unless the HF config has a top-level original_max_position_embeddings).
_LLAMA3_CONSTANTS = ((8.0, 1.0, 4.0), (32.0, 1.0, 4.0))
_LLAMA3_WINDOW = 8192

# `llama.*` keys we read into ModelArgs.
_HONOURED = {"context_length", "embedding_length", "block_count", "feed_forward_length",
             "attention.head_count", "attention.head_count_kv", "attention.layer_norm_rms_epsilon",
             "attention.key_length", "attention.value_length", "rope.freq_base", "rope.dimension_count",
             "vocab_size",
             # The window the model was trained at (tried as Llama-3's original window when matching
             # rope_freqs.weight; informative otherwise) / whether it was finetuned with scaling.
             "rope.scaling.original_context_length", "rope.scaling.finetuned",
             # Old convert.py's note that tensors came from Meta's .pth: the row order is the same.
             "tensor_data_layout"}


def is_gguf(path) -> bool:
    """A file (not a directory) that starts with GGUF's magic bytes."""
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def gguf_to_meta_name(name: str) -> Optional[str]:
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[3] == "weight" and parts[2] in _LAYER_NAMES:
        return f"layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.weight"
    return None


class GGUFReader(Reader):
    """A `.gguf` file read as a LLaMA checkpoint. `eos_token_ids`: every id that ends generation."""

    layout = "gguf"

    def __init__(self, path):
        import gguf

        self.path = Path(path)
        try:
            self.file = gguf.GGUFReader(str(self.path), "r")
        except (ValueError, OSError) as err:
            raise CheckpointError(f"{self.path}: not a readable GGUF file ({err})") from None
        self.meta = _Metadata(self.file, self.path)
        arch = self.meta.get("general.architecture")
        if arch != "llama":
            raise CheckpointError(f"{self.path}: general.architecture = {arch!r}; only 'llama' GGUF files are "
                                  f"supported (convert the model's HF checkpoint instead, if its family is LLaMA)")
        splits = self.meta.get("split.count", 1)
        if splits != 1:
            raise CheckpointError(f"{self.path}: split.count = {splits}: a split GGUF; merge it into one file first "
                                  f"(llama.cpp's `llama-gguf-split --merge`)")
        self._tensors: dict[str, Any] = {}
        rope_freqs = None
        for t in self.file.tensors:
            if t.name == ROPE_FREQS:
                if t.tensor_type.name not in ("F32", "F16", "BF16"):
                    raise CheckpointError(f"{self.path}: tensor {t.name} is stored as {t.tensor_type.name}; "
                                          "RoPE factors are read as F32, F16 or BF16")
                rope_freqs = t
                continue
            meta_name = gguf_to_meta_name(t.name)
            if meta_name is None:
                raise CheckpointError(f"{self.path}: tensor {t.name} has no place in a LLaMA model"
                                      + _TENSOR_HINTS.get(t.name.split(".")[-2] if "." in t.name else t.name, ""))
            if t.tensor_type.name not in SUPPORTED_TYPES:
                raise CheckpointError(f"{self.path}: tensor {t.name} is stored as {t.tensor_type.name}; supported "
                                      f"types: {', '.join(SUPPORTED_TYPES)}")
            self._tensors[meta_name] = t
        self.tied = "output.weight" not in self._tensors
        self.args = args_from_gguf(self.meta, self._tensors, self.path, rope_freqs)
        check_shapes(self)  # a wrong file stops here, before any weight is read or anything written
        self._eos_ids = tuple(eos_token_ids(self.meta))

    def get(self, name: str) -> torch.Tensor:
        if name == "output.weight" and self.tied:
            name = "tok_embeddings.weight"  # llama.cpp writes no output.weight for tied embeddings
        t = self._tensors.get(name)
        if t is None:
            raise CheckpointError(f"{self.path}: tensor for {name} not found")
        return dequantize(t)

    def tokenizer(self) -> "GGUFTokenizer":
        return gguf_tokenizer(self.meta)

    def load_tokenizer(self):
        """The file's tokenizer behind the toolkit's one interface (tokenizer.HFTokenizer)."""
        from .tokenizer import HFTokenizer

        spec = self.tokenizer()
        if spec.eos_id is None:
            raise CheckpointError(f"{self.path}: tokenizer.ggml.eos_token_id is missing; pass --tokenizer_path")
        return HFTokenizer.from_tokenizer(spec.tokenizer, bos_id=spec.bos_id, eos_id=spec.eos_id,
                                          stop_ids=spec.eos_ids, add_bos=spec.add_bos, path=self.path)


_TENSOR_HINTS = {
    "ffn_gate_inp": " (a mixture-of-experts router: MoE models are not supported)",
    "attn_q": " (attention biases are not supported)",
}


def dequantize(t) -> torch.Tensor:
    """The tensor as torch shape (out, in): F32/F16/BF16 exactly as stored, quantized types as fp32."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    shape = tuple(int(n) for n in reversed(t.shape))  # ne is innermost-first
    if t.tensor_type == Q.F32:
        out = torch.from_numpy(np.array(t.data, dtype=np.float32))  # a copy: the file is mapped read-only
    elif t.tensor_type == Q.F16:
        out = torch.from_numpy(np.array(t.data, dtype=np.float16))
    elif t.tensor_type == Q.BF16:
        # bf16 kept as bf16 (numpy has no bf16: carry the bits as int16).
        out = torch.from_numpy(np.array(t.data).view(np.int16)).view(torch.bfloat16)
    else:
        out = torch.from_numpy(np.ascontiguousarray(quants.dequantize(t.data, t.tensor_type)))
    return out.reshape(shape)


class _Metadata:
    """The file's key/value pairs, read on demand; `used` marks the ones looked at."""

    def __init__(self, file, path: Path):
        self.fields, self.path = file.fields, path

    def __contains__(self, key: str) -> bool:
        return key in self.fields

    def keys(self) -> list[str]:
        return list(self.fields)

    def get(self, key: str, default: Any = None) -> Any:
        f = self.fields.get(key)
        return default if f is None else f.contents()

    def need(self, key: str) -> Any:
        if key not in self.fields:
            raise CheckpointError(f"{self.path}: metadata key {key} is missing (llama.cpp needs it too)")
        return self.get(key)


def _uniform(meta: _Metadata, key: str, required: bool = True, default: Any = None) -> Any:
    """A per-model value that llama.cpp lets be a per-layer array: refused unless every layer agrees."""
    value = meta.need(key) if required else meta.get(key, default)
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise CheckpointError(f"{meta.path}: {key} = {value}: layers of different shapes are not supported")
        value = value[0]
    return value


def _short_float(x: float) -> float:
    # Stored as float32: 1e-5 reads back as 9.99999974737875e-06; keep the decimal the writer meant.
    return float(str(np.float32(x)))


def args_from_gguf(meta: _Metadata, tensors: dict, path: Path, rope_freqs=None) -> ModelArgs:
    """`rope_freqs`: the file's rope_freqs.weight tensor, if it has one."""
    refuse_unhonoured(meta)
    dim = int(meta.need("llama.embedding_length"))
    n_heads = int(_uniform(meta, "llama.attention.head_count"))
    n_kv = int(_uniform(meta, "llama.attention.head_count_kv", required=False, default=n_heads))
    head_dim = int(meta.get("llama.attention.key_length", dim // n_heads))
    value_dim = int(meta.get("llama.attention.value_length", head_dim))
    if value_dim != head_dim:
        raise CheckpointError(f"{path}: llama.attention.key_length = {head_dim} but llama.attention.value_length = "
                              f"{value_dim}: different key and value head sizes are not supported")
    rope_dims = int(meta.get("llama.rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise CheckpointError(f"{path}: llama.rope.dimension_count = {rope_dims} is not the head size {head_dim}: "
                              "partial rotary embeddings are not supported")
    theta = _short_float(meta.get("llama.rope.freq_base", 10000.0))
    scaling = rope_scaling_from_gguf(meta, rope_freqs, head_dim, theta)
    emb = tensors.get("tok_embeddings.weight")
    if emb is None:
        raise CheckpointError(f"{path}: tensor token_embd.weight is missing")
    rows = int(emb.shape[-1])  # ne = [dim, vocab]
    vocab = int(meta.get("llama.vocab_size", rows))
    if vocab != rows:
        raise CheckpointError(f"{path}: llama.vocab_size = {vocab} but token_embd.weight has {rows} rows")
    return ModelArgs(
        dim=dim,
        n_layers=int(meta.need("llama.block_count")),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        vocab_size=vocab,
        norm_eps=_short_float(meta.need("llama.attention.layer_norm_rms_epsilon")),
        rope_theta=theta,
        max_seq_len=int(meta.need("llama.context_length")),
        head_dim=head_dim if head_dim != dim // n_heads else None,
        hidden_dim=int(_uniform(meta, "llama.feed_forward_length")),
        rope_scaling=scaling,
    )


def rope_scaling_from_gguf(meta: _Metadata, rope_freqs, head_dim: int, theta: float) -> Optional[dict]:
    """The normalised rotary spec (rope.py) for the file's `llama.rope.scaling.*` keys and its
    rope_freqs.weight tensor, or None for plain RoPE. `refuse_unhonoured` has refused other types."""
    path = meta.path
    kind = meta.get("llama.rope.scaling.type")
    factor = meta.get("llama.rope.scaling.factor")
    # llama.cpp: no type reads as linear; type none never scales; a factor of 0 (or 1) is no scaling.
    linear = kind in (None, "linear") and factor not in (None, 0.0, 1.0)
    if rope_freqs is None:
        return {"rope_type": "linear", "factor": _short_float(factor)} if linear else None
    if linear:
        raise CheckpointError(f"{path}: tensor {ROPE_FREQS} together with llama.rope.scaling.factor = {factor}: "
                              "per-frequency factors on top of linear RoPE scaling are not supported")
    factors = dequantize(rope_freqs).float()
    if tuple(factors.shape) != (head_dim // 2,):
        raise CheckpointError(f"{path}: tensor {ROPE_FREQS} has shape {tuple(factors.shape)}; the head size "
                              f"{head_dim} has {head_dim // 2} rotary frequencies")
    if torch.all(factors == 1):
        return None  # llama.cpp divides every frequency by one
    spec = llama3_spec_for_factors(factors, head_dim, theta, meta.get("llama.rope.scaling.original_context_length"))
    if spec is None:
        shown = ", ".join(f"{x:.6g}" for x in factors.tolist()[:8]) + (", ..." if len(factors) > 8 else "")
        raise CheckpointError(f"{path}: tensor {ROPE_FREQS} holds per-frequency RoPE factors [{shown}] that match "
                              "no Llama-3.1/3.2 rope scaling (factor 8 or 32, low_freq_factor 1, high_freq_factor "
                              f"4, original window {_LLAMA3_WINDOW} or llama.rope.scaling.original_context_length) "
                              f"for theta {theta:g} and head size {head_dim}: other RoPE factors are not supported")
    return spec


def llama3_spec_for_factors(factors: torch.Tensor, head_dim: int, theta: float,
                            original_window: Optional[int] = None) -> Optional[dict]:
    """The llama3 spec whose frequencies are theta's divided by `factors` (as llama.cpp's converter
    computes them, float32 to a few ulps), among Llama-3.1's and 3.2's constants, or None."""
    base = rope.base_frequencies(head_dim, theta)
    windows = [_LLAMA3_WINDOW] + ([int(original_window)] if original_window and original_window != _LLAMA3_WINDOW
                                  else [])
    for window in windows:
        for factor, low, high in _LLAMA3_CONSTANTS:
            spec = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                    "original_max_position_embeddings": window}
            freqs, _ = rope.frequencies(head_dim, theta, spec)
            if torch.allclose(base / freqs, factors, rtol=1e-5, atol=0.0):
                return spec
    return None


def refuse_unhonoured(meta: _Metadata) -> None:
    """Refuse every `llama.*` key that would change the computation and that we do not compute."""
    path = meta.path
    scaling = meta.get("llama.rope.scaling.type")
    factor = meta.get("llama.rope.scaling.factor")
    if scaling not in (None, "none", "linear"):
        raise CheckpointError(f"{path}: llama.rope.scaling.type = {scaling!r} (factor {factor}): only linear RoPE "
                              "scaling (and Llama-3's rope_freqs.weight) is supported in GGUF files")
    if factor is not None and not (isinstance(factor, (int, float)) and factor >= 0):
        raise CheckpointError(f"{path}: llama.rope.scaling.factor = {factor!r} is not a factor")
    for key in meta.keys():
        if not key.startswith("llama."):
            continue
        sub = key[len("llama."):]
        value = meta.get(key)
        if sub in _HONOURED or sub in ("rope.scaling.type", "rope.scaling.factor"):
            continue
        if sub in ("expert_count", "expert_used_count") and not value:
            continue
        if sub == "attention.causal" and value:
            continue
        raise CheckpointError(f"{path}: metadata {key} = {value!r} changes the model in a way we do not compute "
                              "(not supported)")


# Token texts llama.cpp ends generation on (llama-vocab.cpp, special_eog_ids), for the ones that are
# control tokens of the file (an end-of-turn marker rarely has an id of its own in the metadata).
_EOG_TEXTS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
              "<|end_of_text|>", "<EOT>", "</s>")
_CONTROL, _USER_DEFINED, _BYTE, _UNUSED = 3, 4, 6, 5


def eos_token_ids(meta: _Metadata) -> list[int]:
    """The ids that end generation: eos, eot, eom from the metadata, then control tokens whose text
    llama.cpp treats as end of generation (SmolLM2: <|im_end|> and <|endoftext|>)."""
    tokens = meta.get("tokenizer.ggml.tokens") or []
    types = meta.get("tokenizer.ggml.token_type") or []
    ids: list[int] = []
    for key in ("eos", "eot", "eom"):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        if i is not None and 0 <= i < len(tokens) and i not in ids:
            ids.append(int(i))
    for i, (text, kind) in enumerate(zip(tokens, types)):
        if kind == _CONTROL and text in _EOG_TEXTS and i not in ids:
            ids.append(i)
    return ids


# --------------------------------------------------------------------------------------------
# The tokenizer.

# tokenizer.ggml.pre -> how llama.cpp splits text before byte-level BPE (llama-vocab.cpp,
# llm_tokenizer_bpe). "gpt2": GPT-2's regex; "digits": each digit alone, then GPT-2's regex;
# the others a regex of their own.
_GPT2 = "gpt2"
_DIGITS = "digits"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_SPLITS = {
    None: _GPT2, "default": _GPT2, "gpt-2": _GPT2, "gpt2": _GPT2, "mpt": _GPT2, "olmo": _GPT2,
    "smollm": _DIGITS, "starcoder": _DIGITS, "refact": _DIGITS, "command-r": _DIGITS, "codeshell": _DIGITS,
    "exaone": _DIGITS, "minerva-7b": _DIGITS,
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "falcon3": _LLAMA3_SPLIT,
    "pixtral": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT, "stablelm2": _QWEN2_SPLIT, "megrez": _QWEN2_SPLIT,
}
# llama.cpp looks a whole pre-token up in the vocabulary before merging for these (Llama-3's
# tokenizer.json says the same with "ignore_merges": true), and adds BOS unless the file says not to.
_LLAMA3_FAMILY = {"llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral"}


@dataclass
class GGUFTokenizer:
    """A GGUF file's tokenizer: the `tokenizers` object plus what the file says around it."""

    tokenizer: Any  # tokenizers.Tokenizer
    add_bos: bool
    add_eos: bool
    bos_id: Optional[int]
    eos_id: Optional[int]
    eos_ids: list[int]  # every id that ends generation, eos first
    tokens: list[str] = field(repr=False, default_factory=list)
    chat_template: Optional[str] = None

    def token(self, i: Optional[int]) -> Optional[str]:
        return self.tokens[i] if i is not None and 0 <= i < len(self.tokens) else None

    def config(self) -> dict:
        """tokenizer_config.json for a checkpoint written from this file."""
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": self.add_bos,
               "add_eos_token": self.add_eos, "bos_token": self.token(self.bos_id),
               "eos_token": self.token(self.eos_id), "clean_up_tokenization_spaces": False}
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        return {k: v for k, v in cfg.items() if v is not None}


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies are spelled in."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def gguf_tokenizer(meta: _Metadata) -> GGUFTokenizer:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    path = meta.path
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if kind is None or not tokens:
        raise CheckpointError(f"{path}: no tokenizer in the metadata (tokenizer.ggml.model / tokens); "
                              "pass --tokenizer_path")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    pre = meta.get("tokenizer.ggml.pre")
    if kind == "gpt2":
        split = _PRE_SPLITS.get(pre, "unknown") if pre is not None else _GPT2
        if split == "unknown":
            raise CheckpointError(f"{path}: tokenizer.ggml.pre = {pre!r}: a pre-tokenizer we do not know; supported: "
                                  + ", ".join(sorted(k for k in _PRE_SPLITS if k)))
        merges = meta.get("tokenizer.ggml.merges")
        if not merges:
            raise CheckpointError(f"{path}: tokenizer.ggml.merges is missing (a byte-level BPE needs its merges)")
        spelling = _byte_alphabet()
        alphabet = set(spelling.values())
        # Tokens outside the byte alphabet (added tokens written as plain text) are respelled byte by
        # byte, as transformers does, so the BPE model can hold them.
        vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
                 for i, t in enumerate(tokens)}
        pairs = []
        for m in merges:
            cut = m.find(" ", 1)  # llama.cpp's rule: the separating space is not the first character
            pairs.append((m[:cut], m[cut + 1:]))
        tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, byte_fallback=False, fuse_unk=False,
                                   ignore_merges=pre in _LLAMA3_FAMILY))
        if split == _GPT2:
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        elif split == _DIGITS:
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
        else:
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        in_alphabet = lambda t: set(t) <= alphabet  # noqa: E731
        default_bos = pre in _LLAMA3_FAMILY
    elif kind == "llama":
        scores = meta.get("tokenizer.ggml.scores")
        if scores is None:
            raise CheckpointError(f"{path}: tokenizer.ggml.scores is missing (a SentencePiece vocabulary needs them)")
        vocab = {t: i for i, t in enumerate(tokens)}
        merges = meta.get("tokenizer.ggml.merges")
        pairs = ([tuple(m.split(" ", 1)) for m in merges] if merges else _merges_from_scores(tokens, scores, vocab))
        unk = meta.get("tokenizer.ggml.unknown_token_id", 0)
        tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, byte_fallback=True, fuse_unk=True,
                                   unk_token=tokens[unk] if unk is not None and 0 <= unk < len(tokens) else None))
        prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        # SentencePiece and llama.cpp put "\u2581" before the text even when it starts with a space;
        # a Metaspace pre-tokenizer (transformers' choice) does not, and "  a" would lose a space.
        steps = [normalizers.Prepend("\u2581")] if prefix else []
        tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "\u2581")])
        steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        if prefix:
            steps.append(decoders.Strip(content=" ", left=1, right=0))
        tok.decoder = decoders.Sequence(steps)
        in_alphabet = lambda t: True  # noqa: E731
        default_bos = True  # llama.cpp's default for SentencePiece vocabularies
        if meta.get("tokenizer.ggml.remove_extra_whitespaces"):
            raise CheckpointError(f"{path}: tokenizer.ggml.remove_extra_whitespaces = True is not supported")
    else:
        raise CheckpointError(f"{path}: tokenizer.ggml.model = {kind!r}; supported: 'gpt2' (byte-level BPE) "
                              "and 'llama' (SentencePiece)")
    # Control tokens (<|im_start|>, <s>) stay whole as special tokens; user-defined ones (<think>)
    # as plain added tokens, which llama.cpp also always matches whole.
    control = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types)
               if k == _CONTROL and in_alphabet(t)]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types)
            if k == _USER_DEFINED and t in vocab]
    if control:
        tok.add_special_tokens(control)
    if user:
        tok.add_tokens(user)
    bos = meta.get("tokenizer.ggml.bos_token_id")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    if kind == "llama":
        bos = 1 if bos is None else bos
        eos = 2 if eos is None else eos
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", default_bos))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    if add_bos and (bos is None or not 0 <= bos < len(tokens)):
        raise CheckpointError(f"{path}: tokenizer.ggml.add_bos_token is true but tokenizer.ggml.bos_token_id is "
                              f"{bos!r}")
    eog = eos_token_ids(meta)
    if eos is not None and 0 <= eos < len(tokens) and eos not in eog:
        eog.insert(0, eos)
    return GGUFTokenizer(tok, add_bos, add_eos, bos, eos, eog, list(tokens), meta.get("tokenizer.chat_template"))


def _merges_from_scores(tokens: list[str], scores: list[float], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """SentencePiece keeps no merge list: a piece is formed from any two pieces that spell it, the
    best-scored piece first. Ties keep the order transformers gives (so ids match its GGUF tokenizer):
    within a piece by the halves' ids, then by score, left length, right length, all descending."""
    merges = []
    for piece, score in zip(tokens, scores):
        local = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        local.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        merges.extend((left, right, score) for left, right in local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def check_shapes(reader: GGUFReader) -> None:
    """Every tensor the model needs is in the file with its shape (before any weight is read)."""
    want = expected_shapes(reader.args)
    for name, shape in want.items():
        if name == "output.weight" and reader.tied:
            continue
        t = reader._tensors.get(name)
        if t is None:
            raise CheckpointError(f"{reader.path}: tensor for {name} is missing")
        got = tuple(int(n) for n in reversed(t.shape))
        if got != shape:
            raise CheckpointError(f"{reader.path}: {t.name} has shape {got} but the metadata implies {shape}")


def write_tokenizer(reader: GGUFReader, out_dir, *, layout: str) -> None:
    """The file's tokenizer as HF files beside a converted checkpoint: tokenizer.json (with BOS in
    its post_processor where the file adds BOS, as Llama-3's is) and tokenizer_config.json (the
    BOS rule stated outright); for the HF layout, the BOS/EOS ids in config.json and
    generation_config.json, so that every end-of-generation id survives the conversion."""
    import json

    from tokenizers import processors

    out = Path(out_dir)
    spec = reader.tokenizer()
    tk = spec.tokenizer
    if spec.add_bos:
        bos = spec.token(spec.bos_id)
        tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                          special_tokens=[(bos, spec.bos_id)])
    tk.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(spec.config(), indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
    if layout == "hf":
        ids = {"bos_token_id": spec.bos_id,
               "eos_token_id": spec.eos_ids if len(spec.eos_ids) > 1 else spec.eos_id}
        config = json.loads((out / "config.json").read_text())
        config.update(ids)
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (out / "generation_config.json").write_text(json.dumps(ids, indent=2) + "\n")
