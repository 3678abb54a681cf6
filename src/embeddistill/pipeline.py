"""``embeddistill distill``: data -> teacher cache -> student -> training -> side-by-side evaluation."""

from __future__ import annotations

import dataclasses
import logging
import math
import platform
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from embeddistill import __version__, distributed
from embeddistill.agreement import AGREEMENT_METRIC, TeacherAgreement
from embeddistill.config import DistillConfig
from embeddistill.data import RetrievalDataset, load_queries, load_query_sources, write_queries_jsonl
from embeddistill.evaluation import RunResult, evaluate_embeddings, measure_latency
from embeddistill.indexing import FlatIndex
from embeddistill.losses import EmbedDistillLoss, LossWeights
from embeddistill.model_card import write_model_card
from embeddistill.querygen import GeneratedQuery, generate_queries, make_cheap_generators
from embeddistill.reporting import write_report
from embeddistill.storage import atomic_write_json, atomic_write_text
from embeddistill.students import (
    QueryEncoder,
    build_student,
    count_parameters,
    fit_orthogonal_projection,
    fit_projection,
    is_asymmetric,
    projection_of,
    query_modules,
)
from embeddistill.teachers import DualEncoderTeacher
from embeddistill.training import DistillationTrainer, Documents, TrainingQueries, resolve_device

logger = logging.getLogger(__name__)


@dataclass
class QuerySet:
    """Training queries before teacher encoding: text, labelled positives and source document, by row."""

    ids: list[str]
    texts: list[str]
    positives: list[list[str]]
    sources: list[str | None]
    generated: list[bool]
    counts: dict[str, int]

    def subset(self, keep: np.ndarray) -> QuerySet:
        rows = np.flatnonzero(keep)
        pick = [self.ids, self.texts, self.positives, self.sources, self.generated]
        return QuerySet(*([column[r] for r in rows] for column in pick), counts=dict(self.counts))


def collect_training_queries(config: DistillConfig, dataset: RetrievalDataset, eval_ids: set[str]) -> QuerySet:
    """Labelled queries, extra real queries and generated ones (from query files with a ``source_id`` column,
    or made here by the cheap generators), generated ones capped by ``max_generated`` / ``generated_per_real``.
    """
    data = config.data
    ids, texts, positives, sources, generated = [], [], [], [], []
    counts = {"labelled": 0, "extra": 0, "generated": 0}

    def add(query_id: str, text: str, relevant: list[str], source: str | None, is_generated: bool, kind: str):
        ids.append(query_id)
        texts.append(text)
        positives.append(relevant)
        sources.append(source if source in dataset.corpus else None)
        generated.append(is_generated)
        counts[kind] += 1

    labelled: dict[str, str] = {}
    if data.train_split:
        qrels = dataset.qrels(data.train_split)
        query_ids = sorted(q for q in qrels if q not in eval_ids)
        if data.train_query_fraction < 1.0:
            keep = max(1, round(len(query_ids) * data.train_query_fraction))
            query_ids = sorted(random.Random(config.training.seed).sample(query_ids, keep))
        for query_id in query_ids:
            relevant = sorted((d for d, rel in qrels[query_id].items() if rel > 0), key=lambda d: -qrels[query_id][d])
            labelled[query_id] = dataset.queries[query_id]
            add(query_id, dataset.queries[query_id], relevant, None, False, "labelled")
    eval_texts = {dataset.queries[q].strip().lower() for q in eval_ids}
    from_files: list[GeneratedQuery] = []
    for path in data.extra_queries:
        file_sources = load_query_sources(path)
        for query_id, text in load_queries(path).items():
            if text.strip().lower() in eval_texts:  # never train on a test query's text
                continue
            if file_sources:  # a generated query file (it names the document each query came from)
                from_files.append(GeneratedQuery(f"extra:{query_id}", text, file_sources.get(query_id, ""), "file"))
            else:
                add(f"extra:{query_id}", text, [], None, False, "extra")
    generators = make_cheap_generators(data.crops_per_document, data.perturbations_per_query)
    made = from_files + generate_queries(generators, dataset.corpus, labelled, config.training.seed, eval_texts)
    cap = min(
        data.max_generated or len(made),
        round(data.generated_per_real * len(ids)) if data.generated_per_real else len(made),
    )
    if len(made) > cap:
        made = random.Random(config.training.seed).sample(made, cap)
    first_positive = {query_id: relevant[0] for query_id, relevant in zip(ids, positives, strict=True) if relevant}
    for query in made:
        # A perturbed query is anchored on its original's first positive; any other on the document it came from.
        source = first_positive.get(query.source_id) if query.generator == "perturb" else query.source_id
        add(query.query_id, query.text, [], source, True, "generated")
    return QuerySet(ids, texts, positives, sources, generated, counts)


def roundtrip_keep(query_set: QuerySet, teacher_queries: np.ndarray, index: FlatIndex, top_k: int) -> np.ndarray:
    """Round-trip filter: a generated query is kept only when the teacher ranks its source document in its top
    ``top_k`` (a query its own document does not answer, in the teacher's eyes, teaches a wrong neighbourhood).
    Real queries, and generated ones without a known source, are always kept.
    """
    keep = np.ones(len(query_set.ids), dtype=bool)
    pairs = enumerate(zip(query_set.generated, query_set.sources, strict=True))
    checked = [i for i, (is_generated, source) in pairs if is_generated and source]
    if not checked:
        return keep
    _, top = index.search(teacher_queries[checked], top_k)
    row_of = {doc_id: row for row, doc_id in enumerate(index.ids)}
    for i, ranked in zip(checked, top, strict=True):
        keep[i] = row_of[query_set.sources[i]] in set(ranked.tolist())
    return keep


def evaluation_qrels(config: DistillConfig, dataset: RetrievalDataset) -> dict[str, dict[str, int]]:
    """The test split's judgements, or a seeded held-out part of the training split (``dev_fraction``)."""
    if not config.data.dev_fraction:
        return dataset.qrels(config.data.eval_split)
    train = dataset.qrels(config.data.train_split)
    held_out = round(len(train) * config.data.dev_fraction)
    chosen = random.Random(f"dev-{config.training.seed}").sample(sorted(train), held_out)
    return {query_id: train[query_id] for query_id in sorted(chosen)}


def mine_from_teacher(
    query_set: QuerySet, teacher_queries: np.ndarray, index: FlatIndex, depth: int
) -> tuple[np.ndarray, list[list[int]], np.ndarray]:
    """Anchor document, labelled positives and hard-negative pool (teacher top-``depth``) of every query."""
    row_of = {doc_id: row for row, doc_id in enumerate(index.ids)}
    _, top = index.search(teacher_queries, depth + 1)
    anchors = np.empty(len(query_set.texts), dtype=np.int64)
    positives, pools = [], np.full((len(query_set.texts), depth), -1, dtype=np.int64)
    for i in range(len(query_set.texts)):
        relevant = [row_of[d] for d in query_set.positives[i] if d in row_of]
        source = query_set.sources[i]
        anchors[i] = relevant[0] if relevant else row_of[source] if source else top[i, 0]
        excluded = set(relevant) | {int(anchors[i])}
        pool = [int(r) for r in top[i] if r >= 0 and int(r) not in excluded][:depth]
        pools[i, : len(pool)] = pool
        positives.append(relevant)
    return anchors, positives, pools


def initialise_projection(
    student, teacher_embeddings: np.ndarray, texts: list[str], seed: int, sample: int = 4096, how: str = "lstsq"
) -> None:
    """Fit the student's projection on a sample of training queries: least squares or orthogonal (``how``)."""
    projection = projection_of(student)
    if projection is None:
        return
    modules = list(query_modules(student))
    before = torch.nn.Sequential(*modules[: modules.index(projection)])
    encoder = QueryEncoder.of(student)
    device = next(before.parameters()).device  # the student may already sit on a GPU
    rows = np.random.default_rng(seed).permutation(len(texts))[:sample]
    with torch.inference_mode():
        features = [
            before(encoder.tokenize([texts[r] for r in rows[i : i + 128]], device))["sentence_embedding"]
            .float()
            .cpu()
            .numpy()
            for i in range(0, len(rows), 128)
        ]
    fit = fit_orthogonal_projection if how == "orthogonal" else fit_projection
    fit(projection, np.concatenate(features), teacher_embeddings[rows])
    logger.info("projection initialised (%s) on %d queries", how, len(rows))


def resolved_temperatures(config: DistillConfig, teacher_normalized: bool) -> tuple[float, float]:
    teacher_t = config.loss.teacher_temperature or (0.05 if teacher_normalized else 1.0)
    return teacher_t, config.loss.student_temperature or teacher_t


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


def prepare(config: DistillConfig, out: Path) -> Prepared:
    """Load the data, collect training queries and embed everything with the teacher (cached)."""
    dataset = RetrievalDataset.load(config.data.dataset)
    eval_qrels = evaluation_qrels(config, dataset)
    eval_ids = sorted(eval_qrels)
    query_set = collect_training_queries(config, dataset, set(eval_ids))

    tick = time.perf_counter()
    teacher = DualEncoderTeacher.load(
        config.model.teacher,
        cache_dir=config.model.cache_dir or None,
        device=str(resolve_device(config.training.device)),
        batch_size=config.model.teacher_batch_size,
        max_seq_length=config.model.max_seq_length or None,
        trust_remote_code=config.model.trust_remote_code,
    )
    doc_ids = list(dataset.corpus)
    doc_texts = [dataset.corpus[d] for d in doc_ids]
    teacher_docs = teacher.embed_documents(doc_texts, desc="corpus")
    teacher_train = teacher.embed_queries(query_set.texts, desc="training queries")
    teacher_eval = teacher.embed_queries([dataset.queries[q] for q in eval_ids], desc="eval queries")
    teacher_index = FlatIndex(teacher_docs, doc_ids)
    if config.data.roundtrip_top_k:
        keep = roundtrip_keep(query_set, teacher_train, teacher_index, config.data.roundtrip_top_k)
        query_set, teacher_train = query_set.subset(keep), teacher_train[keep]
        query_set.counts["generated"] -= int((~keep).sum())
        query_set.counts["roundtrip_dropped"] = int((~keep).sum())
    query_set, teacher_train, validation = hold_out_validation(
        config, query_set, teacher_train, teacher_docs, doc_texts
    )
    logger.info("training queries: %s", query_set.counts)
    if distributed.is_main():
        rows = zip(query_set.ids, query_set.texts, query_set.generated, strict=True)
        records = [{"_id": i, "text": t, "generated": g} for i, t, g in rows]
        write_queries_jsonl(out / "training_queries.jsonl", records)
    return Prepared(
        config,
        dataset,
        eval_ids,
        eval_qrels,
        query_set,
        teacher,
        doc_ids,
        doc_texts,
        teacher_docs,
        teacher_train,
        teacher_eval,
        teacher_index,
        {"teacher_cache_seconds": time.perf_counter() - tick},
        validation,
    )


def hold_out_validation(
    config: DistillConfig,
    query_set: QuerySet,
    teacher_train: np.ndarray,
    teacher_docs: np.ndarray,
    doc_texts: list[str],
) -> tuple[QuerySet, np.ndarray, TeacherAgreement | None]:
    """Take a seeded slice of the training queries (at most a tenth) out of training, for the label-free check."""
    count = min(config.data.validation_queries, len(query_set.ids) // 10)
    if count < 1:
        return query_set, teacher_train, None
    held = np.zeros(len(query_set.ids), dtype=bool)
    held[np.random.default_rng([config.training.seed, 7]).choice(len(held), count, replace=False)] = True
    texts = [query_set.texts[i] for i in np.flatnonzero(held)]
    validation = TeacherAgreement(texts, teacher_train[held], teacher_docs, doc_texts)
    kept = query_set.subset(~held)
    kept.counts["validation"] = count
    for kind in ("labelled", "extra", "generated"):
        kept.counts[kind] -= sum(1 for i in np.flatnonzero(held) if _kind_of(query_set, i) == kind)
    return kept, teacher_train[~held], validation


def _kind_of(query_set: QuerySet, row: int) -> str:
    if query_set.generated[row]:
        return "generated"
    return "labelled" if query_set.positives[row] else "extra"


def make_criterion(config: DistillConfig, teacher_normalized: bool) -> EmbedDistillLoss:
    teacher_t, student_t = resolved_temperatures(config, teacher_normalized)
    loss = config.loss
    return EmbedDistillLoss(
        LossWeights(
            loss.score_weight, loss.query_em_weight, loss.document_em_weight, loss.label_weight, loss.margin_mse_weight
        ),
        teacher_temperature=teacher_t,
        student_temperature=student_t,
        distance=loss.em_distance,
    )


def initialised_student(prep: Prepared, asymmetric: bool | None = None):
    """The student before distillation: built from the config, its projection (if any) fitted by least squares.

    ``asymmetric`` overrides the config (a peer trainer that knows no Router trains the query tower alone).
    """
    config = prep.config
    student = build_student(
        config.model.student,
        prep.teacher.model,
        config.model.asymmetric if asymmetric is None else asymmetric,
        str(resolve_device(config.training.device)),
        config.model.trust_remote_code,
        layers=config.model.student_layers,
    )
    how = projection_init(config.model.projection_init, config.model.asymmetric)
    if how != "random":
        initialise_projection(student, prep.teacher_train, prep.query_set.texts, config.training.seed, how=how)
    return student


def projection_init(option: str, asymmetric: bool) -> str:
    """``auto``: least squares for an asymmetric student (only queries go through the projection, and the best
    linear fit to the teacher is what they need); orthogonal for a symmetric one (documents go through it too, and
    an orthogonal map keeps the pretrained encoder's own geometry)."""
    if option != "auto":
        return option
    return "lstsq" if asymmetric else "orthogonal"


def train_student(prep: Prepared, out: Path):
    """Build the student, initialise its projection, and distil it. Returns ``(student, training info)``.

    With ``--learning-rate auto`` the learning rate is chosen first (:func:`choose_learning_rate`).
    """
    config = prep.config
    queries = training_queries(prep)
    search = None
    if config.training.learning_rate == "auto":
        search = choose_learning_rate(prep, queries, out / "tune")
        config = dataclasses.replace(
            config, training=dataclasses.replace(config.training, learning_rate=search["chosen"])
        )
    student = initialised_student(prep)
    training = make_trainer(prep, config, student, queries, out).train()
    training["temperatures"] = list(resolved_temperatures(config, prep.teacher.normalized))
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


def make_trainer(
    prep: Prepared, config: DistillConfig, student, queries: TrainingQueries, out: Path
) -> DistillationTrainer:
    return DistillationTrainer(
        student,
        queries,
        Documents(prep.doc_texts, prep.teacher_docs),
        make_criterion(config, prep.teacher.normalized),
        config.training,
        hard_negatives=config.loss.hard_negatives,
        out=out,
        freeze_word_embeddings=config.model.freeze_word_embeddings,
        dropout=config.model.student_dropout,
        validation=prep.validation,
    )


def choose_learning_rate(prep: Prepared, queries: TrainingQueries, out: Path) -> dict:
    """``--learning-rate auto``: a short run (``tune_steps``, with its own warm-up and decay) at each
    candidate from the same start; the best label-free agreement at its end wins. No label is read."""
    config = prep.config
    if prep.validation is None:
        raise ValueError(
            "--learning-rate auto needs the label-free check: set --validation-queries above 0 (and have at least "
            "10 training queries), or give a number, e.g. --learning-rate 1e-4"
        )
    steps_per_epoch = math.ceil(len(queries.texts) / config.training.batch_size)
    short = min(config.training.tune_steps, steps_per_epoch * config.training.epochs)
    results = []
    for rate in config.training.learning_rate_candidates:
        training = dataclasses.replace(
            config.training,
            learning_rate=float(rate),
            max_steps=short,
            resume=False,
            checkpoint_every=0,
            keep_best=False,
        )
        trial, folder = dataclasses.replace(config, training=training), out / f"lr-{rate:g}"
        folder.mkdir(parents=True, exist_ok=True)
        info = make_trainer(prep, trial, initialised_student(prep), queries, folder).train()
        results.append({"learning_rate": float(rate), "steps": short, **info["validation"]["final"]})
        logger.info("--learning-rate auto: %g -> %s", rate, results[-1])
    best = max(results, key=lambda r: r[AGREEMENT_METRIC])
    return {"chosen": best["learning_rate"], "metric": AGREEMENT_METRIC, "trials": results}


def evaluate_student(prep: Prepared, student, name: str = "student", own_index: bool | None = None) -> RunResult:
    """Search with the student's query embeddings in the teacher's index, or (symmetric students) in its own."""
    config = prep.config
    query_embeddings = QueryEncoder.of(student).encode(prep.eval_texts)
    index = prep.teacher_index
    if own_index if own_index is not None else not is_asymmetric(student):
        documents = student.encode_document(
            prep.doc_texts, batch_size=32, convert_to_numpy=True, show_progress_bar=True
        )
        index = FlatIndex(documents, prep.doc_ids)
    return evaluate_embeddings(
        name,
        prep.eval_ids,
        query_embeddings,
        index,
        prep.eval_qrels,
        config.evaluation.metrics,
        config.evaluation.top_k,
    )


def teacher_query_encoder(teacher: DualEncoderTeacher) -> QueryEncoder:
    model = teacher.model
    return QueryEncoder(torch.nn.Sequential(*model._modules.values()), model.tokenizer, model.max_seq_length)


def distill(config: DistillConfig) -> dict:
    """The whole run. Under torchrun (see :mod:`embeddistill.distributed`) every rank prepares the same data,
    encodes its share of the teacher cache and trains its share of each batch; rank 0 alone writes the outputs
    and evaluates, and the other ranks return ``{}`` after training.
    """
    if config.model.cross_encoder:  # a cross-encoder teacher: its own pipeline (one process, symmetric student)
        from embeddistill.ce_pipeline import distill_from_cross_encoder

        return distill_from_cross_encoder(config)
    distributed.init_from_env(config.training.device)  # a no-op in a single process
    distributed.check_batch_size(config.training.batch_size)  # fail before hours of teacher encoding
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    if config.training.threads:
        torch.set_num_threads(config.training.threads)
    random.seed(config.training.seed)
    torch.manual_seed(config.training.seed)
    started = time.perf_counter()
    if distributed.is_main():
        atomic_write_text(out / "config.yaml", config.to_yaml())

    prep = prepare(config, out)
    student, training = train_student(prep, out)
    if not distributed.is_main():
        return {}
    timings = {**prep.timings, "train_seconds": training["train_seconds"]}
    student.save(str(out / "student"))

    tick = time.perf_counter()
    evaluation = config.evaluation
    teacher_result = evaluate_embeddings(
        "teacher",
        prep.eval_ids,
        prep.teacher_eval,
        prep.teacher_index,
        prep.eval_qrels,
        evaluation.metrics,
        evaluation.top_k,
    )
    student_result = evaluate_student(prep, student)
    teacher_encoder, student_encoder = teacher_query_encoder(prep.teacher), QueryEncoder.of(student)
    latency = measure_latency(
        {"teacher": teacher_encoder, "student": student_encoder},
        prep.eval_texts,
        evaluation.latency_batch_sizes,
        evaluation.latency_repeats,
    )
    teacher_latency, student_latency = latency["teacher"], latency["student"]
    timings["evaluation_seconds"] = time.perf_counter() - tick
    timings["total_seconds"] = time.perf_counter() - started

    for result in (teacher_result, student_result):
        result.save(out)
    summary = build_summary(
        config,
        prep,
        teacher_result,
        student_result,
        teacher_encoder,
        student_encoder,
        teacher_latency,
        student_latency,
        training,
        timings,
    )
    atomic_write_json(out / "metrics.json", summary)
    write_report(out / "report.md", summary)
    write_model_card(out / "student", summary)
    return summary


def build_summary(
    config,
    prep: Prepared,
    teacher_result: RunResult,
    student_result: RunResult,
    teacher_encoder,
    student_encoder,
    teacher_latency,
    student_latency,
    training,
    timings,
) -> dict:
    dataset, query_set = prep.dataset, prep.query_set
    retention = {m: _ratio(student_result.metrics[m], teacher_result.metrics[m]) for m in teacher_result.metrics}
    speedup = {key.removesuffix("_ms"): _ratio(teacher_latency[key], student_latency[key]) for key in teacher_latency}
    return {
        "dataset": str(dataset.path),
        "eval_split": config.data.eval_split,
        "eval_queries": len(teacher_result.per_query[next(iter(teacher_result.per_query))]),
        "teacher": {
            "model": config.model.teacher,
            **teacher_result.metrics,
            "latency": teacher_latency,
            "query_encoder_parameters": count_parameters(teacher_encoder.modules_),
            "query_encoder_compute_parameters": count_parameters(teacher_encoder.modules_, include_embeddings=False),
        },
        "student": {
            "model": config.model.student,
            "asymmetric": config.model.asymmetric,
            **student_result.metrics,
            "latency": student_latency,
            "query_encoder_parameters": count_parameters(student_encoder.modules_),
            "query_encoder_compute_parameters": count_parameters(student_encoder.modules_, include_embeddings=False),
        },
        "retention": retention,
        "speedup": speedup,
        "training_queries": query_set.counts,
        "training": training,
        "timings": timings,
        "environment": {
            "embeddistill": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
        },
    }


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else float("nan")
