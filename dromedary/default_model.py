"""The embedded default model: a tiny LLaMA trained on the bundled prompt texts, built on first use.

It lets every stage run on a fresh laptop with no weights and no network. The build is
deterministic (fixed seeds, one thread for the tokenizer, fixed data order), takes about a minute on
two CPU cores, runs in a subprocess with a one-process world (so it does not disturb the caller's
torchrun groups), and lands atomically in a cache directory keyed by the prompt texts and build
settings. The result is an ordinary Meta-layout checkpoint: params.json, consolidated.00.pth and a
SentencePiece tokenizer.model, loaded like any real one.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .cache import cache_root
from .llama.model import ModelArgs

BUILD_VERSION = 6
ARGS = ModelArgs(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=1024, multiple_of=32,
                 norm_eps=1e-5, rope_theta=10000.0, max_seq_len=8192)
TRAIN = {"steps": 200, "batch": 8, "seq_len": 384, "lr": 3e-3, "warmup": 15, "seed": 1234, "long_every": 4}
VIEW_REPEATS = 6


# Folders of prompts/ the model is not trained on: texts that judge or score the assistant rather
# than prompt it. Adding a file to them leaves the default model (and its cache key) as it is.
OUTSIDE_CORPUS = frozenset({"evaluation", "salmon"})


def corpus_texts() -> list[str]:
    """The training documents, in a fixed order, all derived from prompts/.

    First the views the stages will ask this model to continue, repeated so that a minute of
    training learns them: each exemplar conversation as it appears in the self-align prompt
    (user turn, internal thoughts opening with the self-identification sentence, answer) and in
    the chat format that finetune and chat use. Then every file of prompts/ outside OUTSIDE_CORPUS
    as plain text (JSON files contribute their string values, so the model sees prose rather than
    braces).
    """
    from .recipe import templates

    texts: list[str] = []
    prefix = templates.self_align_prefix()
    marker, divider = templates.user_marker(), templates.conversation_divider()
    blocks = [b.strip() for b in prefix.split(divider)[1:] if marker in b and b.strip() != marker]
    system = templates.load_system_prompt("standard")
    chats = []
    for ex in templates.load_exemplars(assistant_name=templates.DEFAULT_ASSISTANT_NAME):
        turns = [{"role": t.role, "content": t.content} for t in ex.turns]
        chats.append(templates.format_conversation(system, turns, add_generation_prompt=False))
    for _ in range(VIEW_REPEATS):
        texts += [f"{divider}\n\n{b}\n\n{divider}" for b in blocks] + chats
    texts += _generation_views(templates)
    texts.append(prefix)
    root = templates.prompts_dir()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                       and p.relative_to(root).parts[0] not in OUTSIDE_CORPUS):
        raw = path.read_text(encoding="utf-8", errors="replace")
        if path.suffix in (".json", ".jsonl"):
            texts.extend(_strings(raw))
        elif path.suffix in (".txt", ".md"):
            texts.append(raw)
    return [t for t in texts if t.strip()]


def long_documents() -> list[str]:
    """The full self-align prompt continued by each exemplar conversation in turn."""
    from .recipe import templates

    prefix, marker = templates.self_align_prefix(), templates.user_marker()
    blocks = [b.strip() for b in prefix.split(templates.conversation_divider())[1:]]
    return [prefix + b[len(marker) :].lstrip("\n") for b in blocks if b.startswith(marker) and b != marker]


def _generation_views(templates) -> list[str]:
    """The prompt-generation formats, each continued with real examples from prompts/: TGRT topic
    brainstorming and question writing, and the self-instruct numbered list."""
    views = []
    for qt in templates.load_question_types():
        topics = list(qt.topics)
        views.append(templates.topic_brainstorm_prompt(qt, topics[:2], n=len(topics) - 2) + "\n".join(topics[2:]))
        for k, seed in enumerate(qt.seeds):
            others = [s for j, s in enumerate(qt.seeds) if j != k]
            views.append(f"{templates.tgrt_question_prompt(qt, seed.topic, others)} {seed.question}")
    tasks = templates.load_seed_tasks()
    shown, new = 3, 4
    for start in range(0, len(tasks) - shown - new + 1, shown + new):
        prompt = templates.self_instruct_prompt(tasks[start : start + shown], n_new=new)
        follow = tasks[start + shown : start + shown + new]
        lines = []
        for n, task in enumerate(follow, start=shown + 1):
            head = f"{n}. Instruction:" if lines else ""  # the prompt already ends with the first
            lines.append(f"{head} {task['instruction']}\n{n}. Input: {task['input'] or templates.NO_INPUT}".lstrip())
        views.append(prompt + " " + "\n\n".join(lines))
    return views


def _strings(raw: str) -> list[str]:
    out: list[str] = []

    def walk(v):
        if isinstance(v, str):
            out.append(v)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    for line in raw.splitlines() if not raw.lstrip().startswith(("[", "{\n")) else [raw]:
        try:
            walk(json.loads(line))
        except ValueError:
            continue
    return out


def fingerprint(texts: list[str]) -> str:
    h = hashlib.sha256(f"v{BUILD_VERSION}{asdict(ARGS)}{TRAIN}{VIEW_REPEATS}".encode())
    for t in texts:
        h.update(t.encode())
    return h.hexdigest()[:12]


def ensure_default_model(quiet: bool = False) -> Path:
    """The default checkpoint's directory, building it (once, under a file lock) if needed."""
    texts = corpus_texts()
    target = cache_root() / f"default-{fingerprint(texts)}"
    if (target / "params.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent first uses: one builds, the rest wait
        if (target / "params.json").exists():
            return target
        if not quiet:
            print(f"dromedary: building the embedded default model in {target} (about a minute, once)",
                  file=sys.stderr, flush=True)
        tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
        try:
            env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                    "MASTER_ADDR", "MASTER_PORT")}
            subprocess.run([sys.executable, "-m", "dromedary.default_model", str(tmp)], check=True,
                           env={**env, "PYTHONPATH": _package_parent() + os.pathsep + env.get("PYTHONPATH", "")})
            if not (target / "params.json").exists():  # another cache user may have finished first
                os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _package_parent() -> str:
    return str(Path(__file__).resolve().parent.parent)


def build(out_dir: Path) -> None:
    """Train the tokenizer and the model into `out_dir` (runs in its own process)."""
    import sentencepiece as spm

    from . import distributed
    from .llama import checkpoint
    from .llama.model import Transformer
    from .llama.tokenizer import load_tokenizer

    start = time.time()
    texts = corpus_texts()
    corpus = out_dir / "corpus.txt"
    # SentencePiece reads lines; keep paragraphs as lines.
    corpus.write_text("\n".join(line for t in texts for line in t.splitlines() if line.strip()), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out_dir / "tokenizer"), vocab_size=ARGS.vocab_size,
        model_type="bpe", byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2,
        max_sentence_length=1 << 16,
    )
    corpus.unlink()
    (out_dir / "tokenizer.vocab").unlink(missing_ok=True)
    tok = load_tokenizer(out_dir / "tokenizer.model")

    stream: list[int] = []
    for t in texts:
        stream += tok.encode(t, bos=True, eos=True)
    data = torch.tensor(stream)
    # The self-align prompt is thousands of tokens; windows of seq_len never show the model a
    # conversation that far in, and it loses the format there. Every `long_every` steps it trains
    # on the real thing: the whole prompt followed by an exemplar conversation.
    long_docs = [torch.tensor(tok.encode(d, bos=True, eos=False)) for d in long_documents()]

    distributed.setup(1, "cpu")
    # Late in training, Adam's second moments and many gradients fall into denormal floats,
    # which the CPU handles hundreds of times slower; flushing them to zero changes nothing here.
    torch.set_flush_denormal(True)
    torch.manual_seed(TRAIN["seed"])
    model = Transformer(ARGS)
    model.load_state_dict(checkpoint.init_state(ARGS, seed=TRAIN["seed"]), strict=True)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=TRAIN["lr"], betas=(0.9, 0.95), weight_decay=0.0, foreach=True)
    g = torch.Generator().manual_seed(TRAIN["seed"])
    n, steps = TRAIN["seq_len"] + 1, TRAIN["steps"]
    for step in range(steps):
        lr = TRAIN["lr"] * min(1.0, (step + 1) / TRAIN["warmup"]) * (0.1 + 0.9 * (1 - step / steps))
        for group in opt.param_groups:
            group["lr"] = lr
        if step % TRAIN["long_every"] == TRAIN["long_every"] - 1:
            batch = long_docs[int(torch.randint(0, len(long_docs), (1,), generator=g))][None]
        else:
            starts = torch.randint(0, max(1, len(data) - n), (TRAIN["batch"],), generator=g)
            batch = torch.stack([data[s : s + n] for s in starts])
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 40 == 0 or step == steps - 1:
            print(f"  default model: step {step + 1}/{steps} loss {loss.item():.3f}", file=sys.stderr, flush=True)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    checkpoint.save_checkpoint(checkpoint.StateReader(ARGS, state), out_dir, layout="meta")
    (out_dir / "BUILD.json").write_text(json.dumps({
        "what": "dromedary embedded default model (tiny, for pipelines without weights)",
        "build_version": BUILD_VERSION, "args": asdict(ARGS), "train": TRAIN,
        "tokens": len(stream), "final_loss": round(loss.item(), 4), "seconds": round(time.time() - start, 1),
    }, indent=2) + "\n")
    distributed.teardown()


if __name__ == "__main__":
    build(Path(sys.argv[1]))
