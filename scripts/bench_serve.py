"""`dromedary serve` under load: time to first token and tokens/s at 1, 8 and 32 concurrent clients.

    python scripts/bench_serve.py                          # starts a server on the embedded default
    python scripts/bench_serve.py --server-args "--ckpt_dir /models/7B --max_batch_size 32"
    python scripts/bench_serve.py --url http://127.0.0.1:8000/v1 --api-key KEY   # a running server
    python scripts/bench_serve.py --clients 1 8 32 --requests 4 --max-tokens 128

Each client is a thread with the `openai` client, sending streamed chat completions one after the
other (`--requests` each) with distinct messages, greedy, `--max-tokens` new tokens. Per level:

  TTFT       time from sending a request to its first streamed text (median and p90 over requests)
  tok/s      completion tokens of every request (the server's own `usage` count) / wall time of
             the level, all clients together; `per client` divides it by the clients
  req/s      requests answered / wall time

A started server gets `--max_batch_size` = the largest client count unless --server-args sets it, so
that the 32-client level measures batching rather than queueing. Levels run in the order given on
one server, after one warm-up request.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOPICS = ("camels", "deserts", "water", "honesty", "rivers", "markets", "stars", "sand", "bread", "tea")


def start(server_args: list[str], key: str) -> tuple[subprocess.Popen, str, Path]:
    log = Path(tempfile.mkdtemp(prefix="bench-serve-")) / "server.log"
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cmd = [sys.executable, "-m", "dromedary", "serve", "--port", "0", "--api_key", key, "--log_requests", "False",
           *server_args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 900
    while time.time() < deadline:
        m = re.search(r"(http://\S+/v1)", log.read_text())
        if m:
            return proc, m.group(1), log
        if proc.poll() is not None:
            sys.exit(f"the server exited {proc.returncode}:\n{log.read_text()}")
        time.sleep(0.2)
    proc.kill()
    sys.exit(f"the server printed no URL:\n{log.read_text()}")


def one_request(client, model: str, i: int, max_tokens: int) -> tuple[float, float, int]:
    """(seconds to the first text, seconds in all, completion tokens) of one streamed chat request."""
    t0 = time.perf_counter()
    first = None
    tokens = 0
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": f"Tell me about {TOPICS[i % len(TOPICS)]} ({i})."}],
        max_tokens=max_tokens, temperature=0, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - t0
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    total = time.perf_counter() - t0
    return (first if first is not None else total), total, tokens


def level(client, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    counter = iter(range(clients * requests))
    lock = threading.Lock()

    def worker(_):
        out = []
        for _ in range(requests):
            with lock:
                i = next(counter)
            out.append(one_request(client, model, i, max_tokens))
        return out

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(worker, range(clients)) for r in rs]
    wall = time.perf_counter() - t0
    ttft = sorted(r[0] for r in results)
    tokens = sum(r[2] for r in results)
    return {"clients": clients, "requests": len(results), "wall": wall, "ttft_p50": statistics.median(ttft),
            "ttft_p90": ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))], "tok_s": tokens / wall,
            "tokens": tokens, "req_s": len(results) / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="a running server's base URL (…/v1); default: start one")
    ap.add_argument("--api-key", default="bench-key")
    ap.add_argument("--server-args", default="", help="flags for the started `dromedary serve`")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=4, help="requests per client per level")
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()

    import openai

    proc = None
    server_args = shlex.split(args.server_args)
    if args.url is None:
        if "--max_batch_size" not in args.server_args:
            server_args += ["--max_batch_size", str(max(args.clients))]
        proc, url, log = start(server_args, args.api_key)
        print(f"server: {url} ({' '.join(server_args)}; log {log})")
    else:
        url = args.url
    try:
        client = openai.OpenAI(base_url=url, api_key=args.api_key, max_retries=0, timeout=600)
        model = client.models.list().data[0].id
        one_request(client, model, 0, 8)  # warm-up: the first request pays for lazy setup
        print(f"model {model}; {args.requests} streamed chat requests per client, {args.max_tokens} new tokens, greedy")
        print(f"{'clients':>7} {'requests':>8} {'wall s':>7} {'TTFT p50 ms':>11} {'TTFT p90 ms':>11} "
              f"{'tok/s':>8} {'per client':>10} {'req/s':>6}")
        for n in args.clients:
            r = level(client, model, n, args.requests, args.max_tokens)
            print(f"{r['clients']:>7} {r['requests']:>8} {r['wall']:>7.2f} {1000 * r['ttft_p50']:>11.1f} "
                  f"{1000 * r['ttft_p90']:>11.1f} {r['tok_s']:>8.1f} {r['tok_s'] / n:>10.1f} {r['req_s']:>6.2f}",
                  flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)


if __name__ == "__main__":
    main()
