"""Search a saved index with a query encoder: the Python API behind ``embeddistill index``, ``search`` and ``serve``.

The asymmetric student's promise: the teacher's document index stays, only the query side gets cheap. So an
index is built once from documents (``model.encode_document``: for an asymmetric student that *is* the
teacher's tower, for a plain teacher it is read from the teacher-embedding cache), and searched with any query
encoder that lives in the same space: the student, the teacher itself, or an ONNX export of the student.

    searcher = Searcher("runs/index", "runs/quickstart/student")
    searcher.search(["does vitamin D prevent fractures?"], k=10)  # [[Hit(id='...', score=0.71), ...]]
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np

from embeddistill.serving.indexing import SearchIndex

logger = logging.getLogger(__name__)


class Hit(NamedTuple):
    id: str
    score: float


class QueryTextEncoder(Protocol):
    def encode(self, texts: list[str]) -> np.ndarray: ...


class SentenceTransformerQueries:
    """Queries through ``model.encode_query``: the Router's query route of an asymmetric student (or the whole
    model of a symmetric one or a teacher), with the model's query prompt if it has one."""

    def __init__(self, model, batch_size: int = 64, name: str = ""):
        self.model = model.eval()
        self.batch_size = batch_size
        self.name = name

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        embeddings = self.model.encode_query(
            list(texts), batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=False
        )
        return np.asarray(embeddings, dtype=np.float32)


def load_query_encoder(
    model, device: str = "cpu", batch_size: int = 64, trust_remote_code: bool = False
) -> QueryTextEncoder:
    """A query encoder from a model path/name (sentence-transformers folder or ONNX export folder) or an object.

    An object with ``encode_query`` (a ``SentenceTransformer``) is wrapped; any other object with ``encode`` is
    used as is (e.g. :class:`embeddistill.serving.onnx.OnnxQueryEncoder`).
    """
    if hasattr(model, "encode_query"):
        return SentenceTransformerQueries(model, batch_size)
    if hasattr(model, "encode") and not isinstance(model, str | os.PathLike):
        return model
    path = Path(model).expanduser()
    from embeddistill.serving.onnx import EXPORT_INFO

    if (path / EXPORT_INFO).is_file():
        from embeddistill.serving.onnx import OnnxQueryEncoder

        return OnnxQueryEncoder(path, batch_size=batch_size)
    from embeddistill.models.teachers import load_sentence_transformer

    return SentenceTransformerQueries(
        load_sentence_transformer(str(model), device=device, trust_remote_code=trust_remote_code),
        batch_size,
        str(model),
    )


class Searcher:
    """A saved :class:`SearchIndex` plus a query encoder: ``search(texts, k)`` -> ranked ``Hit`` lists."""

    def __init__(
        self,
        index: str | os.PathLike | SearchIndex,
        model,
        *,
        device: str = "cpu",
        batch_size: int = 64,
        trust_remote_code: bool = False,
        check: bool = True,
    ):
        self.index = index if isinstance(index, SearchIndex) else SearchIndex.load(index)
        self.model_name = str(model) if isinstance(model, str | os.PathLike) else type(model).__name__
        self.encoder = load_query_encoder(model, device, batch_size, trust_remote_code)
        # One encoding at a time: a torch module or an ONNX session shares its thread pool anyway, and the
        # service calls this from a worker thread.
        self._lock = threading.Lock()
        if check:
            dimension = self.encode(["dimension check"]).shape[1]
            if dimension != self.index.dimension:
                raise ValueError(
                    f"the query encoder {self.model_name} embeds into {dimension} dimensions but the index "
                    f"(built with {self.index.info.get('model') or 'an unknown model'}) has {self.index.dimension}: "
                    "search it with a student of that teacher, or rebuild the index"
                )

    @property
    def info(self) -> dict:
        return self.index.info

    def encode(self, texts: list[str]) -> np.ndarray:
        with self._lock:
            return self.encoder.encode(list(texts))

    def search_embeddings(self, embeddings: np.ndarray, k: int) -> list[list[Hit]]:
        return [[Hit(doc_id, score) for doc_id, score in hits] for hits in self.index.ranked(embeddings, k)]

    def search(self, texts: list[str] | str, k: int = 10) -> list[list[Hit]]:
        """The top ``k`` documents of every query text, best first; a blank text is a ``ValueError`` (it has
        nothing to search for, and its "hits" would be whatever the encoder makes of padding)."""
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            return []
        blank = [number for number, text in enumerate(texts, 1) if not str(text).strip()]
        if blank:
            raise ValueError(f"query {', '.join(map(str, blank))} of {len(texts)} is blank: nothing to search for")
        return self.search_embeddings(self.encode(texts), k)

    def retrieve(self, queries: dict[str, str], k: int = 100, batch_size: int = 256) -> dict[str, dict[str, float]]:
        """A run ``{query_id: {doc_id: score}}`` (what ``data.write_trec_run`` writes)."""
        ids, texts = list(queries), list(queries.values())
        run: dict[str, dict[str, float]] = {}
        for start in range(0, len(ids), batch_size):
            hits = self.search(texts[start : start + batch_size], k)
            run.update({q: dict(h) for q, h in zip(ids[start : start + batch_size], hits, strict=True)})
        return run


def encode_corpus(
    model: str,
    corpus: dict[str, str],
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 32,
    device: str = "cpu",
    trust_remote_code: bool = False,
) -> tuple[list[str], np.ndarray]:
    """Document ids and embeddings from ``model.encode_document``.

    A plain teacher goes through the teacher-embedding cache (a second index of the same corpus, or one after
    ``embeddistill distill``, encodes nothing). An asymmetric student encodes with its document route, which is
    the teacher's tower: indexing with the teacher's own path gives the same embeddings and uses the cache.
    """
    from embeddistill.models.students import is_asymmetric
    from embeddistill.models.teachers import (
        DualEncoderTeacher,
        EmbeddingCache,
        TeacherIdentity,
        default_cache_dir,
        load_sentence_transformer,
    )

    st = load_sentence_transformer(model, device=device, trust_remote_code=trust_remote_code).eval()
    ids, texts = list(corpus), list(corpus.values())
    if is_asymmetric(st):
        logger.info("asymmetric student: encoding %d documents with its document (teacher) route", len(texts))
        embeddings = st.encode_document(texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=True)
    else:
        cache = EmbeddingCache(cache_dir or default_cache_dir(), TeacherIdentity.of(model, st))
        teacher = DualEncoderTeacher(name=model, model=st, cache=cache, batch_size=batch_size)
        embeddings = teacher.embed_documents(texts, desc="corpus")
    return ids, np.asarray(embeddings, dtype=np.float32)
