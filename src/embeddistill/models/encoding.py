"""Fast bulk encoding of texts with a sentence-transformers model (the teacher-cache path).

``SentenceTransformer.encode`` tokenises each batch on the critical path, copies every batch's embeddings back to
the CPU (a device sync per batch), uses a fixed number of texts per batch whatever their length, and runs MPNet's
eager attention. :func:`encode_chunks` computes the very same embeddings (the model's own preprocessing and
modules, in the model's own dtype) but:

* tokenises in pieces (:func:`pieces`) up to ``TOKENIZE_AHEAD`` ahead of the device, which then waits only for
  the small first one, straight through the Rust ``tokenizers`` backend (:class:`RustTokenizer`: ``encode_batch``
  without offsets or padding, which releases the GIL and spreads the texts over all cores), padded per
  length-sorted piece into preallocated arrays; samples are checked against the model's own ``preprocess``, which
  is used instead (in background threads) for tokenizers that are not fast or give different tokens;
* sorts a piece by token length and fills batches up to a **token budget** (``batch_size * max_seq_length`` padded
  tokens: the memory of ``batch_size`` longest texts), so short texts go many to a batch;
* copies a piece's token ids to the device once (pinned, non-blocking) and slices batches there; embeddings stay on
  the device until the piece is done, and go back to the host only once the next piece is queued, so the device
  never waits for the host, within a piece or between pieces;
* pads batches to a multiple of 8 tokens on CUDA (tensor-core friendly shapes), not at all on the CPU;
* runs MPNet's attention through ``scaled_dot_product_attention`` (its relative-position bias as the additive mask,
  computed once per batch instead of once per layer), while encoding only: the model is restored afterwards.

Models the fast path cannot reproduce exactly (non-empty prompts, inputs that are not right-padded token ids) go
through ``encode_query`` / ``encode_document`` unchanged.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import itertools
import logging
import math
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer

from embeddistill.models.kernels import compiled_transformer, sdpa_attention

logger = logging.getLogger(__name__)

QUERY, DOCUMENT = "query", "document"
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
CUDA_PAD_MULTIPLE = 8
PIECE = 512  # texts tokenised and embedded at a time: a few batches, so the device starts on them soon
FIRST_PIECE = 64  # texts of the first piece, which nothing overlaps (see pieces)
TOKENIZE_AHEAD = 4  # pieces tokenised ahead of the device (bounded: their token arrays wait in host memory)


@dataclass
class TokenizedChunk:
    """A chunk's features sorted by token length (longest first); ``order[i]`` is the input row of sorted row i."""

    features: dict  # 2-D token tensors (rows sorted, right-padded to the chunk's longest) and pass-through values
    lengths: np.ndarray  # tokens of each sorted row
    order: np.ndarray


def fast_path_problem(model: SentenceTransformer) -> str | None:
    """Why ``model`` must go through ``SentenceTransformer.encode`` (None: the fast path reproduces it)."""
    if not hasattr(model, "preprocess"):
        return "sentence-transformers < 6 (no preprocess)"
    if any(prompt for prompt in (getattr(model, "prompts", None) or {}).values()):
        return "the model has prompts"
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None and getattr(tokenizer, "padding_side", "right") != "right":
        return "the tokenizer pads on the left"
    return None


def token_budget(model: SentenceTransformer, batch_size: int) -> int:
    """Padded tokens per batch: as many as ``batch_size`` texts of the model's maximum length."""
    return batch_size * int(model.max_seq_length or 512)


def _row_tensors(features: dict, rows: int) -> dict[str, torch.Tensor]:
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
        if name in _row_tensors(parts[0], len(parts[0]["attention_mask"])):
            if value.ndim != 2:
                raise ValueError(f"feature {name!r} has shape {tuple(value.shape)}; the fast path handles token rows")
            pad = 0 if name != "input_ids" else _pad_id(model)
            merged[name] = torch.cat([F.pad(p[name], (0, width - p[name].shape[1]), value=pad) for p in parts])
        else:
            merged[name] = value  # per-batch constants such as the modality name
    lengths = merged["attention_mask"].sum(dim=1).numpy()
    order = np.argsort(-lengths, kind="stable")
    index = torch.from_numpy(order)
    for name in _row_tensors(merged, len(texts)):
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
            "input_ids": int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0),
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
        rows = _row_tensors(expected, len(texts))
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


def embedding_dimension(model: SentenceTransformer) -> int:
    # sentence-transformers 6.1 renamed get_sentence_embedding_dimension to get_embedding_dimension
    getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(getter() or 0)


def _pad_id(model: SentenceTransformer) -> int:
    tokenizer = getattr(model, "tokenizer", None)
    return int(getattr(tokenizer, "pad_token_id", None) or 0)


def batch_bounds(lengths: np.ndarray, budget: int, multiple: int) -> list[tuple[int, int, int]]:
    """``(start, stop, padded_length)`` of consecutive batches of length-sorted (longest first) rows.

    Each batch takes rows while ``rows * padded_length`` stays within ``budget`` tokens (at least one row), so
    batches of short texts hold many more rows than batches of long ones at the same memory.
    """
    bounds, start = [], 0
    while start < len(lengths):
        width = max(1, math.ceil(int(lengths[start]) / multiple) * multiple)
        stop = min(len(lengths), start + max(1, budget // width))
        bounds.append((start, stop, width))
        start = stop
    return bounds


def pad_multiple(device: torch.device) -> int:
    """Batches are padded to a multiple of this many tokens: tensor-core shapes on CUDA, no waste on the CPU."""
    return CUDA_PAD_MULTIPLE if device.type == "cuda" else 1


def _model_device(model: SentenceTransformer) -> torch.device:
    return next(model.parameters()).device


def _embed_piece(
    model: SentenceTransformer, chunk: TokenizedChunk, kind: str, budget: int, on_batch: Callable[[int], None] | None
) -> HostCopy:
    """Embeddings of one tokenised piece, rows back in input order, on their way to the host."""
    device = _model_device(model)
    rows = len(chunk.order)
    multiple = pad_multiple(device)
    tokens = _row_tensors(chunk.features, rows)
    if device.type == "cuda":  # one host-to-device copy per chunk; the batches are slices on the device
        tokens = {k: v.pin_memory().to(device, non_blocking=True) for k, v in tokens.items()}
    constants = {k: v for k, v in chunk.features.items() if k not in tokens}
    pad_ids = {k: _pad_id(model) if k == "input_ids" else 0 for k in tokens}
    out = None
    for start, stop, width in batch_bounds(chunk.lengths, budget, multiple):
        batch = {k: _fit_width(v[start:stop], width, pad_ids[k]) for k, v in tokens.items()}
        embeddings = model(dict(batch, **constants), task=kind)["sentence_embedding"]
        if out is None:
            out = torch.empty((rows, embeddings.shape[1]), dtype=torch.float32, device=embeddings.device)
        out[start:stop] = embeddings.float()
        if on_batch is not None:
            on_batch(stop - start)
    inverse = torch.from_numpy(np.argsort(chunk.order)).to(out.device)
    return HostCopy(out[inverse])


class HostCopy:
    """A device tensor's copy to the host, started without waiting: on CUDA it lands in pinned memory while the
    device goes on with the work queued after it, and :meth:`numpy` waits for it alone. Waiting at once (``.cpu()``)
    would leave the device idle until the host had queued the next chunk's first batch."""

    def __init__(self, tensor: torch.Tensor):
        if tensor.device.type != "cuda":
            self.host, self.done = tensor.cpu(), None
            return
        self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self.host.copy_(tensor, non_blocking=True)
        self.done = torch.cuda.Event()
        self.done.record()

    def numpy(self) -> np.ndarray:
        if self.done is not None:
            self.done.synchronize()
        return self.host.numpy()


def _fit_width(tensor: torch.Tensor, width: int, pad: int) -> torch.Tensor:
    """Trim or right-pad a ``(rows, length)`` token tensor to ``width`` columns."""
    if tensor.shape[1] >= width:
        return tensor[:, :width]
    return F.pad(tensor, (0, width - tensor.shape[1]), value=pad)


def encode_chunks(
    model: SentenceTransformer,
    chunks: Iterable[list[str]],
    kind: str,
    batch_size: int = 32,
    on_batch: Callable[[int], None] | None = None,
    sdpa: bool = True,
    compile: bool = False,
) -> Iterator[np.ndarray]:
    """Embed each chunk of texts (fp32 rows in the chunk's order), tokenising ahead while the device runs.

    ``kind`` is ``"query"`` or ``"document"`` (what ``encode_query`` / ``encode_document`` would do). ``batch_size``
    sets the token budget of a batch (:func:`token_budget`); ``on_batch`` is told how many texts each batch held.
    ``compile`` runs the transformer through ``torch.compile`` (:func:`compiled_transformer`).
    """
    problem = fast_path_problem(model)
    if problem:
        logger.info("encoding through SentenceTransformer.encode: %s", problem)
        yield from _encode_with_sentence_transformers(model, chunks, kind, batch_size, on_batch)
        return
    budget = token_budget(model, batch_size)
    model.eval()
    threads = tokenizer_threads(_model_device(model))
    todo = pieces(chunks)
    ahead: collections.deque = collections.deque()  # (chunk number, future tokenised piece)
    embedded: collections.deque = collections.deque()  # (chunk number, HostCopy) not yet handed back
    with (
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as prefetch,
        ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tokenize") as tokenizers,
    ):
        while True:
            for number, texts in itertools.islice(todo, TOKENIZE_AHEAD - len(ahead)):
                ahead.append((number, prefetch.submit(tokenize_chunk, model, texts, kind, tokenizers)))
            if not ahead:
                break
            number, tokenized = ahead.popleft()
            piece = tokenized.result()
            with (
                torch.inference_mode(),
                sdpa_attention(model) if sdpa else contextlib.nullcontext(),
                compiled_transformer(model) if compile else contextlib.nullcontext(),
            ):
                current = _embed_piece(model, piece, kind, budget, on_batch)
            # queued: the device keeps busy while the caller takes the chunks finished before (outside the contexts)
            yield from _finished_chunks(embedded, before=number)
            embedded.append((number, current))
        yield from _finished_chunks(embedded, before=math.inf)


def _finished_chunks(embedded: collections.deque, before: float) -> Iterator[np.ndarray]:
    """Pop and join the pieces of every chunk numbered below ``before``, one array per chunk, in order."""
    while embedded and embedded[0][0] < before:
        number, parts = embedded[0][0], []
        while embedded and embedded[0][0] == number:
            parts.append(embedded.popleft()[1].numpy())
        yield np.concatenate(parts)


def pieces(
    chunks: Iterable[list[str]], largest: int | None = None, first: int | None = None
) -> Iterator[tuple[int, list[str]]]:
    """``(chunk number, texts)`` of each chunk cut into pieces of ``first`` (``FIRST_PIECE``), twice that, ... up to
    ``largest`` (``PIECE``) texts, the size carrying on across chunks; no piece straddles two chunks. Nothing overlaps
    the first piece's tokenisation: a small one gets the device going at once."""
    largest = largest or PIECE
    size = min(first or FIRST_PIECE, largest)
    for number, texts in enumerate(chunks):
        if not texts:
            raise ValueError(f"chunk {number} holds no texts: every chunk must hold at least one")
        start = 0
        while start < len(texts):
            yield number, texts[start : start + size]
            start, size = start + size, min(2 * size, largest)


def encode(
    model: SentenceTransformer, texts: list[str], kind: str, batch_size: int = 32, chunk_size: int = 2048, **options
) -> np.ndarray:
    """Embed ``texts`` (see :func:`encode_chunks`); fp32 rows in input order. Texts are sorted longest first (by
    characters) beforehand, so each piece holds texts of similar length and its batches carry little padding."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
    ordered = [texts[i] for i in order]
    chunks = [ordered[i : i + chunk_size] for i in range(0, len(ordered), chunk_size)]
    parts = list(encode_chunks(model, chunks, kind, batch_size, **options))
    if not parts:
        return np.zeros((0, embedding_dimension(model)), dtype=np.float32)
    out = np.empty((len(texts), parts[0].shape[1]), dtype=np.float32)
    out[order] = np.concatenate(parts)
    return out


def _encode_with_sentence_transformers(
    model: SentenceTransformer,
    chunks: Iterable[list[str]],
    kind: str,
    batch_size: int,
    on_batch: Callable[[int], None] | None,
) -> Iterator[np.ndarray]:
    encode_kind = model.encode_query if kind == QUERY else model.encode_document
    for texts in chunks:
        parts = []
        for start in range(0, len(texts), batch_size):
            batch = texts[start : start + batch_size]
            parts.append(encode_kind(batch, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False))
            if on_batch is not None:
                on_batch(len(batch))
        dimension = embedding_dimension(model)
        yield np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, dimension), dtype=np.float32)
