"""embeddistill: distil large retrieval models into small, fast students (EmbedDistill, arXiv 2301.12005).

The public API, importable from the package itself::

    from embeddistill import DistillConfig, distill

    summary = distill(DistillConfig.from_dict({"dataset": "scifact", "teacher": "...", "out": "runs/x"}))
    Searcher("runs/index", "runs/x/student").search(["does vitamin D prevent fractures?"], k=10)

Names are imported on first use (PEP 562 ``__getattr__``), so ``import embeddistill`` and the command line's start
stay cheap: torch, transformers and FAISS load only when a name that needs them is touched. Where each concept
lives, and how the parts fit together: docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# name -> the module that defines it
_EXPORTS = {
    # a run
    "distill": "embeddistill.pipeline",
    "RunSummary": "embeddistill.pipeline.summary",
    # settings
    "DistillConfig": "embeddistill.config",
    "DataConfig": "embeddistill.config",
    "ModelConfig": "embeddistill.config",
    "LossConfig": "embeddistill.config",
    "TrainingConfig": "embeddistill.config",
    "EvaluationConfig": "embeddistill.config",
    "CrossEncoderConfig": "embeddistill.config",
    "TeacherTrainingConfig": "embeddistill.config",
    # data and generated queries
    "RetrievalDataset": "embeddistill.data",
    "GeneratedQuery": "embeddistill.querygen",
    "GENERATORS": "embeddistill.querygen",
    "make_generators": "embeddistill.querygen",
    # the losses
    "EmbedDistillLoss": "embeddistill.losses",
    "LossWeights": "embeddistill.losses",
    "LossTerm": "embeddistill.losses",
    "ScoreDistillationLoss": "embeddistill.losses",
    "EmbeddingMatchingLoss": "embeddistill.losses",
    "QueryEmbeddingMatchingLoss": "embeddistill.losses",
    "DocumentEmbeddingMatchingLoss": "embeddistill.losses",
    "LabelLoss": "embeddistill.losses",
    "MarginMSELoss": "embeddistill.losses",
    # models
    "build_student": "embeddistill.models.students",
    "QueryEncoder": "embeddistill.models.students",
    "DualEncoderTeacher": "embeddistill.models.teachers",
    "EmbeddingCache": "embeddistill.models.teachers",
    "DualPoolingCrossEncoder": "embeddistill.models.cross_encoders",
    "load_cross_encoder": "embeddistill.models.cross_encoders",
    "train_cross_encoder": "embeddistill.training.teacher_finetuning",
    # evaluation
    "evaluate_model": "embeddistill.evaluation.metrics",
    "score_run": "embeddistill.evaluation.metrics",
    "measure_latency": "embeddistill.evaluation.latency",
    "paired_permutation_test": "embeddistill.evaluation.significance",
    "rerank": "embeddistill.evaluation.reranking",
    # serving
    "FlatIndex": "embeddistill.serving.indexing",
    "SearchIndex": "embeddistill.serving.indexing",
    "Searcher": "embeddistill.serving.search",
    "Hit": "embeddistill.serving.search",
    "encode_corpus": "embeddistill.serving.search",
    "export_onnx": "embeddistill.serving.onnx",
    "OnnxQueryEncoder": "embeddistill.serving.onnx",
}

__all__ = [  # every entry of _EXPORTS, spelled out so that tools see the public names
    "__version__",
    "distill",
    "RunSummary",
    "DistillConfig",
    "DataConfig",
    "ModelConfig",
    "LossConfig",
    "TrainingConfig",
    "EvaluationConfig",
    "CrossEncoderConfig",
    "TeacherTrainingConfig",
    "RetrievalDataset",
    "GeneratedQuery",
    "GENERATORS",
    "make_generators",
    "EmbedDistillLoss",
    "LossWeights",
    "LossTerm",
    "ScoreDistillationLoss",
    "EmbeddingMatchingLoss",
    "QueryEmbeddingMatchingLoss",
    "DocumentEmbeddingMatchingLoss",
    "LabelLoss",
    "MarginMSELoss",
    "build_student",
    "QueryEncoder",
    "DualEncoderTeacher",
    "EmbeddingCache",
    "DualPoolingCrossEncoder",
    "load_cross_encoder",
    "train_cross_encoder",
    "evaluate_model",
    "score_run",
    "measure_latency",
    "paired_permutation_test",
    "rerank",
    "FlatIndex",
    "SearchIndex",
    "Searcher",
    "Hit",
    "encode_corpus",
    "export_onnx",
    "OnnxQueryEncoder",
]


def __getattr__(name: str):
    """Import ``name`` from its module on first access and keep it, so the next access is a plain lookup."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'embeddistill' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # what type checkers and IDEs see; at run time the names come from __getattr__
    from embeddistill.config import (
        CrossEncoderConfig,
        DataConfig,
        DistillConfig,
        EvaluationConfig,
        LossConfig,
        ModelConfig,
        TeacherTrainingConfig,
        TrainingConfig,
    )
    from embeddistill.data import RetrievalDataset
    from embeddistill.evaluation.latency import measure_latency
    from embeddistill.evaluation.metrics import evaluate_model, score_run
    from embeddistill.evaluation.reranking import rerank
    from embeddistill.evaluation.significance import paired_permutation_test
    from embeddistill.losses import (
        DocumentEmbeddingMatchingLoss,
        EmbeddingMatchingLoss,
        EmbedDistillLoss,
        LabelLoss,
        LossTerm,
        LossWeights,
        MarginMSELoss,
        QueryEmbeddingMatchingLoss,
        ScoreDistillationLoss,
    )
    from embeddistill.models.cross_encoders import DualPoolingCrossEncoder, load_cross_encoder
    from embeddistill.models.students import QueryEncoder, build_student
    from embeddistill.models.teachers import DualEncoderTeacher, EmbeddingCache
    from embeddistill.pipeline import distill
    from embeddistill.pipeline.summary import RunSummary
    from embeddistill.querygen import GENERATORS, GeneratedQuery, make_generators
    from embeddistill.serving.indexing import FlatIndex, SearchIndex
    from embeddistill.serving.onnx import OnnxQueryEncoder, export_onnx
    from embeddistill.serving.search import Hit, Searcher, encode_corpus
    from embeddistill.training.teacher_finetuning import train_cross_encoder
