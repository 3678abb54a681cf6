"""End to end: the `distill` command on a small real SciFact slice, and the saved students."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from sentence_transformers import SentenceTransformer

from embeddistill.cli import main
from embeddistill.config import DistillConfig
from embeddistill.models.students import (
    QueryEncoder,
    build_student,
    is_asymmetric,
    projection_of,
    query_modules,
    select_layers,
    truncate_transformer,
)
from embeddistill.models.teachers import load_sentence_transformer
from embeddistill.pipeline.stages import student_index

FAST = [
    "--epochs",
    "1",
    "--batch-size",
    "16",
    "--crops-per-document",
    "1",
    "--perturbations-per-query",
    "1",
    "--latency-repeats",
    "2",
    "--checkpoint-every",
    "0",
    "--threads",
    "2",
]


@pytest.fixture(scope="module")
def asymmetric_run(tmp_path_factory, tiny_teacher_path, scifact_slice):
    out = tmp_path_factory.mktemp("asym")
    cache = tmp_path_factory.mktemp("cache")
    argv = [
        "distill",
        "--teacher",
        tiny_teacher_path,
        "--student",
        "teacher:2",
        "--asymmetric",
        "--dataset",
        str(scifact_slice),
        "--out",
        str(out),
        "--cache-dir",
        str(cache),
        *FAST,
    ]
    assert main(argv) == 0
    return out


def test_distill_writes_every_output(asymmetric_run, scifact_slice):
    for name in (
        "student/modules.json",
        "teacher.trec",
        "student.trec",
        "metrics.json",
        "report.md",
        "config.yaml",
        "train_log.jsonl",
        "distill.log",
        "training_queries.jsonl",
        "checkpoint/state.json",
    ):
        assert (asymmetric_run / name).exists(), name
    metrics = json.loads((asymmetric_run / "metrics.json").read_text())
    for metric in ("nDCG@10", "RR@10", "R@100"):
        assert 0.0 <= metrics["student"][metric] <= 1.0
        assert metrics["retention"][metric] == pytest.approx(metrics["student"][metric] / metrics["teacher"][metric])
    assert set(metrics["speedup"]) == {"batch1", "batch32"}
    latency = metrics["student"]["latency"]  # the median of the repeats and their spread
    assert latency["batch1_p10_ms"] <= latency["batch1_ms"] <= latency["batch1_p90_ms"]
    assert metrics["training_queries"]["labelled"] > 0 and metrics["training_queries"]["generated"] > 0
    # The student has 2 of the teacher's 4 layers.
    assert metrics["student"]["query_encoder_parameters"] < metrics["teacher"]["query_encoder_parameters"]
    test_queries = {line.split("\t")[0] for line in (scifact_slice / "qrels" / "test.tsv").read_text().splitlines()[1:]}
    run_queries = {line.split()[0] for line in (asymmetric_run / "student.trec").read_text().splitlines()}
    assert run_queries == test_queries
    log = [json.loads(line) for line in (asymmetric_run / "train_log.jsonl").read_text().splitlines()]
    assert {"loss", "score", "query_em", "lr", "step"} <= set(log[-1])
    assert "| student / teacher |" in (asymmetric_run / "report.md").read_text()


def test_training_queries_exclude_test_queries(asymmetric_run, scifact_slice):
    test_ids = {line.split("\t")[0] for line in (scifact_slice / "qrels" / "test.tsv").read_text().splitlines()[1:]}
    trained = [json.loads(line) for line in (asymmetric_run / "training_queries.jsonl").read_text().splitlines()]
    assert not test_ids & {row["_id"] for row in trained}


def test_asymmetric_student_round_trip(asymmetric_run, tiny_teacher_path):
    student = SentenceTransformer(str(asymmetric_run / "student"), device="cpu")
    teacher = load_sentence_transformer(tiny_teacher_path)
    assert is_asymmetric(student)
    texts = ["protein folding in yeast", "vitamin D and bone density"]
    # Documents go through the teacher's tower, unchanged by training.
    np.testing.assert_allclose(student.encode_document(texts), teacher.encode(texts), atol=1e-5)
    # Queries go through the small tower: what the trainer evaluated is what a user gets after loading.
    np.testing.assert_allclose(student.encode_query(texts), QueryEncoder.of(student).encode(texts), atol=1e-5)
    # A plain encode (BEIR wrappers, most user code) is the query side too, not the teacher under another name.
    np.testing.assert_allclose(student.encode(texts), student.encode_query(texts), atol=1e-6)
    layers = query_modules(student)[0].auto_model.config.num_hidden_layers
    assert layers == 2


def test_the_students_model_card_records_no_local_path(asymmetric_run, tiny_teacher_path, scifact_slice):
    card = (asymmetric_run / "student" / "README.md").read_text()
    for local in (tiny_teacher_path, str(scifact_slice), str(asymmetric_run), str(asymmetric_run.parent)):
        assert local not in card
    assert "an EmbedDistill student of `tiny-teacher`" in card
    assert "base_model" not in card.split("---\n")[1]  # the tiny teacher is a local folder of unknown origin


def test_final_checkpoint_is_complete(asymmetric_run):
    state = json.loads((asymmetric_run / "checkpoint" / "state.json").read_text())
    # Weights, optimiser and RNG, and the label-free check's history and best weights beside them.
    assert state["step"] > 0 and len(state["files"]) == 3 and state["extra"]["meta"]["history"]
    assert set(state["sha256"]) == {*state["files"], state["extra"]["file"]}
    assert all((asymmetric_run / "checkpoint" / name).exists() for name in state["sha256"])


@pytest.mark.slow
def test_a_whole_named_student_is_symmetric_by_default_with_a_projection(
    tmp_path, tiny_teacher_path, tiny_student_path, scifact_slice
):
    """A student of another width gets a projection into the teacher's space and its own document index; with no
    --asymmetric flag a whole named model keeps its own index (the recipe, recorded resolved in config.yaml)."""
    out = tmp_path / "sym"
    argv = [
        "distill",
        "--teacher",
        tiny_teacher_path,
        "--student",
        tiny_student_path,
        "--dataset",
        str(scifact_slice),
        "--out",
        str(out),
        "--cache-dir",
        str(tmp_path / "cache"),
        *FAST[:4],  # no --crops-per-document
        *FAST[6:],
    ]
    assert main(argv) == 0
    student = SentenceTransformer(str(out / "student"), device="cpu")
    assert not is_asymmetric(student)
    teacher_dim = SentenceTransformer(tiny_teacher_path).get_sentence_embedding_dimension()
    assert student.get_sentence_embedding_dimension() == teacher_dim == 32
    assert projection_of(student).linear.weight.shape == (32, 16)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert "document_em" in log[-1]
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    assert recorded["model"]["asymmetric"] is False
    assert recorded["data"]["crops_per_document"] == 2  # not given: the whole pretrained student's recipe
    assert recorded["training"]["epochs"] == 1  # given: kept


def test_truncate_transformer_keeps_the_first_layers(tiny_teacher_path):
    teacher = load_sentence_transformer(tiny_teacher_path)
    truncated = truncate_transformer(teacher[0], 2)
    full, short = teacher[0].auto_model, truncated.auto_model
    assert short.config.num_hidden_layers == 2 and len(short.encoder.layer) == 2
    assert full.config.num_hidden_layers == 4  # the teacher itself is untouched
    for a, b in zip(full.encoder.layer[:2].parameters(), short.encoder.layer.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="teacher has 4"):
        truncate_transformer(teacher[0], 5)


@pytest.mark.parametrize("spec", ["teacher:0,3", "teacher:0,-1"])  # -1: the top layer, counted as in Python
def test_a_teacher_student_keeps_the_layers_it_names(tiny_teacher_path, spec):
    teacher = load_sentence_transformer(tiny_teacher_path)
    tower = query_modules(build_student(spec, teacher, asymmetric=True))
    kept = tower[0].auto_model
    assert kept.config.num_hidden_layers == 2 and len(kept.encoder.layer) == 2
    full = teacher[0].auto_model.encoder.layer
    for source, copied in ((full[0], kept.encoder.layer[0]), (full[3], kept.encoder.layer[1])):
        for a, b in zip(source.parameters(), copied.parameters(), strict=True):
            assert torch.equal(a, b)
    for bad in ([3, 1], [0, 4], []):
        with pytest.raises(ValueError, match="give them increasing"):
            select_layers(teacher[0], bad)


def test_lstsq_projection_starts_at_the_best_linear_map(tiny_teacher_path):
    from embeddistill.models.students import fit_projection, make_projection

    rng = np.random.default_rng(0)
    student_embeddings = rng.normal(size=(64, 8))
    true_map = rng.normal(size=(8, 5))
    projection = make_projection(8, 5)
    fit_projection(projection, student_embeddings, student_embeddings @ true_map)
    np.testing.assert_allclose(projection.linear.weight.detach().numpy(), true_map.T, atol=1e-4)


def test_lstsq_projection_ignores_directions_the_student_does_not_use():
    """A rank-deficient student output (all-MiniLM-L6-v2's is) must not get huge weights on its null directions:
    they made the first optimiser step blow the student up."""
    from embeddistill.models.students import fit_projection, make_projection

    rng = np.random.default_rng(0)
    used = rng.normal(size=(64, 6))
    # Two more columns: one constant zero, one a tiny (1e-9) perturbation of another column.
    student_embeddings = np.hstack([used, np.zeros((64, 1)), used[:, :1] + 1e-9 * rng.normal(size=(64, 1))])
    teacher_embeddings = rng.normal(size=(64, 5))  # not a linear function of the student's: no exact fit exists
    projection = make_projection(8, 5)
    fit_projection(projection, student_embeddings, teacher_embeddings)
    weight = projection.linear.weight.detach().numpy().astype(np.float64)
    assert np.abs(weight).max() < 10
    # On the directions the student does use, it is still the least-squares fit.
    best, *_ = np.linalg.lstsq(used, teacher_embeddings, rcond=None)
    np.testing.assert_allclose(student_embeddings @ weight.T, used @ best, atol=1e-4)


def test_a_symmetric_students_own_index_is_its_encode_document_and_it_is_left_on_the_cpu(
    tiny_teacher_path, tiny_student_path, scifact_slice
):
    student = build_student(tiny_student_path, load_sentence_transformer(tiny_teacher_path), asymmetric=False)
    corpus = [json.loads(line) for line in (scifact_slice / "corpus.jsonl").read_text().splitlines()][:40]
    texts = [f"{d.get('title', '')} {d['text']}".strip() for d in corpus]
    prep = SimpleNamespace(config=DistillConfig(), doc_texts=texts, doc_ids=[d["_id"] for d in corpus])
    index = student_index(student, prep, batch_size=8)
    expected = student.encode_document(texts, batch_size=8, convert_to_numpy=True)
    assert index.ids == prep.doc_ids
    np.testing.assert_allclose(index.embeddings, expected, atol=1e-5)
    assert next(student.parameters()).device.type == "cpu"


def test_asymmetric_build_freezes_the_teacher_tower(tiny_teacher_path):
    teacher = load_sentence_transformer(tiny_teacher_path)
    student = build_student("teacher:1", teacher, asymmetric=True)
    assert not any(p.requires_grad for p in teacher.parameters())
    assert any(p.requires_grad for p in query_modules(student).parameters())
