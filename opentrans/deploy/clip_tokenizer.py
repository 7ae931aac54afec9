"""CLIP's byte-pair-encoding tokenizer, standalone: Python standard library + numpy, no torch, no open_clip.

This file is copied verbatim into deploy builds (as ``tokenizer.py`` in a Jetson bundle) together with the BPE
merges file ``bpe_simple_vocab_16e6.txt.gz`` (1.3 MB, the one open_clip ships), so a device can turn new class
names into token ids for the exported text graph without PyTorch.

It reproduces ``open_clip.SimpleTokenizer`` (default ``clean='lower'``, context length 77), which is the
tokenizer of OpenAI CLIP and of open_clip's ``ViT-*``/``RN*`` models. Derived from OpenAI CLIP's
``simple_tokenizer.py`` (MIT License, Copyright (c) 2021 OpenAI) as copied into open_clip.

Differences only outside plain text: ``ftfy.fix_text`` (mojibake repair) runs only when ``ftfy`` is installed,
and without the ``regex`` package ``\\p{L}``/``\\p{N}`` are approximated with ``re``'s ``[^\\W\\d_]``/``\\d``
(identical for ASCII and for most Unicode letters). Class names in plain ASCII tokenize identically either way.
"""

from __future__ import annotations

import gzip
import html
import os
from functools import lru_cache
from itertools import pairwise

import numpy as np

try:  # the exact pattern needs the third-party `regex` module (\p{L}); `re` approximates it
    import regex as _re

    _LETTER, _NUMBER, _OTHER = r"\p{L}", r"\p{N}", r"[^\s\p{L}\p{N}]+"
except ImportError:  # pragma: no cover - exercised only where `regex` is missing
    import re as _re

    _LETTER, _NUMBER, _OTHER = r"[^\W\d_]", r"\d", r"(?:[^\s\w]|_)+"

try:
    import ftfy as _ftfy
except ImportError:  # pragma: no cover
    _ftfy = None

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
CONTEXT_LENGTH = 77
SOT, EOT = "<start_of_text>", "<end_of_text>"


@lru_cache
def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2 ** 8):
        if b not in bs:
            bs.append(b)
            cs.append(2 ** 8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _pairs(word: tuple[str, ...]) -> set[tuple[str, str]]:
    return set(pairwise(word))


def _clean(text: str) -> str:
    if _ftfy is not None:
        text = _ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).strip().lower()


class ClipTokenizer:
    """Text -> CLIP token ids, int64 ``(N, context_length)``: ``<start_of_text>`` (49406), the BPE tokens, then
    ``<end_of_text>`` (49407, the largest id, which the text tower pools at), zero padded; longer texts are
    truncated and keep the end token last.

    Args:
        bpe_path: the gzip'ed merges file (default: the one beside this file).
        context_length: sequence length of the text tower (77 for CLIP).

    Raises:
        FileNotFoundError: no merges file at ``bpe_path``.
    """

    def __init__(self, bpe_path: str | os.PathLike | None = None, context_length: int = CONTEXT_LENGTH):
        bpe_path = bpe_path or os.path.join(os.path.dirname(os.path.abspath(__file__)), BPE_FILE)
        with gzip.open(bpe_path) as fh:
            merges = fh.read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
        merges = [tuple(m.split()) for m in merges]
        self.byte_encoder = _bytes_to_unicode()
        vocab = list(self.byte_encoder.values())
        vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + [SOT, EOT]
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self.cache = {SOT: SOT, EOT: EOT}
        self.pat = _re.compile(rf"{SOT}|{EOT}|'s|'t|'re|'ve|'m|'ll|'d|[{_LETTER}]+|[{_NUMBER}]|{_OTHER}",
                               _re.IGNORECASE)
        self.sot_id, self.eot_id = self.encoder[SOT], self.encoder[EOT]
        self.context_length = int(context_length)

    def _bpe(self, token: str) -> str:
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        pairs = _pairs(word)
        if not pairs:
            return token + "</w>"
        while True:
            bigram = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            new, i = [], 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    new.extend(word[i:])
                    break
                new.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    new.append(first + second)
                    i += 2
                else:
                    new.append(word[i])
                    i += 1
            word = tuple(new)
            if len(word) == 1:
                break
            pairs = _pairs(word)
        out = " ".join(word)
        self.cache[token] = out
        return out

    def encode(self, text: str) -> list[int]:
        """BPE token ids of one text, without start/end tokens."""
        ids = []
        for token in _re.findall(self.pat, _clean(text)):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self._bpe(token).split(" "))
        return ids

    def __call__(self, texts: str | list[str]) -> np.ndarray:
        """Token ids int64 ``(N, context_length)`` for N texts (a single string counts as one)."""
        if isinstance(texts, str):
            texts = [texts]
        out = np.zeros((len(texts), self.context_length), dtype=np.int64)
        for i, text in enumerate(texts):
            ids = [self.sot_id] + self.encode(text) + [self.eot_id]
            if len(ids) > self.context_length:
                ids = ids[:self.context_length]
                ids[-1] = self.eot_id
            out[i, :len(ids)] = ids
        return out


def default_bpe_path() -> str:
    """The merges file: beside this module if a copy is there (a bundle), else open_clip's."""
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), BPE_FILE)
    if os.path.exists(here):
        return here
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"{BPE_FILE} not found beside {__file__} and open_clip is not installed")
    return os.path.join(os.path.dirname(spec.origin), BPE_FILE)


def prompts_for(class_names: list[str], templates: list[str] | tuple[str, ...]) -> list[str]:
    """Prompts class-major: ``[t.format(c) for c in class_names for t in templates]`` (C*T strings)."""
    return [t.format(name) for name in class_names for t in templates]


def average_templates(embeds: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-class text embeddings float32 ``(C, D)``, L2-normalised, from per-prompt embeddings ``(C*T, D)``
    (class-major, each L2-normalised): mean over the T templates of a class, then renormalised (as
    ``OpenVocabSegmentor.encode_classes``)."""
    embeds = np.asarray(embeds, dtype=np.float32)
    per_class = embeds.reshape(num_classes, -1, embeds.shape[-1]).mean(1)
    norm = np.maximum(np.linalg.norm(per_class, axis=-1, keepdims=True), 1e-12)
    return (per_class / norm).astype(np.float32)
