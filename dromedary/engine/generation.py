"""Batched sampling engine: KV cache, shared-prefix cache, stops, penalties, streaming, scoring.

Rows are right-padded and each keeps its own positions, so a row's result does not depend on what
else is in the batch: exactly so in fp32; in bf16 the batch changes the shapes of the matrix
products and where the shared prefix ends, which can resolve a near-tie differently (as in any
batched bf16 engine). When the rows of a batch share a long token prefix (the self-align prompt is
2-3k tokens of principles and exemplars), its keys and values are computed once, kept across calls,
and attended by every row without being copied per row or per step (`model.merge_attention`).
Finished rows leave the batch.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Callable, Literal, Mapping, Optional, Sequence

import torch

from .. import distributed
from ..llama.kernels.lean import LeanDecoder
from ..llama.kernels.native import NativeDecoder
from ..llama.model import KVCache, Transformer, can_prepack, drop_packed_weights, prepack_weights
from ..llama.tokenizer import StreamDecoder, Tokenizer

FinishReason = Literal["eos", "stop", "length"]

# A shared prefix shorter than this is not worth a separate cache block.
MIN_PREFIX_TOKENS = 16


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    min_new_tokens: int = 0
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means off
    stop: Sequence[str] = ()
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    # The original Dromedary's penalties: a candidate token is penalised by `penalty[n-1]` times
    # the number of times it already followed the current (n-1)-token context in the generated
    # text (n = 1: plain token frequency).
    ngram_penalties: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be within 0..max_new_tokens, got {self.min_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")


@dataclass
class Generation:
    text: str
    tokens: list[int]
    finish_reason: FinishReason
    prompt_tokens: int


def row_seed(seed: int, key: str) -> int:
    """A per-row seed from the run seed and a stable key (e.g. a record id): a record samples the
    same text whatever batch or data-parallel group it lands in, so a resumed run matches (in bf16,
    up to near-ties that a differently composed batch resolves differently; see the module doc)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass
class _Prefix:
    tokens: tuple[int, ...]
    cache: KVCache


class Engine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, *, max_seq_len: Optional[int] = None,
                 prepack: Optional[bool] = None, native: bool = True):
        """`prepack`: keep a packed copy of the weights for CPU bf16 decoding (steps 2-3x faster
        through native.py, 1.4x through lean.py, at the cost of a second copy of the weights).
        Default: when the model is in eval mode and the copy takes less than half of the memory now
        available. `native`: decode with the compiled step of native.py where it applies; False
        keeps the PyTorch step on oneDNN packs."""
        self.model = model
        self.tok = tokenizer
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.max_seq_len = max_seq_len or model.args.max_seq_len
        self._prefix: Optional[_Prefix] = None
        # Ids the model may emit but the tokenizer cannot decode (embedding rows past the
        # tokenizer's vocabulary) are never sampled.
        self.n_words = min(tokenizer.n_words, model.args.vocab_size)
        if prepack is None:
            prepack = not model.training and can_prepack(model) and 2 * _weight_bytes(model) < _available_memory()
        # The one-token step: the native one where it applies (see native.py), else the PyTorch
        # one on oneDNN packs; each keeps its own packed copy of the weights.
        self._fast_step: Optional[LeanDecoder | NativeDecoder] = None
        drop_packed_weights(model)
        if prepack:
            self._fast_step = NativeDecoder.build(model) if native else None
            if self._fast_step is None:
                prepack_weights(model)
                self._fast_step = LeanDecoder.build(model)

    # ---------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        params: SamplingParams,
        *,
        seeds: Optional[Sequence[int]] = None,
        seed: int = 0,
        on_text: Optional[Callable[[int, str], None]] = None,
    ) -> list[Generation]:
        """Complete every prompt. `seeds` gives each row its own sampling seed (default: derived
        from `seed` and the row's index); `on_text(row, delta)` streams decoded text."""
        params.check()
        ids = [self.tok.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        if not ids:
            return []
        for i, row in enumerate(ids):
            if not row:
                raise ValueError(f"prompt {i} is empty")
            if len(row) >= self.max_seq_len:
                raise ValueError(f"prompt {i} has {len(row)} tokens; the context window is {self.max_seq_len}")
        seeds = list(seeds) if seeds is not None else [row_seed(seed, str(i)) for i in range(len(ids))]
        prefix = self._shared_prefix(ids)
        p_len = len(prefix.tokens) if prefix else 0
        suffixes = [row[p_len:] for row in ids]
        longest = max(len(r) for r in ids)
        budget = min(params.max_new_tokens, self.max_seq_len - longest)
        return self._decode(suffixes, p_len, prefix, params, budget, seeds, on_text, [len(r) for r in ids])

    @torch.inference_mode()
    def cache_prefix(self, prefix: str | Sequence[int]) -> None:
        """Compute and keep the keys and values of exactly `prefix` (e.g. the self-align prompt's
        principles and exemplars) before the first batch. Left to the batches, the cached prefix
        could run into the first words a batch's records happen to share, and a later batch that
        does not share them would recompute it."""
        ids = self.tok.encode(prefix) if isinstance(prefix, str) else list(prefix)
        if len(ids) < MIN_PREFIX_TOKENS:
            return
        cached = self._prefix
        if cached is not None and cached.tokens == tuple(ids):
            return
        cache = KVCache(k=[], v=[])
        self.model(torch.tensor([ids], device=self.device), cache=cache, prefix_only=True,
                   output_index=torch.tensor([len(ids) - 1], device=self.device))
        self._prefix = _Prefix(tuple(ids), cache)

    def _shared_prefix(self, ids: list[list[int]]) -> Optional[_Prefix]:
        # Every row must keep at least one token of its own, whose logits start the generation.
        limit = min(len(r) for r in ids) - 1
        common = 0
        first = ids[0]
        while common < limit and all(r[common] == first[common] for r in ids):
            common += 1
        cached = self._prefix
        if cached is not None:
            n = len(cached.tokens)
            if n <= limit and all(tuple(r[:n]) == cached.tokens for r in ids):
                # A conversation that grew by a turn extends the cached prefix instead of
                # recomputing it; a short growth stays in the rows.
                return cached if common - n < 64 else self._extend_prefix(cached, first[n:common])
        if common < MIN_PREFIX_TOKENS:
            return None
        self._prefix = None
        self.cache_prefix(first[:common])
        return self._prefix

    def _extend_prefix(self, cached: _Prefix, new: list[int]) -> _Prefix:
        """Run `new` as one row attending to the cached prefix and append its keys and values."""
        n = len(cached.tokens)
        rows = KVCache.allocate(self.model, 1, len(new), device=self.device, dtype=self.dtype)
        rows.prefix_k, rows.prefix_v = cached.cache.prefix_k, cached.cache.prefix_v
        positions = n + torch.arange(len(new), device=self.device)[None]
        self.model(torch.tensor([new], device=self.device), positions, rows,
                   output_index=torch.tensor([len(new) - 1], device=self.device))
        # (1, kvh, P, D) + (1, kvh, T, D) along the slots.
        cache = KVCache(k=[], v=[], prefix_k=[torch.cat(kv, dim=2) for kv in zip(cached.cache.prefix_k, rows.k)],
                        prefix_v=[torch.cat(kv, dim=2) for kv in zip(cached.cache.prefix_v, rows.v)])
        self._prefix = _Prefix(cached.tokens + tuple(new), cache)
        return self._prefix

    def _decode(self, suffixes, p_len, prefix, params, budget, seeds, on_text, prompt_lens) -> list[Generation]:
        bsz = len(suffixes)
        lens = torch.tensor([len(s) for s in suffixes], device=self.device)
        width = int(lens.max())
        tokens = torch.zeros(bsz, width, dtype=torch.long, device=self.device)
        for i, s in enumerate(suffixes):
            tokens[i, : len(s)] = torch.tensor(s, device=self.device)
        cache, first_slot = self._rows_cache(prefix, bsz, width + budget)
        positions = p_len + torch.arange(width, device=self.device)[None].expand(bsz, width)
        logits = self.model(tokens, positions, cache, output_index=lens - 1)[:, 0]
        fast = self._fast_step if self._fast_step is not None and self._fast_step.usable() else None

        out_tokens: list[list[int]] = [[] for _ in range(bsz)]
        streams = [StreamDecoder(self.tok) for _ in range(bsz)]
        results: list[Optional[Generation]] = [None] * bsz
        active = list(range(bsz))  # original row index of each live batch slot
        max_stop = max((len(s) for s in params.stop), default=0)
        shown = [0] * bsz  # characters of each row's text already passed to on_text
        next_pos = lens + first_slot  # cache slot of each live row's next token

        def show(row: int, upto: int) -> None:
            if on_text is not None and upto > shown[row]:
                on_text(row, streams[row].text[shown[row] : upto])
            shown[row] = max(shown[row], upto)

        for step in range(budget):
            chosen = self._sample(logits, [out_tokens[r] for r in active], [seeds[r] for r in active], params, step)
            distributed.broadcast_tensor_mp(chosen)
            finished = []
            for slot, (row, token) in enumerate(zip(active, chosen.tolist())):
                reason: Optional[FinishReason] = None
                stream = streams[row]
                if token == self.tok.eos_id:
                    reason = "eos"
                else:
                    out_tokens[row].append(token)
                    delta = stream.feed(token)
                    cut = _find_stop(stream.text, params.stop, len(stream.text) - len(delta) - max_stop) if delta else None
                    if cut is not None:
                        stream.emitted = stream.text[:cut]
                        reason = "stop"
                    elif step + 1 == budget:
                        reason = "length"
                    elif on_text is not None and delta:
                        # Hold back a tail that may still grow into a stop string, so what is
                        # streamed is always a prefix of the final text.
                        show(row, len(stream.text) - _stop_prefix_len(stream.text, params.stop))
                if reason is not None:
                    if reason != "stop":
                        stream.flush()
                    show(row, len(stream.text))
                    results[row] = Generation(stream.text, out_tokens[row], reason, prompt_lens[row])
                    finished.append(slot)
            if finished:
                keep = [s for s in range(len(active)) if s not in finished]
                if not keep:
                    break
                keep_t = torch.tensor(keep, device=self.device)
                active = [active[s] for s in keep]
                chosen, next_pos = chosen[keep_t], next_pos[keep_t]
                # Finished rows leave the batch: later steps cost nothing for them.
                cache.k = [t.index_select(0, keep_t) for t in cache.k]
                cache.v = [t.index_select(0, keep_t) for t in cache.v]
            if fast is not None:
                logits = fast.step(chosen, next_pos.tolist(), cache)
            else:
                logits = self.model(chosen[:, None], (cache.prefix_len + next_pos)[:, None], cache)[:, -1]
            next_pos = next_pos + 1
        return results  # type: ignore[return-value]  # every row finished by the last step

    def _rows_cache(self, prefix: Optional[_Prefix], bsz: int, length: int) -> tuple[KVCache, int]:
        """The KV cache of the rows' own tokens (`length` slots per row) and the slot of each
        row's first own token."""
        if prefix is None:
            return KVCache.allocate(self.model, bsz, length, device=self.device, dtype=self.dtype), 0
        if bsz == 1:
            # One row gains nothing from a shared block: a copy of the prefix goes into the row's
            # own first slots, so that each step attends to one block instead of merging two.
            p_len = len(prefix.tokens)
            cache = KVCache.allocate(self.model, 1, p_len + length, device=self.device, dtype=self.dtype)
            for own, shared in zip(cache.k + cache.v, prefix.cache.prefix_k + prefix.cache.prefix_v):
                own[:, :, :p_len] = shared
            return cache, p_len
        cache = KVCache.allocate(self.model, bsz, length, device=self.device, dtype=self.dtype)
        cache.prefix_k, cache.prefix_v = prefix.cache.prefix_k, prefix.cache.prefix_v
        return cache, 0

    def _sample(self, logits: torch.Tensor, histories: list[list[int]], seeds: list[int], params: SamplingParams,
                step: int):
        logits = logits.float()
        logits[:, self.n_words :] = float("-inf")
        for token, bias in params.logit_bias.items():
            logits[:, token] += bias
        if any(params.ngram_penalties):
            for slot, hist in enumerate(histories):
                _apply_ngram_penalties(logits[slot], hist, params.ngram_penalties)
        if step < params.min_new_tokens:
            logits[:, self.tok.eos_id] = float("-inf")
        if params.temperature == 0:
            return logits.argmax(dim=-1)
        probs = torch.softmax(logits / params.temperature, dim=-1)
        if params.top_k:
            kth = torch.topk(probs, min(params.top_k, probs.shape[-1]), dim=-1).values[:, -1:]
            probs = torch.where(probs < kth, torch.zeros_like(probs), probs)
        if params.top_p < 1:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            # Keep the smallest set of tokens whose mass reaches top_p (always the first one).
            drop = sorted_p.cumsum(-1) - sorted_p > params.top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        return draw(probs, seeds, step)

    # ---------------------------------------------------------------------------------------
    @torch.inference_mode()
    def score(self, prompts: Sequence[str], targets: Sequence[str], *, max_batch_size: int = 8) -> list[float]:
        """Summed log-probability of each target's tokens after its prompt (multiple choice).

        Prompt and target are tokenised together and only the target's tokens are scored, as
        lm-evaluation-harness does (`encode_pair`): a target tokenised alone would gain a
        word-start token that the joined text does not have."""
        if len(prompts) != len(targets):
            raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
        rows = []
        for p, t in zip(prompts, targets):
            context, continuation = encode_pair(self.tok, p, t)
            rows.append((context + continuation, len(continuation)))
        return [s for s, _ in self.score_tokens(rows, max_batch_size=max_batch_size)]

    @torch.inference_mode()
    def score_tokens(self, rows: Sequence[tuple[Sequence[int], int]], *,
                     max_batch_size: int = 8) -> list[tuple[float, bool]]:
        """(summed log-probability, whether greedy decoding picks every one of them) of the last
        `n` tokens of each row (tokens, n), over the model's whole vocabulary.

        Rows that begin with the cached prefix (`cache_prefix`) attend to its keys and values
        instead of recomputing them. The tokens fed are a row minus its last token, so rows that
        differ only in their last token (one-token choices after one context) share a pass. A row
        longer than the window keeps its last tokens, as lm-evaluation-harness does."""
        prefix = self._prefix
        p_len = len(prefix.tokens) if prefix is not None else 0
        fed: dict[tuple[int, ...], int] = {}
        plan = []  # per row: (index into fed, n, the scored tokens)
        for i, (row, n) in enumerate(rows):
            row = list(row)[-(self.max_seq_len + 1):]
            if not 1 <= n < len(row):
                raise ValueError(f"row {i}: cannot score {n} of its {len(row)} tokens (at least one token must come first)")
            plan.append((fed.setdefault(tuple(row[:-1]), len(fed)), n, row[-n:]))
        longest = [0] * len(fed)  # most positions read from each fed sequence
        for j, n, _ in plan:
            longest[j] = max(longest[j], n)
        seqs = list(fed)
        shared = [prefix is not None and len(s) - longest[j] >= p_len and s[:p_len] == prefix.tokens
                  for j, s in enumerate(seqs)]
        # Per fed sequence: log-probabilities (n_max, vocab) of its last n_max positions.
        logprobs: list[Optional[torch.Tensor]] = [None] * len(seqs)
        for use_prefix in (True, False):
            group = sorted((j for j in range(len(seqs)) if shared[j] == use_prefix), key=lambda j: -len(seqs[j]))
            skip = p_len if use_prefix else 0
            for start in range(0, len(group), max_batch_size):
                batch = group[start : start + max_batch_size]
                own = [seqs[j][skip:] for j in batch]
                width = max(len(s) for s in own)
                tokens = torch.zeros(len(batch), width, dtype=torch.long, device=self.device)
                for b, s in enumerate(own):
                    tokens[b, : len(s)] = torch.tensor(s, device=self.device)
                if use_prefix:
                    cache = KVCache.allocate(self.model, len(batch), width, device=self.device, dtype=self.dtype)
                    cache.prefix_k, cache.prefix_v = prefix.cache.prefix_k, prefix.cache.prefix_v
                    positions = p_len + torch.arange(width, device=self.device)[None].expand(len(batch), width)
                    logits = self.model(tokens, positions, cache)  # (B, width, vocab)
                else:
                    logits = self.model(tokens)
                for b, (j, s) in enumerate(zip(batch, own)):
                    logprobs[j] = torch.log_softmax(logits[b, len(s) - longest[j] : len(s)].float(), dim=-1)
        results = []
        for j, n, target in plan:
            lp = logprobs[j][-n:]  # type: ignore[index]  # (n, vocab): position t predicts target[t]
            ids = torch.tensor(target, device=lp.device)
            results.append((float(lp.gather(-1, ids[:, None]).sum()), bool((lp.argmax(-1) == ids).all())))
        return results


def encode_pair(tok: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of a context and of its continuation, by lm-evaluation-harness's rule: trailing
    whitespace of the context moves to the continuation, the two are tokenised together, and the
    continuation's ids are what follows the context's own ids. An empty context is BOS alone."""
    if not context:
        return [tok.bos_id], tok.encode(continuation, bos=False)
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    whole = tok.encode(stripped + continuation)
    head = tok.encode(stripped)
    return head, whole[len(head):]


def draw(probs: torch.Tensor, seeds: Sequence[int], step: int) -> torch.Tensor:
    """One token per row of `probs` (B, V), non-negative, not necessarily normalised: row i
    inverts its cumulative distribution at `uniform(seeds[i], step)`. The draw depends on the
    row's seed and the step only, so a row samples the same whatever its batch, and a whole batch
    is sampled in a few kernels instead of one generator call per row."""
    u = torch.tensor([uniform(s, step) for s in seeds], dtype=torch.float64, device=probs.device)
    cdf = probs.double().cumsum(dim=-1)
    # u is in (0, 1]: the first entry reaching u * total has non-zero probability.
    picked = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None])
    return picked[:, 0].clamp_(max=probs.shape[-1] - 1)


_MASK64 = (1 << 64) - 1


def uniform(seed: int, step: int) -> float:
    """A uniform number in (0, 1] from a row seed and a step (splitmix64 of the pair)."""
    z = (seed + (step + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return ((z >> 11) + 1) / float(1 << 53)


def _weight_bytes(model: Transformer) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _available_memory() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not POSIX: do not guess
        return 0


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that is the beginning of some stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


def _find_stop(text: str, stops: Sequence[str], start: int) -> Optional[int]:
    """Index in `text` where the earliest stop string begins, searching from `start`."""
    hits = [i for s in stops if s and (i := text.find(s, max(0, start))) >= 0]
    return min(hits) if hits else None


def _apply_ngram_penalties(logits: torch.Tensor, history: list[int], penalties) -> None:
    for n, penalty in enumerate(penalties, start=1):
        if not penalty or len(history) < n - 1:
            continue
        context = tuple(history[len(history) - (n - 1) :]) if n > 1 else ()
        counts: dict[int, int] = {}
        for i in range(n - 1, len(history)):
            if tuple(history[i - (n - 1) : i]) == context:
                counts[history[i]] = counts.get(history[i], 0) + 1
        if counts:
            idx = torch.tensor(list(counts), device=logits.device)
            logits[idx] -= penalty * torch.tensor(list(counts.values()), device=logits.device, dtype=logits.dtype)
