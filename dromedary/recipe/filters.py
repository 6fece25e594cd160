"""Text filters for generated and imported prompts, and a ROUGE-L index for near-duplicates.

Pure functions over strings plus one class, `RougeLIndex`, that keeps texts tokenised once and
scores a new text against all of them in a few vectorised passes. No model, no torch, no I/O:
generate-prompts uses it to drop near-copies, and curate can use it to dedupe answers.

ROUGE-L here is the F-measure of rouge-score's `rougeL` (beta = 1): 2 * LCS / (len(a) + len(b))
over lowercase word tokens. The tokens are `\\w+` runs, so unlike rouge-score (which keeps only
[a-z0-9]) a non-English text is not scored as empty.
"""

from __future__ import annotations

import functools
import re
import string
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

# Words that ask for something a text-only model cannot see, make or do (after Self-Instruct and
# Alpaca): an instruction that needs them gets answers that pretend, which we would then train on.
UNACTIONABLE_WORDS: tuple[str, ...] = (
    "image", "images", "graph", "graphs", "picture", "pictures", "photo", "photos", "file", "files",
    "map", "maps", "draw", "plot", "go to", "video", "videos", "audio", "music", "song", "flowchart",
    "diagram", "diagrams", "sketch", "screenshot", "attached", "link", "url", "website",
)


# --------------------------------------------------------------------------- cleaning and keys

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b\ufeff]")
_TRAILING_SPACE = re.compile(r"[ \t\u00a0]+\n")
_BLANK_LINES = re.compile(r"\n{3,}")
_INNER_SPACE = re.compile(r"(?<=\S)[ \t\u00a0]{2,}")


def clean_text(text: str) -> str:
    """Strip, drop control and zero-width characters, unify line endings, collapse runs of
    spaces inside lines and runs of blank lines. Line breaks and indentation stay: user prompts
    carry code and lists."""
    text = _CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = _INNER_SPACE.sub(" ", _TRAILING_SPACE.sub("\n", text + "\n"))
    return _BLANK_LINES.sub("\n\n", text).strip()


def one_line(text: str) -> str:
    """All whitespace runs collapsed to one space."""
    return " ".join(text.split())


def dedupe_key(text: str) -> str:
    """The normalised form two texts share when they are the same prompt: Unicode NFKC,
    casefolded, whitespace collapsed, trailing punctuation dropped."""
    return one_line(unicodedata.normalize("NFKC", text).casefold()).rstrip(string.punctuation + " ")


def word_count(text: str) -> int:
    return len(text.split())


# --------------------------------------------------------------------------- instruction filters

@dataclass(frozen=True)
class InstructionFilter:
    """Why a generated instruction is unusable, or None. Each check says why it exists."""

    min_words: int = 4
    max_words: int = 150
    blocked_words: tuple[str, ...] = UNACTIONABLE_WORDS

    def __post_init__(self) -> None:
        if not 1 <= self.min_words <= self.max_words:
            raise ValueError(f"need 1 <= min_words <= max_words, got {self.min_words} and {self.max_words}")

    def reject_reason(self, instruction: str) -> str | None:
        text = instruction.strip()
        n = word_count(text)
        # Fragments ("Write a poem") are too vague to answer well; walls of text are usually the
        # model rambling past the end of the task.
        if n < self.min_words:
            return "too_short"
        if n > self.max_words:
            return "too_long"
        # A list marker, quote or bracket left over means the parse caught the model mid-format.
        if text[0] in string.punctuation:
            return "punctuation_start"
        # Non-ASCII at the start is almost always debris (stray bytes, emoji, a cut token) in an
        # English task list.
        if not text[0].isascii():
            return "non_ascii_start"
        # Images, files, audio, drawing: a text-only model can only pretend to see or make them.
        if hit := blocked_word(text, self.blocked_words):
            return f"unactionable:{hit}"
        return None


def blocked_word(text: str, words: Sequence[str] = UNACTIONABLE_WORDS) -> str | None:
    """The first of `words` found as a whole word (case-insensitive) in `text`, or None."""
    match = _word_pattern(tuple(words)).search(text) if words else None
    return one_line(match.group(0)).lower() if match else None


@functools.lru_cache(maxsize=16)
def _word_pattern(words: tuple[str, ...]) -> re.Pattern[str]:
    # One pass over the text for all the words; "go to" matches across any whitespace.
    alternatives = "|".join(r"\s+".join(map(re.escape, w.split())) for w in words)
    return re.compile(rf"\b(?:{alternatives})\b", re.IGNORECASE)


# --------------------------------------------------------------------------- ROUGE-L

_WORD = re.compile(r"\w+")


def rouge_tokens(text: str) -> list[str]:
    """Lowercase word tokens, as ROUGE-L compares them."""
    return _WORD.findall(text.lower())


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence (plain dynamic programming, O(len(a) * len(b)))."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(a: str | Sequence[str], b: str | Sequence[str]) -> float:
    """ROUGE-L F-measure of two texts (or token lists); 0.0 when either is empty."""
    ta = rouge_tokens(a) if isinstance(a, str) else list(a)
    tb = rouge_tokens(b) if isinstance(b, str) else list(b)
    if not ta or not tb:
        return 0.0
    return 2 * lcs_length(ta, tb) / (len(ta) + len(tb))


class RougeLIndex:
    """Texts kept so far, each tokenised once, scored against a new text all at once.

    The new text's tokens become bit masks (Hyyro's bit-parallel LCS): for each kept text the
    LCS takes one pass over its tokens with a few integer operations, and that pass runs over all
    kept texts of a length bucket together in numpy. Kept texts are grouped by token count so a
    long one does not make every short one run long.
    """

    _BUCKET = 16  # kept texts are grouped by ceil(tokens / 16) * 16

    def __init__(self, texts: Iterable[str] = ()):
        self._vocab: dict[str, int] = {}
        self.texts: list[str] = []
        self._lengths: list[int] = []
        # bucket width -> (indices into self.texts, token-id matrix padded with 0), grown by doubling
        self._buckets: dict[int, list] = {}
        for text in texts:
            self.add(text)

    def __len__(self) -> int:
        return len(self.texts)

    def add(self, text: str) -> None:
        ids = [self._vocab.setdefault(t, len(self._vocab) + 1) for t in rouge_tokens(text)]  # 0 = padding
        index = len(self.texts)
        self.texts.append(text)
        self._lengths.append(len(ids))
        if not ids:
            return  # scores 0 against everything: never stored in a bucket
        width = -(-len(ids) // self._BUCKET) * self._BUCKET
        bucket = self._buckets.setdefault(width, [np.zeros(0, np.int64), np.zeros((0, width), np.int32), 0])
        members, matrix, size = bucket
        if size == len(members):  # grow both arrays by doubling
            grow = max(8, size)
            members = np.concatenate([members, np.zeros(grow, np.int64)])
            matrix = np.concatenate([matrix, np.zeros((grow, width), np.int32)])
        members[size] = index
        matrix[size, : len(ids)] = ids
        self._buckets[width] = [members, matrix, size + 1]

    def scores(self, text: str) -> np.ndarray:
        """ROUGE-L F-measure of `text` against every kept text, in the order they were added."""
        out = np.zeros(len(self.texts))
        tokens = rouge_tokens(text)
        if not tokens or not self.texts:
            return out
        # Each distinct token of the new text -> the bit mask of its positions, as W uint64 words.
        words = -(-len(tokens) // 64)
        distinct: dict[int, int] = {}
        masks = [np.zeros(words, np.uint64)]  # row 0: tokens the new text does not have
        for position, token in enumerate(tokens):
            vid = self._vocab.get(token)
            if vid is None:
                continue
            row = distinct.setdefault(vid, len(masks))
            if row == len(masks):
                masks.append(np.zeros(words, np.uint64))
            masks[row][position // 64] |= np.uint64(1) << np.uint64(position % 64)
        if not distinct:
            return out
        table = np.stack(masks)  # (D + 1, W)
        remap = np.zeros(len(self._vocab) + 1, np.int32)
        remap[list(distinct)] = np.arange(1, len(masks), dtype=np.int32)
        valid = (np.uint64(1) << np.uint64(len(tokens) % 64)) - np.uint64(1) if len(tokens) % 64 else ~np.uint64(0)
        lengths = np.asarray(self._lengths, dtype=np.float64)
        for members, matrix, size in self._buckets.values():
            if not size:
                continue
            rows = table[remap[matrix[:size]]]  # (N, width, W): each kept token's match mask
            v = np.full((size, words), ~np.uint64(0), dtype=np.uint64)
            for j in range(matrix.shape[1]):
                u = v & rows[:, j]
                v = _add(v, u) | (v & ~u)
            v[:, -1] &= valid
            lcs = len(tokens) - _popcount(v)
            idx = members[:size]
            out[idx] = 2 * lcs / (len(tokens) + lengths[idx])
        return out

    def max_score(self, text: str) -> tuple[float, int | None]:
        """(best score, index of the most similar kept text); (0.0, None) when nothing is kept."""
        s = self.scores(text)
        if not len(s):
            return 0.0, None
        best = int(s.argmax())
        return float(s[best]), best


def _add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, W) little-endian multi-word unsigned addition; the carry out of the top word is lost."""
    out = np.empty_like(a)
    carry = np.zeros(a.shape[0], np.uint64)
    for w in range(a.shape[1]):
        s = a[:, w] + b[:, w]
        c1 = s < a[:, w]
        out[:, w] = s + carry
        carry = (c1 | (out[:, w] < s)).astype(np.uint64)
    return out


def _popcount(v: np.ndarray) -> np.ndarray:
    """Set bits per row of an (N, W) uint64 array."""
    return np.unpackbits(v.view(np.uint8), axis=1).sum(axis=1)
