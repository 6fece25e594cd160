"""Continuous batching: every request's output is what it gets alone, whatever else is in flight."""

import json
import threading

import pytest
import torch

from dromedary.engine.generation import Engine, SamplingParams
from dromedary.engine.scheduler import Request, Scheduler

pytestmark = pytest.mark.usefixtures("world")

WORDS = "the camel walks across desert sand water river city people think about good helpful honest answer".split()
SHARED = "Every helpful assistant should read the principle, think about the user, and answer honestly. "


def prompts(n, seed=0, lo=2, hi=30):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(lo, hi, (1,), generator=g))
        out.append(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (k,), generator=g)))
    return out


@pytest.fixture
def engine(gqa_loaded):
    return Engine(gqa_loaded.model, gqa_loaded.tokenizer)


def alone(engine, request):
    """What Engine.generate gives the request by itself (a fresh engine: no prefix kept across)."""
    fresh = Engine(engine.model, engine.tok)
    if engine._pinned is not None:
        fresh.cache_prefix(list(engine._pinned.tokens))
    return fresh.generate([request.prompt], request.params, seeds=[request.seed])[0]


def same(gen, ref):
    return (gen.tokens, gen.text, gen.finish_reason) == (ref.tokens, ref.text, ref.finish_reason)


def mixed_requests(tokenizer, n=12):
    """Budgets from 3 to 40, greedy and sampled, some with stop strings: rows finish at different
    steps, so later requests are admitted while others decode."""
    no_eos = {i: float("-inf") for i in tokenizer.stop_ids}
    out = []
    for i, p in enumerate(prompts(n, seed=1)):
        params = SamplingParams(max_new_tokens=3 + (i * 7) % 38, temperature=(0.0, 1.0, 0.7)[i % 3],
                                top_p=(1.0, 0.9)[i % 2], stop=(" the",) if i % 4 == 1 else (),
                                logit_bias=no_eos if i % 2 else {})
        out.append(Request(p, params, seed=100 + i, key=i))
    return out


@pytest.mark.parametrize("in_flight, chunk", [(1, 512), (3, 512), (5, 512), (4, 7)])
def test_each_request_equals_its_run_alone(engine, tokenizer, in_flight, chunk):
    """chunk 7: prompts are prefilled 7 tokens per step, over several steps, beside decoding rows."""
    requests = mixed_requests(tokenizer)
    done = list(Scheduler(engine, max_in_flight=in_flight, prefill_chunk=chunk).run(requests))
    assert sorted(r.key for r in done) == list(range(len(requests)))
    for r in requests:
        assert same(r.result, alone(engine, r)), r.key
    # Different budgets: the completion order is not the submission order.
    if in_flight > 1:
        assert [r.key for r in done] != sorted(r.key for r in done)


def test_a_sliver_of_a_long_prompt_waits_for_the_next_steps_budget(engine, tokenizer, monkeypatch):
    """Prompts of 14-24 words (60-110 tokens), 100 prompt tokens per step: after a row or so, what is left of the
    step's budget is too little to be worth a pass of its own; the next row starts next step."""
    from dromedary.engine import scheduler as sched_mod

    texts = prompts(1, seed=8, lo=30, hi=31) + prompts(5, seed=7, lo=14, hi=24)  # the first: >100 tokens
    requests = [Request(p, SamplingParams(max_new_tokens=4 + i), seed=i, key=i) for i, p in enumerate(texts)]
    sched = Scheduler(engine, max_in_flight=6, prefill_chunk=100)
    parts, real = [], sched._prefill_pass

    def spy(pool, left):
        before = {id(r): r.filled for r in pool.rows}
        took = real(pool, left)
        parts.extend((r.filled - before[id(r)], r.filled, len(r.own)) for r in pool.rows if r.filled != before[id(r)])
        return took

    monkeypatch.setattr(sched, "_prefill_pass", spy)
    list(sched.run(requests))
    part_way = [n for n, filled, total in parts if filled < total]
    assert part_way, "no prompt was split: the test does not exercise chunking"
    # The old rule split the rows after the first at whatever the budget left (3 tokens, 8, ...).
    assert all(n >= sched_mod.MIN_PART_CHUNK for n in part_way), parts
    for r in requests:
        assert same(r.result, alone(engine, r)), r.key


def test_requests_starting_with_the_cached_prefix_attend_to_it(engine, tokenizer, monkeypatch):
    engine.cache_prefix(SHARED)
    pinned = engine._pinned
    requests = [Request(SHARED + p, SamplingParams(max_new_tokens=4 + 5 * i, temperature=1.0), seed=i, key=i)
                for i, p in enumerate(prompts(6, seed=2))]
    requests.append(Request("No shared words here at all", SamplingParams(max_new_tokens=9), key="plain"))
    sched = Scheduler(engine, max_in_flight=4)
    seen = []
    real = sched._admit

    def spy(n):
        real(n)
        seen.extend((row.req.key, pool.prefix) for pool in sched._pools.values() for row in pool.rows)

    monkeypatch.setattr(sched, "_admit", spy)
    list(sched.run(requests))
    assert {k: p for k, p in seen} == {**{i: pinned for i in range(6)}, "plain": None}
    for r in requests:
        assert same(r.result, alone(engine, r)), r.key


def test_cancel_frees_the_slot_and_leaves_the_others_alone(engine, tokenizer):
    no_eos = {i: float("-inf") for i in tokenizer.stop_ids}
    long = SamplingParams(max_new_tokens=60, logit_bias=no_eos)
    requests = [Request(p, long, key=i) for i, p in enumerate(prompts(4, seed=3))]
    sched = Scheduler(engine, max_in_flight=2)
    for r in requests:
        sched.submit(r)
    finished = []
    for _ in range(5):
        finished += sched.step()
    victim = next(row.req for pool in sched._pools.values() for row in pool.rows)
    sched.cancel(victim)
    step = sched.step()
    assert victim in step and victim.result.finish_reason == "cancelled"
    assert 0 < len(victim.result.tokens) < 60
    # Its slot went to a waiting request at once.
    assert sched.in_flight() == 2
    while sched.pending():
        finished += sched.step()
    for r in requests:
        if r is not victim:
            assert same(r.result, alone(engine, r)), r.key


def test_cancel_of_a_waiting_request(engine):
    sched = Scheduler(engine, max_in_flight=1)
    a, b = (Request(p, SamplingParams(max_new_tokens=5)) for p in prompts(2, seed=4))
    sched.submit(a)
    sched.submit(b)
    sched.cancel(b)
    done = sched.step()
    assert b in done and b.result.finish_reason == "cancelled" and b.result.tokens == []


def test_streamed_text_is_a_prefix_of_the_final_text(engine, tokenizer):
    pieces: dict[int, list[str]] = {}
    requests = []
    for i, p in enumerate(prompts(5, seed=5)):
        pieces[i] = []
        requests.append(Request(p, SamplingParams(max_new_tokens=10 + 4 * i, temperature=1.0, stop=(" a",)),
                                seed=i, on_text=pieces[i].append, key=i))
    list(Scheduler(engine, max_in_flight=3).run(requests))
    for r in requests:
        assert "".join(pieces[r.key]) == r.result.text


def test_submit_from_another_thread_while_stepping(engine):
    sched = Scheduler(engine, max_in_flight=2)
    requests = [Request(p, SamplingParams(max_new_tokens=6), key=i) for i, p in enumerate(prompts(6, seed=6))]
    sched.submit(requests[0])
    t = threading.Thread(target=lambda: [sched.submit(r) for r in requests[1:]])
    t.start()
    done = []
    while len(done) < len(requests):
        done += sched.step()
    t.join()
    for r in requests:
        assert same(r.result, alone(engine, r))


def test_kv_budget_makes_requests_wait_not_fail(engine):
    requests = [Request(p, SamplingParams(max_new_tokens=20), key=i) for i, p in enumerate(prompts(5, seed=7))]
    # Every row needs at most 119 slots (prompt + 20), two rows at least 2 * 64 (slots come in 64s).
    one_row = Scheduler(engine).slot_bytes * 127
    sched = Scheduler(engine, max_in_flight=4, kv_budget_bytes=one_row)
    peak = 0
    for r in requests:
        sched.submit(r)
    while sched.pending():
        sched.step()
        peak = max(peak, sched.in_flight())
    assert peak == 1
    for r in requests:
        assert same(r.result, alone(engine, r))
    with pytest.raises(MemoryError, match="budget"):
        small = Scheduler(engine, kv_budget_bytes=Scheduler(engine).slot_bytes * 4)
        list(small.run([Request("the camel", SamplingParams(max_new_tokens=20))]))


def test_bad_requests_are_refused_at_submit(engine):
    sched = Scheduler(engine)
    with pytest.raises(ValueError, match="empty"):
        sched.submit(Request([], SamplingParams()))
    with pytest.raises(ValueError, match="context window"):
        sched.submit(Request([5] * 300, SamplingParams()))
    with pytest.raises(ValueError, match="logprobs"):
        sched.submit(Request("a", SamplingParams(logprobs=-1)))
    assert sched.pending() == 0


def test_logprobs_are_the_reference_models_log_softmax(engine, ckpts, tokenizer):
    from transformers import LlamaForCausalLM

    ref = LlamaForCausalLM.from_pretrained(str(ckpts["gqa_hf"]), dtype=torch.float32).eval()
    requests = [Request(p, SamplingParams(max_new_tokens=8, temperature=t, logprobs=k), seed=3, key=i)
                for i, (p, t, k) in enumerate(zip(prompts(3, seed=8), (0.0, 1.0, 1.5), (3, 0, 5)))]
    list(Scheduler(engine, max_in_flight=2).run(requests))
    for r in requests:
        g = r.result
        assert len(g.token_logprobs) == len(g.top_logprobs) == len(g.tokens) + (g.finish_reason == "eos")
        ids = tokenizer.encode(r.prompt) + g.tokens
        with torch.no_grad():
            logits = ref(torch.tensor([ids])).logits[0].float()
        lp = torch.log_softmax(logits, dim=-1)[len(ids) - len(g.tokens) - 1 :]  # row t predicts token t
        chosen = g.tokens + ([] if len(g.token_logprobs) == len(g.tokens) else [None])
        for t, token in enumerate(chosen):
            if token is not None:
                assert g.token_logprobs[t] == pytest.approx(float(lp[t, token]), abs=1e-4)
            top = g.top_logprobs[t]
            k = r.params.logprobs
            assert len(top) == k
            want = torch.topk(lp[t], k)
            assert list(top) == want.indices.tolist()
            assert list(top.values()) == pytest.approx(want.values.tolist(), abs=1e-4)
    # Off by default: nothing recorded.
    plain = Request("the camel", SamplingParams(max_new_tokens=3))
    list(Scheduler(engine).run([plain]))
    assert plain.result.token_logprobs is None and plain.result.top_logprobs is None


MP_SCRIPT = """
import json, sys
import torch
from dromedary import distributed
from dromedary.engine import builder
from dromedary.engine.generation import Engine, SamplingParams
from dromedary.engine.scheduler import Request, Scheduler

ckpt, out, mp = sys.argv[1], sys.argv[2], int(sys.argv[3])
specs = json.loads(sys.argv[4])
loaded = builder.build(ckpt, model_parallel_size=mp, dtype="fp32", device="cpu")
engine = Engine(loaded.model, loaded.tokenizer)
requests = [Request(p, SamplingParams(max_new_tokens=n, temperature=t), seed=s, key=i)
            for i, (p, n, t, s) in enumerate(specs)]
order = [r.key for r in Scheduler(engine, max_in_flight=3).run(requests)]
alone = [Engine(loaded.model, loaded.tokenizer).generate([r.prompt], r.params, seeds=[r.seed])[0].tokens
         for r in requests]
if distributed.world().rank == 0:
    json.dump({"tokens": [r.result.tokens for r in requests], "alone": alone, "order": order}, open(out, "w"))
distributed.teardown()
"""


def test_model_parallel_ranks_run_one_schedule(ckpts, tmp_path, engine):
    from helpers_ckpt import free_port, run, torchrun

    budgets = [30, 4, 22, 8, 16, 5, 12]
    specs = [(p, budgets[i], (0.0, 1.0)[i % 2], 7 + i) for i, p in enumerate(prompts(7, seed=9))]
    script = tmp_path / "mp.py"
    script.write_text(MP_SCRIPT)
    out = tmp_path / "out.json"
    run(torchrun() + ["--nproc_per_node", 2, "--master_port", free_port(), script, ckpts["gqa_meta"], out, 2,
                      json.dumps(specs)])
    got = json.loads(out.read_text())
    assert got["tokens"] == got["alone"]
    # The same as at MP=1, in this process.
    requests = [Request(p, SamplingParams(max_new_tokens=n, temperature=t), seed=s) for p, n, t, s in specs]
    list(Scheduler(engine, max_in_flight=3).run(requests))
    assert got["tokens"] == [r.result.tokens for r in requests]
    assert got["order"] != sorted(got["order"])  # rows finished out of order: slots were refilled


def test_a_stage_writes_records_as_they_finish_and_resumes_by_id(ckpts, tmp_path, engine, tokenizer):
    from helpers_ckpt import read_jsonl, write_jsonl

    from dromedary import cli, distributed

    def main(*args):
        try:
            return cli.main([str(a) for a in args])
        finally:
            distributed.setup(1, "cpu")

    texts = prompts(10, seed=10)
    inputs = write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i}", "prompt": p} for i, p in enumerate(texts)])
    common = ["--ckpt_dir", ckpts["gqa_meta"], "--input", inputs, "--max_new_tokens", 24, "--max_batch_size", 3,
              "--temperature", 0.8, "--stop", '[" the"]']
    full = tmp_path / "full.jsonl"
    assert main("generate", "--output", full, *common) == 0
    got = read_jsonl(full)
    ids = [r["id"] for r in got]
    assert sorted(ids) == sorted(f"r{i}" for i in range(10)) and ids != [f"r{i}" for i in range(10)]
    # Each record is what its prompt gives alone, with its own seed.
    from dromedary.engine.generation import row_seed

    params = SamplingParams(max_new_tokens=24, temperature=0.8, stop=(" the",))
    for r in got:
        assert r["completion"] == engine.generate([r["prompt"]], params, seeds=[row_seed(0, r["id"])])[0].text
    # A run stopped after 4 records resumes with the other 6.
    part = tmp_path / "part.jsonl"
    assert main("generate", "--output", part, *common) == 0
    part.write_text("".join(line + "\n" for line in part.read_text().splitlines()[:4]))
    assert main("generate", "--output", part, *common) == 0
    assert sorted(read_jsonl(part), key=lambda r: r["id"]) == sorted(got, key=lambda r: r["id"])
