"""Label-free validation (teacher agreement on held-out training queries), the orthogonal projection and
``--learning-rate auto``: hand-computed values, and checks that training really learns."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from embeddistill.cli import main
from embeddistill.config import DistillConfig
from embeddistill.evaluation.agreement import AGREEMENT_METRIC, TeacherAgreement, agreement_ndcg, teacher_judgements
from embeddistill.models.students import build_student, fit_orthogonal_projection, make_projection, projection_of
from embeddistill.models.teachers import load_sentence_transformer
from embeddistill.training.distillation import parameter_groups


def test_teacher_judgements_are_the_top_k_columns_best_first():
    scores = np.array([[0.1, 0.9, 0.5, 0.7], [0.8, 0.2, 0.3, 0.1]])
    assert teacher_judgements(scores, 2).tolist() == [[1, 3], [0, 2]]


def test_agreement_is_one_when_the_student_ranks_as_the_teacher_does():
    teacher = np.array([[0.9, 0.5, 0.1, 0.7]])
    judged = teacher_judgements(teacher, 2)
    assert agreement_ndcg(teacher * 3 + 1, judged) == pytest.approx([1.0])  # any monotone map: same ranking


def test_agreement_by_hand_when_the_student_swaps_the_teachers_top_two():
    # Teacher top 2: document 0 (gain 2), document 3 (gain 1). The student ranks 3 first, then 0.
    judged = teacher_judgements(np.array([[0.9, 0.5, 0.1, 0.7]]), 2)
    student = np.array([[0.7, 0.1, 0.2, 0.9]])
    dcg = 1 / np.log2(2) + 2 / np.log2(3)
    ideal = 2 / np.log2(2) + 1 / np.log2(3)
    assert agreement_ndcg(student, judged) == pytest.approx([dcg / ideal])


def test_agreement_is_zero_when_the_student_finds_none_of_the_teachers_top():
    judged = teacher_judgements(np.array([[0.9, 0.8, 0.1, 0.0]]), 2)
    assert agreement_ndcg(np.array([[0.0, 0.1, 0.9, 0.8]]), judged) == pytest.approx([0.0])


def test_the_symmetric_pool_holds_the_teachers_top_and_random_documents_from_the_rest():
    rng = np.random.default_rng(0)
    documents = rng.normal(size=(500, 8)).astype(np.float32)
    queries = rng.normal(size=(3, 8)).astype(np.float32)
    check = TeacherAgreement(
        ["a", "b", "c"], queries, documents, [str(i) for i in range(500)], pool_depth=5, distractors=40
    )
    top = set(teacher_judgements(queries @ documents.T, 10).ravel())
    assert top <= set(check.pool.tolist()) and len(check.pool) == len(top) + 40
    # Judgements point at the same documents inside the pool.
    assert (check.pool[check.pool_judged] == check.judged).all()


def test_orthogonal_projection_keeps_every_cosine_of_the_student():
    rng = np.random.default_rng(0)
    student, teacher = rng.normal(size=(200, 8)), rng.normal(size=(200, 20))
    projection = make_projection(8, 20)
    fit_orthogonal_projection(projection, student, teacher)
    weight = projection.linear.weight.detach().double().numpy()  # [20, 8]
    assert np.allclose(weight.T @ weight, np.eye(8), atol=1e-6)
    x = torch.from_numpy(student[:5]).float()
    mapped = projection({"sentence_embedding": x})["sentence_embedding"]
    cos = torch.nn.functional.cosine_similarity
    assert torch.allclose(cos(mapped[:1], mapped[1:]), cos(x[:1], x[1:]), atol=1e-5)


def test_orthogonal_projection_recovers_a_hidden_rotation():
    rng = np.random.default_rng(1)
    rotation, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    embed = rotation[:, :6]  # [12, 6] orthonormal columns
    student = rng.normal(size=(300, 6))
    projection = make_projection(6, 12)
    fit_orthogonal_projection(projection, student, student @ embed.T)
    assert np.allclose(projection.linear.weight.detach().numpy(), embed, atol=1e-5)


def test_the_projection_trains_at_its_own_learning_rate(tiny_teacher_path, tiny_student_path):
    teacher = load_sentence_transformer(tiny_teacher_path)
    student = build_student(tiny_student_path, teacher, asymmetric=True)
    config = DistillConfig.from_dict({"learning_rate": 1e-4, "projection_learning_rate": 1e-3}).training
    trainable = [p for p in student.parameters() if p.requires_grad]
    groups = {g["name"]: g for g in parameter_groups(student, trainable, config)}
    head = list(projection_of(student).parameters())
    assert groups["projection"]["lr"] == 1e-3 and [id(p) for p in groups["projection"]["params"]] == [id(head[0])]
    assert groups["encoder"]["lr"] == 1e-4 and id(head[0]) not in {id(p) for p in groups["encoder"]["params"]}


def test_an_unresolved_auto_learning_rate_never_reaches_the_optimiser(tiny_teacher_path):
    teacher = load_sentence_transformer(tiny_teacher_path)
    student = build_student("teacher:1", teacher, asymmetric=True)
    with pytest.raises(ValueError, match="learning_rate 'auto'"):
        parameter_groups(student, list(student.parameters()), DistillConfig().training)


def test_learning_rate_takes_a_number_or_auto_and_names_both_when_wrong():
    assert DistillConfig.from_dict({"learning_rate": "auto"}).training.learning_rate == "auto"
    assert DistillConfig.from_dict({"learning_rate": "2e-5"}).training.learning_rate == 2e-5
    with pytest.raises(ValueError, match="expects float or 'auto'"):
        DistillConfig.from_dict({"learning_rate": "fast"})


def test_agreement_of_an_asymmetric_student_ranks_the_teachers_corpus(tiny_teacher_path):
    teacher = load_sentence_transformer(tiny_teacher_path)
    texts = ["alpha beta", "gamma delta", "epsilon zeta", "eta theta", "iota kappa"]
    documents = teacher.encode(texts, convert_to_numpy=True)
    check = TeacherAgreement(texts[:2], documents[:2], documents, texts, k=3)
    student = build_student("teacher:4", teacher, asymmetric=True)  # every layer: the teacher itself
    scores = check.score(student)
    assert scores[AGREEMENT_METRIC] == pytest.approx(1.0) and scores["query_cosine"] == pytest.approx(1.0, abs=1e-5)


def test_agreement_is_also_reported_for_each_kind_of_held_out_query(tiny_teacher_path):
    teacher = load_sentence_transformer(tiny_teacher_path)
    texts = ["alpha beta", "gamma delta", "epsilon zeta", "eta theta", "iota kappa"]
    documents = teacher.encode(texts, convert_to_numpy=True)
    wrong = documents[[1, 0, 2]]  # the teacher's query embeddings of the first two are swapped: 0 for those
    generated = np.array([False, False, True])
    check = TeacherAgreement(
        texts[:3], wrong, documents, texts, k=1, groups={"real": ~generated, "generated": generated}
    )
    scores = check.score(build_student("teacher:4", teacher, asymmetric=True))
    assert scores["agreement_nDCG@10_real"] == pytest.approx(0.0)
    assert scores["agreement_nDCG@10_generated"] == pytest.approx(1.0)
    assert scores[AGREEMENT_METRIC] == pytest.approx(1 / 3)
    only_real = TeacherAgreement(texts[:3], wrong, documents, texts, k=1, groups={"real": np.ones(3, dtype=bool)})
    assert set(only_real.score(build_student("teacher:4", teacher, asymmetric=True))) == {
        AGREEMENT_METRIC,
        "query_cosine",
    }


RUN = [
    "--batch-size", "16", "--crops-per-document", "1", "--perturbations-per-query", "1", "--latency-repeats", "1",
    "--checkpoint-every", "0", "--threads", "2", "--validation-queries", "30", "--hard-negatives", "4",
    "--max-generated", "200",
]  # fmt: skip


def _distill(tmp_path, tiny_teacher_path, student_path, scifact_slice, *extra: str) -> dict:
    """A short run of a student that starts far from the teacher (another random model, through a projection):
    asymmetric unless ``extra`` says ``--no-asymmetric``."""
    out = tmp_path / "run"
    argv = ["distill", "--teacher", tiny_teacher_path, "--student", student_path, "--dataset", str(scifact_slice)]
    argv.append("--asymmetric")
    assert main([*argv, "--out", str(out), "--cache-dir", str(tmp_path / "cache"), *RUN, *extra]) == 0
    return json.loads((out / "metrics.json").read_text())


def test_training_raises_teacher_agreement_above_its_start(
    tmp_path, tiny_teacher_path, tiny_student_path, scifact_slice
):
    metrics = _distill(
        tmp_path, tiny_teacher_path, tiny_student_path, scifact_slice, "--epochs", "3", "--learning-rate", "1e-3"
    )
    validation = metrics["training"]["validation"]
    assert 0 < validation["queries"] <= 30  # at most a tenth of the training queries
    assert validation["best"][AGREEMENT_METRIC] > validation["start"][AGREEMENT_METRIC] + 0.02
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "validation" in r][0] == 0  # the start is checked, and logged


def test_a_vanishing_learning_rate_is_caught_by_the_agreement_check(
    tmp_path, tiny_teacher_path, tiny_student_path, scifact_slice
):
    # A learning rate of 0 is refused before anything loads (test_misuse); one too small to move is caught here.
    zero = ["--epochs", "1", "--learning-rate", "1e-12", "--projection-learning-rate", "1e-12"]
    validation = _distill(tmp_path, tiny_teacher_path, tiny_student_path, scifact_slice, *zero)["training"][
        "validation"
    ]
    # Nothing moved: every check equals the start, so the best is the start and the run keeps it.
    start = round(validation["start"][AGREEMENT_METRIC], 6)
    assert {round(h[AGREEMENT_METRIC], 6) for h in validation["history"]} == {start}
    assert validation["kept_step"] == 0


def test_auto_learning_rate_tries_each_candidate_and_keeps_the_best(
    tmp_path, tiny_teacher_path, tiny_student_path, scifact_slice
):
    # The projection follows the encoder's rate, so that the vanishing candidate trains (next to) nothing.
    extra = ["--epochs", "1", "--learning-rate-candidates", "2e-3", "1e-12", "--tune-steps", "8"]
    extra += ["--projection-learning-rate", "1e-12"]
    training = _distill(tmp_path, tiny_teacher_path, tiny_student_path, scifact_slice, *extra)["training"]
    search = training["learning_rate_search"]
    assert [t["learning_rate"] for t in search["trials"]] == [2e-3, 1e-12]
    assert all(t["steps"] == 8 for t in search["trials"])
    best = max(search["trials"], key=lambda t: t[AGREEMENT_METRIC])
    assert search["chosen"] == best["learning_rate"] == training["learning_rates"]["encoder"]
    # The vanishing-rate trial is the untrained start: the full run's first check sees the same agreement.
    zero = search["trials"][1][AGREEMENT_METRIC]
    assert zero == pytest.approx(training["validation"]["history"][0][AGREEMENT_METRIC], abs=1e-6)
    # --resume keeps the choice made: the short runs are not repeated (their folders stay gone).
    for folder in (tmp_path / "run" / "tune").glob("lr-*"):
        shutil.rmtree(folder)
    resumed = _distill(tmp_path, tiny_teacher_path, tiny_student_path, scifact_slice, *extra, "--resume")
    assert resumed["training"]["learning_rate_search"] == search
    assert not list((tmp_path / "run" / "tune").glob("lr-*"))
