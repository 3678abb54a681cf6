"""Weight averaging with the start (WiSE-FT, LM-Cocktail): what keeps a pretrained student from forgetting.

Distilling a student that is already a good retriever (all-MiniLM-L6-v2, symmetric) on one corpus raises its
agreement with the teacher on that corpus's queries while it loses some of what it knew about other queries. A
linear average of the trained weights with the starting ones keeps most of the gain and most of the start:

    θ = (1 - w) · θ_trained + w · θ_start          w = start_weight in [0, 1]

Both endpoints share one architecture (the same tower, projection included), so every floating-point tensor is
averaged; integer buffers (position ids) are taken from the trained weights, where they are identical anyway.
"""

from __future__ import annotations

import logging

import torch

from embeddistill.config import DistillConfig, starts_whole_pretrained
from embeddistill.models.students import query_modules

logger = logging.getLogger(__name__)

# Chosen on dev queries (held-out training queries of SciFact, NFCorpus and SQuAD), never on a test split.
PRETRAINED_SYMMETRIC_START_WEIGHT = 0.5


def resolved_start_weight(config: DistillConfig) -> float:
    """``start_weight``, with ``auto`` resolved: a symmetric student that starts as a whole pretrained model (its
    own index is what a user would otherwise serve) keeps half its start; a tower cut from the teacher or cut to
    fewer layers starts far from any good retriever, so it keeps none. The rule cannot tell an embedding model from
    a raw language model given as ``--student``: for the latter a user says ``start_weight: 0``."""
    weight = config.training.start_weight
    if weight != "auto":
        return float(weight)
    symmetric = config.model.asymmetric is False  # resolved by config.recipe before a run starts
    return PRETRAINED_SYMMETRIC_START_WEIGHT if symmetric and starts_whole_pretrained(config.model) else 0.0


def snapshot(student) -> dict[str, torch.Tensor]:
    """A CPU copy of the trainable tower's weights (the start, before any step)."""
    return {name: tensor.detach().cpu().clone() for name, tensor in query_modules(student).state_dict().items()}


def merged_state(
    trained: dict[str, torch.Tensor], start: dict[str, torch.Tensor], start_weight: float
) -> dict[str, torch.Tensor]:
    """``(1 - w) · trained + w · start`` for every floating-point tensor; other tensors as trained.

    ============  ==========================  ===================================
    argument      shape                       meaning
    ============  ==========================  ===================================
    trained       {name: any shape}           the tower's weights after training
    start         {name: the same shapes}     its weights before the first step
    start_weight  scalar in [0, 1]            the share of the start
    ============  ==========================  ===================================
    """
    if not 0.0 <= start_weight <= 1.0:
        raise ValueError(f"start_weight must lie in [0, 1], got {start_weight}")
    if trained.keys() != start.keys():
        missing = sorted(set(trained) ^ set(start))[:3]
        raise ValueError(f"the trained and starting weights differ in their tensors, e.g. {missing}")
    merged = {}
    for name, tensor in trained.items():
        if tensor.is_floating_point():
            start_tensor = start[name].to(device=tensor.device, dtype=tensor.dtype)
            merged[name] = torch.lerp(tensor, start_tensor, start_weight)
        else:
            merged[name] = tensor
    return merged


def merge_with_start(student, start: dict[str, torch.Tensor], start_weight: float) -> None:
    """Load ``merged_state`` of the student's current weights and ``start`` into the student, in place."""
    if start_weight == 0.0:
        return
    tower = query_modules(student)
    tower.load_state_dict(merged_state(tower.state_dict(), start, start_weight))
    logger.info("averaged the trained weights with the start (start_weight %g)", start_weight)
