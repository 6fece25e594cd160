"""Checkpoint layouts, shard counts, conversion, padding for model-parallel sizes, and load errors."""

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers_ckpt import GQA, LLAMA1, STD, full_state, python_m, run, write_checkpoint
from safetensors import safe_open

from dromedary.engine import builder
from dromedary.llama import checkpoint
from dromedary.llama.checkpoint import CheckpointError
from dromedary.llama.model import ModelArgs, Transformer
from dromedary.stages.convert import convert

pytestmark = pytest.mark.usefixtures("world")


def safetensors_state(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(ckpt_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def assert_same_tensors(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def logits(ckpt_dir, tokens, **kwargs):
    loaded = builder.build(str(ckpt_dir), model_parallel_size=1, dtype="fp32", device="cpu", **kwargs)
    with torch.no_grad():
        return loaded.model(tokens)


TOKENS = torch.tensor([[1, 45, 200, 17, 99, 3, 250, 8]])


# ------------------------------------------------------------------------------- conversion

@pytest.mark.parametrize("name", ["llama1_hf", "gqa_hf"])
def test_hf_to_meta_to_hf_reproduces_every_tensor_exactly(ckpts, tmp_path, name):
    src = ckpts[name]
    convert(str(src), str(tmp_path / "meta"), layout="meta", num_shards=2)
    assert sorted(p.name for p in (tmp_path / "meta").glob("consolidated.*.pth")) == [
        "consolidated.00.pth", "consolidated.01.pth"]
    convert(str(tmp_path / "meta"), str(tmp_path / "hf"), layout="hf")
    assert_same_tensors(safetensors_state(src), safetensors_state(tmp_path / "hf"))
    assert json.loads((tmp_path / "hf" / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == (src / "tokenizer.model").read_bytes()


def test_hf_and_meta_layouts_of_the_same_weights_read_and_run_the_same(ckpts):
    # gqa_hf and gqa_meta are written from the same random state.
    assert_same_tensors(full_state(ckpts["gqa_hf"]), full_state(ckpts["gqa_meta"]))
    torch.testing.assert_close(logits(ckpts["gqa_hf"], TOKENS), logits(ckpts["gqa_meta"], TOKENS), rtol=0, atol=0)


def test_convert_cli_writes_meta_shards_and_refuses_a_non_empty_output(ckpts, tmp_path):
    out = tmp_path / "meta3"
    proc = run(python_m() + ["convert", "--ckpt_dir", ckpts["gqa_hf"], "--output_dir", out,
                             "--layout", "meta", "--num_shards", "3"])
    assert "wrote meta checkpoint" in proc.stderr
    assert len(list(out.glob("consolidated.*.pth"))) == 3
    assert_same_tensors(full_state(out), full_state(ckpts["gqa_hf"]))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    proc = run(python_m() + ["convert", "--ckpt_dir", ckpts["gqa_hf"], "--output_dir", out], check=False)
    assert proc.returncode == 2
    assert f"dromedary convert: error: {out}: output directory is not empty" in proc.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


# ------------------------------------------------------------------------- shards and files

@pytest.mark.parametrize("num_shards", [2, 3])
def test_meta_shards_load_at_mp1_equal_to_one_shard(ckpts, tmp_path, num_shards, tokenizer_path):
    # 3 shards do not divide 4 heads, 2 kv heads or 170 FFN rows: split as evenly as possible.
    sharded = write_checkpoint(tmp_path / "sharded", GQA, seed=2, tokenizer=tokenizer_path, num_shards=num_shards)
    assert len(list(sharded.glob("consolidated.*.pth"))) == num_shards
    shard0 = torch.load(sharded / "consolidated.00.pth", weights_only=True)
    assert shard0["layers.0.attention.wq.weight"].shape[0] < GQA.dim  # really split
    assert_same_tensors(full_state(sharded), full_state(ckpts["gqa_meta"]))
    torch.testing.assert_close(logits(sharded, TOKENS), logits(ckpts["gqa_meta"], TOKENS), rtol=0, atol=0)


@pytest.mark.parametrize("num_shards", [1, 2])
def test_released_checkpoint_pages_read_back_from_the_file(ckpts, tmp_path, tokenizer_path, num_shards):
    # Loading lets the kernel drop the mmapped pages of tensors it has copied; what is read after
    # that must come back from the file unchanged (dropping ordinary memory would zero it).
    path = write_checkpoint(tmp_path / "ckpt", GQA, seed=2, tokenizer=tokenizer_path, num_shards=num_shards)
    reader = checkpoint.open_checkpoint(path)
    assert reader.mapped
    expected = full_state(ckpts["gqa_meta"])
    for name in reader.names():
        first = reader.get(name).clone()
        reader.release(name)
        torch.testing.assert_close(reader.get(name), first, rtol=0, atol=0)
        torch.testing.assert_close(first, expected[name], rtol=0, atol=0)


def test_sharded_safetensors_with_index_load(ckpts, tmp_path, tokenizer_path):
    out = write_checkpoint(tmp_path / "hf", LLAMA1, seed=1, tokenizer=tokenizer_path, layout="hf",
                           max_file_bytes=60_000)
    files = sorted(out.glob("model-*.safetensors"))
    assert len(files) >= 3 and not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f.name for f in files}
    assert_same_tensors(full_state(out), full_state(ckpts["llama1_hf"]))
    torch.testing.assert_close(logits(out, TOKENS), logits(ckpts["llama1_hf"], TOKENS), rtol=0, atol=0)


def test_index_naming_a_missing_file_is_an_error(tmp_path, tokenizer_path):
    out = write_checkpoint(tmp_path / "hf", LLAMA1, seed=1, tokenizer=tokenizer_path, layout="hf",
                           max_file_bytes=60_000)
    missing = sorted(out.glob("model-*.safetensors"))[1]
    missing.unlink()
    with pytest.raises(CheckpointError, match=missing.name):
        checkpoint.open_checkpoint(out)


def test_pytorch_model_bin_loads(ckpts, tmp_path):
    out = tmp_path / "bin"
    out.mkdir()
    shutil.copy(ckpts["gqa_hf"] / "config.json", out)
    torch.save(safetensors_state(ckpts["gqa_hf"]), out / "pytorch_model.bin")
    assert_same_tensors(full_state(out), full_state(ckpts["gqa_hf"]))
    torch.testing.assert_close(logits(out, TOKENS, tokenizer_path=str(ckpts["gqa_hf"] / "tokenizer.model")),
                               logits(ckpts["gqa_hf"], TOKENS), rtol=0, atol=0)


def test_tied_word_embeddings_use_the_embedding_as_output(ckpts, tmp_path):
    from safetensors.torch import save_file

    out = tmp_path / "tied"
    out.mkdir()
    config = json.loads((ckpts["gqa_hf"] / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    state = safetensors_state(ckpts["gqa_hf"])
    del state["lm_head.weight"]
    save_file(state, str(out / "model.safetensors"))
    reader = checkpoint.open_checkpoint(out)
    assert torch.equal(reader.checked("output.weight"), state["model.embed_tokens.weight"])


# ----------------------------------------------------------------------------------- errors

def test_tokenizer_larger_than_the_embedding_is_refused(tmp_path, tokenizer, tokenizer_path):
    small = replace(GQA, vocab_size=tokenizer.n_words - 50)
    ckpt = write_checkpoint(tmp_path / "small", small, seed=2, tokenizer=tokenizer_path)
    with pytest.raises(CheckpointError) as err:
        builder.build(str(ckpt), model_parallel_size=1, dtype="fp32", device="cpu")
    msg = str(err.value)
    assert str(tokenizer.n_words) in msg and str(tokenizer.n_words - 50) in msg
    assert "tokenizer.model" in msg


def test_params_json_that_disagrees_with_the_tensors_names_both_shapes(ckpts, tmp_path):
    ckpt = tmp_path / "bad"
    shutil.copytree(ckpts["gqa_meta"], ckpt)
    params = json.loads((ckpt / "params.json").read_text())
    (ckpt / "params.json").write_text(json.dumps({**params, "n_kv_heads": 4}))
    # wk has 2 kv heads of 16 rows on disk; params.json claims 4.
    with pytest.raises(CheckpointError) as err:
        builder.build(str(ckpt), model_parallel_size=1, dtype="fp32", device="cpu")
    msg = str(err.value)
    assert "attention.wk.weight" in msg and "(32, 64)" in msg and "(64, 64)" in msg


def test_params_json_ffn_width_mismatch_names_both_widths(ckpts, tmp_path):
    ckpt = tmp_path / "bad"
    shutil.copytree(ckpts["gqa_meta"], ckpt)
    params = json.loads((ckpt / "params.json").read_text())
    (ckpt / "params.json").write_text(json.dumps({**params, "multiple_of": 64}))
    with pytest.raises(CheckpointError, match=r"192.*170 rows"):
        checkpoint.open_checkpoint(ckpt)


def test_a_missing_shard_is_named(ckpts, tmp_path, tokenizer_path):
    ckpt = write_checkpoint(tmp_path / "m", GQA, seed=2, tokenizer=tokenizer_path, num_shards=3)
    (ckpt / "consolidated.01.pth").unlink()
    with pytest.raises(CheckpointError, match=r"consolidated\.01\.pth"):
        checkpoint.open_checkpoint(ckpt)


def test_a_missing_last_shard_says_a_shard_may_be_missing(ckpts, tmp_path, tokenizer_path):
    # The last shard cannot be named (nothing on disk says how many there were), but the error
    # must point at the shards rather than at params.json.
    ckpt = write_checkpoint(tmp_path / "ckpt", GQA, seed=2, tokenizer=tokenizer_path, num_shards=3)
    (ckpt / "consolidated.02.pth").unlink()
    with pytest.raises(CheckpointError) as err:
        builder.build(str(ckpt), model_parallel_size=1, dtype="fp32", device="cpu")
    assert "shard" in str(err.value).replace(str(tmp_path), "")


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a LLaMA checkpoint"):
        checkpoint.open_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.open_checkpoint(tmp_path / "nope")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_loading_never_runs_pickled_code(ckpts, tmp_path):
    ckpt = tmp_path / "evil"
    ckpt.mkdir()
    shutil.copy(ckpts["gqa_meta"] / "params.json", ckpt)
    shutil.copy(ckpts["gqa_meta"] / "tokenizer.model", ckpt)
    marker = tmp_path / "pwned"
    state = torch.load(ckpts["gqa_meta"] / "consolidated.00.pth", weights_only=True)
    state["layers.0.attention.wq.weight"] = _Evil(marker)
    torch.save(state, ckpt / "consolidated.00.pth")
    with pytest.raises(Exception) as err:
        builder.build(str(ckpt), model_parallel_size=1, dtype="fp32", device="cpu")
    assert not marker.exists(), "unpickling ran code from the checkpoint"
    assert "system" in str(err.value)  # the refused global is named

    # The same pickle as an HF pytorch_model.bin.
    hf = tmp_path / "evil_hf"
    hf.mkdir()
    shutil.copy(ckpts["gqa_hf"] / "config.json", hf)
    torch.save({"model.norm.weight": _Evil(marker)}, hf / "pytorch_model.bin")
    with pytest.raises(Exception):
        checkpoint.open_checkpoint(hf)
    assert not marker.exists()


# ------------------------------------------------------------------ padding for MP sizes

PLANS = [(4, 4, 3), (4, 2, 3), (4, 2, 2), (6, 2, 4), (8, 8, 3), (32, 32, 3), (40, 40, 3), (12, 4, 8),
         (64, 8, 3), (64, 8, 5), (64, 8, 6), (64, 8, 12), (64, 8, 16), (64, 8, 8), (32, 8, 3), (5, 1, 4)]


@pytest.mark.parametrize("h, g, k", PLANS)
def test_plan_padding_invariants(h, g, k):
    args = ModelArgs(dim=h * 8, n_layers=1, n_heads=h, n_kv_heads=g, vocab_size=32001, multiple_of=7)
    pad = checkpoint.plan_padding(args, k)
    a = pad.args
    hn, gn = len(pad.q_src), len(pad.kv_src)
    assert (a.n_heads, a.kv_heads) == (hn, gn)
    for size in (hn, gn, a.ffn_size, a.vocab_rows):
        assert size % k == 0, (size, k)
    assert hn % gn == 0 and a.head_size == args.head_size
    assert a.ffn_size >= args.ffn_size and a.vocab_rows >= args.vocab_size and a.vocab_size == args.vocab_size
    # Every original query head appears exactly once, every kv head at least once.
    assert sorted(s for s in pad.q_src if s is not None) == list(range(h))
    assert set(s for s in pad.kv_src if s is not None) == set(range(g))
    rep_new, rep_old = hn // gn, h // g
    per_rank_q, per_rank_kv = hn // k, gn // k
    for n, src in enumerate(pad.q_src):
        if src is None:
            continue
        kv = n // rep_new  # the kv head query head n attends with in the padded model
        # ... is the original kv head of the original query head ...
        assert pad.kv_src[kv] == src // rep_old, (n, src, kv)
        # ... and lives on the same rank.
        assert n // per_rank_q == kv // per_rank_kv
    if (h % k, g % k, args.ffn_size % k, args.vocab_size % k) == (0, 0, 0, 0):
        assert pad.is_identity


def test_plan_padding_does_not_blow_up_llama2_70b():
    args = ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=32000, multiple_of=4096,
                     ffn_dim_multiplier=1.3)
    for k in (1, 2, 4, 8):
        assert checkpoint.plan_padding(args, k).is_identity
    for k in (3, 5, 6, 12):
        pad = checkpoint.plan_padding(args, k)
        # Padding costs at most a few heads per rank, not a multiple of the model.
        assert len(pad.q_src) <= 64 + 2 * k * 8, (k, len(pad.q_src))


@pytest.mark.parametrize("h, g, k", [(4, 2, 3), (4, 4, 3), (6, 2, 4), (64, 8, 3), (64, 8, 5), (12, 4, 8)])
def test_padded_model_computes_the_same_logits(world, h, g, k):
    """Zero heads, zero FFN rows and zero vocab rows change nothing: run the model padded for K
    ranks in one process and compare with the unpadded one."""
    args = ModelArgs(dim=32, n_layers=2, n_heads=h, n_kv_heads=g, vocab_size=50, multiple_of=2,
                     head_dim=4, max_seq_len=64)
    state = checkpoint.init_state(args, seed=5, std=STD)
    pad = checkpoint.plan_padding(args, k)
    padded = {name: checkpoint.pad_tensor(name, t, pad) for name, t in state.items()}
    plain_model, padded_model = Transformer(args), Transformer(pad.args)
    plain_model.load_state_dict(state)
    padded_model.load_state_dict(padded)
    tokens = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = plain_model(tokens), padded_model(tokens)
    assert got.shape == expected.shape == (2, 9, 50)  # padded vocab rows never reach the output
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("k", [2, 3])
def test_local_shards_reassemble_the_padded_tensors(ckpts, k):
    reader = checkpoint.open_checkpoint(ckpts["gqa_meta"])
    pad = checkpoint.plan_padding(reader.args, k)
    parts = []
    for rank in range(k):
        args, stream = checkpoint.local_state(reader, rank, k, dtype=torch.float32, device="cpu")
        assert args == pad.args
        parts.append(dict(stream))
    for name in reader.names():
        full = checkpoint.pad_tensor(name, reader.checked(name), pad)
        dim = checkpoint.local_shard_dim(name)
        got = parts[0][name] if dim is None else torch.cat([p[name] for p in parts], dim=dim)
        assert torch.equal(got, full), name
