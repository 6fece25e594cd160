"""dromedary chat: talk to a model in the terminal, in the chat format that finetune trains on.

Rank 0 owns the terminal and the conversation; it turns each user message into the prompt's token
ids and broadcasts them, and every rank generates in lockstep (tensor parallelism needs them all).
The other ranks hold no state: they loop on "generate these ids" until told to stop.

Ctrl-C while an answer streams: the terminal is switched to byte-at-a-time input with signals off,
so Ctrl-C arrives as the byte 0x03 that rank 0 reads between tokens, not as SIGINT. That matters
under torchrun, whose agent stops every worker on SIGINT: the byte never reaches it, and rank 0
broadcasts the stop flag every few tokens so that every rank leaves the generation at the same step.
"""

from __future__ import annotations

import datetime
import os
import re
import select
import sys
import termios
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist

from .. import distributed, records
from ..engine.builder import build
from ..engine.generation import Engine, SamplingParams, row_seed, stop_prefix_len
from ..llama.tokenizer import Tokenizer
from ..recipe import templates

# Under model parallelism the stop flag travels every this many streamed deltas: a small gloo
# broadcast, cheap next to a forward pass, and the answer stops within a few tokens of Ctrl-C.
STOP_CHECK_EVERY = 4
# How long the other ranks wait for rank 0's user to type; the default process-group timeout
# (10-30 minutes) would kill an idle chat session.
IDLE_TIMEOUT = datetime.timedelta(days=30)
HELP = """commands:
  /reset              forget the conversation (the system prompt stays)
  /system NAME|FILE   switch the system prompt: standard, concise, verbose, multilingual or a text file
  /save FILE          write the conversation to FILE as JSONL (one {"id", "role", "content"} per line)
  /prompt             show the exact text the model read for the last answer
  /help               this list
  /exit               leave (Ctrl-D too)
End a line with \\ to continue the message on the next line. Ctrl-C stops an answer."""


def chat(
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    adapter: Optional[str] = None,
    system: str = "standard",
    prompt: Optional[str] = None,
    temperature: float = 0.7,
    top_p: float = 0.9,
    max_new_tokens: int = 512,
    seed: int = 0,
    assistant_name: str = templates.DEFAULT_ASSISTANT_NAME,
    model_parallel_size: Optional[int] = None,
    dtype: Optional[str] = None,
    max_seq_len: Optional[int] = None,
) -> None:
    """Chat with a model in the terminal; tokens stream as they are generated.

    Interactive when stdin is a terminal: a multi-turn conversation with line editing and history,
    and the commands /reset, /system NAME|FILE, /save FILE, /prompt, /help, /exit (Ctrl-D exits,
    Ctrl-C stops the current answer). The oldest turns are dropped when the conversation outgrows the
    context window. Scriptable: with --prompt TEXT, or with stdin not a terminal
    (`echo "question" | dromedary chat`, where ALL of stdin is one message), it prints only the
    answer and exits. Under torchrun, rank 0 reads the terminal and all ranks generate together.

    Args:
      ckpt_dir: LLaMA checkpoint directory, Meta or HF layout. Default: the embedded tiny model.
      tokenizer_path: tokenizer.json or tokenizer.model (SentencePiece or tiktoken). Default: CKPT_DIR's own.
      adapter: PEFT LoRA adapter directory to apply (from `dromedary finetune`).
      system: system prompt: standard, concise, verbose, multilingual, or the path of a text file.
      prompt: answer this one message, print the answer and exit.
      temperature: sampling temperature; 0 means greedy decoding.
      top_p: nucleus sampling: keep the smallest set of tokens whose probability reaches this.
      max_new_tokens: longest answer, in tokens.
      seed: sampling seed; answer N of a session samples from a seed derived from this and N.
      assistant_name: the assistant's name in the system prompt and the "### NAME:" marker; use the name the adapter was trained with.
      model_parallel_size: processes sharing the model (tensor parallelism); chat runs one model copy, so this must be the number of processes. Default: the number of processes.
      dtype: fp32, bf16 or fp16. Default: bf16 on GPUs that support it, fp32 on CPU.
      max_seq_len: context window (conversation + answer). Default: the checkpoint's.
    """
    system, assistant_name = str(system), str(assistant_name)
    prompt = None if prompt is None else str(prompt)  # Fire turns `--prompt 123` into an int
    params = reply_params(max_new_tokens, temperature, top_p, assistant_name)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if model_parallel_size not in (None, world_size):
        raise ValueError(f"--model_parallel_size {model_parallel_size}: chat runs one copy of the model, so it "
                         f"must equal the number of processes ({world_size}); leave it out")
    system_text = templates.load_system_prompt(system, assistant_name)  # a bad name fails before the model
    is_main = int(os.environ.get("RANK", 0)) == 0
    message = None
    if is_main and prompt is None and not sys.stdin.isatty():
        message = sys.stdin.read()  # scripted: all of stdin is one message
        if not message.strip():
            raise ValueError("stdin is empty: pipe a message in, pass --prompt TEXT, or run in a terminal")
    if prompt is not None:
        if not prompt.strip():
            raise ValueError("--prompt is empty")
        message = prompt

    loaded = build(ckpt_dir, tokenizer_path=tokenizer_path, adapter=adapter, model_parallel_size=model_parallel_size,
                   seed=seed, dtype=dtype, max_seq_len=max_seq_len)
    engine = Engine(loaded.model, loaded.tokenizer)
    link = _Link(loaded.world)
    convo = _Conversation(loaded.tokenizer, engine.max_seq_len, max_new_tokens, system_text, assistant_name)
    convo.check_fits()
    front: Optional[_Front] = None
    if is_main:
        front = (_Scripted(convo, message) if message is not None
                 else _Terminal(convo, system, loaded.name, params, under_torchrun=not link.single))
    with front.session() if front else _nothing():
        _serve(link, engine, params, seed, front)


def reply_params(max_new_tokens: int, temperature: float, top_p: float, assistant_name: str) -> SamplingParams:
    """An answer ends where the model starts the next turn, in any form the sanitiser knows."""
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                            stop=(templates.NextTurn(assistant_name),))
    params.check()
    return params


# ---------------------------------------------------------------------------------------------
# The conversation: history, context window, prompt ids (rank 0 only)
# ---------------------------------------------------------------------------------------------


@dataclass
class _Conversation:
    tok: Tokenizer
    max_seq_len: int
    max_new_tokens: int
    system: str
    name: str
    turns: list = field(default_factory=list)  # every turn since the last /reset, for /save
    start: int = 0  # first turn inside the window; only grows, so each prompt extends the last one
    last_ids: list = field(default_factory=list)

    @property
    def budget(self) -> int:
        # Room for the prompt: the window minus the answer's share (at most half the window, so a
        # huge --max_new_tokens shortens answers instead of leaving no room for the question).
        return self.max_seq_len - min(self.max_new_tokens, self.max_seq_len // 2)

    def _ids(self, system: str, turns: list) -> list[int]:
        return self.tok.encode(templates.format_conversation(system, turns, self.name))

    def check_fits(self) -> None:
        if len(self._ids("", [{"role": "user", "content": "Hi"}])) > self.budget:
            raise ValueError(f"a context window of {self.max_seq_len} tokens has no room for a conversation: "
                             "use a larger --max_seq_len or a smaller --max_new_tokens")

    def ask(self, message: str, note: Callable[[str], None]) -> list[int]:
        """The prompt's token ids for a new user message, dropping old turns to fit the window."""
        user = {"role": "user", "content": message}
        while self.start < len(self.turns) and len(self._ids(self.system, self.turns[self.start:] + [user])) > self.budget:
            self.start += 2  # a user turn and its answer leave together
            note(f"(dropped the oldest turn to fit the {self.max_seq_len}-token context window)")
        system = self.system
        if len(self._ids(system, [{"role": "user", "content": ""}])) > self.budget:
            system = ""
            note("(the system prompt does not fit the context window; left out)")
        ids = self._ids(system, self.turns[self.start:] + [user])
        if len(ids) > self.budget:
            user["content"] = self._left_truncate(system, message, len(ids) - self.budget, note)
            ids = self._ids(system, [user])
        self.turns.append(user)
        self.last_ids = ids
        return ids

    def _left_truncate(self, system: str, message: str, excess: int, note: Callable[[str], None]) -> str:
        pieces = self.tok.encode(message, bos=False)
        keep = max(0, len(pieces) - excess)
        while True:
            text = self.tok.decode(pieces[len(pieces) - keep:]) if keep else ""
            if keep == 0 or len(self._ids(system, [{"role": "user", "content": text}])) <= self.budget:
                break
            keep -= 1
        note(f"(your message has {len(pieces)} tokens, too many for the context window: kept the last {keep})")
        return text

    def answered(self, reply: str) -> None:
        if reply.strip():
            self.turns.append({"role": "assistant", "content": reply})
        else:  # an answer stopped before any text: forget the question too, turns must alternate
            self.turns.pop()

    def reset(self) -> None:
        self.turns, self.start = [], 0

    def transcript(self) -> list[dict]:
        rows = [{"role": "system", "content": self.system}] + self.turns
        return [{"id": str(i), "role": r["role"], "content": r["content"]} for i, r in enumerate(rows)]


# ---------------------------------------------------------------------------------------------
# Rank 0's front ends: where messages come from, where answers go
# ---------------------------------------------------------------------------------------------


class _Front:
    convo: _Conversation
    # Interactive sessions treat SIGINT during an answer (e.g. `kill -INT`) like Ctrl-C.
    sigint_stops_answer = False
    stdout_closed = False

    def next_message(self) -> Optional[str]:
        """The next user message, or None to end the session."""
        raise NotImplementedError

    def stream(self, delta: str) -> None:
        try:
            sys.stdout.write(delta)
            sys.stdout.flush()
        except BrokenPipeError:  # `dromedary chat ... | head -c 100`: stop generating, exit quietly
            self.stdout_closed = True
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())

    def interrupted(self) -> bool:
        return self.stdout_closed

    def session(self):
        return _nothing()

    def generating(self):
        return _nothing()

    def finish(self, reply: str, stopped: bool) -> None:
        raise NotImplementedError


@contextmanager
def _nothing():
    yield


class _Scripted(_Front):
    """--prompt or piped stdin: one answer, printed alone."""

    def __init__(self, convo: _Conversation, message: str):
        self.convo, self.message = convo, message

    def next_message(self) -> Optional[str]:
        message, self.message = self.message, None
        return message

    def finish(self, reply: str, stopped: bool) -> None:
        sys.stdout.write("\n")
        sys.stdout.flush()


class _Terminal(_Front):
    """An interactive session: readline, commands, Ctrl-C read as a byte while answers stream."""

    sigint_stops_answer = True

    def __init__(self, convo: _Conversation, system_label: str, model: str, params: SamplingParams,
                 under_torchrun: bool):
        self.convo, self.system_label, self.under_torchrun = convo, system_label, under_torchrun
        self.fd = sys.stdin.fileno()
        self.pressed_ctrl_c = False
        self._raw = False  # the terminal is in byte-at-a-time mode (only while an answer streams)
        self.typeahead = ""
        self._readline = _setup_readline()
        print(f"dromedary chat: {model}\nsystem prompt: {system_label}; context window {convo.max_seq_len} tokens; "
              f"temperature {params.temperature}. /help for commands, Ctrl-D to exit.", flush=True)

    def note(self, text: str) -> None:
        print(text, flush=True)

    def next_message(self) -> Optional[str]:
        while True:
            try:
                line = self._read_message()
            except EOFError:
                print(flush=True)
                return None
            except KeyboardInterrupt:
                print("^C", flush=True)  # like a shell: drop the line, ask again
                continue
            if not line.strip():
                continue
            if line.startswith("/"):
                if self._command(line.strip()):
                    return None
                continue
            return line

    def _read_message(self) -> str:
        lines = [self._input("You: ")]
        while lines[-1].endswith("\\"):
            lines[-1] = lines[-1][:-1]
            lines.append(self._input("...  "))
        return "\n".join(lines)

    def _input(self, prompt: str) -> str:
        if self._readline is not None and self.typeahead:
            text, self.typeahead = self.typeahead, ""
            self._readline.set_pre_input_hook(lambda: (self._readline.insert_text(text), self._readline.redisplay()))
            try:
                return input(prompt)
            finally:
                self._readline.set_pre_input_hook(None)
        return input(prompt)

    def _command(self, line: str) -> bool:
        """Run a /command; True means exit."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/quit"):
            return True
        if name == "/help":
            self.note(HELP)
        elif name == "/reset":
            self.convo.reset()
            self.note("(conversation cleared)")
        elif name == "/system":
            if not arg:
                self.note(f"system prompt ({self.system_label}):\n{self.convo.system}")
                return False
            try:
                self.convo.system = templates.load_system_prompt(arg, self.convo.name)
            except (ValueError, OSError) as err:
                self.note(f"(error: {err})")
                return False
            self.system_label = arg
            self.note(f"(system prompt: {arg}; the conversation so far is kept)")
        elif name == "/save":
            if not arg:
                self.note("(usage: /save FILE)")
                return False
            try:
                n = records.write_jsonl_atomic(os.path.expanduser(arg), self.convo.transcript(), overwrite=True)
            except OSError as err:
                self.note(f"(error: cannot write {arg}: {err.strerror or err})")
                return False
            self.note(f"(saved {n} lines to {arg})")
        elif name == "/prompt":
            ids = self.convo.last_ids
            self.note(self.convo.tok.decode(ids) if ids else "(no answer yet)")
        else:
            self.note(f"(unknown command {name}; /help lists them)")
        return False

    @contextmanager
    def session(self):
        """Under torchrun, Ctrl-C at the prompt must not send SIGINT either (readline turns signals
        back on while it reads a line): the terminal's interrupt key is switched off, and readline
        binds Ctrl-C to clearing the line, as a shell's Ctrl-C would."""
        if not self.under_torchrun:
            yield
            return
        if self._readline is not None:
            self._readline.parse_and_bind(r'"\C-c": kill-whole-line')
        with _terminal_attrs(self.fd, lambda a: a[6].__setitem__(termios.VINTR, b"\x00")):
            yield

    @contextmanager
    def generating(self):
        sys.stdout.write(f"{self.convo.name}: ")
        sys.stdout.flush()
        self.pressed_ctrl_c = False
        with _keys_as_bytes(self.fd) as self._raw:
            yield

    def interrupted(self) -> bool:
        if self.stdout_closed:
            return True
        if not self.pressed_ctrl_c and self._raw:
            while select.select([self.fd], [], [], 0)[0]:
                data = os.read(self.fd, 1024)
                if not data:
                    break
                if b"\x03" in data:
                    self.pressed_ctrl_c = True
                    break
                self.typeahead += _printable(data.decode("utf-8", "ignore"))
        return self.pressed_ctrl_c

    def finish(self, reply: str, stopped: bool) -> None:
        print(" [stopped]" if stopped else "", flush=True)
        self.convo.answered(reply)


def _setup_readline():
    try:
        import readline
    except ImportError:  # e.g. a Python built without it: plain input() still works
        return None
    from ..cache import cache_root

    path = cache_root() / "chat_history"
    try:
        readline.read_history_file(path)
    except OSError:
        pass
    readline.set_history_length(1000)

    import atexit

    def save() -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)
        except OSError:
            pass

    atexit.register(save)
    return readline


@contextmanager
def _terminal_attrs(fd: int, change: Callable[[list], None]) -> Iterator[bool]:
    """Terminal attributes changed by `change(attrs)` inside the block, restored after it.
    Yields False when fd is not a terminal (nothing changed)."""
    try:
        saved = termios.tcgetattr(fd)
    except termios.error:
        yield False
        return
    attrs = list(saved)
    attrs[6] = list(attrs[6])
    change(attrs)
    termios.tcsetattr(fd, termios.TCSANOW, attrs)
    try:
        yield True
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)


def _bytewise(attrs: list) -> None:
    # Signals, line buffering and echo off: Ctrl-C arrives as the byte 0x03, readable at once.
    attrs[3] &= ~(termios.ISIG | termios.ICANON | termios.ECHO)
    attrs[6][termios.VMIN], attrs[6][termios.VTIME] = 1, 0


def _keys_as_bytes(fd: int):
    return _terminal_attrs(fd, _bytewise)


_ESCAPES = re.compile(r"\x1b(\[[0-9;?]*[ -/]*[@-~]|O.|.)")


def _printable(text: str) -> str:
    """Type-ahead kept for the next prompt: no escape sequences (arrow keys), no control keys."""
    text = _ESCAPES.sub("", text).split("\r")[0].split("\n")[0]
    return "".join(ch for ch in text if ch.isprintable())


# ---------------------------------------------------------------------------------------------
# Every rank: the generation loop
# ---------------------------------------------------------------------------------------------


class _Link:
    """Rank 0 -> all ranks: requests and the stop flag, on a gloo group that waits for the user."""

    def __init__(self, world: distributed.World):
        self.world = world
        self.single = world.world_size == 1
        self.group = None if self.single else dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)

    def share(self, obj):
        return obj if self.single else distributed.broadcast_object(obj, src=0, group=self.group)

    def flag(self, value: bool) -> bool:
        if self.single:
            return value
        t = torch.tensor([int(value)])
        dist.broadcast(t, src=0, group=self.group)
        return bool(t.item())


class _Stop(Exception):
    """Raised from the streaming callback to leave Engine.generate (inference only: safe)."""


class _ReplyStream:
    """Shows the streamed text that is certainly part of the reply: no leading or trailing blanks,
    nothing that could still become a role marker ("### Us" before "er:")."""

    def __init__(self, stops, show: Optional[Callable[[str], None]]):
        self.stops, self.show = list(stops), show
        self.raw, self.shown = "", ""

    def feed(self, delta: str) -> None:
        self.raw += delta
        text = self.raw.lstrip()
        safe = text[: len(text) - stop_prefix_len(text, self.stops)].rstrip()
        if self.show and len(safe) > len(self.shown):
            self.show(safe[len(self.shown):])
        self.shown = safe

    def close(self, reply: str) -> None:
        if self.show and reply.startswith(self.shown) and len(reply) > len(self.shown):
            self.show(reply[len(self.shown):])
        self.shown = reply


def _serve(link: _Link, engine: Engine, params: SamplingParams, seed: int, front: Optional[_Front]) -> None:
    turn = 0
    while True:
        request = None
        if front is not None:  # rank 0
            try:
                message = front.next_message()
                if message is not None:
                    ids = front.convo.ask(message, getattr(front, "note", _to_stderr))
                    request = (ids, row_seed(seed, f"answer-{turn}"))
            finally:
                link.share(request)  # also on an exception: the other ranks must not wait forever
        else:
            request = link.share(None)
        if request is None:
            return
        reply, stopped = _answer(link, engine, params, request, front)
        if front is not None:
            front.finish(reply, stopped)
        turn += 1


def _answer(link: _Link, engine: Engine, params: SamplingParams, request, front: Optional[_Front]):
    ids, sample_seed = request
    stream = _ReplyStream(params.stop, front.stream if front else None)
    calls = 0

    def on_text(row: int, delta: str) -> None:
        nonlocal calls
        stream.feed(delta)
        calls += 1
        if link.single or calls % STOP_CHECK_EVERY == 0:
            if link.flag(front.interrupted() if front else False):
                raise _Stop

    with front.generating() if front else _nothing():
        try:
            gen = engine.generate([ids], params, seeds=[sample_seed], on_text=on_text)[0]
        except _Stop:
            return stream.shown, True
        except KeyboardInterrupt:
            # Under torchrun a signal means the agent is stopping every rank; scripted runs exit.
            if not (link.single and front is not None and front.sigint_stops_answer):
                raise
            return stream.shown, True
    if front is None:
        return "", False
    reply = templates.parse_reply(gen.text, front.convo.name)
    stream.close(reply)
    return reply, False


def _to_stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
