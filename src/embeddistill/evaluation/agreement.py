"""Label-free validation: how closely the student reproduces the teacher's own rankings on held-out queries.

No relevance labels are needed. For a seeded slice of the training queries (held out of training), the teacher's
top ``k`` documents are graded judgements (the teacher's first gets ``k``, its ``k``-th gets 1), and the student
is scored with nDCG@k against them (``agreement_nDCG@10``). The mean cosine between the student's and the
teacher's query embeddings (``query_cosine``) is reported beside it, and, where the held-out queries are of
several kinds (``groups``: real and generated, say), the agreement on each kind (``agreement_nDCG@10_real``...):
a student can come to agree with the teacher on generated queries while it drifts on real ones.

An asymmetric student is ranked over the teacher's whole corpus index. A symmetric student's document embeddings
change as it trains, and embedding the whole corpus at every check would cost as much as a training epoch on a
large corpus, so it ranks a fixed pool instead: the union of the teacher's top ``pool_depth`` documents of every
held-out query, plus ``distractors`` documents drawn at random from the rest of the corpus. The top documents hold
every judged document and the teacher's near misses; the random ones stand for the rest of the corpus, whose
documents the student may wrongly pull up once it embeds them itself (a pool of top documents alone cannot see that).

Shapes: ``Q`` held-out queries, ``N`` corpus documents, ``P`` pool documents, ``D`` the teacher's dimension.
"""

from __future__ import annotations

import numpy as np
import torch

from embeddistill.models.encoding import DOCUMENT, encode
from embeddistill.models.students import QueryEncoder, query_modules, searches_teacher_documents

AGREEMENT_METRIC = "agreement_nDCG@10"


def teacher_judgements(teacher_scores: np.ndarray, k: int) -> np.ndarray:
    """``[Q, k]`` column indices of the teacher's top ``k`` per row, best first (``teacher_scores``: ``[Q, N]``)."""
    k = min(k, teacher_scores.shape[1])
    top = np.argpartition(-teacher_scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(teacher_scores, top, axis=1), axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1)


def agreement_ndcg(student_scores: np.ndarray, judged: np.ndarray) -> np.ndarray:
    """Per-query nDCG@k of the student's ranking against the teacher's graded top ``k``.

    ``student_scores``: ``[Q, N]``; ``judged``: ``[Q, k]`` from :func:`teacher_judgements`. The document at the
    teacher's rank ``r`` (0-based) has gain ``k - r``; DCG uses ``gain / log2(rank + 2)`` over the student's top k.
    Returns ``[Q]`` values in [0, 1]; 1 means the student's top k is the teacher's, in the teacher's order.
    """
    q, k = judged.shape
    student_top = teacher_judgements(student_scores, k)  # the same top-k selection, on the student's scores
    gains = np.zeros(student_scores.shape, dtype=np.float64)
    np.put_along_axis(gains, judged, np.arange(k, 0, -1, dtype=np.float64)[None, :].repeat(q, 0), axis=1)
    discounts = 1.0 / np.log2(np.arange(k) + 2.0)
    dcg = (np.take_along_axis(gains, student_top, axis=1) * discounts).sum(axis=1)
    ideal = (np.arange(k, 0, -1, dtype=np.float64) * discounts).sum()
    return dcg / ideal


class TeacherAgreement:
    """Scores a student against the teacher on held-out queries (see the module docstring)."""

    def __init__(
        self,
        texts: list[str],
        teacher_queries: np.ndarray,
        teacher_documents: np.ndarray,
        document_texts: list[str],
        k: int = 10,
        pool_depth: int = 30,
        distractors: int = 2000,
        seed: int = 0,
        groups: dict[str, np.ndarray] | None = None,
    ):
        if not texts:
            raise ValueError("label-free validation needs at least one held-out query")
        self.texts, self.k = texts, k
        # [Q] boolean masks by kind; a kind with no query, or the only kind there is, adds nothing to report.
        self.groups = {name: mask for name, mask in (groups or {}).items() if 0 < mask.sum() < len(texts)}
        self.teacher_queries = teacher_queries.astype(np.float32)
        self.teacher_documents = teacher_documents.astype(np.float32)
        teacher_scores = self.teacher_queries @ self.teacher_documents.T
        self.judged = teacher_judgements(teacher_scores, k)
        # The symmetric pool: every query's top pool_depth; judged columns re-indexed into it.
        top = np.unique(teacher_judgements(teacher_scores, max(k, pool_depth)))
        rest = np.setdiff1d(np.arange(len(document_texts)), top)
        drawn = np.random.default_rng(seed).choice(rest, min(distractors, len(rest)), replace=False)
        self.pool = np.union1d(top, drawn)
        self.pool_texts = [document_texts[i] for i in self.pool]
        self.pool_judged = np.searchsorted(self.pool, self.judged)

    @torch.no_grad()
    def score(self, student) -> dict[str, float]:
        """``{"agreement_nDCG@10": mean over queries, "query_cosine": mean}`` for ``student`` as it is now."""
        tower = query_modules(student)  # the trainer puts only this in training mode
        was_training = tower.training
        student.eval()
        try:
            queries = QueryEncoder.of(student).encode(self.texts)
            if searches_teacher_documents(student):
                per_query = agreement_ndcg(queries @ self.teacher_documents.T, self.judged)
            else:
                # The fast encoding path: through encode_document, the checks of a symmetric run on the MS MARCO
                # pool (~10^4 pool documents, 8 checks) took about 40% of its training time on an H200.
                pool = encode(student, self.pool_texts, DOCUMENT, batch_size=128)
                per_query = agreement_ndcg(queries @ pool.T, self.pool_judged)
        finally:
            tower.train(was_training)
        cosine = _row_cosine(queries, self.teacher_queries)
        scores = {AGREEMENT_METRIC: float(per_query.mean()), "query_cosine": float(cosine.mean())}
        for name, mask in self.groups.items():
            scores[f"{AGREEMENT_METRIC}_{name}"] = float(per_query[mask].mean())
        return scores


def _row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(norms, 1e-12)
