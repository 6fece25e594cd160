"""Every generating stage checks every record against the context window before the weights
load, naming the record's id, its token count, the window and the fix (engine/builder.peek)."""

import json

import pytest

from dromedary.engine import builder


@pytest.fixture
def no_weights(monkeypatch):
    """Any stage that gets as far as loading weights fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the context check")

    monkeypatch.setattr(builder, "build", refuse)  # every stage loads through engine.backends.open_engine


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_peek_gives_the_tokenizer_and_the_window_without_weights(ckpts, tokenizer):
    view = builder.peek(str(ckpts["gqa_hf"]))
    assert view.window == 256 and view.tokenizer.n_words == tokenizer.n_words
    assert builder.peek(str(ckpts["gqa_meta"]), max_seq_len=64).window == 64


def test_generate_names_the_overlong_record_before_loading(ckpts, tokenizer, tmp_path, no_weights):
    long = "the camel walks across the desert sand " * 20
    n = len(tokenizer.encode(long))
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": "ok", "prompt": "Tea"}, {"id": "r-long", "prompt": long}])
    from dromedary.stages.generate import generate

    with pytest.raises(ValueError) as err:
        generate(inp, str(tmp_path / "out.jsonl"), ckpt_dir=str(ckpts["gqa_meta"]), max_seq_len=64)
    msg = str(err.value)
    assert "'r-long'" in msg and f"{n} prompt tokens" in msg and "exceeds the context window of 64 tokens" in msg
    assert "shorten or drop" in msg and "--max_seq_len" in msg
    assert not (tmp_path / "out.jsonl").exists()


def test_verbose_clone_names_the_overlong_record_before_loading(ckpts, tmp_path, no_weights):
    rows = [{"id": "v1", "instruction": "Say hi.", "input": "", "output": "Hi.", "thoughts": "", "source": "x"}]
    inp = write_jsonl(tmp_path / "sft.jsonl", rows)
    from dromedary.stages.verbose_clone import verbose_clone

    with pytest.raises(ValueError, match=r"'v1' has \d+ prompt tokens plus 512 new tokens, which exceeds the context window of 256"):
        verbose_clone(inp, str(tmp_path / "out.jsonl"), ckpt_dir=str(ckpts["gqa_meta"]), max_new_tokens=512)
    assert not (tmp_path / "out.jsonl").exists()


def test_self_align_checks_before_loading(ckpts, tmp_path, no_weights):
    rows = [{"id": "p1", "instruction": "Say hi.", "input": "", "source": "x"}]
    inp = write_jsonl(tmp_path / "prompts.jsonl", rows)
    from dromedary.stages.self_align import self_align

    with pytest.raises(ValueError, match="context window of 256 tokens"):
        self_align(inp, str(tmp_path / "out.jsonl"), ckpt_dir=str(ckpts["gqa_meta"]))


@pytest.mark.parametrize("method", ["self-instruct", "tgrt"])
def test_generate_prompts_checks_its_largest_request_before_loading(ckpts, tmp_path, monkeypatch, method):
    from dromedary.engine import builder as b

    monkeypatch.setattr(b, "build", lambda *a, **k: (_ for _ in ()).throw(AssertionError("weights loaded")))
    from dromedary.stages.generate_prompts import generate_prompts

    with pytest.raises(ValueError, match=r"exceeds the context window of 128 tokens.*--max_seq_len"):
        generate_prompts(method, str(tmp_path / "p.jsonl"), num_prompts=4, ckpt_dir=str(ckpts["gqa_meta"]),
                         max_seq_len=128)
