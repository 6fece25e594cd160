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

    The anchor is a whole (non-byte) piece already emitted: the text up to it is final, and the
    ids from it on decode to the anchor's own text followed by everything after it. It moves up
    every `ANCHOR_EVERY` tokens, so a step costs the same at token 1000 as at token 10.
    """

    ANCHOR_EVERY = 32

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.emitted = ""
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
        return self.emitted[: self._base] + self.tok.decode(self.ids[self._anchor :])[self._skip :]

    def _move_anchor(self) -> None:
        last = len(self.ids) - 1
        token = self.ids[last]
        sp = self.tok.sp
        if not 0 <= token < self.tok.n_words or sp.is_byte(token) or sp.is_control(token) or sp.is_unknown(token):
            return  # try again at the next token
        text = self.tok.decode([token])
        if not text.strip():
            # SentencePiece strips every leading space of a decoded sequence: a tail starting with
            # a space-only piece would lose the spaces after it too.
            return
        self._anchor, self._base, self._skip = last, len(self.emitted), len(text)

    def _advance(self, text: str) -> str:
        if not text.startswith(self.emitted):
            # Cannot happen for SentencePiece (decoding is prefix-stable once no bytes are
            # pending); be safe rather than emit garbage.
            return ""
        delta = text[len(self.emitted):]
        self.emitted = text
        return delta
