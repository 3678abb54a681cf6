"""Helpers shared by the benchmark scripts (imported as ``_common``: the scripts run as ``python benchmarks/X.py``).

* :func:`local_model`: a model folder assembled by ``../shared/models/get-models``, or the hub name elsewhere.
* :func:`train_peer`: the peer, sentence-transformers' own ``EmbedDistillLoss`` trained by its own trainer.
* :func:`paired_permutation_test`: per-query significance of a difference between two systems.
* :func:`environment`: versions and machine, for the JSON every benchmark writes.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.attention import sdpa_kernel

from embeddistill.training import TRAINING_ATTENTION

REPO = Path(__file__).resolve().parents[1]
GET_MODELS = REPO.parent / "shared" / "models" / "get-models"


def local_model(name: str, hub_name: str) -> str:
    """The local folder of a model assembled by ``get-models``, or its hub name where that script is absent."""
    if not GET_MODELS.exists():
        return hub_name
    line = subprocess.run([str(GET_MODELS), name], check=True, capture_output=True, text=True).stdout.strip()
    return line.split("\t")[1]


def train_peer(student, texts: list[str], targets: np.ndarray, training, learning_rate: float, out: Path) -> float:
    """Train ``student`` with sentence-transformers' ``EmbedDistillLoss`` (L2, the paper's distance) and its trainer.

    ``targets`` are the teacher's embeddings of ``texts`` (the loss's labels); ``training`` is the run's
    ``TrainingConfig``, so epochs, batch size, warm-up and seed are ours. Returns the training seconds.
    Needs the ``datasets`` package (``pip install -e ".[bench]"``).
    """
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    try:  # sentence-transformers >= 6 moved the losses; 5.x keeps them in `losses`
        from sentence_transformers.sentence_transformer.losses import EmbedDistillLoss
    except ImportError:  # pragma: no cover - depends on the installed version
        from sentence_transformers.losses import EmbedDistillLoss

    device = str(next(student.parameters()).device)
    train = Dataset.from_dict({"text": texts, "label": targets.tolist()})
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out / "peer"),
        num_train_epochs=training.epochs,
        per_device_train_batch_size=training.batch_size,
        learning_rate=learning_rate,
        warmup_ratio=training.warmup_ratio,
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
    # The same attention kernels as our trainer: cuDNN's would plan each new batch shape on the CPU (see training.py)
    with sdpa_kernel(TRAINING_ATTENTION):
        trainer.train()
    return time.perf_counter() - started


def paired_permutation_test(
    a: dict[str, float], b: dict[str, float], rounds: int = 10000, seed: int = 0, chunk: int = 500
) -> float:
    """Two-sided p-value of the mean per-query difference under random sign flips (paired, same queries).

    The sign flips are drawn ``chunk`` rounds at a time so memory stays small for thousands of queries.
    """
    if set(a) != set(b):
        raise ValueError(f"paired test needs the same queries on both sides ({len(a)} vs {len(b)})")
    differences = np.array([a[q] - b[q] for q in sorted(a)])
    observed = abs(differences.mean()) if len(differences) else 0.0
    rng = np.random.default_rng(seed)
    at_least_as_extreme = 0
    for start in range(0, rounds, chunk):
        size = min(chunk, rounds - start)
        signs = rng.choice([-1.0, 1.0], size=(size, len(differences)))
        # A tiny tolerance: floating-point noise must not make an identical difference "less extreme".
        at_least_as_extreme += int((np.abs((signs * differences).mean(axis=1)) >= observed - 1e-12).sum())
    return float((at_least_as_extreme + 1) / (rounds + 1))


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


def environment() -> dict:
    """Versions and machine, recorded with every result."""
    import sentence_transformers
    import transformers

    from embeddistill import __version__
    from embeddistill.indexing import faiss  # None where it is not installed (exact search then uses torch)

    return {
        "git_commit": git_commit(),
        "versions": {
            "embeddistill": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "sentence-transformers": sentence_transformers.__version__,
            "faiss": faiss.__version__ if faiss is not None else None,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "platform": platform.platform(),
        },
    }
