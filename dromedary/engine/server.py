"""The OpenAI-compatible HTTP front of the scheduler.

One process owns the model. Its engine loop, the only thread that touches the `Scheduler`, hands
new rows to it and runs one step at a time while any are pending, and sleeps otherwise. HTTP
handler threads (one per connection: the standard library's ThreadingHTTPServer) check a request
(`openai_api`), give its rows to the loop and wait on their own queue for text deltas and finished
generations. A client that goes away cancels its rows, which frees their slots at the next step.

Under torchrun with model parallelism every rank must run the same schedule: rank 0 serves HTTP,
and before each step its loop broadcasts what changed (rows submitted: token ids, parameters, seed;
rows cancelled) on a gloo group that may wait for days; the other ranks submit the same rows to
their own Scheduler, in the same order, and step in lockstep.

Routes are a table of path -> method -> handler, so a page or an endpoint is one more entry.
"""

from __future__ import annotations

import datetime
import hmac
import itertools
import json
import queue
import select
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

from .. import distributed
from . import openai_api as api
from .generation import Generation
from .openai_api import ApiError, ModelCard, Plan, Row
from .scheduler import Request, Scheduler

MAX_BODY_BYTES = 16 << 20
# How often a waiting handler looks whether its client is still there.
POLL_SECONDS = 0.1
# The other ranks wait in a broadcast while rank 0 has no request: far past the default
# process-group timeout, which would kill an idle server.
IDLE_TIMEOUT = datetime.timedelta(days=30)


# ---------------------------------------------------------------------------------------------
# The engine loop
# ---------------------------------------------------------------------------------------------


class Job:
    """One HTTP request's rows: what the loop reports about them arrives on `events` as
    ("text", index, delta), ("done", index, Generation) or ("error", index, message)."""

    def __init__(self, stream: bool):
        self.stream = stream  # text deltas are wanted, not only the finished generations
        self.events: queue.Queue = queue.Queue()
        self.uids: dict[int, int] = {}  # row index -> the loop's id of that row
        self.open: set[int] = set()  # row indices not finished


class Link:
    """Rank 0 -> the other model-parallel ranks: what changed before each step."""

    def __init__(self, world: distributed.World):
        import torch.distributed as dist

        self.single = world.world_size == 1
        self.group = None if self.single else dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)

    def share(self, obj):
        return obj if self.single else distributed.broadcast_object(obj, src=0, group=self.group)


@dataclass
class Counters:
    submitted: int = 0
    finished: int = 0
    cancelled: int = 0
    failed: int = 0


class EngineLoop:
    def __init__(self, make_scheduler: Callable[[], Scheduler], link: Optional[Link] = None):
        self._make = make_scheduler
        self.sched = make_scheduler()
        self.link = link
        self.cond = threading.Condition()
        self._changes: list[tuple] = []  # ("submit", uid, ids, params, seed) / ("cancel", uid), in order
        self._jobs: dict[int, tuple[Job, int]] = {}  # uid -> (job, row index), rank 0's
        self._live: dict[int, Request] = {}  # uid -> request in the scheduler (every rank)
        self._uids = itertools.count()
        self._stopping = False
        # Rank 0 has not yet broadcast what the other ranks wait for (they wait from the start).
        self._idle = True
        self.counters = Counters()

    # ------------------------------------------------------------------ any thread (rank 0)
    def submit(self, job: Job, rows: list[Row]) -> None:
        with self.cond:
            for row in rows:
                uid = next(self._uids)
                self._jobs[uid] = (job, row.index)
                job.uids[row.index] = uid
                job.open.add(row.index)
                self._changes.append(("submit", uid, row.ids, row.params, row.seed))
            self.cond.notify()

    def cancel(self, job: Job) -> None:
        with self.cond:
            self._changes.extend(("cancel", job.uids[i]) for i in sorted(job.open))
            job.open.clear()
            self.cond.notify()

    def stop(self) -> None:
        with self.cond:
            self._stopping = True
            self.cond.notify()

    def status(self) -> dict:
        """GET /health: rows submitted and not yet answered ("active"), and counts since the start."""
        with self.cond:
            return {"active": len(self._jobs), **self.counters.__dict__}

    # ------------------------------------------------------------------ the loop's thread
    def run(self) -> None:
        """Rank 0: until stop(), apply what handlers asked for and step while anything is pending."""
        while True:
            with self.cond:
                while not (self._changes or self._stopping or self._live):
                    self._idle = True
                    self.cond.wait()
                self._idle = False
                changes, self._changes = self._changes, []
                if self._stopping:
                    changes.append(("stop",))
            if self.link is not None:
                self.link.share(changes)
            if not self._apply(changes, main=True):
                return
            self._step(main=True)

    def close(self) -> None:
        """Rank 0, after run() left by an exception (Ctrl-C): if it was waiting for requests, the
        other ranks are waiting in the same broadcast, and are told to stop. (Interrupted inside a
        step, the ranks are out of step; torchrun stops them.)"""
        if self.link is not None and not self.link.single and self._idle:
            self._idle = False
            self.link.share([("stop",)])

    def mirror(self) -> None:
        """The other ranks: the same changes, the same steps, no HTTP."""
        while True:
            if not self._apply(self.link.share(None), main=False):
                return
            self._step(main=False)

    def _apply(self, changes: list[tuple], main: bool) -> bool:
        for change in changes:
            if change[0] == "stop":
                return False
            if change[0] == "submit":
                _, uid, ids, params, seed = change
                on_text = None
                if main:
                    job, index = self._jobs[uid]
                    if job.stream:
                        on_text = (lambda q, i: lambda delta: q.put(("text", i, delta)))(job.events, index)
                request = Request(ids, params, seed=seed, on_text=on_text, key=uid)
                try:
                    self.sched.submit(request)  # openai_api checked the request: this is not expected to fail
                except ValueError as err:  # the same on every rank: each skips the row
                    if main:
                        with self.cond:
                            job, index = self._jobs.pop(uid)
                            job.events.put(("error", index, f"the engine refused the request: {err}"))
                            self.counters.failed += 1
                    continue
                self._live[uid] = request
                if main:
                    self.counters.submitted += 1
            elif change[0] == "cancel" and change[1] in self._live:
                self.sched.cancel(self._live[change[1]])
        return True

    def _step(self, main: bool) -> None:
        if not self._live:
            return
        try:
            finished = self.sched.step()
        except Exception as err:  # noqa: BLE001 - the server must outlive one bad step
            # Every row in flight fails (their cache state is unknown) and a fresh scheduler takes
            # the next requests; every rank meets the same error in the same step.
            traceback.print_exc()
            message = f"the engine failed: {type(err).__name__}: {err}"
            with self.cond:
                for uid in self._live:
                    if main and uid in self._jobs:
                        job, index = self._jobs.pop(uid)
                        job.events.put(("error", index, message))
                        self.counters.failed += 1
                self._live.clear()
            self.sched = self._make()
            return
        with self.cond:
            for request in finished:
                uid = request.key
                self._live.pop(uid, None)
                if main and uid in self._jobs:
                    job, index = self._jobs.pop(uid)
                    gen = request.result
                    if gen.finish_reason == "cancelled":
                        self.counters.cancelled += 1
                    else:
                        self.counters.finished += 1
                    job.events.put(("done", index, gen))


# ---------------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------------


class ClientGone(Exception):
    """The client closed its connection: its rows are cancelled, nothing more is written."""


class Exchange(BaseHTTPRequestHandler):
    """One connection; each request on it goes to `App.dispatch`."""

    protocol_version = "HTTP/1.1"  # keep-alive: the openai client reuses its connections
    server_version = "dromedary-serve"
    timeout = 600  # an idle keep-alive connection is closed after this long
    server: "_HTTPServer"

    def do_GET(self):
        self.server.app.dispatch(self, "GET")

    def do_POST(self):
        self.server.app.dispatch(self, "POST")

    def do_PUT(self):
        self.server.app.dispatch(self, "PUT")

    def do_DELETE(self):
        self.server.app.dispatch(self, "DELETE")

    def log_message(self, format, *args):
        if self.server.app.log_requests:
            sys.stderr.write(f"{self.address_string()} - {format % args}\n")

    # ------------------------------------------------------------------ reading
    def read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.close_connection = True
            raise ApiError(411, "send the body with a Content-Length, not chunked")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.close_connection = True
            raise ApiError(400, "Content-Length is not a number") from None
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            raise ApiError(413, f"the body has {length} bytes; at most {MAX_BODY_BYTES}")
        return self.rfile.read(length) if length > 0 else b""

    def client_gone(self) -> bool:
        """True once the peer has closed: the socket reads as ready with nothing to read."""
        try:
            ready, _, _ = select.select([self.connection], [], [], 0)
            return bool(ready) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    # ------------------------------------------------------------------ writing
    def send_json(self, status: int, obj: Any) -> None:
        self.send_bytes(status, json.dumps(obj, ensure_ascii=False).encode(), "application/json")

    def send_bytes(self, status: int, data: bytes, content_type: str, headers: Optional[dict[str, str]] = None) -> None:
        self._write_head(status, {"Content-Type": content_type, "Content-Length": str(len(data)), **(headers or {})})
        self._write(data)

    def start_events(self) -> None:
        """Server-sent events, each in one HTTP chunk so the client sees it at once."""
        self._write_head(200, {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                               "Transfer-Encoding": "chunked"})

    def send_event(self, obj: Any) -> None:
        payload = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
        data = f"data: {payload}\n\n".encode()
        self._write(b"%x\r\n%s\r\n" % (len(data), data))

    def end_events(self) -> None:
        self.send_event("[DONE]")
        self._write(b"0\r\n\r\n")

    def _write_head(self, status: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()  # flushes the headers
        self.head_sent = True

    def _write(self, data: bytes) -> None:
        try:
            self.wfile.write(data)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, socket.timeout) as err:
            raise ClientGone from err

    head_sent = False


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # a burst of clients connecting at once is not refused
    app: "App"


Handler = Callable[[Exchange, bytes], None]


@dataclass
class Route:
    methods: dict[str, Handler]
    auth: bool = True  # the API key is asked for


@dataclass
class App:
    card: ModelCard
    loop: EngineLoop
    api_key: Optional[str] = None
    log_requests: bool = True
    routes: dict[str, Route] = field(default_factory=dict)

    def __post_init__(self):
        card = self.card
        self.route("/v1/models", "GET", lambda ex, _: ex.send_json(200, api.models(card)))
        self.route("/v1/completions", "POST", lambda ex, b: self.generate(ex, api.plan_completion(_json(b), card)))
        self.route("/v1/chat/completions", "POST", lambda ex, b: self.generate(ex, api.plan_chat(_json(b), card)))
        self.route("/health", "GET", lambda ex, _: ex.send_json(200, {"status": "ok", **self.loop.status()}),
                   auth=False)

    def route(self, path: str, method: str, handler: Handler, auth: bool = True) -> None:
        r = self.routes.setdefault(path, Route({}, auth))
        r.methods[method] = handler
        r.auth = r.auth and auth

    # ------------------------------------------------------------------ every request
    def dispatch(self, ex: Exchange, method: str) -> None:
        ex.head_sent = False  # one handler object serves every request of a keep-alive connection
        path = urlsplit(ex.path).path
        route = self.routes.get(path) or self.routes.get(path.rstrip("/"))
        try:
            body = ex.read_body()  # before any answer, so that the connection can carry the next request
            if route is None:
                raise ApiError(404, f"no such endpoint: {method} {path}", code="not_found")
            if route.auth:
                self._check_key(ex)
            handler = route.methods.get(method)
            if handler is None:
                raise ApiError(405, f"{path} accepts {', '.join(sorted(route.methods))}, not {method}")
            handler(ex, body)
        except ApiError as err:
            if not ex.head_sent:
                self._send_error(ex, err)
        except ClientGone:
            ex.close_connection = True
        except Exception as err:  # noqa: BLE001 - a bug in one request must not take the server down
            traceback.print_exc()
            if not ex.head_sent:
                self._send_error(ex, ApiError(500, f"internal error: {type(err).__name__}: {err}"))
            ex.close_connection = True

    def _send_error(self, ex: Exchange, err: ApiError) -> None:
        try:
            ex.send_json(err.status, err.body())
        except ClientGone:
            ex.close_connection = True

    def _check_key(self, ex: Exchange) -> None:
        if self.api_key is None:
            return
        header = ex.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise ApiError(401, "no API key: send the header 'Authorization: Bearer KEY'", code="invalid_api_key")
        if not hmac.compare_digest(given.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "incorrect API key provided", code="invalid_api_key")

    # ------------------------------------------------------------------ generating
    def generate(self, ex: Exchange, plan: Plan) -> None:
        job = Job(plan.stream)
        self.loop.submit(job, plan.rows)
        try:
            if plan.stream:
                self._stream(ex, plan, job)
            else:
                gens = self._collect(ex, job, len(plan.rows))
                ex.send_json(200, api.response(plan, self.card, plan.rows, gens))
        finally:
            if job.open:  # the client left, or the answer failed halfway: free the slots
                self.loop.cancel(job)

    def _events(self, ex: Exchange, job: Job):
        """The job's events until every row is done; ClientGone when the client leaves first."""
        checked = time.monotonic()
        while job.open:
            # Looked at between events too: a stream's deltas may come faster than POLL_SECONDS.
            if time.monotonic() - checked >= POLL_SECONDS:
                if ex.client_gone():
                    raise ClientGone
                checked = time.monotonic()
            try:
                event = job.events.get(timeout=POLL_SECONDS)
            except queue.Empty:
                continue
            kind, index, payload = event
            if kind == "error":
                raise ApiError(500, payload)
            if kind == "done":
                job.open.discard(index)
            yield kind, index, payload

    def _collect(self, ex: Exchange, job: Job, n: int) -> list[Generation]:
        gens: list[Optional[Generation]] = [None] * n
        for kind, index, payload in self._events(ex, job):
            if kind == "done":
                gens[index] = payload
        return gens  # type: ignore[return-value]

    def _stream(self, ex: Exchange, plan: Plan, job: Job) -> None:
        chat = plan.kind == "chat"
        rows = plan.rows
        replies = [api.ReplyStream() for _ in rows]  # chat: the reply's text so far
        shown = [""] * len(rows)  # completions: the text so far
        gens: list[Optional[Generation]] = [None] * len(rows)

        def send(choices: list[dict]) -> None:
            ex.send_event(api.chunk(plan, self.card, choices))

        ex.start_events()
        try:
            for row in rows:
                if chat:
                    send([{"index": row.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                           "finish_reason": None}])
                elif plan.echo:
                    send([{"index": row.index, "text": plan.echo[row.index], "logprobs": None, "finish_reason": None}])
            for kind, i, payload in self._events(ex, job):
                if kind == "text":
                    if chat:
                        new = replies[i].feed(payload)
                        if new:
                            send([{"index": i, "delta": {"content": new}, "logprobs": None, "finish_reason": None}])
                    else:
                        shown[i] += payload
                        send([{"index": i, "text": payload, "logprobs": None, "finish_reason": None}])
                    continue
                gen = gens[i] = payload
                finish = api.FINISH.get(gen.finish_reason, "stop")
                if chat:
                    rest = replies[i].close(api.reply_text(plan, gen))
                    if rest:
                        send([{"index": i, "delta": {"content": rest}, "logprobs": None, "finish_reason": None}])
                    send([{"index": i, "delta": {}, "logprobs": None, "finish_reason": finish}])
                else:
                    rest = gen.text[len(shown[i]):] if gen.text.startswith(shown[i]) else ""
                    logprobs = api.choice_logprobs(plan, self.card.tokenizer, rows[i], gen)
                    send([{"index": i, "text": rest, "logprobs": logprobs, "finish_reason": finish}])
        except ApiError as err:  # the engine failed halfway: said in the stream, which then ends
            ex.send_event(err.body())
        else:
            if plan.include_usage:
                ex.send_event({**api.chunk(plan, self.card, []), "usage": api.usage(plan, gens)})
        ex.end_events()

    # ------------------------------------------------------------------ running
    def listen(self, host: str, port: int) -> _HTTPServer:
        cls = _HTTPServer
        if ":" in host:  # an IPv6 address
            cls = type("_HTTPServer6", (_HTTPServer,), {"address_family": socket.AF_INET6})
        httpd = cls((host, port), Exchange)
        httpd.app = self
        return httpd


def _json(body: bytes) -> Any:
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ApiError(400, f"the body is not valid JSON: {err}") from None


def url_of(httpd: _HTTPServer) -> str:
    host, port = httpd.server_address[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def listen(app: App, host: str, port: int) -> _HTTPServer:
    """Bind the address (before any request can arrive); a taken port is the user's to change."""
    try:
        return app.listen(host, port)
    except OSError as err:
        raise ValueError(f"cannot listen on {host}:{port}: {err.strerror or err}; choose another --port "
                         "(0 picks a free one) or --host") from None


def serve(app: App, httpd: _HTTPServer, on_ready: Callable[[str], None]) -> None:
    """Rank 0: HTTP in a thread, the engine loop in this one, until interrupted."""
    thread = threading.Thread(target=httpd.serve_forever, name="http", daemon=True)
    thread.start()
    on_ready(url_of(httpd))
    try:
        app.loop.run()
    finally:
        httpd.shutdown()
        httpd.server_close()
