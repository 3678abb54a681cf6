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
import yaml

from embeddistill.serving.indexing import SearchIndex, top_k_without_self

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
    from embeddistill.serving.onnx_runtime import EXPORT_INFO

    if (path / EXPORT_INFO).is_file():
        from embeddistill.serving.onnx_runtime import OnnxQueryEncoder

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
        # No index (None): an embedding service only (``serve --model M`` without an index folder).
        self.index = index if isinstance(index, SearchIndex) or index is None else SearchIndex.load(index)
        self.model_name = str(model) if isinstance(model, str | os.PathLike) else type(model).__name__
        self.encoder = load_query_encoder(model, device, batch_size, trust_remote_code)
        # One encoding at a time: a torch module or an ONNX session shares its thread pool anyway, and the
        # service calls this from a worker thread.
        self._lock = threading.Lock()
        if check and self.index is not None:
            dimension = self.encode(["dimension check"]).shape[1]
            if dimension != self.index.dimension:
                raise ValueError(
                    f"the query encoder {self.model_name} embeds into {dimension} dimensions but the index "
                    f"(built with {self.index.info.get('model') or 'an unknown model'}) has {self.index.dimension}: "
                    "search it with a student of that teacher, or rebuild the index"
                )

    @property
    def info(self) -> dict:
        return self.index.info if self.index is not None else {}

    def encode(self, texts: list[str]) -> np.ndarray:
        with self._lock:
            return self.encoder.encode(list(texts))

    @property
    def has_documents(self) -> bool:
        """Whether the model embeds documents too (a sentence-transformers model; an ONNX export is queries only)."""
        return hasattr(getattr(self.encoder, "model", None), "encode_document")

    def encode_documents(self, texts: list[str]) -> np.ndarray:
        """Documents through ``encode_document``: an asymmetric student's document route (the teacher's tower), or
        the model itself with its document prompt."""
        if not self.has_documents:
            raise ValueError(f"{self.model_name} embeds queries only: it has no document side")
        encoder = self.encoder
        with self._lock:
            embeddings = encoder.model.encode_document(
                list(texts), batch_size=encoder.batch_size, convert_to_numpy=True, show_progress_bar=False
            )
        return np.asarray(embeddings, dtype=np.float32)

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

    def retrieve(
        self, queries: dict[str, str], k: int = 100, batch_size: int = 256, ignore_identical_ids: bool = True
    ) -> dict[str, dict[str, float]]:
        """A run ``{query_id: {doc_id: score}}`` (what ``data.write_trec_run`` writes); a query's own id is no hit
        unless ``ignore_identical_ids`` is off (BEIR's convention: :func:`indexing.top_k_without_self`)."""
        ids, texts = list(queries), list(queries.values())
        depth = k + 1 if ignore_identical_ids else k
        run: dict[str, dict[str, float]] = {}
        for start in range(0, len(ids), batch_size):
            hits = self.search(texts[start : start + batch_size], depth)
            run.update(top_k_without_self(ids[start : start + batch_size], hits, k, ignore_identical_ids))
        return run


def run_cache_dir(model_path: str) -> str:
    """The cache folder recorded by the run whose ``student/`` folder ``model_path`` is ("" if none is)."""
    folder = Path(model_path).expanduser()
    config = folder.resolve().parent / "config.yaml"
    if not folder.is_dir() or not config.is_file():
        return ""
    try:
        recorded = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
        return str(recorded.get("model", {}).get("cache_dir") or "")
    except (yaml.YAMLError, AttributeError, OSError) as error:
        logger.warning("%s: unreadable (%s); using the default cache folder", config, error)
        return ""


class CachedEncoder:
    """``encode_document`` / ``encode_query`` of a loaded model, from the teacher-embedding cache wherever it holds
    them, so that ``index`` and ``evaluate`` after ``distill`` encode nothing the run already encoded.

    * An asymmetric student: documents go through its document route, the teacher's tower, and are looked up in
      the cache its teacher filled (:meth:`EmbeddingCache.find_for_documents`; when none matches they are
      encoded, with a log line saying so); queries go through its small query tower, uncached (it is cheap).
    * Any other model (a teacher, a symmetric student): documents and queries through its own cache, made on
      first use, as the teacher's is during ``distill``.
    """

    def __init__(self, model, name: str, cache_dir: str | os.PathLike | None = None, batch_size: int = 32):
        from embeddistill.models.students import document_view, is_asymmetric
        from embeddistill.models.teachers import EmbeddingCache, TeacherIdentity, cache_shard_size, default_cache_dir

        self.model, self.batch_size = model.eval(), batch_size
        root = Path(cache_dir or default_cache_dir()).expanduser()
        self.asymmetric = is_asymmetric(model)
        if self.asymmetric:
            self.document_model = document_view(model)
            self.cache = EmbeddingCache.find_for_documents(root, self.document_model, cache_shard_size())
            if self.cache is None:
                logger.info("%s: no teacher-embedding cache under %s holds its document tower; encoding", name, root)
            else:
                logger.info("%s: documents from its teacher's embedding cache %s", name, self.cache.dir)
        else:
            self.document_model = model
            self.cache = EmbeddingCache(root, TeacherIdentity.of(name, model), shard_size=cache_shard_size())

    def documents(self, texts: list[str], desc: str = "corpus") -> np.ndarray:
        from embeddistill.models.encoding import DOCUMENT

        if self.cache is None:
            embeddings = self.model.encode_document(
                texts, batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=True
            )
        else:
            embeddings = self.cache.embed(self.document_model, texts, DOCUMENT, self.batch_size, desc)
        return np.asarray(embeddings, dtype=np.float32)

    def queries(self, texts: list[str], desc: str = "queries") -> np.ndarray:
        from embeddistill.models.encoding import QUERY

        if self.asymmetric:
            embeddings = self.model.encode_query(texts, batch_size=self.batch_size, convert_to_numpy=True)
        else:
            embeddings = self.cache.embed(self.model, texts, QUERY, self.batch_size, desc)
        return np.asarray(embeddings, dtype=np.float32)


def encode_corpus(
    model: str,
    corpus: dict[str, str],
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 32,
    device: str = "cpu",
    trust_remote_code: bool = False,
) -> tuple[list[str], np.ndarray]:
    """Document ids and embeddings from ``model.encode_document``, through the teacher-embedding cache
    (:class:`CachedEncoder`; by default the run's, for a run's ``student/``): a second index of the same corpus,
    or one after ``embeddistill distill`` with the teacher or its asymmetric student, encodes nothing."""
    from embeddistill.models.teachers import load_sentence_transformer

    st = load_sentence_transformer(model, device=device, trust_remote_code=trust_remote_code)
    ids, texts = list(corpus), list(corpus.values())
    return ids, CachedEncoder(st, model, cache_dir or run_cache_dir(model) or None, batch_size).documents(texts)
