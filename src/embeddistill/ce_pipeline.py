"""``embeddistill distill --cross-encoder CE``: distil a cross-encoder teacher into a dual-encoder student.

Steps: training queries as for dual-encoder teachers (labelled + generated); a first-stage dual encoder
(``--first-stage``, default ``--teacher``) retrieves every query's candidates; the CE scores each query's fixed list
(its anchor, the first stage's top ``--hard-negative-depth`` documents without labelled positives, and
``--ce-random-negatives`` random documents) once, through :class:`~embeddistill.cross_encoders.CrossEncoderScoreCache`;
a symmetric student (a CE has no document tower to keep) is trained by
:class:`~embeddistill.training.CrossEncoderDistillationTrainer`; evaluation puts the first stage alone, the CE
reranking the first stage's top ``--rerank-depth``, and the student (full retrieval in its own index) side by side,
with the student's retention relative to the CE reranker.

Embedding-matching targets (dual-pooling CEs only). The CE's query embedding ``e_q(q, d)`` depends on the document
it was paired with, and ``e_d(q, d)`` on the query; a dual-encoder student has one embedding per text, so a target
must be chosen:

* query (``--ce-query-target``): ``anchor`` (default) = ``e_q(q, anchor(q))``, the pairing with the query's positive
  (or source / top document), the pairing a relevant document would see; ``mean`` = the mean of ``e_q(q, d)`` over
  the query's candidates (renormalised for normalised CEs);
* document (``--ce-document-target``): ``mean`` (default) = the mean of ``e_d(q, d)`` over every query whose
  candidates hold ``d`` (renormalised); ``anchor`` = its pairing with a query it is the anchor of, the mean where it
  is no query's anchor.

How much the pairing matters is measured on every run and reported under ``pairing``: the mean cosine between a
query's per-candidate embeddings and their mean (1 = independent of the document), likewise for documents, and the
cosine between the anchor target and the mean target.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from embeddistill import __version__
from embeddistill.config import DistillConfig
from embeddistill.cross_encoders import CrossEncoderScoreCache, load_cross_encoder, rerank
from embeddistill.data import RetrievalDataset, write_queries_jsonl
from embeddistill.evaluation import RunResult, evaluate_embeddings, score_run
from embeddistill.indexing import FlatIndex
from embeddistill.losses import EmbedDistillLoss, LossWeights
from embeddistill.pipeline import (
    QuerySet,
    collect_training_queries,
    evaluation_qrels,
    initialise_projection,
    mine_from_teacher,
)
from embeddistill.storage import atomic_write_json, atomic_write_text
from embeddistill.students import QueryEncoder, build_student, count_parameters, is_normalized
from embeddistill.teachers import DualEncoderTeacher, default_cache_dir
from embeddistill.training import (
    CandidateScores,
    CrossEncoderDistillationTrainer,
    Documents,
    TrainingQueries,
    resolve_device,
)

logger = logging.getLogger(__name__)


def build_candidates(
    anchors: np.ndarray, positives: list[list[int]], pools: np.ndarray, n_documents: int, random_count: int, seed: int
) -> tuple[np.ndarray, int]:
    """Full candidate lists ``[anchor, pool..., random...]`` (no padding) and the pool width.

    A pool shorter than the widest (a tiny corpus) is topped up with random documents, so every row has the same
    width; random documents are never the anchor, a labelled positive or already in the row.
    """
    width = pools.shape[1]
    rng = np.random.default_rng([seed, 7])
    rows = np.empty((len(anchors), 1 + width + random_count), dtype=np.int64)
    for i, anchor in enumerate(anchors):
        taken = {int(anchor), *positives[i]}
        row = [int(anchor)] + [int(d) for d in pools[i] if d >= 0]
        taken.update(row)
        need = rows.shape[1] - len(row)
        if need > n_documents - len(taken):
            raise ValueError(
                f"the corpus has {n_documents} documents: too few for {rows.shape[1]} distinct candidates per query; "
                "lower --hard-negative-depth or --ce-random-negatives"
            )
        while need:
            for d in rng.integers(0, n_documents, size=2 * need + 4):
                if need and int(d) not in taken:
                    taken.add(int(d))
                    row.append(int(d))
                    need -= 1
        rows[i] = row
    return rows, width


def _normalize_rows(array: np.ndarray) -> np.ndarray:
    return array / np.maximum(np.linalg.norm(array, axis=1, keepdims=True), 1e-12)


def embedding_targets(
    candidates: np.ndarray,
    query_embeddings: np.ndarray,
    document_embeddings: np.ndarray,
    n_documents: int,
    query_target: str,
    document_target: str,
    normalize: bool,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Query targets ``(Q, D)``, document targets ``(n_documents, D)`` (zero for documents in no list) and the
    pairing diagnostics, from per-pair segment embeddings ``(Q, C, D)``."""
    n_queries, width, dim = query_embeddings.shape
    query_mean = query_embeddings.mean(axis=1)
    flat_docs = candidates.reshape(-1)
    flat_embeddings = document_embeddings.reshape(-1, dim)
    sums = np.zeros((n_documents, dim), dtype=np.float64)
    np.add.at(sums, flat_docs, flat_embeddings)
    counts = np.bincount(flat_docs, minlength=n_documents)
    document_mean = (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)
    if normalize:
        query_mean = _normalize_rows(query_mean)
        document_mean = _normalize_rows(document_mean) * (counts > 0)[:, None]
    query_anchor = query_embeddings[:, 0]
    queries = query_anchor if query_target == "anchor" else query_mean
    documents = document_mean.copy()
    if document_target == "anchor":
        anchor_docs = candidates[:, 0]
        first = {}
        for i, d in enumerate(anchor_docs):
            first.setdefault(int(d), i)
        for d, i in first.items():
            documents[d] = document_embeddings[i, 0]

    def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)

    pair_docs_mean = document_mean[flat_docs]
    pairing = {
        "query_vs_own_mean_cosine": float(cosine(query_embeddings, query_mean[:, None, :]).mean()),
        "query_anchor_vs_mean_cosine": float(cosine(query_anchor, query_mean).mean()),
        "document_vs_own_mean_cosine": float(cosine(flat_embeddings, pair_docs_mean)[counts[flat_docs] > 1].mean())
        if (counts > 1).any()
        else 1.0,
        "documents_with_targets": int((counts > 0).sum()),
        "mean_pairings_per_document": float(counts[counts > 0].mean()),
    }
    return queries.astype(np.float32), documents.astype(np.float32), pairing


@dataclass
class CrossEncoderPrepared:
    """Everything CE distillation needs before training."""

    config: DistillConfig
    dataset: RetrievalDataset
    eval_ids: list[str]
    eval_qrels: dict[str, dict[str, int]]
    query_set: QuerySet
    first_stage: DualEncoderTeacher
    cross_encoder: object
    cache: CrossEncoderScoreCache
    doc_ids: list[str]
    doc_texts: list[str]
    first_stage_eval: np.ndarray
    first_stage_index: FlatIndex
    anchors: np.ndarray
    positives: list[list[int]]
    targets: CandidateScores
    query_targets: np.ndarray
    document_targets: np.ndarray
    pairing: dict
    timings: dict[str, float]

    @property
    def eval_texts(self) -> list[str]:
        return [self.dataset.queries[q] for q in self.eval_ids]

    @property
    def has_embeddings(self) -> bool:
        return bool(self.cross_encoder.has_embeddings)


def prepare_cross_encoder(config: DistillConfig, out: Path) -> CrossEncoderPrepared:
    """Data, candidates from the first stage, and the CE's scores (and embedding targets) over them, cached."""
    model = config.model
    first_stage_name = model.first_stage or model.teacher
    if not first_stage_name:
        raise ValueError("--cross-encoder needs a first-stage dual encoder for the candidates: --first-stage MODEL")
    dataset = RetrievalDataset.load(config.data.dataset)
    eval_qrels = evaluation_qrels(config, dataset)
    eval_ids = sorted(eval_qrels)
    query_set = collect_training_queries(config, dataset, set(eval_ids))
    records = [
        {"_id": i, "text": t, "generated": g}
        for i, t, g in zip(query_set.ids, query_set.texts, query_set.generated, strict=True)
    ]
    write_queries_jsonl(out / "training_queries.jsonl", records)
    logger.info("training queries: %s", query_set.counts)
    device = str(resolve_device(config.training.device))

    tick = time.perf_counter()
    first_stage = DualEncoderTeacher.load(
        first_stage_name,
        cache_dir=model.cache_dir or None,
        device=device,
        batch_size=model.teacher_batch_size,
        max_seq_length=model.max_seq_length or None,
        trust_remote_code=model.trust_remote_code,
    )
    doc_ids = list(dataset.corpus)
    doc_texts = [dataset.corpus[d] for d in doc_ids]
    index = FlatIndex(first_stage.embed_documents(doc_texts, desc="corpus"), doc_ids)
    first_stage_train = first_stage.embed_queries(query_set.texts, desc="training queries")
    first_stage_eval = first_stage.embed_queries([dataset.queries[q] for q in eval_ids], desc="eval queries")
    anchors, positives, pools = mine_from_teacher(query_set, first_stage_train, index, config.loss.hard_negative_depth)
    candidates, pool_size = build_candidates(
        anchors, positives, pools, len(doc_ids), config.loss.ce_random_negatives, config.training.seed
    )
    first_stage_seconds = time.perf_counter() - tick

    tick = time.perf_counter()
    cross_encoder = load_cross_encoder(
        model.cross_encoder, device, model.cross_encoder_max_length, model.trust_remote_code
    )
    cache = CrossEncoderScoreCache.for_model(model.cache_dir or default_cache_dir(), cross_encoder)
    width = candidates.shape[1]
    pair_queries = [text for text in query_set.texts for _ in range(width)]
    pair_documents = [doc_texts[d] for d in candidates.reshape(-1)]
    outputs = cache.get(cross_encoder, pair_queries, pair_documents, model.cross_encoder_batch_size)
    scores = outputs.scores.reshape(len(query_set.texts), width)
    if cross_encoder.has_embeddings:
        dim = outputs.query_embeddings.shape[1]
        query_targets, document_targets, pairing = embedding_targets(
            candidates,
            outputs.query_embeddings.reshape(len(query_set.texts), width, dim),
            outputs.document_embeddings.reshape(len(query_set.texts), width, dim),
            len(doc_ids),
            config.loss.ce_query_target,
            config.loss.ce_document_target,
            cross_encoder.config.normalize,
        )
        logger.info("pairing dependence of the CE embeddings: %s", pairing)
    else:
        query_targets = np.zeros((len(query_set.texts), 1), dtype=np.float32)
        document_targets = np.zeros((len(doc_ids), 1), dtype=np.float32)
        pairing = {}
    timings = {"first_stage_seconds": first_stage_seconds, "cross_encoder_scoring_seconds": time.perf_counter() - tick}
    return CrossEncoderPrepared(
        config,
        dataset,
        eval_ids,
        eval_qrels,
        query_set,
        first_stage,
        cross_encoder,
        cache,
        doc_ids,
        doc_texts,
        first_stage_eval,
        index,
        anchors,
        positives,
        CandidateScores(candidates, scores, pool_size),
        query_targets,
        document_targets,
        pairing,
        timings,
    )


CE_LEARNING_RATE = 1e-3


def effective_config(config: DistillConfig, has_embeddings: bool) -> DistillConfig:
    """The settings CE distillation runs with: a symmetric student, and no EM for a CE without embeddings."""
    config = dataclasses.replace(
        config,
        model=dataclasses.replace(config.model),
        loss=dataclasses.replace(config.loss),
        training=dataclasses.replace(config.training),
    )
    if config.training.learning_rate == "auto":
        # The label-free check compares a student with a dual-encoder teacher's rankings; a CE lane has none to
        # compare with cheaply, so it keeps the learning rate its results were measured at.
        config.training.learning_rate = CE_LEARNING_RATE
    if config.model.projection_init == "auto":
        config.model.projection_init = "lstsq"  # as measured in benchmarks/results/cross_encoder.json
    if config.model.asymmetric:
        logger.warning("a cross-encoder teacher has no document tower to keep: training a symmetric student")
        config.model.asymmetric = False
    if not has_embeddings and (config.loss.query_em_weight or config.loss.document_em_weight):
        logger.warning(
            "%s is a standard cross-encoder (scores only): embedding matching is off", config.model.cross_encoder
        )
        config.loss.query_em_weight = config.loss.document_em_weight = 0.0
    return config


def temperatures(config: DistillConfig, prep: CrossEncoderPrepared, student_normalized: bool) -> tuple[float, float]:
    """Teacher: the dual-pooling CE's training temperature, 1 for a standard CE's logits; student: 0.05 when it is
    normalised (cosine scores), else 1; flags override both."""
    teacher_t = config.loss.teacher_temperature or float(prep.cross_encoder.default_temperature)
    student_t = config.loss.student_temperature or (0.05 if student_normalized else 1.0)
    return teacher_t, student_t


def train_cross_encoder_student(prep: CrossEncoderPrepared, out: Path, config: DistillConfig | None = None):
    """Build the symmetric student and distil the CE into it. Returns ``(student, training info)``."""
    config = effective_config(config or prep.config, prep.has_embeddings)
    device = str(resolve_device(config.training.device))
    Path(out).mkdir(parents=True, exist_ok=True)
    random.seed(config.training.seed)
    torch.manual_seed(config.training.seed)
    reference = prep.cross_encoder.encoder_view() if Path(prep.cross_encoder.name).is_dir() else prep.first_stage.model
    student = build_student(config.model.student, reference, False, device, config.model.trust_remote_code)
    if prep.has_embeddings and config.model.projection_init == "lstsq":
        initialise_projection(student, prep.query_targets, prep.query_set.texts, config.training.seed)
    generated = np.asarray(prep.query_set.generated, dtype=bool)
    pools = prep.targets.candidates[:, 1 : 1 + prep.targets.pool_size]
    teacher_t, student_t = temperatures(config, prep, is_normalized(student))
    loss = config.loss
    criterion = EmbedDistillLoss(
        LossWeights(
            loss.score_weight, loss.query_em_weight, loss.document_em_weight, loss.label_weight, loss.margin_mse_weight
        ),
        teacher_temperature=teacher_t,
        student_temperature=student_t,
        distance=loss.em_distance,
    )
    trainer = CrossEncoderDistillationTrainer(
        student,
        TrainingQueries(prep.query_set.texts, prep.query_targets, prep.anchors, prep.positives, pools, generated),
        Documents(prep.doc_texts, prep.document_targets),
        prep.targets,
        criterion,
        config.training,
        hard_negatives=loss.hard_negatives,
        out=out,
        freeze_word_embeddings=config.model.freeze_word_embeddings,
        dropout=config.model.student_dropout,
    )
    training = trainer.train()
    training["temperatures"] = [teacher_t, student_t]
    training["loss_weights"] = dataclasses.asdict(criterion.weights)
    return student, training


def evaluate_first_stage_and_reranker(prep: CrossEncoderPrepared) -> tuple[RunResult, RunResult, float]:
    """The first stage alone and the CE reranking its top ``rerank_depth``; returns both and the rerank seconds."""
    evaluation = prep.config.evaluation
    first = evaluate_embeddings(
        "first_stage",
        prep.eval_ids,
        prep.first_stage_eval,
        prep.first_stage_index,
        prep.eval_qrels,
        evaluation.metrics,
        max(evaluation.top_k, evaluation.rerank_depth),
    )
    tick = time.perf_counter()
    queries = {q: prep.dataset.queries[q] for q in prep.eval_ids}
    reranked = rerank(
        prep.cross_encoder,
        first.run,
        queries,
        prep.dataset.corpus,
        evaluation.rerank_depth,
        prep.config.model.cross_encoder_batch_size,
        prep.cache,
    )
    seconds = time.perf_counter() - tick
    metrics, per_query = score_run(reranked, prep.eval_qrels, evaluation.metrics)
    logger.info("cross-encoder reranker: %s", ", ".join(f"{m} {v:.4f}" for m, v in metrics.items()))
    return first, RunResult("cross_encoder", reranked, metrics, per_query), seconds


def evaluate_cross_encoder_student(prep: CrossEncoderPrepared, student, name: str = "student") -> RunResult:
    """Full retrieval with the student on both sides (its own index of the corpus)."""
    evaluation = prep.config.evaluation
    queries = QueryEncoder.of(student).encode(prep.eval_texts)
    documents = student.encode_document(prep.doc_texts, batch_size=64, convert_to_numpy=True, show_progress_bar=True)
    return evaluate_embeddings(
        name,
        prep.eval_ids,
        queries,
        FlatIndex(documents, prep.doc_ids),
        prep.eval_qrels,
        evaluation.metrics,
        evaluation.top_k,
    )


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b else float("nan")


def distill_from_cross_encoder(config: DistillConfig) -> dict:
    """The whole ``distill --cross-encoder`` run; writes the student, the three TREC runs and ``metrics.json``."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    if config.training.threads:
        torch.set_num_threads(config.training.threads)
    started = time.perf_counter()
    atomic_write_text(out / "config.yaml", config.to_yaml())
    prep = prepare_cross_encoder(config, out)
    student, training = train_cross_encoder_student(prep, out)
    student.save(str(out / "student"))
    tick = time.perf_counter()
    first, reranker, rerank_seconds = evaluate_first_stage_and_reranker(prep)
    student_result = evaluate_cross_encoder_student(prep, student)
    for result in (first, reranker, student_result):
        result.save(out)
    timings = {
        **prep.timings,
        "train_seconds": training["train_seconds"],
        "rerank_seconds": rerank_seconds,
        "evaluation_seconds": time.perf_counter() - tick,
        "total_seconds": time.perf_counter() - started,
    }
    summary = {
        "dataset": str(prep.dataset.path),
        "eval_split": config.data.eval_split,
        "eval_queries": len(prep.eval_ids),
        "first_stage": {"model": config.model.first_stage or config.model.teacher, **first.metrics},
        "cross_encoder": {
            "model": config.model.cross_encoder,
            "kind": prep.cross_encoder.settings()["kind"],
            "rerank_depth": config.evaluation.rerank_depth,
            **reranker.metrics,
        },
        "student": {
            "model": config.model.student,
            "asymmetric": False,
            **student_result.metrics,
            "parameters": count_parameters(student),
        },
        "retention_vs_cross_encoder": {
            m: _ratio(student_result.metrics[m], reranker.metrics[m]) for m in reranker.metrics
        },
        "retention_vs_first_stage": {m: _ratio(student_result.metrics[m], first.metrics[m]) for m in first.metrics},
        "pairing": prep.pairing,
        "candidates_per_query": int(prep.targets.candidates.shape[1]),
        "training_queries": prep.query_set.counts,
        "training": training,
        "timings": timings,
        "environment": {
            "embeddistill": __version__,
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        },
    }
    atomic_write_json(out / "metrics.json", summary)
    return summary


def report_table(summary: dict) -> str:
    """Markdown: first stage, CE reranker and student, with the student's retention relative to the reranker."""
    metrics = list(summary["retention_vs_cross_encoder"])
    depth = summary["cross_encoder"]["rerank_depth"]
    rows = [
        ("first stage", summary["first_stage"]),
        (f"cross-encoder reranker (top {depth})", summary["cross_encoder"]),
        ("student", summary["student"]),
    ]
    lines = ["| | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    lines += [f"| {name} | " + " | ".join(f"{system[m]:.4f}" for m in metrics) + " |" for name, system in rows]
    lines.append(
        "| student / cross-encoder | "
        + " | ".join(f"{100 * summary['retention_vs_cross_encoder'][m]:.1f}%" for m in metrics)
        + " |"
    )
    return "\n".join(lines)
