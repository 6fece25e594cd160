"""Benchmark: multiple-choice scoring on our engine against lm-evaluation-harness's `hf` backend.

Both score the same (context, continuation) pairs on the same random LLaMA (fp32, CPU), in one run:
  - TruthfulQA-shaped: items of CANDIDATES choices behind lm-eval's six-shot QA primer
    (what `dromedary evaluate --protocol lm-eval` scores for truthfulqa_mc2);
  - the `dromedary` protocol: every candidate judged (True / False) inside the self-align prompt
    (principles + exemplars, about 2.5k tokens with a LLaMA tokenizer).
Ours goes through eval.scoring.Scorer (the shared context through the engine's prefix cache once);
lm-eval's through HFLM.loglikelihood. Reports items/s of each and the ratio, and checks that the
log-likelihoods agree.

    python scripts/bench_evaluate.py [--dim 256 --layers 4 --items 8 --threads 2]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dromedary import distributed  # noqa: E402
from dromedary.engine.builder import build  # noqa: E402
from dromedary.engine.generation import Engine  # noqa: E402
from dromedary.eval import protocols  # noqa: E402
from dromedary.eval.scoring import Scorer  # noqa: E402
from dromedary.llama import checkpoint  # noqa: E402
from dromedary.llama.model import ModelArgs  # noqa: E402
from dromedary.recipe import templates  # noqa: E402

WORDS = ("the a camel walks across desert sand water river city people think about good helpful honest answer "
         "question model true false reply request user assistant because when where which small large night "
         "morning light read write story world time year day hello friend coffee tea bread market").split()


def make_model(root: Path, dim: int, layers: int, vocab: int) -> Path:
    import sentencepiece as spm

    # The judge prompt's words too: LLaMA's vocabulary has "True", "False", "A", "B" as pieces.
    texts = [templates.self_align_prefix(templates.internal_codename()), protocols.QA_PRIMER,
             json.dumps(protocols.judge_text())] + ["True\nFalse\nA\nB"] * 50
    rng = random.Random(0)
    texts += [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(2000)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(root / "tokenizer"), vocab_size=vocab, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2,
        character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, max_sentence_length=100000)
    args = ModelArgs(dim=dim, n_layers=layers, n_heads=dim // 64, n_kv_heads=None, vocab_size=vocab,
                     multiple_of=32, norm_eps=1e-5, max_seq_len=8192)
    out = root / "hf"
    checkpoint.save_checkpoint(checkpoint.StateReader(args, checkpoint.init_state(args, seed=0, std=0.05)), out,
                               layout="hf", tokenizer=root / "tokenizer.model")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": True, "model_max_length": 8192}))
    return out


def items(n: int, candidates: int, task: str) -> list[dict]:
    rng = random.Random(1)
    out = []
    for i in range(n):
        choices = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + "."
                   for _ in range(candidates)]
        out.append({"id": str(i), "task": task, "subset": "all", "where": "bench",
                    "input": " ".join(rng.choice(WORDS) for _ in range(10)).capitalize() + "?",
                    "choices": choices, "labels": [1] * (candidates // 2) + [0] * (candidates - candidates // 2)})
    return out


def time_ours(scorer: Scorer, shared: str, pairs: list[tuple[str, str]]) -> tuple[float, list[float]]:
    scorer.engine._prefix = None  # the shared context is part of the timed work
    start = time.perf_counter()
    scorer.share(shared, pairs[:8])
    lls = [s for s, _ in scorer.loglikelihoods(pairs)]
    return time.perf_counter() - start, lls


def time_hf(lm, pairs: list[tuple[str, str]]) -> tuple[float, list[float]]:
    from lm_eval.api.instance import Instance

    reqs = [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)]
    start = time.perf_counter()
    lls = [s for s, _ in lm.loglikelihood(reqs, disable_tqdm=True)]
    return time.perf_counter() - start, lls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2000)
    ap.add_argument("--items", type=int, default=16, help="TruthfulQA-shaped items")
    ap.add_argument("--judge_items", type=int, default=6, help="items for the dromedary protocol")
    ap.add_argument("--candidates", type=int, default=8)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt_tokens", type=int, default=2500,
                    help="the dromedary protocol's shared prompt: the fewest exemplars that reach this many tokens")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer, LlamaForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        path = make_model(Path(tmp), a.dim, a.layers, a.vocab)
        distributed.setup(1, "cpu")
        loaded = build(str(path), model_parallel_size=1, dtype="fp32", device="cpu")
        scorer = Scorer(Engine(loaded.model, loaded.tokenizer, prepack=False), a.batch_size)
        hf = HFLM(pretrained=LlamaForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval(),
                  tokenizer=AutoTokenizer.from_pretrained(str(path)), batch_size=a.batch_size, device="cpu")
        total = len(templates.load_exemplars(templates.internal_codename()))
        k = next((k for k in range(1, total + 1) if len(loaded.tokenizer.encode(templates.self_align_prefix(
            templates.internal_codename(), max_exemplars=k))) >= a.prompt_tokens), total)
        judge = protocols.JudgePrompt(engraved=False, assistant_name="Dromedary", system="", max_exemplars=k)
        shapes = [
            ("truthfulqa (lm-eval protocol)", items(a.items, a.candidates, "truthfulqa_mc2"), "lm-eval",
             protocols.QA_PRIMER, 3.0),
            ("dromedary protocol", items(a.judge_items, a.candidates, "truthfulqa_mc2"), "dromedary",
             judge.shared_prefix(), 10.0),
        ]
        print(f"model: dim {a.dim}, {a.layers} layers, vocab {a.vocab}, fp32, {a.threads} threads; "
              f"batch size {a.batch_size}")
        for name, its, protocol, shared, target in shapes:
            pairs = [p for it in its for p in protocols.requests(it, protocol, judge)]
            prompt_tokens = len(loaded.tokenizer.encode(pairs[0][0]))
            time_ours(scorer, shared, pairs[:4])  # warm-up
            t_ours, ours = time_ours(scorer, shared, pairs)
            t_hf, theirs = time_hf(hf, pairs)
            diff = max(abs(x - y) for x, y in zip(ours, theirs))
            ratio = t_hf / t_ours
            print(f"{name}: {len(its)} items, {len(pairs)} pairs, context {prompt_tokens} tokens | "
                  f"ours {len(its) / t_ours:.2f} items/s, lm-eval hf {len(its) / t_hf:.2f} items/s: "
                  f"{ratio:.1f}x (target {target:.0f}x: {'met' if ratio >= target else 'NOT met'}); "
                  f"max |ll difference| {diff:.2e}", flush=True)


if __name__ == "__main__":
    main()
