"""Segment pooling for dual-pooling cross-encoders: which tokens of ``[CLS] q [SEP] d [SEP]`` are the query's,
which the document's, and their mean.

Kept apart from the model classes because it is pure tensor arithmetic that tests check on its own and that any
joint-sequence model (BERT with ``token_type_ids``, RoBERTa-style without) can reuse.
"""

from __future__ import annotations

import torch


def segment_masks(attention_mask: torch.Tensor, special_tokens_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks ``(B, L)`` of the query and document segments of ``[CLS] q [SEP] d [SEP]`` (content tokens only).

    A separator is a special token that follows at least one content token; the query segment is the content
    before the first separator, the document segment the content after it. Padding is special as well and masked
    by ``attention_mask``. For BERT this is exactly ``token_type_ids == 0`` / ``== 1`` without [CLS] and [SEP].
    """
    attended = attention_mask.bool()
    special = special_tokens_mask.bool() | ~attended
    content = ~special
    separator = special & (content.long().cumsum(dim=1) > 0)
    segment = separator.long().cumsum(dim=1)
    return content & (segment == 0), content & (segment >= 1)


def masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``states`` ``(B, L, H)`` over the positions where ``mask`` ``(B, L)`` is true (zero when none)."""
    weights = mask.to(states.dtype).unsqueeze(-1)
    return (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
