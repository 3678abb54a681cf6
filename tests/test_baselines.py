"""Off-the-shelf baselines beside the student: what a user would serve instead of distilling, each model searching
its own index of the corpus (``--baselines``; ``auto``: the student's own model as it comes)."""

from __future__ import annotations

import json
import shutil

import pytest
from test_corpus_only import FAST as LABEL_FREE_FAST
from test_pipeline import FAST

from embeddistill.cli import main
from embeddistill.config import DistillConfig
from embeddistill.pipeline.stages import baseline_models
from embeddistill.pipeline.summary import RunSummary


def _distill(tmp_path, teacher: str, student: str, dataset, *extra: str) -> dict:
    out = tmp_path / "run"
    argv = ["distill", "--teacher", teacher, "--student", student, "--dataset", str(dataset), "--out", str(out)]
    assert main([*argv, "--cache-dir", str(tmp_path / "cache"), *extra]) == 0
    return json.loads((out / "metrics.json").read_text()), (out / "report.md").read_text()


@pytest.mark.parametrize(
    ("student", "baselines", "expected"),
    [
        ("teacher:0,-1", ["auto"], []),
        ("sentence-transformers/all-MiniLM-L6-v2", ["auto"], ["sentence-transformers/all-MiniLM-L6-v2"]),
        ("some/model", ["auto", "other/model", "some/model"], ["some/model", "other/model"]),
        ("some/model", [""], []),
    ],
)
def test_auto_names_the_students_own_model_unless_the_student_is_teacher_layers(student, baselines, expected):
    config = DistillConfig.from_dict({"teacher": "t", "dataset": "d", "student": student, "baselines": baselines})
    assert baseline_models(config) == expected


def test_the_teacher_as_a_baseline_scores_exactly_what_the_teacher_scores(tmp_path, tiny_teacher_path, scifact_slice):
    metrics, report = _distill(
        tmp_path, tiny_teacher_path, "teacher:2", scifact_slice, "--asymmetric", "--baselines", tiny_teacher_path, *FAST
    )
    baseline = metrics["baselines"][tiny_teacher_path]
    for metric in ("nDCG@10", "RR@10", "R@100"):
        assert baseline[metric] == pytest.approx(metrics["teacher"][metric], abs=1e-6)
    assert baseline["latency"]["batch1_ms"] > 0 and baseline["query_encoder_parameters"] > 0
    assert f"`{tiny_teacher_path}` as it comes" in report
    verdict = "below" if metrics["student"]["nDCG@10"] < baseline["nDCG@10"] else "above"
    assert f"The student is {verdict} `{tiny_teacher_path}` as it comes: nDCG@10" in report
    assert RunSummary.from_dict(metrics).baselines[tiny_teacher_path].metrics["nDCG@10"] == baseline["nDCG@10"]


def test_a_whole_model_student_is_compared_with_itself_as_it_comes_by_default(
    tmp_path, tiny_teacher_path, tiny_student_path, scifact_slice
):
    metrics, report = _distill(tmp_path, tiny_teacher_path, tiny_student_path, scifact_slice, *FAST)
    assert RunSummary.from_dict(metrics).student.asymmetric is False  # no flag: its recipe, its own index
    assert set(metrics["baselines"]) == {tiny_student_path}
    assert 0 <= metrics["baselines"][tiny_student_path]["nDCG@10"] <= 1
    assert f"`{tiny_student_path}` as it comes" in report


def test_without_labels_the_teacher_as_a_baseline_agrees_with_itself_fully(tmp_path, tiny_teacher_path, scifact_slice):
    corpus = tmp_path / "corpus-only"
    corpus.mkdir()
    shutil.copy(scifact_slice / "corpus.jsonl", corpus / "corpus.jsonl")
    metrics, report = _distill(
        tmp_path, tiny_teacher_path, "teacher:2", corpus, "--asymmetric", "--baselines", tiny_teacher_path,
        *LABEL_FREE_FAST,
    )  # fmt: skip
    assert metrics["baselines"][tiny_teacher_path]["agreement_nDCG@10"] == pytest.approx(1.0)
    assert f"The student is below `{tiny_teacher_path}` as it comes: agreement_nDCG@10" in report


def test_a_baseline_that_cannot_be_loaded_is_skipped_with_a_warning_and_the_run_still_reports(
    tmp_path, tiny_teacher_path, scifact_slice
):
    missing = "embeddistill-tests/no-such-model-anywhere"  # a hub id: offline (or online) it cannot be loaded
    metrics, report = _distill(
        tmp_path, tiny_teacher_path, "teacher:2", scifact_slice, "--asymmetric", "--baselines", missing, *FAST
    )
    assert "baselines" not in metrics and metrics["student"]["nDCG@10"] >= 0
    assert f"--baselines {missing}: skipped" in (tmp_path / "run" / "distill.log").read_text()
