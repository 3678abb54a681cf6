"""Quality table (issue #5): students x methods on one dataset, against the teacher and BM25, with significance.

One command per table (per dataset); each writes ``benchmarks/results/quality_DATASET.json``:

    python benchmarks/quality.py --dataset scifact      # SciFact test; trained on its labelled train queries
    python benchmarks/quality.py --dataset nfcorpus     # NFCorpus test; trained on its labelled train queries
    python benchmarks/quality.py --dataset msmarco-dl   # TREC DL19 + DL20 on the msmarco-dl-pool corpus
    python benchmarks/quality.py --dataset squad        # SQuAD-dev, split by article (half train, half test)

Teacher: all-mpnet-base-v2 (``--teacher``). Students (``--students``), each in the teacher's space:

* ``mpnet-2L-asym``: ``teacher:2`` (the teacher's embeddings and first 2 layers), asymmetric;
* ``minilm-asym``: all-MiniLM-L6-v2 + a 384->768 projection, asymmetric (``--asymmetric``);
* ``minilm-2L-asym``: all-MiniLM-L6-v2's first 2 layers (``student_layers: 2``) + projection, asymmetric;
* ``minilm-sym``: all-MiniLM-L6-v2 + projection, symmetric (it embeds the documents too: its own index), what
  ``--student all-MiniLM-L6-v2`` gives, with its recipe (2 crops per document, 6 epochs or at most 2000 steps,
  unless set);
* ``mpnet-L0L11-asym``, ``mpnet-L1L11-asym``: the teacher's layers 0 and 11 (1 and 11) instead of its first two
  (``teacher:0,11``), asymmetric: candidates for which layers a 2-layer student keeps, compared on ``--dev``;
* ``minilm-L0L5-asym``: all-MiniLM-L6-v2's bottom and top layers (``student_layers: [0, -1]``) + projection,
  asymmetric: the same question for the 2-layer MiniLM student.

Methods (``--methods``): ``embeddistill`` (the library defaults: score + embedding matching + generated queries);
``score-only`` (query and document EM weights 0); ``peer`` (sentence-transformers' ``EmbedDistillLoss``, L2, trained
by its own trainer on the same initialised student, queries and epochs; a symmetric student's peer also gets the
corpus documents with the teacher's document embeddings as labels, as our document EM sees documents); ``untrained``
(the student as built, its projection fitted by least squares on the training queries, no training);
``embeddistill-dev`` (only when asked, with ``--dev-choice JSON``: EmbedDistill with options chosen on held-out
training queries by ``benchmarks/choose_defaults.py``, recorded in the row; where they change the training
data, more crops say, the row prepares its own queries and records their counts); ``teacher`` and ``bm25`` (the dataset
folder's ``runs/SPLIT.BM25.*.trec``, where present) are rows of the table too. Every row is scored by ir_measures on
the dataset's official qrels; EmbedDistill is compared with every other row of its table by a paired permutation
test on the same queries.

Choosing settings (``--dev``): the table is scored on 20% of the labelled training queries held out (SQuAD: whole
articles of its training half), and the test qrels are not read; ``benchmarks/results/recipe_dev/`` holds these
tables. ``--start-weight-sweep W...`` trains each EmbedDistill row once without averaging and scores its weights
averaged with the start at every W (``start_weight``) into the row's ``start_weight_sweep``, each with its
label-free agreement; the row itself is what the library's default gives (``benchmarks/start_weight.py`` reads them).

Resumable by row: each finished row is written into the JSON at once (atomically), and a rerun skips rows that are
already there (and, inside a row, resumes training from its checkpoint under ``--work-dir``). A rerun must use the
same settings (teacher, epochs, seed, overrides); pick another ``--out`` to change them. To fit short sessions, run
a few rows per command (``--students X --methods Y``): the teacher cache makes every command after the first cheap.
Several processes may fill one table at once (each row is added under a lock on the JSON):
``bash benchmarks/quality_parallel.sh DATASET [options]`` runs one process per student, which keeps a GPU far busier
than one process does (the students are small). On a GPU pass ``--latency-repeats 0``: the CPU latency of every
student is measured by ``benchmarks/speed_cpu.py`` on the CPU that serves it.

Output (schema ``embeddistill-quality/1``, read by ``benchmarks/report.py``): ``settings`` (what a rerun must
match), ``invocations`` (command, date, device, versions, machine, training-query counts, prepare seconds of each
run), ``students`` / ``methods`` (labels, table order), ``query_ids`` (per split), ``rows`` keyed ``teacher``,
``bm25`` and ``STUDENT/METHOD``, each with ``evaluations[split].metrics`` and ``.retention`` (over the teacher),
``per_query[split][metric]`` (values aligned with ``query_ids``, space-separated), ``training``, ``timings``,
``device``, ``finished``;
``significance[split][student][row]`` (p of that student's EmbedDistill row against the row, per metric);
``query_encoders[student]`` (parameters; CPU latency at batch 1 and 32, taking turns with the teacher's);
``unavailable`` and ``errors`` (rows that could not run, and why).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import fcntl
import json
import logging
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from _common import REPO, decode_values, encode_values, git_commit, local_model, train_peer
from _splits import document_group, write_group_split, write_held_out_split, write_merged_split

from embeddistill.config import DistillConfig, TrainingConfig, resolve_student_recipe
from embeddistill.data import load_qrels, read_trec_run, resolve_dataset
from embeddistill.evaluation.latency import measure_latency
from embeddistill.evaluation.metrics import score_run
from embeddistill.evaluation.significance import paired_permutation_test
from embeddistill.models.students import QueryEncoder, count_parameters, query_modules
from embeddistill.models.teachers import load_sentence_transformer
from embeddistill.pipeline.dual_encoder import Prepared, evaluate_student, initialised_student, prepare, train_student
from embeddistill.pipeline.stages import teacher_query_encoder
from embeddistill.runtime import environment_record, resolve_device
from embeddistill.serving.indexing import FlatIndex
from embeddistill.storage import atomic_write_json
from embeddistill.training.batching import rows_of_an_epoch
from embeddistill.training.distillation import repeats_of
from embeddistill.training.merging import merged_state, resolved_start_weight, snapshot

logger = logging.getLogger("quality")

SCHEMA = "embeddistill-quality/1"
METRICS = ("nDCG@10", "RR@10", "R@100")
# TREC DL judges on a 0-3 scale where 1 is "related": binary measures count grades >= 2, as the track does.
DL_METRICS = ("nDCG@10", "RR(rel=2)@10", "R(rel=2)@100")
EMBEDDISTILL = "embeddistill"
DEV_CHOSEN = "embeddistill-dev"
OFF_THE_SHELF = "all-MiniLM-L6-v2"  # the small model a user would otherwise pick, used as it comes (its own index)
DATASET_ROWS = ("teacher", "bm25", OFF_THE_SHELF)
DEV_FRACTION = 0.2  # --dev: the share of the labelled training queries held out (SQuAD: of the training articles)


@dataclass
class DatasetSpec:
    source: str
    description: str
    eval_splits: tuple[str, ...] = ("test",)
    metrics: tuple[str, ...] = METRICS
    options: dict = field(default_factory=dict)
    extra_query_files: tuple[str, ...] = ()  # relative to the source folder
    derive: str = ""  # "": use the folder as it is; "merged": one split = union of eval_splits; "by-article"


DATASETS = {
    "scifact": DatasetSpec("scifact", "SciFact test (300 queries); trained on the 809 labelled train queries"),
    "nfcorpus": DatasetSpec("nfcorpus", "NFCorpus test (323 queries); trained on the 2,590 labelled train queries"),
    "msmarco-dl": DatasetSpec(
        "msmarco-dl-pool",
        "TREC DL19 (43 topics) and DL20 (54 topics) on the 30,005-passage pool; trained without labels on the "
        "real MS MARCO dev-small and eval-small queries; official NIST qrels",
        eval_splits=("dl19", "dl20"),
        metrics=DL_METRICS,
        options={"train_split": ""},
        # Not dl20.all200.queries.tsv: it holds the DL20 topics themselves.
        extra_query_files=(
            "extra_queries/msmarco-passage.dev-small.queries.tsv",
            "extra_queries/msmarco-passage.eval-small.queries.tsv",
        ),
        derive="merged",
    ),
    "squad": DatasetSpec(
        "squad-dev",
        "SQuAD v1.1 dev as passage retrieval, split by article (seeded): trained on one half of the articles' "
        "questions, tested on the other half's; the corpus is all 2,067 paragraphs",
        derive="by-article",
    ),
}

STUDENTS = {
    "mpnet-2L-asym": ("teacher:2 (the teacher's first 2 layers), asymmetric", {"student": "teacher:2"}),
    "minilm-asym": ("all-MiniLM-L6-v2 + projection, asymmetric", {"student": "{minilm}", "asymmetric": True}),
    "minilm-2L-asym": (
        "all-MiniLM-L6-v2's first 2 layers + projection, asymmetric",
        {"student": "{minilm}", "student_layers": 2},
    ),
    "minilm-sym": ("all-MiniLM-L6-v2 + projection, symmetric", {"student": "{minilm}", "asymmetric": False}),
    # Candidates for which 2 teacher layers to keep (not in the headline unless chosen on dev)
    "mpnet-L0L11-asym": ("teacher:0,11 (the teacher's bottom and top layers), asymmetric", {"student": "teacher:0,11"}),
    "mpnet-L1L11-asym": ("teacher:1,11 (the teacher's 2nd and top layers), asymmetric", {"student": "teacher:1,11"}),
    "minilm-L0L5-asym": (
        "all-MiniLM-L6-v2's bottom and top layers + projection, asymmetric",
        {"student": "{minilm}", "student_layers": [0, -1]},
    ),
}

METHODS = {
    EMBEDDISTILL: ("EmbedDistill (score + embedding matching + generated queries)", {}),
    "score-only": ("score distillation only", {"query_em_weight": 0.0, "document_em_weight": 0.0}),
    "peer": ("peer: sentence-transformers EmbedDistillLoss (L2) with its trainer", {}),
    "untrained": ("student before distillation (projection fitted as training starts it)", {}),
    # Its options come from --dev-choice: settings chosen on held-out training queries, never on this table's split.
    DEV_CHOSEN: ("EmbedDistill, training settings chosen on dev queries for this student", {}),
}
DATASET_ROW_LABELS = {
    "teacher": "teacher",
    "bm25": "BM25 (the dataset folder's official run)",
    OFF_THE_SHELF: "all-MiniLM-L6-v2 as it comes (its own index, no projection, no training)",
}


# -- the dataset -----------------------------------------------------------------------------------------------


def dev_spec(spec: DatasetSpec) -> DatasetSpec:
    """The dataset's dev variant (``--dev``): scored on held-out training queries; the test split is never read."""
    if spec.options.get("train_split") == "":
        raise SystemExit(f"{spec.source} has no labelled training queries to hold out: --dev cannot score it")
    return dataclasses.replace(
        spec, description=f"dev: {DEV_FRACTION:.0%} of the training queries held out", eval_splits=("dev",),
        derive=f"dev-{spec.derive or 'random'}",
    )  # fmt: skip


def dataset_folder(spec: DatasetSpec, source: Path, work_dir: Path, seed: int) -> tuple[Path, str, dict]:
    """The BEIR folder the pipeline reads, the split it evaluates on, and how it was derived."""
    if spec.derive == "dev-random":
        return work_dir / "data", "dev", write_held_out_split(source, work_dir / "data", DEV_FRACTION, seed)
    if spec.derive == "dev-by-article":  # the article split first, then whole articles of its train side held out
        write_group_split(source, work_dir / "split", split="test", train_fraction=0.5, seed=seed)
        summary = write_held_out_split(work_dir / "split", work_dir / "data", DEV_FRACTION, seed, document_group)
        return work_dir / "data", "dev", summary
    if spec.derive == "merged":
        merged = "_".join(spec.eval_splits)
        return work_dir / "data", merged, write_merged_split(source, work_dir / "data", list(spec.eval_splits), merged)
    if spec.derive == "by-article":
        summary = write_group_split(source, work_dir / "data", split="test", train_fraction=0.5, seed=seed)
        return work_dir / "data", "test", summary
    return source, spec.eval_splits[0], {}


def scoring_qrels(folder: Path, splits: tuple[str, ...], known_queries: set[str]) -> dict[str, dict]:
    """The official judgements of every split, judged documents outside the corpus included (they still count in
    the ideal DCG, as in the official evaluation), for the queries the dataset knows."""
    qrels = {}
    for split in splits:
        raw = load_qrels(folder / "qrels" / f"{split}.tsv")
        qrels[split] = {query_id: judged for query_id, judged in raw.items() if query_id in known_queries}
    return qrels


def bm25_runs(source: Path, splits: tuple[str, ...]) -> dict[str, Path] | str:
    """``{split: run file}`` from the folder's ``runs/SPLIT.BM25.*.trec``, or why there is no BM25 row."""
    found = {}
    for split in splits:
        candidates = sorted((source / "runs").glob(f"{split}.BM25.*.trec"))
        if not candidates:
            return f"no runs/{split}.BM25.*.trec in {source}"
        found[split] = candidates[0]
    return found


# -- scoring ---------------------------------------------------------------------------------------------------


def score_splits(run: dict[str, dict[str, float]], qrels: dict[str, dict], metrics: list[str]) -> dict[str, dict]:
    """``{split: {"metrics": {...}, "per_query": {metric: {query: value}}}}`` of one run."""
    scored = {}
    for split, split_qrels in qrels.items():
        split_run = {query_id: run[query_id] for query_id in split_qrels if query_id in run}
        aggregate, per_query = score_run(split_run, split_qrels, metrics)
        scored[split] = {"metrics": aggregate, "per_query": per_query}
    return scored


def row_from_scores(scored: dict[str, dict], query_ids: dict[str, list[str]]) -> dict:
    """Aggregates per split, and per-query values aligned with ``query_ids`` (enough to recompute any paired test
    later, whichever rows finish first)."""
    return {
        "evaluations": {split: {"metrics": s["metrics"]} for split, s in scored.items()},
        "per_query": {
            split: {m: encode_values([values[q] for q in query_ids[split]]) for m, values in s["per_query"].items()}
            for split, s in scored.items()
        },
    }


def add_retention(row: dict, teacher_row: dict) -> None:
    for split, evaluation in row["evaluations"].items():
        teacher = teacher_row["evaluations"][split]["metrics"]
        evaluation["retention"] = {m: v / teacher[m] if teacher[m] else None for m, v in evaluation["metrics"].items()}


def update_significance(record: dict, rounds: int) -> None:
    """Paired permutation p-values of each student's EmbedDistill row against every other row of the table, for
    every metric and split; pairs already tested are kept (the per-query values of a finished row never change)."""
    rows, significance = record["rows"], record.setdefault("significance", {})
    for split, query_ids in record["query_ids"].items():
        for student in record["students"]:
            ours = rows.get(f"{student}/{EMBEDDISTILL}")
            if ours is None:
                continue
            others = [f"{student}/{m}" for m in record["methods"] if m != EMBEDDISTILL] + list(DATASET_ROWS)
            tested = significance.setdefault(split, {}).setdefault(student, {})
            for other in others:
                if other in rows and other not in tested:
                    tested[other] = {
                        metric: paired_permutation_test(
                            dict(zip(query_ids, decode_values(ours["per_query"][split][metric]), strict=True)),
                            dict(zip(query_ids, decode_values(rows[other]["per_query"][split][metric]), strict=True)),
                            rounds=rounds,
                        )
                        for metric in record["metrics"]
                    }


# -- rows ------------------------------------------------------------------------------------------------------


@dataclass
class Context:
    """What every row of one table shares: the prepared data and teacher, the qrels, the options."""

    args: argparse.Namespace
    base: dict
    prep: Prepared
    qrels: dict[str, dict]
    query_ids: dict[str, list[str]]
    work_dir: Path
    device: torch.device


def student_options(student: str, minilm: str) -> dict:
    """The student's distill options, with the MiniLM folder of this machine filled in."""
    options = dict(STUDENTS[student][1])
    if options["student"] == "{minilm}":
        options["student"] = minilm
    return options


def method_options(args: argparse.Namespace, method: str) -> dict:
    return {**METHODS[method][1], **(args.dev_choice if method == DEV_CHOSEN else {})}


def row_options(context: Context, student: str, method: str) -> dict:
    """The row's own distill options (recorded in the row): its student's, then its method's."""
    return {**student_options(student, context.args.minilm), **method_options(context.args, method)}


def row_config(context: Context, student: str, method: str, out: Path) -> DistillConfig:
    options = {**context.base, **row_options(context, student, method)}
    return resolve_student_recipe(DistillConfig.from_dict({**options, "out": str(out), "resume": True}))


def row_prep(context: Context, config: DistillConfig, out: Path) -> Prepared:
    """The shared training queries and teacher embeddings, or the row's own where its options change the training
    data (a dev-chosen ``crops_per_document``, say); the teacher cache keeps the corpus embeddings shared."""
    if config.data == context.prep.config.data:
        return dataclasses.replace(context.prep, config=config)
    logger.info("%s changes the training data: preparing its own training queries", out.name)
    return prepare(config, out / "prepare")


def evaluate(context: Context, prep: Prepared, student, name: str, own_index: bool | None = None) -> dict:
    student.to(context.device)
    result = evaluate_student(prep, student, name=name, own_index=own_index)
    student.to("cpu")
    return row_from_scores(score_splits(result.run, context.qrels, prep.config.evaluation.metrics), context.query_ids)


def peer_texts(prep) -> tuple[list[str], np.ndarray]:
    """The training queries as the peer's dataset: each real query as many times an epoch as our batcher shows it."""
    rows = rows_of_an_epoch(prep.query_set.generated, repeats_of(prep.config.training))
    return [prep.query_set.texts[i] for i in rows], prep.teacher_train[rows]


def run_method(context: Context, student: str, method: str):
    """Train (or not) one student with one method and score it. Returns the row's record and the student."""
    out = context.work_dir / "rows" / student / method
    out.mkdir(parents=True, exist_ok=True)
    prep = row_prep(context, row_config(context, student, method, out), out)
    random.seed(prep.config.training.seed)  # each row starts from the same state, whichever rows ran before it
    torch.manual_seed(prep.config.training.seed)
    started = time.perf_counter()
    training: dict = {}
    sweep: dict = {}
    if method == "untrained":
        model = initialised_student(prep)
        own_index = None
    elif method == "peer":
        symmetric = not prep.config.model.asymmetric
        model = initialised_student(prep, asymmetric=False)  # the peer's trainer knows no Router: the tower alone
        texts, targets = peer_texts(prep)
        if symmetric:  # it embeds documents too, so it learns them as our document EM does
            texts, targets = texts + prep.doc_texts, np.concatenate([targets, prep.teacher_docs])
        training["train_seconds"] = train_peer(
            model, texts, targets, prep.config.training, context.args.peer_learning_rate, out
        )
        training["learning_rate"] = context.args.peer_learning_rate
        training["texts"] = len(texts)
        own_index = symmetric
    elif method == EMBEDDISTILL and context.args.start_weight_sweep:
        model, training, sweep = train_and_sweep(context, prep, out)
        own_index = None
    else:
        model, training = train_student(prep, out)
        own_index = None
    trained = time.perf_counter()
    row = evaluate(context, prep, model, name=method, own_index=own_index)
    if sweep:
        row["start_weight_sweep"] = sweep
    row.update(
        student=student,
        method=method,
        label=METHODS[method][0],
        options=row_options(context, student, method),
        asymmetric=prep.config.model.asymmetric,
        training=training,
        training_queries=prep.query_set.counts,
        timings={"train_seconds": trained - started, "evaluation_seconds": time.perf_counter() - trained},
    )
    return row, model


def train_and_sweep(context: Context, prep: Prepared, out: Path):
    """Train once without averaging, then score the trained weights averaged with the start at every
    ``--start-weight-sweep`` W, each by the table's metrics and by the label-free check. The student returned holds
    the library's default W for this row (``start_weight: auto`` resolved), so the row is what ``distill`` gives."""
    default = resolved_start_weight(prep.config)
    unaveraged = dataclasses.replace(prep.config.training, start_weight=0.0)
    prep = dataclasses.replace(prep, config=dataclasses.replace(prep.config, training=unaveraged))
    student = initialised_student(prep)
    start = snapshot(student)
    model, training = train_student(prep, out, student)
    trained, tower = snapshot(model), query_modules(model)
    sweep = {}
    for weight in sorted(set(context.args.start_weight_sweep)):
        tower.load_state_dict(merged_state(trained, start, weight))
        scored = evaluate(context, prep, model, name=f"start_weight={weight:g}")
        model.to(context.device)
        scored["label_free"] = prep.validation.score(model) if prep.validation is not None else {}
        model.to("cpu")
        sweep[f"{weight:g}"] = scored
    tower.load_state_dict(merged_state(trained, start, default))
    training["start_weight"] = default
    return model, training, sweep


def describe_query_encoder(context: Context, student) -> dict:
    """Parameters of the student's query encoder and its CPU latency next to the teacher's (taking turns)."""
    encoder = QueryEncoder.of(student)
    described = {
        "parameters": count_parameters(encoder.modules_),
        "compute_parameters": count_parameters(encoder.modules_, include_embeddings=False),
    }
    if context.args.latency_repeats:
        teacher = teacher_query_encoder(context.prep.teacher)
        latency = measure_latency(
            {"teacher": teacher, "student": encoder}, context.prep.eval_texts, [1, 32], context.args.latency_repeats
        )
        context.prep.teacher.model.to(context.device)  # measure_latency moved it to the CPU
        described["latency_cpu_ms"] = latency
    return described


def teacher_row(context: Context) -> dict:
    prep = context.prep
    run = prep.teacher_index.retrieve(prep.eval_ids, prep.teacher_eval, prep.config.evaluation.top_k)
    row = row_from_scores(score_splits(run, context.qrels, prep.config.evaluation.metrics), context.query_ids)
    encoder = teacher_query_encoder(prep.teacher)
    row.update(
        method="teacher",
        label=DATASET_ROW_LABELS["teacher"],
        model=prep.config.model.teacher,
        query_encoder={
            "parameters": count_parameters(encoder.modules_),
            "compute_parameters": count_parameters(encoder.modules_, include_embeddings=False),
        },
    )
    return row


def off_the_shelf_row(context: Context) -> dict:
    """all-MiniLM-L6-v2 used as it comes: it embeds the corpus and the queries itself, at its own 256 tokens."""
    prep = context.prep
    model = load_sentence_transformer(context.args.minilm, device=str(context.device))
    encode = {"batch_size": 64, "convert_to_numpy": True, "show_progress_bar": True}
    index = FlatIndex(model.encode_document(prep.doc_texts, **encode), prep.doc_ids)
    run = index.retrieve(prep.eval_ids, model.encode_query(prep.eval_texts, **encode), prep.config.evaluation.top_k)
    row = row_from_scores(score_splits(run, context.qrels, prep.config.evaluation.metrics), context.query_ids)
    encoder = QueryEncoder(torch.nn.Sequential(*model._modules.values()), model.tokenizer, model.max_seq_length)
    row.update(
        method=OFF_THE_SHELF,
        label=DATASET_ROW_LABELS[OFF_THE_SHELF],
        model=Path(context.args.minilm).name,
        query_encoder={
            "parameters": count_parameters(encoder.modules_),
            "compute_parameters": count_parameters(encoder.modules_, include_embeddings=False),
        },
    )
    return row


def bm25_row(context: Context, runs: dict[str, Path]) -> dict:
    merged: dict[str, dict[str, float]] = {}
    for path in runs.values():
        merged.update(read_trec_run(path))
    row = row_from_scores(
        score_splits(merged, context.qrels, context.prep.config.evaluation.metrics), context.query_ids
    )
    row.update(method="bm25", label=DATASET_ROW_LABELS["bm25"], runs={s: p.name for s, p in runs.items()})
    return row


# -- the table -------------------------------------------------------------------------------------------------


def planned_rows(students: list[str], methods: list[str]) -> list[str]:
    """Row keys in the order they run: the dataset rows, then per student EmbedDistill first (so its paired tests
    can be filled in as soon as any other row of that student is done), then the other methods."""
    rows = [name for name in DATASET_ROWS if name in methods or name == "teacher"]
    student_methods = [m for m in METHODS if m in methods]
    ordered = sorted(student_methods, key=lambda m: m != EMBEDDISTILL)
    return rows + [f"{student}/{method}" for student in students for method in ordered]


def pending_rows(record: dict, planned: list[str]) -> list[str]:
    return [key for key in planned if key not in record["rows"]]


def settings_of(args: argparse.Namespace, spec: DatasetSpec) -> dict:
    """What must not change between the runs that fill one table (model folders by name: paths differ by
    machine)."""
    return {
        "dataset": args.dataset,
        "teacher": Path(args.teacher).name,
        "minilm": Path(args.minilm).name,
        "epochs": args.epochs,
        "seed": args.seed,
        "peer_learning_rate": args.peer_learning_rate,
        "overrides": args.overrides,
        **({"split_seed": args.split_seed} if args.split_seed is not None else {}),
        **({"dev": True} if args.dev else {}),
        "metrics": list(spec.metrics),
        "eval_splits": list(spec.eval_splits),
    }


def new_record(settings: dict, spec: DatasetSpec) -> dict:
    return {
        "schema": SCHEMA,
        "dataset": settings["dataset"],
        "description": spec.description,
        "settings": settings,
        "metrics": list(spec.metrics),
        "eval_splits": list(spec.eval_splits),
        "students": {},
        "methods": {},
        "query_encoders": {},
        "rows": {},
        "invocations": [],
    }


def load_or_start_record(path: Path, settings: dict, spec: DatasetSpec) -> dict:
    if not path.exists():
        return new_record(settings, spec)
    record = json.loads(path.read_text(encoding="utf-8"))
    if record.get("schema") != SCHEMA:
        raise SystemExit(f"{path}: not a quality table ({record.get('schema')!r}); choose another --out")
    if record["settings"] != settings:
        raise SystemExit(
            f"{path} was made with other settings:\n  {record['settings']}\nnow:\n  {settings}\n"
            "rerun with those settings to resume it, or choose another --out"
        )
    return record


@contextlib.contextmanager
def locked(path: Path):
    """An exclusive lock beside ``path``: several processes (one per student, say) can fill one table."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def commit(args: argparse.Namespace, spec: DatasetSpec, update) -> dict:
    """Read the table as it is on disk now (other processes may have added rows), apply ``update`` to it, recompute
    the derived fields and write it atomically, all under the table's lock. Returns the table written."""
    with locked(args.out):
        record = load_or_start_record(args.out, settings_of(args, spec), spec)
        update(record)
        for field_name, order in (("students", STUDENTS), ("methods", METHODS)):  # table order, whoever came first
            record[field_name] = {key: record[field_name][key] for key in order if key in record[field_name]}
        if "teacher" in record["rows"]:
            for finished in record["rows"].values():
                add_retention(finished, record["rows"]["teacher"])
        if "query_ids" in record:
            update_significance(record, args.permutation_rounds)
        record["date"] = _now()
        atomic_write_json(args.out, record)
    return record


def parse_overrides(pairs: list[str]) -> dict:
    overrides = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator:
            raise SystemExit(f"--set expects KEY=VALUE, got {pair!r}")
        overrides[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return overrides


def epochs_value(text: str) -> int | str:
    return text if text == "auto" else int(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    parser.add_argument("--dataset-path", default="", help="the source BEIR folder (default: found by name)")
    parser.add_argument("--teacher", default="", help="default: all-mpnet-base-v2 from ../shared/models/get-models")
    parser.add_argument(
        "--max-seq-length", type=int, default=256, help="teacher tokens per text (256: half of mpnet's cost at 384)"
    )
    parser.add_argument("--minilm", default="", help="all-MiniLM-L6-v2 folder for the MiniLM students")
    parser.add_argument("--students", nargs="+", default=list(STUDENTS), choices=list(STUDENTS))
    parser.add_argument(
        "--methods",
        nargs="+",
        default=[*DATASET_ROWS, *(m for m in METHODS if m != DEV_CHOSEN)],
        choices=[*DATASET_ROWS, *METHODS],
    )
    parser.add_argument(
        "--dev-choice",
        type=json.loads,
        default={},
        metavar="JSON",
        help=f"distill options of the '{DEV_CHOSEN}' method, chosen on dev queries (benchmarks/choose_defaults.py)",
    )
    parser.add_argument(
        "--epochs", type=epochs_value, default=TrainingConfig().epochs, help="default: the library's (auto: by student)"
    )
    parser.add_argument("--seed", type=int, default=42, help="training seed (and, by default, the SQuAD split's)")
    parser.add_argument(
        "--split-seed",
        type=int,
        default=None,
        help="seed of the SQuAD article split (default: --seed); fixed across "
        "training seeds so that every seed is tested on the same questions",
    )
    parser.add_argument(
        "--peer-learning-rate",
        type=float,
        default=1e-3,
        help="the peer's learning rate (ours; the ablation found it better for the peer than 2e-4)",
    )
    parser.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda' (training and teacher encoding)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any distill option for every row, e.g. --set max_generated=20000 (recorded)",
    )
    parser.add_argument(
        "--dev",
        action="store_true",
        help=f"score on {DEV_FRACTION * 100:.0f}%% of the labelled training queries held out (SQuAD: whole training "
        "articles) instead of the test split, to choose settings; the test qrels are not read",
    )
    parser.add_argument(
        "--start-weight-sweep",
        type=float,
        nargs="+",
        default=[],
        metavar="W",
        help="EmbedDistill rows: train once without averaging, then score the weights averaged with the start at "
        "each W (start_weight) as the row's start_weight_sweep; the row itself is the library's default W",
    )
    parser.add_argument("--latency-repeats", type=int, default=20, help="CPU latency repeats per batch size (0: skip)")
    parser.add_argument("--permutation-rounds", type=int, default=10000)
    parser.add_argument("--cache-dir", default="", help="teacher embedding cache (default: the library's)")
    parser.add_argument("--out", default="", help="default: benchmarks/results/quality_DATASET.json")
    parser.add_argument("--work-dir", default="", help="checkpoints and derived data (default: runs/quality/DATASET)")
    args = parser.parse_args(argv)
    args.overrides = parse_overrides(args.overrides)
    if DEV_CHOSEN in args.methods and not args.dev_choice:
        parser.error(f"the {DEV_CHOSEN} method needs --dev-choice (its options, chosen on dev queries)")
    args.teacher = args.teacher or local_model("mpnet", "sentence-transformers/all-mpnet-base-v2")
    args.minilm = args.minilm or local_model("minilm", "sentence-transformers/all-MiniLM-L6-v2")
    args.out = Path(args.out or REPO / "benchmarks" / "results" / f"quality_{args.dataset}.json")
    args.work_dir = Path(args.work_dir or REPO / "runs" / "quality" / args.dataset)
    return args


def split_seed(args: argparse.Namespace) -> int:
    return args.seed if args.split_seed is None else args.split_seed


def base_options(args: argparse.Namespace, spec: DatasetSpec, source: Path, folder: Path, eval_split: str) -> dict:
    return {
        "teacher": args.teacher,
        "max_seq_length": args.max_seq_length,
        "dataset": str(folder),
        "eval_split": eval_split,
        "extra_queries": [str(source / name) for name in spec.extra_query_files],
        "metrics": list(spec.metrics),
        "epochs": args.epochs,
        "seed": args.seed,
        "device": args.device,
        "cache_dir": args.cache_dir,
        **spec.options,
        **args.overrides,
    }


def start(args: argparse.Namespace, spec: DatasetSpec) -> tuple[Context, dict]:
    """Derive the data folder, prepare the training queries and the teacher's embeddings (cached), load qrels."""
    source = Path(args.dataset_path) if args.dataset_path else resolve_dataset(spec.source)
    folder, eval_split, derivation = dataset_folder(spec, source, args.work_dir, split_seed(args))
    base = base_options(args, spec, source, folder, eval_split)
    tick = time.perf_counter()
    prep = prepare(DistillConfig.from_dict({**base, "out": str(args.work_dir / "prepare")}), args.work_dir / "prepare")
    qrels = scoring_qrels(folder, spec.eval_splits, set(prep.eval_ids))
    query_ids = {split: sorted(split_qrels) for split, split_qrels in qrels.items()}
    device = resolve_device(args.device)
    context = Context(args, base, prep, qrels, query_ids, args.work_dir, device)
    facts = {
        "source": str(source),
        "derivation": derivation,
        "training_queries": prep.query_set.counts,
        "eval_queries": {split: len(ids) for split, ids in query_ids.items()},
        "documents": len(prep.doc_ids),
        "prepare_seconds": time.perf_counter() - tick,
    }
    return context, facts


def run_row(context: Context, key: str, bm25: dict | str, described: set[str]) -> tuple[dict, dict | None]:
    """Run one row. The first row of a student not yet ``described`` also describes its query encoder (size, CPU
    latency), returned second."""
    if key == "teacher":
        return teacher_row(context), None
    if key == "bm25":
        return bm25_row(context, bm25), None
    if key == OFF_THE_SHELF:
        return off_the_shelf_row(context), None
    student, method = key.split("/")
    row, model = run_method(context, student, method)
    return row, None if student in described else describe_query_encoder(context, model)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    spec = dev_spec(DATASETS[args.dataset]) if args.dev else DATASETS[args.dataset]
    command = "python benchmarks/quality.py " + " ".join(sys.argv[1:] if argv is None else argv)
    students = {s: STUDENTS[s][0] for s in args.students}
    methods = {m: METHODS[m][0] for m in METHODS if m in args.methods}

    def register(record: dict) -> None:
        record.setdefault("command", command)
        record["students"].update(students)
        record["methods"].update(methods)

    record = commit(args, spec, register)
    planned = planned_rows(args.students, args.methods)
    todo = pending_rows(record, planned)
    logger.info("%d of %d rows already in %s; to run: %s", len(planned) - len(todo), len(planned), args.out, todo)
    if not todo:
        return 0
    context, facts = start(args, spec)
    bm25 = bm25_runs(Path(facts["source"]), spec.eval_splits)
    invocation = {
        "command": command,
        "started": _now(),
        "device": str(context.device),
        "git_commit": git_commit(),
        **environment_record(),
        **facts,
    }

    def begin(record: dict) -> None:
        record["invocations"].append(invocation)
        record.update(training_queries=facts["training_queries"], eval_queries=facts["eval_queries"])
        record["query_ids"] = context.query_ids
        if isinstance(bm25, str):
            record.setdefault("unavailable", {})["bm25"] = bm25

    record = commit(args, spec, begin)
    failed = False
    for key in todo:
        if key in record["rows"] or (key == "bm25" and isinstance(bm25, str)):
            continue  # another process sharing the table did it meanwhile, or there is no BM25 run
        logger.info("row %s", key)
        started = time.perf_counter()
        try:
            row, described = run_row(context, key, bm25, set(record["query_encoders"]))
        except Exception as error:  # one failing row (say, the peer's missing dependency) must not cost the others
            logger.exception("row %s failed; the other rows go on, and a rerun tries it again", key)
            failed = True
            message = {key: repr(error)}
            record = commit(args, spec, lambda r, message=message: r.setdefault("errors", {}).update(message))
            continue
        row.update(
            finished=_now(),
            device=str(context.device),
            wall_seconds=time.perf_counter() - started,
            git_commit=invocation["git_commit"],
        )

        def add_row(record: dict, key=key, row=row, described=described) -> None:
            record["rows"][key] = row
            record.setdefault("errors", {}).pop(key, None)
            if described is not None:
                record["query_encoders"][row["student"]] = described

        record = commit(args, spec, add_row)
        logger.info("%s: %s", key, {s: e["metrics"] for s, e in row["evaluations"].items()})
    return 1 if failed else 0


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


if __name__ == "__main__":
    sys.exit(main())
