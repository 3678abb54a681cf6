"""Tokenisation for the fast encoding path: a model's own preprocessing, sorted by token length, fast.

:func:`tokenize_chunk` gives the features ``encode_query`` / ``encode_document`` would give (int64 token rows,
right-padded, and pass-through constants such as the modality), rows sorted longest first, through the Rust
``tokenizers`` backend where that gives the very same features (:class:`RustTokenizer`, checked against the
model's ``preprocess`` as it goes) and through ``preprocess`` itself otherwise (:func:`preprocess_chunk`).
"""

from __future__ import annotations

import copy
import itertools
import logging
import os
import threading
import weakref
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

TOKENIZE_BATCH = 256  # texts per tokenizer call: enough to amortise the call, few enough to share out to threads
CHECK_TEXTS_FIRST = 64  # texts of a model's first piece checked against its own preprocess (plus PROBE_TEXTS)
CHECK_TEXTS = 8  # texts of each later checked piece checked (plus the piece's longest text)
CHECK_EVERY = 2048  # texts between two checked pieces: a check costs milliseconds of Python that hold the GIL
ROW_FEATURES = ("input_ids", "attention_mask", "token_type_ids")  # what the Rust path can produce
PROBE_TEXTS = (  # checked once per model: empty and blank texts, unicode, a text far past any max_seq_length
    "",
    "   ",
    "  leading and trailing spaces  ",
    "Ünïcödé: naïve café, 東京, Ελληνικά, emoji 🧬🔬, zero\u200bwidth, combining e\u0301, tab\tand\nnewline",
    "cells " * 1100,
)


@dataclass
class TokenizedChunk:
    """A chunk's features sorted by token length (longest first); ``order[i]`` is the input row of sorted row i."""

    features: dict  # 2-D token tensors (rows sorted, right-padded to the chunk's longest) and pass-through values
    lengths: np.ndarray  # tokens of each sorted row
    order: np.ndarray


def pad_id(model: SentenceTransformer) -> int:
    """The id that pads token rows (0 where the tokenizer has none)."""
    tokenizer = getattr(model, "tokenizer", None)
    return int(getattr(tokenizer, "pad_token_id", None) or 0)


def row_tensors(features: dict, rows: int) -> dict[str, torch.Tensor]:
    return {k: v for k, v in features.items() if torch.is_tensor(v) and v.ndim >= 1 and v.shape[0] == rows}


def tokenizer_threads(device: torch.device) -> int:
    """Threads that tokenise in parallel: the Rust tokenizer releases the GIL, so on a GPU machine several cores
    keep up with the device (one core tokenises long documents slower than an H100 encodes them); on the CPU the
    model's own threads need the cores.
    """
    return min(8, os.cpu_count() or 1) if device.type == "cuda" else 1


def tokenize_chunk(
    model: SentenceTransformer, texts: list[str], kind: str, pool: ThreadPoolExecutor | None = None
) -> TokenizedChunk:
    """The model's own preprocessing of ``texts`` (as ``encode_<kind>`` does it), sorted by token length.

    Through the Rust tokenizer (:class:`RustTokenizer`) where that gives the very same features, else through
    :func:`preprocess_chunk`. ``pool`` tokenises sub-batches in its threads when the Rust tokenizer cannot spread a
    batch over the cores itself (``TOKENIZERS_PARALLELISM`` off), and in the fallback.
    """
    rust = rust_tokenizer(model, kind)
    if rust is not None:
        chunk = rust.tokenize_chunk(texts, pool)
        if chunk is not None:
            return chunk
    return preprocess_chunk(model, texts, kind, pool)


def preprocess_chunk(
    model: SentenceTransformer, texts: list[str], kind: str, pool: ThreadPoolExecutor | None = None
) -> TokenizedChunk:
    """``tokenize_chunk`` through the model's own ``preprocess`` (the reference, and the fallback).

    With ``pool``, sub-batches of ``TOKENIZE_BATCH`` texts are tokenised in its threads.
    """
    batches = [texts[i : i + TOKENIZE_BATCH] for i in range(0, len(texts), TOKENIZE_BATCH)]
    preprocess = partial(model.preprocess, task=kind)
    parts = list(pool.map(preprocess, batches) if pool is not None else map(preprocess, batches))
    width = max(int(p["attention_mask"].shape[1]) for p in parts)
    merged: dict = {}
    for name, value in parts[0].items():
        if name in row_tensors(parts[0], len(parts[0]["attention_mask"])):
            if value.ndim != 2:
                raise ValueError(f"feature {name!r} has shape {tuple(value.shape)}; the fast path handles token rows")
            pad = 0 if name != "input_ids" else pad_id(model)
            merged[name] = torch.cat([F.pad(p[name], (0, width - p[name].shape[1]), value=pad) for p in parts])
        else:
            merged[name] = value  # per-batch constants such as the modality name
    lengths = merged["attention_mask"].sum(dim=1).numpy()
    order = np.argsort(-lengths, kind="stable")
    index = torch.from_numpy(order)
    for name in row_tensors(merged, len(texts)):
        merged[name] = merged[name][index]
    return TokenizedChunk(merged, lengths[order], order)


# -- tokenisation straight through the Rust tokenizers backend ---------------------------------------------------


def rayon_parallelism() -> bool:
    """Whether the Rust tokenizer spreads an ``encode_batch`` over the cores (its own reading of
    ``TOKENIZERS_PARALLELISM``: unset or any other value than these means yes). It cannot see the override that
    ``tokenizers`` sets in a child forked after parallel use, where ``encode_batch`` quietly runs on one core.
    """
    value = os.environ.get("TOKENIZERS_PARALLELISM")
    return value is None or value.lower() not in ("", "off", "false", "f", "no", "n", "0")


class RustTokenizer:
    """A model's fast tokenizer called directly: ``encode_batch`` on a private copy of its Rust backend.

    sentence-transformers' ``preprocess`` and the transformers wrapper around the backend cost more, and hold the
    GIL longer, than the Rust tokenisation itself. Here the copy truncates to the model's length for ``kind`` (as
    ``preprocess`` does), pads nothing and computes no offsets (``encode_batch_fast`` where the version has it);
    rows are padded once per chunk, sorted by length, into preallocated arrays. Features are the same tensors as
    ``preprocess`` gives (int64 ``input_ids``, ``attention_mask`` and, where the model has them,
    ``token_type_ids``, right-padded with the tokenizer's pad values; ``modality`` and other constants copied).

    The first chunk is checked, then one at least every ``CHECK_EVERY`` texts: its first ``CHECK_TEXTS`` (the first
    chunk's ``CHECK_TEXTS_FIRST``, and ``PROBE_TEXTS``) and its longest text must tokenise exactly as ``preprocess``
    does; at the first difference this tokenizer is disabled and the chunk goes through ``preprocess``.
    """

    def __init__(self, model: SentenceTransformer, kind: str, max_length: int):
        tokenizer = model.tokenizer
        self.model, self.kind, self.max_length = model, kind, max_length
        self.backend = copy.deepcopy(tokenizer.backend_tokenizer)
        # deepcopy (a pickle round trip) drops this runtime flag: keep the wrapper's handling of special tokens
        self.backend.encode_special_tokens = getattr(tokenizer.backend_tokenizer, "encode_special_tokens", False)
        self.backend.enable_truncation(
            max_length, stride=0, strategy="longest_first", direction=getattr(tokenizer, "truncation_side", "right")
        )
        self.backend.no_padding()
        self._encode_batch = getattr(self.backend, "encode_batch_fast", None) or self.backend.encode_batch
        self.pad_values = {
            "input_ids": pad_id(model),
            "attention_mask": 0,
            "token_type_ids": int(getattr(tokenizer, "pad_token_type_id", 0) or 0),
        }
        self.disabled: str | None = None  # why this tokenizer no longer reproduces preprocess
        self._probed = False
        self._unchecked = 0  # texts tokenised since the last check
        self._checked: tuple[dict, list[str]] | None = None  # what the last check found: (constants, row features)
        self._lock = threading.Lock()

    def encodings(self, texts: list[str], pool: ThreadPoolExecutor | None = None) -> list:
        """``tokenizers.Encoding`` of each text: one ``encode_batch`` call where Rust parallelises it (the GIL is
        released throughout), else sub-batches in ``pool``'s threads."""
        if pool is None or rayon_parallelism() or len(texts) <= TOKENIZE_BATCH:
            return self._encode_batch(texts)
        batches = [texts[i : i + TOKENIZE_BATCH] for i in range(0, len(texts), TOKENIZE_BATCH)]
        return list(itertools.chain.from_iterable(pool.map(self._encode_batch, batches)))

    def features(
        self, encodings: list, order: np.ndarray, lengths: np.ndarray, keys: Iterable[str]
    ) -> dict[str, torch.Tensor]:
        """``keys`` features of ``encodings[order]`` as right-padded int64 tensors as wide as the longest row."""
        rows = [encodings[i] for i in order]
        lengths = lengths[order]
        width = int(lengths.max(initial=0))
        real = np.arange(width) < lengths[:, None]  # row-major True cells: where each row's tokens go, in order
        total = int(lengths.sum())
        out = {}
        for key in keys:
            if key == "attention_mask":  # 1 on every token: Rust pads nothing here, so every position is real
                out[key] = torch.from_numpy(real.astype(np.int64))
                continue
            array = np.full((len(rows), width), self.pad_values[key], dtype=np.int64)
            attribute = "ids" if key == "input_ids" else "type_ids"
            array[real] = np.fromiter(
                itertools.chain.from_iterable(getattr(e, attribute) for e in rows), dtype=np.int64, count=total
            )
            out[key] = torch.from_numpy(array)
        return out

    def check(self, texts: list[str]) -> tuple[dict, list[str]] | None:
        """``(constants, row feature names)`` of ``preprocess(texts)`` if its row features equal ours exactly
        (values, dtypes, widths, padding), else None."""
        expected = self.model.preprocess(texts, task=self.kind)
        rows = row_tensors(expected, len(texts))
        if set(rows) - set(ROW_FEATURES) or "input_ids" not in rows or "attention_mask" not in rows:
            self.disabled = f"preprocess gives the row features {sorted(rows)}"
            return None
        encodings = self._encode_batch(texts)
        lengths = np.fromiter((len(e) for e in encodings), dtype=np.int64, count=len(encodings))
        got = self.features(encodings, np.arange(len(texts)), lengths, rows)
        for key, value in rows.items():
            if value.dtype != got[key].dtype or value.shape != got[key].shape or not torch.equal(value, got[key]):
                width = min(value.shape[1], got[key].shape[1])
                bad = [i for i in range(len(texts)) if not torch.equal(value[i, :width], got[key][i, :width])]
                example = texts[bad[0]][:80] if bad else f"width {got[key].shape[1]} for {value.shape[1]}"
                self.disabled = f"{key} differs from preprocess ({example!r})"
                return None
        return {k: v for k, v in expected.items() if k not in rows}, [k for k in ROW_FEATURES if k in rows]

    def tokenize_chunk(self, texts: list[str], pool: ThreadPoolExecutor | None = None) -> TokenizedChunk | None:
        """Like :func:`preprocess_chunk`; None if this tokenizer does not reproduce ``preprocess`` on ``texts``."""
        if self.disabled or not texts or not all(isinstance(t, str) for t in texts):
            return None
        with self._lock:
            first, self._probed = not self._probed, True
            self._unchecked += len(texts)
            due = first or self._checked is None or self._unchecked >= CHECK_EVERY
            self._unchecked = 0 if due else self._unchecked
        if due:
            sample = texts[: CHECK_TEXTS_FIRST if first else CHECK_TEXTS] + [max(texts, key=len)]
            checked = self.check(sample + list(PROBE_TEXTS) if first else sample)
            if checked is None:
                logger.warning(
                    "tokenising through preprocess: the Rust tokenizer does not match it (%s)", self.disabled
                )
                return None
            self._checked = checked
        encodings = self.encodings(texts, pool)
        lengths = np.fromiter((len(e) for e in encodings), dtype=np.int64, count=len(encodings))
        order = np.argsort(-lengths, kind="stable")
        constants, keys = self._checked
        features = self.features(encodings, order, lengths, keys)
        return TokenizedChunk(dict(features, **constants), lengths[order], order)


_RUST_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {key: RustTokenizer}


def rust_tokenizer(model: SentenceTransformer, kind: str) -> RustTokenizer | None:
    """The model's :class:`RustTokenizer` for ``kind`` (made once per tokenizer and length), or None: not a fast
    tokenizer, no maximum length, or it was found to differ from ``preprocess``."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None or not getattr(tokenizer, "is_fast", False) or not hasattr(tokenizer, "backend_tokenizer"):
        return None
    module = model[0] if len(model) else None
    max_length = getattr(module, f"{kind}_length", None) or model.max_seq_length
    if not max_length:
        return None
    key = (id(tokenizer), kind, int(max_length), getattr(tokenizer, "truncation_side", "right"), tokenizer.pad_token_id)
    try:
        cache = _RUST_TOKENIZERS.setdefault(model, {})
    except TypeError:  # not weak-referenceable
        cache = {}
    rust = cache.get(key)
    if rust is None:
        try:
            rust = cache[key] = RustTokenizer(model, kind, int(max_length))
        except Exception as error:  # an unusual backend: preprocess still works
            logger.info("tokenising through preprocess: no Rust tokenizer (%s)", error)
            return None
    return None if rust.disabled else rust
