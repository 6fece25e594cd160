"""Prompt builders and output parsers over the files in prompts/.

Every text the model reads is assembled here from the files in prompts/, and every model output
that a stage has to take apart is parsed here, so each format is defined exactly once. Apart from
reading prompts/ (cached), every function is pure: strings in, strings out. No model, no torch.

Two conversation formats exist, and they share their role markers:
- the chat format (`format_conversation`), used by finetune for training and by chat/generate for
  inference, under the assistant's public name ("Dromedary");
- the self-align prompt (`self_align_prompt`): principles + exemplars + one new request, under an
  internal codename that curate later swaps for the public name.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Optional, TypedDict, get_args

DEFAULT_ASSISTANT_NAME = "Dromedary"
DEFAULT_KNOWLEDGE_CUTOFF = "September 2021"

Role = Literal["user", "assistant"]
SystemPromptName = Literal["standard", "concise", "verbose", "multilingual"]
SYSTEM_PROMPT_NAMES: tuple[SystemPromptName, ...] = get_args(SystemPromptName)

# A file that every prompts/ directory has; used to tell ours apart from an unrelated "prompts".
_SENTINEL_FILE = "principles.txt"


class Turn(TypedDict):
    role: Role
    content: str


class ParsedSelfAlign(TypedDict):
    thoughts: str
    answer: str | None  # None when the model never reached (or left empty) the answer part


class SeedTask(TypedDict):
    instruction: str
    input: str  # "" when the task needs no input
    output: str


class NewTask(TypedDict):
    instruction: str
    input: str


@dataclass(frozen=True)
class Principle:
    number: int
    name: str
    description: str

    @property
    def citation(self) -> str:
        """How exemplars cite this principle, e.g. "(1 ethical)"."""
        return f"({self.number} {self.name})"


@dataclass(frozen=True)
class ExemplarTurn:
    role: Role
    content: str
    thoughts: str = ""  # internal thoughts before an assistant reply; empty for user turns


@dataclass(frozen=True)
class Exemplar:
    kind: str  # from the file name: "04_coding_with_follow_up.txt" -> "coding_with_follow_up"
    turns: tuple[ExemplarTurn, ...]


@dataclass(frozen=True)
class TgrtSeed:
    topic: str
    question: str


@dataclass(frozen=True)
class QuestionType:
    name: str  # the id stored in prompt records as `question_type`
    title: str
    description: str
    topics: tuple[str, ...]  # example topics, a starting point for brainstorming
    seeds: tuple[TgrtSeed, ...]


# ---------------------------------------------------------------------------------------------
# Finding and reading prompts/
# ---------------------------------------------------------------------------------------------


@functools.cache
def prompts_dir() -> Path:
    """The prompts/ directory, found relative to this package and never to the working directory."""
    package = Path(__file__).resolve().parent.parent  # dromedary/, above recipe/
    # Installed wheel: pyproject maps prompts/ to dromedary/prompts, next to this file.
    # Source checkout: prompts/ sits beside the dromedary/ package.
    for candidate in (package / "prompts", package.parent / "prompts"):
        if (candidate / _SENTINEL_FILE).is_file():
            return candidate
    # Other installs (e.g. editable ones that map packages through an import hook).
    try:
        resource = Path(str(importlib.resources.files("dromedary.prompts")))
    except ModuleNotFoundError:
        resource = None
    if resource is not None and (resource / _SENTINEL_FILE).is_file():
        return resource
    raise FileNotFoundError(
        f"cannot find the prompts directory (looked in {package / 'prompts'}, "
        f"{package.parent / 'prompts'} and the dromedary.prompts package)"
    )


@functools.cache
def _read_text(relative: str) -> str:
    return (prompts_dir() / relative).read_text(encoding="utf-8")


@functools.cache
def _read_json(relative: str) -> Any:
    # Callers must treat the result as read-only: it is cached and shared.
    try:
        return json.loads(_read_text(relative))
    except json.JSONDecodeError as error:
        raise ValueError(f"{prompts_dir() / relative}:{error.lineno}: {error.msg}") from None


_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")


def _fill(template: str, **values: str) -> str:
    # Not str.format: exemplars contain code and seed tasks contain JSON, whose braces must stay.
    # Only the named placeholders are replaced, in one pass, so values are never re-expanded.
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)


def _check_name(assistant_name: str) -> str:
    if not assistant_name.strip() or "\n" in assistant_name or assistant_name.casefold() == "user":
        raise ValueError(f"invalid assistant name {assistant_name!r}: use one line that is not 'User'")
    return assistant_name


# ---------------------------------------------------------------------------------------------
# The chat format, shared by training (finetune) and inference (chat, generate, verbose-clone)
#
#   {system}
#
#   ### User:
#   {message}
#
#   ### Dromedary:
#   {answer}
# ---------------------------------------------------------------------------------------------


def user_marker() -> str:
    return "### User:"


def assistant_marker(assistant_name: str = DEFAULT_ASSISTANT_NAME) -> str:
    return f"### {_check_name(assistant_name)}:"


def stop_strings(assistant_name: str = DEFAULT_ASSISTANT_NAME) -> list[str]:
    """The two markers exactly as the format writes them. Where a reply ends is `NextTurn`: these
    and every lenient form of them at the start of a line."""
    return [user_marker(), assistant_marker(assistant_name)]


@functools.lru_cache(maxsize=16)
def _role_marker_pattern(assistant_name: str) -> re.Pattern[str]:
    roles = "|".join(re.escape(role) for role in ("User", assistant_name))
    # Any number of '#', any case, optional "(internal thoughts)": close enough to a marker that
    # a model could read it as a new turn.
    return re.compile(
        rf"^(?P<indent>[ \t]*)#+[ \t]*(?P<role>(?:{roles})(?:[ \t]*\(internal thoughts\))?)[ \t]*:",
        re.IGNORECASE | re.MULTILINE,
    )


_THOUGHTS = "(internal thoughts)"


class NextTurn:
    """The one definition of "the next turn starts here": a role marker (User or the assistant's
    name) at the start of a line, in any of the forms `sanitize_message` neutralises ("### User:",
    "## user :", "# Dromedary (internal thoughts):"). The engine stops on it (a `StopRule` of
    generation.py), `parse_reply` cuts at it, and the sanitiser makes sure no message contains one.
    """

    def __init__(self, assistant_name: str = DEFAULT_ASSISTANT_NAME):
        self.pattern = _role_marker_pattern(_check_name(assistant_name))
        self.roles = ("user", assistant_name.lower())

    def find(self, text: str, start: int = 0) -> Optional[int]:
        """Index of the line start where the first marker ending after `start` begins, or None."""
        line = text.rfind("\n", 0, max(0, start)) + 1  # a marker may have begun earlier in its line
        match = self.pattern.search(text, line)  # '^' matches only at line starts, `line` included
        return match.start() if match else None

    def partial(self, text: str) -> int:
        """Length of the end of `text` that may still grow into a marker: its last line, when that
        line reads as the beginning of one ("##", "### Us", "### Dromedary (int")."""
        line = text[text.rfind("\n") + 1 :]
        return len(line) if line and self._may_become_marker(line) else 0

    def _may_become_marker(self, line: str) -> bool:
        rest = line.lstrip(" \t")
        if not rest:
            return True
        if not rest.startswith("#"):
            return False
        rest = rest.lstrip("#").lstrip(" \t").lower()
        for role in self.roles:
            if role.startswith(rest):
                return True
            if rest.startswith(role):
                tail = rest[len(role) :].lstrip(" \t")
                if _THOUGHTS.startswith(tail):
                    return True
                if tail.startswith(_THOUGHTS) and not tail[len(_THOUGHTS) :].strip(" \t"):
                    return True
        return False


def sanitize_message(text: str, assistant_name: str = DEFAULT_ASSISTANT_NAME) -> str:
    """Neutralise role markers in a message so that it cannot open a fake turn.

    "### User:" / "### Dromedary:" at the start of a line lose their '#'s and become plain text
    ("User:"); everything else, markdown headings included, is kept. Line endings become "\\n"
    so that a lone "\\r" cannot start a line either.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return _role_marker_pattern(_check_name(assistant_name)).sub(r"\g<indent>\g<role>:", text)


def _clean(text: str, assistant_name: str) -> str:
    return sanitize_message(text, assistant_name).strip()


def user_message(instruction: str, input: str = "") -> str:
    """The user turn for a record: the instruction, then its input (if any) after a blank line."""
    instruction, input = instruction.strip(), input.strip()
    return f"{instruction}\n\n{input}" if input else instruction


def _check_turn_order(turns: Sequence[Turn], add_generation_prompt: bool) -> None:
    if not turns:
        raise ValueError("a conversation needs at least one turn")
    for index, turn in enumerate(turns):
        expected = "user" if index % 2 == 0 else "assistant"
        if turn["role"] != expected:
            raise ValueError(
                f"turn {index} has role {turn['role']!r}, expected {expected!r}: "
                "turns alternate user/assistant, starting with the user"
            )
    if add_generation_prompt and turns[-1]["role"] != "user":
        raise ValueError("add_generation_prompt needs the last turn to be the user's")


def format_conversation(
    system: str,
    turns: Sequence[Turn],
    assistant_name: str = DEFAULT_ASSISTANT_NAME,
    add_generation_prompt: bool = True,
) -> str:
    """The one chat format. Messages are stripped and sanitised; an empty system is left out.

    With add_generation_prompt the text ends with the assistant marker and a newline, ready for
    the model to write the reply; without it, it ends with the last message (training).
    """
    _check_turn_order(turns, add_generation_prompt)
    parts = []
    if system.strip():
        parts.append(_clean(system, assistant_name))
    for turn in turns:
        marker = user_marker() if turn["role"] == "user" else assistant_marker(assistant_name)
        parts.append(f"{marker}\n{_clean(turn['content'], assistant_name)}")
    if add_generation_prompt:
        parts.append(f"{assistant_marker(assistant_name)}\n")
    return "\n\n".join(parts)


def split_for_training(
    system: str, user: str, assistant: str, assistant_name: str = DEFAULT_ASSISTANT_NAME
) -> tuple[str, str]:
    """(source, target) for one training example; the loss goes on the target only.

    source + target == format_conversation(system, [user, assistant], add_generation_prompt=False),
    and target is the answer itself (stripped and sanitised, so unchanged for ordinary answers).
    The EOS token is the tokenizer's business, not this function's.
    """
    target = _clean(assistant, assistant_name)
    if not target:
        raise ValueError("cannot train on an empty answer")
    source = format_conversation(system, [{"role": "user", "content": user}], assistant_name)
    return source, target


def _cut_at_first(text: str, stops: Sequence[str]) -> str:
    positions = [text.find(stop) for stop in stops if stop in text]
    return text[: min(positions)] if positions else text


def parse_reply(generation: str, assistant_name: str = DEFAULT_ASSISTANT_NAME) -> str:
    """The reply in a chat-format generation: everything before the next turn, stripped."""
    cut = NextTurn(assistant_name).find(generation)
    return (generation if cut is None else generation[:cut]).strip()


# ---------------------------------------------------------------------------------------------
# System prompts
# ---------------------------------------------------------------------------------------------


def load_system_prompt(
    name_or_path: SystemPromptName | str = "standard",
    assistant_name: str = DEFAULT_ASSISTANT_NAME,
    knowledge_cutoff: str = DEFAULT_KNOWLEDGE_CUTOFF,
) -> str:
    """A named system prompt from prompts/system/, or the text file at a path given by the user."""
    if name_or_path in SYSTEM_PROMPT_NAMES:
        text = _read_text(f"system/{name_or_path}.txt")
    elif Path(name_or_path).is_file():
        text = Path(name_or_path).read_text(encoding="utf-8")
    else:
        raise ValueError(
            f"unknown system prompt {name_or_path!r}: use one of {', '.join(SYSTEM_PROMPT_NAMES)} "
            "or the path of a text file"
        )
    return _fill(text.strip(), assistant_name=assistant_name, knowledge_cutoff=knowledge_cutoff)


def verbose_system_prompt(
    assistant_name: str = DEFAULT_ASSISTANT_NAME, knowledge_cutoff: str = DEFAULT_KNOWLEDGE_CUTOFF
) -> str:
    return load_system_prompt("verbose", assistant_name, knowledge_cutoff)


def verbose_clone_prompt(
    instruction: str,
    input: str = "",
    assistant_name: str = DEFAULT_ASSISTANT_NAME,
    knowledge_cutoff: str = DEFAULT_KNOWLEDGE_CUTOFF,
) -> str:
    """The chat-format prompt that asks the engraved model for a detailed answer to one record.

    Generate until stop_strings(assistant_name); parse_reply() extracts the answer.
    """
    turn: Turn = {"role": "user", "content": user_message(instruction, input)}
    system = verbose_system_prompt(assistant_name, knowledge_cutoff)
    return format_conversation(system, [turn], assistant_name)


def engraving_system_prompts(
    assistant_name: str = DEFAULT_ASSISTANT_NAME, knowledge_cutoff: str = DEFAULT_KNOWLEDGE_CUTOFF
) -> list[str]:
    prompts = _read_json("system/engraving.json")
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError(f"{prompts_dir() / 'system/engraving.json'}: expected a list of strings")
    return [
        _fill(p.strip(), assistant_name=assistant_name, knowledge_cutoff=knowledge_cutoff) for p in prompts
    ]


def engraving_system_prompt(
    record_id: str,
    assistant_name: str = DEFAULT_ASSISTANT_NAME,
    knowledge_cutoff: str = DEFAULT_KNOWLEDGE_CUTOFF,
) -> str:
    """The engraving system prompt for one record: varied across records, fixed for each id.

    sha256 rather than hash(): Python salts str hashes per process, and a resumed or
    multi-process run must pick the same prompt for the same record.
    """
    prompts = engraving_system_prompts(assistant_name, knowledge_cutoff)
    digest = hashlib.sha256(record_id.encode("utf-8")).digest()
    return prompts[int.from_bytes(digest[:8], "big") % len(prompts)]


# ---------------------------------------------------------------------------------------------
# The principle-driven self-align prompt
#
#   principles, exemplars intro, then for each exemplar:
#     --- New conversation ---
#     ### User: ... / ### Lodestar (internal thoughts): ... / ### Lodestar: ...
#   and finally the record:
#     --- New conversation ---
#     ### User:
#     {instruction}\n\n{input}
#
#     ### Lodestar (internal thoughts):
#   <- the model writes its thoughts, "### Lodestar:", and the answer.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _SelfAlignSettings:
    codename: str
    self_identification: str
    exemplars_intro: str
    divider: str


@functools.cache
def _settings() -> _SelfAlignSettings:
    data = _read_json("self_align.json")
    keys = ("internal_codename", "self_identification", "exemplars_intro", "conversation_divider")
    missing = [key for key in keys if not (isinstance(data.get(key), str) and data[key].strip())]
    if missing:
        raise ValueError(f"{prompts_dir() / 'self_align.json'}: missing or empty {', '.join(missing)}")
    return _SelfAlignSettings(*(data[key].strip() for key in keys))


def conversation_divider() -> str:
    """The line that separates conversations in the self-align prompt."""
    return _settings().divider


def internal_codename() -> str:
    """The assistant's name inside the self-align prompt; curate replaces it with the real name."""
    return _settings().codename


def self_identification_sentence() -> str:
    """The fixed sentence that opens every internal thought."""
    return _settings().self_identification


def _name(assistant_name: str | None) -> str:
    return _check_name(assistant_name or internal_codename())


def internal_thoughts_cue(assistant_name: str | None = None) -> str:
    """The end of every self-align prompt; the generation starts with the internal thoughts."""
    return f"### {_name(assistant_name)} (internal thoughts):\n"


def answer_marker(assistant_name: str | None = None) -> str:
    """The line that separates the internal thoughts from the answer."""
    return assistant_marker(_name(assistant_name))


def self_align_stop_strings(assistant_name: str | None = None) -> list[str]:
    """Where a self-align generation must end: a new user turn, new thoughts, a new conversation."""
    return [user_marker(), internal_thoughts_cue(assistant_name).strip(), _settings().divider]


_PRINCIPLE = re.compile(r"(\d+) \(([^()\n]+)\)\.\s+(.+)", re.DOTALL)


def _parse_principles(text: str, source: str) -> tuple[str, tuple[Principle, ...]]:
    """(preamble, principles) from "N (name). description" paragraphs after a free preamble."""
    preamble: list[str] = []
    principles: list[Principle] = []
    for paragraph in re.split(r"\n[ \t]*\n", text.strip()):
        match = _PRINCIPLE.fullmatch(paragraph.strip())
        if match is None:
            if principles:
                raise ValueError(f"{source}: expected 'N (name). description', got {paragraph[:60]!r}")
            preamble.append(paragraph.strip())
            continue
        number, expected = int(match[1]), len(principles) + 1
        if number != expected:
            raise ValueError(f"{source}: principle {number} should be numbered {expected}")
        # Descriptions may be wrapped over several lines in the file; the prompt gets one line.
        principles.append(Principle(number, match[2].strip(), " ".join(match[3].split())))
    if not principles:
        raise ValueError(f"{source}: no numbered principles")
    return "\n\n".join(preamble), tuple(principles)


@functools.cache
def _raw_principles() -> tuple[str, tuple[Principle, ...]]:
    return _parse_principles(_read_text("principles.txt"), str(prompts_dir() / "principles.txt"))


def load_principles(
    assistant_name: str = DEFAULT_ASSISTANT_NAME, knowledge_cutoff: str = DEFAULT_KNOWLEDGE_CUTOFF
) -> list[Principle]:
    values = {"assistant_name": assistant_name, "knowledge_cutoff": knowledge_cutoff}
    return [replace(p, description=_fill(p.description, **values)) for p in _raw_principles()[1]]


_EXEMPLAR_HEADER = re.compile(
    r"^### (User|\{assistant_name\} \(internal thoughts\)|\{assistant_name\}):[ \t]*$", re.MULTILINE
)
_SECTION_OF_HEADER = {
    "User": "user",
    "{assistant_name} (internal thoughts)": "thoughts",
    "{assistant_name}": "answer",
}
_SECTION_CYCLE = ("user", "thoughts", "answer")


def _parse_exemplar(text: str, source: str) -> tuple[ExemplarTurn, ...]:
    """Turns of one exemplar file, placeholders unfilled. See prompts/README.md for the format."""
    headers = list(_EXEMPLAR_HEADER.finditer(text))
    if not headers or text[: headers[0].start()].strip():
        raise ValueError(f"{source}:1: an exemplar starts with a '### User:' line")
    sections = []
    for index, header in enumerate(headers):
        line = text.count("\n", 0, header.start()) + 1
        end = headers[index + 1].start() if index + 1 < len(headers) else len(text)
        kind, body = _SECTION_OF_HEADER[header[1]], text[header.end() : end].strip()
        expected = _SECTION_CYCLE[index % 3]
        if kind != expected:
            raise ValueError(f"{source}:{line}: expected the {expected} section, found {kind}")
        if not body:
            raise ValueError(f"{source}:{line}: empty {kind} section")
        if kind == "thoughts" and not body.startswith("{self_identification}"):
            raise ValueError(f"{source}:{line}: internal thoughts must start with {{self_identification}}")
        sections.append(body)
    if len(sections) % 3:
        raise ValueError(f"{source}: the last user turn has no internal thoughts and answer")
    turns: list[ExemplarTurn] = []
    for user, thoughts, answer in zip(sections[0::3], sections[1::3], sections[2::3], strict=True):
        turns += [ExemplarTurn("user", user), ExemplarTurn("assistant", answer, thoughts)]
    return tuple(turns)


@functools.cache
def _raw_exemplars() -> tuple[Exemplar, ...]:
    files = sorted((prompts_dir() / "exemplars").glob("*.txt"))
    if not files:
        raise ValueError(f"{prompts_dir() / 'exemplars'}: no exemplar files")
    return tuple(
        Exemplar(
            re.sub(r"^\d+_", "", path.stem), _parse_exemplar(path.read_text(encoding="utf-8"), str(path))
        )
        for path in files
    )


def load_exemplars(
    assistant_name: str | None = None, knowledge_cutoff: str = DEFAULT_KNOWLEDGE_CUTOFF
) -> list[Exemplar]:
    """The in-context exemplars, under the internal codename unless another name is given."""
    values = {
        "assistant_name": _name(assistant_name),
        "knowledge_cutoff": knowledge_cutoff,
        "self_identification": self_identification_sentence(),
    }
    return [
        Exemplar(
            ex.kind,
            tuple(
                ExemplarTurn(t.role, _fill(t.content, **values), _fill(t.thoughts, **values))
                for t in ex.turns
            ),
        )
        for ex in _raw_exemplars()
    ]


def _render_exemplar(exemplar: Exemplar, assistant_name: str) -> str:
    parts = []
    for turn in exemplar.turns:
        if turn.role == "user":
            parts.append(f"{user_marker()}\n{turn.content}")
        else:
            parts.append(f"{internal_thoughts_cue(assistant_name)}{turn.thoughts}")
            parts.append(f"{answer_marker(assistant_name)}\n{turn.content}")
    return "\n\n".join(parts)


@functools.lru_cache(maxsize=8)
def self_align_prefix(
    assistant_name: str | None = None,
    knowledge_cutoff: str = DEFAULT_KNOWLEDGE_CUTOFF,
    max_exemplars: int | None = None,
) -> str:
    """Everything in a self-align prompt that does not depend on the record.

    It is byte-identical for every record, so the generation engine can compute its KV cache
    once. It ends with the user marker and a newline: a line break is a token boundary for
    LLaMA's tokenizer, so the prefix's tokens are also the first tokens of every full prompt.
    max_exemplars keeps only the first exemplars (in file order), for short context windows.
    """
    if max_exemplars is not None and max_exemplars < 1:
        raise ValueError(f"max_exemplars must be at least 1, got {max_exemplars}")
    name = _name(assistant_name)
    values = {"assistant_name": name, "knowledge_cutoff": knowledge_cutoff}
    preamble, _ = _raw_principles()
    principles = "\n\n".join(
        f"{p.number} ({p.name}). {p.description}" for p in load_principles(name, knowledge_cutoff)
    )
    divider = _settings().divider
    exemplars = load_exemplars(name, knowledge_cutoff)[:max_exemplars]
    conversations = "".join(f"{divider}\n\n{_render_exemplar(ex, name)}\n\n" for ex in exemplars)
    intro = _fill(_settings().exemplars_intro, **values)
    return (
        f"{_fill(preamble, **values)}\n\n{principles}\n\n{intro}\n\n"
        f"{conversations}{divider}\n\n{user_marker()}\n"
    )


def self_align_suffix(instruction: str, input: str = "", assistant_name: str | None = None) -> str:
    """The record-specific end of a self-align prompt: the request and the internal-thoughts cue."""
    if not instruction.strip():
        raise ValueError("empty instruction")
    name = _name(assistant_name)
    message = _clean(user_message(instruction, input), name)
    # A divider line inside the request would fake the start of a new conversation.
    divider = _settings().divider
    message = re.sub(
        rf"^[ \t]*{re.escape(divider)}[ \t]*$", divider.strip("-=#* "), message, flags=re.MULTILINE
    )
    return f"{message}\n\n{internal_thoughts_cue(name)}"


def self_align_prompt(
    instruction: str,
    input: str = "",
    assistant_name: str | None = None,
    knowledge_cutoff: str = DEFAULT_KNOWLEDGE_CUTOFF,
    max_exemplars: int | None = None,
) -> str:
    """Principles + exemplars + the request + the internal-thoughts cue.

    assistant_name defaults to the internal codename. Generate until self_align_stop_strings()
    and take the result apart with parse_self_align().
    """
    prefix = self_align_prefix(assistant_name, knowledge_cutoff, max_exemplars)
    return prefix + self_align_suffix(instruction, input, assistant_name)


def self_align_prompt_version(
    assistant_name: str | None = None,
    knowledge_cutoff: str = DEFAULT_KNOWLEDGE_CUTOFF,
    max_exemplars: int | None = None,
) -> str:
    """A short fingerprint of the self-align prompt, recorded with every generation."""
    prefix = self_align_prefix(assistant_name, knowledge_cutoff, max_exemplars)
    text = prefix + internal_thoughts_cue(assistant_name)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


@functools.lru_cache(maxsize=16)
def _answer_marker_pattern(assistant_name: str) -> re.Pattern[str]:
    # Lenient on purpose: base models sometimes drop or change the '#'s, or the case.
    return re.compile(
        rf"^[ \t]*(?:#+[ \t]*)?{re.escape(assistant_name)}[ \t]*:[ \t]*", re.IGNORECASE | re.MULTILINE
    )


def parse_self_align(generation: str, assistant_name: str | None = None) -> ParsedSelfAlign:
    """Split the text generated after the internal-thoughts cue into thoughts and answer."""
    name = _name(assistant_name)
    text = _cut_at_first(generation, self_align_stop_strings(name))
    pattern = _answer_marker_pattern(name)
    marker = pattern.search(text)
    if marker is None:
        return {"thoughts": text.strip(), "answer": None}
    answer = text[marker.end() :]
    second = pattern.search(answer)  # a model that starts a second answer has lost the thread
    if second is not None:
        answer = answer[: second.start()]
    return {"thoughts": text[: marker.start()].strip(), "answer": answer.strip() or None}


_CITATION = re.compile(r"\(\d+ [a-z][a-z -]*\)")


def _first_sentence(text: str) -> str:
    first_line = text.strip().split("\n", 1)[0]
    return re.split(r"(?<=[.!?])\s+", first_line, maxsplit=1)[0].strip()


def _telltales(
    exemplars: Sequence[Exemplar], principles: Sequence[Principle], assistant_name: str
) -> list[str]:
    settings = _settings()
    phrases = [
        settings.self_identification,
        internal_thoughts_cue(assistant_name).strip(),
        answer_marker(assistant_name),
        "(internal thoughts)",
        settings.divider,
    ]
    phrases += [p.citation for p in principles]
    for exemplar in exemplars:
        for turn in exemplar.turns:
            if turn.role != "assistant":
                continue
            phrases += _CITATION.findall(f"{turn.thoughts}\n{turn.content}")
            # Opening sentences are specific to each exemplar's question, so an answer that
            # contains one verbatim has copied the exemplar instead of answering its own request.
            thoughts = turn.thoughts.removeprefix(settings.self_identification)
            for sentence in (_first_sentence(thoughts), _first_sentence(turn.content)):
                if len(sentence.split()) >= 7:
                    phrases.append(sentence)
    return list(dict.fromkeys(phrases))


def exemplar_telltale_phrases(
    assistant_name: str | None = None, knowledge_cutoff: str = DEFAULT_KNOWLEDGE_CUTOFF
) -> list[str]:
    """Phrases that betray an answer copied from the self-align scaffolding, read from the files.

    The self-identification sentence, the cue and answer marker, the conversation divider, every
    principle citation "(N name)" in principles.txt and the exemplars, and the opening sentence
    of each exemplar's thoughts and answer. Check answers, not thoughts (thoughts are meant to cite
    principles), and before renaming the codename. The bare codename is not a telltale: curate
    renames it.
    """
    name = _name(assistant_name)
    return _telltales(load_exemplars(name, knowledge_cutoff), load_principles(name, knowledge_cutoff), name)


# ---------------------------------------------------------------------------------------------
# Topic-guided red-teaming (TGRT)
# ---------------------------------------------------------------------------------------------


@functools.cache
def _question_types() -> tuple[QuestionType, ...]:
    source = prompts_dir() / "tgrt/question_types.json"
    types = []
    for index, item in enumerate(_read_json("tgrt/question_types.json")):
        try:
            seeds = tuple(TgrtSeed(s["topic"], s["question"]) for s in item["seeds"])
            types.append(
                QuestionType(item["name"], item["title"], item["description"], tuple(item["topics"]), seeds)
            )
        except (KeyError, TypeError) as error:
            raise ValueError(f"{source}: question type {index}: missing or malformed field {error}") from None
    names = [t.name for t in types]
    if len(set(names)) != len(names):
        raise ValueError(f"{source}: duplicate question type names")
    return tuple(types)


def load_question_types() -> list[QuestionType]:
    return list(_question_types())


def question_type(name: str) -> QuestionType:
    for candidate in _question_types():
        if candidate.name == name:
            return candidate
    raise ValueError(f"unknown question type {name!r}: one of {', '.join(t.name for t in _question_types())}")


def _as_question_type(value: QuestionType | str) -> QuestionType:
    return value if isinstance(value, QuestionType) else question_type(value)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def topic_brainstorm_prompt(
    question_type: QuestionType | str, existing_topics: Sequence[str], n: int = 10
) -> str:
    """Asks for n new topics of one question type. Pass a sample when the existing list is long."""
    qtype = _as_question_type(question_type)
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    existing = "\n".join(f"- {_one_line(t)}" for t in existing_topics if t.strip()) or "(none yet)"
    return (
        _fill(
            _read_text("tgrt/topic_brainstorm.txt").strip(),
            title=qtype.title,
            description=qtype.description,
            existing_topics=existing,
            n=str(n),
        )
        + "\n"
    )


_LIST_ITEM = re.compile(r"^(?:\d+[ \t]*[.)]|[-*•])[ \t]*")
_TOPIC_JUNK = {"topic", "topics", "new topics", "none", "n/a", "etc", "and more"}


def _clean_topic(candidate: str, max_words: int) -> str | None:
    # Markdown emphasis and straight or curly quotes around the phrase are decoration.
    topic = candidate.strip().strip("*_\"'`\u201c\u201d\u2018\u2019").rstrip(".,;").strip()
    if not topic or topic.casefold() in _TOPIC_JUNK:
        return None
    # Questions, "label: value" lines, sentences and lists are not noun phrases.
    if any(ch in topic for ch in "?:;,{}[]<>|#") or ". " in topic:
        return None
    if len(topic) > 60 or len(topic.split()) > max_words:
        return None
    if not (topic[0].isupper() or topic[0].isdigit()):
        return None
    return topic


def parse_topics(text: str, max_words: int = 6) -> list[str]:
    """Topics from a brainstorm generation: short capitalised noun phrases, deduplicated.

    A numbered or bulleted list is read up to its end (the model often rambles on after it);
    unmarked lines are read up to the first blank line.
    """
    lines = [line.strip() for line in text.splitlines()]
    marked = any(_LIST_ITEM.match(line) for line in lines)
    candidates: list[str] = []
    for line in lines:
        if not line:
            if candidates and not marked:
                break
            continue
        if not marked:
            candidates.append(line)
        elif _LIST_ITEM.match(line):
            candidates.append(_LIST_ITEM.sub("", line, count=1))
        elif candidates:
            break
    topics: dict[str, str] = {}
    for candidate in candidates:
        topic = _clean_topic(candidate, max_words)
        if topic is not None:
            topics.setdefault(topic.casefold(), topic)
    return list(topics.values())


def tgrt_question_prompt(
    question_type: QuestionType | str, topic: str, seeds: Sequence[TgrtSeed] | None = None
) -> str:
    """Asks for one question of a type about a topic; seeds default to the type's own seeds.

    The prompt ends with "Question:"; the question is the first line of the generation, so
    generation can stop at a newline. parse_tgrt_question() checks it.
    """
    qtype = _as_question_type(question_type)
    if not topic.strip():
        raise ValueError("empty topic")
    examples = "\n\n".join(
        f"Topic: {_one_line(s.topic)}\nQuestion: {_one_line(s.question)}"
        for s in (qtype.seeds if seeds is None else seeds)
    )
    return _fill(
        _read_text("tgrt/question_generation.txt").strip(),
        title=qtype.title,
        description=qtype.description,
        examples=examples,
        topic=_one_line(topic),
    )


# Words too common to show that a question is about a topic ("Day of the Dead" -> day, dead).
_STOPWORDS = frozenset(
    {"a", "an", "the", "of", "and", "or", "in", "on", "for", "to", "with", "at", "by"}
    | {"de", "la", "le", "el", "der", "die", "das"}
)


def _mentions(question: str, topic: str) -> bool:
    words = re.findall(r"\w+", question.casefold())
    topic_words = [w for w in re.findall(r"\w+", topic.casefold()) if w not in _STOPWORDS]
    if not topic_words:
        return topic.casefold().strip() in question.casefold()

    def found(word: str) -> bool:
        if len(word) < 4:
            return word in words
        # Inflections count: "volcano" matches "volcanoes", "wills" matches "will".
        need = max(4, len(word) - 3)
        return any(len(_common_prefix(word, w)) >= min(need, len(word)) for w in words)

    # Half the topic's words suffice, so that a question asked in another language can still
    # match a topic whose name is partly translated ("Eiffel Tower" -> "la tour Eiffel").
    return sum(found(w) for w in topic_words) >= math.ceil(len(topic_words) / 2)


def _common_prefix(a: str, b: str) -> str:
    length = 0
    while length < min(len(a), len(b)) and a[length] == b[length]:
        length += 1
    return a[:length]


def parse_tgrt_question(text: str, topic: str) -> str | None:
    """The question in a generation, or None unless it is one complete line about the topic."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return None
    question = re.sub(r"^(?:question[ \t]*:|\d+[ \t]*[.)]|[-*•])[ \t]*", "", lines[0], flags=re.IGNORECASE)
    question = question.strip().strip('"“”')
    if not 10 <= len(question) <= 300:
        return None
    if re.search(r"\b(?:topic|question type|question)[ \t]*:", question, re.IGNORECASE):
        return None  # the model is writing the next example, not a question
    if question[-1] not in "?.!":
        return None  # cut off mid-sentence
    return question if _mentions(question, topic) else None


# ---------------------------------------------------------------------------------------------
# Self-instruct
# ---------------------------------------------------------------------------------------------

NO_INPUT = "<noinput>"
_NO_INPUT_SPELLINGS = {"<noinput>", "<no input>", "noinput", "no input", "none", "n/a", "(none)", "-", ""}


def _parse_seed_tasks(text: str, source: str) -> tuple[SeedTask, ...]:
    tasks: list[SeedTask] = []
    seen: set[str] = set()
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{source}:{number}: not JSON ({error.msg})") from None
        if not isinstance(record, dict) or not all(
            isinstance(record.get(k), str) for k in ("instruction", "input", "output")
        ):
            raise ValueError(f"{source}:{number}: needs string fields instruction, input and output")
        if not record["instruction"].strip() or not record["output"].strip():
            raise ValueError(f"{source}:{number}: empty instruction or output")
        if record["instruction"] in seen:
            raise ValueError(f"{source}:{number}: duplicate instruction")
        seen.add(record["instruction"])
        tasks.append(
            {"instruction": record["instruction"], "input": record["input"], "output": record["output"]}
        )
    return tuple(tasks)


@functools.cache
def _seed_tasks() -> tuple[SeedTask, ...]:
    path = "self_instruct/seed_tasks.jsonl"
    return _parse_seed_tasks(_read_text(path), str(prompts_dir() / path))


def load_seed_tasks() -> list[SeedTask]:
    return [SeedTask(**task) for task in _seed_tasks()]  # copies: the cached ones stay intact


def self_instruct_prompt(seed_tasks: Sequence[SeedTask | NewTask], n_new: int = 8) -> str:
    """Shows the given (sampled) tasks as a numbered list and asks the model to continue it.

    The prompt ends with "{k+1}. Instruction:", so the generation starts inside the first new
    task; parse_self_instruct() expects exactly that.
    """
    if not seed_tasks:
        raise ValueError("self_instruct_prompt needs at least one seed task")
    if n_new < 1:
        raise ValueError(f"n_new must be at least 1, got {n_new}")
    tasks = "\n\n".join(
        f"{i}. Instruction: {_one_line(task['instruction'])}\n{i}. Input: {task['input'].strip() or NO_INPUT}"
        for i, task in enumerate(seed_tasks, start=1)
    )
    first = len(seed_tasks) + 1
    return _fill(
        _read_text("self_instruct/generation_prompt.txt").strip(),
        tasks=tasks,
        n_new=str(n_new),
        first=str(first),
        last=str(first + n_new - 1),
    )


_TASK_FIELD = re.compile(
    r"^[ \t]*(?:\d+[ \t]*[.)][ \t]*)?(instruction|input|output)[ \t]*:[ \t]*", re.IGNORECASE | re.MULTILINE
)


def parse_self_instruct(text: str, max_instruction_words: int = 150) -> list[NewTask]:
    """New tasks from a self-instruct generation: numbered Instruction/Input pairs.

    Text before the first field is the first instruction (the prompt ends with "N. Instruction:").
    A task counts only with both fields, which drops a last task cut off by the length limit;
    outputs and other stray text are ignored, since the self-align stage writes the answers.
    """
    fields = list(_TASK_FIELD.finditer(text))
    values = [("instruction", text[: fields[0].start() if fields else len(text)])]
    for index, field in enumerate(fields):
        end = fields[index + 1].start() if index + 1 < len(fields) else len(text)
        values.append((field[1].lower(), text[field.end() : end]))
    tasks: list[NewTask] = []
    seen: set[tuple[str, str]] = set()
    instruction: str | None = None
    for kind, value in values:
        if kind == "instruction":
            instruction = _one_line(value)
        elif kind == "input" and instruction is not None:
            input = "" if value.strip().casefold() in _NO_INPUT_SPELLINGS else value.strip()
            words = instruction.split()
            key = (instruction.casefold(), input)
            if 2 <= len(words) <= max_instruction_words and key not in seen:
                seen.add(key)
                tasks.append({"instruction": instruction, "input": input})
            instruction = None  # one input per instruction
    return tasks
