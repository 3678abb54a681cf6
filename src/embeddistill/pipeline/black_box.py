"""The black-box lane of ``embeddistill distill``: a teacher that is an endpoint or a set of vectors.

The targets come as in the dual-encoder lane (:mod:`embeddistill.pipeline.dual_encoder`, whose stages it reuses):
the teacher's embeddings of every document and training query, cached. What differs: the teacher lends no layers
and no document tower, so the student is a query encoder built from ``--student``
(:func:`embeddistill.models.query_student.build_query_student`) that searches the teacher's own document vectors;
only the student's query latency can be measured; and ``metrics.json`` counts what the endpoint cost
(``teacher_api``: requests, retries, texts sent, cache hits, seconds waiting).
"""

from __future__ import annotations

import logging
import time

from embeddistill.api_options import api_url
from embeddistill.config import DistillConfig
from embeddistill.models.api_teacher import ApiTeacher
from embeddistill.models.query_student import build_query_student
from embeddistill.models.students import QueryEncoder
from embeddistill.models.vector_teacher import VectorTeacher
from embeddistill.pipeline import dual_encoder
from embeddistill.pipeline.stages import (
    baseline_encoders,
    baseline_systems,
    described,
    device_of,
    evaluate_queries,
    initialise_projection,
    projection_init,
    query_latency,
    scored_baselines,
    start_run,
)
from embeddistill.pipeline.summary import Environment, RunSummary, System, kept_agreement, ratios

logger = logging.getLogger(__name__)


def load_teacher(config: DistillConfig, dataset):
    """The endpoint (``--teacher URL``), or the given vectors (``--teacher-documents``) with queries from the
    endpoint or ``--teacher-queries``."""
    endpoint = ApiTeacher.of(config) if api_url(config.model.teacher) else None
    if config.api.teacher_documents:
        return VectorTeacher.of(config, dataset, endpoint)
    return endpoint


def initialised_student(prep: dual_encoder.Prepared):
    """The query encoder from ``--student``, its projection (if any) fitted by least squares on the queries."""
    config = prep.config
    student = build_query_student(
        config.model.student, prep.teacher.dimension, prep.teacher.normalized, device_of(config),
        config.model.trust_remote_code, layers=config.model.student_layers,
    )  # fmt: skip
    how = projection_init(config.model.projection_init, asymmetric=True)
    if how != "random":
        initialise_projection(student, prep.teacher_train, prep.query_set.texts, config.training.seed, how=how)
    return student


def api_counts(teacher) -> dict | None:
    """What the endpoint cost this run (None for a teacher of vectors alone)."""
    stats = getattr(teacher, "stats", None)
    return stats.to_dict() if stats is not None else None


def evaluate(prep: dual_encoder.Prepared, student, training: dict, timings: dict) -> tuple[RunSummary, list]:
    """The teacher's and the student's queries searched in the teacher's document vectors, and the student's
    CPU latency (the teacher's cannot be timed: it is a service, or only vectors)."""
    config, results, teacher_metrics, student_metrics, evaluated = prep.config, [], {}, {}, 0
    if prep.eval_ids:
        teacher_result = evaluate_queries(config, "teacher", prep, prep.teacher_eval, prep.teacher_index)
        student_result = dual_encoder.evaluate_student(prep, student, own_index=False)
        results = [teacher_result, student_result]
        teacher_metrics, student_metrics = teacher_result.metrics, student_result.metrics
        evaluated = len(prep.eval_ids)
    else:
        student_metrics = kept_agreement(training.get("validation"))
    baselines = scored_baselines(config, prep)
    encoders = {"student": QueryEncoder.of(student), **baseline_encoders(baselines)}
    latency = query_latency(config, encoders, dual_encoder._latency_texts(prep))
    teacher = System(prep.teacher.name, teacher_metrics)
    student_system = described(
        encoders["student"], config.model.student, student_metrics, latency["student"], asymmetric=True
    )
    summary = RunSummary(
        str(prep.dataset.path), config.data.eval_split if evaluated else "", evaluated, teacher, student_system,
        ratios(student_metrics, teacher_metrics), {}, prep.query_set.counts, training, timings,
        Environment.current(), teacher_api=api_counts(prep.teacher),
        baselines=baseline_systems(baselines, encoders, latency),
    )  # fmt: skip
    return summary, results


def run(config: DistillConfig) -> RunSummary:
    """The whole black-box run, in one process (the endpoint is shared by nothing to split)."""
    started = time.perf_counter()
    out = start_run(config)
    prep = dual_encoder.prepare(config, out, load_teacher=lambda dataset: load_teacher(config, dataset))
    student, training = dual_encoder.train_student(prep, out, student=initialised_student(prep))
    return dual_encoder.save_and_evaluate(prep, student, training, out, started, evaluate_run=evaluate)
