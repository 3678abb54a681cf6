"""The dual-encoder lane of ``embeddistill distill``: teacher cache -> student -> training -> side-by-side evaluation.

Built from :mod:`embeddistill.pipeline.stages`; what is its own is the teacher's embeddings as targets (queries,
documents and the hard-negative pools all come from one cached dual encoder) and torchrun support.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embeddistill.config import DistillConfig, resolve_student_recipe
from embeddistill.data import RetrievalDataset
from embeddistill.evaluation.agreement import AGREEMENT_METRIC, TeacherAgreement
from embeddistill.evaluation.metrics import RunResult
from embeddistill.models.students import QueryEncoder, build_student, is_asymmetric, student_query_prompt
from embeddistill.models.teachers import DualEncoderTeacher
from embeddistill.pipeline.stages import (
    QuerySet,
    baseline_encoders,
    baseline_systems,
    collect_training_queries,
    described,
    device_of,
    evaluate_queries,
    evaluation_qrels,
    initialise_projection,
    load_dual_encoder,
    make_criterion,
    mine_from_teacher,
    projection_init,
    query_latency,
    roundtrip_keep,
    scored_baselines,
    start_run,
    student_index,
    teacher_query_encoder,
    write_outputs,
    write_training_queries,
)
from embeddistill.pipeline.summary import Environment, RunSummary, kept_agreement, ratios, speedup
from embeddistill.serving.indexing import FlatIndex
from embeddistill.storage import atomic_write_json, honour_umask
from embeddistill.training import distributed
from embeddistill.training.batching import Documents, TrainingQueries
from embeddistill.training.distillation import DistillationTrainer, planned_steps
from embeddistill.training.merging import merge_with_start, resolved_start_weight, snapshot

logger = logging.getLogger(__name__)


@dataclass
class Prepared:
    """Everything a distillation run needs before training: data, training queries, teacher embeddings."""

    config: DistillConfig
    dataset: RetrievalDataset
    eval_ids: list[str]
    eval_qrels: dict[str, dict[str, int]]
    query_set: QuerySet
    teacher: DualEncoderTeacher
    doc_ids: list[str]
    doc_texts: list[str]
    teacher_docs: np.ndarray
    teacher_train: np.ndarray
    teacher_eval: np.ndarray
    teacher_index: FlatIndex
    timings: dict[str, float]
    validation: TeacherAgreement | None = None

    @property
    def eval_texts(self) -> list[str]:
        return [self.dataset.queries[q] for q in self.eval_ids]


def _roundtrip_filter(config: DistillConfig, query_set: QuerySet, teacher_train: np.ndarray, index: FlatIndex):
    """Drop generated queries whose source document the teacher does not rank in its top ``roundtrip_top_k``."""
    keep = roundtrip_keep(query_set, teacher_train, index, config.data.roundtrip_top_k)
    query_set, teacher_train = query_set.subset(keep), teacher_train[keep]
    query_set.counts["generated"] -= int((~keep).sum())
    query_set.counts["roundtrip_dropped"] = int((~keep).sum())
    return query_set, teacher_train


def prepare(config: DistillConfig, out: Path, load_teacher=None) -> Prepared:
    """Load the data, collect training queries and embed everything with the teacher (cached).

    ``load_teacher(dataset)``: another kind of teacher with ``embed_documents`` / ``embed_queries`` (the black-box
    lane's endpoint or vectors); by default the local dual encoder ``config.model.teacher``.
    """
    resolve_student_recipe(config)  # done already by distill(); a caller of the stages alone gets the same recipe
    dataset = RetrievalDataset.load(config.data.dataset)
    eval_qrels = evaluation_qrels(config, dataset)
    if not eval_qrels:
        announce_label_free(config, dataset)
    eval_ids = sorted(eval_qrels)
    query_set = collect_training_queries(config, dataset, set(eval_ids))
    tick = time.perf_counter()
    teacher = load_teacher(dataset) if load_teacher else load_dual_encoder(config, config.model.teacher)
    doc_ids = list(dataset.corpus)
    doc_texts = [dataset.corpus[d] for d in doc_ids]
    teacher_docs = teacher.embed_documents(doc_texts, desc="corpus")
    teacher_train = teacher.embed_queries(query_set.texts, desc="training queries")
    teacher_eval = teacher.embed_queries([dataset.queries[q] for q in eval_ids], desc="eval queries")
    teacher_index = FlatIndex(teacher_docs, doc_ids)
    if config.data.roundtrip_top_k:
        query_set, teacher_train = _roundtrip_filter(config, query_set, teacher_train, teacher_index)
    query_set, teacher_train, validation = hold_out_validation(
        config, query_set, teacher_train, teacher_docs, doc_texts
    )
    logger.info("training queries: %s", query_set.counts)
    if distributed.is_main():
        write_training_queries(out, query_set)
    timings = {"teacher_cache_seconds": time.perf_counter() - tick}
    return Prepared(
        config, dataset, eval_ids, eval_qrels, query_set, teacher, doc_ids, doc_texts,
        teacher_docs, teacher_train, teacher_eval, teacher_index, timings, validation,
    )  # fmt: skip


def announce_label_free(config: DistillConfig, dataset: RetrievalDataset) -> None:
    """One INFO line saying why the run has no labelled evaluation; refuse one that would have no measure at all.

    Checked before the teacher encodes anything: without labels the label-free agreement is the only quality
    number the run can report, so turning it off (``--validation-queries 0``) would leave an unmeasured student.
    """
    if config.data.validation_queries < 1:
        raise ValueError(
            f"{dataset.path} has no relevance labels to evaluate on, so the student is measured by its label-free "
            "agreement with the teacher: set --validation-queries above 0"
        )
    why = f"{dataset.path} has no qrels/" if not dataset.has_labels else "--eval-split is ''"
    also = [" and labelled"] if dataset.has_labels and config.data.train_split else []
    also += [" and --extra-queries"] if config.data.extra_queries else []
    logger.info(
        "label-free run: %s; training on generated%s queries, reporting agreement with the teacher instead of nDCG",
        why, "".join(also),
    )  # fmt: skip


def hold_out_validation(
    config: DistillConfig, query_set: QuerySet, teacher_train: np.ndarray, teacher_docs: np.ndarray, doc_texts: list
) -> tuple[QuerySet, np.ndarray, TeacherAgreement | None]:
    """Take a seeded slice of the training queries (at most a tenth) out of training, for the label-free check."""
    count = min(config.data.validation_queries, len(query_set.ids) // 10)
    if count < 1:
        return query_set, teacher_train, None
    held = np.zeros(len(query_set.ids), dtype=bool)
    held[np.random.default_rng([config.training.seed, 7]).choice(len(held), count, replace=False)] = True
    rows = np.flatnonzero(held)
    texts = [query_set.texts[i] for i in rows]
    generated = np.array([bool(query_set.generated[i]) for i in rows])
    validation = TeacherAgreement(
        texts, teacher_train[held], teacher_docs, doc_texts, seed=config.training.seed,
        groups={"real": ~generated, "generated": generated},
    )  # fmt: skip
    kept = query_set.subset(~held)
    for row in rows:
        kind = "generated" if query_set.generated[row] else "labelled" if query_set.positives[row] else "extra"
        kept.counts[kind] -= 1
    kept.counts["validation"] = count
    return kept, teacher_train[~held], validation


def resolved_temperatures(config: DistillConfig, teacher_normalized: bool) -> tuple[float, float]:
    """Teacher: 0.05 for a normalised (cosine) teacher, else 1; student: the teacher's; flags override both."""
    teacher_t = config.loss.teacher_temperature or (0.05 if teacher_normalized else 1.0)
    return teacher_t, config.loss.student_temperature or teacher_t


def initialised_student(prep: Prepared, asymmetric: bool | None = None):
    """The student before distillation: built from the config, its projection (if any) fitted by least squares.

    ``asymmetric`` overrides the config (a peer trainer that knows no Router trains the query tower alone).
    """
    config = prep.config
    student = build_student(
        config.model.student,
        prep.teacher.model,
        config.model.asymmetric if asymmetric is None else asymmetric,
        device_of(config),
        config.model.trust_remote_code,
        layers=config.model.student_layers,
        query_prompt=student_query_prompt(config.model.student_query_prompt, config.model.student, prep.teacher.model),
    )
    how = projection_init(config.model.projection_init, config.model.asymmetric)
    if how != "random":
        initialise_projection(student, prep.teacher_train, prep.query_set.texts, config.training.seed, how=how)
    return student


def train_student(prep: Prepared, out: Path, student=None):
    """Build the student (unless given, initialised), initialise its projection, and distil it. Returns
    ``(student, training info)``.

    With ``--learning-rate auto`` the learning rate is chosen first, without labels (:func:`choose_learning_rate`);
    with a ``start_weight`` the trained weights end averaged with the starting ones
    (:mod:`embeddistill.training.merging`).
    """
    config, queries = prep.config, training_queries(prep)
    # Built and its projection fitted once; every trial starts from a copy.
    student = initialised_student(prep) if student is None else student
    start_weight = resolved_start_weight(config)
    start = snapshot(student) if start_weight else {}  # a copy of the weights only where they will be averaged
    search = None
    if config.training.learning_rate == "auto":
        search = choose_learning_rate(prep, queries, out / "tune", student)
        chosen = dataclasses.replace(config.training, learning_rate=search["chosen"])
        config = dataclasses.replace(config, training=chosen)
    _say_where_the_step_cap_stops(config, len(queries.texts))
    training = make_trainer(prep, config, student, queries, out).train()
    training["temperatures"] = list(resolved_temperatures(config, prep.teacher.normalized))
    training["start_weight"] = start_weight
    merge_with_start(student, start, start_weight)
    if start_weight and training.get("validation"):  # what the run ends with, checked as the rest were
        training["validation"]["merged"] = prep.validation.score(student)
    if search is not None:
        training["learning_rate_search"] = search
    student.to("cpu")
    return student, training


def training_queries(prep: Prepared) -> TrainingQueries:
    anchors, positives, pools = mine_from_teacher(
        prep.query_set, prep.teacher_train, prep.teacher_index, prep.config.loss.hard_negative_depth
    )
    generated = np.asarray(prep.query_set.generated, dtype=bool)
    return TrainingQueries(prep.query_set.texts, prep.teacher_train, anchors, positives, pools, generated)


def make_trainer(prep: Prepared, config: DistillConfig, student, queries: TrainingQueries, out: Path):
    return DistillationTrainer(
        student,
        queries,
        Documents(prep.doc_texts, prep.teacher_docs),
        make_criterion(config, resolved_temperatures(config, prep.teacher.normalized)),
        config.training,
        hard_negatives=config.loss.hard_negatives,
        out=out,
        freeze_word_embeddings=config.model.freeze_word_embeddings,
        dropout=config.model.student_dropout,
        validation=prep.validation,
    )


def _say_where_the_step_cap_stops(config: DistillConfig, queries: int) -> None:
    settings = config.training
    per_epoch = math.ceil(queries / settings.batch_size)
    if planned_steps(settings, per_epoch) < per_epoch * settings.epochs:
        done = settings.max_steps / per_epoch
        logger.info("max_steps %d: training stops after %.1f of %d epoch(s)", settings.max_steps, done, settings.epochs)


def choose_learning_rate(prep: Prepared, queries: TrainingQueries, out: Path, start) -> dict:
    """``--learning-rate auto``: a short run (``tune_steps``, with its own warm-up and decay) at each candidate from
    the same start (copies of ``start``); the best label-free agreement at its end wins. No label is read."""
    config = prep.config
    if prep.validation is None:
        raise ValueError(
            "--learning-rate auto needs the label-free check: set --validation-queries above 0 (and have at least "
            "10 training queries), or give a number, e.g. --learning-rate 1e-4"
        )
    settings = config.training
    steps = min(settings.tune_steps, planned_steps(settings, math.ceil(len(queries.texts) / settings.batch_size)))
    chosen_before = _earlier_search(out / "search.json", settings, steps)
    if chosen_before is not None:
        return chosen_before
    trials = []
    for rate in config.training.learning_rate_candidates:
        training = dataclasses.replace(
            settings, learning_rate=float(rate), max_steps=steps, resume=False, checkpoint_every=0, keep_best=False
        )
        folder = out / f"lr-{rate:g}"
        folder.mkdir(parents=True, exist_ok=True)
        trial = dataclasses.replace(config, training=training)
        info = make_trainer(prep, trial, copy.deepcopy(start), queries, folder).train()
        if distributed.is_main():  # under torchrun every rank trains, rank 0 alone checks
            trials.append({"learning_rate": float(rate), "steps": steps, **info["validation"]["final"]})
            logger.info("--learning-rate auto: %g -> %s", rate, trials[-1])
    if distributed.is_main():
        best = max(trials, key=lambda trial: trial[AGREEMENT_METRIC])
        search = {"chosen": best["learning_rate"], "metric": AGREEMENT_METRIC, "trials": trials}
        atomic_write_json(
            out / "search.json", {"candidates": settings.learning_rate_candidates, "steps": steps, **search}
        )
    return distributed.from_main(search if distributed.is_main() else None)


def _earlier_search(path: Path, settings, steps: int) -> dict | None:
    """With ``--resume``, the choice an interrupted run already made with the same candidates and steps (its short
    runs are not repeated); else None."""
    if not settings.resume or not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if saved.pop("candidates", None) != settings.learning_rate_candidates or saved.pop("steps", None) != steps:
        return None
    logger.info("--resume: the learning rate chosen before, %g (%s)", saved["chosen"], path)
    return saved


def evaluate_student(prep: Prepared, student, name: str = "student", own_index: bool | None = None) -> RunResult:
    """Search with the student's query embeddings in the teacher's index, or (symmetric students) in its own."""
    query_embeddings = QueryEncoder.of(student).encode(prep.eval_texts)
    index = prep.teacher_index
    if own_index if own_index is not None else not is_asymmetric(student):
        index = student_index(student, prep)
    return evaluate_queries(prep.config, name, prep, query_embeddings, index)


def evaluate(prep: Prepared, student, training: dict, timings: dict) -> tuple[RunSummary, list[RunResult]]:
    """Teacher and student side by side: quality, CPU latency and size, as a :class:`RunSummary`.

    Without labelled evaluation queries the quality is the student's label-free agreement with the teacher (the
    check training already ran, at the kept step): a corpus-only run has nothing else to measure it by.
    """
    baselines = scored_baselines(prep.config, prep)
    if not prep.eval_ids:
        agreement = kept_agreement(training.get("validation"))
        return _summary(prep, student, training, timings, ({}, agreement), 0, baselines), []
    teacher_result = evaluate_queries(prep.config, "teacher", prep, prep.teacher_eval, prep.teacher_index)
    student_result = evaluate_student(prep, student)
    evaluated = len(teacher_result.per_query[next(iter(teacher_result.per_query))])
    metrics = (teacher_result.metrics, student_result.metrics)
    summary = _summary(prep, student, training, timings, metrics, evaluated, baselines)
    return summary, [teacher_result, student_result]


def _summary(
    prep: Prepared,
    student,
    training: dict,
    timings: dict,
    metrics: tuple[dict, dict],
    evaluated: int,
    baselines: dict[str, tuple],
):
    """The :class:`RunSummary` of the teacher's and the student's metrics, their CPU latency and size, and those of
    the off-the-shelf ``baselines`` (name -> (model, scores), from :func:`score_baseline`)."""
    config = prep.config
    teacher_metrics, student_metrics = metrics
    encoders = {"teacher": teacher_query_encoder(prep.teacher), "student": QueryEncoder.of(student)}
    encoders.update(baseline_encoders(baselines))
    latency = query_latency(config, encoders, _latency_texts(prep))
    teacher = described(encoders["teacher"], config.model.teacher, teacher_metrics, latency["teacher"])
    student_system = described(
        encoders["student"], config.model.student, student_metrics, latency["student"],
        asymmetric=config.model.asymmetric,
    )  # fmt: skip
    return RunSummary(
        str(prep.dataset.path),
        config.data.eval_split if evaluated else "",
        evaluated,
        teacher,
        student_system,
        ratios(student_metrics, teacher_metrics),
        speedup(latency["teacher"], latency["student"]),
        prep.query_set.counts,
        training,
        timings,
        Environment.current(),
        baselines=baseline_systems(baselines, encoders, latency),
    )


def _latency_texts(prep: Prepared) -> list[str]:
    """The evaluation queries; in a label-free run the held-out validation queries (real-looking, unseen)."""
    if prep.eval_ids:
        return prep.eval_texts
    return prep.validation.texts if prep.validation is not None else prep.query_set.texts[:200]


def run(config: DistillConfig) -> RunSummary | None:
    """The whole dual-encoder run. Under torchrun (see :mod:`embeddistill.training.distributed`) every rank prepares
    the same data, encodes its share of the teacher cache and trains its share of each batch; rank 0 alone writes
    the outputs and evaluates, and the other ranks return ``None`` after training.
    """
    distributed.init_from_env(config.training.device)  # a no-op in a single process
    distributed.check_batch_size(config.training.batch_size)  # fail before hours of teacher encoding
    started = time.perf_counter()
    out = start_run(config, write_config=distributed.is_main())
    prep = prepare(config, out)
    student, training = train_student(prep, out)
    if not distributed.is_main():
        return None
    return save_and_evaluate(prep, student, training, out, started)


def save_and_evaluate(
    prep: Prepared, student, training: dict, out: Path, started: float, evaluate_run=None
) -> RunSummary:
    """The end of a run: save the student, evaluate it (``evaluate_run``, default :func:`evaluate`: a lane with its
    own evaluation passes it) and write every output; ``started``: the run's start."""
    timings = {**prep.timings, "train_seconds": training["train_seconds"]}
    student.save(str(out / "student"))
    honour_umask(out / "student")  # transformers writes the weights 0600
    tick = time.perf_counter()
    summary, results = (evaluate_run or evaluate)(prep, student, training, timings)
    timings["evaluation_seconds"] = time.perf_counter() - tick
    timings["total_seconds"] = time.perf_counter() - started
    write_outputs(out, summary, results)
    for below, sentence in summary.versus_baselines():
        (logger.warning if below else logger.info)(sentence)
    return summary
