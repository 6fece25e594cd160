"""The OpenAI API's request and response shapes, and nothing of HTTP or of the scheduler.

A request body becomes a `Plan`: the token ids of every row to generate (one per prompt and
choice), its sampling parameters and seed, and how to turn the finished generations back into the
API's answer. Every field is checked up front; a bad one is an `ApiError` naming it, so that a
mistake never reaches the engine, where it could fail the other requests sharing a batch.

Chat prompts are the conversation format that finetune trains on and `dromedary chat` uses
(`templates.format_conversation`): messages are sanitised there, so a role marker typed in a
message stays text, and generation stops at the next turn in any form (`templates.NextTurn`).
"""

from __future__ import annotations

import math
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from ..llama.tokenizer import Tokenizer
from ..recipe import templates
from .generation import Generation, SamplingParams, row_seed

# OpenAI allows 4 stop strings and logprobs up to 5; a few more of each cost nothing here.
MAX_STOPS = 16
MAX_LOGPROBS = 20
MAX_N = 16  # choices per prompt: each is a slot of the scheduler
MAX_PROMPTS = 64  # prompts in one /v1/completions request


class ApiError(Exception):
    """An answer other than 200, with the OpenAI error body."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             405: "invalid_request_error", 411: "invalid_request_error", 413: "invalid_request_error",
             500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ModelCard:
    """What the server serves and how its chat prompts are made."""

    name: str  # the `model` id clients send
    tokenizer: Tokenizer
    window: int  # context window: prompt + answer
    system: str  # the system prompt of chat requests that bring none
    assistant_name: str
    # Tokens (prompt + answer) the KV-cache budget holds for one row; None: no budget.
    row_tokens: Optional[int] = None
    created: int = field(default_factory=lambda: int(time.time()))


# ---------------------------------------------------------------------------------------------
# Field readers
# ---------------------------------------------------------------------------------------------


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


class _Body:
    """A request body; each `take` checks one field's type and range, naming it when wrong."""

    def __init__(self, obj: Any, known: set[str], unsupported: dict[str, str]):
        if not isinstance(obj, dict):
            raise ApiError(400, "the request body must be a JSON object")
        for name in obj:
            if name in unsupported and obj[name] is not None:
                raise ApiError(400, f"'{name}' is not supported by this server{unsupported[name]}", param=name)
            if name not in known and name not in unsupported:
                raise ApiError(400, f"unrecognized request argument supplied: {name}", param=name)
        self.obj = obj

    def take(self, name: str, kind: str, default=None, check: Optional[Callable[[Any], bool]] = None,
             rule: str = ""):
        value = self.obj.get(name)
        if value is None:
            return default
        ok = {"int": _is_int, "number": _is_number, "bool": lambda v: isinstance(v, bool),
              "str": lambda v: isinstance(v, str), "dict": lambda v: isinstance(v, dict),
              "any": lambda v: True}[kind](value)
        if not ok:
            article = "an" if kind in ("int",) else "a"
            raise ApiError(400, f"'{name}' must be {article} {_KIND_NAMES[kind]}, got {json_type(value)}", param=name)
        if check is not None and not check(value):
            raise ApiError(400, f"'{name}' {rule}, got {value!r}", param=name)
        return value


_KIND_NAMES = {"int": "integer", "number": "number", "bool": "boolean", "str": "string", "dict": "object",
               "any": "value"}


def json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return {int: "integer", float: "number", str: "string", list: "array", dict: "object"}.get(type(value), "value")


def _stops(body: _Body) -> list[str]:
    stop = body.take("stop", "any")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ApiError(400, "'stop' must be a string or an array of strings", param="stop")
    if len(stops) > MAX_STOPS:
        raise ApiError(400, f"'stop' has {len(stops)} strings; at most {MAX_STOPS}", param="stop")
    if any(not s for s in stops):
        raise ApiError(400, "'stop' strings must not be empty", param="stop")
    return stops


def _logit_bias(body: _Body, tok: Tokenizer) -> dict[int, float]:
    raw = body.take("logit_bias", "dict", {})
    bias = {}
    for key, value in raw.items():
        if not (key.isdigit() and int(key) < tok.n_words):
            raise ApiError(400, f"'logit_bias' key {key!r} is not a token id (0..{tok.n_words - 1})",
                           param="logit_bias")
        if not _is_number(value) or not -100 <= value <= 100:
            raise ApiError(400, f"'logit_bias' value for {key} must be a number in [-100, 100], got {value!r}",
                           param="logit_bias")
        bias[int(key)] = float(value)
    return bias


@dataclass
class _Common:
    """The sampling fields both endpoints share."""

    max_tokens: Optional[int]
    temperature: float
    top_p: float
    stop: list[str]
    seed: Optional[int]
    n: int
    stream: bool
    include_usage: bool
    frequency_penalty: float
    logit_bias: dict[int, float]


_COMMON = {"model", "max_tokens", "temperature", "top_p", "stop", "seed", "n", "stream", "stream_options", "user",
           "presence_penalty", "frequency_penalty", "logit_bias"}


def _common(body: _Body, card: ModelCard, max_tokens_field: str = "max_tokens") -> _Common:
    check_model(body.take("model", "str"), card)
    body.take("user", "str")
    if body.take("presence_penalty", "number", 0.0) != 0:
        raise ApiError(400, "'presence_penalty' is not supported by this server (frequency_penalty is)",
                       param="presence_penalty")
    stream = body.take("stream", "bool", False)
    options = body.take("stream_options", "dict", {})
    if options and not stream:
        raise ApiError(400, "'stream_options' is only allowed with 'stream': true", param="stream_options")
    unknown = set(options) - {"include_usage"}
    if unknown:
        raise ApiError(400, f"'stream_options' has unknown field {sorted(unknown)[0]!r}", param="stream_options")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise ApiError(400, "'stream_options.include_usage' must be a boolean", param="stream_options")
    return _Common(
        max_tokens=body.take(max_tokens_field, "int", None, lambda v: v >= 1, "must be at least 1"),
        temperature=float(body.take("temperature", "number", 1.0, lambda v: 0 <= v <= 2, "must be in [0, 2]")),
        top_p=float(body.take("top_p", "number", 1.0, lambda v: 0 < v <= 1, "must be in (0, 1]")),
        stop=_stops(body),
        seed=body.take("seed", "int"),
        n=body.take("n", "int", 1, lambda v: 1 <= v <= MAX_N, f"must be in 1..{MAX_N}"),
        stream=stream,
        include_usage=include_usage,
        frequency_penalty=float(body.take("frequency_penalty", "number", 0.0, lambda v: -2 <= v <= 2,
                                          "must be in [-2, 2]")),
        logit_bias=_logit_bias(body, card.tokenizer),
    )


def check_model(name: Optional[str], card: ModelCard) -> None:
    if name is not None and name != card.name:
        raise ApiError(404, f"the model '{name}' does not exist; this server serves '{card.name}'", param="model",
                       code="model_not_found")


# ---------------------------------------------------------------------------------------------
# Plans: what to generate for one request
# ---------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One generation: choice `index` of the answer."""

    index: int
    ids: list[int]
    params: SamplingParams
    seed: int


@dataclass
class Plan:
    kind: str  # "completion" or "chat"
    rows: list[Row]
    stream: bool
    include_usage: bool
    logprobs: Optional[int]
    echo: list[str]  # completions with echo: the prompt text of each row, shown before its text
    prompt_tokens: int  # usage: every distinct prompt counted once, as OpenAI does
    created: int = field(default_factory=lambda: int(time.time()))
    id: str = ""

    def __post_init__(self):
        if not self.id:
            self.id = ("cmpl-" if self.kind == "completion" else "chatcmpl-") + uuid.uuid4().hex


def _seeds(common: _Common, n_rows: int) -> list[int]:
    # A given seed makes each choice reproducible (and the choices of one request differ); no seed
    # draws a fresh one, as the OpenAI API does.
    base = common.seed if common.seed is not None else secrets.randbits(62)
    return [row_seed(base, f"choice-{i}") for i in range(n_rows)]


def _budget(common: _Common, n_prompt: int, default: Optional[int], card: ModelCard, param: str, what: str) -> int:
    """max_tokens after the window check: a prompt that leaves no room for its answer is refused
    (as the OpenAI API does), never cut."""
    asked = common.max_tokens if common.max_tokens is not None else default
    if n_prompt + (asked or 1) > card.window:
        room = f" and '{param}' asks for {asked} more" if asked else ", leaving no room for an answer"
        raise ApiError(400, f"the context window of '{card.name}' is {card.window} tokens; the {what} has "
                            f"{n_prompt} tokens{room}: shorten the {what} or lower '{param}'",
                       param="messages" if what == "conversation" else "prompt", code="context_length_exceeded")
    # Unasked, the answer may take what the window (and the KV-cache budget) leaves.
    budget = asked if asked is not None else min(card.window, card.row_tokens or card.window) - n_prompt
    if card.row_tokens is not None and n_prompt + budget > card.row_tokens:
        raise ApiError(400, f"the {what} ({n_prompt} tokens) and its answer ({budget} tokens) need more than the "
                            f"{card.row_tokens} tokens the server's KV-cache budget holds for one request: shorten "
                            f"the {what} or lower '{param}'", param=param, code="context_length_exceeded")
    return budget


def _params(common: _Common, max_tokens: int, stop: Sequence, logprobs: Optional[int]) -> SamplingParams:
    params = SamplingParams(max_new_tokens=max_tokens, temperature=common.temperature, top_p=common.top_p,
                            stop=tuple(stop), logit_bias=dict(common.logit_bias),
                            ngram_penalties=(common.frequency_penalty, 0.0, 0.0, 0.0))
    if logprobs is not None:
        params.logprobs = logprobs
    params.check()
    return params


COMPLETION_FIELDS = _COMMON | {"prompt", "logprobs", "echo", "best_of"}
COMPLETION_UNSUPPORTED = {"suffix": ""}


def plan_completion(obj: Any, card: ModelCard) -> Plan:
    body = _Body(obj, COMPLETION_FIELDS, COMPLETION_UNSUPPORTED)
    common = _common(body, card)
    prompts = _prompts(body.obj.get("prompt"), card.tokenizer)
    logprobs = body.take("logprobs", "int", None, lambda v: 0 <= v <= MAX_LOGPROBS, f"must be in 0..{MAX_LOGPROBS}")
    echo = body.take("echo", "bool", False)
    if body.take("best_of", "int", common.n) != common.n:
        raise ApiError(400, "'best_of' other than 'n' is not supported by this server", param="best_of")
    if echo and logprobs is not None:
        raise ApiError(400, "'echo' with 'logprobs' is not supported by this server (no prompt logprobs)",
                       param="echo")
    rows, echoes, total = [], [], 0
    seeds = _seeds(common, len(prompts) * common.n)
    for p, (text, ids) in enumerate(prompts):
        what = "prompt" if len(prompts) == 1 else f"prompt {p}"
        max_tokens = _budget(common, len(ids), 16, card, "max_tokens", what)
        params = _params(common, max_tokens, common.stop, logprobs)
        total += len(ids)
        for c in range(common.n):
            i = p * common.n + c
            rows.append(Row(i, ids, params, seeds[i]))
            echoes.append(text)
    return Plan("completion", rows, common.stream, common.include_usage, logprobs, echoes if echo else [], total)


def _prompts(prompt: Any, tok: Tokenizer) -> list[tuple[str, list[int]]]:
    """(text, ids) of each prompt: a string, an array of strings, of token ids, or of such arrays."""
    if prompt is None:
        raise ApiError(400, "'prompt' is required", param="prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt)):
        items = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        items = prompt
    else:
        raise ApiError(400, "'prompt' must be a string, an array of strings, an array of token ids or an array "
                            f"of such arrays, got {json_type(prompt)}", param="prompt")
    if len(items) > MAX_PROMPTS:
        raise ApiError(400, f"'prompt' has {len(items)} prompts; at most {MAX_PROMPTS}", param="prompt")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            ids = tok.encode(item)
            text = item
        else:
            if not item or not all(_is_int(t) and 0 <= t < tok.n_words for t in item):
                raise ApiError(400, f"'prompt' {i}: token ids must be a non-empty array of integers in "
                                    f"0..{tok.n_words - 1}", param="prompt")
            ids, text = list(item), tok.decode(item)
        if not ids:
            raise ApiError(400, f"'prompt' {i} is empty (this tokenizer adds no BOS)", param="prompt")
        out.append((text, ids))
    return out


CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "response_format"}
CHAT_UNSUPPORTED = {
    "tools": "", "tool_choice": "", "functions": "", "function_call": "", "parallel_tool_calls": "",
    "audio": "", "modalities": "", "prediction": "",
}
_SYSTEM_ROLES = ("system", "developer")


def plan_chat(obj: Any, card: ModelCard) -> Plan:
    body = _Body(obj, CHAT_FIELDS, CHAT_UNSUPPORTED)
    field_name = "max_completion_tokens" if body.obj.get("max_completion_tokens") is not None else "max_tokens"
    common = _common(body, card, field_name)
    if body.take("logprobs", "bool", False) or body.take("top_logprobs", "int") is not None:
        raise ApiError(400, "logprobs are supported on /v1/completions only", param="logprobs")
    fmt = body.take("response_format", "dict")
    if fmt is not None and fmt != {"type": "text"}:
        raise ApiError(400, "'response_format' other than {\"type\": \"text\"} is not supported",
                       param="response_format")
    ids = card.tokenizer.encode(chat_prompt(body.obj.get("messages"), card))
    max_tokens = _budget(common, len(ids), None, card, field_name, "conversation")
    params = _params(common, max_tokens, [*common.stop, templates.NextTurn(card.assistant_name)], None)
    seeds = _seeds(common, common.n)
    rows = [Row(c, ids, params, seeds[c]) for c in range(common.n)]
    return Plan("chat", rows, common.stream, common.include_usage, None, [], len(ids))


def chat_prompt(messages: Any, card: ModelCard) -> str:
    """The prompt text of a `messages` array: the conversation format, ending where the answer starts."""
    system, turns = chat_turns(messages, card.system)
    return templates.format_conversation(system, turns, card.assistant_name)


def chat_turns(messages: Any, default_system: str) -> tuple[str, list[templates.Turn]]:
    """The system prompt and the alternating user/assistant turns of a `messages` array.

    System (or developer) messages at the start replace the server's system prompt; consecutive
    messages of one role join into one turn (the format alternates); the last turn must be the
    user's, since the answer is the assistant's next turn."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty array", param="messages")
    systems: list[str] = []
    turns: list[templates.Turn] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(400, f"'messages' {i} must be an object, got {json_type(m)}", param="messages")
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise ApiError(400, f"'messages' {i}: unsupported field {sorted(extra)[0]!r}", param="messages")
        role, content = m.get("role"), _content(m.get("content"), i)
        if role in _SYSTEM_ROLES:
            if turns:
                raise ApiError(400, f"'messages' {i}: a {role} message must come before the conversation",
                               param="messages")
            systems.append(content)
        elif role in ("user", "assistant"):
            if not turns and role == "assistant":
                raise ApiError(400, f"'messages' {i}: the conversation must start with a user message",
                               param="messages")
            if turns and turns[-1]["role"] == role:
                turns[-1] = {"role": role, "content": f"{turns[-1]['content']}\n\n{content}"}
            else:
                turns.append({"role": role, "content": content})
        else:
            raise ApiError(400, f"'messages' {i}: role must be system, developer, user or assistant, got {role!r}",
                           param="messages")
    if not turns or turns[-1]["role"] != "user":
        raise ApiError(400, "the last message must be the user's: the answer is the assistant's next turn",
                       param="messages")
    system = "\n\n".join(systems) if systems else default_system
    return system, turns


def _content(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    # The array form: text parts only.
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ApiError(400, f"'messages' {i}: content must be a string or an array of text parts", param="messages")


# ---------------------------------------------------------------------------------------------
# Answers
# ---------------------------------------------------------------------------------------------


FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


def reply_text(plan: Plan, gen: Generation) -> str:
    """The text of a choice: the completion as generated, the chat reply without its surrounding
    blanks (what `dromedary chat` shows)."""
    return gen.text.strip() if plan.kind == "chat" else gen.text


class ReplyStream:
    """The streamed deltas of a chat reply: a prefix of `reply_text` at every point, so no leading
    blanks and no trailing ones that the end of the reply would strip. (The scheduler already holds
    back a tail that may become a stop or a role marker.)"""

    def __init__(self):
        self.raw, self.shown = "", ""

    def feed(self, delta: str) -> str:
        self.raw += delta
        safe = self.raw.strip()
        new = safe[len(self.shown):] if safe.startswith(self.shown) else ""
        self.shown += new
        return new

    def close(self, reply: str) -> str:
        new = reply[len(self.shown):] if reply.startswith(self.shown) else ""
        self.shown += new
        return new


def usage(plan: Plan, gens: Sequence[Generation]) -> dict:
    completion = sum(len(g.tokens) for g in gens)
    return {"prompt_tokens": plan.prompt_tokens, "completion_tokens": completion,
            "total_tokens": plan.prompt_tokens + completion}


def logprobs_block(tok: Tokenizer, row: Row, gen: Generation, offset: int) -> dict:
    """The completions API's `logprobs`: each generated token's text, log-probability, the top
    alternatives' and where the token's text begins (counting from `offset`). Tokens past the end
    of the text (cut by a stop string) are left out."""
    tokens, token_lps, tops, offsets = [], [], [], []
    prev = row.ids[-1:]
    pos = 0
    limit = len(gen.text)
    top_all = getattr(gen, "top_logprobs", None) or [{} for _ in gen.tokens]
    for t, lp, top in zip(gen.tokens, gen.token_logprobs, top_all):
        if pos >= limit and tokens:
            break
        piece = tok.decode_after(prev, [t])
        tokens.append(piece)
        token_lps.append(lp)
        tops.append({tok.decode_after(prev, [alt]): v for alt, v in top.items()})
        offsets.append(offset + pos)
        pos += len(piece)
        prev = [t]
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops if row.params.logprobs else None,
            "text_offset": offsets}


def choice_logprobs(plan: Plan, tok: Tokenizer, row: Row, gen: Generation) -> Optional[dict]:
    """A completion choice's `logprobs` (None unless asked for), offsets counted from the prompt's start."""
    return None if plan.logprobs is None else logprobs_block(tok, row, gen, len(tok.decode(row.ids)))


def completion_choice(plan: Plan, tok: Tokenizer, row: Row, gen: Generation) -> dict:
    head = plan.echo[row.index] if plan.echo else ""
    return {"index": row.index, "text": head + gen.text, "logprobs": choice_logprobs(plan, tok, row, gen),
            "finish_reason": FINISH.get(gen.finish_reason, "stop")}


def chat_choice(plan: Plan, row: Row, gen: Generation) -> dict:
    return {"index": row.index, "message": {"role": "assistant", "content": reply_text(plan, gen)},
            "logprobs": None, "finish_reason": FINISH.get(gen.finish_reason, "stop")}


def response(plan: Plan, card: ModelCard, rows: Sequence[Row], gens: Sequence[Generation]) -> dict:
    if plan.kind == "completion":
        choices = [completion_choice(plan, card.tokenizer, r, g) for r, g in zip(rows, gens)]
        obj = "text_completion"
    else:
        choices = [chat_choice(plan, r, g) for r, g in zip(rows, gens)]
        obj = "chat.completion"
    return {"id": plan.id, "object": obj, "created": plan.created, "model": card.name, "choices": choices,
            "usage": usage(plan, gens)}


def chunk(plan: Plan, card: ModelCard, choices: list[dict], usage_: Optional[dict] = None) -> dict:
    obj = "text_completion" if plan.kind == "completion" else "chat.completion.chunk"
    out = {"id": plan.id, "object": obj, "created": plan.created, "model": card.name, "choices": choices}
    if plan.include_usage:
        out["usage"] = usage_
    return out


def models(card: ModelCard) -> dict:
    return {"object": "list", "data": [{"id": card.name, "object": "model", "created": card.created,
                                        "owned_by": "dromedary", "context_window": card.window}]}
