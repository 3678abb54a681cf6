"""Query generators: unlabeled training queries that widen the region where the student is distilled.

Score distillation only constrains the student where training queries exist. Generated queries need no
labels - the teacher is the label - so cheap, plentiful ones cover the data manifold where real queries are
sparse (METHOD.md, "Query generation"). Every generator yields :class:`GeneratedQuery` records that keep the
id of the text they came from.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Protocol


@dataclass(frozen=True)
class GeneratedQuery:
    query_id: str
    text: str
    source_id: str  # the document (or query) it was generated from
    generator: str

    def to_json(self) -> dict:
        row = asdict(self)
        return {"_id": row.pop("query_id"), **row}


class QueryGenerator(Protocol):
    name: str

    def generate(
        self, documents: Mapping[str, str], queries: Mapping[str, str], seed: int
    ) -> Iterator[GeneratedQuery]: ...


def make_cheap_generators(crops_per_document: int, perturbations_per_query: int) -> list[QueryGenerator]:
    from embeddistill.querygen.cheap import CropGenerator, PerturbationGenerator

    generators: list[QueryGenerator] = []
    if crops_per_document > 0:
        generators.append(CropGenerator(per_document=crops_per_document))
    if perturbations_per_query > 0:
        generators.append(PerturbationGenerator(per_query=perturbations_per_query))
    return generators


def make_generators(
    names: list[str], n: int, lm_model: str = "", cache_path=None, lm_options: dict | None = None
) -> list[QueryGenerator]:
    """Generators by name (``crop``, ``perturb``, ``lm``), each making ``n`` queries per source text.

    ``lm_options`` are further :class:`~embeddistill.querygen.lm.LMQueryGenerator` fields (``batch_size``,
    ``dtype``, ``temperature``, ...).
    """
    from embeddistill.querygen.cheap import CropGenerator, PerturbationGenerator

    generators: list[QueryGenerator] = []
    for name in names:
        if name == "crop":
            generators.append(CropGenerator(per_document=n))
        elif name == "perturb":
            generators.append(PerturbationGenerator(per_query=n))
        elif name == "lm":
            if not lm_model:
                raise ValueError("the 'lm' generator needs --lm-model (a causal LM, doc2query model or .gguf file)")
            from embeddistill.querygen.lm import LMQueryGenerator

            options = lm_options or {}
            generators.append(LMQueryGenerator(model=lm_model, per_document=n, cache_path=cache_path, **options))
        else:
            raise ValueError(f"unknown generator {name!r}: use crop, perturb or lm")
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
