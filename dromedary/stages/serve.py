"""dromedary serve: an OpenAI-compatible HTTP server over the continuous-batching scheduler.

Load -> serve: the model is built once, a Scheduler shares it between every request in flight, and
`engine.server` answers /v1/completions, /v1/chat/completions and /v1/models until interrupted.
Chat requests use the conversation format finetune trains on, with this server's system prompt and
assistant name unless a request brings its own system message.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Optional

from ..engine import chat_page, server
from ..engine.builder import build
from ..engine.generation import Engine
from ..engine.openai_api import ModelCard
from ..engine.scheduler import Scheduler, kv_budget_bytes
from ..recipe import templates

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve(
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    adapter: Optional[str] = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: Optional[str] = None,
    model_name: Optional[str] = None,
    system: str = "standard",
    assistant_name: str = templates.DEFAULT_ASSISTANT_NAME,
    max_batch_size: int = 8,
    kv_cache_gb: Optional[float] = None,
    model_parallel_size: Optional[int] = None,
    dtype: Optional[str] = None,
    max_seq_len: Optional[int] = None,
    log_requests: bool = True,
) -> None:
    """Serve a model over HTTP with the OpenAI API: /v1/completions, /v1/chat/completions, /v1/models.

    A browser chat page is at / (http://HOST:PORT/): streaming answers, stop, reset, system prompts,
    temperature, max tokens and a transcript download in chat's /save format.

    Any OpenAI client works: point its base URL at http://HOST:PORT/v1. Requests share the model
    through continuous batching; answers stream as server-sent events with "stream": true. Prints
    the URL once it listens (Ctrl-C stops). Under torchrun with model parallelism, rank 0 serves and
    every rank runs the same schedule. GET /health answers without a key: {"status": "ok", ...}.

    Args:
      ckpt_dir: checkpoint: Meta or HF layout directory, or a .gguf file. Default: the embedded tiny model.
      tokenizer_path: tokenizer.json or tokenizer.model (SentencePiece or tiktoken). Default: CKPT_DIR's own.
      adapter: PEFT LoRA adapter directory to apply (from `dromedary finetune`).
      host: address to listen on. Default 127.0.0.1, this machine only; 0.0.0.0 listens on every interface (set --api_key then).
      port: TCP port; 0 picks a free one (the printed URL says which).
      api_key: clients must send "Authorization: Bearer KEY" (the openai client's api_key). Default: the DROMEDARY_API_KEY environment variable; unset, no key is asked for.
      model_name: the model id clients pass as "model" and /v1/models lists. Default: the adapter's or checkpoint's directory name ("dromedary-default" for the embedded model).
      system: system prompt of chat requests without a system message: standard, concise, verbose, multilingual, or a text file.
      assistant_name: the assistant's name in the system prompt and the "### NAME:" marker; use the name the adapter was trained with.
      max_batch_size: sequences generated together (each choice of each request is one; a finished one's slot goes to the next waiting at once).
      kv_cache_gb: most GB (10^9 bytes) the KV cache of the sequences in flight may take; a request waits for room, and one that could never fit is refused. Default: no cap.
      model_parallel_size: processes sharing the model (tensor parallelism); the server runs one model copy, so this must be the number of processes. Default: the number of processes.
      dtype: fp32, bf16 or fp16. Default: bf16 on GPUs that support it, fp32 on CPU.
      max_seq_len: context window (prompt + answer). Default: the checkpoint's.
      log_requests: print one line per HTTP request on stderr.
    """
    host, system, assistant_name = str(host), str(system), str(assistant_name)
    api_key = os.environ.get("DROMEDARY_API_KEY") if api_key is None else str(api_key)
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise ValueError(f"--port {port!r}: use a TCP port number in 0..65535 (0 picks a free one)")
    if max_batch_size < 1:
        raise ValueError(f"--max_batch_size must be at least 1, got {max_batch_size}")
    budget = kv_budget_bytes(kv_cache_gb)
    if api_key is not None and not api_key.strip():
        raise ValueError("--api_key is empty: give a key, or leave it out to ask for none")
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if model_parallel_size not in (None, world_size):
        raise ValueError(f"--model_parallel_size {model_parallel_size}: serve runs one copy of the model, so it "
                         f"must equal the number of processes ({world_size}); leave it out")
    system_text = templates.load_system_prompt(system, assistant_name)  # a bad name fails before the model
    templates.NextTurn(assistant_name)  # and so does a bad assistant name

    signal.signal(signal.SIGTERM, _interrupt)  # a stop from a process manager (or torchrun) is a Ctrl-C
    loaded = build(ckpt_dir, tokenizer_path=tokenizer_path, adapter=adapter, model_parallel_size=model_parallel_size,
                   dtype=dtype, max_seq_len=max_seq_len)
    engine = Engine(loaded.model, loaded.tokenizer)
    link = server.Link(loaded.world)
    loop = server.EngineLoop(lambda: Scheduler(engine, max_in_flight=max_batch_size, kv_budget_bytes=budget), link)
    if not loaded.world.is_main:
        loop.mirror()
        return
    name = str(model_name) if model_name is not None else _default_name(ckpt_dir, adapter)
    row_tokens = None if budget is None else budget // loop.sched.slot_bytes
    card = ModelCard(name, loaded.tokenizer, engine.max_seq_len, system_text, assistant_name, row_tokens)
    app = server.App(card, loop, api_key=api_key, log_requests=log_requests)
    chat_page.install(app, chat_page.info(card, system=system, checkpoint=None if ckpt_dir is None else str(loaded.path),
                                          adapter=None if adapter is None else str(adapter)))
    if host not in LOOPBACK and api_key is None:
        print(f"dromedary serve: warning: listening on {host} with no API key: anyone who can reach this port "
              "can use the model (set --api_key)", file=sys.stderr, flush=True)

    def ready(url: str) -> None:
        print(f"dromedary serve: {name} at {url}/v1, chat page at {url}/ (context window {card.window} tokens, "
              f"{max_batch_size} sequences in flight); Ctrl-C stops", flush=True)

    try:
        httpd = server.listen(app, host, port)
        server.serve(app, httpd, ready)
    finally:
        loop.close()  # under torchrun, the other ranks stop too


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _default_name(ckpt_dir: Optional[str], adapter: Optional[str]) -> str:
    if adapter:
        return Path(adapter).expanduser().resolve().name
    if ckpt_dir:
        path = Path(ckpt_dir).expanduser().resolve()
        return path.stem if path.suffix == ".gguf" else path.name
    return "dromedary-default"
