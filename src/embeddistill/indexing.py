"""FAISS indexes over document embeddings (exact inner product here; serving adds approximate ones)."""

from __future__ import annotations

import logging

import numpy as np

try:
    import faiss
except ImportError:  # pragma: no cover - exercised only where faiss is not installed
    faiss = None
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


class FlatIndex:
    """Exact maximum-inner-product search over document embeddings (``faiss.IndexFlatIP``).

    With normalised embeddings inner product is cosine similarity; without, it is the dot product the
    teacher was trained with. Either way the metric is inner product, as the students are trained for.
    """

    def __init__(self, embeddings: np.ndarray, ids: list[str]):
        if len(ids) != embeddings.shape[0]:
            raise ValueError(f"{len(ids)} ids for {embeddings.shape[0]} embeddings")
        self.ids = list(ids)
        self.embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if faiss is None:
            logger.warning("faiss is not installed: exact search falls back to numpy")
            self.index = None
        else:
            self.index = faiss.IndexFlatIP(embeddings.shape[1])
            self.index.add(self.embeddings)

    def __len__(self) -> int:
        return len(self.ids)

    def _search_batch(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.index is not None:
            return self.index.search(queries, k)
        scores = queries @ self.embeddings.T
        rows = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, rows, axis=1), rows

    def search(self, queries: np.ndarray, k: int, batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` ``(scores, row indices)`` per query, best first."""
        k = min(k, len(self))
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        scores, rows = [], []
        for start in tqdm(range(0, len(queries), batch_size), desc="search", disable=len(queries) <= batch_size):
            s, r = self._search_batch(queries[start : start + batch_size], k)
            scores.append(s)
            rows.append(r)
        return np.concatenate(scores), np.concatenate(rows)

    def retrieve(self, query_ids: list[str], queries: np.ndarray, k: int) -> dict[str, dict[str, float]]:
        """A run: ``{query_id: {doc_id: score}}`` for the top ``k`` documents of each query."""
        scores, rows = self.search(queries, k)
        return {
            query_id: {self.ids[r]: float(s) for s, r in zip(scores[i], rows[i], strict=True) if r >= 0}
            for i, query_id in enumerate(query_ids)
        }
