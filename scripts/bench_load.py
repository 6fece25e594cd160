"""Peak resident memory of loading a checkpoint, against the checkpoint's size on disk.

    python scripts/bench_load.py [--dim 1024 --n_layers 16 --vocab 32000 --dtype bf16]

Writes a random checkpoint (a few hundred MB) in the Meta layout with 2 shards and in the HF
layout, then loads each in a fresh process through the same builder every stage uses and prints
the peak RSS of that process, the RSS of a bare process that only imported torch, and the ratio
(peak - baseline) / checkpoint bytes, for all resident memory and for anonymous memory alone
(the mmapped checkpoint's pages count in RSS too, but are page cache the kernel can drop). A
loader that held a second private copy would show ~2x anonymous memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CHILD = r"""
import re, sys, time, json
import torch

def hwm_kb():
    # VmHWM belongs to this process image; ru_maxrss would inherit the parent's high-water mark.
    return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1))

def anon_kb():
    return int(re.search(r"RssAnon:\s+(\d+)", open("/proc/self/status").read()).group(1))

# Anonymous (private) memory is what a second copy would cost; file-backed pages of the mmapped
# checkpoint also count in RSS but are page cache the kernel can drop. Sample the anon peak.
import threading
peak_anon = [anon_kb()]
def sample():
    while True:
        peak_anon[0] = max(peak_anon[0], anon_kb())
        time.sleep(0.002)
threading.Thread(target=sample, daemon=True).start()

mode, path = sys.argv[1], sys.argv[2]
base = hwm_kb()
t = time.time()
if mode == "load":
    from dromedary.engine.builder import build
    loaded = build(path, dtype=sys.argv[3], tokenizer_path=sys.argv[4])
    n = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    # Touch every weight so lazily mapped pages are counted too (summed in place: an fp32 copy
    # of the largest matrix would itself add a quarter of a bf16 checkpoint to the peak).
    s = sum(float(c.float().sum()) for p in loaded.model.parameters() for c in p.detach().view(-1).split(1 << 20))
else:
    n = 0
peak = hwm_kb()
time.sleep(0.02)
print(json.dumps({"base_kb": base, "peak_kb": peak, "peak_anon_kb": peak_anon[0], "param_bytes": n,
                  "seconds": time.time() - t}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--n_layers", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    opts = ap.parse_args()

    import sentencepiece as spm
    import torch

    from dromedary.llama import checkpoint
    from dromedary.llama.model import ModelArgs

    args = ModelArgs(dim=opts.dim, n_layers=opts.n_layers, n_heads=opts.dim // 64, vocab_size=opts.vocab,
                     multiple_of=256, max_seq_len=2048)
    dtype = torch.bfloat16 if opts.dtype == "bf16" else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "corpus.txt").write_text("\n".join(f"line {i} of a tiny corpus for a tokenizer" for i in range(500)))
        spm.SentencePieceTrainer.train(input=str(tmp / "corpus.txt"), model_prefix=str(tmp / "tok"), vocab_size=60,
                                       bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
        state = checkpoint.init_state(args, seed=0, dtype=dtype)
        reader = checkpoint.StateReader(args, state)
        checkpoint.save_checkpoint(reader, tmp / "meta", layout="meta", num_shards=2)
        checkpoint.save_checkpoint(reader, tmp / "hf", layout="hf")
        del state, reader
        size = sum(f.stat().st_size for f in (tmp / "meta").glob("*.pth"))
        print(f"checkpoint: dim {args.dim}, {args.n_layers} layers, vocab {args.vocab_size}, {opts.dtype}: "
              f"{size / 2**20:.0f} MiB on disk")
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}
        bare = json.loads(subprocess.check_output([sys.executable, "-c", CHILD, "bare", "-"], env=env))
        print(f"{'layout':8} {'peak RSS':>10} {'above bare':>11} {'/ ckpt':>7} "
              f"{'peak anon above bare':>21} {'/ ckpt':>7} {'load s':>7}")
        for layout in ("meta", "hf"):
            out = subprocess.check_output([sys.executable, "-c", CHILD, "load", str(tmp / layout), opts.dtype,
                                           str(tmp / "tok.model")], env=env)
            r = json.loads(out.decode().strip().splitlines()[-1])
            above = (r["peak_kb"] - bare["peak_kb"]) * 1024
            anon = (r["peak_anon_kb"] - bare["peak_anon_kb"]) * 1024
            print(f"{layout:8} {r['peak_kb'] / 1024:>8.0f}MB {above / 2**20:>9.0f}MB {above / size:>7.2f} "
                  f"{anon / 2**20:>19.0f}MB {anon / size:>7.2f} {r['seconds']:>7.1f}")


if __name__ == "__main__":
    main()
