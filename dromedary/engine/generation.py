"""Batched sampling engine: KV cache, shared-prefix cache, stops, penalties, streaming, scoring.

Rows are right-padded and each keeps its own positions, so a row's result does not depend on what
else is in the batch: exactly so in fp32; in bf16 the batch changes the shapes of the matrix
products and where the shared prefix ends, which can resolve a near-tie differently (as in any
batched bf16 engine). When the rows of a batch share a long token prefix (the self-align prompt is
2-3k tokens of principles and exemplars), its keys and values are computed once, kept across calls,
and attended by every row without being copied per row or per step (`model.merge_attention`).

Each row has its own token budget (`max_new_tokens`, or what its own prompt leaves of the window)
and finishes on its own. A finished row leaves the batch by having a live row moved into its slots
of the same KV-cache buffers, so the cache is never held twice. The cached prefixes are tied to the
weights they were computed with: a changed weight or adapter drops them (`_WeightsState`).
"""

from __future__ import annotations

import hashlib
import os
import weakref
from dataclasses import dataclass, field
from typing import Callable, Literal, Mapping, Optional, Protocol, Sequence, Union

import torch

from .. import distributed
from ..llama.kernels.lean import LeanDecoder
from ..llama.kernels.native import NativeDecoder
from ..llama.model import KVCache, Transformer, can_prepack, drop_packed_weights, prepack_weights
from ..llama.tokenizer import StreamDecoder, Tokenizer

FinishReason = Literal["eos", "stop", "length", "cancelled"]

# A shared prefix shorter than this is not worth a separate cache block.
MIN_PREFIX_TOKENS = 16
# Scoring: tokens a batch of rows must share after the cached prefix to compute them once.
MIN_SHARED_RUN = 4


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    min_new_tokens: int = 0
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means off
    stop: Sequence[Union[str, "StopRule"]] = ()
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    # The original Dromedary's penalties: a candidate token is penalised by `penalty[n-1]` times
    # the number of times it already followed the current (n-1)-token context in the generated
    # text (n = 1: plain token frequency).
    ngram_penalties: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    # None: off. k >= 0: record each chosen token's log-probability and the k most likely ids at
    # each step, over the model's distribution before bias, penalties, temperature and truncation
    # (OpenAI's completions `logprobs`); served by `scheduler.Scheduler`.
    logprobs: Optional[int] = None

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
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be >= 0 (or None: off), got {self.logprobs}")


@dataclass
class Generation:
    text: str
    tokens: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    # With SamplingParams.logprobs: per generated token, its log-probability and the top ids'.
    token_logprobs: Optional[list[float]] = None
    top_logprobs: Optional[list[dict[int, float]]] = None


def row_seed(seed: int, key: str) -> int:
    """A per-row seed from the run seed and a stable key (e.g. a record id): a record samples the
    same text whatever batch or data-parallel group it lands in, so a resumed run matches (in bf16,
    up to near-ties that a differently composed batch resolves differently; see the module doc)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class StopRule(Protocol):
    """A stop that is not a fixed string (e.g. any form of a chat turn marker): `find` gives the
    index in `text` where the first match begins, looking at matches that end after `start`;
    `partial` the length of the longest end of `text` that could still grow into a match."""

    def find(self, text: str, start: int) -> Optional[int]: ...

    def partial(self, text: str) -> int: ...


class _WeightsState:
    """What the model's outputs depend on besides the tokens: every parameter (by identity, held
    weakly, and its in-place `_version`) and the adapter switches of LoRA layers. As with
    `model.PackedFrom`, a replaced module, a reassigned weight or an in-place update (a training
    step, a loaded adapter) makes keys and values computed before it stale."""

    def __init__(self, model: Transformer):
        self.params = [(weakref.ref(p), p._version) for p in model.parameters()]
        self.switches = _adapter_switches(model)

    def current(self, model: Transformer) -> bool:
        params = list(model.parameters())
        return (len(params) == len(self.params)
                and all(ref() is p and p._version == v for (ref, v), p in zip(self.params, params))
                and _adapter_switches(model) == self.switches)


def _adapter_switches(model: Transformer) -> tuple:
    # peft's LoRA layers: an adapter turned off, merged into the weight, or rescaled.
    return tuple((getattr(m, "disable_adapters", None), getattr(m, "merged", None),
                  tuple(sorted(getattr(m, "scaling", {}).items())))
                 for m in model.modules() if hasattr(m, "disable_adapters"))


@dataclass
class _Prefix:
    tokens: tuple[int, ...]
    cache: KVCache
    weights: Optional[_WeightsState] = None


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
        # The last shared prefix a batch used, and the one `cache_prefix` pinned (kept whatever
        # the batches share beyond it; the two may be the same block).
        self._prefix: Optional[_Prefix] = None
        self._pinned: Optional[_Prefix] = None
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
                raise ValueError(f"prompt {i} has {len(row)} tokens; the context window is {self.max_seq_len}"
                                 + (self.model.args.window_note if self.max_seq_len == self.model.args.max_seq_len else ""))
        seeds = list(seeds) if seeds is not None else [row_seed(seed, str(i)) for i in range(len(ids))]
        self._drop_stale_prefixes()
        prefix = self._shared_prefix(ids)
        p_len = len(prefix.tokens) if prefix else 0
        suffixes = [row[p_len:] for row in ids]
        # Each row's own budget: what its prompt leaves of the window, never its neighbours'.
        budgets = [min(params.max_new_tokens, self.max_seq_len - len(r)) for r in ids]
        return self._decode(suffixes, p_len, prefix, params, budgets, seeds, on_text, [len(r) for r in ids])

    @torch.inference_mode()
    def cache_prefix(self, prefix: str | Sequence[int]) -> None:
        """Compute and keep the keys and values of exactly `prefix` (e.g. the self-align prompt's
        principles and exemplars) before the first batch. Left to the batches, the cached prefix
        could run into the first words a batch's records happen to share, and a later batch that
        does not share them would recompute it."""
        ids = self.tok.encode(prefix) if isinstance(prefix, str) else list(prefix)
        if len(ids) < MIN_PREFIX_TOKENS:
            return
        self._drop_stale_prefixes()
        for cached in (self._pinned, self._prefix):
            if cached is not None and cached.tokens == tuple(ids):
                self._pinned = self._prefix = cached
                return
        self._prefix = None  # freed before the new block is computed
        self._pinned = self._prefix = self._fill_prefix(ids)

    def _fill_prefix(self, ids: Sequence[int]) -> _Prefix:
        cache = KVCache(k=[], v=[])
        self.model(torch.tensor([list(ids)], device=self.device), cache=cache, prefix_only=True,
                   output_index=torch.tensor([len(ids) - 1], device=self.device))
        return _Prefix(tuple(ids), cache, _WeightsState(self.model))

    def _drop_stale_prefixes(self) -> None:
        """Keys and values computed with other weights are dropped; the pinned prefix is
        recomputed from its tokens (it was asked for, so the next batch will want it)."""
        pinned, last = self._pinned, self._prefix
        if last is not None and last is not pinned and not last.weights.current(self.model):
            self._prefix = None
        if pinned is not None and not pinned.weights.current(self.model):
            self._pinned = self._prefix = None
            self._pinned = self._fill_prefix(pinned.tokens)
            self._prefix = self._prefix or self._pinned

    def _shared_prefix(self, ids: list[list[int]]) -> Optional[_Prefix]:
        # Every row must keep at least one token of its own, whose logits start the generation.
        limit = min(len(r) for r in ids) - 1
        common = 0
        first = ids[0]
        while common < limit and all(r[common] == first[common] for r in ids):
            common += 1
        # The longest cached block every row starts with (the last one used may extend the pin).
        for cached in sorted({id(p): p for p in (self._prefix, self._pinned) if p is not None}.values(),
                             key=lambda p: -len(p.tokens)):
            n = len(cached.tokens)
            if n <= limit and all(tuple(r[:n]) == cached.tokens for r in ids):
                # A conversation that grew by a turn extends the cached prefix instead of
                # recomputing it; a short growth stays in the rows. Extending makes a new block:
                # the pinned one stays as it is.
                self._prefix = cached if common - n < 64 else self._extend_prefix(cached, first[n:common])
                return self._prefix
        if common < MIN_PREFIX_TOKENS:
            return None
        if self._prefix is not self._pinned:
            self._prefix = None  # freed before the new block is computed
        self._prefix = self._fill_prefix(first[:common])
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
        return _Prefix(cached.tokens + tuple(new), cache, _WeightsState(self.model))

    def _decode(self, suffixes, p_len, prefix, params, budgets, seeds, on_text, prompt_lens) -> list[Generation]:
        bsz = len(suffixes)
        lens = torch.tensor([len(s) for s in suffixes], device=self.device)
        width = int(lens.max())
        tokens = torch.zeros(bsz, width, dtype=torch.long, device=self.device)
        for i, s in enumerate(suffixes):
            tokens[i, : len(s)] = torch.tensor(s, device=self.device)
        # Row i writes slots up to len(suffix i) + budget i - 1: the longest such row sizes the cache.
        cache, first_slot = self._rows_cache(prefix, bsz, max(len(s) + b for s, b in zip(suffixes, budgets)))
        positions = p_len + torch.arange(width, device=self.device)[None].expand(bsz, width)
        logits = self.model(tokens, positions, cache, output_index=lens - 1)[:, 0]
        fast = self._fast_step if self._fast_step is not None and self._fast_step.usable() else None

        out_tokens: list[list[int]] = [[] for _ in range(bsz)]
        # Decoded after each row's last prompt token, so a completion keeps its leading space.
        streams = [StreamDecoder(self.tok, context=s[-1:]) for s in suffixes]
        results: list[Optional[Generation]] = [None] * bsz
        active = list(range(bsz))  # original row index of each live batch slot
        max_stop = max((len(s) for s in params.stop if isinstance(s, str)), default=0)
        shown = [0] * bsz  # characters of each row's text already passed to on_text
        next_pos = lens + first_slot  # cache slot of each live row's next token

        def show(row: int, upto: int) -> None:
            if on_text is not None and upto > shown[row]:
                on_text(row, streams[row].text[shown[row] : upto])
            shown[row] = max(shown[row], upto)

        for step in range(max(budgets)):
            chosen = self._sample(logits, [out_tokens[r] for r in active], [seeds[r] for r in active], params, step,
                                  active)
            distributed.broadcast_tensor_mp(chosen)
            finished = []
            for slot, (row, token) in enumerate(zip(active, chosen.tolist())):
                reason: Optional[FinishReason] = None
                stream = streams[row]
                if token in self.tok.stop_ids:
                    reason = "eos"
                else:
                    out_tokens[row].append(token)
                    delta = stream.feed(token)
                    cut = _find_stop(stream.text, params.stop, len(stream.text) - len(delta), max_stop) if delta else None
                    if cut is not None:
                        stream.emitted = stream.text[:cut]
                        reason = "stop"
                    elif step + 1 == budgets[row]:
                        reason = "length"
                    elif on_text is not None and delta:
                        # Hold back a tail that may still grow into a stop string, so what is
                        # streamed is always a prefix of the final text.
                        show(row, len(stream.text) - stop_prefix_len(stream.text, params.stop))
                if reason is not None:
                    if reason != "stop":
                        stream.flush()
                    show(row, len(stream.text))
                    results[row] = Generation(stream.text, out_tokens[row], reason, prompt_lens[row])
                    finished.append(slot)
            if finished:
                if len(finished) == len(active):
                    break
                # Finished rows leave the batch: later steps cost nothing for them.
                keep = _compact(cache, finished, len(active), int(next_pos.max()))
                keep_t = torch.tensor(keep, device=self.device)
                active = [active[s] for s in keep]
                chosen, next_pos = chosen[keep_t], next_pos[keep_t]
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
                step: int | Sequence[int], rows: Sequence[int] = (), hold: Optional[Sequence[bool]] = None):
        """One token per row of `logits` (B, vocab); `step`: the new-token index of every row, or
        of each row (the scheduler's rows are at different steps). `hold`: per row, whether its
        stop tokens are still excluded (default: its step < params.min_new_tokens)."""
        logits = logits.float()
        logits[:, self.n_words :] = float("-inf")
        for token, bias in params.logit_bias.items():
            logits[:, token] += bias
        if any(params.ngram_penalties):
            for slot, hist in enumerate(histories):
                _apply_ngram_penalties(logits[slot], hist, params.ngram_penalties)
        if isinstance(step, int) and hold is None:
            if step < params.min_new_tokens:
                logits[:, [i for i in self.tok.stop_ids if i < logits.shape[-1]]] = float("-inf")
        else:
            if hold is None:
                hold = [s < params.min_new_tokens for s in step]
            held = [b for b, h in enumerate(hold) if h]
            if held:
                stops = [i for i in self.tok.stop_ids if i < logits.shape[-1]]
                logits[torch.tensor(held, device=logits.device)[:, None], torch.tensor(stops, device=logits.device)] = float("-inf")
        if params.temperature == 0:
            top, picked = logits.max(dim=-1)  # the first of equal maxima, as argmax; one pass for both
            _check_logits(logits, rows, step, top)
            return picked
        _check_logits(logits, rows, step)
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
        `n` tokens of each row (tokens, n), over the model's whole vocabulary (as lm-evaluation-harness
        does, so figures compare: the tokenizer may have fewer words than the checkpoint has rows).

        Rows that begin with the cached prefix (`cache_prefix`) attend to its keys and values
        instead of recomputing them, and rows that go on sharing tokens after it (the candidates of
        one question) compute those once per batch: see `_score_batch`. The tokens fed are a row
        minus its last token, so rows that differ only in their last token (one-token choices after
        one context) share a pass. A row longer than the window keeps its last tokens, as
        lm-evaluation-harness does."""
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
        # Tokens of each fed sequence that no position read from it needs: those may come from a
        # cache (the shared prefix, a block shared with its batch).
        free = [len(s) - longest[j] for j, s in enumerate(seqs)]
        shared = [prefix is not None and free[j] >= p_len and s[:p_len] == prefix.tokens for j, s in enumerate(seqs)]
        # Per fed sequence: log-probabilities (n_max, vocab) of its last n_max positions.
        logprobs: list[Optional[torch.Tensor]] = [None] * len(seqs)
        on_prefix = sorted((j for j in range(len(seqs)) if shared[j]), key=lambda j: seqs[j])
        for batch in _batches_by_common_start(on_prefix, seqs, free, p_len, max_batch_size):
            self._score_batch(batch, seqs, longest, free, prefix, logprobs)
        alone = sorted((j for j in range(len(seqs)) if not shared[j]), key=lambda j: -len(seqs[j]))
        for start in range(0, len(alone), max_batch_size):
            self._score_batch(alone[start : start + max_batch_size], seqs, longest, free, None, logprobs)
        results = []
        for j, n, target in plan:
            lp = logprobs[j][-n:]  # type: ignore[index]  # (n, vocab): position t predicts target[t]
            ids = torch.tensor(target, device=lp.device)
            results.append((float(lp.gather(-1, ids[:, None]).sum()), bool((lp.argmax(-1) == ids).all())))
        return results

    def _score_batch(self, batch: list[int], seqs, longest, free, prefix: Optional[_Prefix], logprobs) -> None:
        """One forward pass over the fed sequences `batch`. With `prefix`, every one starts with
        its tokens, attends to its cached keys and values, and the tokens the batch has in common
        after it (`common`, a question its candidates share) run once as a single row whose keys
        and values are then copied into each row's first cache slots."""
        p_len = len(prefix.tokens) if prefix is not None else 0
        common = 0
        if prefix is not None and len(batch) > 1:
            first, limit = seqs[batch[0]], min(free[j] for j in batch)
            common = p_len
            while common < limit and all(seqs[j][common] == first[common] for j in batch):
                common += 1
            common -= p_len
            if common < MIN_SHARED_RUN:
                common = 0  # too short to be worth its own pass
        skip = p_len + common
        own = [seqs[j][skip:] for j in batch]
        width = max(len(s) for s in own)
        tokens = torch.zeros(len(batch), width, dtype=torch.long, device=self.device)
        # Logits only where a scored token is predicted: each row's last longest[j] positions.
        wanted = torch.zeros(len(batch), width, dtype=torch.bool)
        for b, (j, s) in enumerate(zip(batch, own)):
            tokens[b, : len(s)] = torch.tensor(s, device=self.device)
            wanted[b, len(s) - longest[j] : len(s)] = True
        wanted = wanted.to(self.device)
        if prefix is None:
            logits = self.model(tokens, output_mask=wanted)  # (N, vocab), N = sum of longest[j]
        else:
            cache = KVCache.allocate(self.model, len(batch), common + width, device=self.device, dtype=self.dtype)
            cache.prefix_k, cache.prefix_v = prefix.cache.prefix_k, prefix.cache.prefix_v
            if common:
                block = KVCache.allocate(self.model, 1, common, device=self.device, dtype=self.dtype)
                block.prefix_k, block.prefix_v = prefix.cache.prefix_k, prefix.cache.prefix_v
                run = torch.tensor([seqs[batch[0]][p_len:skip]], device=self.device)
                self.model(run, p_len + torch.arange(common, device=self.device)[None], block,
                           output_index=torch.tensor([common - 1], device=self.device))
                for rows_kv, block_kv in zip(cache.k + cache.v, block.k + block.v):
                    rows_kv[:, :, :common] = block_kv  # (B, kvh, common, D) <- (1, kvh, common, D)
            positions = skip + torch.arange(width, device=self.device)[None].expand(len(batch), width)
            logits = self.model(tokens, positions, cache, output_mask=wanted)  # (N, vocab)
        for j, rows in zip(batch, logits.split([longest[j] for j in batch])):
            logprobs[j] = torch.log_softmax(rows.float(), dim=-1)



def _batches_by_common_start(order: list[int], seqs, free, p_len: int, size: int) -> list[list[int]]:
    """Batches of at most `size` of the fed sequences `order` (sorted by their tokens), cut where
    a batch would lose the run of tokens its members share after the cached prefix (an item's
    candidates stay together); the short remainders are batched together by length."""
    n = p_len + MIN_SHARED_RUN
    groups: list[list[int]] = []
    for j in order:
        group = groups[-1] if groups else None
        if (group is not None and len(group) < size and free[j] >= n and free[group[0]] >= n
                and seqs[group[0]][p_len:n] == seqs[j][p_len:n]):
            group.append(j)
        else:
            groups.append([j])
    singles = sorted((g[0] for g in groups if len(g) == 1), key=lambda j: -len(seqs[j]))
    return [g for g in groups if len(g) > 1] + [singles[i : i + size] for i in range(0, len(singles), size)]


def encode_pair(tok: Tokenizer, context: str, continuation: str,
                heads: Optional[dict[str, list[int]]] = None) -> tuple[list[int], list[int]]:
    """Token ids of a context and of its continuation, by lm-evaluation-harness's rule: trailing
    whitespace of the context moves to the continuation, the two are tokenised together, and the
    continuation's ids are what follows the context's own ids. An empty context is BOS alone.
    `heads` memoises the contexts' own ids (a 2.5k-token context scored with several endings)."""
    if not context:
        return [tok.bos_id], tok.encode(continuation, bos=False)
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    whole = tok.encode(stripped + continuation)
    head = heads.get(stripped) if heads is not None else None
    if head is None:
        head = tok.encode(stripped)
        if heads is not None:
            heads[stripped] = head
    return head, whole[len(head):]


def refuse_overlong(counts: Sequence[tuple[str, int]], window: int, reserve: int, *, source: str, what: str,
                    fix: str, note: str = "") -> None:
    """Before any weights load: ValueError naming the first (id, prompt tokens) in `counts` that
    with `reserve` new tokens does not fit the context window, the count of such, and the fix.
    (The engine itself refuses a prompt of `window` tokens or more, halfway through a run.) `note`
    says where the window came from when no checkpoint file states it."""
    over = [(rid, n) for rid, n in counts if n + reserve > window]
    if over:
        rid, n = over[0]
        room = f" plus {reserve} new tokens" if reserve > 1 else ""
        raise ValueError(f"{source}: {what} {rid!r} has {n} prompt tokens{room}, which exceeds the context "
                         f"window of {window} tokens{note} ({len(over)} in all); {fix}")


def draw(probs: torch.Tensor, seeds: Sequence[int], step: int | Sequence[int]) -> torch.Tensor:
    """One token per row of `probs` (B, V), non-negative, not necessarily normalised: row i
    inverts its cumulative distribution at `uniform(seeds[i], step)`. The draw depends on the
    row's seed and the step only, so a row samples the same whatever its batch, and a whole batch
    is sampled in a few kernels instead of one generator call per row."""
    steps = [step] * len(seeds) if isinstance(step, int) else step
    u = torch.tensor([uniform(s, t) for s, t in zip(seeds, steps)], dtype=torch.float64, device=probs.device)
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


def _compact(cache: KVCache, finished: Sequence[int], n_slots: int, span: int) -> list[int]:
    """Drop the `finished` batch slots from `cache` in place; returns, for each remaining slot, the
    old slot whose row it now holds. The last live rows move into the holes (their slots [0, span),
    all that was written), so each finished row costs one row's copy and no new buffer: the cache
    tensors become leading views of the same storage (and stay contiguous, as native.py needs)."""
    done = set(finished)
    n_keep = n_slots - len(done)
    movers = [s for s in range(n_keep, n_slots) if s not in done]
    keep = [movers.pop() if s in done else s for s in range(n_keep)]
    for dst, src in enumerate(keep):
        if dst != src:
            for t in cache.k + cache.v:  # (B, kvh, S, D): row src -> row dst, no overlap
                t[dst, :, :span].copy_(t[src, :, :span])
    cache.k = [t[:n_keep] for t in cache.k]
    cache.v = [t[:n_keep] for t in cache.v]
    return keep


def _check_logits(logits: torch.Tensor, rows: Sequence[int], step: int | Sequence[int],
                  top: Optional[torch.Tensor] = None) -> None:
    """NaN (or +inf) logits sample the last id, and so do logits that exclude every token: both
    are errors to report, not tokens. One reduction per step (`top`, the rows' maxima, when the
    caller has them); it syncs where `chosen` does anyway."""
    if top is None:
        top = logits.max(dim=-1).values  # NaN if any NaN; -inf if every token is excluded
    if bool(torch.isfinite(top).all()):
        return
    slot = int((~torch.isfinite(top)).nonzero()[0, 0])
    row = rows[slot] if rows else slot
    step = step if isinstance(step, int) else step[slot]
    if torch.isneginf(top[slot]):
        raise ValueError(f"prompt {row}, new token {step + 1}: every token is excluded (logit_bias of -inf, or "
                         "min_new_tokens holding off the only possible token); allow at least one token")
    raise FloatingPointError(f"prompt {row}, new token {step + 1}: the model's logits are NaN or infinite; the "
                             "weights hold NaN/inf or the dtype overflowed: check the checkpoint, or try --dtype fp32")


def stop_prefix_len(text: str, stops: Sequence[str | StopRule]) -> int:
    """Length of the longest end of `text` that could still grow into a stop."""
    best = 0
    for stop in stops:
        if not isinstance(stop, str):
            best = max(best, stop.partial(text))
            continue
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


def _find_stop(text: str, stops: Sequence[str | StopRule], start: int, max_len: int) -> Optional[int]:
    """Index in `text` where the earliest stop begins, among those ending after `start` (a string
    stop of at most `max_len` characters begins at `start - max_len` or later)."""
    hits = [i for s in stops if isinstance(s, str) and s and (i := text.find(s, max(0, start - max_len))) >= 0]
    hits += [i for s in stops if not isinstance(s, str) and (i := s.find(text, start)) is not None]
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
