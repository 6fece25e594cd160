"""The generating stages' one switch between engines: `--backend our` (builder.build + Engine,
under torchrun with fairscale tensor parallelism) or `--backend vllm` (vllm_backend, one process,
vLLM's own tensor parallelism). Both give an object with `generate(prompts, params, seeds=...,
on_text=...) -> list[Generation]` and `cache_prefix(prefix)`, and a loaded model's `world`, `name`
and `tokenizer`, so a stage's records do not depend on the backend."""

from __future__ import annotations

from typing import Literal, Optional, get_args

Backend = Literal["our", "vllm"]
BACKENDS: tuple[Backend, ...] = get_args(Backend)


def check_backend(backend: str) -> None:
    """Before any model work: a known backend, and vLLM's launch rule (one process)."""
    if backend not in BACKENDS:
        raise ValueError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "vllm":
        from .vllm_backend import check_launch

        check_launch()


def open_engine(backend: Backend, ckpt_dir: Optional[str] = None, *, tokenizer_path: Optional[str] = None,
                adapter: Optional[str] = None, model_parallel_size: Optional[int] = None, seed: int = 0,
                dtype: Optional[str] = None, max_seq_len: Optional[int] = None):
    """(loaded, engine): `loaded` has .world, .name, .tokenizer, .ckpt_dir; `engine` generates."""
    check_backend(backend)
    kwargs = dict(tokenizer_path=tokenizer_path, adapter=adapter, model_parallel_size=model_parallel_size, seed=seed,
                  dtype=dtype, max_seq_len=max_seq_len)
    if backend == "vllm":
        from .vllm_backend import open_vllm

        return open_vllm(ckpt_dir, **kwargs)
    from . import builder  # looked up now, so that a test's stand-in for builder.build is used
    from .generation import Engine

    loaded = builder.build(ckpt_dir, **kwargs)
    return loaded, Engine(loaded.model, loaded.tokenizer)


def open_scheduler(engine, *, max_in_flight: int, kv_budget_bytes: Optional[int] = None):
    """What the stages stream their requests through: `run(requests)` yields each finished
    Request. Our engine: the continuous-batching Scheduler. vLLM: its own scheduler, fed up to
    `max_in_flight` requests at a time (the KV cache is vLLM's to size)."""
    from .generation import Engine
    from .scheduler import Scheduler

    if isinstance(engine, Engine):
        return Scheduler(engine, max_in_flight=max_in_flight, kv_budget_bytes=kv_budget_bytes)
    return _Runs(engine, max_in_flight)


class _Runs:
    def __init__(self, engine, max_in_flight: int):
        self.engine, self.max_in_flight = engine, max_in_flight

    def run(self, requests):
        return self.engine.run(requests, max_in_flight=self.max_in_flight)
