"""Continuous batching: requests enter a queue, up to N rows are in flight, and a finished row's slot
is refilled from the queue in the same step loop.

A fixed batch lives as long as its longest row: with answers of a few dozen to 512 tokens, a batch
of 8 ends with one row decoding alone while every step still reads all the weights. Here each step
(1) prefills waiting rows' prompts, at most `prefill_chunk` tokens per step so that a long prompt
does not stall the rows that are decoding, (2) samples one token for every decoding row, each with
its own sampling parameters, stops, budget and seed, (3) retires the rows that finished and (4) runs
one decoding pass over the rest. Rows admitted in (1) join the decoding rows as soon as their
prompt is in.

KV memory: rows live in a pool, one `KVCache` of (R, kv heads, S, head dim) per layer, R rows of S
slots. The decoding rows hold pool rows [0, d) and the rows still prefilling [d, n), so a decoding
pass reads a leading view of the buffers (contiguous, as native.py needs). A retired row's hole is
filled by moving one live row into it (its written slots only), never by copying the pool. The pool
is allocated for every row that may be in flight and for the longest row about to be admitted, and
regrown (at least doubling its slots, one whole-pool copy) only when a longer row comes, within
`kv_budget_bytes`. Rows whose prompt starts with one of the engine's cached prefixes
(`Engine.cache_prefix`, or the last block `Engine.generate` built) attend to it in place: there is
one pool per prefix, each decoded in its own pass.

A row's output does not depend on what else is in flight: its positions, its cache slots, its
sampling draws (`generation.draw`, from its seed and its own step count) are its own; in fp32 its
tokens are those it gets alone from `Engine.generate` (tested). Under model parallelism every rank
runs the same schedule: rank 0's view of the queue and of cancellations is broadcast each step,
and the sampled tokens are broadcast as in `Engine.generate`.
"""

from __future__ import annotations

import collections
import itertools
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch

from .. import distributed
from ..llama.model import KVCache
from ..llama.tokenizer import StreamDecoder
from .generation import (Engine, FinishReason, Generation, SamplingParams, _available_memory, _find_stop, _Prefix,
                         stop_prefix_len)

# Prompt tokens prefilled per step (all admitted rows together): long enough that a prefill pass
# is bound by arithmetic, not by reading the weights; short enough that decoding rows wait little.
PREFILL_CHUNK = 512
# A part-way chunk shorter than this (of a prompt that needs more) waits for the next step's budget
# instead of taking a pass of its own: a pass of a few tokens costs nearly what one of a hundred
# does (each pass reads every weight), and on a 2-core CPU those slivers were a seventh of W4's
# prefill time.
MIN_PART_CHUNK = 64
# Slots per pool row are allocated in multiples of this (fewer regrowths).
SLOT_ROUND = 64


@dataclass(eq=False)
class Request:
    prompt: str | Sequence[int]
    params: SamplingParams
    seed: int = 0  # the row's sampling seed (as Engine.generate's seeds[i])
    # Streamed text deltas; what is streamed is always a prefix of the final text.
    on_text: Optional[Callable[[str], None]] = None
    key: Any = None  # the caller's handle, untouched
    result: Optional[Generation] = None  # set when finished
    _ids: list[int] = field(default_factory=list, init=False, repr=False)
    _seq: int = field(default=-1, init=False, repr=False)  # submission number: the same on every rank
    _cancelled: bool = field(default=False, init=False, repr=False)


@dataclass(eq=False)
class _Row:
    req: Request
    own: list[int]  # the prompt's tokens after the shared prefix (at least one)
    budget: int  # new tokens at most: max_new_tokens, or what the prompt leaves of the window
    stream: StreamDecoder
    filled: int = 0  # own prompt tokens already in the cache
    tokens: list[int] = field(default_factory=list)
    shown: int = 0  # characters already passed to on_text
    token_logprobs: Optional[list[float]] = None
    top_logprobs: Optional[list[dict[int, float]]] = None

    @property
    def written(self) -> int:
        """Cache slots that may hold this row's keys: its prompt so far, then its sampled tokens
        (the last one's only once the next pass has run; one stale slot more is harmless)."""
        return self.filled + len(self.tokens)

    @property
    def slots_needed(self) -> int:
        # The last sampled token is never fed, so own + budget - 1 slots; one spare keeps it simple.
        return len(self.own) + self.budget


class _Pool:
    """The rows attending to one shared prefix (or to none) and their cache buffers."""

    def __init__(self, prefix: Optional[_Prefix]):
        self.prefix = prefix
        self.cache: Optional[KVCache] = None  # (R, kvh, S, D) per layer
        self.rows: list[_Row] = []  # pool row i holds rows[i]; [0, n_dec) are decoding
        self.n_dec = 0
        self.logits: Optional[torch.Tensor] = None  # (n_dec, vocab): the next token's, per decoding row
        self.chosen: Optional[torch.Tensor] = None  # (n_dec,) tokens to feed in the next pass

    @property
    def capacity(self) -> tuple[int, int]:
        return (0, 0) if self.cache is None else (self.cache.k[0].shape[0], self.cache.k[0].shape[2])

    def view(self, start: int, stop: int) -> KVCache:
        """Pool rows [start, stop) as a cache (leading or single-row views of the same buffers)."""
        c = self.cache
        view = KVCache(k=[t[start:stop] for t in c.k], v=[t[start:stop] for t in c.v])
        if self.prefix is not None:
            view.prefix_k, view.prefix_v = self.prefix.cache.prefix_k, self.prefix.cache.prefix_v
        return view

    def move(self, src: int, dst: int) -> None:
        """Row src's written slots into pool row dst (no overlap: different rows)."""
        span = self.rows[src].written
        if span:
            for t in self.cache.k + self.cache.v:
                t[dst, :, :span].copy_(t[src, :, :span])
        self.rows[dst] = self.rows[src]


class Scheduler:
    def __init__(self, engine: Engine, *, max_in_flight: int = 8, kv_budget_bytes: Optional[int] = None,
                 prefill_chunk: int = PREFILL_CHUNK):
        """`max_in_flight`: rows decoded together at most; `kv_budget_bytes`: the most the rows'
        KV-cache buffers may take (the shared prefixes are the engine's and not counted); a request
        waits while admitting it would pass the budget. Default: half the memory free on the
        weights' device when the scheduler starts."""
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        if kv_budget_bytes is not None and kv_budget_bytes <= 0:
            raise ValueError(f"the KV-cache budget must be positive, got {kv_budget_bytes} bytes")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1, got {prefill_chunk}")
        self.engine = engine
        self.max_in_flight = max_in_flight
        self.kv_budget_bytes = kv_budget_bytes if kv_budget_bytes is not None else _free_memory_half(engine.device)
        self.prefill_chunk = prefill_chunk
        model = engine.model
        attention = model.layers[0].attention
        elem = torch.empty((), dtype=engine.dtype).element_size()
        # Bytes of one slot of one row: keys and values of every layer.
        self.slot_bytes = 2 * model.args.n_layers * attention.n_local_kv_heads * model.args.head_size * elem
        self._lock = threading.Lock()
        self._waiting: collections.deque[Request] = collections.deque()
        self._cancel: set[int] = set()
        self._counter = itertools.count()
        self._pools: dict[int, _Pool] = {}  # by id of the prefix (0: none)
        self._mp = distributed.world().mp_size > 1 if _has_world() else False

    # ------------------------------------------------------------------------------ queue
    def submit(self, request: Request) -> None:
        """Queue a request (thread-safe). Its prompt and parameters are checked here: a bad one
        raises ValueError in the caller's thread and is not queued."""
        request.params.check()
        eng = self.engine
        ids = eng.tok.encode(request.prompt) if isinstance(request.prompt, str) else list(request.prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= eng.max_seq_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; the context window is {eng.max_seq_len}"
                             + (eng.model.args.window_note if eng.max_seq_len == eng.model.args.max_seq_len else ""))
        request._ids = ids
        request.result = None
        with self._lock:
            request._seq = next(self._counter)
            self._waiting.append(request)

    def cancel(self, request: Request) -> None:
        """Thread-safe: the request leaves at the next step, its slot freed; its result gets
        finish_reason "cancelled" (with what it generated so far)."""
        with self._lock:
            request._cancelled = True
            self._cancel.add(request._seq)

    def pending(self) -> int:
        with self._lock:
            waiting = len(self._waiting)
        return waiting + sum(len(p.rows) for p in self._pools.values())

    def in_flight(self) -> int:
        return sum(len(p.rows) for p in self._pools.values())

    def run(self, requests: Iterable[Request]) -> Iterator[Request]:
        """Submit `requests` lazily (enough to keep every slot busy) and yield each as it finishes."""
        source = iter(requests)
        exhausted = False
        while True:
            while not exhausted and self.pending() < 2 * self.max_in_flight:
                request = next(source, None)
                if request is None:
                    exhausted = True
                else:
                    self.submit(request)
            if not self.pending():
                return
            yield from self.step()

    # ------------------------------------------------------------------------------ one step
    @torch.inference_mode()
    def step(self) -> list[Request]:
        """Admit waiting requests into free slots, prefill, sample one token per decoding row,
        retire the finished rows, run one decoding pass. Returns the requests finished in it."""
        finished: list[Request] = []
        cancels, n_admit = self._decisions()
        if cancels:
            self._drop_cancelled(cancels, finished)
        self._admit(n_admit)
        self._prefill()
        for pool in list(self._pools.values()):
            if pool.n_dec:
                self._sample(pool, finished)
        for pool in self._pools.values():
            if pool.n_dec:
                self._decode(pool)
        return finished

    def _decisions(self) -> tuple[set[int], int]:
        """The cancellations to apply and how many waiting requests may be admitted: rank 0's, on
        every model-parallel rank (a server thread may have submitted or cancelled on one rank
        only between two steps)."""
        with self._lock:
            cancels, self._cancel = self._cancel, set()
            n_waiting = len(self._waiting)
        if self._mp:
            cancels, n_waiting = distributed.broadcast_object((sorted(cancels), n_waiting),
                                                              src=distributed.mp_src_rank(),
                                                              group=distributed.mp_group())
            cancels = set(cancels)
        return cancels, n_waiting

    def _drop_cancelled(self, cancels: set[int], finished: list[Request]) -> None:
        with self._lock:
            kept = collections.deque()
            for req in self._waiting:
                if req._seq in cancels:
                    req.result = Generation("", [], "cancelled", len(req._ids))
                    finished.append(req)
                else:
                    kept.append(req)
            self._waiting = kept
        for pool in self._pools.values():
            gone = [i for i, row in enumerate(pool.rows) if row.req._seq in cancels]
            for i in gone:
                self._finish(pool.rows[i], "cancelled", finished)
            if gone:
                self._retire(pool, gone)

    # ------------------------------------------------------------------------------ admission
    def _admit(self, n_admit: int) -> None:
        eng = self.engine
        checked = False
        # Slots the rows about to be admitted need at most (their prompts counted whole): the pool
        # is sized for all of them at once rather than regrown row by row.
        with self._lock:
            upcoming = list(itertools.islice(self._waiting, max(0, min(n_admit, self.max_in_flight - self.in_flight()))))
        hint = max((len(r._ids) + min(r.params.max_new_tokens, eng.max_seq_len - len(r._ids)) for r in upcoming),
                   default=0)
        while n_admit > 0 and self.in_flight() < self.max_in_flight:
            with self._lock:
                if not self._waiting:
                    return
                req = self._waiting[0]
            if not checked:
                eng._drop_stale_prefixes()
                checked = True
            prefix = self._prefix_for(req._ids)
            p_len = len(prefix.tokens) if prefix is not None else 0
            own = req._ids[p_len:]
            budget = min(req.params.max_new_tokens, eng.max_seq_len - len(req._ids))
            row = _Row(req, own, budget, StreamDecoder(eng.tok, context=own[-1:]))
            if req.params.logprobs is not None:
                row.token_logprobs, row.top_logprobs = [], []
            pool = self._pools.get(id(prefix) if prefix is not None else 0)
            if pool is None:
                pool = _Pool(prefix)
            if not self._make_room(pool, len(pool.rows) + 1, row.slots_needed, hint):
                if self.in_flight() == 0:
                    raise MemoryError(f"the KV-cache budget of {self.kv_budget_bytes} bytes cannot hold one row of "
                                      f"{row.slots_needed} slots ({row.slots_needed * self.slot_bytes} bytes); "
                                      "raise the budget or lower max_new_tokens")
                return  # waits for a row to finish
            self._pools[id(prefix) if prefix is not None else 0] = pool
            with self._lock:
                self._waiting.popleft()
            pool.rows.append(row)
            n_admit -= 1

    def _prefix_for(self, ids: list[int]) -> Optional[_Prefix]:
        """The longest cached prefix `ids` starts with, keeping at least one token of its own."""
        eng = self.engine
        best = None
        for cached in (eng._pinned, eng._prefix):
            if cached is None:
                continue
            n = len(cached.tokens)
            if n < len(ids) and tuple(ids[:n]) == cached.tokens and (best is None or n > len(best.tokens)):
                best = cached
        return best

    def _make_room(self, pool: _Pool, rows: int, slots: int, hint: int = 0) -> bool:
        """Grow `pool` to hold `rows` rows of `slots` slots, within the budget; False if it cannot.
        Where the budget allows, it grows to every row the scheduler may hold and to `hint` slots
        (or double), so that it is rarely regrown (each regrowth copies the pool)."""
        have_rows, have_slots = pool.capacity
        if rows <= have_rows and slots <= have_slots:
            return True
        limit = self.engine.max_seq_len - (len(pool.prefix.tokens) if pool.prefix is not None else 0)
        new_rows = max(have_rows, self.max_in_flight if rows > have_rows else rows)
        want = max(slots, hint, have_slots * 2) if slots > have_slots else have_slots
        new_slots = max(have_slots, min(limit, _round_up(want, SLOT_ROUND)))
        new_slots = max(new_slots, slots)
        if self.kv_budget_bytes is not None:
            others = sum(self._pool_bytes(p) for p in self._pools.values() if p is not pool)
            room = self.kv_budget_bytes - others
            if new_rows * new_slots * self.slot_bytes > room:
                # The least that fits: exactly the rows and slots asked for.
                new_rows, new_slots = max(have_rows, rows), max(have_slots, slots)
                if new_rows * new_slots * self.slot_bytes > room:
                    self._free_idle_pools(keep=pool)
                    others = sum(self._pool_bytes(p) for p in self._pools.values() if p is not pool)
                    if new_rows * new_slots * self.slot_bytes > self.kv_budget_bytes - others:
                        return False
        eng = self.engine
        old = pool.cache
        pool.cache = KVCache.allocate(eng.model, new_rows, new_slots, device=eng.device, dtype=eng.dtype)
        if old is not None:
            for new_t, old_t in zip(pool.cache.k + pool.cache.v, old.k + old.v):
                new_t[: old_t.shape[0], :, : old_t.shape[2]].copy_(old_t)
        return True

    def _pool_bytes(self, pool: _Pool) -> int:
        r, s = pool.capacity
        return r * s * self.slot_bytes

    def _free_idle_pools(self, keep: _Pool) -> None:
        for key, p in list(self._pools.items()):
            if p is not keep and not p.rows:
                del self._pools[key]

    # ------------------------------------------------------------------------------ passes
    def _prefill(self) -> None:
        """Up to `prefill_chunk` prompt tokens in all, rows in pool order (each row's chunks in
        order), several rows per pass: a pass of a few hundred tokens runs the products near
        their best rate, where one short prompt alone does not. A row whose prompt is complete
        joins the decoding rows with its first logits."""
        left = self.prefill_chunk
        for pool in self._pools.values():
            # Rows not started hold nothing in the cache, so they may be reordered freely: longest
            # first, so that the rows of a pass are alike and little of it is padding. At most one
            # row is part-way (the last of a pass that ran out of tokens), and it stays first.
            start = pool.n_dec + (pool.n_dec < len(pool.rows) and pool.rows[pool.n_dec].filled > 0)
            assert all(r.filled == 0 for r in pool.rows[start:]), "a part-way prefill that is not first"
            pool.rows[start:] = sorted(pool.rows[start:], key=lambda r: -len(r.own))
            while left > 0 and pool.n_dec < len(pool.rows):
                took = self._prefill_pass(pool, left)
                if not took:
                    break
                left -= took

    def _prefill_pass(self, pool: _Pool, left: int) -> int:
        """One pass over pool rows [n_dec, n_dec + k): each its next chunk, right-padded to the
        longest (padding writes slots past the row's chunk, which nothing reads before the row's
        own tokens overwrite them). Returns the prompt tokens it took: none when all that is left is
        a sliver of a longer prompt (under MIN_PART_CHUNK tokens, or under the whole budget where
        that is smaller, so that a step with the whole budget always takes something)."""
        eng = self.engine
        first, width = pool.n_dec, 0
        chunks: list[int] = []
        for i in range(first, len(pool.rows)):
            row = pool.rows[i]
            rest = len(row.own) - row.filled
            n = min(rest, left - sum(chunks))
            if n <= 0 or (n < rest and n < min(MIN_PART_CHUNK, self.prefill_chunk)):
                break
            w = max(width, n)
            # Padding must stay within every row's slots, and below a quarter of the pass.
            rows = pool.rows[first : i + 1]
            if chunks and (any(r.filled + w > pool.capacity[1] for r in rows)
                           or w * len(rows) > 1.25 * (sum(chunks) + n)):
                break
            chunks.append(n)
            width = w
        k = len(chunks)
        if not k:
            return 0
        rows = pool.rows[first : first + k]
        tokens = torch.zeros(k, width, dtype=torch.long, device=eng.device)
        for b, (row, n) in enumerate(zip(rows, chunks)):
            tokens[b, :n] = torch.tensor(row.own[row.filled : row.filled + n], device=eng.device)
        p_len = len(pool.prefix.tokens) if pool.prefix is not None else 0
        starts = torch.tensor([p_len + r.filled for r in rows], device=eng.device)
        positions = starts[:, None] + torch.arange(width, device=eng.device)[None]
        logits = eng.model(tokens, positions, pool.view(first, first + k),
                           output_index=torch.tensor(chunks, device=eng.device) - 1)[:, 0]
        done = 0
        for row, n in zip(rows, chunks):
            row.filled += n
            done += row.filled == len(row.own)
        # Only the last row can be part-way: the completed ones are the first `done`.
        if done:
            pool.logits = logits[:done] if pool.logits is None else torch.cat([pool.logits, logits[:done]])
            pool.n_dec += done
        return sum(chunks)

    def _sample(self, pool: _Pool, finished: list[Request]) -> None:
        eng = self.engine
        rows = pool.rows[: pool.n_dec]
        logits = pool.logits
        chosen = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        logprob_rows = [i for i, r in enumerate(rows) if r.token_logprobs is not None]
        log_probs = None
        if logprob_rows:
            # Over the model's distribution (ids past the tokenizer excluded), before any bias,
            # penalty, temperature or truncation: OpenAI's completions `logprobs`.
            raw = logits[logprob_rows].float().clone()
            raw[:, eng.n_words :] = float("-inf")
            log_probs = torch.log_softmax(raw, dim=-1)
        # Rows whose parameters sample alike (budgets and min_new_tokens aside) are sampled
        # together, each at its own step.
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault(_sampling_key(r.req.params), []).append(i)
        for idx in groups.values():
            params = rows[idx[0]].req.params
            sub = logits[idx] if len(idx) < len(rows) else logits
            steps = [len(rows[i].tokens) for i in idx]
            hold = [s < rows[i].req.params.min_new_tokens for s, i in zip(steps, idx)]
            picked = eng._sample(sub, [rows[i].tokens for i in idx], [rows[i].req.seed for i in idx], params,
                                 steps, [rows[i].req._seq for i in idx], hold)
            chosen[idx] = picked
        distributed.broadcast_tensor_mp(chosen)
        done: list[int] = []
        tok = eng.tok
        for i, (row, token) in enumerate(zip(rows, chosen.tolist())):
            if log_probs is not None and row.token_logprobs is not None:
                lp = log_probs[logprob_rows.index(i)]
                row.token_logprobs.append(float(lp[token]))
                k = row.req.params.logprobs
                if k:
                    values, ids = lp.topk(k)
                    row.top_logprobs.append(dict(zip(ids.tolist(), values.tolist())))
                else:
                    row.top_logprobs.append({})
            reason = self._advance(row, token, tok)
            if reason is not None:
                self._finish(row, reason, finished)
                done.append(i)
        pool.chosen = chosen
        if done:
            self._retire(pool, done)

    def _advance(self, row: _Row, token: int, tok) -> Optional[FinishReason]:
        """Take a sampled token into the row: its text, stops and budget (as Engine.generate)."""
        params = row.req.params
        stream = row.stream
        if token in tok.stop_ids:
            return "eos"
        row.tokens.append(token)
        delta = stream.feed(token)
        max_stop = max((len(s) for s in params.stop if isinstance(s, str)), default=0)
        cut = _find_stop(stream.text, params.stop, len(stream.text) - len(delta), max_stop) if delta else None
        if cut is not None:
            stream.emitted = stream.text[:cut]
            return "stop"
        if len(row.tokens) == row.budget:
            return "length"
        if row.req.on_text is not None and delta:
            # Hold back a tail that may still grow into a stop string.
            self._show(row, len(stream.text) - stop_prefix_len(stream.text, params.stop))
        return None

    def _show(self, row: _Row, upto: int) -> None:
        if row.req.on_text is not None and upto > row.shown:
            row.req.on_text(row.stream.text[row.shown : upto])
        row.shown = max(row.shown, upto)

    def _finish(self, row: _Row, reason: FinishReason, finished: list[Request]) -> None:
        if reason not in ("stop", "cancelled"):
            row.stream.flush()
        if reason != "cancelled":
            self._show(row, len(row.stream.text))
        text = row.stream.text if reason != "cancelled" else row.stream.text[: row.shown]
        req = row.req
        req.result = Generation(text, row.tokens, reason, len(req._ids), token_logprobs=row.token_logprobs,
                                top_logprobs=row.top_logprobs)
        finished.append(req)

    def _retire(self, pool: _Pool, gone: Sequence[int]) -> None:
        """Drop pool rows `gone`: decoding rows stay a dense block [0, d), prefilling rows follow
        it; each hole is filled by moving one live row (its written slots), never the whole pool."""
        gone_set = set(gone)
        n_dec, n = pool.n_dec, len(pool.rows)
        dec_keep = [i for i in range(n_dec) if i not in gone_set]
        pre_keep = [i for i in range(n_dec, n) if i not in gone_set]
        new_dec = len(dec_keep)
        # Decoding rows: holes below new_dec are filled from the survivors above it.
        movers = [i for i in dec_keep if i >= new_dec]
        order = list(range(new_dec))  # old pool row now at each decoding position
        for dst in range(new_dec):
            if dst in gone_set:
                src = movers.pop()
                pool.move(src, dst)
                order[dst] = src
        # Prefilling rows follow the decoding ones. Those not started hold nothing in the cache
        # and are placed by the list alone; the one part-way (at most one, see _prefill_pass)
        # must come first, and its slots move with it.
        waiting = [pool.rows[i] for i in pre_keep]
        part = [(i, r) for i, r in zip(pre_keep, waiting) if r.filled]
        if part:
            src, row = part[0]
            if src != new_dec:
                pool.move(src, new_dec)
            waiting = [row] + [r for r in waiting if r is not row]
        pool.rows[new_dec:] = waiting
        # The per-decoding-row tensors follow their rows (a cancel comes between a pass and the
        # sampling of its logits).
        for name in ("chosen", "logits"):
            t = getattr(pool, name)
            if t is not None and t.shape[0] == n_dec:
                setattr(pool, name, t[torch.tensor(order, dtype=torch.long, device=t.device)] if order else None)
        pool.n_dec = new_dec

    def _decode(self, pool: _Pool) -> None:
        """One pass: each decoding row's last sampled token -> the logits of its next."""
        eng = self.engine
        d = pool.n_dec
        slots = [len(r.own) + len(r.tokens) - 1 for r in pool.rows[:d]]
        view = pool.view(0, d)
        chosen = pool.chosen[:d]
        fast = eng._fast_step if eng._fast_step is not None and eng._fast_step.usable() else None
        if fast is not None:
            pool.logits = fast.step(chosen, slots, view)
        else:
            slot_t = torch.tensor(slots, device=eng.device)
            pool.logits = eng.model(chosen[:, None], (view.prefix_len + slot_t)[:, None], view)[:, -1]


def _sampling_key(params: SamplingParams) -> tuple:
    """What `Engine._sample` reads of the parameters besides min_new_tokens (passed per row)."""
    return (params.temperature, params.top_p, params.top_k, tuple(sorted(params.logit_bias.items())),
            tuple(params.ngram_penalties))


def _free_memory_half(device: torch.device) -> Optional[int]:
    """Half the memory now free on `device` (None where it cannot be told)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    free = _available_memory() if device.type == "cpu" else 0
    return free // 2 if free > 0 else None


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _has_world() -> bool:
    try:
        distributed.world()
        return True
    except RuntimeError:  # distributed.setup() not called (a library user with a plain model)
        return False


def kv_budget_bytes(gb: Optional[float]) -> Optional[int]:
    """A stage's --kv_cache_gb as bytes (None: no cap); refused before any model work."""
    if gb is None:
        return None
    if isinstance(gb, bool) or not isinstance(gb, (int, float)) or not gb > 0:
        raise ValueError(f"--kv_cache_gb must be a positive number of GB, got {gb!r}")
    return int(gb * 1e9)
