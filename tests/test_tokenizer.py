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


def test_encode_adds_bos_and_eos_on_request(tokenizer):
    ids = tokenizer.encode("hello there", bos=True, eos=True)
    assert ids[0] == tokenizer.bos_id == 1 and ids[-1] == tokenizer.eos_id == 2
    assert tokenizer.encode("hello there", bos=False) == ids[1:-1]
    assert tokenizer.decode(ids) == "hello there"


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
    dec = StreamDecoder(tokenizer)
    shown = ""
    for n, i in enumerate(ids, start=1):
        shown += dec.feed(i)
        assert tokenizer.decode(ids[:n]).startswith(shown)
    shown += dec.flush()
    assert shown == dec.text == tokenizer.decode(ids)
    assert dec._anchor > len(ids) // 2  # the anchor really moved along


def test_decode_ignores_ids_outside_the_vocabulary(tokenizer):
    ids = tokenizer.encode("good", bos=False)
    assert tokenizer.decode(ids + [tokenizer.n_words, tokenizer.n_words + 5, -1]) == "good"


def test_missing_tokenizer_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer(tmp_path / "nope.model")
