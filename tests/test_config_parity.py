"""Config fields against transformers: each supported field computes transformers' logits and greedy
tokens on the same random weights (fp32), each refused one is refused by name before anything is
written, and a Meta Llama-3-style checkpoint equals its HF twin at MP=1 and under torchrun MP=2.

Every reference model here is transformers' own (`LlamaForCausalLM(config).save_pretrained`), so
the files are what transformers writes, not what our writer writes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers_ckpt import VOCAB, free_port, run, torchrun, write_jsonl
from safetensors.torch import load_file, save_file

from dromedary.engine import builder
from dromedary.engine.generation import Engine, SamplingParams
from dromedary.llama import checkpoint, rope
from dromedary.llama.checkpoint import CheckpointError

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("world")

# dim 64, 4 heads (2 kv heads) of 16, window 64; initializer_range 0.3 so that greedy decoding
# does not collapse onto one token and rotary differences show in the logits.
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.3, bos_token_id=1, eos_token_id=2)

CASES = {
    "v5_rope_parameters_theta": dict(rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
    "linear": dict(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}),
    "llama3": dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
                                    "rope_theta": 500000.0}),
    "yarn": dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                                  "rope_theta": 10000.0}),
    "yarn_mscale": dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                                         "mscale": 1.0, "mscale_all_dim": 0.5, "beta_fast": 16, "rope_theta": 1000.0}),
    "tied": dict(tie_word_embeddings=True),
    "head_dim": dict(head_dim=32),  # 4 heads of 32 in a 64-wide model
    "rms_norm_eps": dict(rms_norm_eps=0.3),  # large enough to change the logits
}


def hf_checkpoint(out: Path, tokenizer_path: Path, *, mistral: bool = False, seed: int = 0, **fields):
    """transformers' own model and files for BASE + fields; returns the model (fp32, eval)."""
    cls_config, cls_model = ((transformers.MistralConfig, transformers.MistralForCausalLM) if mistral
                             else (transformers.LlamaConfig, transformers.LlamaForCausalLM))
    torch.manual_seed(seed)
    model = cls_model(cls_config(**{**BASE, **fields})).eval()
    model.save_pretrained(out)
    shutil.copyfile(tokenizer_path, out / "tokenizer.model")
    return model


def our_logits(ckpt: Path, tokens: torch.Tensor, **kwargs) -> torch.Tensor:
    loaded = builder.build(str(ckpt), model_parallel_size=1, dtype="fp32", device="cpu", **kwargs)
    with torch.no_grad():
        return loaded.model(tokens)


def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def greedy_ours(ckpt: Path, prompt: list[int], n: int, **kwargs) -> list[int]:
    loaded = builder.build(str(ckpt), model_parallel_size=1, dtype="fp32", device="cpu", **kwargs)
    engine = Engine(loaded.model, loaded.tokenizer)
    return engine.generate([prompt], SamplingParams(max_new_tokens=n, min_new_tokens=n))[0].tokens


def greedy_hf(model, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


TOKENS = torch.randint(3, VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))
PROMPT = [1] + torch.randint(3, VOCAB, (20,), generator=torch.Generator().manual_seed(1)).tolist()


# ------------------------------------------------------------------------------- supported

@pytest.mark.parametrize("case", sorted(CASES))
def test_config_field_matches_transformers(tmp_path, tokenizer_path, case):
    model = hf_checkpoint(tmp_path / case, tokenizer_path, **CASES[case])
    ours = our_logits(tmp_path / case, TOKENS)
    theirs = hf_logits(model, TOKENS)
    assert theirs.abs().max() > 1  # a real signal, not all-near-zero logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    assert greedy_ours(tmp_path / case, PROMPT, 12) == greedy_hf(model, PROMPT, 12)


def test_the_fields_are_not_no_ops(tmp_path, tokenizer_path):
    """Each case differs from the plain config on the same weights: the parity above means something."""
    plain = hf_checkpoint(tmp_path / "plain", tokenizer_path)
    base = hf_logits(plain, TOKENS)
    for case in ("v5_rope_parameters_theta", "linear", "llama3", "yarn", "rms_norm_eps"):
        model = hf_checkpoint(tmp_path / case, tokenizer_path, **CASES[case])
        assert (hf_logits(model, TOKENS) - base).abs().max() > 0.1, case


def test_v4_rope_scaling_and_rope_theta_read_as_v5_rope_parameters(tmp_path, tokenizer_path):
    model = hf_checkpoint(tmp_path / "v4", tokenizer_path, **CASES["llama3"])
    config = json.loads((tmp_path / "v4" / "config.json").read_text())
    params = config.pop("rope_parameters")
    config["rope_theta"] = params.pop("rope_theta")
    config["rope_scaling"] = {**params, "type": params["rope_type"]}
    (tmp_path / "v4" / "config.json").write_text(json.dumps(config))
    torch.testing.assert_close(our_logits(tmp_path / "v4", TOKENS), hf_logits(model, TOKENS), atol=1e-4, rtol=0)


def test_dynamic_ntk_past_the_original_window(tmp_path, tokenizer_path):
    """Dynamic NTK changes nothing inside the window and grows theta past it: a 100-token forward
    (window 64) and a greedy decode that crosses the window both match transformers."""
    fields = dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    model = hf_checkpoint(tmp_path / "dyn", tokenizer_path, **fields)
    long = torch.randint(3, VOCAB, (1, 100), generator=torch.Generator().manual_seed(2))
    ours = our_logits(tmp_path / "dyn", long, max_seq_len=128)
    theirs = hf_logits(model, long)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    plain = hf_checkpoint(tmp_path / "plain", tokenizer_path)
    assert (hf_logits(plain, long) - theirs).abs().max() > 0.1  # past the window it matters
    prompt = [1] + torch.randint(3, VOCAB, (57,), generator=torch.Generator().manual_seed(3)).tolist()
    assert greedy_ours(tmp_path / "dyn", prompt, 16, max_seq_len=128) == greedy_hf(model, prompt, 16)


def test_mistral_with_a_sliding_window_covering_the_window(tmp_path, tokenizer_path):
    model = hf_checkpoint(tmp_path / "mistral", tokenizer_path, mistral=True, sliding_window=64, num_key_value_heads=2)
    torch.testing.assert_close(our_logits(tmp_path / "mistral", TOKENS), hf_logits(model, TOKENS), atol=1e-4, rtol=0)
    assert greedy_ours(tmp_path / "mistral", PROMPT, 12) == greedy_hf(model, PROMPT, 12)


def test_mistral_sliding_window_smaller_than_the_window_loads_only_with_a_window_it_covers(tmp_path, tokenizer_path):
    model = hf_checkpoint(tmp_path / "mistral", tokenizer_path, mistral=True, sliding_window=32)
    with pytest.raises(CheckpointError, match=r"config.json: sliding_window 32 is smaller than the context window 64.*"
                                              r"--max_seq_len 32 or less"):
        builder.build(str(tmp_path / "mistral"), model_parallel_size=1, dtype="fp32", device="cpu")
    short = TOKENS[:, :32]
    torch.testing.assert_close(our_logits(tmp_path / "mistral", short, max_seq_len=32), hf_logits(model, short),
                               atol=1e-4, rtol=0)
    with pytest.raises(CheckpointError, match="sliding_window 32 is smaller than the context window 48"):
        builder.build(str(tmp_path / "mistral"), model_parallel_size=1, dtype="fp32", device="cpu", max_seq_len=48)


def test_every_eos_id_of_config_and_generation_config(tmp_path, tokenizer_path):
    hf_checkpoint(tmp_path / "eos", tokenizer_path, eos_token_id=[2, 7])
    (tmp_path / "eos" / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    reader = checkpoint.open_checkpoint(tmp_path / "eos")
    assert reader.eos_token_ids == [2, 7, 9]
    assert checkpoint.StateReader(reader.args, {}).eos_token_ids == []


def test_hf_to_meta_to_hf_keeps_scaling_tie_and_eos(tmp_path, tokenizer_path):
    from dromedary.stages.convert import convert

    model = hf_checkpoint(tmp_path / "src", tokenizer_path, eos_token_id=[2, 5],
                          rope_parameters={"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 2.0, "original_max_position_embeddings": 8192,
                                           "rope_theta": 500000.0})
    convert(str(tmp_path / "src"), str(tmp_path / "meta"), layout="meta", num_shards=2)
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    assert params["use_scaled_rope"] is True and params["rope_scaling_factor"] == 16.0
    assert params["rope_high_freq_factor"] == 2.0
    convert(str(tmp_path / "meta"), str(tmp_path / "hf"), layout="hf")
    back = checkpoint.open_checkpoint(tmp_path / "hf")
    assert back.eos_token_ids == [2, 5] and back.args.rope_scaling == checkpoint.open_checkpoint(tmp_path / "src").args.rope_scaling
    for ckpt in ("meta", "hf"):
        torch.testing.assert_close(our_logits(tmp_path / ckpt, TOKENS), hf_logits(model, TOKENS), atol=1e-4, rtol=0)
    # The HF files written back load in transformers and compute the same model.
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    torch.testing.assert_close(hf_logits(again, TOKENS), hf_logits(model, TOKENS), atol=1e-5, rtol=0)

    tied = hf_checkpoint(tmp_path / "tied", tokenizer_path, tie_word_embeddings=True)
    convert(str(tmp_path / "tied"), str(tmp_path / "tied_hf"), layout="hf")
    assert json.loads((tmp_path / "tied_hf" / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" not in load_file(str(tmp_path / "tied_hf" / "model.safetensors"))
    torch.testing.assert_close(our_logits(tmp_path / "tied_hf", TOKENS), hf_logits(tied, TOKENS), atol=1e-4, rtol=0)


def test_meta_layout_refuses_scaling_params_json_cannot_express(tmp_path, tokenizer_path):
    from dromedary.stages.convert import convert

    hf_checkpoint(tmp_path / "src", tokenizer_path, **CASES["yarn"])
    with pytest.raises(CheckpointError, match="params.json cannot express rope scaling.*yarn"):
        convert(str(tmp_path / "src"), str(tmp_path / "meta"), layout="meta")
    assert not (tmp_path / "meta").exists()  # refused before anything is made


# --------------------------------------------------------------------------------- refused

def _edit_config(ckpt: Path, **changes):
    config = json.loads((ckpt / "config.json").read_text())
    config.update(changes)
    (ckpt / "config.json").write_text(json.dumps(config))


def _add_tensor(ckpt: Path, name: str, t: torch.Tensor):
    state = load_file(str(ckpt / "model.safetensors"))
    state[name] = t
    save_file(state, str(ckpt / "model.safetensors"), metadata={"format": "pt"})


REFUSED = {
    "model_type": (lambda c: _edit_config(c, model_type="qwen2"), r"config.json: model_type 'qwen2' is not supported"),
    "attention_bias": (None, r"config.json: attention_bias = true"),
    "mlp_bias": (None, r"config.json: mlp_bias = true"),
    "hidden_act": (lambda c: _edit_config(c, hidden_act="gelu"), r"config.json: hidden_act 'gelu' is not supported"),
    "quantization_config": (lambda c: _edit_config(c, quantization_config={"quant_method": "gptq", "bits": 4}),
                            r"config.json: quantization_config \(quant_method 'gptq'\)"),
    "rope_type": (lambda c: _edit_config(c, rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                                             "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}),
                  r"config.json: rope_parameters .*rope type 'longrope' is not supported"),
    "rope_key": (lambda c: _edit_config(c, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4,
                                                            "low_freq_factor": 1.0}),
                 r"rope type 'linear' does not take low_freq_factor"),
    "partial_rotary": (lambda c: _edit_config(c, partial_rotary_factor=0.5), r"partial_rotary_factor 0.5"),
    "unused_tensor": (lambda c: _add_tensor(c, "model.layers.0.self_attn.q_proj.bias", torch.zeros(64)),
                      r"tensor\(s\) the model would not use: model.layers.0.self_attn.q_proj.bias"),
}


@pytest.mark.parametrize("what", sorted(REFUSED))
def test_refused_config_is_named_and_a_stage_writes_nothing(tmp_path, tokenizer_path, what):
    from dromedary.stages.generate import generate

    edit, message = REFUSED[what]
    ckpt = tmp_path / "ckpt"
    hf_checkpoint(ckpt, tokenizer_path, **({what: True} if edit is None else {}))
    if edit is not None:
        edit(ckpt)
    with pytest.raises(CheckpointError, match=message):
        checkpoint.open_checkpoint(ckpt)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"id": "a", "prompt": "Hello there"}])
    out = tmp_path / "out" / "completions.jsonl"
    with pytest.raises(CheckpointError, match=message):
        generate(str(prompts), str(out), ckpt_dir=str(ckpt), model_parallel_size=1, dtype="fp32", max_new_tokens=4)
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_unknown_params_json_key_is_refused(tmp_path, tokenizer_path):
    ckpt = meta_llama3(tmp_path / "meta", tokenizer_path, hf_checkpoint(tmp_path / "hf", tokenizer_path))
    params = json.loads((ckpt / "params.json").read_text())
    (ckpt / "params.json").write_text(json.dumps({**params, "use_qk_norm": True}))
    with pytest.raises(CheckpointError, match=r"params.json: key use_qk_norm = true is not understood"):
        checkpoint.open_checkpoint(ckpt)


# --------------------------------------------------------------- Meta Llama-3-style layout

def _meta_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's half-split rotary rows -> Meta's interleaved rows, per head (what Meta's files hold)."""
    rows, cols = w.shape
    return w.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def meta_llama3(out: Path, tokenizer_path: Path, model, *, shards: int = 2, params_extra: dict | None = None) -> Path:
    """`model`'s weights written as Meta writes Llama-3: q/k rows interleaved, column-parallel
    weights and the vocabulary-parallel embedding split by rows, row-parallel ones by columns."""
    out.mkdir(parents=True)
    cfg = model.config
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    names = {"model.embed_tokens.weight": ("tok_embeddings.weight", 0), "model.norm.weight": ("norm.weight", None),
             "lm_head.weight": ("output.weight", 0)}
    layer = {"self_attn.q_proj": ("attention.wq", 0), "self_attn.k_proj": ("attention.wk", 0),
             "self_attn.v_proj": ("attention.wv", 0), "self_attn.o_proj": ("attention.wo", 1),
             "mlp.gate_proj": ("feed_forward.w1", 0), "mlp.down_proj": ("feed_forward.w2", 1),
             "mlp.up_proj": ("feed_forward.w3", 0), "input_layernorm": ("attention_norm", None),
             "post_attention_layernorm": ("ffn_norm", None)}
    parts: list[dict] = [{} for _ in range(shards)]
    for key, t in state.items():
        if key in names:
            name, dim = names[key]
        else:
            i, rest = key.removeprefix("model.layers.").split(".", 1)
            inner, dim = layer[rest.removesuffix(".weight")]
            name = f"layers.{i}.{inner}.weight"
            if inner == "attention.wq":
                t = _meta_rows(t, cfg.num_attention_heads)
            elif inner == "attention.wk":
                t = _meta_rows(t, cfg.num_key_value_heads)
        for n in range(shards):
            parts[n][name] = t.clone() if dim is None else t.chunk(shards, dim)[n].clone()
    for n, part in enumerate(parts):
        torch.save(part, out / f"consolidated.{n:02d}.pth")
    # Llama-3.1's params.json: no max_seq_len, use_scaled_rope.
    params = {"dim": cfg.hidden_size, "n_layers": cfg.num_hidden_layers, "n_heads": cfg.num_attention_heads,
              "n_kv_heads": cfg.num_key_value_heads, "vocab_size": cfg.vocab_size, "multiple_of": cfg.intermediate_size,
              "ffn_dim_multiplier": None, "norm_eps": cfg.rms_norm_eps, "rope_theta": 500000.0,
              "use_scaled_rope": True, **(params_extra or {})}
    (out / "params.json").write_text(json.dumps(params))
    shutil.copyfile(tokenizer_path, out / "tokenizer.model")
    return out


# transformers' equivalent of Meta's use_scaled_rope (Llama-3.1's constants).
LLAMA31 = dict(rms_norm_eps=1e-5, max_position_embeddings=131072,
               rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192, "rope_theta": 500000.0})


@pytest.fixture
def llama3_pair(tmp_path, tokenizer_path):
    model = hf_checkpoint(tmp_path / "hf", tokenizer_path, **LLAMA31)
    return model, meta_llama3(tmp_path / "meta", tokenizer_path, model)


def test_meta_llama3_layout_equals_transformers_at_mp1(llama3_pair):
    model, meta = llama3_pair
    reader = checkpoint.open_checkpoint(meta)
    assert reader.embedding_split == 0 and reader.args.rope_scaling == checkpoint.LLAMA31_ROPE
    assert "states no max_seq_len" in reader.args.window_note
    long = torch.randint(3, VOCAB, (1, 300), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(our_logits(meta, long), hf_logits(model, long), atol=1e-4, rtol=0)
    assert greedy_ours(meta, PROMPT, 12) == greedy_hf(model, PROMPT, 12)


def test_meta_llama3_layout_equals_transformers_under_torchrun_mp2(llama3_pair, tmp_path):
    model, meta = llama3_pair
    script = tmp_path / "mp2.py"
    script.write_text(
        "import sys, torch\n"
        "from dromedary.engine import builder\n"
        "loaded = builder.build(sys.argv[1], model_parallel_size=2, dtype='fp32', device='cpu')\n"
        "with torch.no_grad():\n"
        "    logits = loaded.model(torch.load(sys.argv[2]))\n"
        "if loaded.world.rank == 0:\n"
        "    torch.save(logits, sys.argv[3])\n"
        "from dromedary import distributed\n"
        "distributed.teardown()  # both ranks leave together: a rank exiting alone aborts gloo\n"
    )
    torch.save(TOKENS, tmp_path / "tokens.pt")
    run(torchrun() + ["--nproc_per_node", 2, "--master_port", free_port(), script, meta, tmp_path / "tokens.pt",
                      tmp_path / "logits.pt"])
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), hf_logits(model, TOKENS), atol=1e-4, rtol=0)


def test_meta_scale_factor_keys_are_honoured(tmp_path, tokenizer_path):
    """Llama-4's params.json keys rope_scaling_factor / rope_high_freq_factor (llama-models args)."""
    fields = dict(LLAMA31, rope_parameters={**LLAMA31["rope_parameters"], "factor": 32.0, "high_freq_factor": 2.0})
    model = hf_checkpoint(tmp_path / "hf", tokenizer_path, **fields)
    meta = meta_llama3(tmp_path / "meta", tokenizer_path, model,
                       params_extra={"rope_scaling_factor": 32.0, "rope_high_freq_factor": 2.0})
    long = torch.randint(3, VOCAB, (1, 300), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(our_logits(meta, long), hf_logits(model, long), atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- per-rank reads

def _count_reads(reader, monkeypatch) -> list[tuple[int, str]]:
    reads: list[tuple[int, str]] = []
    original = reader._part

    def counted(n, name):
        reads.append((n, name))
        return original(n, name)

    monkeypatch.setattr(reader, "_part", counted)
    return reads


@pytest.mark.parametrize("shards, k", [(2, 2), (4, 2), (2, 1), (1, 2)])
def test_each_rank_reads_only_the_shards_its_slice_overlaps(llama3_pair, tmp_path, tokenizer_path, monkeypatch,
                                                            shards, k):
    model, _ = llama3_pair
    meta = meta_llama3(tmp_path / f"meta{shards}", tokenizer_path, model, shards=shards)
    full = checkpoint.open_checkpoint(meta)
    expected = {name: full.checked(name).clone() for name in full.names()}
    for rank in range(k):
        reader = checkpoint.open_checkpoint(meta)
        reads = _count_reads(reader, monkeypatch)
        _, stream = checkpoint.local_state(reader, rank, k, dtype=torch.float32, device="cpu")
        got = dict(stream)
        for name, t in got.items():
            assert torch.equal(t, checkpoint.local_slice(name, expected[name], rank, k)), name
        # Shards [rank * S/K, (rank + 1) * S/K) only (one shard, shared, when S < K), for every
        # tensor whose shards are even (the 350-row vocabulary is not, over 4 shards: its slice
        # for rank 1 starts one row inside shard 1).
        lo, hi = rank * shards // k, max(rank * shards // k + 1, (rank + 1) * shards // k)
        even = {n for n, name in reads if name not in ("tok_embeddings.weight", "output.weight") or VOCAB % shards == 0}
        assert even == set(range(lo, hi)), (rank, sorted(even))
        assert len(reads) <= len(got) * max(1, hi - lo) + 2


def test_llama2_column_split_embedding_reads_a_row_slice_of_every_shard(tmp_path, tokenizer_path):
    from helpers_ckpt import GQA, write_checkpoint

    ckpt = write_checkpoint(tmp_path / "l2", GQA, seed=3, tokenizer=tokenizer_path, num_shards=2)
    reader = checkpoint.open_checkpoint(ckpt)
    assert reader.embedding_split == 1
    full = reader.checked("tok_embeddings.weight")
    for rank in range(2):
        part = reader.read_local("tok_embeddings.weight", rank, 2)
        assert torch.equal(part, full.chunk(2, 0)[rank])


def test_hf_reader_reads_slices_that_equal_the_full_tensors(tmp_path, tokenizer_path):
    hf_checkpoint(tmp_path / "hf", tokenizer_path)
    reader = checkpoint.open_checkpoint(tmp_path / "hf")
    for rank in range(2):
        for name in reader.names():
            assert torch.equal(reader.read_local(name, rank, 2),
                               checkpoint.local_slice(name, reader.checked(name), rank, 2)), name


# ----------------------------------------------------------------------------- the window

def test_meta_window_family_defaults_are_named(tmp_path, tokenizer_path):
    from helpers_ckpt import GQA, write_checkpoint

    ckpt = write_checkpoint(tmp_path / "m", GQA, seed=3, tokenizer=tokenizer_path)
    params = json.loads((ckpt / "params.json").read_text())
    for extra, window, words in [
        (dict(vocab_size=32000, norm_eps=1e-5, rope_theta=10000.0), 4096, "LLaMA-2"),
        (dict(vocab_size=32000, norm_eps=1e-6, rope_theta=10000.0), 2048, "LLaMA-1"),
        (dict(vocab_size=128256, rope_theta=500000.0), 8192, "Llama-3"),
        (dict(vocab_size=128256, rope_theta=500000.0, use_scaled_rope=True), 131072, "Llama-3.1"),
        (dict(), 2048, "does not identify the model's family"),
    ]:
        p = {k: v for k, v in params.items() if k != "max_seq_len"}
        p.update(extra)
        w, note = checkpoint._meta_window(p, checkpoint.ModelArgs(
            **{k: v for k, v in p.items() if k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size",
                                                   "multiple_of", "norm_eps", "rope_theta")},
            rope_scaling=checkpoint.LLAMA31_ROPE if p.get("use_scaled_rope") else None), "params.json")
        assert w == window and words in note and "states no max_seq_len" in note, (extra, note)


def test_window_note_reaches_the_self_align_fit_message(tmp_path, tokenizer_path):
    from helpers_ckpt import GQA, write_checkpoint

    from dromedary.stages.self_align import self_align

    ckpt = write_checkpoint(tmp_path / "m", GQA, seed=3, tokenizer=tokenizer_path)
    params = json.loads((ckpt / "params.json").read_text())
    del params["max_seq_len"]
    (ckpt / "params.json").write_text(json.dumps(params))
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "instruction": "Hi", "input": "", "source": "x"}])
    with pytest.raises(ValueError, match=r"context window of 2048 tokens \(.*params.json states no max_seq_len"):
        self_align(str(prompts), str(tmp_path / "out.jsonl"), ckpt_dir=str(ckpt), max_new_tokens=4000)
    assert not (tmp_path / "out.jsonl").exists()


def test_rope_tables_match_transformers_inv_freq():
    """The frequencies themselves, for each type, against transformers' init functions."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for case in ("linear", "llama3", "yarn", "yarn_mscale"):
        config = LlamaConfig(**{**BASE, **CASES[case]})
        theirs, factor = ROPE_INIT_FUNCTIONS[config.rope_parameters["rope_type"]](config, "cpu")
        theta, spec = checkpoint.hf_rope_spec(json.loads(config.to_json_string()), "config.json")
        ours, our_factor = rope.frequencies(16, theta, spec)
        torch.testing.assert_close(ours.float(), theirs.float(), rtol=1e-6, atol=0)
        assert our_factor == pytest.approx(factor)
    config = LlamaConfig(**{**BASE, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}})
    theirs, _ = ROPE_INIT_FUNCTIONS["dynamic"](config, "cpu", seq_len=100)
    _, spec = checkpoint.hf_rope_spec(json.loads(config.to_json_string()), "config.json")
    torch.testing.assert_close(rope.frequencies(16, 1e4, spec, 100)[0].float(), theirs.float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(rope.frequencies(16, 1e4, spec, 50)[0], rope.base_frequencies(16, 1e4))


def test_pipeline_passes_max_seq_len_to_the_generating_stages():
    import inspect

    from dromedary.stages.pipeline import _plan, pipeline

    options = {k: p.default for k, p in inspect.signature(pipeline).parameters.items()}
    stages, key = _plan({**options, "workdir": "w", "ckpt_dir": "/models/llama-2-7b", "max_seq_len": 4096})
    got = {s.name: s.flags.get("max_seq_len") for s in stages}
    assert got == {"generate-prompts": 4096, "self-align": 4096, "curate": None, "finetune": None, "chat": 4096}
    assert key["max_seq_len"] == 4096
    assert "max_seq_len" not in _plan({**options, "workdir": "w", "ckpt_dir": "/m"})[1]


def test_one_token_kernels_step_aside_for_dynamic_ntk(tmp_path, tokenizer_path):
    """lean.py and native.py hold one rotation table; dynamic NTK's changes with the length, so
    the engine decodes through the model's forward (which picks the table per pass)."""
    from dromedary.llama.kernels.lean import LeanDecoder
    from dromedary.llama.kernels.native import NativeDecoder
    from dromedary.llama.model import can_prepack, prepack_weights

    fields = dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    hf_checkpoint(tmp_path / "dyn", tokenizer_path, **fields)
    hf_checkpoint(tmp_path / "plain", tokenizer_path)
    built = {name: builder.build(str(tmp_path / name), model_parallel_size=1, dtype="bf16", device="cpu").model
             for name in ("dyn", "plain")}
    if not can_prepack(built["plain"]):
        pytest.skip("no oneDNN bf16 on this CPU")
    for model in built.values():
        prepack_weights(model)
    assert built["dyn"].rope_varies_with_length and not built["plain"].rope_varies_with_length
    assert LeanDecoder.build(built["dyn"]) is None and NativeDecoder.build(built["dyn"]) is None
    assert LeanDecoder.build(built["plain"]) is not None
    assert Engine(built["dyn"], builder.build(str(tmp_path / "dyn"), model_parallel_size=1, dtype="bf16",
                                              device="cpu").tokenizer)._fast_step is None


def test_meta_llama32_small_models_scale_rope_by_32():
    # Meta's params.json of Llama-3.2-1B and -3B: use_scaled_rope, no factor; their HF
    # config.json has rope_scaling.factor 32 (Llama-3.1-8B and 70B: 8).
    base = {"n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256, "ffn_dim_multiplier": 1.5, "multiple_of": 256,
            "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True}
    for dim, layers, factor in [(2048, 16, 32.0), (3072, 28, 32.0), (4096, 32, 8.0), (8192, 80, 8.0)]:
        spec = checkpoint._meta_rope({**base, "dim": dim, "n_layers": layers}, "params.json")
        assert spec == {**checkpoint.LLAMA31_ROPE, "factor": factor}, (dim, layers)
    stated = checkpoint._meta_rope({**base, "dim": 2048, "n_layers": 16, "rope_scaling_factor": 16}, "params.json")
    assert stated["factor"] == 16.0  # a stated factor wins
