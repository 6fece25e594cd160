"""Checks and cuts on generated answers, shared by curate and verbose-clone.

Pure functions over strings; the caller supplies the names, phrases and reference texts (from
templates), so nothing here knows about a prompt format. Each filter exists because base models
do this in practice:

- they run on into a next turn of their own ("### User: ..."), sometimes with the '#'s dropped;
- they loop, repeating a sentence until the token budget runs out;
- they copy the request back instead of answering it;
- they copy the scaffolding they were shown (principle citations, exemplar sentences, system
  prompt wording) into the answer.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from typing import Optional

_WORD = re.compile(r"\w+")
_FENCE = re.compile(r"^[ \t]*```", re.MULTILINE)
# A sentence ends at . ! or ? (plus closing quotes/brackets) before whitespace, or at a line end.
_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*(?=\s)|\n")
# List markers and numbering are decoration, not content: "2. Take a walk." repeats "Take a walk."
_LEADING_MARK = re.compile(r"^(?:[-*•>]+|\d+[.)])\s*")
_LIST_MARK = re.compile(r"[-*•>]+|\d+[.)]")


def words(text: str) -> list[str]:
    """Lower-cased word tokens: what two texts are compared on, ignoring case and punctuation."""
    return _WORD.findall(text.casefold())


# ------------------------------------------------------------------------------- next turn


@functools.lru_cache(maxsize=32)
def _turn_pattern(roles: tuple[str, ...]) -> re.Pattern[str]:
    names = "|".join(re.escape(r) for r in roles)
    role = rf"(?:{names})(?:[ \t]*\(internal thoughts\))?[ \t]*:"
    # "### User:" anywhere at a line start, or a bare "User:" that is the whole line (a turn
    # header that lost its '#'s). A bare "User: admin" inside an answer is content, not a turn.
    return re.compile(rf"^[ \t]*(?:#+[ \t]*{role}|{role}[ \t]*$)", re.IGNORECASE | re.MULTILINE)


def cut_at_next_turn(text: str, roles: Sequence[str], stops: Sequence[str] = ()) -> str:
    """The text before the model starts a new turn as any of `roles`, or before any of `stops`.

    A turn header line starts with '#'s and a role name, optionally "(internal thoughts)", and a
    colon; or is just "Role:" on a line of its own.
    """
    ends = [m.start() for m in [_turn_pattern(tuple(roles)).search(text)] if m is not None]
    ends += [i for s in stops if s and (i := text.find(s)) >= 0]
    return (text[: min(ends)] if ends else text).rstrip()


# ------------------------------------------------------------------------ repeated sentences


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each sentence or line outside fenced code blocks.

    Code is left out: lines such as `i += 1` legitimately repeat. A '.' inside a number or an
    abbreviation followed by no space does not end a sentence; "e.g. this" does, which only makes
    the pieces shorter.
    """
    spans: list[tuple[int, int]] = []
    fences = [m.start() for m in _FENCE.finditer(text)]
    # Prose regions: before the first fence, between a closing and the next opening fence, ...
    bounds = [0, *fences, len(text)]
    for index in range(0, len(bounds) - 1, 2):
        start, stop = bounds[index], bounds[index + 1]
        if index > 0:  # skip the rest of the closing fence's line
            newline = text.find("\n", start, stop)
            start = stop if newline < 0 else newline + 1
        position = start
        for match in _SENTENCE_END.finditer(text, start, stop):
            piece = text[position : match.end()].strip()
            if _LIST_MARK.fullmatch(piece):
                continue  # "2." opens a list item; its sentence runs on
            if piece:
                spans.append((position, match.end()))
            position = match.end()
        if text[position:stop].strip():
            spans.append((position, stop))
    return spans


def _sentence_key(sentence: str) -> tuple[str, ...]:
    return tuple(words(_LEADING_MARK.sub("", sentence.strip())))


def cut_repeated_sentences(text: str, min_words: int = 4) -> tuple[str, bool]:
    """(text cut before the first sentence that repeats an earlier one, whether it was cut).

    Sentences compare by their words, ignoring case, punctuation and list markers. Sentences
    shorter than `min_words` words ("Yes.", "Thank you.") may repeat freely.
    """
    seen: set[tuple[str, ...]] = set()
    for start, end in sentence_spans(text):
        key = _sentence_key(text[start:end])
        if len(key) < min_words:
            continue
        if key in seen:
            return text[:start].rstrip(), True
        seen.add(key)
    return text, False


# ------------------------------------------------------------------------------------ echoes


def _contains(haystack: Sequence[str], needle: Sequence[str]) -> bool:
    n = len(needle)
    return n > 0 and any(haystack[i : i + n] == needle for i in range(len(haystack) - n + 1))


def _remove_all(sequence: list[str], part: Sequence[str]) -> list[str]:
    n, out, i = len(part), [], 0
    while i < len(sequence):
        if n and sequence[i : i + n] == list(part):
            i += n
        else:
            out.append(sequence[i])
            i += 1
    return out


def is_echo(answer: str, request: Iterable[str], min_new_words: int = 3) -> bool:
    """True when the answer merely repeats the request (instruction, input) back.

    That is: the answer's words all occur, in order and contiguously, in one part of the request,
    or the answer holds a copy of a part and fewer than `min_new_words` words besides. Case and
    punctuation are ignored, so a task whose correct answer is its input with only the case or
    punctuation changed counts as an echo too. A short answer that copies nothing ("Paris.") is not
    an echo.
    """
    answer_words = words(answer)
    parts = [words(part) for part in request if part.strip()]
    if not answer_words:
        return True
    if any(_contains(part, answer_words) for part in parts):
        return True
    rest = answer_words
    for part in parts:
        rest = _remove_all(rest, part)
    return len(rest) < len(answer_words) and len(rest) < min_new_words


# ------------------------------------------------------------------------------ copied text


def _squash(text: str) -> str:
    return " ".join(text.split()).casefold()


def find_phrase(text: str, phrases: Iterable[str]) -> Optional[str]:
    """The first of `phrases` that occurs in `text` (case and runs of whitespace ignored)."""
    squashed = _squash(text)
    return next((p for p in phrases if p.strip() and _squash(p) in squashed), None)


def shared_run(text: str, reference: str, n: int = 8) -> Optional[str]:
    """The first run of `n` consecutive words of `text` that also occurs in `reference`, if any.

    Finds wording copied from a prompt the model was shown (a system prompt) without flagging
    the few words any answer shares with it.
    """
    ref = words(reference)
    grams = {tuple(ref[i : i + n]) for i in range(len(ref) - n + 1)}
    own = words(text)
    for i in range(len(own) - n + 1):
        if tuple(own[i : i + n]) in grams:
            return " ".join(own[i : i + n])
    return None


def rename(text: str, old: str, new: str) -> str:
    """Replace the name `old` by `new` where it stands as a whole word ("Lodestar's" included)."""
    return re.sub(rf"(?<!\w){re.escape(old)}(?!\w)", new, text)
