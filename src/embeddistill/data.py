"""Loading and validating retrieval data in the BEIR layout, and plain query files.

A BEIR folder holds ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl`` (``_id``, ``text``)
and ``qrels/SPLIT.tsv`` (``query-id  corpus-id  score`` with a header); a folder with ``corpus.jsonl`` alone is
accepted too (corpus-only mode: no labels, so a run trains on generated queries and is checked against the
teacher's own rankings). Every problem found while loading is
either a :class:`DataError` naming the file, the line and what is wrong, or - where skipping is safe - a
counted warning.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from embeddistill.storage import atomic_write_text

logger = logging.getLogger(__name__)

DATA_ENV = "EMBEDDISTILL_DATA"


class DataError(ValueError):
    """Bad input data, located precisely: ``file:line: problem``."""

    def __init__(self, path: str | os.PathLike, line: int | None, problem: str):
        self.path, self.line, self.problem = str(path), line, problem
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {problem}")


@dataclass
class Warnings:
    """Counts of skipped records by reason, so that a user sees what was dropped and how often."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)

    def add(self, reason: str, example: str) -> None:
        self.counts[reason] += 1
        self.examples.setdefault(reason, example)

    def log(self, source: str) -> None:
        for reason, count in self.counts.items():
            logger.warning("%s: skipped %d record(s): %s (first: %s)", source, count, reason, self.examples[reason])


def _read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, line)`` without line ends; tolerate a UTF-8 BOM and CRLF, reject bad bytes."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(path, None, "file not found") from None
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    for number, line in enumerate(raw.split(b"\n"), start=1):
        line = line.rstrip(b"\r")
        if not line.strip():
            continue
        try:
            yield number, line.decode("utf-8")
        except UnicodeDecodeError as error:
            raise DataError(path, number, f"not valid UTF-8 at byte {error.start}: {line[:60]!r}") from None


def _string_field(record: dict, key: str, path: Path, line: int, required: bool = True) -> str:
    value = record.get(key)
    if value is None:
        if required:
            raise DataError(path, line, f"missing field {key!r}")
        return ""
    if isinstance(value, int | float) and key == "_id" and not isinstance(value, bool):
        return str(value)  # numeric ids are common in the wild and unambiguous
    if not isinstance(value, str):
        raise DataError(path, line, f"field {key!r} must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(path, line, f"field {key!r} holds an unpaired surrogate escape (not encodable text)") from None
    return value


def read_jsonl_records(path: Path) -> Iterator[tuple[int, dict]]:
    for number, line in _read_lines(path):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(path, number, f"malformed JSON ({error.msg} at column {error.colno})") from None
        except ValueError as error:  # e.g. an integer beyond Python's digit limit
            raise DataError(path, number, f"malformed JSON ({error})") from None
        if not isinstance(record, dict):
            raise DataError(path, number, f"expected a JSON object, got {type(record).__name__}")
        yield number, record


def load_corpus(path: str | os.PathLike) -> dict[str, str]:
    """Load ``corpus.jsonl`` as ``{doc_id: "title text"}`` (the sentence-transformers BEIR convention)."""
    path = Path(path)
    corpus: dict[str, str] = {}
    first_line: dict[str, int] = {}
    skipped = Warnings()
    for number, record in read_jsonl_records(path):
        doc_id = _string_field(record, "_id", path, number)
        text = _string_field(record, "text", path, number)
        title = _string_field(record, "title", path, number, required=False)
        if not doc_id.strip():
            raise DataError(path, number, "empty '_id'")
        if doc_id in corpus:
            raise DataError(path, number, f"duplicate document id {doc_id!r} (first on line {first_line[doc_id]})")
        full = f"{title.strip()} {text.strip()}".strip()
        if not full:
            skipped.add("empty document (no title and no text)", f"line {number}, id {doc_id!r}")
            continue
        corpus[doc_id] = full
        first_line[doc_id] = number
    skipped.log(str(path))
    if not corpus:
        raise DataError(path, None, "the corpus holds no documents")
    return corpus


def load_queries(path: str | os.PathLike) -> dict[str, str]:
    """Load queries from ``.jsonl`` (``_id``, ``text``) or ``.tsv`` (``id<TAB>text``, no header)."""
    path = Path(path)
    if path.suffix == ".tsv":
        records = _tsv_query_records(path)
    elif path.suffix in (".jsonl", ".json"):
        records = (
            (n, _string_field(r, "_id", path, n), _string_field(r, "text", path, n))
            for n, r in read_jsonl_records(path)
        )
    else:
        raise DataError(path, None, f"unknown query file format {path.suffix!r}: use .jsonl (_id, text) or .tsv")
    queries: dict[str, str] = {}
    first_line: dict[str, int] = {}
    skipped = Warnings()
    for number, query_id, text in records:
        if query_id in queries:
            raise DataError(path, number, f"duplicate query id {query_id!r} (first on line {first_line[query_id]})")
        if not text.strip():
            skipped.add("empty query text", f"line {number}, id {query_id!r}")
            continue
        queries[query_id] = text.strip()
        first_line[query_id] = number
    skipped.log(str(path))
    if not queries:
        raise DataError(path, None, "the file holds no queries")
    return queries


def load_query_sources(path: str | os.PathLike) -> dict[str, str]:
    """``{query_id: source_id}`` for generated-query files (``.jsonl`` rows with a ``source_id``)."""
    path = Path(path)
    if path.suffix != ".jsonl":
        return {}
    return {
        _string_field(r, "_id", path, n): r["source_id"]
        for n, r in read_jsonl_records(path)
        if isinstance(r.get("source_id"), str)
    }


def _tsv_query_records(path: Path) -> Iterator[tuple[int, str, str]]:
    for number, line in _read_lines(path):
        parts = line.split("\t")
        if len(parts) < 2:
            raise DataError(path, number, "expected 'id<TAB>text' (a .tsv query file)")
        if number == 1 and parts[0].strip().lower() in ("id", "_id", "query-id", "qid"):
            continue  # tolerate a header line
        yield number, parts[0].strip(), "\t".join(parts[1:])


def load_qrels(path: str | os.PathLike) -> dict[str, dict[str, int]]:
    """Load ``qrels/SPLIT.tsv`` (``query-id  corpus-id  score``, header optional) as nested dicts."""
    path = Path(path)
    qrels: dict[str, dict[str, int]] = {}
    for number, line in _read_lines(path):
        parts = line.split("\t") if "\t" in line else line.split()
        if number == 1 and parts[0] == "query-id":
            continue
        if len(parts) == 4:  # TREC qrels: qid 0 docid rel
            parts = [parts[0], parts[2], parts[3]]
        if len(parts) != 3:
            raise DataError(path, number, f"expected 3 columns 'query-id corpus-id score', got {len(parts)}")
        query_id, doc_id, score = (part.strip() for part in parts)
        try:
            relevance = int(float(score))
        except (ValueError, OverflowError):  # OverflowError: "inf", "1e999"
            raise DataError(path, number, f"relevance score {score!r} is not a number") from None
        qrels.setdefault(query_id, {})[doc_id] = relevance
    return qrels


@dataclass
class RetrievalDataset:
    """A BEIR-layout dataset: a corpus, queries, and relevance judgements per split."""

    name: str
    path: Path
    corpus: dict[str, str]
    queries: dict[str, str]

    @classmethod
    def load(cls, name_or_path: str) -> RetrievalDataset:
        """Load a BEIR folder. A corpus alone is a dataset too (corpus-only mode: ``queries`` is empty), but a
        folder with judgements and no ``queries.jsonl`` is broken: the judgements would name unknown queries."""
        path = resolve_dataset(name_or_path)
        logger.info("loading dataset %s from %s", name_or_path, path)
        queries_path = path / "queries.jsonl"
        if not queries_path.exists() and _qrels_files(path):
            raise DataError(queries_path, None, "file not found (a BEIR folder with qrels/ needs queries.jsonl)")
        corpus = load_corpus(path / "corpus.jsonl")
        queries = load_queries(queries_path) if queries_path.exists() else {}
        return cls(name=Path(name_or_path).name, path=path, corpus=corpus, queries=queries)

    def splits(self) -> list[str]:
        return sorted(p.stem for p in _qrels_files(self.path))

    @property
    def has_labels(self) -> bool:
        """Whether the folder holds any judgements (``qrels/*.tsv``); without them a run is label-free."""
        return bool(_qrels_files(self.path))

    def qrels(self, split: str) -> dict[str, dict[str, int]]:
        """Judgements of ``split``, restricted to known queries and documents (dropped ones are counted)."""
        qrels_path = self.path / "qrels" / f"{split}.tsv"
        if not qrels_path.exists():
            raise DataError(qrels_path, None, f"no qrels for split {split!r}; available splits: {self.splits()}")
        skipped = Warnings()
        kept: dict[str, dict[str, int]] = {}
        for query_id, judged in load_qrels(qrels_path).items():
            if query_id not in self.queries:
                skipped.add("qrel for an unknown query id", query_id)
                continue
            for doc_id, relevance in judged.items():
                if doc_id not in self.corpus:
                    skipped.add("qrel for an unknown document id", f"{query_id} -> {doc_id}")
                    continue
                kept.setdefault(query_id, {})[doc_id] = relevance
        skipped.log(str(qrels_path))
        if not kept:
            raise DataError(qrels_path, None, "no usable judgements (every qrel names an unknown query or document)")
        return kept

    def split_queries(self, split: str) -> dict[str, str]:
        """The queries judged in ``split``."""
        return {query_id: self.queries[query_id] for query_id in self.qrels(split)}


def _qrels_files(path: Path) -> list[Path]:
    return sorted((path / "qrels").glob("*.tsv"))


def dataset_search_paths(name: str) -> list[Path]:
    """Where ``--dataset NAME`` is looked for, in order."""
    candidates = [Path(name)]
    if os.environ.get(DATA_ENV):
        candidates.append(Path(os.environ[DATA_ENV]) / name)
    return candidates


def resolve_dataset(name: str) -> Path:
    """The BEIR folder of ``--dataset NAME``: a folder, ``$EMBEDDISTILL_DATA/NAME``, else a Hugging Face hub dataset
    of that name (``mteb/NAME``, ``BeIR/NAME``: :mod:`embeddistill.hub`), converted once into a local folder."""
    candidates = dataset_search_paths(name)
    for candidate in candidates:
        if (candidate / "corpus.jsonl").is_file():
            return candidate.resolve()
    from embeddistill.hub import HubDatasetError, fetch_dataset, hub_candidates

    hub_problem = ""
    if hub_candidates(name) and not Path(name).exists():
        try:
            return fetch_dataset(name)
        except HubDatasetError as error:
            hub_problem = f"\n{error}"
    looked = "\n  ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"dataset {name!r} not found: no corpus.jsonl in any of\n  {looked}{hub_problem}\n"
        f"Point at a BEIR-layout folder (--dataset /path/to/folder), or set ${DATA_ENV} to the folder that holds "
        f"{name}/."
    )


def write_queries_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def write_trec_run(path: str | os.PathLike, run: dict[str, dict[str, float]], tag: str) -> None:
    """Write a TREC run file (``qid Q0 docid rank score tag``), ranked by score."""
    lines = []
    for query_id, scores in run.items():
        ranked = sorted(scores.items(), key=lambda item: -item[1])
        lines += [f"{query_id} Q0 {doc} {rank} {score:.6f} {tag}" for rank, (doc, score) in enumerate(ranked, 1)]
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def read_trec_run(path: str | os.PathLike) -> dict[str, dict[str, float]]:
    run: dict[str, dict[str, float]] = {}
    path = Path(path)
    for number, line in _read_lines(path):
        row = line.split()
        if len(row) != 6:
            raise DataError(path, number, "expected 6 columns 'qid Q0 docid rank score tag'")
        try:
            run.setdefault(row[0], {})[row[2]] = float(row[4])
        except ValueError:
            raise DataError(path, number, f"score {row[4]!r} is not a number") from None
    return run
