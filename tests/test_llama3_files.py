"""A Llama-3-style model as users hold it, end to end through `dromedary generate`: Meta's layout
(tiktoken `tokenizer.model`, params.json with use_scaled_rope and no window, two shards split as
Meta splits them) and HF's layout (`tokenizer.json` with its BOS template, rope llama3 in config.json),
each built here with random weights and a small BPE vocabulary, at MP=1 and under torchrun MP=2.

The reference is transformers on the same weights: the ids our tokenizer gives go into HF's
greedy `generate`, and the completion we write must be exactly those tokens decoded. In the HF layout
the ids themselves are checked against transformers' own tokenizer of the same files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers_ckpt import free_port, python_m, read_jsonl, run, torchrun, write_jsonl
from test_config_parity import BASE, LLAMA31, meta_llama3
from test_tokenizer import corpus, learn_ranks, llama3_like, reference_bpe, write_tiktoken

from dromedary.llama.tokenizer import LLAMA3_NUM_SPECIAL, load_tokenizer

transformers = pytest.importorskip("transformers")

# A user's text with control-token look-alikes in it: they must reach the model as plain text.
PROMPTS = ["The camel walks across the desert", "Say <|eot_id|> and <|begin_of_text|> to me, café 日本",
           "Principles first:"]
NEW = 10


def hf_model(vocab: int, bos: int, eos):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**BASE, **LLAMA31, "vocab_size": vocab, "bos_token_id": bos,
                                         "eos_token_id": eos})
    return transformers.LlamaForCausalLM(config).eval()


def hf_greedy(model, ids: list[int]) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    return out[0, len(ids):].tolist()


def ours(ckpt: Path, tmp_path: Path, mp: int) -> dict[str, str]:
    tmp_path.mkdir(exist_ok=True)
    inputs, out = tmp_path / f"in-{mp}.jsonl", tmp_path / f"out-{mp}.jsonl"
    write_jsonl(inputs, [{"id": f"p{i}", "prompt": p} for i, p in enumerate(PROMPTS)])
    args = ["generate", "--ckpt_dir", ckpt, "--input", inputs, "--output", out, "--temperature", 0,
            "--max_new_tokens", NEW, "--min_new_tokens", NEW, "--dtype", "fp32"]
    if mp == 1:
        run(python_m() + args)
    else:
        run(torchrun() + ["--nproc_per_node", mp, "--master_port", free_port(), "-m", "dromedary"] + args)
    return {r["id"]: r["completion"] for r in read_jsonl(out)}


@pytest.fixture(scope="module")
def meta_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama3_meta")
    ranks = learn_ranks(corpus(), 200)
    tok_file = write_tiktoken(root / "ranks.model", ranks)
    base = len(ranks)
    # Meta's order of the special tokens: <|begin_of_text|>, <|end_of_text|>, ..., <|eot_id|> at +9.
    model = hf_model(base + LLAMA3_NUM_SPECIAL, base, [base + 1, base + 8, base + 9])
    return meta_llama3(root / "meta", tok_file, model), model, ranks


@pytest.fixture(scope="module")
def hf_ckpt(tmp_path_factory):
    folder = llama3_like(tmp_path_factory.mktemp("llama3_hf") / "ckpt")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    bos, eos = fast.convert_tokens_to_ids(["<|begin_of_text|>", "<|end_of_text|>"])
    model = hf_model(len(fast), bos, [eos, fast.convert_tokens_to_ids("<|eot_id|>")])
    model.save_pretrained(folder)
    return folder, model


def test_meta_layout_tokenizer_is_metas_and_text_stays_text(meta_ckpt):
    ckpt, _, ranks = meta_ckpt
    tok = load_tokenizer(ckpt / "tokenizer.model")
    base = len(ranks)
    assert tok.n_words == base + LLAMA3_NUM_SPECIAL and tok.bos_id == base
    assert {base + 1, base + 8, base + 9} <= tok.stop_ids  # <|end_of_text|>, <|eom_id|>, <|eot_id|>
    for text in PROMPTS:
        assert tok.encode(text) == [base] + reference_bpe(ranks, text)  # look-alikes stay text


@pytest.mark.parametrize("mp", [1, 2])
def test_meta_layout_generates_what_transformers_generates(meta_ckpt, tmp_path, mp):
    ckpt, model, _ = meta_ckpt
    tok = load_tokenizer(ckpt / "tokenizer.model")
    got = ours(ckpt, tmp_path, mp)
    for i, text in enumerate(PROMPTS):
        ids = tok.encode(text)
        new = hf_greedy(model, ids)
        assert got[f"p{i}"] == tok.decode(ids[-1:] + new)[len(tok.decode(ids[-1:])):], text


@pytest.mark.parametrize("mp", [1, 2])
def test_hf_layout_generates_what_transformers_generates(hf_ckpt, tmp_path, mp):
    folder, model = hf_ckpt
    config = json.loads((folder / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "llama3"
    ref_tok = transformers.AutoTokenizer.from_pretrained(folder)
    tok = load_tokenizer(folder)
    got = ours(folder, tmp_path, mp)
    for i, text in enumerate(PROMPTS):
        ids = tok.encode(text)
        # transformers reads control-token look-alikes as control tokens unless told not to.
        assert ids == ref_tok(text, split_special_tokens=True)["input_ids"], text
        new = hf_greedy(model, ids)
        # Control tokens the random model emits are not text (as transformers' skip_special_tokens).
        decode = lambda x: ref_tok.decode(x, skip_special_tokens=True)  # noqa: E731
        assert got[f"p{i}"] == decode(ids[-1:] + new)[len(decode(ids[-1:])):], text


def test_convert_keeps_a_tokenizer_json_and_its_configuration(hf_ckpt, tmp_path):
    folder, model = hf_ckpt
    out = tmp_path / "meta"
    run(python_m() + ["convert", "--ckpt_dir", folder, "--output_dir", out, "--layout", "meta", "--num_shards", 2])
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    before, after = load_tokenizer(folder), load_tokenizer(out)
    assert (after.bos_id, after.add_bos, after.stop_ids) == (before.bos_id, before.add_bos, before.stop_ids)
    assert [after.encode(p) for p in PROMPTS] == [before.encode(p) for p in PROMPTS]
    assert ours(out, tmp_path / "converted", 1) == ours(folder, tmp_path / "original", 1)


def test_convert_to_hf_writes_the_tokenizers_bos_id(hf_ckpt, tmp_path):
    # A Llama-3 tokenizer's BOS is 128000-range, not LLaMA-2's 1: config.json says what it is.
    folder, _ = hf_ckpt
    out = tmp_path / "hf_again"
    run(python_m() + ["convert", "--ckpt_dir", folder, "--output_dir", out, "--layout", "hf"])
    config = json.loads((out / "config.json").read_text())
    bos = load_tokenizer(folder).bos_id
    assert bos != 1 and config["bos_token_id"] == bos
