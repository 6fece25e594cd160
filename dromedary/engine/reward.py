"""An instructable reward model: the backbone (base + LoRA adapter) and a scalar head reading the
hidden state of the prompt's last token (recipe.preferences.reward_prompt ends on a fixed cue, so
that token is the same word for every prompt).

On disk (`dromedary reward-model`'s output directory): the adapter in PEFT format
(adapter_config.json, adapter_model.safetensors), the head in reward_head.safetensors
({"weight": (1, dim), "bias": (1,)}, fp32) and reward_model.json (the base checkpoint, the
tokenizer, the longest prompt, the principles file). `RewardModel.load` reads them back for
scoring: `dromedary reward`, reranking, and the policy stage.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

HEAD_FILE = "reward_head.safetensors"
META_FILE = "reward_model.json"


class RewardHead(nn.Module):
    """(N, dim) final hidden states -> (N,) rewards, in fp32 whatever the backbone's dtype."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, 1)

    def reset(self, seed: int) -> None:
        # The same start on every rank and every MP size: a generator seeded by the run seed.
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(self.proj.weight.shape, generator=g) / self.proj.in_features ** 0.5)
            self.proj.bias.zero_()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden.float()).squeeze(-1)


def last_hidden(model, tokens: torch.Tensor, lengths: Sequence[int], autocast=None) -> torch.Tensor:
    """(B, dim): the final-normed hidden state at each right-padded row's last real token.
    Causal attention: the padding after a row's last token never reaches it. Under model
    parallelism every rank holds the whole (replicated) hidden state."""
    last = torch.tensor([n - 1 for n in lengths], device=tokens.device)
    with autocast if autocast is not None else nullcontext():
        return model(tokens, output_index=last, return_hidden=True)[:, 0]  # no output projection


def pad(rows: Sequence[Sequence[int]], device) -> tuple[torch.Tensor, list[int]]:
    width = max(len(r) for r in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(list(r))
    return tokens.to(device), [len(r) for r in rows]


def save_head(out_dir, head: RewardHead, meta: dict) -> None:
    from safetensors.torch import save_file

    out = Path(out_dir)
    save_file({"weight": head.proj.weight.detach().float().cpu().contiguous(),
               "bias": head.proj.bias.detach().float().cpu().contiguous()}, str(out / HEAD_FILE))
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def load_head(rm_dir, dim: int, device) -> RewardHead:
    from safetensors.torch import load_file

    path = Path(rm_dir) / HEAD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{rm_dir}: not a reward model directory ({HEAD_FILE} missing; "
                                "make one with `dromedary reward-model`)")
    state = load_file(str(path))
    if tuple(state["weight"].shape) != (1, dim):
        raise ValueError(f"{path}: head weight has shape {tuple(state['weight'].shape)}, the backbone's "
                         f"hidden size is {dim}: pass the --ckpt_dir the reward model was trained on")
    head = RewardHead(dim)
    head.load_state_dict({"proj.weight": state["weight"], "proj.bias": state["bias"]})
    return head.to(device).eval()


class RewardModel:
    """Scores reward prompts: `score(texts) -> rewards`. Every rank of a model-parallel group must
    call it with the same texts (the backbone's collectives)."""

    def __init__(self, loaded, head: RewardHead, max_len: int):
        self.loaded, self.head, self.max_len = loaded, head, max_len
        self.device = loaded.world.device

    @classmethod
    def load(cls, rm_dir: str, *, ckpt_dir: Optional[str] = None, tokenizer_path: Optional[str] = None,
             model_parallel_size: Optional[int] = None, dtype: Optional[str] = None) -> "RewardModel":
        from . import builder

        meta_path = Path(rm_dir) / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{rm_dir}: not a reward model directory ({META_FILE} missing)")
        meta = json.loads(meta_path.read_text())
        loaded = builder.build(ckpt_dir or meta.get("ckpt_dir"), tokenizer_path=tokenizer_path or meta.get("tokenizer_path"),
                               adapter=rm_dir, model_parallel_size=model_parallel_size, dtype=dtype)
        return cls(loaded, load_head(rm_dir, loaded.args.dim, loaded.world.device), int(meta["max_len"]))

    @torch.no_grad()
    def score(self, texts: Sequence[str], batch_size: int = 8) -> list[float]:
        ids = [self.loaded.tokenizer.encode_tail(t, self.max_len) for t in texts]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths pad little
        out = [0.0] * len(ids)
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            tokens, lengths = pad([ids[i] for i in batch], self.device)
            rewards = self.head(last_hidden(self.loaded.model, tokens, lengths))
            for i, r in zip(batch, rewards.tolist()):
                out[i] = r
        return out
