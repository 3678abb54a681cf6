"""Helpers shared by the benchmark scripts (imported as ``_common``: the scripts run as ``python benchmarks/X.py``).

* :func:`local_model`: a model folder assembled by ``../shared/models/get-models``, or the hub name elsewhere.
* :func:`train_peer`: the peer, sentence-transformers' own ``EmbedDistillLoss`` trained by its own trainer.
* :func:`encode_values` / :func:`decode_values`: per-query scores as the result files store them.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.attention import sdpa_kernel

from embeddistill.runtime import TRAINING_ATTENTION

REPO = Path(__file__).resolve().parents[1]
# The benchmarks name the project's datasets by folder name; the library looks names up in $EMBEDDISTILL_DATA only.
os.environ.setdefault("EMBEDDISTILL_DATA", str(REPO.parent / "shared" / "datasets"))
GET_MODELS = REPO.parent / "shared" / "models" / "get-models"


def git_commit() -> str | None:
    """The commit the results come from: $EMBEDDISTILL_GIT_COMMIT (set where the code travels without its .git, as
    to a GPU machine), else ``git rev-parse HEAD`` here, marked ``-dirty`` when tracked files differ from it."""
    if os.environ.get("EMBEDDISTILL_GIT_COMMIT"):
        return os.environ["EMBEDDISTILL_GIT_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=REPO, capture_output=True, check=False)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.returncode else "")


def encode_values(values) -> str:
    """Per-query values as one space-separated string, 4 decimals: thousands of queries stay one line of JSON."""
    return " ".join(f"{round(float(value), 4):g}" for value in values)


def decode_values(text: str) -> list[float]:
    return [float(value) for value in text.split()]


def local_model(name: str, hub_name: str) -> str:
    """The local folder of a model assembled by ``get-models``, or its hub name where that script is absent."""
    if not GET_MODELS.exists():
        return hub_name
    line = subprocess.run([str(GET_MODELS), name], check=True, capture_output=True, text=True).stdout.strip()
    return line.split("\t")[1]


def same_as_ours(student, training) -> None:
    """Give the peer what is not the method the same as ours: dropout off and the token-embedding table frozen
    (our defaults; weight decay, clipping and the schedule go into its trainer's arguments)."""
    from embeddistill.models.students import trainable_parameters

    for module in student.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    trainable_parameters(student, freeze_word_embeddings=True)


def train_peer(student, texts: list[str], targets: np.ndarray, training, learning_rate: float, out: Path) -> float:
    """Train ``student`` with sentence-transformers' ``EmbedDistillLoss`` (L2, the paper's distance) and its trainer.

    ``targets`` are the teacher's embeddings of ``texts`` (the loss's labels); ``training`` is the run's
    ``TrainingConfig``, so epochs, step cap, batch size, warm-up and seed are ours. Returns the training seconds.
    Needs the ``datasets`` package (``pip install -e ".[bench]"``).
    """
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    try:  # sentence-transformers >= 6 moved the losses; 5.x keeps them in `losses`
        from sentence_transformers.sentence_transformer.losses import EmbedDistillLoss
    except ImportError:  # pragma: no cover - depends on the installed version
        from sentence_transformers.losses import EmbedDistillLoss

    device = str(next(student.parameters()).device)
    same_as_ours(student, training)
    train = Dataset.from_dict({"text": texts, "label": targets.tolist()})
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out / "peer"),
        num_train_epochs=training.epochs,
        max_steps=training.max_steps or -1,  # our step cap too (-1: none), as with every other setting
        per_device_train_batch_size=training.batch_size,
        learning_rate=learning_rate,
        warmup_ratio=training.warmup_ratio,
        weight_decay=training.weight_decay,
        max_grad_norm=training.max_grad_norm or 1e9,
        seed=training.seed,
        bf16=device.startswith("cuda"),
        save_strategy="no",
        report_to="none",
        logging_steps=50,
    )
    started = time.perf_counter()
    trainer = SentenceTransformerTrainer(
        model=student, args=args, train_dataset=train, loss=EmbedDistillLoss(student, distance_metric="l2")
    )
    # The same attention kernels as our trainer: cuDNN's would plan each new batch shape on the CPU
    # (see embeddistill.runtime)
    with sdpa_kernel(TRAINING_ATTENTION):
        trainer.train()
    return time.perf_counter() - started
