"""Process groups from the torchrun environment: model-parallel (MP) and data-parallel (DP) groups.

A plain `python`/`dromedary` run needs no torchrun: it becomes a one-process world on an in-memory
store. Ranks r = dp * K + mp: the K consecutive ranks of a data-parallel group share one model
(fairscale's layout), and the W/K groups split the input records between them.
"""

from __future__ import annotations

import builtins
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    mp_size: int
    mp_rank: int
    dp_size: int
    dp_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Global rank 0: the one process that prints, merges and writes shared files."""
        return self.rank == 0

    @property
    def is_group_writer(self) -> bool:
        """MP rank 0 of each data-parallel group: writes that group's records."""
        return self.mp_rank == 0


_WORLD: Optional[World] = None


def pick_device(device: Optional[str] = None) -> torch.device:
    """The one place that chooses between CUDA and CPU."""
    if device:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def pick_dtype(device: torch.device, dtype: Optional[str] = None) -> torch.dtype:
    """bf16 on GPUs that have it, fp16 on older ones, fp32 on CPU unless asked otherwise.

    "Have it" means compute capability 8.0 (Ampere) or later: is_bf16_supported() also says yes
    on a V100 or T4 (7.x), which only emulate bf16, at a fraction of their fp16 speed."""
    if dtype:
        names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                 "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
        if dtype not in names:
            raise ValueError(f"--dtype {dtype!r}: choose one of fp32, bf16, fp16")
        return names[dtype]
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return torch.bfloat16 if major >= 8 and torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def setup(model_parallel_size: Optional[int] = None, device: Optional[str] = None) -> World:
    """Initialise (once) the process group and fairscale's MP/DP groups; returns this rank's World."""
    global _WORLD
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    mp = model_parallel_size or world_size
    if mp < 1 or world_size % mp:
        raise ValueError(
            f"--model_parallel_size {mp} does not divide the world size {world_size}; "
            f"use a divisor of {world_size} (or launch a multiple of {mp} processes)"
        )
    if _WORLD is not None:
        if _WORLD.mp_size != mp:
            raise RuntimeError(f"model parallel size already set to {_WORLD.mp_size}, asked for {mp}")
        return _WORLD

    dev = pick_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if "MASTER_ADDR" in os.environ and world_size > 1:
            dist.init_process_group(backend, rank=rank, world_size=world_size)
        else:
            # One process, no torchrun: fairscale still wants a process group.
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)

    from fairscale.nn.model_parallel import initialize as fs_init

    if not fs_init.model_parallel_is_initialized():
        _quietly(fs_init.initialize_model_parallel, mp)
    _WORLD = World(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        mp_size=mp,
        mp_rank=fs_init.get_model_parallel_rank(),
        dp_size=world_size // mp,
        dp_rank=fs_init.get_data_parallel_rank(),
        device=dev,
    )
    if rank != 0:
        silence_this_rank()
    return _WORLD


def _quietly(fn, *args):
    # fairscale prints "> initializing model parallel with size K" on every rank.
    saved = sys.stdout
    sys.stdout = open(os.devnull, "w")
    try:
        return fn(*args)
    finally:
        sys.stdout.close()
        sys.stdout = saved


def silence_this_rank() -> None:
    """The one place non-zero ranks are silenced: no prints, no warnings, no progress bars.

    stderr stays open so that a crash on any rank still shows its traceback.
    """
    sys.stdout = open(os.devnull, "w")
    builtins.print = lambda *a, **k: None  # noqa: E731 - libraries print too
    warnings.filterwarnings("ignore")
    os.environ["TQDM_DISABLE"] = "1"


def world() -> World:
    if _WORLD is None:
        raise RuntimeError("distributed.setup() has not been called")
    return _WORLD


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0, group=None) -> Any:
    """Send a picklable object from global rank `src` to every rank of `group` (default: all)."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def mp_group():
    from fairscale.nn.model_parallel import initialize as fs_init

    return fs_init.get_model_parallel_group()


def dp_group():
    """The ranks that hold the same model shard in different data-parallel groups."""
    from fairscale.nn.model_parallel import initialize as fs_init

    return fs_init.get_data_parallel_group()


def mp_src_rank() -> int:
    from fairscale.nn.model_parallel import initialize as fs_init

    return fs_init.get_model_parallel_src_rank()


def broadcast_tensor_mp(t: torch.Tensor) -> torch.Tensor:
    """Make every model-parallel rank hold MP rank 0's value (e.g. the sampled tokens)."""
    w = world()
    if w.mp_size > 1:
        dist.broadcast(t, src=mp_src_rank(), group=mp_group())
    return t


def teardown(clean: bool = True) -> None:
    """Destroy the process groups so torchrun workers exit cleanly (gloo aborts otherwise).

    `clean=False` after an error skips the final barrier: the other ranks may never reach it.
    """
    global _WORLD
    if dist.is_initialized():
        try:
            if clean:
                barrier()
        finally:
            from fairscale.nn.model_parallel import initialize as fs_init

            fs_init.destroy_model_parallel()
            dist.destroy_process_group()
    _WORLD = None
