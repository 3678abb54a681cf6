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

Each loss is a *term* of the objective under one name, used everywhere: the class's ``part`` (the key in the loss
parts and in ``train_log.jsonl``), the :class:`LossWeights` field and, with ``_weight`` appended, the config field
and flag (``query_em`` -> ``LossWeights.query_em`` -> ``--query-em-weight``). Adding a loss is therefore one class
here (with its ``part`` and how it is averaged, appended to :data:`TERMS`) plus one ``<part>_weight`` field in
:class:`~embeddistill.config.LossConfig`; :class:`LossWeights`, :class:`EmbedDistillLoss` and the trainers' rescaling
under ``torchrun`` all follow from :data:`TERMS`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from embeddistill.config import LossConfig

Distance = Literal["l2", "squared_l2", "cosine"]
_NEG_INF = -1e4  # large enough to zero a softmax entry, small enough to stay finite in bf16


@dataclass
class LossSettings:
    """What a term may need to be built: the resolved softmax temperatures and the embedding distance."""

    teacher_temperature: float = 0.05
    student_temperature: float = 0.05
    distance: Distance = "l2"


@dataclass
class LossBatch:
    """Everything a term may read for one batch (``B`` queries, ``M`` candidates); terms take what they need."""

    student_scores: Tensor
    teacher_scores: Tensor
    student_queries: Tensor
    teacher_queries: Tensor
    anchor_index: Tensor
    positive_index: Tensor
    label_mask: Tensor | None = None
    student_documents: Tensor | None = None
    teacher_documents: Tensor | None = None
    generated: Tensor | None = None


class LossTerm(nn.Module):
    """A named part of the EmbedDistill objective.

    ``part`` is the term's one name (see the module docstring). ``averaged_over`` says what the term is a mean
    over -- ``"queries"`` (rows of the batch), ``"labelled"`` (non-generated rows) or ``"documents"`` (the
    candidates) -- which is all a data-parallel trainer needs to rescale a rank's share of it.
    """

    part: ClassVar[str]
    averaged_over: ClassVar[str] = "queries"

    @classmethod
    def build(cls, settings: LossSettings) -> LossTerm:
        return cls()

    def of_batch(self, batch: LossBatch) -> Tensor | None:
        """The term's value on ``batch``, or ``None`` where it does not apply (e.g. no student documents)."""
        raise NotImplementedError


class ScoreDistillationLoss(LossTerm):
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

    part = "score"

    def __init__(self, teacher_temperature: float = 0.05, student_temperature: float = 0.05):
        super().__init__()
        self.teacher_temperature = teacher_temperature
        self.student_temperature = student_temperature

    @classmethod
    def build(cls, settings: LossSettings) -> ScoreDistillationLoss:
        return cls(settings.teacher_temperature, settings.student_temperature)

    def of_batch(self, batch: LossBatch) -> Tensor:
        return self(batch.student_scores, batch.teacher_scores)

    def forward(self, student_scores: Tensor, teacher_scores: Tensor, candidate_mask: Tensor | None = None) -> Tensor:
        student_logits = student_scores / self.student_temperature
        teacher_logits = teacher_scores.detach() / self.teacher_temperature
        if candidate_mask is not None:
            student_logits = student_logits.masked_fill(~candidate_mask, _NEG_INF)
            teacher_logits = teacher_logits.masked_fill(~candidate_mask, _NEG_INF)
        targets = teacher_logits.float().softmax(dim=-1)
        return -(targets * student_logits.float().log_softmax(dim=-1)).sum(dim=-1).mean()


class EmbeddingMatchingLoss(LossTerm):
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

    @classmethod
    def build(cls, settings: LossSettings) -> EmbeddingMatchingLoss:
        return cls(settings.distance)

    def forward(self, student_embeddings: Tensor, teacher_embeddings: Tensor) -> Tensor:
        student, teacher = student_embeddings.float(), teacher_embeddings.detach().float()
        if self.distance == "cosine":
            return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()
        squared = (student - teacher).pow(2).sum(dim=-1)
        if self.distance == "squared_l2":
            return squared.mean()
        # The small epsilon keeps the gradient of sqrt finite when the student matches exactly.
        return (squared + 1e-12).sqrt().mean()


class QueryEmbeddingMatchingLoss(EmbeddingMatchingLoss):
    """``L_q``: embedding matching of the batch's queries."""

    part = "query_em"

    def of_batch(self, batch: LossBatch) -> Tensor:
        return self(batch.student_queries, batch.teacher_queries)


class DocumentEmbeddingMatchingLoss(EmbeddingMatchingLoss):
    """``L_d``: embedding matching of the batch's candidate documents (symmetric students only)."""

    part = "document_em"
    averaged_over = "documents"

    def of_batch(self, batch: LossBatch) -> Tensor | None:
        if batch.student_documents is None:
            return None
        return self(batch.student_documents, batch.teacher_documents)


class LabelLoss(LossTerm):
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

    part = "label"
    averaged_over = "labelled"

    def __init__(self, temperature: float = 0.05):
        super().__init__()
        self.temperature = temperature

    @classmethod
    def build(cls, settings: LossSettings) -> LabelLoss:
        return cls(settings.student_temperature)

    def of_batch(self, batch: LossBatch) -> Tensor:
        """Generated queries have no label (the teacher is their label): they are left out."""
        labels = batch.positive_index
        if batch.generated is not None:
            labels = labels.masked_fill(batch.generated, -1)
        return self(batch.student_scores, labels, batch.label_mask)

    def forward(self, student_scores: Tensor, positive_index: Tensor, candidate_mask: Tensor | None = None) -> Tensor:
        labelled = positive_index >= 0
        if not labelled.any():
            return student_scores.new_zeros(())
        logits = student_scores[labelled].float() / self.temperature
        if candidate_mask is not None:
            logits = logits.masked_fill(~candidate_mask[labelled], _NEG_INF)
        return F.cross_entropy(logits, positive_index[labelled])


class MarginMSELoss(LossTerm):
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

    part = "margin_mse"

    def of_batch(self, batch: LossBatch) -> Tensor:
        return self(batch.student_scores, batch.teacher_scores, batch.anchor_index)

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


TERMS: tuple[type[LossTerm], ...] = (
    ScoreDistillationLoss,
    QueryEmbeddingMatchingLoss,
    DocumentEmbeddingMatchingLoss,
    LabelLoss,
    MarginMSELoss,
)
"""The terms of the objective, in logging order; each one's weight is the config field ``<part>_weight``."""


def _weight_fields() -> list[tuple[str, type, dataclasses.Field]]:
    """One float per term, named by its ``part``, defaulting to the config's ``<part>_weight`` default."""
    defaults = LossConfig()
    fields = []
    for term in TERMS:
        if not hasattr(defaults, f"{term.part}_weight"):
            raise AssertionError(f"loss term {term.part!r} has no config field {term.part}_weight")
        fields.append((term.part, float, dataclasses.field(default=getattr(defaults, f"{term.part}_weight"))))
    return fields


def _from_config(cls, loss: LossConfig):
    """The weights a run's :class:`~embeddistill.config.LossConfig` asks for (``<part>_weight`` each)."""
    return cls(**{term.part: getattr(loss, f"{term.part}_weight") for term in TERMS})


LossWeights = dataclasses.make_dataclass(
    "LossWeights",
    _weight_fields(),
    namespace={
        "__doc__": "The weight of every term: one field per :data:`TERMS` entry, named by its ``part``; generated "
        "from :data:`TERMS` so that a new term needs no edit here.",
        "__module__": __name__,
        "from_config": classmethod(_from_config),
    },
)


class EmbedDistillLoss(nn.Module):
    """The full EmbedDistill objective: a weighted sum of the :data:`TERMS`.

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
        settings = LossSettings(teacher_temperature, student_temperature, distance)
        self.terms = nn.ModuleDict({term.part: term.build(settings) for term in TERMS})

    def weight(self, part: str) -> float:
        return float(getattr(self.weights, part))

    def averaged_over(self, part: str) -> str:
        """What ``part`` is a mean over (see :class:`LossTerm`): how a data-parallel rank rescales its share."""
        return self.terms[part].averaged_over

    def total(self, parts: dict[str, Tensor]) -> Tensor:
        """The weighted sum of ``parts`` (every key but ``"loss"``)."""
        return sum(self.weight(name) * value for name, value in parts.items() if name != "loss")

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
        batch = LossBatch(
            student_scores,
            teacher_scores,
            student_queries,
            teacher_queries,
            anchor_index,
            positive_index,
            label_mask,
            student_documents,
            teacher_documents,
            generated,
        )
        parts: dict[str, Tensor] = {}
        for part, term in self.terms.items():
            value = term.of_batch(batch) if self.weight(part) else None
            if value is not None:
                parts[part] = value
        return {"loss": self.total(parts), **parts}
