"""FAISS indexes over document embeddings (exact inner product here; serving adds approximate ones)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

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
        self._torch_embeddings = None
        if faiss is None:
            logger.warning("faiss is not installed: exact search falls back to torch (on the GPU where there is one)")
            self.index = None
        else:
            self.index = faiss.IndexFlatIP(embeddings.shape[1])
            self.index.add(self.embeddings)

    def __len__(self) -> int:
        return len(self.ids)

    def _search_batch(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.index is not None:
            return self.index.search(queries, k)
        if self._torch_embeddings is None:  # moved once: search is called batch by batch
            device = "cuda" if torch.cuda.is_available() else "cpu"
            self._torch_embeddings = torch.from_numpy(self.embeddings).to(device)
        documents = self._torch_embeddings
        scores = torch.from_numpy(queries).to(documents.device) @ documents.T
        top_scores, rows = torch.topk(scores, k, dim=1)  # not a full sort of every row
        return top_scores.cpu().numpy(), rows.cpu().numpy()

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

    def retrieve(
        self, query_ids: list[str], queries: np.ndarray, k: int, ignore_identical_ids: bool = True
    ) -> dict[str, dict[str, float]]:
        """A run: ``{query_id: {doc_id: score}}`` for the top ``k`` documents of each query.

        ``ignore_identical_ids`` (BEIR's and MTEB's convention): a document whose id is the query's own id is not a
        hit; it is dropped before the top ``k`` are taken (see :func:`top_k_without_self`).
        """
        scores, rows = self.search(queries, k + 1 if ignore_identical_ids else k)
        ranked = [
            [(self.ids[r], float(s)) for s, r in zip(scores[i], rows[i], strict=True) if r >= 0]
            for i in range(len(rows))
        ]
        return top_k_without_self(query_ids, ranked, k, ignore_identical_ids)


def top_k_without_self(
    query_ids: list[str], ranked: list[list[tuple[str, float]]], k: int, ignore_identical_ids: bool = True
) -> dict[str, dict[str, float]]:
    """A run from ranked hits: each query's first ``k`` hits, without the query's own id when ``ignore_identical_ids``.

    Where a dataset's queries are also documents (duplicate-question and counter-argument sets: Quora, CQADupStack,
    ArguAna), a query finds itself first; BEIR and MTEB drop that hit (``ignore_identical_ids``), and so does this.
    The ranked lists should hold ``k + 1`` hits, so that ``k`` remain after the drop.
    """
    return {
        query_id: dict([hit for hit in hits if not (ignore_identical_ids and hit[0] == query_id)][:k])
        for query_id, hits in zip(query_ids, ranked, strict=True)
    }


# --------------------------------------------------------------------------------------------------------------
# Saved, growable indexes for serving: exact (flat), HNSW and IVF-PQ, all with the inner-product metric.
# --------------------------------------------------------------------------------------------------------------

INDEX_TYPES = ("flat", "hnsw", "ivfpq")
INDEX_FILE, IDS_FILE, INFO_FILE = "index.faiss", "ids.json", "info.json"
INDEX_FORMAT = "embeddistill-index/1"


def _require_faiss() -> None:
    if faiss is None:  # pragma: no cover - faiss-cpu is a core dependency
        raise ImportError("faiss is required for SearchIndex: pip install faiss-cpu")


def default_index_params(index_type: str, count: int, dimension: int, **given) -> dict:
    """Build parameters of ``index_type`` for ``count`` vectors of ``dimension``; ``given`` values win (None = auto).

    * hnsw: ``m`` links per node, ``ef_construction`` and ``ef_search`` beam widths.
    * ivfpq: ``nlist`` coarse cells (auto: about sqrt(count), at most count/39 so each cell trains on 39 points),
      ``pq_m`` sub-quantizers (auto: dimension/8, must divide the dimension), ``pq_nbits`` bits per code
      (8, fewer when there are fewer than 256 training vectors) and ``nprobe`` cells visited per query.
    """
    given = {k: v for k, v in given.items() if v is not None}
    if index_type == "flat":
        params: dict = {}
    elif index_type == "hnsw":
        params = {"m": 32, "ef_construction": 200, "ef_search": 128}
    elif index_type == "ivfpq":
        nlist = given.get("nlist") or max(1, min(round(count**0.5), count // 39))
        pq_m = given.get("pq_m") or next(m for m in range(max(1, dimension // 8), 0, -1) if dimension % m == 0)
        nbits = given.get("pq_nbits") or max(1, min(8, count.bit_length() - 1))
        params = {"nlist": int(nlist), "pq_m": int(pq_m), "pq_nbits": int(nbits), "nprobe": min(16, int(nlist))}
    else:
        raise ValueError(f"unknown index type {index_type!r}: choose one of {', '.join(INDEX_TYPES)}")
    unknown = set(given) - set(params)
    if unknown:
        raise ValueError(
            f"index type {index_type!r} takes no parameter(s) {sorted(unknown)}; it takes {sorted(params)}"
        )
    params.update(given)
    for name, value in params.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"index parameter {name} must be a positive integer, got {value!r}")
    if index_type == "ivfpq" and dimension % params["pq_m"]:
        raise ValueError(f"--pq-m {params['pq_m']} must divide the embedding dimension {dimension}")
    return params


def _new_faiss_index(index_type: str, dimension: int, params: dict):
    metric = faiss.METRIC_INNER_PRODUCT
    if index_type == "flat":
        return faiss.IndexFlatIP(dimension)
    if index_type == "hnsw":
        index = faiss.IndexHNSWFlat(dimension, params["m"], metric)
        index.hnsw.efConstruction = params["ef_construction"]
        index.hnsw.efSearch = params["ef_search"]
        return index
    quantizer = faiss.IndexFlatIP(dimension)
    index = faiss.IndexIVFPQ(quantizer, dimension, params["nlist"], params["pq_m"], params["pq_nbits"], metric)
    return index  # the faiss Python wrapper keeps the quantizer alive with the index


def _apply_search_params(index, index_type: str, params: dict) -> None:
    if index_type == "hnsw":
        index.hnsw.efSearch = params["ef_search"]
    elif index_type == "ivfpq":
        index.nprobe = params["nprobe"]


def _metric_name(index) -> str:
    return {faiss.METRIC_INNER_PRODUCT: "inner_product", faiss.METRIC_L2: "l2"}.get(index.metric_type, "other")


class SearchIndex:
    """A FAISS inner-product index with its document ids, saved as a folder.

    ``FOLDER/index.faiss`` (``faiss.write_index``), ``FOLDER/ids.json`` (row -> document id) and
    ``FOLDER/info.json`` (model, dimension, metric, normalized, count, type, build parameters, build seconds).
    Each file is written atomically (temporary file, then rename); ``info.json`` is written last and ``load``
    checks that the three agree, so an interrupted save is detected instead of serving mismatched ids.
    """

    def __init__(self, index, ids: list[str], info: dict):
        _require_faiss()
        if index.ntotal != len(ids):
            raise ValueError(f"the FAISS index holds {index.ntotal} vectors but there are {len(ids)} ids")
        self.index = index
        self.ids = list(ids)
        self._id_set = set(self.ids)
        if len(self._id_set) != len(self.ids):
            raise ValueError("document ids are not unique")
        self.info = info

    # -- construction -------------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        embeddings: np.ndarray,
        ids: list[str],
        index_type: str = "flat",
        *,
        model: str = "",
        normalized: bool | None = None,
        seed: int = 0,
        **params,
    ) -> SearchIndex:
        """Build an index of ``index_type`` over ``embeddings`` (rows match ``ids``); ``params`` as in
        :func:`default_index_params` (``m``, ``ef_construction``, ``ef_search``, ``nlist``, ``pq_m``, ...)."""
        _require_faiss()
        import time

        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or len(ids) != embeddings.shape[0]:
            raise ValueError(f"{len(ids)} ids for embeddings of shape {embeddings.shape}")
        if not len(ids):
            raise ValueError("cannot build an index of zero documents")
        count, dimension = embeddings.shape
        params = default_index_params(index_type, count, dimension, **params)
        if normalized is None:
            normalized = bool(np.allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-3))
        started = time.perf_counter()
        index = _new_faiss_index(index_type, dimension, params)
        if not index.is_trained:
            for clustering in (index.cp, index.pq.cp):
                clustering.seed = seed
                clustering.min_points_per_centroid = 1  # small corpora: train anyway, without a warning per k-means
            index.train(embeddings)
        index.add(embeddings)
        _apply_search_params(index, index_type, params)
        info = {
            "format": INDEX_FORMAT,
            "model": model,
            "dimension": int(dimension),
            "metric": _metric_name(index),
            "normalized": bool(normalized),
            "count": int(count),
            "type": index_type,
            "params": params,
            "build_seconds": time.perf_counter() - started,
            "faiss": getattr(faiss, "__version__", "unknown"),
        }
        return cls(index, list(ids), info)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> SearchIndex:
        _require_faiss()
        folder = Path(folder)
        for name in (INDEX_FILE, IDS_FILE, INFO_FILE):
            if not (folder / name).is_file():
                raise FileNotFoundError(
                    f"{folder} is not an index folder: {name} is missing (build one with `embeddistill index`)"
                )
        info = json.loads((folder / INFO_FILE).read_text(encoding="utf-8"))
        ids = json.loads((folder / IDS_FILE).read_text(encoding="utf-8"))
        index = faiss.read_index(str(folder / INDEX_FILE))
        if not (index.ntotal == len(ids) == info.get("count")):
            raise ValueError(
                f"{folder}: index.faiss holds {index.ntotal} vectors, ids.json {len(ids)} ids and info.json says "
                f"{info.get('count')}: an interrupted save? Rebuild the index."
            )
        if index.d != info.get("dimension"):
            raise ValueError(f"{folder}: index dimension {index.d} differs from info.json {info.get('dimension')}")
        _apply_search_params(index, info.get("type", "flat"), info.get("params", {}))
        return cls(index, ids, info)

    def save(self, folder: str | os.PathLike) -> Path:
        from embeddistill.storage import atomic_write_json, private_temp_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = private_temp_file(folder, INDEX_FILE)  # the umask's mode: a served index is read by others
        os.close(fd)
        try:
            faiss.write_index(self.index, tmp)
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, folder / INDEX_FILE)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        atomic_write_json(folder / IDS_FILE, self.ids)
        self.info["count"] = len(self.ids)
        atomic_write_json(folder / INFO_FILE, self.info)
        return folder

    # -- use ----------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dimension(self) -> int:
        return int(self.index.d)

    @property
    def type(self) -> str:
        return self.info.get("type", "flat")

    def add(self, ids: list[str], embeddings: np.ndarray) -> None:
        """Append documents without rebuilding (every type here; an IVF-PQ index keeps its trained codebooks)."""
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or embeddings.shape[0] != len(ids):
            raise ValueError(f"{len(ids)} ids for embeddings of shape {embeddings.shape}")
        if embeddings.shape[1] != self.dimension:
            raise ValueError(
                f"embeddings of dimension {embeddings.shape[1]} for an index of dimension {self.dimension}"
            )
        duplicates = [i for i in ids if i in self._id_set]
        if duplicates or len(set(ids)) != len(ids):
            raise ValueError(f"document id(s) already in the index or repeated: {duplicates[:5] or 'repeated ids'}")
        if not self.index.is_trained:  # pragma: no cover - build() always trains
            raise ValueError("the index is not trained")
        self.index.add(embeddings)
        self.ids.extend(ids)
        self._id_set.update(ids)
        self.info["count"] = len(self.ids)

    def search(self, query_embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` ``(scores, rows)`` per query, best first; missing results (k > count) have row -1."""
        queries = np.ascontiguousarray(query_embeddings, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dimension:
            raise ValueError(
                f"query embeddings of shape {queries.shape} for an index of dimension {self.dimension} "
                f"(built with {self.info.get('model') or 'an unknown model'}): is this the right query encoder?"
            )
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        return self.index.search(queries, min(k, len(self)))

    def ranked(self, query_embeddings: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """``[(doc_id, score), ...]`` best first, per query."""
        scores, rows = self.search(query_embeddings, k)
        return [
            [(self.ids[r], float(s)) for s, r in zip(scores[i], rows[i], strict=True) if r >= 0]
            for i in range(len(rows))
        ]

    def retrieve(
        self, query_ids: list[str], query_embeddings: np.ndarray, k: int, ignore_identical_ids: bool = True
    ) -> dict[str, dict[str, float]]:
        """A run ``{query_id: {doc_id: score}}``, as :meth:`FlatIndex.retrieve` (its own id is no hit of a query)."""
        ranked = self.ranked(query_embeddings, k + 1 if ignore_identical_ids else k)
        return top_k_without_self(query_ids, ranked, k, ignore_identical_ids)
