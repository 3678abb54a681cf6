"""Cheap query generators: thousands of query-shaped texts a second, with no model."""

from __future__ import annotations

import random
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from tqdm.auto import tqdm

from embeddistill.querygen.base import GeneratedQuery

_WORD = re.compile(r"\S+")


@dataclass
class CropGenerator:
    """Random contiguous word spans of documents (the "cropping" of Contriever-style training).

    ``per_document`` spans of ``min_words``..``max_words`` words are drawn from every document, uniformly
    over start positions. Spans are query-length, so the student learns on inputs shaped like queries.
    """

    per_document: int = 2
    min_words: int = 8
    max_words: int = 16
    name: str = "crop"

    def generate(self, documents: Mapping[str, str], queries: Mapping[str, str], seed: int) -> Iterator[GeneratedQuery]:
        rng = random.Random(seed)
        for doc_id, text in tqdm(documents.items(), desc="crop queries", unit="doc", mininterval=2):
            words = _WORD.findall(text)
            if not words:
                continue
            for copy in range(self.per_document):
                length = min(len(words), rng.randint(self.min_words, self.max_words))
                start = rng.randint(0, len(words) - length)
                yield GeneratedQuery(
                    f"crop-{doc_id}-{copy}", " ".join(words[start : start + length]), doc_id, self.name
                )


@dataclass
class PerturbationGenerator:
    """Perturbed copies of real queries: word dropout, a local swap, and span deletion.

    Each perturbed query stays near its source on the query manifold, so distilling on it teaches the
    student the teacher's behaviour around the real training queries.
    """

    per_query: int = 2
    drop_probability: float = 0.15
    name: str = "perturb"

    def generate(self, documents: Mapping[str, str], queries: Mapping[str, str], seed: int) -> Iterator[GeneratedQuery]:
        rng = random.Random(seed)
        for query_id, text in tqdm(queries.items(), desc="perturb queries", unit="query", mininterval=2):
            words = _WORD.findall(text)
            seen = {text}
            for copy in range(self.per_query):
                perturbed = " ".join(self._perturb(words, rng))
                if perturbed and perturbed not in seen:
                    seen.add(perturbed)
                    yield GeneratedQuery(f"perturb-{query_id}-{copy}", perturbed, query_id, self.name)

    def _perturb(self, words: list[str], rng: random.Random) -> list[str]:
        if len(words) < 3:
            return list(words)
        kept = [w for w in words if rng.random() >= self.drop_probability] or [rng.choice(words)]
        if len(kept) >= 2 and rng.random() < 0.5:
            i = rng.randrange(len(kept) - 1)
            kept[i], kept[i + 1] = kept[i + 1], kept[i]
        return kept
