"""Supervised fine-tuning data and loss: sft records -> chat-format token ids -> loss on the answer.

Used by the finetune stage and by scripts/bench_finetune.py. A record becomes one conversation in
the format `chat` uses (templates): an engraving system prompt chosen by the record's id, the user
turn (instruction, then input), and the record's output as the assistant turn. The record's
`thoughts` are not trained on: engraving teaches the answers the principles led to, without the
principles in the prompt.
"""

from __future__ import annotations

import hashlib
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import distributed, records
from . import templates

IGNORE = -100  # label of the tokens that carry no loss: the source and the padding
Example = tuple[list[int], int]  # (token ids, number of source tokens)


def conversation(record: dict, path: str, *, assistant_name: str, knowledge_cutoff: str) -> tuple[str, str]:
    """(source, target) text of one sft record; the system prompt is fixed by the record's id."""
    system = templates.engraving_system_prompt(record["id"], assistant_name, knowledge_cutoff)
    user = templates.user_message(record["instruction"], record["input"])
    try:
        return templates.split_for_training(system, user, record["output"], assistant_name)
    except ValueError as err:
        raise ValueError(f"{path}: record {record['id']!r}: {err}") from None


def prompt(record: dict, *, assistant_name: str, knowledge_cutoff: str) -> str:
    """The source text of `conversation` alone (system prompt by id, user turn, assistant marker):
    what a policy is asked at generation time, as finetune trained it."""
    system = templates.engraving_system_prompt(record["id"], assistant_name, knowledge_cutoff)
    user = templates.user_message(record["instruction"], record["input"])
    return templates.format_conversation(system, [{"role": "user", "content": user}], assistant_name)


def encode(tok, source: str, target: str, *, source_max_len: int, target_max_len: int, add_eos: bool) -> Example:
    """The source keeps BOS (where the tokenizer adds one) and its last tokens up to source_max_len
    (`Tokenizer.encode_tail`: the request matters more than the start of the system prompt); the
    target is cut at its end, so an answer too long to finish never teaches EOS."""
    src = tok.encode_tail(source, source_max_len)
    tgt = (tok.encode(target, bos=False) + ([tok.eos_id] if add_eos else []))[:target_max_len]
    return src + tgt, len(src)


def collate(batch: list[Example], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (tokens, labels), both (B, T); labels are IGNORE on the source and the padding."""
    width = max(len(ids) for ids, _ in batch)
    tokens = torch.zeros(len(batch), width, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    for row, (ids, n_src) in enumerate(batch):
        tokens[row, : len(ids)] = torch.tensor(ids)
        labels[row, n_src : len(ids)] = torch.tensor(ids[n_src:])
    return tokens.to(device), labels.to(device)


class DataOrder:
    """Sample i of a run is record perm_e[i % N] with e = i // N: a fresh seeded shuffle per epoch,
    batches run across epoch ends, and step s always takes samples [s * B, (s + 1) * B) (cut at
    `end`, the run's last sample, so a run of E epochs trains exactly E * N samples), so the data
    position of a run is its step."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._perms: dict[int, list[int]] = {}

    def batch(self, step: int, size: int, end: int | None = None) -> list[int]:
        stop = (step + 1) * size if end is None else min((step + 1) * size, end)
        return [self._perm(i // self.n)[i % self.n] for i in range(step * size, stop)]

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(hash_seed(self.seed, epoch))
            self._perms = {epoch: torch.randperm(self.n, generator=g).tolist()}
        return self._perms[epoch]


def hash_seed(*parts) -> int:
    """A seed from any parts, stable across processes and runs (unlike hash())."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:7], "big")


def loss_sum(model, tokens: torch.Tensor, labels: torch.Tensor, autocast=nullcontext()) -> torch.Tensor:
    """Summed cross-entropy of the labelled tokens of (B, T) `tokens`.

    Logits are computed only where a label is predicted: the output projection (vocab x dim, the
    largest matmul of a small model) never runs on the prompt or the padding.
    """
    keep = labels[:, 1:] != IGNORE  # (B, T-1): positions whose next token is trained on
    with autocast:
        logits = model(tokens[:, :-1], output_mask=keep)  # (N, vocab) for the N kept positions
    return F.cross_entropy(logits.float(), labels[:, 1:][keep], reduction="sum")


def backward_batch(model, batch: list[Example], micro_batch_size: int, world, *, seed: int,
                   autocast=nullcontext()) -> torch.Tensor:
    """Forward and backward of this rank's share of one global batch; gradients accumulate.

    Returns (loss, tokens) of the share: summed over the data-parallel groups they are the batch's
    mean loss per target token and its token count. The batch is sorted by length and cut into
    micro-batches, so they hold similar lengths and pad little; these micro-batches, and the
    dropout seed of each (its place in the global batch), are the same for any data-parallel size,
    so any split draws the same masks, a resumed run too, and sums to the same gradient (the loss
    is divided by the whole batch's target-token count). Only which group runs which micro-batch
    depends on the split: deal_micro_batches balances their padded tokens.
    """
    batch = sorted(batch, key=lambda example: len(example[0]))
    denom = sum(len(ids) - n_src for ids, n_src in batch)
    micros = [batch[j : j + micro_batch_size] for j in range(0, len(batch), micro_batch_size)]
    owners = deal_micro_batches([len(m) * len(m[-1][0]) for m in micros], world.dp_size)
    stats = torch.zeros(2)
    for j, micro in enumerate(micros):
        if owners[j] != world.dp_rank:
            continue
        torch.manual_seed(hash_seed(seed, j))
        tokens, labels = collate(micro, world.device)
        loss = loss_sum(model, tokens, labels, autocast) / denom
        loss.backward()
        stats += torch.tensor([loss.item(), sum(len(ids) for ids, _ in micro)])
    for p in model.parameters():  # a group left without a micro-batch (a short last batch) adds zeros
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    return stats


def deal_micro_batches(costs: list[int], dp_size: int) -> list[int]:
    """The data-parallel group that runs each micro-batch: the costliest first, each to the group
    with the least work so far among those with fewer than their share of micro-batches (ties: the
    lowest rank). Cutting the sorted batch into contiguous shares would give the last group every
    long example, and make every step wait for it."""
    cap = -(-len(costs) // dp_size)
    load, count, owners = [0] * dp_size, [0] * dp_size, [0] * len(costs)
    for j in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        rank = min((r for r in range(dp_size) if count[r] < cap), key=lambda r: (load[r], r))
        owners[j] = rank
        load[rank] += costs[j]
        count[rank] += 1
    return owners


@torch.no_grad()
def evaluate(model, data: list[Example], micro_batch_size: int, world, autocast=nullcontext()) -> float:
    """Mean loss per target token over `data` (split between the data-parallel groups)."""
    model.eval()
    stats = torch.zeros(2)
    mine = records.split_for_data_parallel(data, world.dp_rank, world.dp_size)
    for j in range(0, len(mine), micro_batch_size):
        tokens, labels = collate(mine[j : j + micro_batch_size], world.device)
        stats += torch.tensor([loss_sum(model, tokens, labels, autocast).item(), (labels != IGNORE).sum().item()])
    model.train()
    stats = dp_sum(stats, world)
    return (stats[0] / stats[1].clamp(min=1)).item()


def dp_sum(t: torch.Tensor, world) -> torch.Tensor:
    """Sum a small CPU tensor over this rank's data-parallel group."""
    if world.dp_size > 1:
        t = t.to(world.device)
        dist.all_reduce(t, group=distributed.dp_group())
    return t.cpu()
