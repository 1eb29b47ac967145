"""Captions to text tokens for the DALL-E transformer (paper section 2.2, App. B.2; issue 6).

A byte-level BPE (the `tokenizers` library) over lowercased, NFKC-normalised captions: every string encodes
without unknown tokens. BPE dropout (paper: 10%) is applied only when asked for (`train=True`).

Ids. BPE tokens are [0, vocab_size); the model's text vocabulary `text_vocab` (>= vocab_size, e.g. 16384 while a
small corpus trains fewer merges) is what the pads are placed after: the pad at text position j is token id
text_vocab + j (one learned pad per position, as the model expects). encode() truncates a caption to text_len
tokens and fills the remaining positions with their pads.

    tok = TextTokenizer.train(captions, vocab_size=16384, text_len=256)
    ids = tok.encode(["a red square in the top left"], train=True)   # int64 [1, 256], BPE dropout on
    tok.decode(ids)                                                  # ["a red square in the top left"]
    tok2 = TextTokenizer.from_json(tok.to_json())                    # self-contained (checkpoints)

BPE dropout draws from the tokenizers library's own random generator, which cannot be seeded: encodings
with train=True are not reproducible run to run (the ones without dropout are).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence

import torch

FORMAT = "dalle_fast.text/1"
_BYTES = 256  # the byte-level alphabet every BPE vocabulary starts with


def _tokenizers():
    try:
        import tokenizers
    except ImportError as e:  # pragma: no cover - install.sh installs it
        raise ImportError("dalle_fast.text needs the `tokenizers` package: pip install tokenizers") from e
    return tokenizers


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_dropout(dropout) -> float:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
    return float(dropout)


def _new_tokenizer():
    tk = _tokenizers()
    t = tk.Tokenizer(tk.models.BPE())
    t.normalizer = tk.normalizers.Sequence([tk.normalizers.NFKC(), tk.normalizers.Lowercase(), tk.normalizers.Strip()])
    t.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = tk.decoders.ByteLevel()
    return t


def shapes_captions(n: int, *, seed: int = 0, split: str = "all") -> list[str]:
    """n captions of the synthetic shapes grammar (dalle_fast.data), without rendering the images."""
    from . import data

    rng = random.Random(f"dalle_fast.text/{seed}/{split}")
    return [data.random_scene(rng, split).caption for _ in range(n)]


class TextTokenizer:
    """Byte-level BPE over lowercased captions, with truncation and per-position pads (module doc).

    TextTokenizer(tokenizer, *, text_len=256, text_vocab=None, dropout=0.1): `tokenizer` a tokenizers.Tokenizer
    (as built by train(); its BPE model's own dropout is ignored) or its JSON string; text_vocab defaults to
    the tokenizer's vocab_size; dropout is the BPE dropout of encode(..., train=True).
    """

    def __init__(self, tokenizer, *, text_len: int = 256, text_vocab: int | None = None, dropout: float = 0.1):
        tk = _tokenizers()
        if isinstance(tokenizer, str):
            tokenizer = tk.Tokenizer.from_str(tokenizer)
        if not isinstance(tokenizer, tk.Tokenizer):
            raise TypeError(f"tokenizer: expected a tokenizers.Tokenizer or its JSON, got {type(tokenizer).__name__}")
        if not isinstance(tokenizer.model, tk.models.BPE):
            raise TypeError(f"tokenizer: expected a BPE model, got {type(tokenizer.model).__name__}")
        if not _is_int(text_len) or text_len < 1:
            raise ValueError(f"text_len: expected an int >= 1, got {text_len!r}")
        vocab_size = tokenizer.get_vocab_size()
        text_vocab = vocab_size if text_vocab is None else text_vocab
        if not _is_int(text_vocab) or text_vocab < vocab_size:
            raise ValueError(
                f"text_vocab: expected an int >= the tokenizer's vocab_size {vocab_size} (the pads follow it), "
                f"got {text_vocab!r}"
            )
        self.text_len, self.text_vocab, self.dropout = text_len, text_vocab, _check_dropout(dropout)
        # Two copies of one vocabulary: without and with BPE dropout (the library keeps dropout in the model).
        js = tokenizer.to_str()
        self._plain = tk.Tokenizer.from_str(js)
        self._plain.model.dropout = None
        self._dropped = tk.Tokenizer.from_str(js)
        self._dropped.model.dropout = self.dropout if self.dropout > 0 else None

    # -- construction
    @classmethod
    def train(
        cls,
        captions: Iterable[str],
        *,
        vocab_size: int = 16384,
        text_len: int = 256,
        text_vocab: int | None = None,
        dropout: float = 0.1,
        min_frequency: int = 2,
    ) -> TextTokenizer:
        """Learn the BPE merges from an iterable of captions (lowercased like encode's input). vocab_size is an
        upper bound (>= 256, the byte alphabet): a small corpus stops with fewer merges. text_vocab defaults to
        vocab_size, so the pads' ids do not depend on how many merges the corpus allowed."""
        tk = _tokenizers()
        if not _is_int(vocab_size) or vocab_size < _BYTES:
            raise ValueError(f"vocab_size: expected an int >= {_BYTES} (the byte alphabet), got {vocab_size!r}")
        if not _is_int(min_frequency) or min_frequency < 1:
            raise ValueError(f"min_frequency: expected an int >= 1, got {min_frequency!r}")

        def checked():
            for i, c in enumerate(captions):
                if not isinstance(c, str):
                    raise TypeError(f"captions: expected strings, got {type(c).__name__} at index {i}")
                yield c

        t = _new_tokenizer()
        trainer = tk.trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[],
            show_progress=False,
        )
        t.train_from_iterator(checked(), trainer)
        return cls(t, text_len=text_len, text_vocab=vocab_size if text_vocab is None else text_vocab, dropout=dropout)

    def to_json(self) -> str:
        """Everything needed to rebuild this tokenizer, as one JSON string (for self-contained checkpoints)."""
        return json.dumps(
            {
                "format": FORMAT,
                "text_len": self.text_len,
                "text_vocab": self.text_vocab,
                "dropout": self.dropout,
                "tokenizer": self._plain.to_str(),
            }
        )

    @classmethod
    def from_json(cls, s: str) -> TextTokenizer:
        """The inverse of to_json."""
        if not isinstance(s, str):
            raise TypeError(f"s: expected the JSON string of TextTokenizer.to_json(), got {type(s).__name__}")
        try:
            d = json.loads(s)
        except json.JSONDecodeError as e:
            raise ValueError(f"s: expected the JSON of TextTokenizer.to_json(), got invalid JSON ({e})") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            got = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"s: expected a {FORMAT!r} document from TextTokenizer.to_json(), got format {got!r}")
        return cls(d["tokenizer"], text_len=d["text_len"], text_vocab=d["text_vocab"], dropout=d["dropout"])

    # -- ids
    @property
    def vocab_size(self) -> int:
        """Number of BPE tokens, ids [0, vocab_size)."""
        return self._plain.get_vocab_size()

    def pad_id(self, position: int) -> int:
        """The id of the pad at text position `position`: text_vocab + position."""
        if not _is_int(position) or not 0 <= position < self.text_len:
            raise ValueError(f"position: expected an int in [0, {self.text_len}), got {position!r}")
        return self.text_vocab + position

    def pad_ids(self, device=None) -> torch.Tensor:
        """int64 [text_len]: the pad of every position."""
        return torch.arange(self.text_vocab, self.text_vocab + self.text_len, device=device)

    # -- encoding
    def tokenize(self, caption: str, *, train: bool = False) -> list[int]:
        """The BPE ids of one caption, untruncated (train: with BPE dropout)."""
        if not isinstance(caption, str):
            raise TypeError(f"caption: expected a str, got {type(caption).__name__}")
        return (self._dropped if train else self._plain).encode(caption).ids

    def encode(self, captions: str | Sequence[str], *, train: bool = False) -> torch.Tensor:
        """int64 [B, text_len] for a list of B captions ([text_len] for one str): each caption's BPE ids,
        truncated to text_len, then the pads of the remaining positions. train: with BPE dropout."""
        single = isinstance(captions, str)
        batch = [captions] if single else captions
        if not isinstance(batch, Sequence):
            raise TypeError(f"captions: expected a str or a sequence of str, got {type(captions).__name__}")
        for i, c in enumerate(batch):
            if not isinstance(c, str):
                raise TypeError(f"captions: expected strings, got {type(c).__name__} at index {i}")
        out = self.pad_ids().repeat(len(batch), 1)
        encs = (self._dropped if train else self._plain).encode_batch(list(batch)) if batch else []
        for i, e in enumerate(encs):
            ids = e.ids[: self.text_len]
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
        return out[0] if single else out

    # -- decoding
    def check_ids(self, ids: torch.Tensor, name: str = "ids") -> None:
        """Raise a ValueError naming the first id that is neither a BPE token nor its position's pad.
        ids: int [..., text_len]."""
        if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dtype.is_complex:
            raise TypeError(f"{name}: expected an integer tensor [..., {self.text_len}], got {_describe(ids)}")
        if ids.dim() < 1 or ids.shape[-1] != self.text_len:
            raise ValueError(f"{name}: expected the last dimension text_len = {self.text_len}, got {tuple(ids.shape)}")
        pads = self.pad_ids(ids.device)
        bad = ((ids < 0) | (ids >= self.vocab_size)) & (ids != pads)
        if bool(bad.any()):
            where = tuple(int(v) for v in bad.nonzero()[0])
            j, v = where[-1], int(ids[where])
            raise ValueError(
                f"{name}: expected BPE ids in [0, {self.vocab_size}) or the pad of the position (text_vocab + "
                f"position = {self.text_vocab + j}), got {v} at index {where}"
            )

    def decode(self, ids) -> str | list[str]:
        """Captions from ids [text_len] (-> str) or [B, text_len] (-> list of str); pads are skipped. Raises for an
        id that is neither a BPE token nor its position's pad."""
        if not isinstance(ids, torch.Tensor):
            ids = torch.as_tensor(ids, dtype=torch.int64)
        self.check_ids(ids)
        if ids.dim() > 2:
            raise ValueError(f"ids: expected [text_len] or [B, text_len], got shape {tuple(ids.shape)}")
        rows = ids.reshape(-1, self.text_len).tolist()
        texts = [self._plain.decode([t for t in r if t < self.vocab_size]) for r in rows]
        return texts[0] if ids.dim() == 1 else texts

    def __repr__(self) -> str:
        return (
            f"TextTokenizer(vocab_size={self.vocab_size}, text_vocab={self.text_vocab}, text_len={self.text_len}, "
            f"dropout={self.dropout})"
        )


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"a {t.dtype} tensor of shape {tuple(t.shape)}"
    return type(t).__name__
