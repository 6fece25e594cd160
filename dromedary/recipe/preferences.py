"""Principle-driven preferences (Dromedary-2's SALMON): the reward principles, the judging and
reward-model prompts, and the arithmetic that turns per-dimension judge scores into reward-model
training pairs.

A preference record carries, per dimension, two judge scores (s12, s21): the judge read the pair
in both orders, and each score is the log-probability margin *in favour of output_1* (positive:
output_1 is better on that dimension). Their mean cancels the judge's order bias where both
orders agree.

Training pairs (`training_pairs`) are made in several passes; in each pass every pair is shown to
the reward model under a few sampled principles, some negated, and labelled by the principle
with the largest normalised margin: negating a principle flips its margin and puts its negative
definition in the prompt, so the reward model must read its principles to be right. Every random
choice is drawn from a generator seeded by (seed, pass, record id), so the pairs are the same for a
seed whatever the order or sharding of the input.
"""

from __future__ import annotations

import functools
import json
import math
import random
import statistics
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from .templates import _fill, _read_text, prompts_dir, user_message

PRINCIPLES_FILE = "salmon/reward_principles.json"
JUDGE_LABELS = ("1", "2")  # what follows the judging prompt's cue: "Reply (1" or "Reply (2"


@dataclass(frozen=True)
class RewardPrinciple:
    name: str
    definition: str
    negative: str


def load_reward_principles(path: Optional[str] = None) -> list[RewardPrinciple]:
    """The reward principles of prompts/salmon/reward_principles.json, or of a user's file of the
    same shape ({"principles": [{"name", "definition", "negative"}, ...]} or the bare list)."""
    if path:
        source, text = Path(path), None
        if not source.is_file():
            raise FileNotFoundError(f"--principles {path}: no such file")
        text = source.read_text(encoding="utf-8")
    else:
        source, text = prompts_dir() / PRINCIPLES_FILE, _read_text(PRINCIPLES_FILE)
    return list(_parse_principles(text, str(source)))


@functools.lru_cache(maxsize=8)
def _parse_principles(text: str, source: str) -> tuple[RewardPrinciple, ...]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{source}:{error.lineno}: not JSON ({error.msg})") from None
    items = data.get("principles") if isinstance(data, dict) else data
    if not isinstance(items, list) or not items:
        raise ValueError(f"{source}: expected a non-empty list of principles (or {{\"principles\": [...]}})")
    out, seen = [], set()
    for i, item in enumerate(items):
        fields = ("name", "definition", "negative")
        if not isinstance(item, dict) or not all(isinstance(item.get(f), str) and item[f].strip() for f in fields):
            raise ValueError(f"{source}: principle {i} needs non-empty string fields {', '.join(fields)}")
        name = item["name"].strip()
        if name in seen or any(c.isspace() for c in name):
            raise ValueError(f"{source}: principle {i}: name {name!r} is repeated or has spaces")
        seen.add(name)
        out.append(RewardPrinciple(name, item["definition"].strip(), item["negative"].strip()))
    return tuple(out)


@functools.cache
def _template(name: str) -> str:
    return _read_text(f"salmon/{name}").rstrip("\n")


def _shown_name(principle: RewardPrinciple) -> str:
    return principle.name.replace("_", " ")


def judge_prompt(instruction: str, input: str, first: str, second: str, principle: RewardPrinciple) -> str:
    """The judging prompt: the request, `first` as Reply (1), `second` as Reply (2), one
    dimension; it ends on the cue "Reply (" so the next token names the better reply."""
    return _fill(_template("judge.txt"), request=user_message(instruction, input), output_a=first.strip(),
                 output_b=second.strip(), dimension=_shown_name(principle), definition=principle.definition)


def judge_header() -> str:
    """The text every judging prompt starts with (cached once by the scorer)."""
    return _template("judge.txt").split("{request}")[0]


def reward_prompt(instruction: str, input: str, output: str, principles: Sequence[str]) -> str:
    """The reward model's prompt: the principles (definition texts, one bullet each), the request
    and one reply; it ends on a fixed cue, whose last token's hidden state the reward head reads."""
    listed = "\n".join(f"- {p.strip()}" for p in principles)
    return _fill(_template("reward_model.txt"), principles=listed, request=user_message(instruction, input),
                 output=output.strip())


def default_reward_principles(principles: Optional[Sequence[RewardPrinciple]] = None) -> list[str]:
    """What `dromedary reward` shows the reward model when a record names no principles: every
    positive definition."""
    return [p.definition for p in (principles or load_reward_principles())]


# ---------------------------------------------------------------------------------------------
# Rules that override the judge
# ---------------------------------------------------------------------------------------------


@functools.cache
def stock_disclaimers() -> tuple[str, ...]:
    data = json.loads(_read_text("salmon/rules.json"))
    return tuple(p.casefold() for p in data["stock_disclaimers"])


def has_stock_disclaimer(text: str) -> bool:
    folded = " ".join(text.casefold().replace("\u2019", "'").split())
    return any(p in folded for p in stock_disclaimers())


def script(text: str) -> Optional[str]:
    """The writing system most of the letters of TEXT are in (LATIN, CYRILLIC, CJK, ARABIC, ...,
    from the Unicode names), or None when it has no letters. A cheap stand-in for language
    identification that needs no model: it tells Chinese from English, not French from English."""
    counts: dict[str, int] = {}
    for ch in text:
        if not ch.isalpha():
            continue
        name = unicodedata.name(ch, "")
        word = name.split(" ")[0] if name else "OTHER"
        if word in ("HIRAGANA", "KATAKANA") or word == "CJK":
            word = "CJK"
        counts[word] = counts.get(word, 0) + 1
    return max(counts, key=lambda k: (counts[k], k)) if counts else None


def rule_verdict(record: Mapping[str, Any], *, language_rule: bool, disclaimer_rule: bool) -> Optional[tuple[int, str]]:
    """(preference, rule name) when a rule decides the pair, else None. A rule decides only when
    exactly one of the two answers breaks it."""
    if language_rule:
        want = script(user_message(record["instruction"], record.get("input", "")))
        if want is not None:
            off = [script(record[f"output_{i}"]) not in (want, None) for i in (1, 2)]
            if off[0] != off[1]:
                return (2 if off[0] else 1), "language"
    if disclaimer_rule:
        stock = [has_stock_disclaimer(record[f"output_{i}"]) for i in (1, 2)]
        if stock[0] != stock[1]:
            return (2 if stock[0] else 1), "disclaimer"
    return None


# ---------------------------------------------------------------------------------------------
# Scores -> training pairs
# ---------------------------------------------------------------------------------------------


def margins(record: Mapping[str, Any]) -> dict[str, float]:
    """Per dimension, the order-debiased margin in favour of output_1: the mean of (s12, s21)."""
    return {d: (float(s[0]) + float(s[1])) / 2 for d, s in record["scores"].items()}


def spreads(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Per dimension, the standard deviation of its margins over the whole file (0: no spread)."""
    by_dim: dict[str, list[float]] = {}
    for r in records:
        for d, m in margins(r).items():
            by_dim.setdefault(d, []).append(m)
    return {d: statistics.pstdev(ms) if len(ms) > 1 else 0.0 for d, ms in by_dim.items()}


def draw_k(rng: random.Random, p: float, cap: int) -> int:
    """k >= 1 from a geometric distribution with success probability p, capped at `cap`."""
    k = 1
    while k < cap and rng.random() >= p:
        k += 1
    return k


@dataclass(frozen=True)
class PairSettings:
    passes: int = 2
    geometric_p: float = 0.5  # k = number of principles shown: P(k) = (1-p)^(k-1) p
    max_principles: int = 4
    negate_p: float = 0.5
    language_rule: bool = True
    disclaimer_rule: bool = True
    label_noise: float = 0.0  # probability of flipping a label (robustness)
    seed: int = 0

    def check(self) -> None:
        if self.passes < 1:
            raise ValueError(f"--passes must be at least 1, got {self.passes}")
        if not 0 < self.geometric_p <= 1:
            raise ValueError(f"--geometric_p must be in (0, 1], got {self.geometric_p}")
        if self.max_principles < 1:
            raise ValueError(f"--max_principles must be at least 1, got {self.max_principles}")
        for flag in ("negate_p", "label_noise"):
            if not 0 <= getattr(self, flag) <= 1:
                raise ValueError(f"--{flag} must be in [0, 1], got {getattr(self, flag)}")


def training_pairs(records: Sequence[Mapping[str, Any]], principles: Sequence[RewardPrinciple],
                   settings: PairSettings = PairSettings()) -> tuple[list[dict], dict[str, int]]:
    """(pair records, counts of what happened) from preference records.

    Each pair record: {id: "<record id>#<pass>", instruction, input, output_1, output_2,
    principles: [the definition texts shown], preference: 1|2, label: the dimension (with a leading
    "-" when negated) or rule that decided it, negated: [names]}.
    """
    settings.check()
    by_name = {p.name: p for p in principles}
    spread = spreads(records)
    dims = sorted(d for d in spread if d in by_name)
    counts = {"pairs": 0, "ties": 0, "rule:language": 0, "rule:disclaimer": 0, "noise": 0}
    if not dims:
        raise ValueError("no dimension of the scores is among the reward principles "
                        f"({', '.join(sorted(by_name))}); pass the --principles file the scores were made with")
    out = []
    for r in records:
        m = margins(r)
        # Normalised margins; a dimension without spread carries no signal (its margin is 0).
        z = {d: (m[d] / spread[d] if spread[d] > 0 else 0.0) for d in dims if d in m}
        usable = sorted(z)
        rule = rule_verdict(r, language_rule=settings.language_rule, disclaimer_rule=settings.disclaimer_rule)
        for pass_ in range(settings.passes):
            rng = random.Random(f"{settings.seed}:{pass_}:{r['id']}")  # str seeds are hashed stably (sha512)
            k = draw_k(rng, settings.geometric_p, min(settings.max_principles, len(usable)))
            chosen = rng.sample(usable, k)
            signs = {d: (-1.0 if rng.random() < settings.negate_p else 1.0) for d in chosen}
            noise = rng.random() < settings.label_noise
            shown = [by_name[d].negative if signs[d] < 0 else by_name[d].definition for d in chosen]
            if rule is not None:
                preference, label = rule[0], f"rule:{rule[1]}"
            else:
                signed = {d: signs[d] * z[d] for d in chosen}
                best = max(abs(v) for v in signed.values())
                top = {math.copysign(1.0, signed[d]) for d in chosen if abs(signed[d]) == best}
                if best == 0 or len(top) > 1:  # no signal, or the strongest principles disagree
                    counts["ties"] += 1
                    continue
                winner = next(d for d in chosen if abs(signed[d]) == best)
                preference = 1 if signed[winner] > 0 else 2
                label = ("-" if signs[winner] < 0 else "") + winner
            if noise:
                preference, label = 3 - preference, label + "+noise"
                counts["noise"] += 1
            if label.startswith("rule:"):
                counts[label.split("+")[0]] += 1
            counts["pairs"] += 1
            out.append({"id": f"{r['id']}#{pass_}", "instruction": r["instruction"], "input": r.get("input", ""),
                        "output_1": r["output_1"], "output_2": r["output_2"], "principles": shown,
                        "preference": preference, "label": label,
                        "negated": [d for d in chosen if signs[d] < 0]})
    return out, counts


def negate_pair(pair: Mapping[str, Any], principles: Sequence[RewardPrinciple]) -> dict:
    """The same pair under the opposite principles: every shown definition swapped for its
    counterpart (definition <-> negative), the preference flipped. The instructability check: a
    reward model that reads its principles must flip its choice."""
    swap = {p.definition: p.negative for p in principles} | {p.negative: p.definition for p in principles}
    missing = [t for t in pair["principles"] if t not in swap]
    if missing:
        raise ValueError(f"pair {pair['id']!r}: principle text {missing[0][:60]!r} is not in the principle file")
    return {**pair, "principles": [swap[t] for t in pair["principles"]], "preference": 3 - int(pair["preference"])}
