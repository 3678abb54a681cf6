"""``embeddistill distill``'s settings: :class:`DistillConfig` and its sections, one per concern (data, model,
loss, training, evaluation) plus one per teacher lane that needs its own (``ce``: cross-encoder teachers, ``api``:
black-box teachers). Every field name is unique across sections, so each is also a flag and a flat YAML key."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from embeddistill.config.options import apply_arguments, apply_overrides, flatten, option

MIN_BATCH_SIZE = 2  # distill: one query and its in-batch negatives from at least one other
SECTION_NAMES = ("data", "model", "loss", "training", "evaluation", "ce", "api")


@dataclass
class DataConfig:
    dataset: str = option(
        "",
        "BEIR-layout folder, or a name: looked up in $EMBEDDISTILL_DATA, else on the Hugging Face hub (mteb/NAME, "
        "BeIR/NAME; converted once into ~/.cache/embeddistill/datasets/NAME)",
    )
    train_split: str = option("train", "qrels split whose queries are labelled training queries ('' for none)")
    eval_split: str = option("test", "qrels split to evaluate on")
    dev_fraction: float = option(
        0.0,
        "hold out this fraction of the labelled training queries as the evaluation set (eval_split ignored)",
        minimum=0.0,
        maximum=0.9,
    )
    extra_queries: list[str] = option([], "extra unlabeled query files (.jsonl with _id/text, or .tsv id<TAB>text)")
    train_query_fraction: float = option(
        1.0, "use this fraction of the labelled training queries (sparse-data runs)", above=0.0, maximum=1.0
    )
    crops_per_document: int = option(
        "auto",
        "cheap generated queries: random 8-16-word spans per document (fewer on a large corpus: crop_budget); "
        "'auto': 24, or 2 for a symmetric student that starts as a whole pretrained model",
        special=("auto",),
        minimum=0,
    )
    crop_budget: int = option(
        150000,
        "a corpus with more than crop_budget / crops_per_document documents gets fewer crops each (at least "
        "one), about this many in all (0 = crops_per_document whatever the corpus)",
        minimum=0,
    )
    perturbations_per_query: int = option(2, "cheap generated queries: perturbed copies per real query", minimum=0)
    max_generated: int = option(0, "cap on generated queries, sampled at random (0 = no cap)", minimum=0)
    generated_per_real: float = option(
        0.0,
        "mix ratio: at most this many generated queries per real (labelled or extra) query (0 = no limit)",
        minimum=0.0,
    )
    roundtrip_top_k: int = option(
        0,
        "round-trip filter: keep a generated query only if the teacher ranks its source document in its top k",
        minimum=0,
    )
    validation_queries: int = option(
        500,
        "hold out this many training queries (seeded, at most a tenth) for the label-free check: the student's "
        "agreement with the teacher's own rankings picks the best checkpoint and --learning-rate auto (0 = off)",
        minimum=0,
    )


@dataclass
class ModelConfig:
    teacher: str = option("", "teacher: a sentence-transformers model name or local path")
    student: str = option("teacher:0,-1", "query encoder: 'teacher:0,-1' (bottom, top layer), 'teacher:N' or a model")
    student_layers: list[int] = option(
        [], "layers of a named student to keep: N the first N, '0 -1' its bottom and top ones (none = all)"
    )
    asymmetric: bool = option(
        "auto",
        "keep the teacher's document tower frozen and train only a query encoder; 'auto': symmetric for a student "
        "that starts as a whole pretrained model (it keeps its own index), asymmetric for any other",
        special=("auto",),
    )
    projection_init: str = option(
        "auto",
        "init of the student->teacher projection: 'lstsq' (least squares on training queries), 'orthogonal' "
        "(Procrustes: keeps the student's own cosines), 'random', or 'auto' (orthogonal for symmetric students, "
        "whose documents go through it too; lstsq for asymmetric ones)",
        choices=["auto", "lstsq", "orthogonal", "random"],
    )
    freeze_word_embeddings: bool = option(True, "do not train the student's token-embedding table")
    student_dropout: bool = option(False, "keep the student's dropout in training (off: match the teacher exactly)")
    query_prompt: str = option(
        "",
        "prompt put before every query the teacher embeds, e.g. 'query: ' (default: the teacher's own, none for an "
        "endpoint; 'none' for no prompt); part of the teacher-cache key",
    )
    document_prompt: str = option(
        "",
        "prompt put before every document the teacher embeds, e.g. 'passage: ' (default: the teacher's own, none "
        "for an endpoint; 'none' for no prompt); part of the teacher-cache key, and kept by an asymmetric student's "
        "document side",
    )
    student_query_prompt: str = option(
        "auto",
        "prompt the student is trained and saved with before every query: 'auto' (the teacher's query prompt for a "
        "'teacher:N' student, none for another model), 'none', or the prompt itself",
    )
    truncate_dim: int = option(
        0,
        "Matryoshka teachers: keep the first N dimensions of the teacher's embeddings, renormalised (0 = all); "
        "part of the teacher-cache key, and the student's projection outputs N",
        minimum=0,
    )
    teacher_batch_size: int = option(32, "batch size when the teacher encodes texts", minimum=1, shapes=False)
    compile_teacher: bool = option(False, "the teacher encodes through torch.compile (large corpora)", shapes=False)
    max_seq_length: int = option(0, "teacher maximum tokens (0 = the model's own setting)", minimum=0)
    cache_dir: str = option(
        "", "teacher embedding cache (default $EMBEDDISTILL_CACHE or ~/.cache/embeddistill)", shapes=False
    )
    trust_remote_code: bool = option(
        False, "allow models that execute code from their repository (off unless asked)", shapes=False
    )


@dataclass
class LossConfig:
    score_weight: float = option(
        1.0, "weight of score distillation (softmax cross-entropy over candidates)", minimum=0.0
    )
    query_em_weight: float = option(1.0, "weight of query embedding matching", minimum=0.0)
    document_em_weight: float = option(1.0, "weight of document embedding matching (symmetric students)", minimum=0.0)
    label_weight: float = option(0.0, "weight of the one-hot in-batch label loss on labelled positives", minimum=0.0)
    margin_mse_weight: float = option(0.0, "weight of Margin-MSE against the anchor document", minimum=0.0)
    em_distance: str = option("l2", "embedding-matching distance", choices=["l2", "squared_l2", "cosine"])
    teacher_temperature: float = option(
        0.0, "teacher softmax temperature (0 = 0.05 for normalised teachers, else 1)", minimum=0.0
    )
    student_temperature: float = option(0.0, "student softmax temperature (0 = same as the teacher's)", minimum=0.0)
    hard_negatives: int = option(8, "hard negatives per query, sampled from the teacher's top documents", minimum=0)
    hard_negative_depth: int = option(
        50, "sample hard negatives from the teacher's top-k (labelled positives excluded)", minimum=1
    )


@dataclass
class TrainingConfig:
    epochs: int = option(
        "auto",
        "passes over the training queries (more varied crops beat more passes); 'auto': 3, or 6 for a symmetric "
        "student that starts as a whole pretrained model",
        special=("auto",),
        minimum=1,
    )
    batch_size: int = option(
        64,
        "queries per step",
        minimum=MIN_BATCH_SIZE,
        why="in-batch negatives: each query is scored against the other queries' documents in its batch",
    )
    learning_rate: float = option(
        "auto",
        "AdamW peak learning rate of the student's encoder, or 'auto': short runs at each of "
        "learning_rate_candidates, the best label-free teacher agreement wins (needs validation_queries)",
        special=("auto",),
        above=0.0,
    )
    learning_rate_candidates: list[float] = option(
        [1e-3, 1e-4, 2e-5],
        "what --learning-rate auto chooses among (pretrained encoders need far less than 1e-3)",
        above=0.0,
    )
    tune_steps: int = option(200, "--learning-rate auto: steps of each short run (at most the full run's)", minimum=1)
    projection_learning_rate: float = option(
        1e-3, "peak learning rate of the student->teacher projection (0 = the encoder's learning rate)", minimum=0.0
    )
    max_steps: int = option(
        "auto",
        "stop after this many optimiser steps (0 = run every epoch); 'auto': 2000 for a symmetric student that "
        "starts as a whole pretrained model (each of its steps embeds every candidate document), else 0",
        special=("auto",),
        minimum=0,
    )
    real_query_passes: int = option(
        0,
        "about how often a run shows the student each real (labelled or extra) query: repeated round(passes / "
        "epochs) times an epoch, generated ones once (0 = once an epoch; 6 lowered teacher:0,11's dev nDCG@10 on "
        "SciFact, NFCorpus and SQuAD)",
        minimum=0,
    )
    validate_every: int = option(0, "label-free check every N steps (0 = 8 times a run, and at the start)", minimum=0)
    keep_best: bool = option(True, "end with the weights of the best label-free check, the start included")
    start_weight: float = option(
        "auto",
        "after training, average the weights with the starting ones, this share to the start ((1-w)*trained + "
        "w*start, WiSE-FT); 'auto': 0.5 for a symmetric student that starts as a whole pretrained model, else 0",
        special=("auto",),
        minimum=0.0,
        maximum=1.0,
    )
    weight_decay: float = option(0.01, "AdamW weight decay", minimum=0.0)
    warmup_ratio: float = option(
        0.1, "fraction of steps with linear warm-up (then linear decay)", minimum=0.0, maximum=1.0
    )
    max_grad_norm: float = option(1.0, "gradient clipping norm (0 = off)", minimum=0.0)
    seed: int = option(42, "seed for sampling, generation and initialisation")
    checkpoint_every: int = option(
        200, "save a resumable checkpoint every N steps (0 = only at the end)", minimum=0, shapes=False
    )
    resume: bool = option(False, "resume training from the last checkpoint in the output folder", shapes=False)
    overwrite: bool = option(
        False, "start again in an output folder that holds an earlier run's checkpoint (deleting it)", shapes=False
    )
    device: str = option("auto", "'auto', 'cpu' or 'cuda'", shapes=False)
    precision: str = option(
        "auto",
        "autocast: 'auto' (bf16 where the hardware has it natively, else fp32), 'fp32' or 'bf16'",
        choices=["auto", "fp32", "bf16"],
    )
    threads: int = option(0, "CPU threads for torch (0 = torch's default)", minimum=0, shapes=False)


@dataclass
class EvaluationConfig:
    top_k: int = option(100, "documents retrieved per query", minimum=1, shapes=False)
    metrics: list[str] = option(["nDCG@10", "RR@10", "R@100"], "ir_measures metric names", shapes=False)
    keep_identical_ids: bool = option(
        False,
        "count a document whose id is the query's own id as a hit (off: BEIR's and MTEB's ignore_identical_ids, "
        "which duplicate-question and counter-argument sets need to match published scores)",
        shapes=False,
    )
    latency_repeats: int = option(
        50, "timed repeats per batch size for CPU query latency (median reported)", minimum=1, shapes=False
    )
    latency_batch_sizes: list[int] = option([1, 32], "batch sizes for CPU query latency", minimum=1, shapes=False)
    baselines: list[str] = option(
        ["auto"],
        "off-the-shelf models scored beside the student, each searching its own index of the corpus: what a user "
        "would serve instead of distilling ('auto': the student's own model as it comes, unless the student is "
        "teacher layers; '' for none)",
        shapes=False,
    )


@dataclass
class CrossEncoderConfig:
    """Settings that only a cross-encoder teacher reads (``--cross-encoder``); a dual-encoder run ignores them.

    A section of their own so that the dual-encoder sections describe one lane only; the field names (and so the
    flags and flat YAML keys) are the ones they always had.
    """

    cross_encoder: str = option(
        "",
        "cross-encoder teacher (a dual-pooling CE folder from 'train-teacher', or any HF sequence-classification / "
        "sentence-transformers CrossEncoder); the student is then symmetric and --teacher is not needed",
    )
    first_stage: str = option(
        "", "cross-encoder teachers: the dual encoder whose top documents are the candidates (default: --teacher)"
    )
    cross_encoder_batch_size: int = option(64, "pairs per cross-encoder scoring batch", minimum=1, shapes=False)
    cross_encoder_max_length: int = option(0, "cross-encoder tokens per pair (0 = the model's own)", minimum=0)
    ce_query_target: str = option(
        "anchor",
        "cross-encoder EM target of a query: its segment embedding paired with its anchor document, or the mean "
        "over all its candidates",
        choices=["anchor", "mean"],
    )
    ce_document_target: str = option(
        "mean",
        "cross-encoder EM target of a document: the mean of its segment embeddings over every pairing, or the one "
        "paired with a query it is the anchor of (mean where it is none's)",
        choices=["mean", "anchor"],
    )
    ce_random_negatives: int = option(
        4,
        "cross-encoder teachers: random documents added to every query's scored candidates (in-batch-like)",
        minimum=0,
    )
    rerank_depth: int = option(100, "cross-encoder teachers: first-stage documents reranked per query", minimum=1)


@dataclass
class TeacherApiConfig:
    """A black-box teacher: an OpenAI-compatible endpoint (``--teacher http://HOST/v1``) or given vectors."""

    teacher_api_model: str = option("", "API teachers: the model name sent with each /v1/embeddings request")
    teacher_api_key_env: str = option("", "API teachers: environment variable with the API key ('' for none)")
    teacher_api_input_type: bool = option(False, "API teachers: send input_type query/document (embeddistill serve)")
    teacher_concurrency: int = option(4, "API teachers: requests in flight at once", minimum=1, shapes=False)
    teacher_retries: int = option(6, "API teachers: retries on 429/5xx/connection errors", minimum=0, shapes=False)
    teacher_timeout: float = option(60.0, "API teachers: seconds to wait for one response", above=0.0, shapes=False)
    teacher_max_requests: int = option(
        0, "API teachers: stop after this many requests, keeping what came back (0 = no limit)", minimum=0, shapes=False
    )
    teacher_documents: str = option("", "teacher document vectors: .npy (ids in .ids.txt), .parquet or an index folder")
    teacher_queries: str = option(
        "", "the teacher's query embeddings (.npy + ids or .parquet, by query id); default: the --teacher endpoint"
    )


@dataclass
class DistillConfig:
    out: str = option("", "output folder", shapes=False)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    ce: CrossEncoderConfig = field(default_factory=CrossEncoderConfig)
    api: TeacherApiConfig = field(default_factory=TeacherApiConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, values: dict) -> DistillConfig:
        config = cls()
        apply_overrides(config, flatten(values, section_names=SECTION_NAMES), source="config")
        return config

    @classmethod
    def from_yaml(cls, path: str | Path) -> DistillConfig:
        try:
            values = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"{path}: not valid YAML: {error}") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of options at the top level")
        config = cls()
        apply_overrides(config, flatten(values, str(path), SECTION_NAMES), source=str(path))
        return config


def config_from_args(args: argparse.Namespace) -> DistillConfig:
    """``distill``: defaults, then ``--config`` YAML, then flags."""
    config = DistillConfig.from_yaml(args.config) if getattr(args, "config", None) else DistillConfig()
    return apply_arguments(config, args)
