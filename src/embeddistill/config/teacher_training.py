"""``embeddistill train-teacher``'s settings (a cross-encoder or dual-pooling teacher trained on labelled data)."""

from __future__ import annotations

from dataclasses import dataclass

from embeddistill.config.options import option


@dataclass
class TeacherTrainingConfig:
    """Settings of ``embeddistill train-teacher`` (each one a flag, built by :func:`add_config_arguments`)."""

    base: str = option("", "pretrained encoder or cross-encoder checkpoint (name or path)", required=True)
    datasets: list[str] = option([], "one or more BEIR datasets", required=True, flag="--dataset")
    split: str = option("train", "qrels split with the labelled training queries")
    out: str = option("", "output folder (safetensors weights, tokenizer, JSON config)", required=True, shapes=False)
    architecture: str = option(
        "dual-pooling",
        "dual-pooling (query and document segments pooled, s = <e_q, e_d>: it has embeddings to match) or standard "
        "(a one-logit classification head over [CLS]: scores only), from the same base and data",
        choices=["dual-pooling", "standard"],
    )
    negatives_from: str = option("", "dual encoder whose top documents are hard negatives (default: random documents)")
    positives_in_pool: bool = option(
        True, "positives: the judged documents the first stage ranks in its top depth + 50 (all where none is)"
    )
    distill_from: str = option("", "a standard cross-encoder whose scores are also distilled")
    distill_weight: float = option(1.0, "weight of score distillation from --distill-from", minimum=0.0)
    label_weight: float = option(
        1.0, "weight of the label loss (softmax cross-entropy against the positive)", minimum=0.0
    )
    group_size: int = option(
        8,
        "documents per query: 1 positive and group-size - 1 hard negatives",
        minimum=2,
        why="a positive and a negative",
    )
    hard_negative_depth: int = option(50, "hard negatives come from the first stage's top-k documents", minimum=1)
    epochs: int = option(3, "passes over the training queries", minimum=1)
    batch_size: int = option(32, "queries per step", minimum=1)
    learning_rate: float = option(3e-5, "AdamW peak learning rate", above=0.0)
    weight_decay: float = option(0.01, "AdamW weight decay", minimum=0.0)
    warmup_ratio: float = option(
        0.1, "fraction of steps with linear warm-up (then linear decay)", minimum=0.0, maximum=1.0
    )
    max_grad_norm: float = option(1.0, "gradient clipping norm (0 = off)", minimum=0.0)
    temperature: float = option(0.05, "softmax temperature of the normalised (cosine) scores", above=0.0)
    normalize: bool = option(True, "L2-normalise the pooled segment embeddings")
    max_length: int = option(256, "tokens per (query, document) pair", minimum=8)
    seed: int = option(42, "seed for sampling and initialisation")
    device: str = option("auto", "'auto', 'cpu' or 'cuda'", shapes=False)
    checkpoint_every: int = option(
        200, "save a resumable checkpoint every N steps (0 = only at the end)", minimum=0, shapes=False
    )
    resume: bool = option(False, "continue from OUT.checkpoint/", shapes=False)
    overwrite: bool = option(
        False, "start again although OUT.checkpoint/ holds an earlier run's checkpoint", shapes=False
    )
    cache_dir: str = option("", "embedding cache of --negatives-from", shapes=False)
    trust_remote_code: bool = option(
        False, "allow models that execute code from their repository (off unless asked)", shapes=False
    )
