"""The defaults that depend on the student: ``auto`` values resolved once, before a run is checked or started.

A student cut from the teacher (``teacher:N``) or cut to fewer layers starts far from any good retriever: it gets
only a query tower, trained against the teacher's frozen document embeddings (asymmetric), on many varied crops seen
three times. A student that starts as a whole pretrained embedding model (``--student all-MiniLM-L6-v2``) is already a
good retriever with an index of its own: it stays symmetric (it re-indexes the corpus) and is trained gently, on
fewer crops seen more often, then averaged with its start (``--start-weight auto``). Each row was chosen on
held-out training queries of SciFact, NFCorpus and SQuAD, never on a test split:

=================================  ==========  ==================  ======  =========  ===============================
student                            asymmetric  crops_per_document  epochs  max_steps  dev evidence (three-set dev
                                                                                      retention)
=================================  ==========  ==================  ======  =========  ===============================
``teacher:N``, or a named model    yes         24                  3       no cap     24 crops x 2 epochs beat 8 x 6
with ``--student-layers`` (and                                                        on all nine set-and-student
any student asked to be                                                               pairs; 3 epochs against 2:
asymmetric)                                                                           +0.3, +0.8 and -0.4 points for
                                                                                      the three students, 6 of 9
                                                                                      pairs up
a whole named model                no          2                   6       2000       all-MiniLM-L6-v2: symmetric at
                                                                                      2 x 6 with start weight 0.5,
                                                                                      99.8%, against 97.0%
                                                                                      asymmetric at 24 x 2
=================================  ==========  ==================  ======  =========  ===============================

The symmetric recipe's step cap keeps a large corpus at the budget its epochs were chosen at: its dev runs took
1,062 to 1,818 steps, none of which the cap shortens, while six epochs over a 30,000-passage corpus's crops would be
about 6,900 steps, each embedding some 600 documents with the student.

A teacher that allows one kind of student decides ``asymmetric`` itself: a cross-encoder teacher has no document
tower to keep (symmetric), a black-box teacher none to train against (asymmetric). A value the user gives is never
changed.
"""

from __future__ import annotations

import logging

from embeddistill.api_options import is_black_box
from embeddistill.config.distill import DistillConfig, ModelConfig

__all__ = ["RECIPES", "lane_requirement", "resolve_student_recipe", "starts_whole_pretrained"]

logger = logging.getLogger(__name__)

AUTO = "auto"
RECIPES = {  # -> (crops_per_document, epochs, max_steps)
    "query_encoder": (24, 3, 0),
    "whole_pretrained_symmetric": (2, 6, 2000),
}


def starts_whole_pretrained(model: ModelConfig) -> bool:
    """A named student model kept whole: its own index is what a user would otherwise serve. The rule cannot tell
    an embedding model from a raw language model given as ``--student``; for the latter a user sets the options."""
    return not model.student.startswith("teacher:") and not model.student_layers


def lane_requirement(config: DistillConfig) -> bool | None:
    """What the run's teacher requires of ``asymmetric``: ``None`` where the student decides."""
    if config.ce.cross_encoder:
        return False
    return True if is_black_box(config) else None


def resolve_student_recipe(config: DistillConfig) -> DistillConfig:
    """Replace ``auto`` in ``asymmetric``, ``crops_per_document``, ``epochs`` and ``max_steps`` by the student's
    recipe (the table above), in place, and return ``config``. Idempotent: the entry points (``distill()``, the
    command line, the lanes' first stages) each call it."""
    model, data, training = config.model, config.data, config.training
    whole = starts_whole_pretrained(model)
    if model.asymmetric == AUTO:
        required = lane_requirement(config)
        model.asymmetric = not whole if required is None else required
    recipe = "whole_pretrained_symmetric" if whole and not model.asymmetric else "query_encoder"
    crops, epochs, max_steps = RECIPES[recipe]
    chosen = []
    if data.crops_per_document == AUTO:
        data.crops_per_document = crops
        chosen.append(f"{crops} crops per document")
    if training.epochs == AUTO:
        training.epochs = epochs
        chosen.append(f"{epochs} epochs")
    if training.max_steps == AUTO:
        training.max_steps = max_steps
        chosen.append(f"at most {max_steps} steps" if max_steps else "no step cap")
    if chosen:
        kind = "symmetric" if not model.asymmetric else "asymmetric"
        logger.info("%s student %s: %s", kind, model.student, ", ".join(chosen))
    return config
