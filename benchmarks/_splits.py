"""Derived BEIR folders: new qrels splits over an existing corpus, written where the pipeline can read them.

Two needs the plain BEIR layout does not express:

* **A split by group** (SQuAD-dev by article): questions about one article share its paragraphs, so a random
  question split leaks the article's vocabulary and topics from training into test. :func:`write_group_split`
  assigns whole groups of documents (by default the document id without its last ``-`` part:
  ``sq-dev-012-004`` -> ``sq-dev-012``) to train or test, seeded, and writes ``qrels/train.tsv`` and
  ``qrels/test.tsv``; no group is on both sides.
* **Several evaluation splits at once** (TREC DL19 and DL20 on one corpus): :func:`write_merged_split` adds a
  split that is the union of others, so one run excludes all their queries from training and evaluates on all.

The corpus and queries are linked, not copied (the teacher-embedding cache is keyed by text, so a derived folder
reuses the source's cached embeddings), and every file is written atomically.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

from embeddistill.data import load_qrels, resolve_dataset
from embeddistill.storage import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

LINKED_FILES = ("corpus.jsonl", "queries.jsonl")


def document_group(doc_id: str) -> str:
    """The document id without its last ``-`` part: the article of a SQuAD ``sq-dev-ARTICLE-PARA`` paragraph."""
    head, separator, _ = doc_id.rpartition("-")
    return head if separator else doc_id


def _link_or_copy(source: Path, target: Path) -> None:
    if target.is_symlink() or target.exists():
        target.unlink()
    try:
        os.symlink(source, target)
    except OSError:  # file systems without symlinks
        shutil.copyfile(source, target)


def _start_derived_folder(source: Path, out: Path) -> None:
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    for name in LINKED_FILES:
        _link_or_copy(source / name, out / name)


def write_qrels(path: Path, qrels: dict[str, dict[str, int]]) -> None:
    lines = ["query-id\tcorpus-id\tscore"]
    lines += [f"{q}\t{d}\t{rel}" for q in sorted(qrels) for d, rel in sorted(qrels[q].items())]
    atomic_write_text(path, "\n".join(lines) + "\n")


def query_groups(qrels: dict[str, dict[str, int]], group_of: Callable[[str], str]) -> dict[str, str]:
    """``{query_id: group}`` from each query's relevant documents; a query whose documents span groups is an error
    (it could not be kept on one side)."""
    groups: dict[str, str] = {}
    for query_id, judged in qrels.items():
        found = {group_of(doc_id) for doc_id, relevance in judged.items() if relevance > 0}
        if len(found) != 1:
            raise ValueError(f"query {query_id!r} has relevant documents in {len(found)} groups: {sorted(found)}")
        groups[query_id] = found.pop()
    return groups


def choose_train_groups(groups: list[str], train_fraction: float, seed: int) -> set[str]:
    """A seeded choice of ``round(len * train_fraction)`` groups; the same inputs give the same choice anywhere."""
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be strictly between 0 and 1, got {train_fraction}")
    ordered = sorted(set(groups))
    if len(ordered) < 2:
        raise ValueError(f"need at least 2 groups to split, found {len(ordered)}")
    keep = min(len(ordered) - 1, max(1, round(len(ordered) * train_fraction)))
    return set(random.Random(f"group-split-{seed}").sample(ordered, keep))


def write_sides(
    source: Path, out: Path, qrels: dict[str, dict[str, int]], in_train: dict[str, bool], other: str
) -> dict[str, int]:
    """Start the derived folder and write ``qrels/train.tsv`` and ``qrels/OTHER.tsv``: each query on the side
    ``in_train`` puts it. Returns the query count of each side."""
    sides: dict[str, dict] = {"train": {}, other: {}}
    for query_id, judged in qrels.items():
        sides["train" if in_train[query_id] else other][query_id] = judged
    _start_derived_folder(source, out)
    for side, side_qrels in sides.items():
        write_qrels(out / "qrels" / f"{side}.tsv", side_qrels)
    return {side: len(side_qrels) for side, side_qrels in sides.items()}


def write_group_split(
    source: str | os.PathLike,
    out: str | os.PathLike,
    split: str = "test",
    train_fraction: float = 0.5,
    seed: int = 42,
    group_of: Callable[[str], str] = document_group,
) -> dict:
    """Write a BEIR folder at ``out`` whose ``train`` and ``test`` splits divide ``split``'s queries by group.

    Returns (and stores as ``split.json``) what was done: the groups on each side and the query counts.
    """
    source_path, out_path = resolve_dataset(str(source)), Path(out)
    qrels = load_qrels(source_path / "qrels" / f"{split}.tsv")
    groups = query_groups(qrels, group_of)
    train_groups = choose_train_groups(list(groups.values()), train_fraction, seed)
    counts = write_sides(source_path, out_path, qrels, {q: g in train_groups for q, g in groups.items()}, "test")
    summary = {
        "source": str(source_path),
        "source_split": split,
        "seed": seed,
        "train_fraction": train_fraction,
        "train_groups": sorted(train_groups),
        "test_groups": sorted(set(groups.values()) - train_groups),
        "queries": counts,
    }
    atomic_write_json(out_path / "split.json", summary)
    logger.info("group split of %s: %s", source_path, summary["queries"])
    return summary


def write_held_out_split(
    source: str | os.PathLike,
    out: str | os.PathLike,
    held_out_fraction: float = 0.2,
    seed: int = 42,
    group_of: Callable[[str], str] | None = None,
) -> dict:
    """Write a BEIR folder at ``out`` whose ``train`` split is part of the source's ``train`` and whose ``dev``
    split is the rest: dev queries to choose settings on, with no test query read.

    ``group_of`` (SQuAD: :func:`document_group`) holds out whole groups, as the test split was made; without it the
    queries are held out at random. The source's other splits are not copied.
    """
    source_path, out_path = resolve_dataset(str(source)), Path(out)
    qrels = load_qrels(source_path / "qrels" / "train.tsv")
    groups = {query_id: query_id for query_id in qrels} if group_of is None else query_groups(qrels, group_of)
    train_groups = choose_train_groups(list(groups.values()), 1.0 - held_out_fraction, seed)
    counts = write_sides(source_path, out_path, qrels, {q: g in train_groups for q, g in groups.items()}, "dev")
    summary = {
        "source": str(source_path),
        "seed": seed,
        "held_out_fraction": held_out_fraction,
        "by_group": group_of is not None,
        "queries": counts,
    }
    atomic_write_json(out_path / "split.json", summary)
    logger.info("dev split of %s: %s", source_path, summary["queries"])
    return summary


def write_merged_split(source: str | os.PathLike, out: str | os.PathLike, splits: list[str], name: str) -> dict:
    """Write a BEIR folder at ``out`` with ``splits`` copied and a split ``name`` that is their union.

    The splits must not share query ids (their union would silently merge two queries' judgements).
    """
    source_path, out_path = resolve_dataset(str(source)), Path(out)
    merged: dict[str, dict[str, int]] = {}
    _start_derived_folder(source_path, out_path)
    for split in splits:
        qrels = load_qrels(source_path / "qrels" / f"{split}.tsv")
        shared = set(qrels) & set(merged)
        if shared:
            raise ValueError(f"splits {splits} share query ids (e.g. {sorted(shared)[:3]}); cannot merge them")
        merged.update(qrels)
        write_qrels(out_path / "qrels" / f"{split}.tsv", qrels)
    write_qrels(out_path / "qrels" / f"{name}.tsv", merged)
    summary = {"source": str(source_path), "splits": splits, "merged_split": name, "queries": len(merged)}
    atomic_write_json(out_path / "split.json", summary)
    return summary
