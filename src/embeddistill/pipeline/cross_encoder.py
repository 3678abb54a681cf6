"""The cross-encoder lane of ``embeddistill distill --cross-encoder CE``: a CE teacher into a dual-encoder student.

Steps: training queries as for dual-encoder teachers (labelled + generated); a first-stage dual encoder
(``--first-stage``, default ``--teacher``) retrieves every query's candidates; the CE scores each query's fixed list
(its anchor, the first stage's top ``--hard-negative-depth`` documents without labelled positives, and
``--ce-random-negatives`` random documents) once, through
:class:`~embeddistill.models.cross_encoders.CrossEncoderScoreCache`;
a symmetric student (a CE has no document tower to keep) is trained by
:class:`~embeddistill.training.distillation.CrossEncoderDistillationTrainer`; evaluation puts the first stage
alone, the CE reranking the first stage's top ``--rerank-depth``, and the student (full retrieval in its own
index) side by side, with the student's retention relative to the CE reranker. Everything but the targets comes from
:mod:`embeddistill.pipeline.stages`, so a CE run writes what a dual-encoder run writes (``report.md``, the model
card, ``metrics.json`` with CPU latency), plus the first stage's and the reranker's TREC runs.

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
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embeddistill.config import DistillConfig, resolve_student_recipe
from embeddistill.data import RetrievalDataset
from embeddistill.evaluation.metrics import RunResult, score_run
from embeddistill.evaluation.reranking import rerank
from embeddistill.models.cross_encoders import CrossEncoderScoreCache, PairScores, load_cross_encoder
from embeddistill.models.students import QueryEncoder, build_student, count_parameters, is_normalized
from embeddistill.models.teachers import DualEncoderTeacher, default_cache_dir
from embeddistill.pipeline.stages import (
    QuerySet,
    collect_training_queries,
    described,
    device_of,
    evaluate_queries,
    evaluation_qrels,
    initialise_projection,
    load_dual_encoder,
    make_criterion,
    mine_from_teacher,
    query_latency,
    start_run,
    student_index,
    teacher_query_encoder,
    unit_rows,
    write_outputs,
    write_training_queries,
)
from embeddistill.pipeline.summary import CrossEncoderParts, Environment, RunSummary, System, ratios, speedup
from embeddistill.runtime import seed_everything
from embeddistill.serving.indexing import FlatIndex
from embeddistill.storage import honour_umask
from embeddistill.training.batching import CandidateScores, Documents, TrainingQueries
from embeddistill.training.distillation import CrossEncoderDistillationTrainer
from embeddistill.training.merging import merge_with_start, resolved_start_weight, snapshot

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
        query_mean = unit_rows(query_mean)
        document_mean = unit_rows(document_mean) * (counts > 0)[:, None]
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


@dataclass
class _FirstStage:
    """The first stage's part of preparation: its model, index, evaluation embeddings and mined candidates."""

    model: DualEncoderTeacher
    index: FlatIndex
    eval_embeddings: np.ndarray
    anchors: np.ndarray
    positives: list[list[int]]
    candidates: np.ndarray
    pool_size: int
    seconds: float


def _first_stage(config: DistillConfig, dataset: RetrievalDataset, query_set: QuerySet, eval_ids, doc_ids, doc_texts):
    """Embed with the first-stage dual encoder and mine every query's candidate list from its top documents."""
    name = config.ce.first_stage or config.model.teacher
    if not name:
        raise ValueError("--cross-encoder needs a first-stage dual encoder for the candidates: --first-stage MODEL")
    tick = time.perf_counter()
    model = load_dual_encoder(config, name)
    index = FlatIndex(model.embed_documents(doc_texts, desc="corpus"), doc_ids)
    train = model.embed_queries(query_set.texts, desc="training queries")
    evaluation = model.embed_queries([dataset.queries[q] for q in eval_ids], desc="eval queries")
    anchors, positives, pools = mine_from_teacher(query_set, train, index, config.loss.hard_negative_depth)
    candidates, pool_size = build_candidates(
        anchors, positives, pools, len(doc_ids), config.ce.ce_random_negatives, config.training.seed
    )
    seconds = time.perf_counter() - tick
    return _FirstStage(model, index, evaluation, anchors, positives, candidates, pool_size, seconds)


def _score_candidates(config: DistillConfig, cross_encoder, cache, query_set: QuerySet, stage, doc_texts):
    """The CE's outputs for every (query, candidate) pair, through the score cache."""
    width = stage.candidates.shape[1]
    pair_queries = [text for text in query_set.texts for _ in range(width)]
    pair_documents = [doc_texts[d] for d in stage.candidates.reshape(-1)]
    return cache.get(cross_encoder, pair_queries, pair_documents, config.ce.cross_encoder_batch_size)


def _targets(config: DistillConfig, cross_encoder, outputs: PairScores, stage: _FirstStage, n_documents: int):
    """Query and document embedding-matching targets and the pairing diagnostics (zeros for a scores-only CE)."""
    n_queries, width = stage.candidates.shape
    if not cross_encoder.has_embeddings:
        empty = np.zeros((n_queries, 1), dtype=np.float32), np.zeros((n_documents, 1), dtype=np.float32)
        return (*empty, {})
    dim = outputs.query_embeddings.shape[1]
    query_targets, document_targets, pairing = embedding_targets(
        stage.candidates,
        outputs.query_embeddings.reshape(n_queries, width, dim),
        outputs.document_embeddings.reshape(n_queries, width, dim),
        n_documents,
        config.ce.ce_query_target,
        config.ce.ce_document_target,
        cross_encoder.config.normalize,
    )
    logger.info("pairing dependence of the CE embeddings: %s", pairing)
    return query_targets, document_targets, pairing


def prepare_cross_encoder(config: DistillConfig, out: Path) -> CrossEncoderPrepared:
    """Data, candidates from the first stage, and the CE's scores (and embedding targets) over them, cached."""
    resolve_student_recipe(config)  # done already by distill(); a caller of the stages alone gets the same recipe
    dataset = RetrievalDataset.load(config.data.dataset)
    eval_qrels = evaluation_qrels(config, dataset)
    if not eval_qrels:  # its report compares the CE with its first stage on judged queries; there is no label-free one
        raise ValueError(f"cross-encoder distillation needs judged evaluation queries; {dataset.path} has none")
    eval_ids = sorted(eval_qrels)
    query_set = collect_training_queries(config, dataset, set(eval_ids))
    write_training_queries(out, query_set)
    logger.info("training queries: %s", query_set.counts)
    doc_ids = list(dataset.corpus)
    doc_texts = [dataset.corpus[d] for d in doc_ids]
    stage = _first_stage(config, dataset, query_set, eval_ids, doc_ids, doc_texts)
    tick = time.perf_counter()
    model = config.model
    cross_encoder = load_cross_encoder(
        config.ce.cross_encoder, device_of(config), config.ce.cross_encoder_max_length, model.trust_remote_code
    )
    cache = CrossEncoderScoreCache.for_model(model.cache_dir or default_cache_dir(), cross_encoder)
    outputs = _score_candidates(config, cross_encoder, cache, query_set, stage, doc_texts)
    scores = outputs.scores.reshape(stage.candidates.shape)
    query_targets, document_targets, pairing = _targets(config, cross_encoder, outputs, stage, len(doc_ids))
    timings = {"first_stage_seconds": stage.seconds, "cross_encoder_scoring_seconds": time.perf_counter() - tick}
    return CrossEncoderPrepared(
        config, dataset, eval_ids, eval_qrels, query_set, stage.model, cross_encoder, cache, doc_ids, doc_texts,
        stage.eval_embeddings, stage.index, stage.anchors, stage.positives,
        CandidateScores(stage.candidates, scores, stage.pool_size), query_targets, document_targets, pairing, timings,
    )  # fmt: skip


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
        # The label-free check compares a student with a dual-encoder teacher's rankings; this lane has none to
        # compare with cheaply, so it keeps the learning rate its results were measured at.
        config.training.learning_rate = CE_LEARNING_RATE
    if config.training.start_weight == "auto":
        config.training.start_weight = 0.0  # its results (cross_encoder.json) were measured without averaging
    if config.model.projection_init == "auto":
        config.model.projection_init = "lstsq"  # as measured in benchmarks/results/cross_encoder.json
    if config.model.asymmetric is True:  # asked for ('auto' is symmetric here)
        logger.warning("a cross-encoder teacher has no document tower to keep: training a symmetric student")
    config.model.asymmetric = False
    if not has_embeddings and (config.loss.query_em_weight or config.loss.document_em_weight):
        logger.warning(
            "%s is a standard cross-encoder (scores only): embedding matching is off", config.ce.cross_encoder
        )
        config.loss.query_em_weight = config.loss.document_em_weight = 0.0
    return config


def temperatures(config: DistillConfig, prep: CrossEncoderPrepared, student_normalized: bool) -> tuple[float, float]:
    """Teacher: the dual-pooling CE's training temperature, 1 for a standard CE's logits; student: 0.05 when it is
    normalised (cosine scores), else 1; flags override both."""
    teacher_t = config.loss.teacher_temperature or float(prep.cross_encoder.default_temperature)
    student_t = config.loss.student_temperature or (0.05 if student_normalized else 1.0)
    return teacher_t, student_t


def _initialised_student(prep: CrossEncoderPrepared, config: DistillConfig):
    """A symmetric student from the CE's own encoder (a local CE) or the first stage, projection fitted if any."""
    reference = prep.cross_encoder.encoder_view() if Path(prep.cross_encoder.name).is_dir() else prep.first_stage.model
    student = build_student(config.model.student, reference, False, device_of(config), config.model.trust_remote_code)
    if prep.has_embeddings and config.model.projection_init == "lstsq":
        initialise_projection(student, prep.query_targets, prep.query_set.texts, config.training.seed)
    return student


def train_cross_encoder_student(prep: CrossEncoderPrepared, out: Path, config: DistillConfig | None = None):
    """Build the symmetric student and distil the CE into it. Returns ``(student, training info)``."""
    config = effective_config(config or prep.config, prep.has_embeddings)
    Path(out).mkdir(parents=True, exist_ok=True)
    seed_everything(config.training.seed)
    student = _initialised_student(prep, config)
    start_weight = resolved_start_weight(config)
    start = snapshot(student) if start_weight else {}
    generated = np.asarray(prep.query_set.generated, dtype=bool)
    pools = prep.targets.candidates[:, 1 : 1 + prep.targets.pool_size]
    temperature_pair = temperatures(config, prep, is_normalized(student))
    criterion = make_criterion(config, temperature_pair)
    trainer = CrossEncoderDistillationTrainer(
        student,
        TrainingQueries(prep.query_set.texts, prep.query_targets, prep.anchors, prep.positives, pools, generated),
        Documents(prep.doc_texts, prep.document_targets),
        prep.targets,
        criterion,
        config.training,
        hard_negatives=config.loss.hard_negatives,
        out=out,
        freeze_word_embeddings=config.model.freeze_word_embeddings,
        dropout=config.model.student_dropout,
    )
    training = trainer.train()
    training["start_weight"] = start_weight
    merge_with_start(student, start, start_weight)
    training["temperatures"] = list(temperature_pair)
    training["loss_weights"] = dataclasses.asdict(criterion.weights)
    return student, training


def evaluate_first_stage_and_reranker(prep: CrossEncoderPrepared) -> tuple[RunResult, RunResult, float]:
    """The first stage alone and the CE reranking its top ``rerank_depth``; returns both and the rerank seconds."""
    config, evaluation = prep.config, prep.config.evaluation
    depth = config.ce.rerank_depth
    first = evaluate_queries(
        config, "first_stage", prep, prep.first_stage_eval, prep.first_stage_index, max(evaluation.top_k, depth)
    )
    tick = time.perf_counter()
    queries = {q: prep.dataset.queries[q] for q in prep.eval_ids}
    reranked = rerank(
        prep.cross_encoder, first.run, queries, prep.dataset.corpus, depth, config.ce.cross_encoder_batch_size,
        prep.cache,
    )  # fmt: skip
    seconds = time.perf_counter() - tick
    metrics, per_query = score_run(reranked, prep.eval_qrels, evaluation.metrics)
    logger.info("cross-encoder reranker: %s", ", ".join(f"{m} {v:.4f}" for m, v in metrics.items()))
    return first, RunResult("cross_encoder", reranked, metrics, per_query), seconds


def evaluate_cross_encoder_student(prep: CrossEncoderPrepared, student, name: str = "student") -> RunResult:
    """Full retrieval with the student on both sides (its own index of the corpus)."""
    queries = QueryEncoder.of(student).encode(prep.eval_texts)
    return evaluate_queries(prep.config, name, prep, queries, student_index(student, prep, batch_size=64))


def _summary(prep: CrossEncoderPrepared, results: list[RunResult], student, training, timings) -> RunSummary:
    """First stage, CE reranker and student side by side, with the student's and first stage's CPU latency."""
    config = prep.config
    first, reranker, student_result = results
    encoders = {"first_stage": teacher_query_encoder(prep.first_stage), "student": QueryEncoder.of(student)}
    latency = query_latency(config, encoders, prep.eval_texts)
    kind, depth = prep.cross_encoder.settings()["kind"], config.ce.rerank_depth
    teacher = System(config.ce.cross_encoder, reranker.metrics, kind=kind, rerank_depth=depth)
    student_system = described(
        encoders["student"], config.model.student, student_result.metrics, latency["student"], asymmetric=False,
        parameters=count_parameters(student),
    )  # fmt: skip
    first_name = config.ce.first_stage or config.model.teacher
    first_stage = described(encoders["first_stage"], first_name, first.metrics, latency["first_stage"])
    parts = CrossEncoderParts(
        first_stage, ratios(student_result.metrics, first.metrics), prep.pairing, int(prep.targets.candidates.shape[1])
    )
    return RunSummary(
        str(prep.dataset.path), config.data.eval_split, len(prep.eval_ids), teacher, student_system,
        ratios(student_result.metrics, reranker.metrics), speedup(latency["first_stage"], latency["student"]),
        prep.query_set.counts, training, timings, Environment.current(), parts,
    )  # fmt: skip


def run(config: DistillConfig) -> RunSummary:
    """The whole ``distill --cross-encoder`` run (one process): student, three TREC runs, metrics, report, card."""
    started = time.perf_counter()
    out = start_run(config)
    prep = prepare_cross_encoder(config, out)
    student, training = train_cross_encoder_student(prep, out)
    student.save(str(out / "student"))
    honour_umask(out / "student")  # transformers writes the weights 0600
    tick = time.perf_counter()
    first, reranker, rerank_seconds = evaluate_first_stage_and_reranker(prep)
    student_result = evaluate_cross_encoder_student(prep, student)
    results = [first, reranker, student_result]
    timings = {**prep.timings, "train_seconds": training["train_seconds"], "rerank_seconds": rerank_seconds}
    summary = _summary(prep, results, student, training, timings)
    timings["evaluation_seconds"] = time.perf_counter() - tick
    timings["total_seconds"] = time.perf_counter() - started
    write_outputs(out, summary, results)
    return summary
