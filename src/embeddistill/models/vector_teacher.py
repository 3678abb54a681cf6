"""A teacher you only have vectors of: its document embeddings, aligned to corpus ids, and its query embeddings
from an endpoint (:class:`~embeddistill.models.api_teacher.ApiTeacher`) or a file aligned to query ids.

``--teacher-documents`` (and ``--teacher-queries``) accept:

* ``NAME.npy`` (``[n, dim]`` float) with the ids one per line in ``NAME.ids.txt`` or ``NAME.txt`` (or a JSON list
  in ``NAME.ids.json``), row ``i`` being id ``i``'s vector;
* ``NAME.parquet`` with an ``id`` column and an ``embedding`` column (a list of floats per row);
* an index folder written by ``embeddistill index`` (``index.faiss`` + ``ids.json``): its vectors are read back
  (exactly for flat and HNSW indexes; an IVF-PQ index gives its compressed approximations).

A corpus document without a vector is an error (the student is trained and evaluated against that index); so is
a query without one when the queries come from a file: generated queries (crops, perturbations) need an endpoint,
or ``--crops-per-document 0 --perturbations-per-query 0``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


def load_vectors(path: str | Path, option: str = "--teacher-documents") -> tuple[list[str], np.ndarray]:
    """``(ids, vectors)`` of a vectors file or index folder (see the module's docstring)."""
    path = Path(path).expanduser()
    if path.is_dir():
        ids, vectors = _index_folder(path)
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        missing = {"id", "embedding"} - set(table.column_names)
        if missing:
            raise ValueError(f"{option} {path}: needs columns 'id' and 'embedding', lacks {sorted(missing)}")
        ids = [str(i) for i in table.column("id").to_pylist()]
        vectors = np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)
    elif path.suffix == ".npy":
        ids = _ids_beside(path, option)
        vectors = np.load(path, allow_pickle=False).astype(np.float32)
    else:
        raise ValueError(f"{option} {path}: expected a .npy (with ids beside it), a .parquet or an index folder")
    if vectors.ndim != 2 or len(ids) != vectors.shape[0]:
        raise ValueError(f"{option} {path}: {len(ids)} ids for vectors of shape {vectors.shape}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{option} {path}: ids are not unique")
    return ids, vectors


def _ids_beside(path: Path, option: str) -> list[str]:
    for candidate in (path.with_suffix(".ids.txt"), path.with_suffix(".txt"), path.with_suffix(".ids.json")):
        if candidate.is_file():
            text = candidate.read_text(encoding="utf-8")
            if candidate.suffix == ".json":
                return [str(i) for i in json.loads(text)]
            return [line for line in text.splitlines() if line.strip()]
    raise ValueError(f"{option} {path}: no ids file beside it ({path.stem}.ids.txt, {path.stem}.txt or .ids.json)")


def _index_folder(folder: Path) -> tuple[list[str], np.ndarray]:
    import faiss

    ids = [str(i) for i in json.loads((folder / "ids.json").read_text(encoding="utf-8"))]
    index = faiss.read_index(str(folder / "index.faiss"))
    try:
        ivf = faiss.extract_index_ivf(index)
        ivf.make_direct_map()
    except RuntimeError:
        pass  # not an IVF index: flat and HNSW reconstruct as they are
    return ids, np.asarray(index.reconstruct_n(0, index.ntotal), dtype=np.float32)


class VectorLookup:
    """Vectors by id, looked up by text through the dataset's ``{id: text}``: what the lane asks the teacher for."""

    def __init__(self, ids: list[str], vectors: np.ndarray, texts_by_id: dict[str, str], what: str, option: str):
        row = {doc_id: i for i, doc_id in enumerate(ids)}
        self.vectors = vectors
        self.what, self.option = what, option
        self.row_of_text: dict[str, int] = {}
        for item_id, text in texts_by_id.items():
            if item_id in row:
                self.row_of_text.setdefault(text, row[item_id])

    def get(self, texts: list[str]) -> np.ndarray:
        missing = [t for t in texts if t not in self.row_of_text]
        if missing:
            raise ValueError(
                f"{self.option}: {len(missing)} of {len(texts)} {self.what} have no vector (first: {missing[0][:80]!r})"
                + ("; generated queries need an endpoint (--teacher URL) or --crops-per-document 0 "
                   "--perturbations-per-query 0" if self.what == "queries" else "")
            )  # fmt: skip
        return self.vectors[[self.row_of_text[t] for t in texts]]


class VectorTeacher:
    """Given document vectors (and query vectors from a file, or an endpoint for the queries)."""

    model = None

    def __init__(self, documents: VectorLookup, queries: VectorLookup | None = None, endpoint=None, name: str = ""):
        self.documents, self.queries, self.endpoint = documents, queries, endpoint
        self.name = name
        self.stats = endpoint.stats if endpoint is not None else None
        norms = np.linalg.norm(documents.vectors[:1000], axis=1)
        self.normalized = bool(np.allclose(norms, 1.0, atol=1e-3))
        self.dimension = int(documents.vectors.shape[1])

    @classmethod
    def of(cls, config, dataset, endpoint=None) -> VectorTeacher:
        """From the run's options: ``--teacher-documents`` over the corpus, ``--teacher-queries`` over the queries."""
        api = config.api
        ids, vectors = load_vectors(api.teacher_documents)
        documents = VectorLookup(ids, vectors, dataset.corpus, "documents", "--teacher-documents")
        queries = None
        if api.teacher_queries:
            query_ids, query_vectors = load_vectors(api.teacher_queries, "--teacher-queries")
            queries = VectorLookup(query_ids, query_vectors, dataset.queries, "queries", "--teacher-queries")
        logger.info("teacher: %d document vectors of dim %d from %s", len(ids), vectors.shape[1], api.teacher_documents)
        return cls(documents, queries, endpoint, name=api.teacher_documents)

    def embed_documents(self, texts: list[str], desc: str = "documents") -> np.ndarray:
        return self.documents.get(texts)

    def embed_queries(self, texts: list[str], desc: str = "queries") -> np.ndarray:
        if self.queries is not None:
            return self.queries.get(texts)
        return self.endpoint.embed_queries(texts, desc)
