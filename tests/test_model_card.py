"""The published model card names no local path, and its ``base_model`` is a Hub id or absent."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from embeddistill.evaluation.model_card import base_model_of, public_name, render_model_card
from embeddistill.pipeline.summary import RunSummary

ABSOLUTE_PATH = re.compile(r"(^|[\s`'\"(:=\[])(/|~/)[\w.-]+/")  # "/x/..." or "~/x/..." after a separator

METRICS = {
    "dataset": "/data/private/scifact",
    "eval_split": "test",
    "eval_queries": 300,
    "teacher": {"model": "/home/someone/models/my-teacher", "nDCG@10": 0.6, "latency": {"batch1_ms": 16.0}},
    "student": {
        "model": "/home/someone/models/small-one",
        "asymmetric": False,
        "nDCG@10": 0.5,
        "latency": {"batch1_ms": 8.0},
    },
    "retention": {"nDCG@10": 0.8333},
    "speedup": {"batch1": 2.0},
    "training_queries": {"labelled": 10, "extra": 0, "generated": 20},
    "training": {"steps": 5, "train_seconds": 1.0},
    "timings": {"train_seconds": 1.0, "total_seconds": 2.0},
    "environment": {"embeddistill": "0.1.0", "torch": "2", "threads": 1},
}
CONFIG = {
    "out": "/home/someone/runs/scifact",
    "data": {"dataset": "/data/private/scifact", "extra_queries": ["/data/private/q1.jsonl", "~/q2.jsonl"]},
    "model": {
        "teacher": "/home/someone/models/my-teacher",
        "student": "/home/someone/models/small-one",
        "cache_dir": "/var/cache/embeddistill",
    },
    "ce": {"first_stage": "sentence-transformers/all-MiniLM-L6-v2"},
}


def _front_matter(card: str) -> dict:
    return yaml.safe_load(card.split("---\n")[1])


def test_a_model_card_names_local_models_datasets_and_folders_by_their_folder_name_only():
    card = render_model_card(RunSummary.from_dict(METRICS), CONFIG, name="small-one")
    assert not ABSOLUTE_PATH.search(card), ABSOLUTE_PATH.search(card)
    assert "/home/someone" not in card and "/data/private" not in card and "/var/cache" not in card
    assert "an EmbedDistill student of `my-teacher`" in card and "`small-one`" in card
    assert "- dataset: `scifact`" in card
    assert "cache_dir: embeddistill" in card and "- q1.jsonl" in card and "- q2.jsonl" in card
    assert "first_stage: sentence-transformers/all-MiniLM-L6-v2" in card  # a Hub id stays as it is
    assert "base_model" not in _front_matter(card)  # a local folder of unknown origin


@pytest.mark.parametrize(
    ("teacher", "expected"),
    [
        ("sentence-transformers/all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"),
        ("bert-base-uncased", "bert-base-uncased"),
        ("/hf/hub/models--org--teacher-x/snapshots/abc123", "org/teacher-x"),
        ("/home/someone/models/my-teacher", None),
        ("~/models/my-teacher", None),
        ("not a hub id", None),
        ("", None),
    ],
)
def test_base_model_is_a_hub_id_or_nothing(teacher, expected):
    assert base_model_of(teacher) == expected
    summary = RunSummary.from_dict({**METRICS, "teacher": {**METRICS["teacher"], "model": teacher}})
    assert _front_matter(render_model_card(summary, {})).get("base_model") == expected


def test_a_local_teacher_folder_gives_the_hub_id_its_config_declares(tmp_path, monkeypatch):
    declared, unknown = tmp_path / "declared", tmp_path / "unknown"
    declared.mkdir()
    unknown.mkdir()
    (declared / "config_sentence_transformers.json").write_text(json.dumps({"model_id": "org/the-teacher"}))
    (unknown / "config_sentence_transformers.json").write_text(json.dumps({"__version__": {}}))
    assert base_model_of(str(declared)) == "org/the-teacher"
    assert base_model_of(str(unknown)) is None
    monkeypatch.chdir(tmp_path)
    assert base_model_of("unknown") is None  # a relative path to a local folder is local too
    assert public_name("unknown") == "unknown" and public_name(str(unknown)) == "unknown"
