"""PPO's arithmetic on plain tensors, for `dromedary rl`: per-token rewards with the KL penalty,
generalised advantage estimation, whitening, and the clipped policy and value losses.

Shapes: a rollout batch is (B, L) response-token arrays, right-padded, with a bool `mask` marking
each row's real response tokens (a contiguous run from position 0). Position t of a row is the
state before the row's t-th response token; `values[:, t]` estimates the return from there, and
`logp*[:, t]` is the log-probability of that token. Nothing here knows about models, ranks or
files: the stage gathers the batch before calling these, so every data-parallel split computes
the same numbers.
"""

from __future__ import annotations

import torch


def token_rewards(logp_old: torch.Tensor, logp_ref: torch.Tensor, mask: torch.Tensor, score: torch.Tensor,
                  kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards, kl), each (B, L): kl = logp_old - logp_ref at every response token (0 on padding),
    rewards = -kl_coef * kl, plus `score` (B,) (the reward model's score and any bonus or penalty)
    at each row's last response token. A row without response tokens gets nothing."""
    kl = (logp_old - logp_ref) * mask
    rewards = -kl_coef * kl
    lengths = mask.sum(-1)
    rows = torch.nonzero(lengths > 0).squeeze(-1)
    rewards[rows, lengths[rows] - 1] += score[rows].to(rewards.dtype)
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), each (B, L), by generalised advantage estimation backwards over the
    positions: delta_t = r_t + gamma * V_{t+1} - V_t with V = 0 after a row's last token (the
    episode ends there), A_t = delta_t + gamma * lam * A_{t+1}; returns = A + V. Zero on padding."""
    rewards, values, m = rewards * mask, values * mask, mask.to(rewards.dtype)
    b, n = rewards.shape
    adv = torch.zeros_like(rewards)
    next_value = torch.zeros(b, dtype=rewards.dtype, device=rewards.device)
    next_adv = torch.zeros_like(next_value)
    for t in reversed(range(n)):
        # On padding m = 0: the carried values reset, so a row's last real token sees V_{t+1} = 0.
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a = (delta + gamma * lam * next_adv) * m[:, t]
        adv[:, t] = a
        next_value, next_adv = values[:, t] * m[:, t], a
    return adv, (adv + values) * m


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked entries of the whole batch (std unbiased, as TRL and the
    SALMON code do); with shift_mean False the mean is added back. Zero on padding."""
    m = mask.to(x.dtype)
    n = m.sum()
    mean = (x * m).sum() / n
    var = (((x - mean) * m) ** 2).sum() / (n - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * m


def policy_loss(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                cliprange: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed clipped-surrogate loss, number of clipped tokens) over the masked tokens:
    per token max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)), ratio = exp(logp - logp_old);
    a token counts as clipped where its ratio left [1 - eps, 1 + eps] (as OpenAI baselines
    count: unlike "the clipped term is the larger", it does not flip on rounding noise where the
    two terms tie). Sums, not means: the caller divides by the mini-batch's token count over
    every data-parallel group."""
    ratio = torch.exp(logp - logp_old)
    plain = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    m = mask.to(logp.dtype)
    return (torch.maximum(plain, clipped) * m).sum(), (((ratio - 1).abs() > cliprange).to(logp.dtype) * m).sum()


def value_loss(values: torch.Tensor, values_old: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed clipped value loss, number of tokens whose value moved more than eps from the
    rollout's): per token 0.5 * max((V - R)^2, (V_clip - R)^2), V_clip = V_old + clip(V - V_old,
    -eps, eps)."""
    v_clip = values_old + torch.clamp(values - values_old, -cliprange_value, cliprange_value)
    plain, clipped = (values - returns) ** 2, (v_clip - returns) ** 2
    m = mask.to(values.dtype)
    moved = ((values - values_old).abs() > cliprange_value).to(values.dtype)
    return 0.5 * (torch.maximum(plain, clipped) * m).sum(), (moved * m).sum()


def pad_rows(rows: list[list[float]], dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Lists of per-token numbers -> right-padded (B, L) tensor and its bool mask."""
    width = max([len(r) for r in rows] + [1])
    out = torch.zeros(len(rows), width, dtype=dtype)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=dtype)
        mask[i, : len(r)] = True
    return out, mask
