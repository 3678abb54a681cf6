"""Averaging the trained student with its start (``start_weight``, WiSE-FT): by hand, its ``auto`` rule, and a
run that ends exactly where it started when the start gets all the weight."""

from __future__ import annotations

import pytest
import torch
from test_label_free import _distill

from embeddistill.config import DistillConfig
from embeddistill.evaluation.agreement import AGREEMENT_METRIC
from embeddistill.models.students import build_student, query_modules
from embeddistill.models.teachers import load_sentence_transformer
from embeddistill.training.merging import merge_with_start, merged_state, resolved_start_weight, snapshot


def test_averaging_with_the_start_by_hand():
    trained = {"weight": torch.tensor([0.0, 2.0]), "position_ids": torch.tensor([0, 1])}
    start = {"weight": torch.tensor([4.0, 6.0]), "position_ids": torch.tensor([0, 1])}
    merged = merged_state(trained, start, 0.25)  # 0.75 * trained + 0.25 * start
    assert merged["weight"].tolist() == [1.0, 3.0]
    assert merged["position_ids"] is trained["position_ids"]  # integer buffers are not averaged


def test_a_start_weight_of_zero_or_one_gives_back_an_endpoint():
    trained, start = {"w": torch.randn(3, 4)}, {"w": torch.randn(3, 4)}
    assert torch.equal(merged_state(trained, start, 0.0)["w"], trained["w"])
    assert torch.equal(merged_state(trained, start, 1.0)["w"], start["w"])


def test_averaging_refuses_weights_of_another_architecture_and_a_share_outside_zero_to_one():
    with pytest.raises(ValueError, match="differ in their tensors"):
        merged_state({"a": torch.zeros(1)}, {"b": torch.zeros(1)}, 0.5)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        merged_state({"a": torch.zeros(1)}, {"a": torch.zeros(1)}, 1.5)


def test_merging_a_student_in_place_moves_its_tower_halfway_back(tiny_teacher_path):
    student = build_student("teacher:2", load_sentence_transformer(tiny_teacher_path), asymmetric=True)
    start = snapshot(student)
    with torch.no_grad():
        for parameter in query_modules(student).parameters():
            parameter.add_(1.0)
    merge_with_start(student, start, 0.5)
    name, tensor = next(iter(query_modules(student).state_dict().items()))
    assert torch.allclose(tensor, start[name] + 0.5)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"student": "some/minilm", "asymmetric": False}, 0.5),  # a whole pretrained model, its own index
        ({"student": "some/minilm", "asymmetric": True}, 0.0),
        ({"student": "teacher:2", "asymmetric": False}, 0.0),  # cut from the teacher: far from any retriever
        ({"student": "some/minilm", "student_layers": 2, "asymmetric": False}, 0.0),
        ({"student": "some/minilm", "asymmetric": False, "start_weight": 0.3}, 0.3),  # a number is taken as given
    ],
)
def test_auto_keeps_half_the_start_only_for_a_whole_pretrained_symmetric_student(options, expected):
    config = DistillConfig.from_dict({"teacher": "t", "dataset": "d", "out": "o", **options})
    assert resolved_start_weight(config) == expected


def test_a_run_whose_start_gets_all_the_weight_ends_where_it_started(
    tmp_path, tiny_teacher_path, tiny_student_path, scifact_slice
):
    extra = ["--epochs", "1", "--learning-rate", "1e-3", "--no-asymmetric", "--start-weight", "1"]
    training = _distill(tmp_path, tiny_teacher_path, tiny_student_path, scifact_slice, *extra)["training"]
    validation = training["validation"]
    assert training["start_weight"] == 1.0
    assert max(h[AGREEMENT_METRIC] for h in validation["history"]) > validation["start"][AGREEMENT_METRIC]
    assert validation["merged"][AGREEMENT_METRIC] == pytest.approx(validation["start"][AGREEMENT_METRIC], abs=1e-6)
