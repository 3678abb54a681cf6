"""Query generators: unlabeled training queries that widen the region where the student is distilled.

Score distillation only constrains the student where training queries exist. Generated queries need no
labels - the teacher is the label - so cheap, plentiful ones cover the data manifold where real queries are
sparse (docs/METHOD.md, section 2 "Query generation"). Every generator yields :class:`GeneratedQuery` records
that keep the id of the text they came from; generators are found by name in :data:`GENERATORS`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from embeddistill.querygen.base import GeneratedQuery, QueryGenerator

__all__ = [
    "GENERATORS",
    "GeneratedQuery",
    "QueryGenerator",
    "crops_per_document",
    "generate_queries",
    "make_cheap_generators",
    "make_generators",
]


def _crop(n: int, lm_model: str, cache_path, lm_options: dict) -> QueryGenerator:
    from embeddistill.querygen.cheap import CropGenerator

    return CropGenerator(per_document=n)


def _perturb(n: int, lm_model: str, cache_path, lm_options: dict) -> QueryGenerator:
    from embeddistill.querygen.cheap import PerturbationGenerator

    return PerturbationGenerator(per_query=n)


def _lm(n: int, lm_model: str, cache_path, lm_options: dict) -> QueryGenerator:
    if not lm_model:
        raise ValueError("the 'lm' generator needs --lm-model (a causal LM, doc2query model or .gguf file)")
    from embeddistill.querygen.lm import LMQueryGenerator

    return LMQueryGenerator(model=lm_model, per_document=n, cache_path=cache_path, **lm_options)


GeneratorFactory = Callable[[int, str, Any, dict], QueryGenerator]
GENERATORS: dict[str, GeneratorFactory] = {"crop": _crop, "perturb": _perturb, "lm": _lm}
"""The registry of generators by name: ``factory(n, lm_model, cache_path, lm_options)`` makes one that writes
``n`` queries per source text. A new generator is one entry here (``generate-queries --generator`` offers every
name); each factory imports its module only when called, so listing the names stays cheap."""


def crops_per_document(documents: int, most: int, budget: int) -> int:
    """Crops each document gets: ``most`` on a small corpus; on one with more than ``budget / most`` documents,
    ``budget / documents`` rounded (at least one), so that generated queries, and the teacher's cost of embedding
    them, stay near ``budget`` however large the corpus. ``budget`` 0 means no budget.

    Small corpora are where more crops pay: eight a document against two raised the held-out retention of each
    asymmetric student tried by 2.5 to 4.8 points (mean over SciFact, NFCorpus and SQuAD: 5,183, 3,633 and 2,067
    documents); with the default budget a 30,005-passage corpus keeps two each.
    """
    if most == 0 or budget == 0 or documents == 0:
        return most
    return min(most, max(1, round(budget / documents)))


def make_cheap_generators(crops_per_document: int, perturbations_per_query: int) -> list[QueryGenerator]:
    """The cheap generators a ``distill`` run adds itself (``crops_per_document``, ``perturbations_per_query``)."""
    counts = {"crop": crops_per_document, "perturb": perturbations_per_query}
    return [GENERATORS[name](n, "", None, {}) for name, n in counts.items() if n > 0]


def make_generators(
    names: list[str], n: int, lm_model: str = "", cache_path=None, lm_options: dict | None = None
) -> list[QueryGenerator]:
    """Generators by name (keys of :data:`GENERATORS`), each making ``n`` queries per source text.

    ``lm_options`` are further :class:`~embeddistill.querygen.lm.LMQueryGenerator` fields (``batch_size``,
    ``dtype``, ``temperature``, ...).
    """
    generators: list[QueryGenerator] = []
    for name in names:
        if name not in GENERATORS:
            *others, last = GENERATORS
            raise ValueError(f"unknown generator {name!r}: use {', '.join(others)} or {last}")
        generators.append(GENERATORS[name](n, lm_model, cache_path, lm_options or {}))
    return generators


def generate_queries(
    generators: list[QueryGenerator],
    documents: Mapping[str, str],
    queries: Mapping[str, str],
    seed: int,
    exclude: set[str] | None = None,
) -> list[GeneratedQuery]:
    """Run ``generators`` and drop empty outputs and duplicates (also of ``exclude``, e.g. eval queries)."""
    seen = set(exclude or ())
    kept: list[GeneratedQuery] = []
    for offset, generator in enumerate(generators):
        for query in generator.generate(documents, queries, seed + offset):
            key = query.text.strip().lower()
            if key and key not in seen:
                seen.add(key)
                kept.append(query)
    return kept
