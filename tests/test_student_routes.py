"""Which side of a saved asymmetric student a user gets: plain ``encode`` is the cheap query side, and the
document side is the teacher's, prompt included."""

from __future__ import annotations

import json

import numpy as np
from sentence_transformers import SentenceTransformer

from embeddistill.models.students import QueryEncoder, build_student, projection_of
from embeddistill.models.teachers import load_sentence_transformer

TEXTS = ["protein folding in yeast", "vitamin D and bone density", "does smoking cause lung cancer?"]


def _saved_and_loaded(student: SentenceTransformer, folder) -> SentenceTransformer:
    student.save(str(folder))
    return SentenceTransformer(str(folder), device="cpu")  # plain sentence-transformers, no embeddistill code


def test_plain_encode_of_a_saved_asymmetric_student_is_its_query_side(tiny_teacher_path, tiny_student_path, tmp_path):
    teacher = load_sentence_transformer(tiny_teacher_path)
    built = build_student(tiny_student_path, teacher, asymmetric=True)  # 16-d tower + projection into 32-d
    loaded = _saved_and_loaded(built, tmp_path / "student")

    assert projection_of(loaded) is not None
    plain = loaded.encode(TEXTS, convert_to_numpy=True)
    np.testing.assert_allclose(plain, loaded.encode_query(TEXTS, convert_to_numpy=True), atol=1e-6)
    np.testing.assert_allclose(plain, built.encode_query(TEXTS, convert_to_numpy=True), atol=1e-5)
    np.testing.assert_allclose(plain, QueryEncoder.of(loaded).encode(TEXTS), atol=1e-5)
    # ... and not the teacher's tower, which is what encode_document still gives.
    documents = loaded.encode_document(TEXTS, convert_to_numpy=True)
    np.testing.assert_allclose(documents, teacher.encode_document(TEXTS, convert_to_numpy=True), atol=1e-5)
    assert np.abs(plain - documents).max() > 1e-2
    router = json.loads((tmp_path / "student" / "router_config.json").read_text())
    assert router["parameters"]["default_route"] == "query"


def test_a_teacher_document_prompt_goes_to_the_students_documents_and_not_its_queries(tiny_teacher_path, tmp_path):
    teacher = load_sentence_transformer(tiny_teacher_path)
    teacher.prompts = {"query": "query: ", "document": "passage: "}
    loaded = _saved_and_loaded(build_student("teacher:2", teacher, asymmetric=True), tmp_path / "student")

    np.testing.assert_allclose(
        loaded.encode_document(TEXTS, convert_to_numpy=True),
        teacher.encode_document(TEXTS, convert_to_numpy=True),
        atol=1e-5,
    )
    without_prompt = teacher.encode_document(TEXTS, convert_to_numpy=True, prompt="")
    assert np.abs(loaded.encode_document(TEXTS, convert_to_numpy=True) - without_prompt).max() > 1e-3
    # The query tower is trained on plain queries (QueryEncoder adds no prompt): no prompt on the query side.
    np.testing.assert_allclose(
        loaded.encode_query(TEXTS, convert_to_numpy=True), QueryEncoder.of(loaded).encode(TEXTS), atol=1e-5
    )
    np.testing.assert_allclose(
        loaded.encode(TEXTS, convert_to_numpy=True), loaded.encode_query(TEXTS, convert_to_numpy=True), atol=1e-6
    )


def test_a_symmetric_student_has_one_route_and_no_prompts(tiny_teacher_path, tiny_student_path, tmp_path):
    teacher = load_sentence_transformer(tiny_teacher_path)
    teacher.prompts = {"query": "query: ", "document": "passage: "}
    loaded = _saved_and_loaded(build_student(tiny_student_path, teacher, asymmetric=False), tmp_path / "student")
    encoded = loaded.encode(TEXTS, convert_to_numpy=True)
    np.testing.assert_allclose(encoded, loaded.encode_query(TEXTS, convert_to_numpy=True), atol=1e-6)
    np.testing.assert_allclose(encoded, loaded.encode_document(TEXTS, convert_to_numpy=True), atol=1e-6)
