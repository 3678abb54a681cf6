"""The stages both lanes are built from: run set-up, training queries, teacher loading, the criterion, the
projection's initialisation, evaluation, off-the-shelf baselines, latency and writing a run's outputs.

A dual-encoder run (:mod:`embeddistill.pipeline.dual_encoder`) and a cross-encoder run
(:mod:`embeddistill.pipeline.cross_encoder`) differ in where their targets come from, not in these steps; keeping
one copy of each here is what makes both lanes write the same outputs (``training_queries.jsonl``,
``metrics.json``, ``report.md``, the model card).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sentence_transformers import SentenceTransformer
from tqdm.auto import tqdm

from embeddistill.config import DistillConfig
from embeddistill.data import RetrievalDataset, load_queries, load_query_sources, write_queries_jsonl
from embeddistill.evaluation.agreement import AGREEMENT_METRIC, agreement_ndcg
from embeddistill.evaluation.latency import measure_latency
from embeddistill.evaluation.metrics import RunResult, evaluate_embeddings
from embeddistill.evaluation.model_card import write_model_card
from embeddistill.evaluation.report import write_report
from embeddistill.losses import EmbedDistillLoss, LossWeights
from embeddistill.models.encoding import DOCUMENT, QUERY, encode
from embeddistill.models.students import (
    QueryEncoder,
    count_parameters,
    fit_orthogonal_projection,
    fit_projection,
    projection_of,
    query_modules,
)
from embeddistill.models.teachers import DualEncoderTeacher, load_sentence_transformer, query_prompt
from embeddistill.pipeline.summary import RunSummary, System
from embeddistill.querygen import GeneratedQuery, crops_per_document, generate_queries, make_cheap_generators
from embeddistill.runtime import resolve_device, seed_everything
from embeddistill.serving.indexing import FlatIndex
from embeddistill.storage import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)


# -- run set-up ------------------------------------------------------------------------------------------------


def start_run(config: DistillConfig, write_config: bool = True) -> Path:
    """Create the output folder, apply threads and seeds, and record the configuration (``config.yaml``)."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    if config.training.threads:
        torch.set_num_threads(config.training.threads)
    seed_everything(config.training.seed)
    if write_config:
        atomic_write_text(out / "config.yaml", config.to_yaml())
    return out


def device_of(config: DistillConfig) -> str:
    return str(resolve_device(config.training.device))


# -- training queries ------------------------------------------------------------------------------------------


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
    if data.train_split and dataset.has_labels:  # corpus-only: no labelled queries (see evaluation_qrels)
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
    documents = len(dataset.corpus)
    crops = crops_per_document(documents, data.crops_per_document, data.crop_budget)
    if crops != data.crops_per_document:
        logger.info("%d crops per document (%d documents, crop_budget %d)", crops, documents, data.crop_budget)
    generators = make_cheap_generators(crops, data.perturbations_per_query)
    made = from_files + generate_queries(generators, dataset.corpus, labelled, config.training.seed, eval_texts)
    per_real = data.generated_per_real and ids  # without real queries a per-real ratio would keep nothing
    cap = min(data.max_generated or len(made), round(data.generated_per_real * len(ids)) if per_real else len(made))
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
    """The test split's judgements, or a seeded held-out part of the training split (``dev_fraction``).

    Empty (a label-free run) when the folder has no ``qrels/`` at all, so that a corpus alone distils with the
    default splits, or when ``eval_split`` is ``''``. A named split missing beside other splits stays an error: that
    is a typo or a broken folder, not a corpus-only one.
    """
    if not dataset.has_labels or not (config.data.eval_split or config.data.dev_fraction):
        return {}
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


def write_training_queries(out: Path, query_set: QuerySet) -> None:
    """``training_queries.jsonl``: what the student was trained on (id, text, whether generated)."""
    rows = zip(query_set.ids, query_set.texts, query_set.generated, strict=True)
    write_queries_jsonl(out / "training_queries.jsonl", [{"_id": i, "text": t, "generated": g} for i, t, g in rows])


# -- teacher, criterion, student initialisation ------------------------------------------------------------------


def load_dual_encoder(config: DistillConfig, name: str) -> DualEncoderTeacher:
    """A dual encoder with the run's cache and encoding settings: the teacher, or a CE run's first stage."""
    model = config.model
    return DualEncoderTeacher.load(
        name,
        cache_dir=model.cache_dir or None,
        device=device_of(config),
        batch_size=model.teacher_batch_size,
        compile=model.compile_teacher,
        max_seq_length=model.max_seq_length or None,
        trust_remote_code=model.trust_remote_code,
        query_prompt=model.query_prompt,
        document_prompt=model.document_prompt,
        truncate_dim=model.truncate_dim,
    )


def make_criterion(config: DistillConfig, temperatures: tuple[float, float]) -> EmbedDistillLoss:
    """The EmbedDistill loss with the run's weights (``<part>_weight`` each) and resolved temperatures."""
    teacher_t, student_t = temperatures
    return EmbedDistillLoss(
        LossWeights.from_config(config.loss),
        teacher_temperature=teacher_t,
        student_temperature=student_t,
        distance=config.loss.em_distance,
    )


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


def projection_init(option: str, asymmetric: bool) -> str:
    """``auto``: least squares for an asymmetric student (only queries go through the projection, and the best
    linear fit to the teacher is what they need); orthogonal for a symmetric one (documents go through it too, and
    an orthogonal map keeps the pretrained encoder's own geometry)."""
    if option != "auto":
        return option
    return "lstsq" if asymmetric else "orthogonal"


# -- evaluation --------------------------------------------------------------------------------------------------


def evaluate_queries(
    config: DistillConfig, name: str, prep, query_embeddings: np.ndarray, index: FlatIndex, k: int | None = None
) -> RunResult:
    """Search ``index`` with embeddings of ``prep``'s evaluation queries and score the run."""
    evaluation = config.evaluation
    return evaluate_embeddings(
        name,
        prep.eval_ids,
        query_embeddings,
        index,
        prep.eval_qrels,
        evaluation.metrics,
        k or evaluation.top_k,
        ignore_identical_ids=not evaluation.keep_identical_ids,
    )


def student_index(student, prep, batch_size: int = 32) -> FlatIndex:
    """The student's own index of the corpus (a symmetric student embeds documents too), as ``encode_document``
    gives it, on the run's device: training leaves the student on the CPU, where embedding a whole corpus is slow
    on a machine with a GPU. The student goes back to the CPU afterwards."""
    student.to(device_of(prep.config))
    try:
        documents = embed_corpus(student, prep, batch_size, "student index")
    finally:
        student.to("cpu")
    return FlatIndex(documents, prep.doc_ids)


def embed_corpus(model, prep, batch_size: int, desc: str) -> np.ndarray:
    """Every document of ``prep`` embedded by ``model`` through the fast encoding path, with a progress bar."""
    with tqdm(total=len(prep.doc_texts), desc=desc, unit="text", mininterval=2) as bar:
        return encode(model, prep.doc_texts, DOCUMENT, batch_size=batch_size, on_batch=bar.update)


def teacher_query_encoder(teacher: DualEncoderTeacher) -> QueryEncoder:
    return whole_model_query_encoder(teacher.model)


def whole_model_query_encoder(model) -> QueryEncoder:
    """The query encoder of a sentence-transformers model that embeds queries and documents alike (its modules)."""
    modules = torch.nn.Sequential(*model._modules.values())
    return QueryEncoder(modules, model.tokenizer, model.max_seq_length, query_prompt(model))


# -- off-the-shelf baselines ---------------------------------------------------------------------------------------


def baseline_models(config: DistillConfig) -> list[str]:
    """The off-the-shelf models to score beside the student (``evaluation.baselines``, ``auto`` resolved)."""
    names = []
    for name in config.evaluation.baselines:
        if name == "auto":
            student = config.model.student
            name = "" if student.startswith("teacher:") else student
        if name and name not in names:
            names.append(name)
    return names


def score_baseline(config: DistillConfig, prep, name: str) -> tuple[SentenceTransformer, dict[str, float]]:
    """``name`` used as it comes, searching its own index of the corpus: its metrics on the evaluation queries, or
    without them its label-free agreement with the teacher on the held-out training queries (over the whole
    corpus). Returns the model (its query encoder is timed beside the others) and the scores."""
    model = load_sentence_transformer(name, device=device_of(config), trust_remote_code=config.model.trust_remote_code)
    model.eval()
    query_texts = prep.eval_texts if prep.eval_ids else prep.validation.texts if prep.validation is not None else []
    if not query_texts:  # nothing to score it on: its size and latency alone
        return model.to("cpu"), {}
    batch_size = config.model.teacher_batch_size
    documents = _as_the_model_compares(model, embed_corpus(model, prep, batch_size, f"baseline {Path(name).name}"))
    queries = _as_the_model_compares(model, encode(model, query_texts, QUERY, batch_size=batch_size))
    if prep.eval_ids:
        scores = evaluate_queries(config, name, prep, queries, FlatIndex(documents, prep.doc_ids)).metrics
    else:
        scores = {AGREEMENT_METRIC: float(agreement_ndcg(queries @ documents.T, prep.validation.judged).mean())}
    return model.to("cpu"), scores


def scored_baselines(config: DistillConfig, prep) -> dict[str, tuple[SentenceTransformer, dict[str, float]]]:
    """Every baseline of ``config`` scored (:func:`score_baseline`): name -> (model, scores). One that cannot be
    loaded (a hub id with no network, say) is skipped with a warning: the trained student matters more."""
    scored = {}
    for name in baseline_models(config):
        try:
            scored[name] = score_baseline(config, prep, name)
        except (OSError, ValueError) as error:
            logger.warning("--baselines %s: skipped, it could not be loaded (%s)", name, error)
    return scored


def baseline_systems(baselines: dict[str, tuple], encoders: dict[str, QueryEncoder], latency: dict) -> dict:
    """name -> :class:`System` of each scored baseline, with the latency its query encoder (in ``encoders``) had."""
    return {
        name: described(encoders[name], name, scores, latency[name], asymmetric=False)
        for name, (_, scores) in baselines.items()
    }


def baseline_encoders(baselines: dict[str, tuple]) -> dict[str, QueryEncoder]:
    return {name: whole_model_query_encoder(model) for name, (model, _) in baselines.items()}


def _as_the_model_compares(model, embeddings: np.ndarray) -> np.ndarray:
    """Rows at unit length where the model compares by cosine, so that the inner-product index ranks as it would."""
    return embeddings if getattr(model, "similarity_fn_name", None) not in (None, "cosine") else unit_rows(embeddings)


def unit_rows(array: np.ndarray) -> np.ndarray:
    """Each row scaled to unit L2 length (an all-zero row stays zero)."""
    return array / np.maximum(np.linalg.norm(array, axis=1, keepdims=True), 1e-12)


def query_latency(config: DistillConfig, encoders: dict[str, QueryEncoder], texts: list[str]) -> dict[str, dict]:
    """CPU latency of each query encoder on the evaluation queries (median ms per batch size)."""
    evaluation = config.evaluation
    return measure_latency(encoders, texts, evaluation.latency_batch_sizes, evaluation.latency_repeats)


def described(encoder: QueryEncoder, model: str, metrics: dict[str, float], latency: dict, **details) -> System:
    """A :class:`System` for a query encoder: its metrics, CPU latency and size (with and without embeddings)."""
    return System(
        model,
        metrics,
        latency=latency,
        query_encoder_parameters=count_parameters(encoder.modules_),
        query_encoder_compute_parameters=count_parameters(encoder.modules_, include_embeddings=False),
        **details,
    )


# -- outputs -----------------------------------------------------------------------------------------------------


def write_outputs(out: Path, summary: RunSummary, results: list[RunResult]) -> None:
    """The run's files: one TREC run per system, ``metrics.json``, ``report.md`` and the student's model card."""
    for result in results:
        result.save(out)
    atomic_write_json(out / "metrics.json", summary.to_dict())
    write_report(out / "report.md", summary)
    write_model_card(out / "student", summary)
