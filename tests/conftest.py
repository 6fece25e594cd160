"""Session fixtures for the core-engine tests: a tiny SentencePiece tokenizer, tiny random LLaMA
checkpoints (LLaMA-1 style and GQA) in Meta and HF layouts, and a one-process world."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers_ckpt import GQA, LLAMA1, VOCAB, write_checkpoint  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _private_cache():
    """Tests never read or write ~/.cache: the embedded default model lands in the repository's
    (git-ignored) .pytest_cache, shared by every test process and kept between runs. Its directory
    name is a fingerprint of the prompts and build settings, so a stale model is never reused."""
    saved = os.environ.get("DROMEDARY_CACHE")
    default = Path(__file__).resolve().parent.parent / ".pytest_cache" / "dromedary-cache"
    os.environ["DROMEDARY_CACHE"] = os.environ.get("DROMEDARY_TEST_CACHE", str(default))
    yield
    if saved is None:
        os.environ.pop("DROMEDARY_CACHE", None)
    else:
        os.environ["DROMEDARY_CACHE"] = saved


_WORDS = ("the a camel walks across desert sand water river city people think about good helpful honest "
          "answer question model language principle user assistant because when where which small large "
          "quickly slowly every night morning light read write learn teach story world time year day "
          "hello there friend coffee tea bread market number one two three four five").split()
_RARE = ("café", "naïve", "日本", "€", "über", "façade")


def tokenizer_corpus(n: int = 3000) -> list[str]:
    rng = random.Random(0)
    lines = []
    for i in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        if i % 7 == 0:
            words.insert(rng.randrange(len(words)), rng.choice(_RARE))
        line = " ".join(words).capitalize() + rng.choice([".", "?", "!", ",", ":"])
        if i % 11 == 0:
            line += f" {rng.randint(0, 2000)}"
        lines.append(line)
    return lines


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread, and two threads spin against each other (and
    against the subprocesses the CLI tests start) on a two-core machine."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory) -> Path:
    import sentencepiece as spm

    out = tmp_path_factory.mktemp("tokenizer")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tokenizer_corpus()), model_prefix=str(out / "tokenizer"), vocab_size=VOCAB,
        model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, minloglevel=2, character_coverage=1.0,
    )
    return out / "tokenizer.model"


@pytest.fixture(scope="session")
def tokenizer(tokenizer_path):
    from dromedary.llama.tokenizer import Tokenizer

    return Tokenizer(tokenizer_path)


@pytest.fixture
def world():
    """A one-process world (fairscale MP=1). Function-scoped: a CLI run in-process tears the
    process groups down at exit, and models built earlier only need the groups to exist again."""
    from dromedary import distributed

    if distributed._WORLD is not None and distributed._WORLD.mp_size != 1:
        distributed.teardown(clean=False)
    return distributed.setup(1, "cpu")


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory, tokenizer_path):
    """Checkpoints on disk, shared by the whole session, keyed by what they hold."""
    root = tmp_path_factory.mktemp("ckpts")
    return {
        "llama1_hf": write_checkpoint(root / "llama1_hf", LLAMA1, seed=1, tokenizer=tokenizer_path, layout="hf"),
        "gqa_hf": write_checkpoint(root / "gqa_hf", GQA, seed=2, tokenizer=tokenizer_path, layout="hf"),
        "gqa_meta": write_checkpoint(root / "gqa_meta", GQA, seed=2, tokenizer=tokenizer_path),
    }


@pytest.fixture(scope="session")
def gqa_loaded(ckpts):
    """The GQA checkpoint built at MP=1, fp32, once per session."""
    from dromedary import distributed
    from dromedary.engine import builder

    if distributed._WORLD is not None and distributed._WORLD.mp_size != 1:
        distributed.teardown(clean=False)
    return builder.build(str(ckpts["gqa_meta"]), model_parallel_size=1, dtype="fp32", device="cpu")
