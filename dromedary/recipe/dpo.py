"""Direct preference optimisation: preference records -> (chosen, rejected) pairs, and the DPO
and IPO losses on the policy's and the reference's answer log-probabilities.

Pairs. Three input shapes are accepted, told apart by their fields:
- DPO pairs {id, instruction, input, chosen, rejected}: taken as they are.
- `dromedary preferences` records {id, instruction, input, output_1, output_2, scores}: a rule
  (recipe.preferences.rule_verdict: an answer in the wrong script, or one falling back on a
  stock disclaimer, loses) decides first; otherwise the answer the judge favoured summed over
  every principle (the sum of the order-debiased margins, recipe.preferences.margins) is chosen.
  A sum of exactly zero is a tie and the record is dropped. DPO shows the policy no principles,
  so the principles are combined, not sampled as reward-model does.
- reward-model's kept pairs {id, instruction, input, output_1, output_2, preference}: the preferred
  one is chosen, except where a negated principle decided it (a `label` starting with "-"), when
  it is flipped back to the positive principles the policy is meant to follow.

Losses (the functions below are pure tensor arithmetic, so the tests check them by hand). With
summed answer log-probabilities pi_c, pi_r (policy) and ref_c, ref_r (reference):
  h = (pi_c - ref_c) - (pi_r - ref_r)
  sigmoid (DPO):  -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)   (eps: label smoothing, cDPO)
  ipo:            (h' - 1 / (2 beta))^2, with h' the same difference of the per-token MEAN log-ratios
The IPO form follows TRL's DPOTrainer (the IPO authors' normalisation by answer length, so beta
means the same for short and long answers). The implicit rewards are beta * (pi - ref) of each
answer (summed, for both losses); accuracy is the share of pairs whose chosen reward is strictly
higher, the margin the mean of chosen - rejected.
"""

from __future__ import annotations

from typing import Literal, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

from . import preferences as salmon

LossType = Literal["sigmoid", "ipo"]
LOSS_TYPES = ("sigmoid", "ipo")
DPO_FIELDS = ("chosen", "rejected")


def _error(path: str, record: Mapping, field: str, reason: str) -> ValueError:
    return ValueError(f"{path}: record {record.get('id')!r}: field {field!r} {reason}")


def _text(path: str, record: Mapping, field: str) -> str:
    if field not in record:
        raise _error(path, record, field, "is missing")
    if not isinstance(record[field], str):
        raise _error(path, record, field, f"must be a string, got {type(record[field]).__name__}")
    return record[field]


def preference_pairs(recs: Sequence[Mapping], path: str, *, language_rule: bool = True,
                     disclaimer_rule: bool = True) -> tuple[list[dict], dict[str, int]]:
    """({id, instruction, input, chosen, rejected} per usable record, counts) from any of the three
    shapes above; a bad record raises ValueError naming the file, the record's id and the field."""
    out, counts = [], {"pairs": 0, "ties": 0, "rule": 0, "flipped_negated": 0}
    for r in recs:
        instruction, input_ = _text(path, r, "instruction"), r.get("input", "")
        if not isinstance(input_, str):
            raise _error(path, r, "input", f"must be a string, got {type(input_).__name__}")
        if "chosen" in r or "rejected" in r:
            chosen, rejected = _text(path, r, "chosen"), _text(path, r, "rejected")
        else:
            one, two = _text(path, r, "output_1"), _text(path, r, "output_2")
            if "scores" in r:
                first = _verdict(path, r, language_rule, disclaimer_rule, counts)
            elif "preference" in r:
                if r["preference"] not in (1, 2) or isinstance(r["preference"], bool):
                    raise _error(path, r, "preference", f"must be 1 or 2, got {r['preference']!r}")
                first = r["preference"] == 1
                if str(r.get("label", "")).startswith("-"):
                    first = not first
                    counts["flipped_negated"] += 1
            else:
                raise _error(path, r, "scores", "is missing: a record needs chosen and rejected, output_1, output_2 "
                             "and scores (from `dromedary preferences`), or output_1, output_2 and preference")
            if first is None:
                counts["ties"] += 1
                continue
            chosen, rejected = (one, two) if first else (two, one)
        if chosen == rejected:
            counts["ties"] += 1
            continue
        out.append({"id": r["id"], "instruction": instruction, "input": input_, "chosen": chosen, "rejected": rejected})
        counts["pairs"] += 1
    return out, counts


def _verdict(path: str, r: Mapping, language_rule: bool, disclaimer_rule: bool, counts: dict) -> Optional[bool]:
    """True: output_1 is chosen; False: output_2; None: a tie."""
    scores = r["scores"]
    if not isinstance(scores, dict) or not scores:
        raise _error(path, r, "scores", "must be a non-empty object {dimension: [s12, s21]}")
    for d, s in scores.items():
        if not (isinstance(s, list) and len(s) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                            for x in s)):
            raise _error(path, r, "scores", f"[{d!r}] must be [s12, s21], two numbers")
    rule = salmon.rule_verdict(r, language_rule=language_rule, disclaimer_rule=disclaimer_rule)
    if rule is not None:
        counts["rule"] += 1
        return rule[0] == 1
    total = sum(salmon.margins(r).values())
    return None if total == 0 else total > 0


def pair_losses(pi_c: torch.Tensor, pi_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor, *, beta: float,
                loss_type: LossType = "sigmoid", label_smoothing: float = 0.0,
                n_c: Optional[torch.Tensor] = None, n_r: Optional[torch.Tensor] = None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(losses, chosen_rewards, rejected_rewards), each (P,), for P pairs of summed answer
    log-probabilities (P,) each. IPO needs n_c, n_r: the answers' token counts (P,). The rewards
    are detached (statistics, not part of the loss)."""
    log_c, log_r = pi_c - ref_c, pi_r - ref_r  # (P,) log-ratios policy / reference
    if loss_type == "sigmoid":
        h = beta * (log_c - log_r)
        losses = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    elif loss_type == "ipo":
        if n_c is None or n_r is None:
            raise ValueError("the ipo loss needs the answers' token counts")
        h = log_c / n_c.clamp(min=1) - log_r / n_r.clamp(min=1)
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"--loss must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    return losses, beta * log_c.detach(), beta * log_r.detach()


def reward_stats(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """Means over the pairs of the implicit rewards, their accuracy (chosen strictly higher) and margin."""
    return {"chosen": chosen.mean().item(), "rejected": rejected.mean().item(),
            "accuracy": (chosen > rejected).float().mean().item(), "margin": (chosen - rejected).mean().item()}
