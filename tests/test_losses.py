"""Every loss of ``embeddistill.losses`` against values computed by hand with plain ``math``."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from embeddistill.losses import (
    EmbeddingMatchingLoss,
    EmbedDistillLoss,
    LabelLoss,
    LossWeights,
    MarginMSELoss,
    ScoreDistillationLoss,
)

# --- reference arithmetic in plain Python (deliberately not torch) -------------------------------------------


def softmax(values: list[float]) -> list[float]:
    exps = [math.exp(v) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def log_softmax(values: list[float]) -> list[float]:
    log_total = math.log(sum(math.exp(v) for v in values))
    return [v - log_total for v in values]


def cross_entropy_row(teacher: list[float], student: list[float], tau_t: float, tau_s: float) -> float:
    """``- sum_j softmax(t / tau_t)_j * log softmax(s / tau_s)_j`` for one row."""
    p = softmax([t / tau_t for t in teacher])
    log_q = log_softmax([s / tau_s for s in student])
    return -sum(pj * lqj for pj, lqj in zip(p, log_q, strict=True))


def keep(row: list[float], mask: list[bool]) -> list[float]:
    return [value for value, kept in zip(row, mask, strict=True) if kept]


STUDENT = [[1.0, 2.0, 3.0], [0.0, 1.0, 0.0]]
TEACHER = [[3.0, 1.0, 2.0], [1.0, 1.0, 0.0]]


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# --- ScoreDistillationLoss ------------------------------------------------------------------------------------


def test_score_distillation_equal_temperatures():
    loss = ScoreDistillationLoss(teacher_temperature=1.0, student_temperature=1.0)(t(STUDENT), t(TEACHER))
    expected = (cross_entropy_row(TEACHER[0], STUDENT[0], 1, 1) + cross_entropy_row(TEACHER[1], STUDENT[1], 1, 1)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_score_distillation_one_row_by_hand():
    # teacher (0, 0) -> targets (1/2, 1/2); student (0, ln 3) -> q = (1/4, 3/4)
    # loss = -(1/2 ln(1/4) + 1/2 ln(3/4)) = ln 4 - ln(3) / 2
    loss = ScoreDistillationLoss(1.0, 1.0)(t([[0.0, math.log(3.0)]]), t([[0.0, 0.0]]))
    assert loss.item() == pytest.approx(math.log(4) - math.log(3) / 2, rel=1e-6)


def test_score_distillation_separate_temperatures():
    tau_t, tau_s = 2.0, 0.5
    loss = ScoreDistillationLoss(teacher_temperature=tau_t, student_temperature=tau_s)(t(STUDENT), t(TEACHER))
    expected = sum(cross_entropy_row(TEACHER[i], STUDENT[i], tau_t, tau_s) for i in range(2)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # Swapping the temperatures changes the value: each temperature is applied to its own side.
    swapped = ScoreDistillationLoss(teacher_temperature=tau_s, student_temperature=tau_t)(t(STUDENT), t(TEACHER))
    expected_swapped = sum(cross_entropy_row(TEACHER[i], STUDENT[i], tau_s, tau_t) for i in range(2)) / 2
    assert swapped.item() == pytest.approx(expected_swapped, rel=1e-5)
    assert abs(expected - expected_swapped) > 0.1


def test_score_distillation_default_temperature_is_005():
    loss = ScoreDistillationLoss()(t([[0.10, 0.15]]), t([[0.15, 0.10]]))
    # logits (2, 3) for the student and (3, 2) for the teacher
    assert loss.item() == pytest.approx(cross_entropy_row([3.0, 2.0], [2.0, 3.0], 1, 1), rel=1e-5)


def test_score_distillation_candidate_mask_removes_candidates():
    mask = [[True, True, False], [True, False, True]]
    tau_t, tau_s = 0.5, 1.0
    loss = ScoreDistillationLoss(tau_t, tau_s)(t(STUDENT), t(TEACHER), torch.tensor(mask))
    expected = (
        sum(cross_entropy_row(keep(TEACHER[i], mask[i]), keep(STUDENT[i], mask[i]), tau_t, tau_s) for i in range(2)) / 2
    )
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # A masked candidate's score has no influence at all.
    changed = [row[:] for row in STUDENT]
    changed[0][2] = 100.0
    changed_teacher = [row[:] for row in TEACHER]
    changed_teacher[1][1] = -50.0
    again = ScoreDistillationLoss(tau_t, tau_s)(t(changed), t(changed_teacher), torch.tensor(mask))
    assert again.item() == pytest.approx(expected, rel=1e-5)


def test_score_distillation_is_minimised_when_student_equals_teacher():
    # Cross-entropy H(p, q) >= H(p, p): equal distributions give the teacher's entropy.
    teacher = TEACHER[0]
    p = softmax(teacher)
    entropy = -sum(pj * math.log(pj) for pj in p)
    loss = ScoreDistillationLoss(1.0, 1.0)(t([teacher]), t([teacher]))
    assert loss.item() == pytest.approx(entropy, rel=1e-5)
    assert ScoreDistillationLoss(1.0, 1.0)(t([STUDENT[0]]), t([teacher])).item() > entropy


# --- EmbeddingMatchingLoss ------------------------------------------------------------------------------------


def test_embedding_matching_l2_is_not_squared():
    loss = EmbeddingMatchingLoss("l2")(t([[0.0, 0.0]]), t([[3.0, 4.0]]))
    assert loss.item() == pytest.approx(5.0, rel=1e-6)


def test_embedding_matching_l2_is_mean_over_rows():
    # distances 5 and 13 (5-12-13 triangle) -> mean 9
    loss = EmbeddingMatchingLoss("l2")(t([[0.0, 0.0], [1.0, 1.0]]), t([[3.0, 4.0], [6.0, 13.0]]))
    assert loss.item() == pytest.approx(9.0, rel=1e-6)


def test_embedding_matching_default_is_l2():
    assert EmbeddingMatchingLoss()(t([[0.0, 0.0]]), t([[3.0, 4.0]])).item() == pytest.approx(5.0, rel=1e-6)


def test_embedding_matching_squared_l2():
    loss = EmbeddingMatchingLoss("squared_l2")(t([[0.0, 0.0], [1.0, 1.0]]), t([[3.0, 4.0], [1.0, 2.0]]))
    assert loss.item() == pytest.approx((25.0 + 1.0) / 2, rel=1e-6)


def test_embedding_matching_cosine():
    # cos((3,4), (1,0)) = 3/5 -> 0.4 ; cos((1,1), (2,2)) = 1 -> 0 ; cos((1,0), (0,5)) = 0 -> 1
    loss = EmbeddingMatchingLoss("cosine")(
        t([[3.0, 4.0], [1.0, 1.0], [1.0, 0.0]]), t([[1.0, 0.0], [2.0, 2.0], [0.0, 5.0]])
    )
    assert loss.item() == pytest.approx((0.4 + 0.0 + 1.0) / 3, abs=1e-6)


def test_embedding_matching_l2_gradient_is_finite_at_exact_match():
    student = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    loss = EmbeddingMatchingLoss("l2")(student, torch.tensor([[1.0, 2.0], [0.0, 0.0]]))
    assert loss.item() == pytest.approx(2.5, abs=1e-5)
    loss.backward()
    assert torch.isfinite(student.grad).all()
    # d/ds of mean_i ||s_i - t_i|| for row 1 is (s - t) / ||s - t|| / 2 = (0.3, 0.4)
    assert student.grad[1].tolist() == pytest.approx([0.3, 0.4], abs=1e-5)


@pytest.mark.parametrize("distance", ["l1", "L2", "euclidean", ""])
def test_invalid_distance_raises(distance):
    with pytest.raises(ValueError, match="distance"):
        EmbeddingMatchingLoss(distance)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        EmbedDistillLoss(distance=distance)  # type: ignore[arg-type]


# --- LabelLoss ------------------------------------------------------------------------------------------------

LABEL_SCORES = [[1.0, 2.0, 3.0], [2.0, 0.0, 1.0], [5.0, 5.0, 5.0]]


def test_label_loss_ignores_unlabelled_rows():
    tau = 0.5
    loss = LabelLoss(temperature=tau)(t(LABEL_SCORES), torch.tensor([2, -1, 0]))
    row0 = -log_softmax([s / tau for s in LABEL_SCORES[0]])[2]
    row2 = math.log(3.0)  # uniform over 3 candidates
    assert loss.item() == pytest.approx((row0 + row2) / 2, rel=1e-5)


def test_label_loss_with_candidate_mask():
    tau = 1.0
    mask = torch.tensor([[True, False, True], [True, True, True], [True, True, False]])
    loss = LabelLoss(temperature=tau)(t(LABEL_SCORES), torch.tensor([0, 1, 1]), mask)
    row0 = -log_softmax([1.0, 3.0])[0]
    row1 = -log_softmax([2.0, 0.0, 1.0])[1]
    row2 = math.log(2.0)
    assert loss.item() == pytest.approx((row0 + row1 + row2) / 3, rel=1e-5)


def test_label_loss_all_unlabelled_is_zero():
    loss = LabelLoss()(t(LABEL_SCORES), torch.tensor([-1, -1, -1]))
    assert loss.item() == 0.0
    assert loss.dim() == 0


# --- MarginMSELoss --------------------------------------------------------------------------------------------


def test_margin_mse_by_hand():
    student = [[3.0, 1.0, 2.0], [0.0, 1.0, 4.0]]
    teacher = [[2.0, 0.0, 2.0], [1.0, 3.0, 2.0]]
    # row 0, anchor 0: student margins (2, 1), teacher margins (2, 0) -> squared errors 0, 1
    # row 1, anchor 2: student margins (4, 3), teacher margins (1, -1) -> squared errors 9, 16
    loss = MarginMSELoss()(t(student), t(teacher), torch.tensor([0, 2]))
    assert loss.item() == pytest.approx((0 + 1 + 9 + 16) / 4, rel=1e-6)
    mask = torch.tensor([[True, True, True], [True, False, True]])
    masked = MarginMSELoss()(t(student), t(teacher), torch.tensor([0, 2]), mask)
    assert masked.item() == pytest.approx((0 + 1 + 9) / 3, rel=1e-6)


def test_margin_mse_zero_when_margins_match_even_with_offset():
    student = [[5.0, 3.0, 4.0]]
    teacher = [[2.0, 0.0, 1.0]]  # student = teacher + 3: same margins
    assert MarginMSELoss()(t(student), t(teacher), torch.tensor([0])).item() == pytest.approx(0.0, abs=1e-7)


# --- EmbedDistillLoss -----------------------------------------------------------------------------------------

SQ = [[0.0, 0.0], [1.0, 1.0]]  # student queries
TQ = [[3.0, 4.0], [1.0, 2.0]]  # teacher queries: l2 distances 5 and 1 -> 3
SD = [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]  # student documents
TD = [[6.0, 8.0], [0.0, 2.0], [0.0, 5.0]]  # distances 10, 2, 5 -> 17 / 3


def _full_inputs():
    return {
        "student_scores": t(STUDENT),
        "teacher_scores": t(TEACHER),
        "student_queries": t(SQ),
        "teacher_queries": t(TQ),
        "anchor_index": torch.tensor([0, 1]),
        "positive_index": torch.tensor([2, 0]),
        "student_documents": t(SD),
        "teacher_documents": t(TD),
    }


def test_embed_distill_combines_weighted_parts():
    weights = LossWeights(score=2.0, query_em=0.5, document_em=3.0, label=1.5, margin_mse=0.25)
    tau = 1.0
    out = EmbedDistillLoss(weights, teacher_temperature=tau, student_temperature=tau)(**_full_inputs())

    score = sum(cross_entropy_row(TEACHER[i], STUDENT[i], tau, tau) for i in range(2)) / 2
    query_em = (5.0 + 1.0) / 2
    document_em = (10.0 + 2.0 + 5.0) / 3
    label = (-log_softmax(STUDENT[0])[2] - log_softmax(STUDENT[1])[0]) / 2
    # margins: row 0 anchor 0: s (-1, -2) vs t (2, 1) -> 9, 9 ; row 1 anchor 1: s (1, 1) vs t (0, 1) -> 1, 0
    margin = (9 + 9 + 1 + 0) / 4

    assert set(out) == {"loss", "score", "query_em", "document_em", "label", "margin_mse"}
    assert out["score"].item() == pytest.approx(score, rel=1e-5)
    assert out["query_em"].item() == pytest.approx(query_em, rel=1e-5)
    assert out["document_em"].item() == pytest.approx(document_em, rel=1e-5)
    assert out["label"].item() == pytest.approx(label, rel=1e-5)
    assert out["margin_mse"].item() == pytest.approx(margin, rel=1e-5)
    expected_total = 2.0 * score + 0.5 * query_em + 3.0 * document_em + 1.5 * label + 0.25 * margin
    assert out["loss"].item() == pytest.approx(expected_total, rel=1e-5)


def test_embed_distill_zero_weight_parts_absent():
    weights = LossWeights(score=1.0, query_em=0.0, document_em=0.0, label=0.0, margin_mse=0.0)
    out = EmbedDistillLoss(weights, 1.0, 1.0)(**_full_inputs())
    assert set(out) == {"loss", "score"}
    assert out["loss"].item() == pytest.approx(out["score"].item(), rel=1e-6)


def test_embed_distill_default_weights_and_asymmetric_student():
    inputs = _full_inputs()
    del inputs["student_documents"], inputs["teacher_documents"]
    out = EmbedDistillLoss(teacher_temperature=1.0, student_temperature=1.0)(**inputs)
    # Defaults: score 1, query EM 1, document EM 1 (absent without student documents), label 0, margin 0.
    assert set(out) == {"loss", "score", "query_em"}
    score = sum(cross_entropy_row(TEACHER[i], STUDENT[i], 1, 1) for i in range(2)) / 2
    assert out["loss"].item() == pytest.approx(score + 3.0, rel=1e-5)


def test_embed_distill_generated_queries_get_no_label_loss():
    weights = LossWeights(score=0.0, query_em=0.0, document_em=0.0, label=1.0, margin_mse=0.0)
    loss = EmbedDistillLoss(weights, 1.0, 1.0)
    out = loss(**_full_inputs(), generated=torch.tensor([True, False]))
    assert out["label"].item() == pytest.approx(-log_softmax(STUDENT[1])[0], rel=1e-5)
    assert out["loss"].item() == pytest.approx(-log_softmax(STUDENT[1])[0], rel=1e-5)
    all_generated = loss(**_full_inputs(), generated=torch.tensor([True, True]))
    assert all_generated["label"].item() == 0.0
    assert all_generated["loss"].item() == 0.0


def test_embed_distill_label_mask_applies_to_label_loss():
    weights = LossWeights(score=0.0, query_em=0.0, document_em=0.0, label=1.0, margin_mse=0.0)
    mask = torch.tensor([[False, True, True], [True, True, True]])
    out = EmbedDistillLoss(weights, 1.0, 1.0)(**_full_inputs(), label_mask=mask)
    expected = (-log_softmax([2.0, 3.0])[1] - log_softmax(STUDENT[1])[0]) / 2
    assert out["label"].item() == pytest.approx(expected, rel=1e-5)


def test_gradient_reaches_student_inputs_not_teacher_tensors():
    weights = LossWeights(score=1.0, query_em=1.0, document_em=1.0, label=1.0, margin_mse=1.0)
    inputs = {name: value.clone().requires_grad_(value.is_floating_point()) for name, value in _full_inputs().items()}
    out = EmbedDistillLoss(weights, 0.5, 0.5)(**inputs)
    out["loss"].backward()
    for name in ("student_scores", "student_queries", "student_documents"):
        grad = inputs[name].grad
        assert grad is not None, name
        assert torch.isfinite(grad).all(), name
        assert grad.abs().sum() > 0, name
    for name in ("teacher_scores", "teacher_queries", "teacher_documents"):
        assert inputs[name].grad is None, name


@pytest.mark.parametrize(
    "module, args",
    [
        (ScoreDistillationLoss(1.0, 1.0), lambda s, te: (s, te)),
        (EmbeddingMatchingLoss("cosine"), lambda s, te: (s, te)),
        (MarginMSELoss(), lambda s, te: (s, te, torch.tensor([0, 1]))),
    ],
)
def test_each_loss_detaches_teacher(module, args):
    student = t(STUDENT).requires_grad_()
    teacher = t(TEACHER).requires_grad_()
    module(*args(student, teacher)).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_one_name_per_loss_weight():
    """A term's ``part`` is its log key, its LossWeights field and (plus ``_weight``) its config field and flag."""
    from embeddistill.config import LossConfig
    from embeddistill.losses import TERMS

    parts = [term.part for term in TERMS]
    assert [f.name for f in dataclasses.fields(LossWeights)] == parts
    config_weights = [f.name for f in dataclasses.fields(LossConfig) if f.name.endswith("_weight")]
    assert sorted(config_weights) == sorted(f"{part}_weight" for part in parts)
    config = LossConfig(score_weight=2.0, query_em_weight=0.5, document_em_weight=0.0, label_weight=1.0)
    weights = LossWeights.from_config(config)
    assert (weights.score, weights.query_em, weights.document_em, weights.label) == (2.0, 0.5, 0.0, 1.0)
    assert LossWeights() == LossWeights.from_config(LossConfig())
    out = EmbedDistillLoss(weights, 1.0, 1.0)(**_full_inputs())
    assert set(out) == {"loss", *(p for p in parts if getattr(weights, p))}
