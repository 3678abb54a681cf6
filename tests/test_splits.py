"""Derived BEIR folders (``benchmarks/_splits.py``): SQuAD-dev split by article, and merged TREC DL splits."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from embeddistill.data import RetrievalDataset, load_qrels

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _splits import document_group, write_group_split, write_merged_split  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
SQUAD = SHARED / "datasets" / "squad-dev"
DL_POOL = SHARED / "datasets" / "msmarco-dl-pool"


def _articles(folder, split: str) -> set[str]:
    return {document_group(d) for judged in load_qrels(folder / "qrels" / f"{split}.tsv").values() for d in judged}


def test_document_group_strips_the_paragraph():
    assert document_group("sq-dev-012-004") == "sq-dev-012"
    assert document_group("plain") == "plain"


@pytest.mark.skipif(not SQUAD.exists(), reason="needs ../shared/datasets/squad-dev")
def test_squad_split_by_article_has_no_article_on_both_sides(tmp_path):
    summary = write_group_split(SQUAD, tmp_path / "a", seed=42)
    train, test = _articles(tmp_path / "a", "train"), _articles(tmp_path / "a", "test")
    assert train and test and not train & test
    assert train == set(summary["train_groups"]) and test == set(summary["test_groups"])
    assert len(train) == len(test) == 24  # half of the 48 articles each
    total = sum(summary["queries"].values())
    assert total == len(load_qrels(SQUAD / "qrels" / "test.tsv"))  # every question lands on exactly one side

    # Seeded and deterministic: the same seed gives the same files, another seed another split.
    write_group_split(SQUAD, tmp_path / "b", seed=42)
    for split in ("train", "test"):
        assert (tmp_path / "a" / "qrels" / f"{split}.tsv").read_bytes() == (
            tmp_path / "b" / "qrels" / f"{split}.tsv"
        ).read_bytes()
    assert write_group_split(SQUAD, tmp_path / "c", seed=7)["train_groups"] != summary["train_groups"]

    # The folder is a usable dataset: the whole corpus, both splits.
    dataset = RetrievalDataset.load(str(tmp_path / "a"))
    assert len(dataset.corpus) == 2067
    assert set(dataset.splits()) == {"train", "test"}
    assert json.loads((tmp_path / "a" / "split.json").read_text())["seed"] == 42


def test_group_split_refuses_a_query_spanning_groups(tmp_path):
    source = tmp_path / "source"
    (source / "qrels").mkdir(parents=True)
    docs = ["a-1", "a-2", "b-1"]
    (source / "corpus.jsonl").write_text("".join(json.dumps({"_id": d, "text": d}) + "\n" for d in docs))
    (source / "queries.jsonl").write_text(json.dumps({"_id": "q", "text": "q"}) + "\n")
    (source / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq\ta-1\t1\nq\tb-1\t1\n")
    with pytest.raises(ValueError, match="2 groups"):
        write_group_split(source, tmp_path / "out")


@pytest.mark.skipif(not DL_POOL.exists(), reason="needs ../shared/datasets/msmarco-dl-pool")
def test_merged_dl_split_is_the_union_of_both_years(tmp_path):
    summary = write_merged_split(DL_POOL, tmp_path / "dl", ["dl19", "dl20"], "dl19_dl20")
    merged = load_qrels(tmp_path / "dl" / "qrels" / "dl19_dl20.tsv")
    dl19, dl20 = (load_qrels(DL_POOL / "qrels" / f"{s}.tsv") for s in ("dl19", "dl20"))
    assert merged == {**dl19, **dl20} and summary["queries"] == 43 + 54
    assert load_qrels(tmp_path / "dl" / "qrels" / "dl19.tsv") == dl19


def test_a_held_out_dev_split_divides_the_training_queries_by_seed(tmp_path):
    from _splits import write_held_out_split, write_qrels

    source = tmp_path / "source"
    (source / "qrels").mkdir(parents=True)
    for name in ("corpus.jsonl", "queries.jsonl"):
        (source / name).write_text("", encoding="utf-8")
    train = {f"q{i}": {f"d{i}": 1} for i in range(10)}
    write_qrels(source / "qrels" / "train.tsv", train)
    write_qrels(source / "qrels" / "test.tsv", {"t0": {"d0": 1}})
    summary = write_held_out_split(source, tmp_path / "dev", held_out_fraction=0.2, seed=7)
    kept, held = (load_qrels(tmp_path / "dev" / "qrels" / f"{s}.tsv") for s in ("train", "dev"))
    assert summary["queries"] == {"train": 8, "dev": 2}
    assert not set(kept) & set(held) and {**kept, **held} == train
    assert not (tmp_path / "dev" / "qrels" / "test.tsv").exists()  # a dev folder never carries the test split
    write_held_out_split(source, tmp_path / "again", held_out_fraction=0.2, seed=7)
    assert load_qrels(tmp_path / "again" / "qrels" / "dev.tsv") == held


@pytest.mark.skipif(not SQUAD.exists(), reason="needs ../shared/datasets/squad-dev")
def test_squad_dev_holds_out_whole_training_articles(tmp_path):
    from _splits import write_held_out_split

    write_group_split(SQUAD, tmp_path / "split", seed=42)
    write_held_out_split(tmp_path / "split", tmp_path / "dev", 0.2, seed=42, group_of=document_group)
    train, dev = _articles(tmp_path / "dev", "train"), _articles(tmp_path / "dev", "dev")
    assert len(dev) == 5 and len(train) == 19 and not train & dev  # 20% of the 24 training articles
    assert train | dev == _articles(tmp_path / "split", "train")  # no test article is read
