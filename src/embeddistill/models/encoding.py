"""Fast bulk encoding of texts with a sentence-transformers model (the teacher-cache path).

``SentenceTransformer.encode`` tokenises each batch on the critical path, copies every batch's embeddings back to
the CPU (a device sync per batch), uses a fixed number of texts per batch whatever their length, and runs MPNet's
eager attention. :func:`encode_chunks` computes the very same embeddings (the model's own preprocessing and
modules, in the model's own dtype) but:

* tokenises in pieces (:func:`pieces`) up to ``TOKENIZE_AHEAD`` ahead of the device, which then waits only for
  the small first one, straight through the Rust ``tokenizers`` backend where that gives the model's own features
  (``tokenization.RustTokenizer``: ``encode_batch`` without offsets or padding, which releases the GIL and spreads
  the texts over all cores, checked on samples against ``preprocess``, which is used instead where it differs);
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
import itertools
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer

from embeddistill.models.kernels import compiled_transformer, sdpa_attention
from embeddistill.models.tokenization import (
    TokenizedChunk,
    pad_id,
    row_tensors,
    tokenize_chunk,
    tokenizer_threads,
)

logger = logging.getLogger(__name__)

QUERY, DOCUMENT = "query", "document"
CUDA_PAD_MULTIPLE = 8
PIECE = 512  # texts tokenised and embedded at a time: a few batches, so the device starts on them soon
FIRST_PIECE = 64  # texts of the first piece, which nothing overlaps (see pieces)
TOKENIZE_AHEAD = 4  # pieces tokenised ahead of the device (bounded: their token arrays wait in host memory)


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


def embedding_dimension(model: SentenceTransformer) -> int:
    # sentence-transformers 6.1 renamed get_sentence_embedding_dimension to get_embedding_dimension
    getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(getter() or 0)


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
    model: SentenceTransformer, piece: TokenizedChunk, kind: str, budget: int, on_batch: Callable[[int], None] | None
) -> HostCopy:
    """Embeddings of one tokenised piece, rows back in input order, on their way to the host."""
    device = _model_device(model)
    rows = len(piece.order)
    multiple = pad_multiple(device)
    tokens = row_tensors(piece.features, rows)
    if device.type == "cuda":  # one copy per piece, from pinned memory (see _tokenize_piece); batches are slices
        tokens = {k: v.to(device, non_blocking=True) for k, v in tokens.items()}
    constants = {k: v for k, v in piece.features.items() if k not in tokens}
    pad_ids = {k: pad_id(model) if k == "input_ids" else 0 for k in tokens}
    out = None
    for start, stop, width in batch_bounds(piece.lengths, budget, multiple):
        batch = {k: _fit_width(v[start:stop], width, pad_ids[k]) for k, v in tokens.items()}
        embeddings = model(dict(batch, **constants), task=kind)["sentence_embedding"]
        if out is None:
            out = torch.empty((rows, embeddings.shape[1]), dtype=torch.float32, device=embeddings.device)
        out[start:stop] = embeddings.float()
        if on_batch is not None:
            on_batch(stop - start)
    inverse = torch.from_numpy(np.argsort(piece.order))  # pinned on CUDA: a pageable copy would wait for the device
    inverse = inverse.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else inverse
    return HostCopy(out[inverse])


class HostCopy:
    """A device tensor's copy to the host, started without waiting: on CUDA it lands in pinned memory while the
    device goes on with the work queued after it, and :meth:`numpy` waits for it alone. Waiting at once (``.cpu()``)
    would leave the device idle until the host had queued the next piece's first batch."""

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
                ahead.append((number, prefetch.submit(_tokenize_piece, model, texts, kind, tokenizers)))
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


def _tokenize_piece(
    model: SentenceTransformer, texts: list[str], kind: str, pool: ThreadPoolExecutor
) -> TokenizedChunk:
    """:func:`tokenize_chunk`, its token rows pinned for the device: a copy, made here rather than by the thread
    that feeds the device."""
    piece = tokenize_chunk(model, texts, kind, pool)
    if _model_device(model).type == "cuda":
        piece.features.update({k: v.pin_memory() for k, v in row_tensors(piece.features, len(piece.order)).items()})
    return piece


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
