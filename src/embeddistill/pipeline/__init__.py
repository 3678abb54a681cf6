"""``embeddistill distill``: one lane per teacher kind, built from shared stages, returning one typed summary.

The choice between the lanes is made here and nowhere else: a run with ``--cross-encoder`` takes
:mod:`~embeddistill.pipeline.cross_encoder`, a teacher that is an endpoint or vectors
(``--teacher http://...``, ``--teacher-documents``) :mod:`~embeddistill.pipeline.black_box`, any other
:mod:`~embeddistill.pipeline.dual_encoder`. All are built
from :mod:`~embeddistill.pipeline.stages` and return a :class:`~embeddistill.pipeline.summary.RunSummary`.
"""

from __future__ import annotations

import logging

from embeddistill.api_options import is_black_box
from embeddistill.checks import check_distill
from embeddistill.config import DistillConfig, resolve_student_recipe
from embeddistill.pipeline import black_box, cross_encoder, dual_encoder
from embeddistill.pipeline.summary import RunSummary

__all__ = ["RunSummary", "distill"]

logger = logging.getLogger(__name__)


def distill(config: DistillConfig) -> RunSummary | None:
    """The whole run; ``None`` on the non-main ranks of a torchrun dual-encoder run (rank 0 writes the outputs).

    The student's ``auto`` recipe is resolved first (:mod:`embeddistill.config.recipe`), then the options are
    checked (:func:`embeddistill.checks.check_distill`), before anything is loaded.
    """
    for warning in check_distill(resolve_student_recipe(config)):
        logger.warning("%s", warning)
    lane = cross_encoder if config.ce.cross_encoder else black_box if is_black_box(config) else dual_encoder
    return lane.run(config)
