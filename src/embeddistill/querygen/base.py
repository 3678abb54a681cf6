"""What every query generator shares: the record it yields and the protocol it follows.

A module of its own so that the generators (:mod:`.cheap`, :mod:`.lm`) and the registry in the package's
``__init__`` can all import it without importing each other.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Protocol


@dataclass(frozen=True)
class GeneratedQuery:
    """One generated query, with the id of the document (or query) it came from and the generator's name."""

    query_id: str
    text: str
    source_id: str  # the document (or query) it was generated from
    generator: str

    def to_json(self) -> dict:
        row = asdict(self)
        return {"_id": row.pop("query_id"), **row}


class QueryGenerator(Protocol):
    """A generator: ``generate`` yields queries from the corpus and the real queries, seeded."""

    name: str

    def generate(
        self, documents: Mapping[str, str], queries: Mapping[str, str], seed: int
    ) -> Iterator[GeneratedQuery]: ...
