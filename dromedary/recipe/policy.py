"""What the policy stages (dpo, rl) share: the policy and its reference in one model, and the
log-probabilities of the answer tokens of finetune-format conversations.

The policy is the engraved model with a fresh LoRA adapter: `engine.builder.build(merge_adapter=SFT)`
folds the engraving into the frozen base weights as they load, `llama.lora.add_lora` puts a new
adapter on top, and `llama.lora.adapters_off` switches it off for the reference pass. One copy of
the weights serves both, and the reference is exactly the model the run started from (the new
adapter's B factors start at zero).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import torch
import torch.nn.functional as F

from .sft import IGNORE


def token_logprobs(model, tokens: torch.Tensor, labels: torch.Tensor, autocast=nullcontext(), *,
                   entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Per-token log-probabilities of the labelled tokens of right-padded (B, T) `tokens`.

    `labels` is sft.collate's: the token id where the token is trained on (the answer), IGNORE
    elsewhere. Returns (logp, mask, ent), each (B, T-1) and aligned with the predicted token
    tokens[:, 1:]: logp the fp32 log-probability of that token (0 where not labelled), mask where
    it is labelled, and with `entropy` the entropy of the predicted distribution there (else None).
    As in sft.loss_sum the output projection runs only on the N labelled positions.
    """
    target = labels[:, 1:]
    mask = target != IGNORE  # (B, T-1)
    with autocast:
        logits = model(tokens[:, :-1], output_mask=mask)  # (N, vocab)
    logsm = F.log_softmax(logits.float(), dim=-1)
    picked = logsm.gather(-1, target[mask].unsqueeze(-1)).squeeze(-1)  # (N,)
    logp = torch.zeros(mask.shape, dtype=torch.float32, device=tokens.device).masked_scatter(mask, picked)
    ent = None
    if entropy:
        per = -(logsm.exp() * logsm).sum(-1)  # (N,)
        ent = torch.zeros(mask.shape, dtype=torch.float32, device=tokens.device).masked_scatter(mask, per)
    return logp, mask, ent


def sequence_logprobs(model, tokens: torch.Tensor, labels: torch.Tensor, autocast=nullcontext()) -> torch.Tensor:
    """(B,) summed log-probability of each row's labelled tokens (the answer given the prompt)."""
    logp, _, _ = token_logprobs(model, tokens, labels, autocast)
    return logp.sum(-1)
