"""The student of a black-box teacher (an endpoint, or given vectors): a query encoder only.

An API lends no layers and no document tower, so the student is built from a local model (``--student``, e.g.
all-MiniLM-L6-v2 with ``--student-layers 0 -1``), projected into the teacher's space when the dimensions differ and
normalised when the teacher's vectors are. It is saved as a plain sentence-transformers model whose every
``encode`` (``encode_query`` included) is a query embedding in the teacher's space: it searches the teacher's own
document vectors (the index or vector database they already sit in), never documents it embeds itself.
"""

from __future__ import annotations

import logging

from sentence_transformers import SentenceTransformer
from torch import nn

from embeddistill.models.students import QUERY_ONLY, make_projection, query_tower_modules

try:  # sentence-transformers >= 6 moved the modules; 5.x keeps them in `models`
    from sentence_transformers.base.modules import Normalize
    from sentence_transformers.sentence_transformer.modules import Pooling
except ImportError:  # pragma: no cover - depends on the installed version
    from sentence_transformers.models import Normalize, Pooling

logger = logging.getLogger(__name__)


def build_query_student(
    spec: str,
    dimension: int,
    normalized: bool,
    device: str = "cpu",
    trust_remote_code: bool = False,
    layers: int | list[int] = 0,
) -> SentenceTransformer:
    """A query encoder from the local model ``spec`` whose embeddings live in a ``dimension``-d teacher space."""
    tower = query_tower_modules(spec, nn.Module(), device, trust_remote_code, layers)  # no teacher to copy from
    own = next(m for m in reversed(tower) if isinstance(m, Pooling)).get_embedding_dimension()
    if own != dimension:
        logger.info("student: adding a %d -> %d projection into the teacher's space", own, dimension)
        tower.append(make_projection(own, dimension))
    if normalized:
        tower.append(Normalize())
    nn.Sequential(*tower).float().requires_grad_(True)
    student = SentenceTransformer(modules=tower, device=device)
    setattr(student, QUERY_ONLY, True)  # trained and checked against the teacher's documents, as an asymmetric one
    return student
