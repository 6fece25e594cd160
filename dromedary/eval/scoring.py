"""Log-likelihoods of (context, continuation) pairs on our engine, a shared context computed once.

Pairs are tokenised by lm-evaluation-harness's rule (`generation.encode_pair`: trailing whitespace
of the context moves to the continuation, the two are tokenised together, only the continuation's
tokens are scored). The text every context of a task starts with (TruthfulQA's few-shot primer,
the 2.5k-token self-align prompt) goes through the engine's shared-prefix cache once; each pair
then runs only its own tokens, attending to the cached keys and values.
"""

from __future__ import annotations

from typing import Optional, Sequence

from ..engine.generation import Engine, encode_pair


class Scorer:
    def __init__(self, engine: Engine, max_batch_size: int = 8):
        self.engine, self.max_batch_size = engine, max_batch_size
        self._heads: dict[str, list[int]] = {}  # context -> its ids, for the pairs of one call

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        return encode_pair(self.engine.tok, context, continuation, self._heads)

    def share(self, text: Optional[str], sample: Sequence[tuple[str, str]]) -> int:
        """Cache the tokens every pair in SAMPLE starts with, at most those of TEXT (the context
        they are known to share); returns how many tokens that is (0: nothing shared)."""
        if not text or not sample:
            return 0
        shared = self.engine.tok.encode(text)
        for context, continuation in sample:
            head, tail = self._pair(context, continuation)
            row = head + tail
            n = 0
            # The row keeps at least its last context token, whose logits score the continuation.
            limit = min(len(shared), len(head) - 1)
            while n < limit and row[n] == shared[n]:
                n += 1
            shared = shared[:n]
        self.engine.cache_prefix(shared)
        return len(shared)

    def loglikelihoods(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        rows = []
        for context, continuation in pairs:
            head, tail = self._pair(context, continuation)
            if not tail:
                raise ValueError(f"the continuation {continuation!r} adds no tokens to its context")
            rows.append((head + tail, len(tail)))
        self._heads.clear()  # contexts repeat within a call (an item's endings), rarely across calls
        return self.engine.score_tokens(rows, max_batch_size=self.max_batch_size)
