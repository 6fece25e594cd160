"""Which reward principles `dromedary rl` shows the reward model for each prompt.

SALMON trains the policy against an instructable reward model told, per prompt, which principles
to value. The principles come from a weighted collection: a small keyword classifier gives each
prompt a type (red_teaming, reasoning, or other), the type's boosts multiply the principles'
weights (reasoning prompts favour methodical and accurate answers, red-teaming prompts ethical
ones), and k principles (k geometric, as the reward model's training pairs drew them) are drawn
without replacement in proportion to their weights. The keywords and boosts are in
prompts/salmon/rl_principle_weights.json. Every draw comes from a generator seeded by (seed,
step, place in the batch, prompt id): the same for any data-parallel split and for a resumed run.
"""

from __future__ import annotations

import functools
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from .preferences import RewardPrinciple, draw_k
from .templates import _read_text, prompts_dir, user_message

WEIGHTS_FILE = "salmon/rl_principle_weights.json"
OTHER = "other"


@dataclass(frozen=True)
class PrincipleWeights:
    types: tuple[str, ...]  # checked in this order; the first whose keywords match wins
    keywords: dict[str, tuple[str, ...]]
    boosts: dict[str, dict[str, float]]  # type -> principle name -> multiplier


def load_weights(path: Optional[str] = None) -> PrincipleWeights:
    """The prompt types, their keywords and boosts (default prompts/salmon/rl_principle_weights.json)."""
    if path:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--principle_weights {path}: no such file")
        text, source = Path(path).read_text(encoding="utf-8"), path
    else:
        text, source = _read_text(WEIGHTS_FILE), str(prompts_dir() / WEIGHTS_FILE)
    return _parse(text, source)


@functools.lru_cache(maxsize=4)
def _parse(text: str, source: str) -> PrincipleWeights:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{source}:{error.lineno}: not JSON ({error.msg})") from None
    types, keywords, boosts = data.get("types"), data.get("keywords"), data.get("boosts", {})
    if not (isinstance(types, list) and all(isinstance(t, str) for t in types) and isinstance(keywords, dict)
            and isinstance(boosts, dict)):
        raise ValueError(f"{source}: expected \"types\" (a list of names), \"keywords\" and \"boosts\" (objects)")
    for t in types:
        if not (isinstance(keywords.get(t), list) and all(isinstance(k, str) and k.strip() for k in keywords[t])):
            raise ValueError(f"{source}: keywords[{t!r}] must be a list of non-empty strings")
    for t, table in boosts.items():
        if not isinstance(table, dict) or not all(isinstance(v, (int, float)) and v >= 0 for v in table.values()):
            raise ValueError(f"{source}: boosts[{t!r}] must map principle names to numbers >= 0")
    return PrincipleWeights(tuple(types), {t: tuple(k.lower() for k in keywords[t]) for t in types},
                            {t: {n: float(v) for n, v in table.items()} for t, table in boosts.items()})


def classify(instruction: str, input: str, weights: PrincipleWeights) -> str:
    """The prompt's type: the first of `weights.types` one of whose keywords occurs in the request
    as whole words (case-insensitive), else "other"."""
    text = " ".join(user_message(instruction, input).lower().split())
    for t in weights.types:
        if any(re.search(rf"(?<!\w){re.escape(k)}(?!\w)", text) for k in weights.keywords[t]):
            return t
    return OTHER


def principle_weights(kind: str, principles: Sequence[RewardPrinciple], weights: PrincipleWeights) -> list[float]:
    table = weights.boosts.get(kind, {})
    return [table.get(p.name, 1.0) for p in principles]


def draw_principles(rng: random.Random, kind: str, principles: Sequence[RewardPrinciple], weights: PrincipleWeights,
                    *, geometric_p: float, max_principles: int) -> list[RewardPrinciple]:
    """k principles without replacement, each draw in proportion to the remaining weights."""
    w = principle_weights(kind, principles, weights)
    pool = [(p, x) for p, x in zip(principles, w) if x > 0]
    if not pool:
        raise ValueError(f"every principle has weight 0 for prompts of type {kind!r}: check the boosts")
    k = draw_k(rng, geometric_p, min(max_principles, len(pool)))
    chosen = []
    for _ in range(k):
        total = sum(x for _, x in pool)
        u, acc = rng.random() * total, 0.0
        for i, (p, x) in enumerate(pool):
            acc += x
            if u < acc or i == len(pool) - 1:
                chosen.append(p)
                del pool[i]
                break
    return chosen
