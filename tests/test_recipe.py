"""The student's recipe: ``auto`` in ``asymmetric``, ``crops_per_document``, ``epochs`` and ``max_steps`` resolved
from what the student is, before anything is checked or loaded; a value given is never changed."""

from __future__ import annotations

import pytest

from embeddistill.config import DistillConfig, resolve_student_recipe


def _resolved(**options) -> tuple:
    config = DistillConfig.from_dict({"teacher": "t", "dataset": "d", "out": "o", **options})
    resolve_student_recipe(config)
    return config.model.asymmetric, config.data.crops_per_document, config.training.epochs, config.training.max_steps


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, (True, 24, 3, 0)),  # the default student, teacher:0,-1: a query encoder cut from the teacher
        ({"student": "teacher:2"}, (True, 24, 3, 0)),
        ({"student": "some/minilm", "student_layers": [0, -1]}, (True, 24, 3, 0)),  # cut: far from any retriever
        ({"student": "some/minilm"}, (False, 2, 6, 2000)),  # a whole pretrained model keeps its own index
        ({"student": "some/minilm", "asymmetric": True}, (True, 24, 3, 0)),  # asked for: the query-encoder recipe
        ({"student": "teacher:2", "asymmetric": False}, (False, 24, 3, 0)),  # symmetric, but not a pretrained whole
        ({"student": "some/minilm", "crops_per_document": 8, "epochs": 3, "max_steps": 0}, (False, 8, 3, 0)),  # kept
    ],
)
def test_auto_resolves_to_the_recipe_of_what_the_student_is(options, expected):
    assert _resolved(**options) == expected


def test_a_teacher_that_allows_one_kind_of_student_decides_asymmetric_but_not_a_value_given():
    endpoint = {"teacher": "http://localhost:8000/v1", "student": "some/minilm"}
    assert _resolved(**endpoint) == (True, 24, 3, 0)  # a black-box teacher has no document tower to train against
    assert _resolved(**endpoint, asymmetric=False)[0] is False  # refused later by the checks, named
    cross_encoder = {"cross_encoder": "some/reranker", "student": "teacher:2"}
    assert _resolved(**cross_encoder) == (False, 24, 3, 0)  # a cross-encoder teacher has none to keep


def test_resolving_twice_changes_nothing():
    config = DistillConfig.from_dict({"teacher": "t", "dataset": "d", "out": "o", "student": "some/minilm"})
    once = resolve_student_recipe(config).to_dict()
    assert resolve_student_recipe(config).to_dict() == once


def test_auto_is_accepted_from_yaml_and_anything_else_named_in_the_error(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("model: {asymmetric: auto}\ntraining: {epochs: auto}\ndata: {crops_per_document: 4}\n")
    config = DistillConfig.from_yaml(path)
    assert (config.model.asymmetric, config.training.epochs, config.data.crops_per_document) == ("auto", "auto", 4)
    path.write_text("model: {asymmetric: maybe}\n")
    with pytest.raises(ValueError, match=r"option 'asymmetric' expects true/false or 'auto', got 'maybe'"):
        DistillConfig.from_yaml(path)


def test_training_refuses_a_step_count_left_at_auto_naming_what_to_resolve():
    from embeddistill.config import TrainingConfig
    from embeddistill.training.distillation import planned_steps

    with pytest.raises(ValueError, match=r"epochs and max_steps 'auto' must be resolved"):
        planned_steps(TrainingConfig(), steps_per_epoch=10)
    assert planned_steps(TrainingConfig(epochs=6, max_steps=2000), steps_per_epoch=190) == 1140  # cap not reached
    assert planned_steps(TrainingConfig(epochs=6, max_steps=2000), steps_per_epoch=1150) == 2000
    assert planned_steps(TrainingConfig(epochs=2, max_steps=0), steps_per_epoch=1150) == 2300  # 0: no cap
