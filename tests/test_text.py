"""dalle_fast.text: the BPE tokenizer of the captions (round trips, pads, truncation, dropout, JSON, errors)."""

import json

import pytest
import torch

from dalle_fast.text import TextTokenizer, shapes_captions

TEXT_LEN = 12


@pytest.fixture(scope="module")
def captions() -> list[str]:
    return shapes_captions(1500, seed=1)


@pytest.fixture(scope="module")
def tok(captions) -> TextTokenizer:
    return TextTokenizer.train(captions, vocab_size=400, text_len=TEXT_LEN, text_vocab=512, dropout=0.3)


def test_train_and_round_trip(tok, captions):
    assert 256 < tok.vocab_size <= 400 and tok.text_vocab == 512 and tok.text_len == TEXT_LEN
    held = shapes_captions(50, seed=2, split="test")  # unseen captions, held-out colour-shape pairs
    ids = tok.encode(held)
    assert ids.shape == (50, TEXT_LEN) and ids.dtype == torch.int64
    assert tok.decode(ids) == held
    assert tok.decode(ids[0]) == held[0]
    # merges learned: a caption of the grammar takes far fewer tokens than bytes
    assert max(len(tok.tokenize(c)) for c in captions[:200]) <= TEXT_LEN


def test_lowercase_and_unicode(tok):
    assert tok.decode(tok.encode("A RED Square  in the TOP left")) == "a red square  in the top left"
    assert tok.encode("  A Red Square ").tolist() == tok.encode("a red square").tolist()
    s = "Ü Σ 🍰"  # any text encodes (byte level): no unknown tokens
    assert tok.decode(tok.encode(s)) == "ü σ 🍰"


def test_pads_follow_the_caption(tok):
    ids = tok.encode(["a red square", ""])
    n = len(tok.tokenize("a red square"))
    pos = torch.arange(TEXT_LEN)
    assert ids[0, :n].tolist() == tok.tokenize("a red square")
    assert ids[0, n:].tolist() == (tok.text_vocab + pos[n:]).tolist()
    assert ids[1].tolist() == (tok.text_vocab + pos).tolist() == tok.pad_ids().tolist()
    assert tok.pad_id(3) == tok.text_vocab + 3
    assert tok.decode(ids[1]) == ""
    assert tok.encode([]).shape == (0, TEXT_LEN)


def test_truncation(tok):
    long = "a red square above a blue circle to the left of a green cross " * 3
    full = tok.tokenize(long)
    assert len(full) > TEXT_LEN
    ids = tok.encode(long)
    assert ids.tolist() == full[:TEXT_LEN]  # no pads left
    assert tok.decode(ids) == tok._plain.decode(full[:TEXT_LEN])


def test_bpe_dropout(tok, captions):
    caption = captions[0]
    plain = tok.encode(caption)
    assert all(torch.equal(tok.encode(caption), plain) for _ in range(3))  # deterministic without dropout
    dropped = [tok.encode(caption, train=True) for _ in range(20)]
    assert any(not torch.equal(d, plain) for d in dropped)
    assert all(tok.decode(d) == caption for d in dropped if tok.text_vocab + TEXT_LEN - 1 in d.tolist())
    lengths = [len(tok.tokenize(caption, train=True)) for _ in range(20)]
    assert sum(lengths) / 20 > len(tok.tokenize(caption))  # dropout splits merges: more tokens
    no_drop = TextTokenizer.from_json(tok.to_json().replace('"dropout": 0.3', '"dropout": 0.0'))
    assert no_drop.dropout == 0.0
    assert all(torch.equal(no_drop.encode(caption, train=True), plain) for _ in range(5))


def test_json_round_trip(tok, captions):
    s = tok.to_json()
    assert isinstance(s, str) and json.loads(s)["format"] == "dalle_fast.text/1"
    back = TextTokenizer.from_json(s)
    assert (back.text_len, back.text_vocab, back.dropout, back.vocab_size) == (
        tok.text_len,
        tok.text_vocab,
        tok.dropout,
        tok.vocab_size,
    )
    assert torch.equal(back.encode(captions[:100]), tok.encode(captions[:100]))
    assert TextTokenizer(tok._plain.to_str(), text_len=4).text_vocab == tok.vocab_size  # from the library's JSON


def test_ids_feed_the_model(tok):
    from dalle_fast.nn import DALLE, DALLEConfig

    c = DALLEConfig.tiny(n_layers=1, text_len=TEXT_LEN, text_vocab=tok.text_vocab)
    text = tok.encode(["a red square", "a blue circle below a green cross"], train=True)
    out = DALLE(c, backend="eager")(text, torch.randint(0, c.image_vocab, (2, c.image_len)))
    assert torch.isfinite(out.loss)


def test_errors(tok, captions):
    ids = tok.encode("a red square")
    for bad_value, where in ((tok.vocab_size, 0), (-1, 1), (tok.text_vocab + 5, TEXT_LEN - 1), (600, 2)):
        bad = ids.clone()
        bad[where] = bad_value
        with pytest.raises(ValueError, match=f"got {bad_value} at index \\({where},\\)"):
            tok.decode(bad)
    with pytest.raises(ValueError, match=f"expected the last dimension text_len = {TEXT_LEN}"):
        tok.decode(ids[:-1])
    with pytest.raises(TypeError, match="ids: expected an integer tensor"):
        tok.decode(ids.float())
    with pytest.raises(TypeError, match="captions: expected strings, got int at index 1"):
        tok.encode(["a", 3])
    with pytest.raises(TypeError, match="caption: expected a str"):
        tok.tokenize(None)
    with pytest.raises(ValueError, match="position: expected an int in \\[0, 12\\)"):
        tok.pad_id(TEXT_LEN)
    with pytest.raises(ValueError, match="text_vocab: expected an int >= the tokenizer's vocab_size"):
        TextTokenizer(tok._plain, text_vocab=tok.vocab_size - 1)
    with pytest.raises(ValueError, match="dropout: expected a probability in \\[0, 1\\), got 1.0"):
        TextTokenizer(tok._plain, dropout=1.0)
    with pytest.raises(ValueError, match="text_len: expected an int >= 1"):
        TextTokenizer(tok._plain, text_len=0)
    with pytest.raises(ValueError, match="vocab_size: expected an int >= 256"):
        TextTokenizer.train(captions[:10], vocab_size=100)
    with pytest.raises(TypeError, match="captions: expected strings, got bytes at index 1"):
        TextTokenizer.train(["a", b"b"], vocab_size=300)
    with pytest.raises(ValueError, match="invalid JSON"):
        TextTokenizer.from_json("{")
    with pytest.raises(ValueError, match="format None"):
        TextTokenizer.from_json("{}")
    with pytest.raises(TypeError, match="tokenizer: expected a tokenizers.Tokenizer"):
        TextTokenizer(3)
