"""``--dataset NAME`` from the Hugging Face hub, offline: local repositories laid out as mteb/ and BeIR/ publish them,
read through ``datasets`` via ``$EMBEDDISTILL_HUB_DATASETS``, converted once into a BEIR folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

datasets = pytest.importorskip("datasets")

from embeddistill.cli import main  # noqa: E402
from embeddistill.data import RetrievalDataset  # noqa: E402
from embeddistill.hub import MIRROR_ENV, converted_folder, hub_candidates  # noqa: E402

CORPUS = [
    {"_id": "d1", "title": "Vitamin D", "text": "Bones need vitamin D."},
    {"_id": "d2", "title": "", "text": "Coral reefs bleach in warm water."},
    {"_id": "d3", "title": "Genes", "text": "Tumour suppressors in mice."},
]
QUERIES = [{"_id": "q1", "text": "vitamin d bones"}, {"_id": "q2", "text": "reef bleaching"}]
QRELS = {"train": [("q1", "d1", 1)], "test": [("q2", "d2", 1), ("q2", "d3", 0)]}

# The README ``configs`` of mteb/scifact (one config per table; the qrels are the default config, split by split).
MTEB_README = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: qrels/train.jsonl
  - split: test
    path: qrels/test.jsonl
- config_name: corpus
  data_files:
  - split: corpus
    path: corpus.jsonl
- config_name: queries
  data_files:
  - split: queries
    path: queries.jsonl
---
"""
BEIR_README = """---
configs:
- config_name: corpus
  data_files:
  - split: corpus
    path: corpus.jsonl
- config_name: queries
  data_files:
  - split: queries
    path: queries.jsonl
---
"""


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def mteb_repository(folder: Path) -> None:
    (folder).mkdir(parents=True)
    (folder / "README.md").write_text(MTEB_README, encoding="utf-8")
    _jsonl(folder / "corpus.jsonl", CORPUS)
    _jsonl(folder / "queries.jsonl", QUERIES)
    for split, rows in QRELS.items():
        _jsonl(folder / "qrels" / f"{split}.jsonl", [{"query-id": q, "corpus-id": d, "score": s} for q, d, s in rows])


def beir_repositories(folder: Path, qrels_folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "README.md").write_text(BEIR_README, encoding="utf-8")
    _jsonl(folder / "corpus.jsonl", CORPUS)
    _jsonl(folder / "queries.jsonl", QUERIES)
    qrels_folder.mkdir(parents=True)
    for split, rows in QRELS.items():  # BeIR/NAME-qrels: one .tsv per split at the top
        lines = ["query-id\tcorpus-id\tscore", *(f"{q}\t{d}\t{s}" for q, d, s in rows)]
        (qrels_folder / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """A local hub mirror (mteb/scifact, BeIR/nfcorpus + BeIR/nfcorpus-qrels), datasets offline, fresh caches."""
    mirror = tmp_path / "hub"
    mteb_repository(mirror / "mteb" / "scifact")
    beir_repositories(mirror / "BeIR" / "nfcorpus", mirror / "BeIR" / "nfcorpus-qrels")
    monkeypatch.setenv(MIRROR_ENV, str(mirror))
    monkeypatch.setenv("EMBEDDISTILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    monkeypatch.delenv("EMBEDDISTILL_DATA", raising=False)
    monkeypatch.chdir(tmp_path)  # no folder named like the dataset beside the test
    return mirror


def test_a_name_is_tried_as_mteb_then_beir_and_an_owner_name_as_that_repository_only():
    assert hub_candidates("scifact") == [("mteb/scifact", None), ("BeIR/scifact", "BeIR/scifact-qrels")]
    assert hub_candidates("mteb/scifact") == [("mteb/scifact", None)]
    assert hub_candidates("BeIR/scifact") == [("BeIR/scifact", "BeIR/scifact-qrels")]
    assert hub_candidates("./scifact") == [] and hub_candidates("/data/scifact") == [] and hub_candidates("a/b/c") == []


def test_a_dataset_by_name_comes_from_the_mteb_layout_converted_once_into_a_beir_folder(offline_hub):
    dataset = RetrievalDataset.load("scifact")
    assert dataset.path == converted_folder("scifact") and dataset.path.parent.name == "datasets"
    assert dataset.corpus == {"d1": "Vitamin D Bones need vitamin D.", "d2": "Coral reefs bleach in warm water.",
                              "d3": "Genes Tumour suppressors in mice."}  # fmt: skip
    assert dataset.queries == {"q1": "vitamin d bones", "q2": "reef bleaching"}
    assert dataset.splits() == ["test", "train"]
    assert dataset.qrels("test") == {"q2": {"d2": 1, "d3": 0}} and dataset.qrels("train") == {"q1": {"d1": 1}}
    # converted once: later loads read the folder, the hub (here: the mirror) is not needed any more
    (offline_hub / "mteb" / "scifact" / "corpus.jsonl").unlink()
    assert RetrievalDataset.load("scifact").corpus == dataset.corpus
    assert not [p for p in dataset.path.parent.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_the_beir_layout_with_its_qrels_repository_is_the_fallback(offline_hub):
    dataset = RetrievalDataset.load("nfcorpus")
    assert len(dataset.corpus) == 3 and dataset.qrels("test") == {"q2": {"d2": 1, "d3": 0}}


def test_an_unknown_name_offline_says_how_to_point_at_a_folder(offline_hub, capsys):
    with pytest.raises(FileNotFoundError) as error:
        RetrievalDataset.load("fiqa")
    message = str(error.value)
    assert "mteb/fiqa" in message and "BeIR/fiqa" in message
    assert "--dataset /path/to/folder" in message and "$EMBEDDISTILL_DATA" in message
    assert main(["generate-queries", "--dataset", "fiqa", "--out", "q.jsonl"]) == 2
    assert "--dataset /path/to/folder" in capsys.readouterr().err


def test_a_local_folder_and_embeddistill_data_come_before_the_hub(offline_hub, tmp_path, monkeypatch):
    local = tmp_path / "data" / "scifact"
    _jsonl(local / "corpus.jsonl", [{"_id": "x", "text": "local document"}])
    monkeypatch.setenv("EMBEDDISTILL_DATA", str(tmp_path / "data"))
    assert RetrievalDataset.load("scifact").corpus == {"x": "local document"}
    assert not converted_folder("scifact").exists()


def test_the_library_looks_in_no_shared_folder():
    source = Path(__file__).resolve().parents[1] / "src"
    offending = [
        f"{path}:{number}"
        for path in source.rglob("*.py")
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if "shared" in line and ("/" in line or "Path" in line or "parent" in line)
    ]
    assert not offending
