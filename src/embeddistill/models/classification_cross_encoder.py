"""A trainable standard cross-encoder: a one-logit classification head over the encoder's [CLS] state.

``embeddistill train-teacher --architecture standard`` trains it from the same initialisation and data as the
dual-pooling CE, so that the two teachers compare like with like (EmbedDistill, arXiv 2301.12005, sec. 4.2: the
dual-pooling CE gives its student embeddings to match; a standard CE gives only scores). It is saved in the
Hugging Face sequence-classification layout, so :class:`~embeddistill.models.cross_encoders.CrossEncoderTeacher`,
``sentence_transformers.CrossEncoder`` and ``transformers`` all load it.

``forward(features)`` returns ``(scores (B,), None, None)``: the logit of each (query, document) pair.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from embeddistill.models.cross_encoders import _PairScorer
from embeddistill.storage import atomic_write_json, replace_folder

TRAINING_RECORD = "train_teacher.json"


class ClassificationCrossEncoder(nn.Module, _PairScorer):
    """``s(q, d) = w^T h_[CLS](q, d) + b`` (the classification head ``transformers`` puts on the encoder)."""

    has_embeddings = False
    default_temperature = 1.0  # logits: softmax over them as they are

    def __init__(self, model: nn.Module, tokenizer, max_length: int = 256, name: str = ""):
        nn.Module.__init__(self)
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self._max_length = max_length

    @property
    def max_length(self) -> int:  # type: ignore[override]
        return self._max_length

    @classmethod
    def from_encoder(
        cls, name_or_path: str, max_length: int = 256, device: str = "cpu", trust_remote_code: bool = False
    ) -> ClassificationCrossEncoder:
        """A new one-label head (seeded by the caller) on any pretrained encoder, a name or a local folder."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        model = AutoModelForSequenceClassification.from_pretrained(
            name_or_path, num_labels=1, trust_remote_code=trust_remote_code
        )
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        return cls(model.float(), tokenizer, max_length, name=name_or_path).to(device)

    def settings(self) -> dict:
        return {"kind": "sequence-classification", "labels": 1}

    def _model(self) -> nn.Module:
        return self

    def forward(self, features: dict[str, torch.Tensor]):
        inputs = {k: v for k, v in features.items() if k != "special_tokens_mask"}
        return self.model(**inputs).logits.float()[:, 0], None, None

    def _forward(self, features):
        return self.forward(features)

    def save(self, path: str | os.PathLike, training: dict | None = None) -> Path:
        """Weights (safetensors), config and tokenizer, plus ``train_teacher.json`` (how it was trained); the folder
        is replaced only once everything is written (a kill leaves the previous model whole)."""

        def write(staging: Path) -> None:
            self.model.save_pretrained(str(staging), safe_serialization=True)
            self.tokenizer.save_pretrained(str(staging))
            atomic_write_json(staging / TRAINING_RECORD, training or {})

        path = replace_folder(path, write)
        self.name = str(path)
        return path
