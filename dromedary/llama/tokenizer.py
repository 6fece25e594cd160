"""The LLaMA family's tokenizers behind one interface, and incremental decoding for streaming text.

Three backends, chosen by what the file holds (`load_tokenizer`), never by its name:
- SentencePiece `tokenizer.model` (LLaMA-1/2, Mistral);
- tiktoken BPE `tokenizer.model`, Meta's Llama-3/3.1 layout: lines of base64 token + rank, Meta's
  pre-tokenizer pattern, and 256 special tokens numbered after the base ranks;
- HF `tokenizer.json` through the `tokenizers` library (byte-level BPE, added tokens), with the
  BOS/EOS of its `tokenizer_config.json`; GGUF vocabularies are built into one of these elsewhere
  and wrapped with `HFTokenizer.from_tokenizer`.

What every backend does the same way:
- `encode(text)` treats all of `text` as text: a user who types `<|eot_id|>` or `</s>` gets those
  characters, never the control token. Control tokens (BOS, chat formats) are added as ids.
- `encode(text, bos=None)` adds BOS where the tokenizer's own configuration adds it (`add_bos`).
- `decode(ids)` drops control/special tokens and ids outside the vocabulary.
- `stop_ids` holds EOS and every end-of-turn token the vocabulary has; generation ends on any.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used as it is; the message names the file."""


# Added tokens that end a turn or a document, by the names the families give them. Only those a
# vocabulary really has (as special tokens) become stop ids.
END_OF_TURN_NAMES = (
    "</s>", "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>",  # LLaMA-1/2, Mistral; Llama-3
    "<|im_end|>", "<|endoftext|>",  # ChatML (SmolLM, Qwen), GPT-2 style
    "<|end|>", "<end_of_turn>", "<eos>",  # Phi-3, Gemma
)


class _Factory(type):
    """`Tokenizer(path)` is `load_tokenizer(path)`: callers name the interface, the file picks the
    backend. Subclasses construct as usual."""

    def __call__(cls, *args, **kwargs):
        if cls is Tokenizer:
            return load_tokenizer(*args, **kwargs)
        return super().__call__(*args, **kwargs)


class Tokenizer(metaclass=_Factory):
    """The interface every caller uses. `n_words` counts every id that decodes (added tokens past
    the base vocabulary included); `bos_id` is None where the vocabulary has none."""

    path: Path
    n_words: int
    bos_id: Optional[int]
    eos_id: int
    stop_ids: set[int]
    add_bos: bool

    def encode(self, text: str, bos: Optional[bool] = None, eos: bool = False) -> list[int]:
        """Token ids of `text`, all of it read as text. `bos`: None adds BOS where the tokenizer's
        own configuration does; True/False force it (True adds nothing where there is no BOS)."""
        ids = self._encode_text(text)
        if (self.add_bos if bos is None else bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids + [self.eos_id] if eos else ids

    def encode_tail(self, text: str, max_len: int) -> list[int]:
        """`encode(text)` cut to max_len ids where longer: BOS (where added) and the text's last
        tokens. For prompts, whose end (the request, the reply being judged, the cue) matters
        more than their start (the system prompt, the principle list)."""
        ids = self.encode(text)
        if len(ids) <= max_len:
            return ids
        head = 1 if self.add_bos and self.bos_id is not None else 0
        keep = max(max_len - head, 0)
        return ids[:head] + ids[len(ids) - keep :]

    def decode(self, ids: Sequence[int]) -> str:
        return self._decode_ids([i for i in ids if 0 <= i < self.n_words])

    def decode_after(self, context: Sequence[int], ids: Sequence[int]) -> str:
        """The text `ids` add after `context` (e.g. a prompt's last token). Unlike `decode(ids)`,
        it keeps the leading space SentencePiece strips from a sequence's first piece, and a
        character whose bytes began in the context."""
        head = self.decode(context)
        whole = self.decode(list(context) + list(ids))
        # Falls back when the context's own text changed with what followed (half a character).
        return whole[len(head) :] if whole.startswith(head) else self.decode(ids)

    def is_special(self, token: int) -> bool:
        """A control token: decodes to nothing."""
        raise NotImplementedError

    def is_stable(self, token: int) -> bool:
        """Whether a decoded sequence that starts with `token` always starts with `decode([token])`,
        and the text after it does not depend on the tokens before it: then streaming can restart
        decoding there (StreamDecoder's anchor). Not so for the bytes of a split character, for
        control tokens, or for SentencePiece's space-only pieces (a sequence's leading space is
        stripped). A token whose text alone is whole, non-blank characters is."""
        if not 0 <= token < self.n_words or self.is_special(token):
            return False
        text = self.decode([token])
        return bool(text.strip()) and "\ufffd" not in text

    def _encode_text(self, text: str) -> list[int]:
        raise NotImplementedError

    def _decode_ids(self, ids: list[int]) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({str(self.path)!r}, n_words={self.n_words}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, stop_ids={sorted(self.stop_ids)}, add_bos={self.add_bos})")


# ---------------------------------------------------------------------------------------------
# Finding the backend
# ---------------------------------------------------------------------------------------------

# A tiktoken BPE file: "<base64 bytes> <rank>" per line.
_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} \d+\r?\n")


def load_tokenizer(path) -> Tokenizer:
    """The tokenizer in `path`: a file, or a checkpoint directory (its tokenizer.json first, then
    its tokenizer.model). The backend is read from the file's content."""
    path = Path(path).expanduser()
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).is_file():
                return load_tokenizer(path / name)
        found = sorted(p.name for p in path.iterdir())[:12]
        raise FileNotFoundError(f"{path}: no tokenizer.json or tokenizer.model in this directory "
                                f"(it has: {', '.join(found) or 'nothing'}); pass --tokenizer_path")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: tokenizer file not found (pass --tokenizer_path)")
    with path.open("rb") as f:
        head = f.read(4096)
    if head.lstrip()[:1] == b"{":
        return HFTokenizer(path)
    if _TIKTOKEN_LINE.match(head):
        return TiktokenTokenizer(path)
    if head[:4] == b"GGUF":
        raise TokenizerError(f"{path}: a GGUF file; its tokenizer is read with the model (--ckpt_dir {path}), "
                             "not as --tokenizer_path")
    if head[:1] == b"\x0a":  # a protobuf's first field: SentencePiece's pieces
        return SentencePieceTokenizer(path)
    raise TokenizerError(f"{path}: not a tokenizer this toolkit reads (SentencePiece or tiktoken tokenizer.model, "
                         f"HF tokenizer.json); it starts with {head[:24]!r}")


def _json_file(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TokenizerError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _hf_config(folder: Path) -> dict:
    """tokenizer_config.json over special_tokens_map.json (older repos keep BOS/EOS only there)."""
    return {**_json_file(folder / "special_tokens_map.json"), **_json_file(folder / "tokenizer_config.json")}


def _token_name(value) -> Optional[str]:
    # HF configs spell a token as a string or as an AddedToken dict {"content": ...}.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


# ---------------------------------------------------------------------------------------------
# SentencePiece
# ---------------------------------------------------------------------------------------------


class SentencePieceTokenizer(Tokenizer):
    """LLaMA-1/2 and Mistral. SentencePiece never matches control pieces (`<s>`, `</s>`) in text,
    so typed special-token text stays text. BOS is added (Meta's rule) unless a
    tokenizer_config.json beside the file says `add_bos_token: false`."""

    def __init__(self, path):
        from sentencepiece import SentencePieceProcessor

        self.path = Path(path)
        try:
            self.sp = SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as err:
            raise TokenizerError(f"{self.path}: not a SentencePiece model ({err})") from None
        self.n_words = self.sp.vocab_size()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id()
        if self.eos_id < 0:
            raise TokenizerError(f"{self.path}: the SentencePiece model has no EOS piece")
        self.pad_id = self.sp.pad_id()  # -1 in LLaMA's tokenizer
        self.stop_ids = {self.eos_id}
        self.add_bos = bool(_hf_config(self.path.parent).get("add_bos_token", True)) and self.bos_id is not None

    def is_special(self, token: int) -> bool:
        return self.sp.is_control(token)

    def is_stable(self, token: int) -> bool:
        if not 0 <= token < self.n_words or self.sp.is_byte(token) or self.sp.is_unknown(token):
            return False
        return super().is_stable(token)

    def _encode_text(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def _decode_ids(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


# ---------------------------------------------------------------------------------------------
# tiktoken (Meta's Llama-3 tokenizer.model)
# ---------------------------------------------------------------------------------------------

# Meta's pre-tokenizer (llama-models, models/llama3/tokenizer.py).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_NUM_SPECIAL = 256


def llama3_special_tokens() -> list[str]:
    """Meta's 256 special tokens in id order (the Llama-3.1 names; Llama-3.0 called ids 4, 5, 8,
    10, 11 reserved tokens, and the ids of BOS, EOS, the headers and eot are the same)."""
    named = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
             "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
             "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
             "<|python_tag|>", "<|image|>"]
    return named + [f"<|reserved_special_token_{2 + i}|>" for i in range(LLAMA3_NUM_SPECIAL - len(named))]


# Meta cuts text into windows tiktoken handles without a panic: 400k characters, and no run of
# more than 25k whitespace or non-whitespace characters (openai/tiktoken#195).
_TIKTOKEN_WINDOW = 400_000
_TIKTOKEN_MAX_RUN = 25_000


def _tiktoken_chunks(text: str) -> Iterator[str]:
    for start in range(0, len(text), _TIKTOKEN_WINDOW):
        window = text[start : start + _TIKTOKEN_WINDOW]
        cut, run, space = 0, 0, window[:1].isspace()
        for i, ch in enumerate(window):
            if ch.isspace() != space:
                run, space = 1, not space
            else:
                run += 1
                if run > _TIKTOKEN_MAX_RUN:
                    yield window[cut:i]
                    cut, run = i, 1
        yield window[cut:]


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """token bytes -> rank, checked: every line "<base64> <rank>", ranks 0..N-1 each once."""
    ranks: dict[bytes, int] = {}
    with path.open("rb") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
                if len(parts) != 2:
                    raise ValueError
            except (ValueError, IndexError):
                raise TokenizerError(f"{path}:{n}: not a tiktoken line '<base64 token> <rank>': {line[:60]!r}") from None
            if token in ranks:
                raise TokenizerError(f"{path}:{n}: token {token!r} appears twice")
            ranks[token] = rank
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{path}: ranks are not 0..{len(ranks) - 1}, each once")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerError(f"{path}: {len(missing)} single bytes have no token (first: {missing[0]:#04x}); "
                             "a byte-level BPE needs all 256")
    return ranks


class TiktokenTokenizer(Tokenizer):
    """Meta's Llama-3/3.1/3.2 `tokenizer.model`: the base ranks of the file, then Meta's 256
    special tokens (128000 + 256 = 128256 for the real file). BOS is always added (Meta's
    generation and chat formats begin with it); EOS, `<|eom_id|>` and `<|eot_id|>` stop."""

    def __init__(self, path):
        import tiktoken

        self.path = Path(path)
        ranks = read_tiktoken_ranks(self.path)
        self.n_base = len(ranks)
        self.special_tokens = {name: self.n_base + i for i, name in enumerate(llama3_special_tokens())}
        self._enc = tiktoken.Encoding(name=self.path.name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                      special_tokens=self.special_tokens)
        self.n_words = self.n_base + len(self.special_tokens)
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.stop_ids = {self.eos_id, self.special_tokens["<|eom_id|>"], self.special_tokens["<|eot_id|>"]}
        self.add_bos = True

    def is_special(self, token: int) -> bool:
        return token >= self.n_base

    def _encode_text(self, text: str) -> list[int]:
        # encode_ordinary: special-token text is text (disallowed_special=(), nothing allowed).
        return [i for chunk in _tiktoken_chunks(text) for i in self._enc.encode_ordinary(chunk)]

    def _decode_ids(self, ids: list[int]) -> str:
        return self._enc.decode_bytes([i for i in ids if i < self.n_base]).decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------------------------
# HF tokenizer.json
# ---------------------------------------------------------------------------------------------


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer`: from a tokenizer.json (BOS/EOS from the tokenizer_config.json
    beside it), or built elsewhere (GGUF) and wrapped with `from_tokenizer`.

    BOS: where the tokenizer.json's post_processor puts one first (Llama-3's template puts
    `<|begin_of_text|>` there), as transformers 5 encodes, even against an `add_bos_token: false`
    (llama.cpp's converter would drop it; transformers keeps it); else where tokenizer_config.json
    says `add_bos_token: true` (LlamaTokenizer's default, llama.cpp's reading; transformers 5's
    generic backend ignores it). SmolLM2 has neither and gets no BOS."""

    def __init__(self, path):
        import tokenizers

        path = Path(path)
        try:
            tk = tokenizers.Tokenizer.from_file(str(path))
        except Exception as err:  # the Rust side raises a bare Exception for every parse error
            raise TokenizerError(f"{path}: not a tokenizers tokenizer.json ({err})") from None
        config = _hf_config(path.parent)
        tk.no_padding()
        tk.no_truncation()
        prefix = _post_processor_prefix(tk, path)
        bos_name = _token_name(config.get("bos_token"))
        bos_id = tk.token_to_id(bos_name) if bos_name else None
        if prefix:  # the template's BOS, whatever add_bos_token says (as transformers 5 encodes)
            add_bos, bos_id = True, prefix[0]
        else:  # LlamaTokenizer's (and llama.cpp's) reading of the flag
            add_bos = bool(config.get("add_bos_token", False)) and bos_id is not None
        eos_name = _token_name(config.get("eos_token"))
        if eos_name is not None and tk.token_to_id(eos_name) is None:
            raise TokenizerError(f"{path.parent / 'tokenizer_config.json'}: eos_token {eos_name!r} is not in {path}")
        eos_id = tk.token_to_id(eos_name) if eos_name else _first_end_of_turn(tk)
        if eos_id is None:
            raise TokenizerError(f"{path}: no EOS token: tokenizer_config.json beside it names none and the "
                                 f"vocabulary has none of {', '.join(END_OF_TURN_NAMES)}")
        self._setup(tk, bos_id=bos_id, eos_id=eos_id, stop_ids=(), add_bos=add_bos, path=path)

    @classmethod
    def from_tokenizer(cls, tk, *, bos_id: Optional[int], eos_id: int, stop_ids: Iterable[int] = (),
                       add_bos: bool, path) -> "HFTokenizer":
        """Wrap a `tokenizers.Tokenizer` built elsewhere (e.g. from a GGUF vocabulary). It is
        configured in place (no padding or truncation, special-token text encoded as text).
        `stop_ids` joins EOS and the end-of-turn tokens found by name."""
        self = cls.__new__(cls)
        self._setup(tk, bos_id=bos_id, eos_id=eos_id, stop_ids=stop_ids, add_bos=add_bos, path=Path(path))
        return self

    def _setup(self, tk, *, bos_id, eos_id, stop_ids, add_bos, path: Path) -> None:
        tk.no_padding()
        tk.no_truncation()
        tk.encode_special_tokens = True  # typed "<|im_start|>" is text, not the control token
        self._tk = tk
        self.path = path
        vocab = tk.get_vocab(with_added_tokens=True)
        self.n_words = max(vocab.values()) + 1
        added = tk.get_added_tokens_decoder()  # id -> AddedToken
        self._special = {i for i, t in added.items() if t.special}
        if add_bos and bos_id is None:
            raise TokenizerError(f"{path}: add_bos is set but the tokenizer has no BOS token")
        self.bos_id, self.eos_id, self.add_bos = bos_id, eos_id, bool(add_bos)
        ends = {i for i, t in added.items() if t.content in END_OF_TURN_NAMES and t.special}
        self.stop_ids = {eos_id, *stop_ids, *ends}

    def is_special(self, token: int) -> bool:
        return token in self._special

    def _encode_text(self, text: str) -> list[int]:
        return self._tk.encode(text, add_special_tokens=False).ids

    def _decode_ids(self, ids: list[int]) -> str:
        return self._tk.decode(ids, skip_special_tokens=True)


def _post_processor_prefix(tk, path: Path) -> list[int]:
    """The ids the tokenizer.json's post_processor puts before a single text ([BOS] or [])."""
    plain = tk.encode("a", add_special_tokens=False).ids
    full = tk.encode("a", add_special_tokens=True).ids
    start = next((k for k in range(len(full) - len(plain) + 1) if full[k : k + len(plain)] == plain), None)
    if start is None:
        raise TokenizerError(f"{path}: its post_processor rewrites the text's own tokens; not supported")
    if start > 1:
        names = [tk.id_to_token(i) for i in full[:start]]
        raise TokenizerError(f"{path}: its post_processor puts {start} tokens {names} before the text; "
                             "only a single BOS is supported")
    return full[:start]


def _first_end_of_turn(tk) -> Optional[int]:
    for name in END_OF_TURN_NAMES:
        token = tk.token_to_id(name)
        if token is not None:
            return token
    return None


# ---------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------


class StreamDecoder:
    """Turns a growing list of token ids into text deltas that concatenate to `decode(ids)`.

    Decoding token by token is wrong twice over: SentencePiece drops the leading space of the
    first piece of a sequence, and the bytes of one character may come in several tokens
    (SentencePiece's byte-fallback pieces, a byte-level BPE's partial characters). So each step
    decodes the ids since an anchor and emits only what is new, holding back a trailing U+FFFD that
    may still become a character when the next byte arrives.

    `context`: the token(s) before the first fed one, e.g. a prompt's last token; the text is then
    what the ids add after the context, so a completion keeps its leading space.

    The anchor is a stable token (`Tokenizer.is_stable`) already emitted: the text up to it is
    final, and the ids from it on decode to the anchor's own text followed by everything after it.
    It moves up every `ANCHOR_EVERY` tokens, so a step costs the same at token 1000 as at token 10.
    """

    ANCHOR_EVERY = 32

    def __init__(self, tokenizer: Tokenizer, context: Sequence[int] = ()):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.emitted = ""
        self._context = list(context)  # dropped once the anchor moves past it
        self._anchor = 0  # index in ids where the re-decoded tail starts
        self._base = 0  # characters of `emitted` up to and including the anchor piece
        self._skip = 0  # characters the anchor piece itself decodes to, at the tail's start

    def feed(self, token: int) -> str:
        self.ids.append(token)
        text = self._decode()
        if text.endswith("\ufffd"):
            return ""
        delta = self._advance(text)
        if self.emitted == text and len(self.ids) - self._anchor > self.ANCHOR_EVERY:
            self._move_anchor()
        return delta

    def flush(self) -> str:
        return self._advance(self._decode())

    @property
    def text(self) -> str:
        return self.emitted

    def _decode(self) -> str:
        if self._context:
            return self.tok.decode_after(self._context, self.ids)
        return self.emitted[: self._base] + self.tok.decode(self.ids[self._anchor :])[self._skip :]

    def _move_anchor(self) -> None:
        last = len(self.ids) - 1
        token = self.ids[last]
        if not self.tok.is_stable(token):
            return  # try again at the next token
        self._anchor, self._base, self._skip = last, len(self.emitted), len(self.tok.decode([token]))
        self._context = []

    def _advance(self, text: str) -> str:
        if not text.startswith(self.emitted):
            # Cannot happen for these backends (decoding is prefix-stable once no bytes are
            # pending); be safe rather than emit garbage.
            return ""
        delta = text[len(self.emitted):]
        self.emitted = text
        return delta
