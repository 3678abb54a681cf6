"""``train-teacher --architecture standard``: a classification-head CE from the same base and data as the
dual-pooling one (the like-for-like comparison of the paper's claim on cross-encoder teachers)."""

from __future__ import annotations

import json

import pytest
import torch
from sentence_transformers import CrossEncoder

from embeddistill.cli import main
from embeddistill.config import TeacherTrainingConfig
from embeddistill.models.classification_cross_encoder import TRAINING_RECORD, ClassificationCrossEncoder
from embeddistill.models.cross_encoders import CrossEncoderTeacher, load_cross_encoder
from embeddistill.training.teacher_finetuning import CrossEncoderTrainer, TeacherExample

EXAMPLES = [
    TeacherExample("does vitamin d prevent fractures", ["vitamin d supplements lower fracture risk"], [
        "sodium intake raises blood pressure", "statins lower cholesterol", "exercise improves sleep quality",
    ]),
    TeacherExample("what raises blood pressure", ["sodium intake raises blood pressure"], [
        "vitamin d supplements lower fracture risk", "fish oil is rich in omega 3", "statins lower cholesterol",
    ]),
]  # fmt: skip


def _margin(model: ClassificationCrossEncoder) -> float:
    """Mean over the examples of the positive's score minus the mean negative's."""
    margins = []
    for example in EXAMPLES:
        documents = example.positives + example.negatives
        scores = model.predict([example.query] * len(documents), documents).scores
        margins.append(float(scores[0] - scores[1:].mean()))
    return sum(margins) / len(margins)


def test_the_standard_ce_loss_is_softmax_cross_entropy_over_its_raw_logits(tiny_teacher_path, tmp_path):
    config = TeacherTrainingConfig(
        base=tiny_teacher_path, out=str(tmp_path / "ce"), architecture="standard", group_size=4, batch_size=2,
        temperature=0.05, max_length=64, device="cpu", seed=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = ClassificationCrossEncoder.from_encoder(tiny_teacher_path, max_length=64).eval()  # eval: no dropout
    trainer = CrossEncoderTrainer(model, EXAMPLES, config)
    queries, documents, group = trainer.batch(0)
    with torch.no_grad():
        logits = model(model.tokenize(queries, documents, "cpu"))[0].view(-1, group)
    # The temperature is the dual-pooling CE's (cosines); a classification head's logits are used as they are.
    expected = torch.nn.functional.cross_entropy(logits, torch.zeros(2, dtype=torch.long))
    assert trainer.step(0)["label"] == pytest.approx(float(expected), rel=1e-4)


def test_train_teacher_standard_writes_a_ce_that_every_loader_reads_and_that_learned(tiny_teacher_path, tmp_path):
    config = TeacherTrainingConfig(
        base=tiny_teacher_path, out=str(tmp_path / "direct"), architecture="standard", group_size=4, batch_size=2,
        epochs=16, learning_rate=1e-2, warmup_ratio=0.0, max_length=64, device="cpu", seed=0, checkpoint_every=0,
    )  # fmt: skip
    torch.manual_seed(0)
    start = ClassificationCrossEncoder.from_encoder(tiny_teacher_path, max_length=64)
    before = _margin(start)
    trainer = CrossEncoderTrainer(start, EXAMPLES, config)
    trainer.train()
    assert _margin(start) > before + 0.5  # the positives now outscore their negatives by more

    out = tmp_path / "ce"
    start.save(out, {"base_model": tiny_teacher_path})
    loaded = load_cross_encoder(str(out), max_length=64)
    assert isinstance(loaded, CrossEncoderTeacher)  # a plain sequence-classification CE, head included
    pairs = (["does vitamin d prevent fractures"] * 2, EXAMPLES[0].positives + EXAMPLES[0].negatives[:1])
    ours = start.predict(*pairs).scores
    assert loaded.predict(*pairs).scores == pytest.approx(ours, abs=1e-5)
    via_sentence_transformers = CrossEncoder(str(out)).predict(
        list(zip(*pairs, strict=True)), activation_fn=torch.nn.Identity()
    )
    assert via_sentence_transformers == pytest.approx(ours, abs=1e-5)
    assert json.loads((out / TRAINING_RECORD).read_text())["base_model"] == tiny_teacher_path


def test_the_train_teacher_command_takes_the_architecture(tiny_teacher_path, scifact_slice, tmp_path):
    out = tmp_path / "ce"
    argv = ["train-teacher", "--base", tiny_teacher_path, "--dataset", str(scifact_slice), "--out", str(out)]
    fast = ["--architecture", "standard", "--epochs", "1", "--batch-size", "8", "--group-size", "4",
            "--max-length", "64", "--device", "cpu"]  # fmt: skip
    assert main([*argv, *fast]) == 0
    record = json.loads((out / TRAINING_RECORD).read_text())
    assert record["training"]["architecture"] == "standard" and record["training"]["steps"] >= 1
    assert isinstance(load_cross_encoder(str(out)), CrossEncoderTeacher)
