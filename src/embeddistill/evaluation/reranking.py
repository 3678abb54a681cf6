"""Reranking a first-stage run with a cross-encoder (``embeddistill evaluate --reranker``).

Lives with evaluation because it turns one run into another run that :func:`score_run` then scores; the CE itself
(:mod:`embeddistill.models.cross_encoders`) knows nothing about runs.
"""

from __future__ import annotations

from embeddistill.models.cross_encoders import CrossEncoderScoreCache, _PairScorer


def rerank(
    model: _PairScorer,
    run: dict[str, dict[str, float]],
    queries: dict[str, str],
    corpus: dict[str, str],
    depth: int = 100,
    batch_size: int = 64,
    cache: CrossEncoderScoreCache | None = None,
) -> dict[str, dict[str, float]]:
    """Rescore each query's top ``depth`` documents of ``run`` with the CE; documents below ``depth`` are dropped."""
    pairs: list[tuple[str, str]] = []
    for query_id, hits in run.items():
        top = sorted(hits.items(), key=lambda item: -item[1])[:depth]
        pairs += [(query_id, doc_id) for doc_id, _ in top]
    query_texts = [queries[q] for q, _ in pairs]
    document_texts = [corpus[d] for _, d in pairs]
    if cache is not None:
        scores = cache.get(model, query_texts, document_texts, batch_size, embeddings=False).scores
    else:
        scores = model.predict(query_texts, document_texts, batch_size, show_progress=True).scores
    reranked: dict[str, dict[str, float]] = {query_id: {} for query_id in run}
    for (query_id, doc_id), score in zip(pairs, scores, strict=True):
        reranked[query_id][doc_id] = float(score)
    return reranked
