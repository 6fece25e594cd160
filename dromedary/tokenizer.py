"""LLaMA's SentencePiece tokenizer, and incremental decoding for streaming text."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from sentencepiece import SentencePieceProcessor


class Tokenizer:
    def __init__(self, model_path):
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: tokenizer model not found (pass --tokenizer_path)")
        self.path = path
        self.sp = SentencePieceProcessor(model_file=str(path))
        self.n_words: int = self.sp.vocab_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.pad_id: int = self.sp.pad_id()  # -1 in LLaMA's tokenizer

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([i for i in ids if 0 <= i < self.n_words])


class StreamDecoder:
    """Turns a growing list of token ids into text deltas that concatenate to `decode(ids)`.

    Decoding piece by piece is wrong twice over: SentencePiece drops the leading space of the
    first piece of a sequence, and byte-fallback pieces (<0xE2><0x82><0xAC>) only form a character
    together. So each step decodes the ids since an anchor and emits only what is new, holding back
    a trailing U+FFFD that may still become a character when the next byte arrives.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def feed(self, token: int) -> str:
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        return self._advance(text)

    def flush(self) -> str:
        return self._advance(self.tok.decode(self.ids))

    @property
    def text(self) -> str:
        return self.emitted

    def _advance(self, text: str) -> str:
        if not text.startswith(self.emitted):
            # Cannot happen for SentencePiece (decoding is prefix-stable once no bytes are
            # pending); be safe rather than emit garbage.
            return ""
        delta = text[len(self.emitted):]
        self.emitted = text
        return delta
