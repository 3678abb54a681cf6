"""Corpus-only mode (issue 18): a BEIR folder holding nothing but ``corpus.jsonl`` distils with the default command,
trained on generated queries and measured by its label-free agreement with the teacher."""

from __future__ import annotations

import json
import shutil

import pytest

from embeddistill.cli import main
from embeddistill.data import DataError, RetrievalDataset

FAST = [
    "--epochs",
    "1",
    "--batch-size",
    "16",
    "--crops-per-document",
    "1",
    "--latency-repeats",
    "2",
    "--checkpoint-every",
    "0",
    "--threads",
    "2",
    "--validation-queries",
    "30",
    "--learning-rate",
    "1e-4",
    "--max-steps",
    "6",
    "--validate-every",
    "3",
    "--latency-batch-sizes",
    "1",
]


@pytest.fixture(scope="module")
def corpus_only(tmp_path_factory, scifact_slice):
    """The SciFact slice's 300 documents and nothing else: no queries.jsonl, no qrels/."""
    folder = tmp_path_factory.mktemp("corpus-only") / "scifact-corpus"
    folder.mkdir()
    shutil.copy(scifact_slice / "corpus.jsonl", folder / "corpus.jsonl")
    return folder


@pytest.fixture(scope="module")
def corpus_only_run(tmp_path_factory, tiny_teacher_path, corpus_only):
    out = tmp_path_factory.mktemp("corpus-only-run")
    cache = tmp_path_factory.mktemp("cache")
    argv = ["distill", "--teacher", tiny_teacher_path, "--student", "teacher:2", "--asymmetric"]
    argv += ["--dataset", str(corpus_only), "--out", str(out), "--cache-dir", str(cache), *FAST]
    assert main(argv) == 0
    return out


def test_a_folder_with_only_a_corpus_loads_with_no_queries(corpus_only):
    dataset = RetrievalDataset.load(str(corpus_only))
    assert len(dataset.corpus) == 300 and dataset.queries == {} and not dataset.has_labels


def test_a_corpus_only_folder_distils_end_to_end_and_reports_the_label_free_agreement(corpus_only_run):
    assert (corpus_only_run / "student" / "modules.json").exists()
    assert not (corpus_only_run / "teacher.trec").exists() and not (corpus_only_run / "student.trec").exists()
    metrics = json.loads((corpus_only_run / "metrics.json").read_text())
    assert metrics["eval_queries"] == 0 and metrics["retention"] == {}
    assert 0.0 <= metrics["student"]["agreement_nDCG@10"] <= 1.0 and "query_cosine" in metrics["student"]
    agreement = metrics["label_free_agreement"]
    assert agreement["queries"] == 30 and agreement["start"] is not None
    assert agreement["kept"] == {k: metrics["student"][k] for k in ("agreement_nDCG@10", "query_cosine")}
    assert metrics["training_queries"]["labelled"] == 0 and metrics["training_queries"]["generated"] > 0
    report = (corpus_only_run / "report.md").read_text()
    assert "label-free agreement" in report and "student at start" in report and "agreement_nDCG@10" in report
    card = (corpus_only_run / "student" / "README.md").read_text()
    assert "label-free agreement" in card and "nDCG@10 |" not in card.replace("agreement_nDCG@10", "")


def test_the_label_free_decision_is_logged_once(corpus_only_run):
    log = (corpus_only_run / "distill.log").read_text()
    assert log.count("label-free run:") == 1


def test_a_step_cap_that_cuts_the_epochs_short_says_where_it_stops(corpus_only_run):
    log = (corpus_only_run / "distill.log").read_text()
    assert log.count("max_steps 6: training stops after") == 1  # the full run only, not the tuning runs
    assert "of 1 epoch(s)" in log


def test_a_missing_named_split_in_a_folder_with_qrels_is_still_a_clear_error(tmp_path, scifact_slice, capsys):
    argv = ["distill", "--teacher", "unused", "--dataset", str(scifact_slice), "--out", str(tmp_path / "out")]
    assert main([*argv, "--eval-split", "dev"]) == 2
    error = capsys.readouterr().err
    assert "dev.tsv" in error and "no qrels for split 'dev'" in error and "['test', 'train']" in error


def test_a_folder_with_qrels_but_no_queries_file_is_still_an_error(tmp_path, scifact_slice):
    folder = shutil.copytree(scifact_slice, tmp_path / "broken")
    (folder / "queries.jsonl").unlink()
    with pytest.raises(DataError, match=r"queries\.jsonl: file not found"):
        RetrievalDataset.load(str(folder))


def test_a_corpus_only_run_averaged_with_its_start_reports_the_averaged_agreement(
    tmp_path, tiny_teacher_path, corpus_only
):
    argv = ["distill", "--teacher", tiny_teacher_path, "--student", "teacher:2", "--dataset", str(corpus_only)]
    argv += ["--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"), *FAST, "--start-weight", "0.5"]
    assert main(argv) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    merged = metrics["training"]["validation"]["merged"]
    assert metrics["label_free_agreement"]["kept"] == merged  # what the run ends with, not its kept step alone
    assert metrics["student"]["agreement_nDCG@10"] == merged["agreement_nDCG@10"]
    for written in ("report.md", "student/README.md"):
        assert "averaged with its start at 0.5" in (tmp_path / "run" / written).read_text()
