"""The `dromedary` model type of lm-evaluation-harness: any of its tasks on any checkpoint we load.

    lm_eval --model dromedary --model_args ckpt_dir=DIR,adapter=ADAPTER,model_parallel_size=K --tasks ...
    torchrun --nproc_per_node K -m lm_eval --model dromedary --model_args ckpt_dir=DIR ...

`loglikelihood` and `loglikelihood_rolling` score through `Engine.score_tokens` (the longest token
prefix shared by a call's requests, such as a few-shot primer, is computed once through the
engine's shared-prefix cache); `generate_until` streams its requests through the continuous-
batching `Scheduler`, `batch_size` in flight. The harness's own pair encoding
(TemplateLM._encode_pair) and rolling windows are used as they are, so the requests are tokenised
exactly as for its `hf` backend. Under torchrun every rank is a
model-parallel shard of one model: each reports rank 0 of a world of 1 to the harness (its
convention for tensor parallelism), and only global rank 0 writes.

The harness finds this class through lm_eval_hook.py (installed by dromedary-lm-eval.pth).
"""

from __future__ import annotations

import os
from typing import Optional

from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM

from ..engine.builder import build
from ..engine.generation import Engine, SamplingParams


def _optional_int(value) -> Optional[int]:
    return None if value in (None, "", "None") else int(value)


class DromedaryLM(TemplateLM):
    def __init__(self, ckpt_dir: Optional[str] = None, adapter: Optional[str] = None,
                 model_parallel_size=None, tokenizer_path: Optional[str] = None, dtype: Optional[str] = None,
                 max_seq_len=None, batch_size=8, max_gen_toks: int = 256, device: Optional[str] = None,
                 max_batch_size=None, **kwargs):
        super().__init__()
        kwargs.pop("trust_remote_code", None)  # the harness adds some generic arguments
        if kwargs:
            raise ValueError(f"--model dromedary: unknown model_args {', '.join(sorted(kwargs))}; use ckpt_dir, "
                             "adapter, model_parallel_size, tokenizer_path, dtype, max_seq_len, batch_size, max_gen_toks")
        mp = _optional_int(model_parallel_size)
        world_size = int(os.environ.get("WORLD_SIZE", 1))
        if mp not in (None, world_size):
            raise ValueError(f"--model dromedary: model_parallel_size={mp} but {world_size} processes: the harness "
                             "runs one model copy, so launch exactly model_parallel_size processes")
        self.loaded = build(ckpt_dir or None, tokenizer_path=tokenizer_path or None, adapter=adapter or None,
                            model_parallel_size=mp, dtype=dtype or None, max_seq_len=_optional_int(max_seq_len),
                            # The harness passes its own default ("cuda:0"); under torchrun each rank's
                            # device comes from LOCAL_RANK, so only an explicit CPU is taken.
                            device="cpu" if str(device).startswith("cpu") else None)
        self.engine = Engine(self.loaded.model, self.loaded.tokenizer, prepack=False)
        self.tok = self.loaded.tokenizer
        self.batch_size_per_gpu = int(str(batch_size).split(":")[0]) if str(batch_size) != "auto" else 8
        self.max_gen_toks = int(max_gen_toks)

    # The harness's model interface -------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        # What an empty context is scored after: BOS, as the `hf` backend does for LLaMA.
        return self.tok.bos_id

    @property
    def max_length(self) -> int:
        return self.engine.max_seq_len

    @property
    def rank(self) -> int:
        return 0

    @property
    def world_size(self) -> int:
        return 1

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        # The `hf` backend's default for LLaMA tokenizers adds BOS; False leaves it out.
        return self.tok.encode(string, bos=add_special_tokens is not False)

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.tok.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        rows = [(list(context) + list(continuation), len(continuation)) for _, context, continuation in requests]
        self._share_prefix([r for r, _ in rows])
        results = self.engine.score_tokens(rows, max_batch_size=self.batch_size_per_gpu)
        for (cache_key, _, _), result in zip(requests, results):
            if cache_key is not None:
                self.cache_hook.add_partial("loglikelihood", cache_key, result)
        return results

    def _share_prefix(self, rows: list[list[int]]) -> None:
        """Cache the longest token prefix every row shares (less the tokens that must stay in the rows)."""
        if len(rows) < 2:
            return
        first, n = rows[0], 0
        limit = min(len(r) for r in rows) - 1
        while n < limit and all(r[n] == first[n] for r in rows):
            n += 1
        self.engine.cache_prefix(first[:n])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for (string,) in [req.args for req in requests]:
            windows = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string, add_special_tokens=False), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            scores = self._loglikelihood_tokens([(None, context, continuation) for context, continuation in windows])
            total = sum(s for s, _ in scores)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Every request through the engine's scheduler, `batch_size` in flight at once, each with its
        own stops, length and seed: a request's text is the one it gets alone (its seed is the one
        `Engine.generate(..., seed=seed)` gives a single row). The longest token prefix the contexts
        share (a few-shot primer) is computed once."""
        from tqdm import tqdm

        from ..engine.generation import row_seed
        from ..engine.scheduler import Request, Scheduler

        work = []
        for i, (context, gen_kwargs) in enumerate(req.args for req in requests):
            kwargs = dict(gen_kwargs)
            until = kwargs.pop("until", None) or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 0.0)) if sample else 0.0
            params = SamplingParams(max_new_tokens=max_new, temperature=temperature,
                                    top_p=float(kwargs.pop("top_p", 1.0)), stop=tuple(until))
            ids = self.tok_encode(context)[-(self.max_length - max_new):]  # left-truncated, as `hf` does
            seed = row_seed(int(kwargs.pop("seed", 0) or 0), "0")
            work.append((Request(ids, params, seed=seed, key=i), context, gen_kwargs, until))
        if not work:
            return []
        self._share_prefix([w[0].prompt for w in work])
        texts: list[Optional[str]] = [None] * len(work)
        scheduler = Scheduler(self.engine, max_in_flight=self.batch_size_per_gpu)
        with tqdm(total=len(work), desc="generate_until", unit="req", disable=disable_tqdm) as bar:
            for req in scheduler.run(w[0] for w in work):
                _, context, gen_kwargs, until = work[req.key]
                text = req.result.text
                for stop in until:  # the engine cuts at the first stop; the harness cuts at each
                    text = text.split(stop)[0] if stop else text
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                texts[req.key] = text
                bar.update(1)
        return texts
