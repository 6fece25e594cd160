"""Tiny random LLaMA checkpoints and subprocess helpers shared by the core-engine tests."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

import torch

from dromedary.llama import checkpoint
from dromedary.llama.model import ModelArgs

REPO = Path(__file__).resolve().parents[1]

# The tokenizer fixture trains exactly this many pieces; 350 is not a multiple of 3 (vocab padding
# at MP=3) but is of 2.
VOCAB = 350

# dim 64, 4 heads of 16; FFN width 2/3 * 256 = 170 with multiple_of=2 (170 % 3 != 0).
LLAMA1 = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=None, vocab_size=VOCAB, multiple_of=2,
                   norm_eps=1e-5, max_seq_len=256)
GQA = replace(LLAMA1, n_kv_heads=2)

# Large enough that greedy decoding does not collapse onto one token.
STD = 0.3


def write_checkpoint(out: Path, args: ModelArgs, *, seed: int, tokenizer: Path, layout="meta",
                     num_shards: int = 1, std: float = STD, **kwargs) -> Path:
    state = checkpoint.init_state(args, seed=seed, std=std)
    checkpoint.save_checkpoint(checkpoint.StateReader(args, state), out, layout=layout,
                               num_shards=num_shards, tokenizer=tokenizer, **kwargs)
    return out


def full_state(ckpt_dir) -> dict[str, torch.Tensor]:
    reader = checkpoint.open_checkpoint(ckpt_dir)
    return {name: reader.checked(name).clone() for name in reader.names()}


def subprocess_env(*, pythonpath: bool = True, **extra) -> dict[str, str]:
    """The test's environment minus any torchrun variables, CPU only, one thread per process, and (unless
    `pythonpath=False`, to run exactly as a user does from the repository root) the repo on
    PYTHONPATH."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PYTHONPATH")}
    if pythonpath:
        env["PYTHONPATH"] = str(REPO)
    env["OMP_NUM_THREADS"] = "1"
    env["TQDM_DISABLE"] = "1"
    # CPU everywhere: results are compared across launch forms and with the in-process engine.
    env["CUDA_VISIBLE_DEVICES"] = ""
    env.update(extra)
    return env


def run(cmd: Sequence[str], *, check: bool = True, timeout: float = 240, cwd=REPO, pythonpath: bool = True,
        env: Optional[dict] = None, **kwargs):
    proc = subprocess.run(list(map(str, cmd)), cwd=cwd, env=subprocess_env(pythonpath=pythonpath, **(env or {})),
                          capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
                             f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc


def python_m() -> list[str]:
    return [sys.executable, "-m", "dromedary"]


def torchrun() -> list[str]:
    exe = Path(sys.executable).parent / "torchrun"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def console_script() -> Optional[str]:
    """The installed `dromedary` console script (CI: `pip install -e .`), if any."""
    beside = Path(sys.executable).parent / "dromedary"
    return str(beside) if beside.exists() else shutil.which("dromedary")


def run_cli(argv) -> int:
    """`dromedary ARGV...` in this process. The CLI tears the process groups down when it ends;
    the one-process world is set up again for the models the session's other tests hold."""
    from dromedary import cli, distributed

    try:
        return cli.main(list(map(str, argv)))
    finally:
        distributed.setup(1, "cpu")


def random_adapter(model, seed: int, r: int = 4, targets=("wq", "wv", "w2")) -> None:
    """Put a LoRA adapter with random, non-zero factors (lora_alpha = 2r) on `model` in place."""
    from dromedary import distributed
    from dromedary.llama import lora

    lora.add_lora(model, r=r, alpha=2 * r, dropout=0.0, targets=targets)
    lora.init_lora(model, seed, distributed.world())
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p, _ in lora.trainable(model):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


# Imported by every Python process that has its folder on PYTHONPATH: logs each record written to a
# data-parallel shard file as "PID ID" lines, so a test sees which process generated what (the
# shards themselves are merged and removed before the run ends).
_SHARD_WRITE_LOGGER = """
import importlib.abc, importlib.util, os, sys

class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "dromedary.records":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            write = module.RecordWriter.write

            def logged(self, record):
                write(self, record)
                if ".shard-" in self.path.name:
                    with open(os.environ["DROMEDARY_TEST_SHARD_LOG"], "a") as f:
                        f.write(f"{os.getpid()} {record['id']}\\n")

            module.RecordWriter.write = logged

        spec.loader.exec_module = exec_module
        return spec

if os.environ.get("DROMEDARY_TEST_SHARD_LOG"):
    sys.meta_path.insert(0, _Hook())
"""


def shard_write_logger(folder: Path, log: Path) -> dict[str, str]:
    """Environment for a subprocess that logs its shard writes to `log` (see above)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(_SHARD_WRITE_LOGGER)
    return {"PYTHONPATH": str(folder), "DROMEDARY_TEST_SHARD_LOG": str(log)}
