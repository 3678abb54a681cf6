"""The EmbedDistill losses (arXiv 2301.12005), one small module each.

All losses work on tensors the training loop has already computed: a batch of ``B`` queries scored against
``M`` candidate documents (the batch's positives, in-batch documents and mined hard negatives), and the
teacher's and student's embeddings. Teacher tensors carry no gradient.

=====================  ==============================================================================
loss                   formula
=====================  ==============================================================================
ScoreDistillationLoss  ``- mean_i sum_j softmax_j(t_ij / tau_t) log softmax_j(s_ij / tau_s)``
EmbeddingMatchingLoss  ``mean_i dist(E_t(x_i), P(E_s(x_i)))``, dist = L2 (paper), squared L2 or 1 - cos
LabelLoss              ``- mean_{i labelled} log softmax_j(s_ij / tau_s)[pos_i]``  (one-hot, in-batch)
MarginMSELoss          ``mean_{i, j != pos_i} ((s_i,pos - s_ij) - (t_i,pos - t_ij))^2``
=====================  ==============================================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Distance = Literal["l2", "squared_l2", "cosine"]
_NEG_INF = -1e4  # large enough to zero a softmax entry, small enough to stay finite in bf16


class ScoreDistillationLoss(nn.Module):
    """Cross-entropy between the teacher's and the student's softmax over each query's candidates.

    ``L = - mean_i sum_j softmax_j(t_ij / tau_t) * log softmax_j(s_ij / tau_s)``

    Equal to the KL divergence up to the teacher's (constant) entropy. Separate temperatures let the
    student's distribution be sharper or flatter than the teacher's.

    +---------------------+--------------------------+----------------------------------------------+
    | input               | shape                    | meaning                                      |
    +=====================+==========================+==============================================+
    | student_scores      | ``(B, M)``               | ``s_ij``, the student's query-document scores |
    | teacher_scores      | ``(B, M)``               | ``t_ij``, the teacher's scores                |
    | candidate_mask      | ``(B, M)`` bool, optional | ``False`` removes a candidate from row ``i``  |
    +---------------------+--------------------------+----------------------------------------------+
    """

    def __init__(self, teacher_temperature: float = 0.05, student_temperature: float = 0.05):
        super().__init__()
        self.teacher_temperature = teacher_temperature
        self.student_temperature = student_temperature

    def forward(self, student_scores: Tensor, teacher_scores: Tensor, candidate_mask: Tensor | None = None) -> Tensor:
        student_logits = student_scores / self.student_temperature
        teacher_logits = teacher_scores.detach() / self.teacher_temperature
        if candidate_mask is not None:
            student_logits = student_logits.masked_fill(~candidate_mask, _NEG_INF)
            teacher_logits = teacher_logits.masked_fill(~candidate_mask, _NEG_INF)
        targets = teacher_logits.float().softmax(dim=-1)
        return -(targets * student_logits.float().log_softmax(dim=-1)).sum(dim=-1).mean()


class EmbeddingMatchingLoss(nn.Module):
    """Pulls the student's embedding of a text toward the teacher's embedding of the same text.

    ``L = mean_i dist(E_t(x_i), P(E_s(x_i)))`` with ``dist`` one of

    * ``"l2"``: ``||a - b||_2`` - the paper's choice (Euclidean distance, not squared);
    * ``"squared_l2"``: ``||a - b||_2^2``;
    * ``"cosine"``: ``1 - cos(a, b)``.

    Used for queries (``L_q``) and, with symmetric students, for documents (``L_d``).

    +--------------------+----------+------------------------------------------------------------+
    | input              | shape    | meaning                                                    |
    +====================+==========+============================================================+
    | student_embeddings | ``(N, D)`` | ``P(E_s(x_i))``: the student's embeddings, projected       |
    | teacher_embeddings | ``(N, D)`` | ``E_t(x_i)``: the teacher's embeddings of the same texts  |
    +--------------------+----------+------------------------------------------------------------+
    """

    def __init__(self, distance: Distance = "l2"):
        super().__init__()
        if distance not in ("l2", "squared_l2", "cosine"):
            raise ValueError(f"distance must be 'l2', 'squared_l2' or 'cosine', got {distance!r}")
        self.distance = distance

    def forward(self, student_embeddings: Tensor, teacher_embeddings: Tensor) -> Tensor:
        student, teacher = student_embeddings.float(), teacher_embeddings.detach().float()
        if self.distance == "cosine":
            return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()
        squared = (student - teacher).pow(2).sum(dim=-1)
        if self.distance == "squared_l2":
            return squared.mean()
        # The small epsilon keeps the gradient of sqrt finite when the student matches exactly.
        return (squared + 1e-12).sqrt().mean()


class LabelLoss(nn.Module):
    """One-hot in-batch softmax cross-entropy on labelled positives (optional; off by default).

    ``L = - mean_{i labelled} log softmax_j(s_ij / tau_s)[pos_i]``; rows with ``positive_index = -1`` are
    unlabelled and ignored. Mask out other known positives of a query with ``candidate_mask``.

    +------------------+-------------------+-------------------------------------------------+
    | input            | shape             | meaning                                         |
    +==================+===================+=================================================+
    | student_scores   | ``(B, M)``        | the student's scores                            |
    | positive_index   | ``(B,)`` long     | the column of each query's positive, or ``-1``  |
    | candidate_mask   | ``(B, M)``, opt.  | ``False`` removes a candidate from row ``i``    |
    +------------------+-------------------+-------------------------------------------------+
    """

    def __init__(self, temperature: float = 0.05):
        super().__init__()
        self.temperature = temperature

    def forward(self, student_scores: Tensor, positive_index: Tensor, candidate_mask: Tensor | None = None) -> Tensor:
        labelled = positive_index >= 0
        if not labelled.any():
            return student_scores.new_zeros(())
        logits = student_scores[labelled].float() / self.temperature
        if candidate_mask is not None:
            logits = logits.masked_fill(~candidate_mask[labelled], _NEG_INF)
        return F.cross_entropy(logits, positive_index[labelled])


class MarginMSELoss(nn.Module):
    """Margin-MSE (Hofstaetter et al., 2020): match the teacher's score margins to the positive.

    ``L = mean_{i, j != pos_i} ((s_i,pos_i - s_ij) - (t_i,pos_i - t_ij))^2`` over valid candidates.

    +----------------+-------------------+-----------------------------------------------------------+
    | input          | shape             | meaning                                                   |
    +================+===================+===========================================================+
    | student_scores | ``(B, M)``        | the student's scores                                      |
    | teacher_scores | ``(B, M)``        | the teacher's scores                                      |
    | positive_index | ``(B,)`` long     | each query's anchor column (its positive or teacher top-1) |
    | candidate_mask | ``(B, M)``, opt.  | ``False`` removes a candidate from row ``i``              |
    +----------------+-------------------+-----------------------------------------------------------+
    """

    def forward(
        self,
        student_scores: Tensor,
        teacher_scores: Tensor,
        positive_index: Tensor,
        candidate_mask: Tensor | None = None,
    ) -> Tensor:
        rows = torch.arange(student_scores.shape[0], device=student_scores.device)
        student_margin = student_scores[rows, positive_index, None] - student_scores
        teacher = teacher_scores.detach()
        teacher_margin = teacher[rows, positive_index, None] - teacher
        valid = torch.ones_like(student_scores, dtype=torch.bool)
        if candidate_mask is not None:
            valid &= candidate_mask
        valid[rows, positive_index] = False
        return (student_margin.float() - teacher_margin.float())[valid].pow(2).mean()


@dataclass
class LossWeights:
    score: float = 1.0
    query_embedding: float = 1.0
    document_embedding: float = 1.0
    label: float = 0.0
    margin_mse: float = 0.0


class EmbedDistillLoss(nn.Module):
    """The full EmbedDistill objective: a weighted sum of the losses above.

    ``L = w_score L_score + w_q L_q + w_d L_d + w_label L_label + w_margin L_margin``

    Returns a dict with the total under ``"loss"`` and each weighted-in part under its own name, so that
    training can log every part. Parts with weight 0 are not computed; ``L_d`` only exists for symmetric
    students (``student_documents`` given).
    """

    def __init__(
        self,
        weights: LossWeights | None = None,
        teacher_temperature: float = 0.05,
        student_temperature: float = 0.05,
        distance: Distance = "l2",
    ):
        super().__init__()
        self.weights = weights or LossWeights()
        self.score = ScoreDistillationLoss(teacher_temperature, student_temperature)
        self.embedding = EmbeddingMatchingLoss(distance)
        self.label = LabelLoss(student_temperature)
        self.margin = MarginMSELoss()

    def forward(
        self,
        student_scores: Tensor,
        teacher_scores: Tensor,
        student_queries: Tensor,
        teacher_queries: Tensor,
        anchor_index: Tensor,
        positive_index: Tensor,
        label_mask: Tensor | None = None,
        student_documents: Tensor | None = None,
        teacher_documents: Tensor | None = None,
        generated: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """``generated`` (``(B,)`` bool) marks generated queries: no label loss for them, the teacher is their label."""
        w = self.weights
        parts: dict[str, Tensor] = {}
        if w.score:
            parts["score"] = self.score(student_scores, teacher_scores)
        if w.query_embedding:
            parts["query_em"] = self.embedding(student_queries, teacher_queries)
        if w.document_embedding and student_documents is not None:
            parts["document_em"] = self.embedding(student_documents, teacher_documents)
        if w.label:
            labels = positive_index if generated is None else positive_index.masked_fill(generated, -1)
            parts["label"] = self.label(student_scores, labels, label_mask)
        if w.margin_mse:
            parts["margin_mse"] = self.margin(student_scores, teacher_scores, anchor_index)
        weight_of = {
            "score": w.score,
            "query_em": w.query_embedding,
            "document_em": w.document_embedding,
            "label": w.label,
            "margin_mse": w.margin_mse,
        }
        total = sum(weight_of[name] * value for name, value in parts.items())
        return {"loss": total, **parts}
