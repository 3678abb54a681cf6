"""What a distillation step trains on: the training queries and documents, and the batches drawn from them.

:class:`Batcher` draws a dual-encoder teacher's batches (in-batch documents plus hard negatives from the teacher's
top-k); :class:`CandidateBatcher` draws a cross-encoder teacher's (each query against its own scored candidate
list). Both are deterministic functions of ``(seed, step)``, so a resumed run sees the batches it would have seen.
The rest is how a symmetric student embeds a step's documents quickly: token ids cached per document
(:class:`DocumentTokens`) and forward passes over chunks of similar length (:func:`embed_by_length`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

CHUNK_TOKENS = 32768  # padded tokens per forward pass when a symmetric student embeds a step's documents


@dataclass
class TrainingQueries:
    """Training queries with everything the loss needs, aligned by row.

    ``anchors[i]`` is the document row that query ``i`` is paired with in the batch: its first labelled
    positive, the document it was generated from, or else the teacher's top document. ``negative_pool[i]``
    holds the teacher's top documents for it with labelled positives and the anchor removed (``-1`` pads).
    """

    texts: list[str]
    teacher_embeddings: np.ndarray
    anchors: np.ndarray
    positives: list[list[int]]
    negative_pool: np.ndarray
    generated: np.ndarray

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class Documents:
    """The corpus: document texts and the teacher's embeddings of them, aligned by row."""

    texts: list[str]
    teacher_embeddings: np.ndarray


def real_query_repeats(passes: int, epochs: int) -> int:
    """How many times an epoch holds each real query, for about ``passes`` in a run of ``epochs`` (at least once)."""
    return max(1, round(passes / epochs)) if passes else 1


def rows_of_an_epoch(generated: np.ndarray, real_repeats: int) -> np.ndarray:
    """The training-query rows one epoch shows, unshuffled: each generated query once, each real one ``real_repeats``
    times."""
    return np.repeat(np.arange(len(generated)), np.where(generated, 1, real_repeats))


class Batcher:
    """Deterministic batches: epoch ``e`` is a permutation seeded by ``(seed, e)``, negatives by ``(seed, step)``.

    An epoch holds every generated query once and every real one ``real_repeats`` times (:func:`real_query_repeats`).
    """

    def __init__(
        self, queries: TrainingQueries, batch_size: int, hard_negatives: int, seed: int, real_repeats: int = 1
    ):
        self.queries, self.batch_size, self.hard_negatives, self.seed = queries, batch_size, hard_negatives, seed
        self.epoch_rows = rows_of_an_epoch(queries.generated, real_repeats)
        self.steps_per_epoch = math.ceil(len(self.epoch_rows) / batch_size)
        self._order: tuple[int, np.ndarray] | None = None

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            self._order = (
                epoch,
                self.epoch_rows[np.random.default_rng([self.seed, epoch]).permutation(len(self.epoch_rows))],
            )
        return self._order[1]

    def _sample_negatives(self, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Up to ``hard_negatives`` distinct documents per row from its pool, uniformly, all rows at once."""
        pools = self.queries.negative_pool[rows]
        if not self.hard_negatives or pools.shape[1] == 0:
            return np.zeros(0, dtype=np.int64)
        # Random keys, padding last: the first k of each row's key order are a uniform sample without replacement.
        keys = np.where(pools >= 0, rng.random(pools.shape), np.inf)
        picked = np.argsort(keys, axis=1)[:, : self.hard_negatives]
        chosen = np.take_along_axis(pools, picked, axis=1)
        return chosen[chosen >= 0]

    def batch(self, step: int) -> dict[str, np.ndarray]:
        epoch, position = divmod(step, self.steps_per_epoch)
        rows = self._epoch_order(epoch)[position * self.batch_size : (position + 1) * self.batch_size]
        rng = np.random.default_rng([self.seed, epoch, position, 1])
        candidates = np.concatenate([self.queries.anchors[rows], self._sample_negatives(rows, rng)])
        # Duplicate columns would count a document twice in the softmax: keep each document once.
        documents, inverse = np.unique(candidates.astype(np.int64), return_inverse=True)
        anchor_columns = inverse[: len(rows)]
        label_mask = np.ones((len(rows), len(documents)), dtype=bool)
        column_of: dict[int, int] | None = None
        for i, row in enumerate(rows):
            if len(self.queries.positives[row]) < 2:
                continue  # the anchor is the only positive: nothing to mask
            column_of = column_of or {int(d): c for c, d in enumerate(documents)}
            for positive in self.queries.positives[row]:
                column = column_of.get(positive)
                if column is not None and column != anchor_columns[i]:
                    label_mask[i, column] = False  # another positive of the same query is no negative
        return {"rows": rows, "documents": documents, "anchor_columns": anchor_columns, "label_mask": label_mask}


@dataclass
class CandidateScores:
    """A cross-encoder's scores over every training query's fixed candidate list (computed once, cached).

    ``candidates[i]`` holds document rows: column 0 is query ``i``'s anchor, columns ``1..pool_size`` its
    first-stage pool (hard negatives, labelled positives excluded), the rest random documents (the easy negatives
    that in-batch documents would be). ``scores[i, c]`` is the CE score of ``(query i, candidates[i, c])``.
    """

    candidates: np.ndarray
    scores: np.ndarray
    pool_size: int

    def __post_init__(self):
        if self.candidates.shape != self.scores.shape:
            raise ValueError(f"candidates {self.candidates.shape} and scores {self.scores.shape} differ in shape")
        if (self.candidates < 0).any():
            raise ValueError("every candidate list must be full (no -1 padding)")


class CandidateBatcher(Batcher):
    """Batches for CE distillation: each query is scored against its own candidates, whose CE scores are known.

    Epoch order and seeding as :class:`Batcher`. Each step, a query's list is its anchor, ``hard_negatives``
    candidates drawn uniformly from its first-stage pool, and all its random candidates, so every row has the same
    number ``K`` of columns and no candidate appears twice in a row.
    """

    def __init__(
        self,
        queries: TrainingQueries,
        targets: CandidateScores,
        batch_size: int,
        hard_negatives: int,
        seed: int,
        real_repeats: int = 1,
    ):
        super().__init__(queries, batch_size, hard_negatives, seed, real_repeats)
        self.targets = targets

    def batch(self, step: int) -> dict[str, np.ndarray]:
        epoch, position = divmod(step, self.steps_per_epoch)
        rows = self._epoch_order(epoch)[position * self.batch_size : (position + 1) * self.batch_size]
        rng = np.random.default_rng([self.seed, epoch, position, 2])
        pool = self.targets.pool_size
        width = self.targets.candidates.shape[1]
        take = min(self.hard_negatives, pool)
        picked = 1 + np.argsort(rng.random((len(rows), pool)), axis=1)[:, :take]
        fixed = np.broadcast_to(np.arange(1 + pool, width), (len(rows), width - 1 - pool))
        columns = np.concatenate([np.zeros((len(rows), 1), dtype=np.int64), picked, fixed], axis=1)
        candidates = np.take_along_axis(self.targets.candidates[rows], columns, axis=1)
        documents, inverse = np.unique(candidates, return_inverse=True)
        return {
            "rows": rows,
            "columns": columns,
            "documents": documents,
            "document_columns": inverse.reshape(candidates.shape),
        }


class DocumentTokens:
    """Token ids of a corpus' documents, each tokenized once: those a run can draw up front (:meth:`prefill`), any
    other on first use.

    Symmetric students embed the same candidate documents every epoch; tokenizing a batch's ~600 texts again each
    step is CPU time the GPU waits for (0.11 s for 576 MS MARCO passages: ``benchmarks/symmetric_documents.py``).
    """

    def __init__(self, texts: list[str], tokenizer, max_length: int):
        self.texts, self.tokenizer, self.max_length = texts, tokenizer, max_length
        self._ids: dict[int, np.ndarray] = {}

    def prefill(self, rows: np.ndarray, chunk: int = 8192) -> None:
        """Tokenize ``rows`` now (``-1`` padding skipped), in large batches the fast tokenizer spreads over every
        core: in the first epoch nearly every step's documents are new, and tokenizing them there holds the GPU up."""
        rows = np.unique(rows[rows >= 0])
        for start in tqdm(range(0, len(rows), chunk), desc="tokenize documents", unit="chunk", leave=False):
            self.of(rows[start : start + chunk])

    def of(self, rows) -> list[np.ndarray]:
        rows = [int(r) for r in rows]
        missing = [r for r in dict.fromkeys(rows) if r not in self._ids]
        if missing:
            encoded = self.tokenizer([self.texts[r] for r in missing], truncation=True, max_length=self.max_length)
            ids_of = zip(missing, encoded["input_ids"], strict=True)
            self._ids.update((r, np.asarray(ids, dtype=np.int32)) for r, ids in ids_of)
        return [self._ids[r] for r in rows]


def pad_token_ids(token_ids: list[np.ndarray], tokenizer) -> dict[str, torch.Tensor]:
    """The features ``tokenizer(texts, padding=True)`` gives for texts already tokenized into ``token_ids``."""
    if tokenizer.pad_token_id is None:
        raise ValueError(f"the student's tokenizer ({type(tokenizer).__name__}) has no padding token to batch with")
    width = max(len(ids) for ids in token_ids)
    input_ids = np.full((len(token_ids), width), tokenizer.pad_token_id, dtype=np.int64)
    attention_mask = np.zeros((len(token_ids), width), dtype=np.int64)
    for row, ids in enumerate(token_ids):
        span = slice(width - len(ids), width) if tokenizer.padding_side == "left" else slice(0, len(ids))
        input_ids[row, span], attention_mask[row, span] = ids, 1
    features = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention_mask)}
    if "token_type_ids" in tokenizer.model_input_names:  # one text per row: segment 0 throughout, padding too
        features["token_type_ids"] = torch.zeros_like(features["input_ids"])
    return features


def length_chunks(sorted_lengths: list[int], chunk_tokens: int) -> list[slice]:
    """Consecutive spans of ascending ``sorted_lengths``, each at most ``chunk_tokens`` padded (or one text).

    Not ``encoding.batch_bounds``, which fixes a batch's row count from its longest text: a span here grows while its
    real padded size fits, which pads a step's mixed-length passages less.
    """
    chunks, start = [], 0
    while start < len(sorted_lengths):
        stop = start + 1  # lengths ascend, so a span's padded size is its count times its last length
        while stop < len(sorted_lengths) and (stop + 1 - start) * sorted_lengths[stop] <= chunk_tokens:
            stop += 1
        chunks.append(slice(start, stop))
        start = stop
    return chunks


def embed_by_length(
    tower: torch.nn.Module,
    token_ids: list[np.ndarray],
    tokenizer,
    device: torch.device,
    chunk_tokens: int = CHUNK_TOKENS,
) -> torch.Tensor:
    """``tower``'s fp32 embeddings of tokenized texts (in their order), run in chunks of similar length.

    Padding a whole candidate set to its longest text wastes most of the work where lengths vary (MS MARCO
    passages: 20 to 256 tokens); sorted chunks pad each text only to its neighbours' length. A chunk holds up to
    ``chunk_tokens`` tokens with padding: few chunks, since each forward pass costs CPU time to launch. The
    embeddings and their gradients are the same, since padding is masked out.
    """
    lengths = np.array([len(ids) for ids in token_ids])
    order = np.argsort(lengths, kind="stable")
    parts = []
    for chunk in length_chunks(lengths[order].tolist(), chunk_tokens):
        features = pad_token_ids([token_ids[i] for i in order[chunk]], tokenizer)
        parts.append(tower({k: v.to(device) for k, v in features.items()})["sentence_embedding"])
    restore = torch.from_numpy(np.argsort(order)).to(device)
    return torch.cat(parts).float()[restore]
