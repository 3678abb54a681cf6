"""`embeddistill evaluate` and `index` after `distill` reuse the teacher-embedding cache the run built."""

from __future__ import annotations

import json

import pytest

import embeddistill.models.teachers as teachers
from embeddistill.cli import main
from embeddistill.models.students import build_student
from embeddistill.models.teachers import load_sentence_transformer

pytestmark = pytest.mark.slow  # one small distill run

FAST = ["--epochs", "1", "--batch-size", "16", "--crops-per-document", "1", "--perturbations-per-query", "1"]
FAST += ["--latency-repeats", "2", "--checkpoint-every", "0", "--threads", "2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_teacher_path, scifact_slice):
    out, cache = tmp_path_factory.mktemp("run"), tmp_path_factory.mktemp("cache")
    argv = ["distill", "--teacher", tiny_teacher_path, "--student", "teacher:2", "--asymmetric"]
    argv += ["--dataset", str(scifact_slice), "--out", str(out), "--cache-dir", str(cache), *FAST]
    assert main(argv) == 0
    return out, cache


@pytest.fixture
def encoded(monkeypatch):
    """Texts the teacher's cache had to encode, per kind (``document`` / ``query``), and calls of encode_document."""
    counts = {"document": 0, "query": 0, "encode_document": 0}
    original = teachers.encode_chunks

    def counting(model, chunks, kind, *args, **kwargs):
        chunks = list(chunks)
        counts[kind] += sum(len(chunk) for chunk in chunks)
        return original(model, chunks, kind, *args, **kwargs)

    monkeypatch.setattr(teachers, "encode_chunks", counting)
    from sentence_transformers import SentenceTransformer

    plain = SentenceTransformer.encode_document

    def counting_document(self, *args, **kwargs):
        counts["encode_document"] += 1
        return plain(self, *args, **kwargs)

    monkeypatch.setattr(SentenceTransformer, "encode_document", counting_document)
    return counts


def test_evaluating_a_runs_student_encodes_no_document_again(run, scifact_slice, tmp_path, encoded, capsys):
    out, _ = run
    # No --cache-dir: the run's config.yaml says where its cache is.
    assert main(["evaluate", str(out / "student"), "--dataset", str(scifact_slice), "--out", str(tmp_path)]) == 0
    assert encoded == {"document": 0, "query": 0, "encode_document": 0}
    assert "documents from its teacher's embedding cache" in capsys.readouterr().err
    # The same documents and query tower as the run's own evaluation: the same scores.
    evaluated = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    distilled = json.loads((out / "metrics.json").read_text())["student"]
    assert evaluated["nDCG@10"] == pytest.approx(distilled["nDCG@10"], abs=1e-4)


def test_evaluating_the_teacher_after_distill_encodes_nothing(run, tiny_teacher_path, scifact_slice, tmp_path, encoded):
    out, cache = run
    argv = ["evaluate", tiny_teacher_path, "--dataset", str(scifact_slice), "--out", str(tmp_path)]
    assert main([*argv, "--cache-dir", str(cache)]) == 0
    assert encoded == {"document": 0, "query": 0, "encode_document": 0}
    evaluated = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    assert evaluated["nDCG@10"] == pytest.approx(json.loads((out / "metrics.json").read_text())["teacher"]["nDCG@10"])


def test_indexing_with_a_runs_student_reads_the_teachers_documents(run, scifact_slice, tmp_path, encoded):
    out, _ = run
    argv = ["index", "--model", str(out / "student"), "--dataset", str(scifact_slice), "--out", str(tmp_path / "i")]
    assert main(argv) == 0  # no --cache-dir: the run's config.yaml says where its cache is
    assert encoded == {"document": 0, "query": 0, "encode_document": 0}


def test_a_student_of_another_teacher_does_not_take_its_documents_from_this_cache(
    run, tiny_student_path, scifact_slice, tmp_path, encoded, capsys
):
    _, cache = run
    other = build_student("teacher:2", load_sentence_transformer(tiny_student_path), asymmetric=True)
    other.save(str(tmp_path / "other"))
    argv = ["evaluate", str(tmp_path / "other"), "--dataset", str(scifact_slice), "--out", str(tmp_path / "e")]
    assert main([*argv, "--cache-dir", str(cache)]) == 0
    assert encoded["encode_document"] >= 1  # its own document tower encoded the corpus
    assert "no teacher-embedding cache" in capsys.readouterr().err
