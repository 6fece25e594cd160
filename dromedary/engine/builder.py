"""The one builder every model-running stage uses: groups, seed, shards, tokenizer, adapter.

`build()` joins the torchrun world (or makes a one-process one), picks device and dtype, resolves
the checkpoint (the embedded default when none is given), loads this rank's shard of the weights
into a model built on the meta device (so no memory is spent on a throwaway init), and applies a
LoRA adapter when asked: `adapter` as LoRA layers (trainable with `train`), `merge_adapter` folded
into the base weights as they load (the policy stages: the engraved model becomes the frozen base,
and a fresh adapter on top of it can be switched off to give the reference model).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .. import distributed
from ..llama import checkpoint, rope
from ..llama.model import ModelArgs, Transformer
from ..llama.tokenizer import Tokenizer, load_tokenizer


@dataclass
class Loaded:
    model: Transformer
    tokenizer: Tokenizer
    world: distributed.World
    args: ModelArgs  # as laid out on this world (padded for the MP size)
    source_args: ModelArgs  # as on disk
    name: str  # provenance: checkpoint path (+ adapter)
    ckpt_dir: Path


def resolve_ckpt_dir(ckpt_dir: Optional[str]) -> Path:
    if ckpt_dir:
        return Path(ckpt_dir).expanduser()
    from ..default_model import ensure_default_model

    return ensure_default_model()


def checkpoint_tokenizer(path: Path, tokenizer_path: Optional[str], reader=None) -> Tokenizer:
    """The tokenizer of a checkpoint, the one place build() and peek() get it: --tokenizer_path when
    given; else the checkpoint's own (its tokenizer.json, else its tokenizer.model; a GGUF's
    metadata). Its stop ids also take every end id that config.json / generation_config.json list."""
    reader = reader if reader is not None else checkpoint.open_checkpoint(path)
    if not tokenizer_path and reader.layout == "gguf":
        tokenizer = reader.load_tokenizer()
    else:
        tokenizer = load_tokenizer(tokenizer_path or path)
    tokenizer.stop_ids |= {i for i in reader.eos_token_ids if 0 <= i < tokenizer.n_words}
    return tokenizer


@dataclass
class Peek:
    tokenizer: Tokenizer
    window: int  # the context window the engine will have (--max_seq_len or the checkpoint's)
    note: str  # where the window came from when no file states it ("" when one does)
    ckpt_dir: Path


def peek(ckpt_dir: Optional[str] = None, tokenizer_path: Optional[str] = None,
         max_seq_len: Optional[int] = None) -> Peek:
    """The tokenizer and the context window without loading weights, for checks that must run
    before them: `open_checkpoint` reads the config and the tensor headers (safetensors headers,
    memory-mapped .pth files), not the tensors' data."""
    path = resolve_ckpt_dir(ckpt_dir)
    reader = checkpoint.open_checkpoint(path)
    window = reader.set_window(max_seq_len)  # also refuses a window past a sliding-window span
    return Peek(checkpoint_tokenizer(path, tokenizer_path, reader), window, reader.args.window_note, path)


def build(
    ckpt_dir: Optional[str] = None,
    *,
    tokenizer_path: Optional[str] = None,
    adapter: Optional[str] = None,
    merge_adapter: Optional[str] = None,
    model_parallel_size: Optional[int] = None,
    seed: int = 0,
    dtype: Optional[str] = None,
    max_seq_len: Optional[int] = None,
    device: Optional[str] = None,
    train: bool = False,
) -> Loaded:
    world = distributed.setup(model_parallel_size, device)
    torch.manual_seed(seed)
    if world.is_main:
        resolve_ckpt_dir(ckpt_dir)  # the embedded default is built once, by rank 0
    distributed.barrier()
    path = resolve_ckpt_dir(ckpt_dir)
    reader = checkpoint.open_checkpoint(path)  # first: a mistyped --ckpt_dir is named as such
    tokenizer = checkpoint_tokenizer(path, tokenizer_path, reader)
    torch_dtype = distributed.pick_dtype(world.device, dtype)
    source = reader.args
    if tokenizer.n_words > source.vocab_size:
        raise checkpoint.CheckpointError(
            f"{tokenizer.path}: tokenizer has {tokenizer.n_words} tokens but {path} has only "
            f"{source.vocab_size} embedding rows"
        )
    reader.set_window(max_seq_len)  # also refuses a window past a sliding-window span
    adjust = None
    if merge_adapter:  # W + s * B A folded into the base weights as they load: no LoRA layers, no extra copy
        from ..llama.lora import merge_function

        adjust = merge_function(merge_adapter, source)
    args, tensors = checkpoint.local_state(reader, world.mp_rank, world.mp_size, dtype=torch_dtype, device=world.device,
                                           adjust=adjust)
    with torch.device("meta"):
        model = Transformer(args, rope_table=rope.model_table)
    model.load_state_dict(dict(tensors), assign=True, strict=True)
    del reader
    model.requires_grad_(False)
    name = str(path)
    if merge_adapter:
        name += f" + merged adapter {merge_adapter}"
    if adapter:
        from ..llama.lora import load_adapter

        model = load_adapter(model, adapter, world=world, trainable=train, base_args=source)
        name += f" + adapter {adapter}"
    model.train(train)
    return Loaded(model, tokenizer, world, args, source, name, path)
