"""``model.student_layers``: keep only some transformer layers of a named student model (N: the first N;
several: those layers, a negative one counting from the top)."""

from __future__ import annotations

import pytest
import torch
from sentence_transformers import SentenceTransformer

from embeddistill.config import DistillConfig
from embeddistill.models.students import build_student, projection_of, query_modules
from embeddistill.models.teachers import load_sentence_transformer

try:  # sentence-transformers >= 6
    from sentence_transformers.base.modules import Transformer
except ImportError:  # 5.x
    from sentence_transformers.models import Transformer


def _tower_layers(student) -> int:
    transformer = next(m for m in query_modules(student) if isinstance(m, Transformer))
    return transformer.auto_model.config.num_hidden_layers


def test_option_exists_with_all_layers_by_default():
    assert DistillConfig().model.student_layers == []
    assert DistillConfig.from_dict({"student_layers": 2}).model.student_layers == [2]  # a config written before
    assert DistillConfig.from_dict({"student_layers": [0, -1]}).model.student_layers == [0, -1]


@pytest.mark.parametrize("asymmetric", [True, False])
def test_keeps_the_first_layers_and_still_projects(tiny_teacher_path, tiny_student_path, asymmetric, tmp_path):
    teacher = load_sentence_transformer(tiny_teacher_path)
    student = build_student(tiny_student_path, teacher, asymmetric=asymmetric, layers=2)
    assert _tower_layers(student) == 2
    assert projection_of(student) is not None  # the 16-d tiny student still maps into the 32-d teacher space
    embeddings = student.encode_query(["what lowers blood pressure?"], convert_to_numpy=True)
    assert embeddings.shape == (1, teacher.get_sentence_embedding_dimension())

    student.save(str(tmp_path / "student"))  # the truncation is part of the saved model, not only in memory
    assert _tower_layers(SentenceTransformer(str(tmp_path / "student"))) == 2


def test_a_layer_list_keeps_those_layers_counting_negatives_from_the_top(tiny_teacher_path, tiny_student_path):
    teacher = load_sentence_transformer(tiny_teacher_path)
    whole = load_sentence_transformer(tiny_student_path)
    student = build_student(tiny_student_path, teacher, asymmetric=True, layers=[0, -1])
    assert _tower_layers(student) == 2
    kept = next(m for m in query_modules(student) if isinstance(m, Transformer)).auto_model
    original = next(m for m in whole if isinstance(m, Transformer)).auto_model
    top = original.config.num_hidden_layers - 1
    kept_weights = [p for n, p in kept.named_parameters() if ".1." in n and "layer" in n]
    top_weights = [p for n, p in original.named_parameters() if f".{top}." in n and "layer" in n]
    assert kept_weights and len(kept_weights) == len(top_weights)  # the second kept layer is the original top one
    assert all(torch.equal(a, b) for a, b in zip(kept_weights, top_weights, strict=True))


def test_zero_keeps_every_layer(tiny_teacher_path, tiny_student_path):
    teacher = load_sentence_transformer(tiny_teacher_path)
    assert _tower_layers(build_student(tiny_student_path, teacher, asymmetric=True)) == 4


@pytest.mark.parametrize(
    ("spec", "layers", "message"),
    [
        ("STUDENT", 5, "first 5 layers"),
        ("STUDENT", [-1], "a positive layer count or the layers to keep"),
        ("STUDENT", [0, 4], "has layers 0 to 3"),
        ("STUDENT", [1, 0], "give them increasing"),
        ("teacher:2", 1, "give the layers in 'teacher:...' only"),
    ],
)
def test_bad_layer_counts_fail_clearly(tiny_teacher_path, tiny_student_path, spec, layers, message):
    teacher = load_sentence_transformer(tiny_teacher_path)
    with pytest.raises(ValueError, match=message):
        build_student(tiny_student_path if spec == "STUDENT" else spec, teacher, asymmetric=True, layers=layers)


def test_a_teacher_tower_is_trainable_after_an_asymmetric_student_froze_the_teacher(tiny_teacher_path):
    # Benchmarks build several students from one loaded teacher; an asymmetric one freezes the teacher's weights,
    # and a later teacher:N copy must not inherit that (it would silently train nothing).
    teacher = load_sentence_transformer(tiny_teacher_path)
    build_student("teacher:2", teacher, asymmetric=True)
    assert not any(p.requires_grad for p in teacher.parameters())
    later = build_student("teacher:2", teacher, asymmetric=False)
    assert all(p.requires_grad for p in query_modules(later).parameters())
