"""Retrieval quality: exact search, TREC runs and ir_measures metrics, for a student or any sentence-transformer.

Latency lives in :mod:`embeddistill.evaluation.latency`, significance in :mod:`embeddistill.evaluation.significance`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import ir_measures
import numpy as np

from embeddistill.data import RetrievalDataset, write_trec_run
from embeddistill.serving.indexing import FlatIndex
from embeddistill.storage import atomic_write_json

logger = logging.getLogger(__name__)


def score_run(
    run: dict[str, dict[str, float]], qrels: dict[str, dict[str, int]], metrics: list[str]
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Aggregate and per-query values of ``metrics`` (ir_measures names, e.g. ``nDCG@10``).

    Queries with judgements but no retrieved documents count as zero, as in trec_eval with ``-c``.
    """
    measures = [ir_measures.parse_measure(name) for name in metrics]
    per_query: dict[str, dict[str, float]] = {name: dict.fromkeys(qrels, 0.0) for name in metrics}
    names = {str(measure): name for measure, name in zip(measures, metrics, strict=True)}
    for metric in ir_measures.iter_calc(measures, qrels, run):
        if metric.query_id in qrels:
            per_query[names[str(metric.measure)]][metric.query_id] = float(metric.value)
    aggregate = {name: float(np.mean(list(values.values()))) for name, values in per_query.items()}
    return aggregate, per_query


@dataclass
class RunResult:
    """One system's evaluation on one split."""

    name: str
    run: dict[str, dict[str, float]]
    metrics: dict[str, float]
    per_query: dict[str, dict[str, float]]

    def save(self, folder: Path) -> None:
        write_trec_run(folder / f"{self.name}.trec", self.run, tag=self.name)


def evaluate_embeddings(
    name: str,
    query_ids: list[str],
    query_embeddings: np.ndarray,
    index: FlatIndex,
    qrels: dict[str, dict[str, int]],
    metrics: list[str],
    k: int,
    ignore_identical_ids: bool = True,
) -> RunResult:
    """Search ``index`` and score the run; a query's own id is no hit unless ``ignore_identical_ids`` is off."""
    run = index.retrieve(query_ids, query_embeddings, k, ignore_identical_ids)
    aggregate, per_query = score_run(run, qrels, metrics)
    logger.info("%s: %s", name, ", ".join(f"{m} {v:.4f}" for m, v in aggregate.items()))
    return RunResult(name, run, aggregate, per_query)


def evaluate_model(
    model_path: str,
    dataset: RetrievalDataset,
    split: str,
    out: Path,
    metrics: list[str],
    k: int = 100,
    batch_size: int = 32,
    trust_remote_code: bool = False,
    reranker: str = "",
    rerank_depth: int = 100,
    cache_dir: str = "",
    ignore_identical_ids: bool = True,
    prompts: tuple[str, str] = ("", ""),
    truncate_dim: int = 0,
) -> dict:
    """Evaluate any sentence-transformers model alone: encode corpus and queries, search, score, write a run.

    ``prompts`` (query, document) replace the model's own ("" keeps it, ``"none"`` removes it) and ``truncate_dim``
    keeps the first N dimensions of a Matryoshka model, as ``distill``'s ``--query-prompt`` / ``--document-prompt``
    / ``--truncate-dim`` do for a teacher: the teacher ``distill`` compared against is evaluated as it saw it.

    Embeddings come through the teacher-embedding cache (:class:`~embeddistill.serving.search.CachedEncoder`)
    under ``cache_dir``, by default the cache of the run whose ``student/`` folder ``model_path`` is (its
    ``config.yaml`` says where), else ``$EMBEDDISTILL_CACHE`` or ``~/.cache/embeddistill``: evaluating a run's
    teacher or asymmetric student after ``distill`` encodes no document again.

    With ``reranker`` (a cross-encoder), its rescoring of the model's top ``rerank_depth`` documents is evaluated
    too (``reranker.trec``, ``summary["reranker"]``), so the CE's quality is reported next to its first stage.
    A query's own id is no hit (BEIR's ``ignore_identical_ids``) unless ``ignore_identical_ids`` is off.
    """
    from embeddistill.models.teachers import effective_prompts
    from embeddistill.serving.search import CachedEncoder, run_cache_dir

    model = _load_as_distilled(model_path, trust_remote_code, prompts, truncate_dim)
    qrels = dataset.qrels(split)
    queries = {qid: dataset.queries[qid] for qid in qrels}
    doc_ids = list(dataset.corpus)
    cache_dir = cache_dir or run_cache_dir(model_path)
    logger.info("embedding %d documents and %d queries with %s", len(doc_ids), len(queries), model_path)
    encoder = CachedEncoder(model, model_path, cache_dir or None, batch_size)
    documents = encoder.documents([dataset.corpus[d] for d in doc_ids])
    query_embeddings = encoder.queries(list(queries.values()))
    result = evaluate_embeddings(
        "model", list(queries), query_embeddings, FlatIndex(documents, doc_ids), qrels, metrics, k, ignore_identical_ids
    )
    out.mkdir(parents=True, exist_ok=True)
    result.save(out)
    summary = {"model": model_path, "dataset": str(dataset.path), "split": split, "metrics": result.metrics}
    summary["ignore_identical_ids"] = ignore_identical_ids
    summary.update(prompts=effective_prompts(model), dimension=int(documents.shape[1]))
    if reranker:
        summary["reranker"] = evaluate_reranker(
            reranker, result.run, dataset, queries, qrels, metrics, rerank_depth, out, cache_dir, trust_remote_code
        )
    atomic_write_json(out / "metrics.json", summary)
    return summary


def _load_as_distilled(model_path: str, trust_remote_code: bool, prompts: tuple[str, str], truncate_dim: int):
    """The model with the prompts and Matryoshka truncation ``distill`` would have given it as a teacher."""
    from embeddistill.models.teachers import load_sentence_transformer, set_prompts, truncate_embeddings

    model = load_sentence_transformer(model_path, trust_remote_code=trust_remote_code)
    if any(prompts):
        set_prompts(model, *prompts)
    if truncate_dim:
        truncate_embeddings(model, truncate_dim)
    return model


def evaluate_reranker(
    reranker: str,
    run: dict[str, dict[str, float]],
    dataset: RetrievalDataset,
    queries: dict[str, str],
    qrels: dict[str, dict[str, int]],
    metrics: list[str],
    depth: int,
    out: Path,
    cache_dir: str = "",
    trust_remote_code: bool = False,
) -> dict:
    """Rerank ``run``'s top ``depth`` with a cross-encoder (scores cached), write ``reranker.trec``, score it."""
    from embeddistill.evaluation.reranking import rerank
    from embeddistill.models.cross_encoders import CrossEncoderScoreCache, load_cross_encoder
    from embeddistill.models.teachers import default_cache_dir
    from embeddistill.runtime import resolve_device

    model = load_cross_encoder(reranker, str(resolve_device("auto")), trust_remote_code=trust_remote_code)
    cache = CrossEncoderScoreCache.for_model(cache_dir or default_cache_dir(), model)
    started = time.perf_counter()
    reranked = rerank(model, run, queries, dataset.corpus, depth, cache=cache)
    seconds = time.perf_counter() - started
    aggregate, per_query = score_run(reranked, qrels, metrics)
    result = RunResult("reranker", reranked, aggregate, per_query)
    result.save(out)
    logger.info("reranker %s: %s", reranker, ", ".join(f"{m} {v:.4f}" for m, v in aggregate.items()))
    return {"model": reranker, "depth": depth, "metrics": aggregate, "seconds": seconds}
