import pytest

from dromedary.llama.tokenizer import StreamDecoder, Tokenizer

TEXTS = [
    "  two leading spaces, then words",
    " café au lait costs 3 € in 日本",
    "camel 🐪 and Ω and ß are byte-fallback pieces",
    "ends in an emoji 🐪",
    "line one\nline two",
]


def stream(tokenizer, ids):
    dec = StreamDecoder(tokenizer)
    deltas = [dec.feed(i) for i in ids]
    deltas.append(dec.flush())
    return deltas, dec


def stream_checking_prefixes(tokenizer, ids):
    """Stream `ids`, checking after every token that what was shown is a prefix of the decode of
    the ids so far; returns everything shown (flush included) and the decoder."""
    dec = StreamDecoder(tokenizer)
    shown = ""
    for n, i in enumerate(ids, start=1):
        shown += dec.feed(i)
        assert tokenizer.decode(ids[:n]).startswith(shown)
    return shown + dec.flush(), dec


def test_encode_adds_bos_and_eos_on_request(tokenizer):
    ids = tokenizer.encode("hello there", bos=True, eos=True)
    assert ids[0] == tokenizer.bos_id == 1 and ids[-1] == tokenizer.eos_id == 2
    assert tokenizer.encode("hello there", bos=False) == ids[1:-1]
    assert tokenizer.decode(ids) == "hello there"


def test_encode_tail_keeps_bos_and_the_last_tokens(tokenizer):
    # Prompts cut this way (finetune's sources, reward prompts, rl's prompts) keep their end.
    text = "the principle list comes first and the request comes last, at the very end"
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.bos_id and len(ids) > 8
    assert tokenizer.encode_tail(text, len(ids)) == ids
    assert tokenizer.encode_tail(text, 8) == [tokenizer.bos_id] + ids[-7:]
    assert tokenizer.encode_tail(text, 1) == [tokenizer.bos_id]


def test_fixture_text_really_uses_byte_fallback(tokenizer):
    # Guards the stream tests below: they are only meaningful if some characters are split into
    # several byte pieces that form a character only together.
    pieces = [tokenizer.sp.id_to_piece(i) for i in tokenizer.encode(TEXTS[2], bos=False)]
    assert sum(p.startswith("<0x") for p in pieces) >= 4


@pytest.mark.parametrize("text", TEXTS)
def test_stream_deltas_concatenate_to_decode_of_all_ids(tokenizer, text):
    ids = tokenizer.encode(text, bos=False)
    deltas, dec = stream(tokenizer, ids)
    assert "".join(deltas) == tokenizer.decode(ids) == dec.text
    # Half a character is never shown: a delta holds only complete characters.
    assert not any("\ufffd" in d for d in deltas)


def test_stream_holds_back_partial_utf8_until_the_character_completes(tokenizer):
    ids = tokenizer.encode("🐪", bos=False)
    pieces = [tokenizer.sp.id_to_piece(i) for i in ids]
    byte_pieces = [i for i, p in zip(ids, pieces) if p.startswith("<0x")]
    assert len(byte_pieces) == 4  # U+1F42A is four UTF-8 bytes
    dec = StreamDecoder(tokenizer)
    deltas = [dec.feed(i) for i in ids]
    assert deltas[-1].endswith("🐪") and all(d == "" for d in deltas[-4:-1])


def test_stream_of_generated_ids_after_a_prompt_keeps_inner_spaces(tokenizer):
    # Generation decodes only the new ids; a word piece with a leading "▁" in the middle of the
    # stream must keep its space.
    ids = tokenizer.encode("hello there friend, good morning", bos=False)
    for start in range(len(ids)):
        tail = ids[start:]
        deltas, _ = stream(tokenizer, tail)
        assert "".join(deltas) == tokenizer.decode(tail)


@pytest.mark.parametrize("seed", range(5))
def test_stream_of_random_ids_concatenates_to_decode(tokenizer, seed):
    # What a random or badly trained model emits: stray continuation bytes, truncated characters.
    import random

    rng = random.Random(seed)
    ids = [rng.randrange(3, tokenizer.n_words) for _ in range(60)]
    deltas, dec = stream(tokenizer, ids)
    assert "".join(deltas) == tokenizer.decode(ids) == dec.text


@pytest.mark.parametrize("every", [1, 2, 5])
@pytest.mark.parametrize("seed", range(4))
def test_anchored_stream_of_long_text_equals_decode(tokenizer, monkeypatch, every, seed):
    # Long generations re-decode only the ids since an anchor; with anchors moving every token or
    # few, through multi-byte characters, spaces and stray bytes, the text must still be decode().
    import random

    monkeypatch.setattr(StreamDecoder, "ANCHOR_EVERY", every)
    rng = random.Random(seed)
    ids = []
    for _ in range(40):
        if rng.random() < 0.5:
            ids += tokenizer.encode(rng.choice(TEXTS), bos=False)
        else:
            ids += [rng.randrange(3, tokenizer.n_words) for _ in range(rng.randint(1, 6))]
    shown, dec = stream_checking_prefixes(tokenizer, ids)
    assert shown == dec.text == tokenizer.decode(ids)
    assert dec._anchor > len(ids) // 2  # the anchor really moved along


def test_decode_ignores_ids_outside_the_vocabulary(tokenizer):
    ids = tokenizer.encode("good", bos=False)
    assert tokenizer.decode(ids + [tokenizer.n_words, tokenizer.n_words + 5, -1]) == "good"


def test_missing_tokenizer_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer(tmp_path / "nope.model")


# =============================================================================================
# Every backend: SentencePiece (Mistral's real model), tiktoken in Meta's layout, HF tokenizer.json
# =============================================================================================

import base64  # noqa: E402
import copy  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

from conftest import tokenizer_corpus  # noqa: E402

from dromedary.llama import tokenizer as tokmod  # noqa: E402
from dromedary.llama.tokenizer import (  # noqa: E402
    HFTokenizer, SentencePieceTokenizer, TiktokenTokenizer, TokenizerError, load_tokenizer,
)

MULTIBYTE = [
    "日本語のテキストと中文字符",
    "emoji 🐪🐫 and flags 🇫🇷, a family 👩‍👩‍👧",
    " crème brûlée, naïve façade, Ærøskøbing, Straße",
    "mixed: café 3 € 日本 🐪\nnew line\n\n  indented",
]
# Typed by a user: must stay text in every backend.
SPECIAL_TEXT = "<|eot_id|> </s> <s> <|im_start|>user <|im_end|> <|begin_of_text|> <|end_of_text|> <unk>"
LLAMA3_NAMED = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                "<|eom_id|>", "<|eot_id|>"]


def corpus() -> list[str]:
    return tokenizer_corpus(600) + MULTIBYTE * 3 + TEXTS * 3


def mistral_model() -> Path:
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or spec.origin is None:
        pytest.skip("mistral-common is not installed")
    return Path(spec.origin).parent / "data" / "tokenizer.model.v1"


# --- tiktoken: a small BPE in Meta's file layout ---------------------------------------------


def learn_ranks(texts: list[str], merges: int) -> dict[bytes, int]:
    """Byte-level BPE ranks: the 256 bytes, then `merges` merges of the most frequent adjacent
    pair within Meta's pre-tokenized pieces."""
    import regex

    pattern = regex.compile(tokmod.LLAMA3_PATTERN)
    words = Counter(tuple(bytes([b]) for b in w.encode()) for t in texts for w in pattern.findall(t))
    ranks = {bytes([b]): b for b in range(256)}
    for _ in range(merges):
        pairs: Counter = Counter()
        for w, c in words.items():
            for a, b in zip(w, w[1:]):
                pairs[a, b] += c
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        ranks.setdefault(a + b, len(ranks))
        merged: Counter = Counter()
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] += c
        words = merged
    return ranks


def reference_bpe(ranks: dict[bytes, int], text: str) -> list[int]:
    """tiktoken's algorithm written out: per pre-tokenized piece, merge the adjacent pair whose
    join has the lowest rank (leftmost on ties) until none is in the vocabulary."""
    import regex

    ids = []
    for piece in regex.findall(tokmod.LLAMA3_PATTERN, text):
        parts = [bytes([b]) for b in piece.encode()]
        while len(parts) > 1:
            best = min(range(len(parts) - 1), key=lambda i: ranks.get(parts[i] + parts[i + 1], math.inf))
            if parts[best] + parts[best + 1] not in ranks:
                break
            parts[best : best + 2] = [parts[best] + parts[best + 1]]
        ids += [ranks[p] for p in parts]
    return ids


def write_tiktoken(path: Path, ranks: dict[bytes, int]) -> Path:
    lines = (f"{base64.b64encode(t).decode()} {r}\n" for t, r in sorted(ranks.items(), key=lambda kv: kv[1]))
    path.write_text("".join(lines))
    return path


@pytest.fixture(scope="module")
def tiktoken_ranks():
    return learn_ranks(corpus(), 300)


@pytest.fixture(scope="module")
def tiktoken_path(tmp_path_factory, tiktoken_ranks):
    return write_tiktoken(tmp_path_factory.mktemp("llama3_meta") / "tokenizer.model", tiktoken_ranks)


# --- HF tokenizer.json: byte-level BPE trained here --------------------------------------------


def train_byte_level(special: list[str], llama3_split: bool):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    if llama3_split:  # Llama-3's tokenizer.json: Meta's pattern, then bytes to characters
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(tokmod.LLAMA3_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:  # GPT-2's pattern inside ByteLevel, as SmolLM2's
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(corpus(), trainer)
    return tk


def write_hf(folder: Path, tk, config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def llama3_like(folder: Path, **config) -> Path:
    """Llama-3's tokenizer.json shape: special tokens after the base vocabulary, a template that
    puts <|begin_of_text|> first, plus one ordinary (non-special) added token."""
    from tokenizers import AddedToken, processors

    tk = train_byte_level([], llama3_split=True)
    tk.add_special_tokens([AddedToken(name, special=True) for name in LLAMA3_NAMED])
    tk.add_tokens([AddedToken("<tool>", special=False)])
    bos = tk.token_to_id("<|begin_of_text|>")
    tk.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                      special_tokens=[("<|begin_of_text|>", bos)])])
    return write_hf(folder, tk, {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
                                 "clean_up_tokenization_spaces": True,
                                 "tokenizer_class": "PreTrainedTokenizerFast", **config})


def smollm2_like(folder: Path) -> Path:
    """SmolLM2's shape: ChatML specials at ids 0-2, byte-level post-processor, no BOS added."""
    from tokenizers import processors

    tk = train_byte_level(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], llama3_split=False)
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    return write_hf(folder, tk, {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>",
                                 "pad_token": "<|im_end|>", "tokenizer_class": "PreTrainedTokenizerFast"})


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {"llama3": llama3_like(root / "llama3"), "smollm2": smollm2_like(root / "smollm2"),
            "llama3_no_bos": llama3_like(root / "llama3_no_bos", add_bos_token=False)}


BACKENDS = ["sp_mistral", "sp_tiny", "tiktoken", "hf_llama3", "hf_smollm2"]


@pytest.fixture(scope="module", params=BACKENDS)
def tok(request, tokenizer_path, tiktoken_path, hf_dirs):
    kind = request.param
    if kind == "sp_mistral":
        return load_tokenizer(mistral_model())
    if kind == "sp_tiny":
        return load_tokenizer(tokenizer_path)
    if kind == "tiktoken":
        return load_tokenizer(tiktoken_path)
    return load_tokenizer(hf_dirs[kind[3:]])


def test_backend_is_read_from_the_content(tokenizer_path, tiktoken_path, hf_dirs, tmp_path):
    assert type(load_tokenizer(mistral_model())) is SentencePieceTokenizer
    assert type(load_tokenizer(tiktoken_path)) is TiktokenTokenizer
    assert type(load_tokenizer(hf_dirs["llama3"])) is HFTokenizer
    # The name does not decide: a tiktoken file called tokenizer.json, a tokenizer.json called
    # tokenizer.model, and the Tokenizer(path) spelling callers use.
    (tmp_path / "tokenizer.json").write_bytes(tiktoken_path.read_bytes())
    assert type(load_tokenizer(tmp_path / "tokenizer.json")) is TiktokenTokenizer
    (tmp_path / "tokenizer.model").write_bytes((hf_dirs["smollm2"] / "tokenizer.json").read_bytes())
    assert type(tokmod.Tokenizer(tmp_path / "tokenizer.model")) is HFTokenizer
    assert type(tokmod.Tokenizer(tokenizer_path)) is SentencePieceTokenizer


def test_a_directory_prefers_tokenizer_json(tmp_path, hf_dirs, tiktoken_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(tiktoken_path.read_bytes())
    assert type(load_tokenizer(folder)) is TiktokenTokenizer
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((hf_dirs["llama3"] / name).read_bytes())
    assert type(load_tokenizer(folder)) is HFTokenizer


@pytest.mark.parametrize("content, found", [
    (b"\x00\x01garbage bytes", r"starts with b'\\x00\\x01garbage"),
    (b"GGUF\x03\x00\x00\x00", "a GGUF file"),
    (b'{"version": "1.0"}', "not a tokenizers tokenizer.json"),
    (b"IQ== 0\nIg== 7\n", "ranks are not 0..1"),
    (b"\x0a\x05nope!", "not a SentencePiece model"),
])
def test_a_file_that_is_no_tokenizer_is_refused_naming_what_was_found(tmp_path, content, found):
    path = tmp_path / "weird.model"
    path.write_bytes(content)
    with pytest.raises(TokenizerError, match=found) as err:
        load_tokenizer(path)
    assert str(path) in str(err.value)


def test_a_directory_without_a_tokenizer_names_what_it_has(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model") as err:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(err.value) and "config.json" in str(err.value)


def normalizes(request) -> bool:
    # The tiny SentencePiece fixture keeps SentencePiece's default normalizer, which collapses
    # runs of spaces; every real tokenizer here reproduces its text exactly.
    return request.node.callspec.params["tok"] == "sp_tiny"


@pytest.mark.parametrize("text", MULTIBYTE + TEXTS)
def test_round_trip_of_multibyte_text(tok, text, request):
    ids = tok.encode(text, bos=False)
    if normalizes(request):
        text = tok.decode(ids)  # its normalized form must then be a fixed point
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text)) == text  # BOS decodes to nothing


def test_fixture_text_splits_characters_over_several_tokens(tok):
    # Guards the stream tests: some token of the emoji text must be half a character on its own.
    ids = tok.encode(MULTIBYTE[1], bos=False)
    assert sum("\ufffd" in tok.decode([i]) for i in ids) >= 2


@pytest.mark.parametrize("text", MULTIBYTE + TEXTS)
def test_streamed_deltas_concatenate_to_decode(tok, text, request):
    ids = tok.encode(text, bos=False)
    deltas, dec = stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids) == dec.text
    assert normalizes(request) or dec.text == text
    assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("seed", range(3))
def test_anchored_stream_of_long_mixed_ids_equals_decode(tok, monkeypatch, seed):
    monkeypatch.setattr(StreamDecoder, "ANCHOR_EVERY", 2)
    rng = random.Random(seed)
    ids: list[int] = []
    for _ in range(30):
        if rng.random() < 0.6:
            ids += tok.encode(rng.choice(MULTIBYTE + TEXTS), bos=False)
        else:  # stray tokens, special ones included
            ids += [rng.randrange(tok.n_words) for _ in range(rng.randint(1, 4))]
    shown, dec = stream_checking_prefixes(tok, ids)
    assert shown == tok.decode(ids)
    assert dec._anchor > len(ids) // 2


@pytest.mark.parametrize("text", ["The camel walks across the desert sand", "Hello there friend, 日本 🐪 café"])
def test_a_completion_keeps_its_leading_space(tok, text):
    # Split a text anywhere: streamed after the prompt's last token, the rest is exactly the text
    # the rest adds (SentencePiece alone would drop the space of " walks").
    ids = tok.encode(text, bos=False)
    for k in range(1, len(ids)):
        head = tok.decode(ids[:k])
        if "\ufffd" in head:
            continue  # the prompt ends inside a character
        dec = StreamDecoder(tok, context=ids[k - 1 : k])
        shown = "".join(dec.feed(i) for i in ids[k:]) + dec.flush()
        assert head + shown == text, k
        assert tok.decode_after(ids[k - 1 : k], ids[k:]) == shown


def test_special_token_text_stays_text(tok):
    ids = tok.encode(SPECIAL_TEXT, bos=False)
    assert tok.decode(ids) == SPECIAL_TEXT
    assert not any(tok.is_special(i) for i in ids)
    assert not set(ids) & (tok.stop_ids | {tok.bos_id})
    assert len(ids) > 12  # spelled out in pieces


EXPECTED_RULES = {  # backend: (add_bos, BOS name, stop names)
    "sp_mistral": (True, "<s>", {"</s>"}),
    "sp_tiny": (True, "<s>", {"</s>"}),
    "tiktoken": (True, "<|begin_of_text|>", {"<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"}),
    "hf_llama3": (True, "<|begin_of_text|>", {"<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"}),
    "hf_smollm2": (False, "<|im_start|>", {"<|im_end|>", "<|endoftext|>"}),
}


def token_name(tok, i: int) -> str:
    if isinstance(tok, SentencePieceTokenizer):
        return tok.sp.id_to_piece(i)
    if isinstance(tok, TiktokenTokenizer):
        return {v: k for k, v in tok.special_tokens.items()}[i]
    return tok._tk.id_to_token(i)


def test_bos_and_stop_ids_follow_the_tokenizers_own_configuration(tok, request):
    add_bos, bos, stops = EXPECTED_RULES[request.node.callspec.params["tok"]]
    assert tok.add_bos is add_bos and token_name(tok, tok.bos_id) == bos
    assert {token_name(tok, i) for i in tok.stop_ids} == stops and tok.eos_id in tok.stop_ids
    plain = tok.encode("hello", bos=False)
    assert tok.encode("hello") == ([tok.bos_id] if add_bos else []) + plain
    assert tok.encode("hello", bos=True) == [tok.bos_id] + plain
    assert tok.encode("hello", bos=False, eos=True) == plain + [tok.eos_id]


def test_sentencepiece_backend_is_mistrals_real_model():
    tok = load_tokenizer(mistral_model())
    assert (tok.n_words, tok.bos_id, tok.eos_id) == (32000, 1, 2)
    assert tok.encode("hello") == [1] + tok.sp.encode("hello")


# --- tiktoken specifics ----------------------------------------------------------------------


def test_tiktoken_ids_equal_a_plain_bpe_over_metas_pattern(tiktoken_path, tiktoken_ranks):
    tok = load_tokenizer(tiktoken_path)
    for text in MULTIBYTE + TEXTS + [SPECIAL_TEXT, "I'm sure they'll say 12345 isn't 'ok'!\r\n\n   x"]:
        assert tok.encode(text, bos=False) == reference_bpe(tiktoken_ranks, text), text
    # The merges are real: common words are single tokens.
    assert len(tok.encode(" the camel", bos=False)) < len(" the camel".encode())


def test_tiktoken_layout_of_the_real_file_size(tmp_path, tiktoken_ranks):
    # Meta's real file has 128000 ranks; its special tokens take the 256 ids after them.
    ranks = dict(tiktoken_ranks)
    while len(ranks) < 128000:
        ranks[b"\xff<filler %d>" % len(ranks)] = len(ranks)
    tok = load_tokenizer(write_tiktoken(tmp_path / "tokenizer.model", ranks))
    assert tok.n_words == 128256
    ids = {name: tok.special_tokens[name] for name in
           ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
            "<|eot_id|>", "<|python_tag|>", "<|reserved_special_token_2|>", "<|reserved_special_token_245|>")}
    assert ids == {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|start_header_id|>": 128006,
                   "<|end_header_id|>": 128007, "<|eom_id|>": 128008, "<|eot_id|>": 128009,
                   "<|python_tag|>": 128010, "<|reserved_special_token_2|>": 128012,
                   "<|reserved_special_token_245|>": 128255}
    assert tok.stop_ids == {128001, 128008, 128009} and tok.bos_id == 128000
    assert tok.decode([128000] + tok.encode("hi 🐪", bos=False) + [128009]) == "hi 🐪"


def test_tiktoken_cuts_long_runs_as_meta_does(tiktoken_path, tiktoken_ranks, monkeypatch):
    monkeypatch.setattr(tokmod, "_TIKTOKEN_MAX_RUN", 5)
    monkeypatch.setattr(tokmod, "_TIKTOKEN_WINDOW", 16)
    text = "aaaaaaaaaaaa          bbb camel walks"
    chunks = list(tokmod._tiktoken_chunks(text))
    # Windows of 16 characters; inside each, a run longer than 5 is cut.
    assert "".join(chunks) == text and chunks[:5] == ["aaaaa", "aaaaa", "aa    ", "     ", " bbb camel "]
    tok = load_tokenizer(tiktoken_path)
    assert tok.encode(text, bos=False) == [i for c in chunks for i in reference_bpe(tiktoken_ranks, c)]


# --- HF specifics: transformers is the reference ---------------------------------------------


def transformers_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


@pytest.mark.parametrize("name", ["llama3", "smollm2", "llama3_no_bos"])
def test_hf_ids_equal_transformers(hf_dirs, name):
    ours, ref = load_tokenizer(hf_dirs[name]), transformers_tokenizer(hf_dirs[name])
    for text in MULTIBYTE + TEXTS + [SPECIAL_TEXT, "use <tool> here"]:
        # split_special_tokens: transformers' own switch for "special-token text is text".
        expected = ref(text, split_special_tokens=True)["input_ids"]
        assert ours.encode(text) == expected, text
        assert ours.decode(expected) == ref.decode(expected, skip_special_tokens=True)
    assert ours.add_bos is (name != "smollm2")  # transformers 5 keeps the template's BOS
    assert ours.n_words == len(ref)


def test_hf_add_bos_token_true_adds_bos_where_no_template_does(tmp_path, hf_dirs):
    # A LLaMA-2-style config over a tokenizer.json without a BOS template: LlamaTokenizer and
    # llama.cpp add BOS (transformers 5's generic backend would not).
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((hf_dirs["smollm2"] / name).read_bytes())
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True}))
    tok = load_tokenizer(tmp_path)
    assert tok.add_bos and tok.encode("hi") == [tok.bos_id] + tok.encode("hi", bos=False)
    assert tok._tk.id_to_token(tok.bos_id) == "<|im_start|>"


def test_hf_added_tokens_past_the_base_vocabulary(hf_dirs):
    tok = load_tokenizer(hf_dirs["llama3"])
    base = tok._tk.get_vocab_size(with_added_tokens=False)
    tool = tok._tk.token_to_id("<tool>")
    assert tool == tok.n_words - 1 >= base and not tok.is_special(tool)
    assert tok.decode(tok.encode("a <tool> b", bos=False)) == "a <tool> b"
    assert tool in tok.encode("a <tool> b")  # an ordinary added token is vocabulary, not control


def test_from_tokenizer_wraps_a_built_tokenizer(hf_dirs):
    import tokenizers

    tk = tokenizers.Tokenizer.from_file(str(hf_dirs["smollm2"] / "tokenizer.json"))
    tok = HFTokenizer.from_tokenizer(tk, bos_id=1, eos_id=2, stop_ids=[0], add_bos=True, path="model.gguf")
    assert tok.encode("hi") == [1] + load_tokenizer(hf_dirs["smollm2"]).encode("hi")
    assert tok.stop_ids == {0, 2} and str(tok.path) == "model.gguf"
    assert tok.encode("<|im_end|>", bos=False) != [2]
    with pytest.raises(TokenizerError, match="no BOS"):
        HFTokenizer.from_tokenizer(tk, bos_id=None, eos_id=2, add_bos=True, path="x.gguf")


def test_hf_without_a_config_finds_eos_by_name_and_bos_from_the_template(hf_dirs, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((hf_dirs["llama3"] / "tokenizer.json").read_bytes())
    tok = load_tokenizer(tmp_path)
    assert tok._tk.id_to_token(tok.eos_id) == "<|end_of_text|>" and tok.add_bos
    assert tok._tk.id_to_token(tok.bos_id) == "<|begin_of_text|>"


# --- the engine: every stop id ends a row; added tokens are sampled -----------------------------


def test_generation_ends_on_any_stop_id_and_min_new_tokens_holds_all_off(gqa_loaded):
    from dromedary.engine.generation import Engine, SamplingParams

    tok = copy.copy(gqa_loaded.tokenizer)
    other = tok.encode("camel", bos=False)[0]
    tok.stop_ids = {tok.eos_id, other}
    engine = Engine(gqa_loaded.model, tok)
    g = engine.generate(["Water"], SamplingParams(max_new_tokens=6, logit_bias={other: 100.0}))[0]
    assert (g.tokens, g.finish_reason) == ([], "eos")
    g = engine.generate(["Water"], SamplingParams(max_new_tokens=6, min_new_tokens=3,
                                                  logit_bias={other: 100.0, tok.eos_id: 100.0}))[0]
    assert len(g.tokens) == 3 and not set(g.tokens) & tok.stop_ids and g.finish_reason == "eos"


def test_builder_reads_a_checkpoints_tokenizer_json_and_samples_added_tokens(tmp_path, hf_dirs, world):
    from dataclasses import replace

    from helpers_ckpt import GQA, write_checkpoint

    from dromedary.engine import builder
    from dromedary.engine.generation import Engine, SamplingParams

    hf = load_tokenizer(hf_dirs["llama3"])
    ckpt = write_checkpoint(tmp_path / "ckpt", replace(GQA, vocab_size=hf.n_words), seed=4, tokenizer=None, layout="hf")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (ckpt / name).write_bytes((hf_dirs["llama3"] / name).read_bytes())
    loaded = builder.build(str(ckpt), model_parallel_size=1, dtype="fp32", device="cpu")
    tok = loaded.tokenizer
    assert type(tok) is HFTokenizer and tok.stop_ids >= hf.stop_ids
    engine = Engine(loaded.model, tok)
    assert engine.n_words == hf.n_words
    tool = tok._tk.token_to_id("<tool>")
    g = engine.generate(["The camel"], SamplingParams(max_new_tokens=3, logit_bias={tool: 1000.0}))[0]
    assert g.tokens == [tool] * 3 and g.text == "<tool><tool><tool>"
    eot = tok._tk.token_to_id("<|eot_id|>")
    g = engine.generate(["The camel"], SamplingParams(max_new_tokens=3, logit_bias={eot: 1000.0}))[0]
    assert (g.tokens, g.finish_reason) == ([], "eos")
