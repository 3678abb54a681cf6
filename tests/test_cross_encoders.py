"""Cross-encoder teachers: dual pooling by hand, save/load, the score cache, reranking, and the CLI end to end."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer

from embeddistill.cli import main
from embeddistill.config import TeacherTrainingConfig
from embeddistill.data import read_trec_run
from embeddistill.evaluation.reranking import rerank
from embeddistill.models.cross_encoders import (
    DUAL_POOLING_CONFIG,
    CrossEncoderScoreCache,
    CrossEncoderTeacher,
    DualPoolingCrossEncoder,
    PairScores,
    load_cross_encoder,
)
from embeddistill.models.pooling import segment_masks
from embeddistill.training.teacher_finetuning import CrossEncoderTrainer, TeacherExample

QUERIES = ["what lowers blood pressure", "vitamin d"]
DOCUMENTS = ["beta blockers reduce blood pressure in adults", "sunlight makes vitamin d in the skin of most people"]


@pytest.fixture(scope="module")
def dual_pooling(tiny_teacher_path) -> DualPoolingCrossEncoder:
    torch.manual_seed(0)
    return DualPoolingCrossEncoder.from_encoder(tiny_teacher_path, max_length=64).eval()


@pytest.fixture(scope="module")
def standard_ce_path(tmp_path_factory, tiny_teacher_path) -> str:
    """A tiny random BERT sequence-classification model (one logit), as a sentence-transformers CrossEncoder saves."""
    folder = tmp_path_factory.mktemp("standard-ce")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_teacher_path)
    config = transformers.BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=1,
    )
    torch.manual_seed(3)
    transformers.BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_segment_masks_bert_and_roberta_layouts():
    # [CLS] q q [SEP] d d d [SEP] [PAD] [PAD]
    attention = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1, 0, 0]])
    special = torch.tensor([[1, 0, 0, 1, 0, 0, 0, 1, 1, 1]])
    query, document = segment_masks(attention, special)
    assert query.long().tolist() == [[0, 1, 1, 0, 0, 0, 0, 0, 0, 0]]
    assert document.long().tolist() == [[0, 0, 0, 0, 1, 1, 1, 0, 0, 0]]
    # RoBERTa: <s> q </s> </s> d d </s>
    query, document = segment_masks(torch.ones(1, 7, dtype=torch.long), torch.tensor([[1, 0, 1, 1, 0, 0, 1]]))
    assert query.long().tolist() == [[0, 1, 0, 0, 0, 0, 0]]
    assert document.long().tolist() == [[0, 0, 0, 0, 1, 1, 0]]


def test_dual_pooling_score_by_hand(dual_pooling):
    tokenizer = dual_pooling.tokenizer
    with torch.no_grad():
        features = dual_pooling.tokenize(QUERIES, DOCUMENTS, "cpu")  # two pairs of different lengths: padding
        scores, query, document = dual_pooling(features)
        for i, (q, d) in enumerate(zip(QUERIES, DOCUMENTS, strict=True)):
            q_ids = tokenizer(q, add_special_tokens=False)["input_ids"]
            d_ids = tokenizer(d, add_special_tokens=False)["input_ids"]
            ids = [tokenizer.cls_token_id, *q_ids, tokenizer.sep_token_id, *d_ids, tokenizer.sep_token_id]
            types = [0] * (len(q_ids) + 2) + [1] * (len(d_ids) + 1)
            states = dual_pooling.encoder(
                input_ids=torch.tensor([ids]),
                token_type_ids=torch.tensor([types]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            ).last_hidden_state[0]
            expected_q = states[1 : 1 + len(q_ids)].mean(0)
            expected_d = states[2 + len(q_ids) : 2 + len(q_ids) + len(d_ids)].mean(0)
            expected_q, expected_d = expected_q / expected_q.norm(), expected_d / expected_d.norm()
            torch.testing.assert_close(query[i], expected_q, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(document[i], expected_d, atol=1e-5, rtol=1e-4)
            assert scores[i].item() == pytest.approx(float(expected_q @ expected_d), abs=1e-5)
    predicted = dual_pooling.predict(QUERIES, DOCUMENTS, batch_size=1)
    np.testing.assert_allclose(predicted.scores, scores.numpy(), atol=1e-5)
    np.testing.assert_allclose(predicted.query_embeddings, query.numpy(), atol=1e-5)


def test_save_load_round_trip_without_pickle(dual_pooling, tmp_path):
    folder = dual_pooling.save(tmp_path / "ce")
    names = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "config.json", DUAL_POOLING_CONFIG, "tokenizer.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pkl", ".pth"))]
    loaded = load_cross_encoder(str(folder))
    assert isinstance(loaded, DualPoolingCrossEncoder)
    assert loaded.config.max_length == 64 and loaded.config.normalize
    np.testing.assert_allclose(
        loaded.predict(QUERIES, DOCUMENTS).scores, dual_pooling.predict(QUERIES, DOCUMENTS).scores, atol=1e-6
    )
    assert loaded.identity()["weights"] == dual_pooling.identity()["weights"]
    (folder / DUAL_POOLING_CONFIG).unlink()
    with pytest.raises(FileNotFoundError, match=DUAL_POOLING_CONFIG):
        DualPoolingCrossEncoder.load(folder)


def test_standard_cross_encoder_scores_are_the_logits(standard_ce_path):
    teacher = load_cross_encoder(standard_ce_path, max_length=64)
    assert isinstance(teacher, CrossEncoderTeacher) and not teacher.has_embeddings
    features = teacher.tokenizer(QUERIES, DOCUMENTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = teacher.model(**features).logits[:, 0].numpy()
    np.testing.assert_allclose(teacher.predict(QUERIES, DOCUMENTS).scores, logits, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_cross_encoder("./no/such/cross-encoder")


def test_an_encoder_without_a_classification_head_is_no_standard_cross_encoder(
    tiny_teacher_path, dual_pooling, tmp_path
):
    # transformers would load both with a random classifier (a warning only): train-teacher --distill-from and
    # distill --cross-encoder would then learn from noise.
    with pytest.raises(ValueError, match="no trained classification head"):
        CrossEncoderTeacher.load(tiny_teacher_path)
    folder = dual_pooling.save(tmp_path / "dual-pooling")
    with pytest.raises(ValueError, match="no trained classification head"):
        CrossEncoderTeacher.load(str(folder))
    assert isinstance(load_cross_encoder(str(folder)), DualPoolingCrossEncoder)  # its own loader still takes it


class _Counting:
    """Wraps a scorer and counts the pairs it is asked to score."""

    def __init__(self, model):
        self.model, self.pairs = model, 0
        self.name, self.has_embeddings, self.dimension = model.name, model.has_embeddings, model.dimension

    def identity(self):
        return self.model.identity()

    def predict(self, queries, documents, batch_size=64, show_progress=False):
        self.pairs += len(queries)
        return self.model.predict(queries, documents, batch_size)


def test_score_cache_round_trip_and_corruption(dual_pooling, tmp_path, caplog):
    queries, documents = QUERIES * 3, DOCUMENTS + DOCUMENTS[::-1] + DOCUMENTS  # repeated pairs are scored once
    counting = _Counting(dual_pooling)
    cache = CrossEncoderScoreCache(tmp_path, "tiny", dual_pooling.identity(), shard_size=2)
    first = cache.get(counting, queries, documents)
    assert counting.pairs == 4
    direct = dual_pooling.predict(queries, documents)
    np.testing.assert_allclose(first.scores, direct.scores, atol=1e-6)
    np.testing.assert_allclose(first.document_embeddings, direct.document_embeddings, atol=2e-3)  # stored in fp16

    again = CrossEncoderScoreCache(tmp_path, "tiny", dual_pooling.identity())
    second = again.get(counting, queries, documents)
    assert counting.pairs == 4  # all from disk
    np.testing.assert_array_equal(second.scores, first.scores)
    np.testing.assert_array_equal(second.query_embeddings, first.query_embeddings)

    shard = sorted((cache.dir / "shards").glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-3] + b"xyz")
    with caplog.at_level("WARNING"):
        third = CrossEncoderScoreCache(tmp_path, "tiny", dual_pooling.identity()).get(counting, queries, documents)
    assert "corrupt" in caplog.text and counting.pairs == 6  # the two pairs of the bad shard, rescored
    np.testing.assert_allclose(third.scores, first.scores, atol=1e-6)

    other = CrossEncoderScoreCache(tmp_path, "tiny", {**dual_pooling.identity(), "max_length": 32})
    assert other.dir != cache.dir and len(other) == 0  # another setting never reuses these scores
    manifest = json.loads((cache.dir / "manifest.json").read_text())
    manifest["cross_encoder"]["weights"] = "0" * 32
    (cache.dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="identity does not match"):
        CrossEncoderScoreCache(tmp_path, "tiny", dual_pooling.identity())


class _ByLength:
    """A stub CE: the score is the document's length (longer = more relevant)."""

    name, has_embeddings, dimension = "by-length", False, 0

    def predict(self, queries, documents, batch_size=64, show_progress=False):
        return PairScores(np.array([len(d) for d in documents], dtype=np.float32))


def test_rerank_reorders_and_cuts_at_depth():
    corpus = {"a": "x", "b": "xxx", "c": "xx", "d": "xxxxxxxx"}
    run = {"q1": {"a": 0.9, "b": 0.8, "c": 0.7, "d": 0.1}, "q2": {"c": 0.5, "a": 0.4}}
    reranked = rerank(_ByLength(), run, {"q1": "one", "q2": "two"}, corpus, depth=3)
    assert list(sorted(reranked["q1"], key=lambda d: -reranked["q1"][d])) == ["b", "c", "a"]  # d was below depth 3
    assert sorted(reranked["q2"], key=lambda d: -reranked["q2"][d]) == ["c", "a"]


FAST_TEACHER = [
    "--epochs",
    "1",
    "--batch-size",
    "8",
    "--group-size",
    "4",
    "--hard-negative-depth",
    "10",
    "--max-length",
    "64",
    "--device",
    "cpu",
    "--checkpoint-every",
    "3",
]
FAST_DISTILL = [
    "--epochs",
    "1",
    "--batch-size",
    "16",
    "--crops-per-document",
    "1",
    "--perturbations-per-query",
    "0",
    "--hard-negative-depth",
    "6",
    "--hard-negatives",
    "3",
    "--ce-random-negatives",
    "2",
    "--checkpoint-every",
    "0",
    "--threads",
    "2",
    "--device",
    "cpu",
    "--cross-encoder-max-length",
    "64",
    "--max-generated",
    "40",
    "--rerank-depth",
    "20",
]


def ce_distill_arguments(cross_encoder, first_stage, dataset, out, cache, *extra: str) -> list[str]:
    """``embeddistill distill --cross-encoder`` on the slice with a ``teacher:2`` student, fast settings last."""
    return [
        "distill", "--cross-encoder", cross_encoder, "--first-stage", first_stage, "--student", "teacher:2",
        "--dataset", str(dataset), "--out", str(out), "--cache-dir", str(cache), *extra, *FAST_DISTILL,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def trained_teacher(tmp_path_factory, tiny_teacher_path, scifact_slice):
    folder = tmp_path_factory.mktemp("train-teacher")
    cache = folder / "cache"
    argv = [
        "train-teacher",
        "--base",
        tiny_teacher_path,
        "--dataset",
        str(scifact_slice),
        "--negatives-from",
        tiny_teacher_path,
        "--cache-dir",
        str(cache),
        "--out",
        str(folder / "ce"),
        *FAST_TEACHER,
    ]
    assert main(argv) == 0
    return folder


def test_train_teacher_writes_a_loadable_dual_pooling_ce(trained_teacher, tiny_teacher_path):
    ce = load_cross_encoder(str(trained_teacher / "ce"))
    assert isinstance(ce, DualPoolingCrossEncoder)
    assert ce.config.training["steps"] >= 1 and ce.config.base_model == tiny_teacher_path
    base = DualPoolingCrossEncoder.from_encoder(tiny_teacher_path, max_length=64)
    assert ce.identity()["weights"] != base.identity()["weights"]  # it was trained
    log = [json.loads(line) for line in (trained_teacher / "ce.train_log.jsonl").read_text().splitlines()]
    assert log and all(np.isfinite(r["loss"]) for r in log)


@pytest.mark.slow
def test_distill_from_cross_encoder_and_rerank_cli(trained_teacher, tiny_teacher_path, scifact_slice, tmp_path):
    out, cache = tmp_path / "run", trained_teacher / "cache"
    argv = ce_distill_arguments(str(trained_teacher / "ce"), tiny_teacher_path, scifact_slice, out, cache)
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for system in ("first_stage", "cross_encoder", "student"):
        assert 0.0 <= metrics[system]["nDCG@10"] <= 1.0
    assert metrics["student"]["asymmetric"] is False
    assert metrics["candidates_per_query"] == 1 + 6 + 2
    assert 0.0 < metrics["pairing"]["query_vs_own_mean_cosine"] <= 1.0 + 1e-6
    ratio = metrics["student"]["nDCG@10"] / metrics["cross_encoder"]["nDCG@10"]
    assert metrics["retention_vs_cross_encoder"]["nDCG@10"] == pytest.approx(ratio)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert {"score", "query_em", "document_em"} <= set(log[-1])
    # A CE run writes what a dual-encoder run writes: CPU latency in metrics.json, report.md and a model card.
    for system in ("first_stage", "student"):
        assert set(metrics[system]["latency"]) == {f"batch{b}_{s}ms" for b in (1, 32) for s in ("", "p10_", "p90_")}
        assert all(value > 0 for value in metrics[system]["latency"].values())
        assert metrics[system]["query_encoder_parameters"] > 0
    assert set(metrics["speedup"]) == {"batch1", "batch32"}
    assert {"embeddistill", "torch", "threads"} <= set(metrics["environment"])
    report = (out / "report.md").read_text()
    assert "| cross-encoder reranker (top 20) |" in report and "| student / cross-encoder |" in report
    assert "| first stage |" in report and "CPU ms batch1" in report
    card = (out / "student" / "README.md").read_text()
    assert card.startswith("---\n") and "symmetric" in card and "query embedding matching: weight" in card
    assert "| nDCG@10 |" in card and "first stage ms" in card
    reranked = read_trec_run(out / "cross_encoder.trec")
    first = read_trec_run(out / "first_stage.trec")
    query_id = next(iter(reranked))
    top = sorted(first[query_id], key=lambda d: -first[query_id][d])[:20]
    assert set(reranked[query_id]) == set(top)  # the first stage's top 20, rescored
    assert [reranked[query_id][d] for d in top] != [first[query_id][d] for d in top]

    student = out / "student"
    assert (student / "modules.json").exists()
    evaluated = tmp_path / "eval"
    argv = [
        "evaluate",
        str(student),
        "--dataset",
        str(scifact_slice),
        "--out",
        str(evaluated),
        "--reranker",
        str(trained_teacher / "ce"),
        "--rerank-depth",
        "20",
        "--cache-dir",
        str(cache),
    ]
    assert main(argv) == 0
    summary = json.loads((evaluated / "metrics.json").read_text())
    assert summary["reranker"]["depth"] == 20 and 0.0 <= summary["reranker"]["metrics"]["nDCG@10"] <= 1.0
    assert all(len(hits) <= 20 for hits in read_trec_run(evaluated / "reranker.trec").values())


@pytest.mark.slow
def test_distill_from_a_standard_cross_encoder_turns_embedding_matching_off(
    standard_ce_path, tiny_teacher_path, scifact_slice, tmp_path
):
    out = tmp_path / "run"
    argv = ce_distill_arguments(
        standard_ce_path, tiny_teacher_path, scifact_slice, out, tmp_path / "cache", "--margin-mse-weight", "1"
    )
    assert main(argv) == 0
    assert "embedding matching is off" in (out / "distill.log").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["training"]["loss_weights"]["query_embedding"] == 0.0
    assert metrics["training"]["temperatures"] == [1.0, 0.05]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert {"score", "margin_mse"} <= set(log[-1]) and "query_em" not in log[-1]


# -- train-teacher --distill-from: the standard CE's scores are really part of the loss --------------------------------


def test_dual_pooling_trainer_loss_is_label_plus_weighted_score_distillation(
    tiny_teacher_path, standard_ce_path, tmp_path
):
    tau, label_weight, distill_weight, group = 0.05, 0.5, 2.0, 3
    examples = [
        TeacherExample(QUERIES[0], [DOCUMENTS[0]], [DOCUMENTS[1], "sodium intake raises blood pressure"]),
        TeacherExample(QUERIES[1], [DOCUMENTS[1]], [DOCUMENTS[0], "fish oil is rich in vitamin d and omega 3"]),
    ]
    config = TeacherTrainingConfig(
        base=tiny_teacher_path,
        out=str(tmp_path / "ce"),
        group_size=group,
        batch_size=2,
        temperature=tau,
        max_length=64,
        label_weight=label_weight,
        distill_weight=distill_weight,
        device="cpu",
        seed=0,
    )
    teacher = load_cross_encoder(standard_ce_path, max_length=64)
    torch.manual_seed(0)
    model = DualPoolingCrossEncoder.from_encoder(tiny_teacher_path, max_length=64).eval()  # eval: no dropout
    trainer = CrossEncoderTrainer(model, examples, config, teacher)
    queries, documents, size = trainer.batch(0)
    assert size == group and len(queries) == len(documents) == 2 * group
    with torch.no_grad():
        student = model(model.tokenize(queries, documents, "cpu"))[0].view(-1, group)
        pairs = teacher.tokenizer(queries, documents, padding=True, return_tensors="pt")
        logits = teacher.model(**pairs).logits[:, 0].view(-1, group)  # the teacher by hand, in batch order
    assert logits.std() > 0  # a random CE still ranks the candidates differently
    label = torch.nn.functional.cross_entropy(student / tau, torch.zeros(2, dtype=torch.long))
    distill = -(logits.softmax(-1) * (student / tau).log_softmax(-1)).sum(-1).mean()  # teacher at temperature 1

    parts = trainer.step(0)
    assert parts["label"] == pytest.approx(float(label), rel=1e-4)
    assert parts["distill"] == pytest.approx(float(distill), rel=1e-4)
    assert parts["distill"] > 0
    assert parts["loss"] == pytest.approx(label_weight * float(label) + distill_weight * float(distill), rel=1e-4)

    # The weighted term drives the gradient: the same step without it moves the weights elsewhere.
    torch.manual_seed(0)
    twin = DualPoolingCrossEncoder.from_encoder(tiny_teacher_path, max_length=64).eval()
    without = dataclasses.replace(config, distill_weight=0.0)
    CrossEncoderTrainer(twin, examples, without, teacher).step(0)
    moved = [
        not torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters(), strict=True) if a.requires_grad
    ]
    assert any(moved)


def _train_teacher_with(tmp_path, tiny_teacher_path, scifact_slice, cache, *extra: str) -> Path:
    out = tmp_path / "ce"
    argv = [
        "train-teacher",
        "--base",
        tiny_teacher_path,
        "--dataset",
        str(scifact_slice),
        "--negatives-from",
        tiny_teacher_path,
        "--cache-dir",
        str(cache),
        "--out",
        str(out),
        *FAST_TEACHER,
        *extra,
    ]
    assert main(argv) == 0
    return out


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.slow
def test_train_teacher_distills_a_standard_cross_encoder(
    trained_teacher, standard_ce_path, tiny_teacher_path, scifact_slice, tmp_path
):
    cache = trained_teacher / "cache"
    distilled = _train_teacher_with(
        tmp_path / "w1",
        tiny_teacher_path,
        scifact_slice,
        cache,
        "--distill-from",
        standard_ce_path,
        "--distill-weight",
        "1",
    )
    log = [json.loads(line) for line in (distilled.parent / "ce.train_log.jsonl").read_text().splitlines()]
    assert log and all({"loss", "label", "distill"} <= set(r) for r in log)
    assert all(np.isfinite(r["distill"]) and r["distill"] > 0 for r in log)
    for r in log:  # label weight 1, distill weight 1
        assert r["loss"] == pytest.approx(r["label"] + r["distill"], rel=1e-5)
    ce = load_cross_encoder(str(distilled))
    assert isinstance(ce, DualPoolingCrossEncoder)
    assert ce.config.training["distill_from"] == standard_ce_path and ce.config.training["distill_weight"] == 1.0

    # Same seed and data: with weight 0 the run is the plain (label-only) one; with weight 1 it is not.
    plain = _weights(trained_teacher / "ce")
    zero = _train_teacher_with(
        tmp_path / "w0",
        tiny_teacher_path,
        scifact_slice,
        cache,
        "--distill-from",
        standard_ce_path,
        "--distill-weight",
        "0",
    )
    for name, tensor in _weights(zero).items():
        torch.testing.assert_close(tensor, plain[name], atol=1e-6, rtol=1e-5, msg=f"{name} differs at weight 0")
    changed = [name for name, tensor in _weights(distilled).items() if not torch.allclose(tensor, plain[name])]
    assert any("encoder.layer" in name for name in changed)


# -- distill --cross-encoder with Margin-MSE alone ---------------------------------------------------------------------


@pytest.mark.slow
def test_distill_from_a_cross_encoder_with_margin_mse_only(
    standard_ce_path, tiny_teacher_path, scifact_slice, tmp_path
):
    out = tmp_path / "run"
    # No weight decay: every change of the weights then comes from a gradient, i.e. from Margin-MSE.
    margin_mse_only = ["--margin-mse-weight", "1", "--score-weight", "0", "--weight-decay", "0"]
    argv = ce_distill_arguments(
        standard_ce_path, tiny_teacher_path, scifact_slice, out, tmp_path / "cache", *margin_mse_only
    )
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    weights = metrics["training"]["loss_weights"]
    assert weights["margin_mse"] == 1.0
    assert weights["score"] == weights["query_embedding"] == weights["document_embedding"] == weights["label"] == 0.0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log
    for r in log:
        assert set(r) == {"step", "epoch", "lr", "loss", "margin_mse"}
        assert np.isfinite(r["margin_mse"]) and r["margin_mse"] > 0
        assert r["loss"] == pytest.approx(r["margin_mse"])

    # teacher:2 starts as the CE encoder's first two layers; the trained student's layers have moved.
    student = SentenceTransformer(str(out / "student"), device="cpu")
    trained = student[0].auto_model.state_dict()
    initial = transformers.AutoModel.from_pretrained(standard_ce_path).state_dict()
    compared = [name for name in trained if name.startswith("encoder.layer.") and name in initial]
    assert compared and {name.split(".")[2] for name in compared} == {"0", "1"}
    assert any(not torch.allclose(trained[name], initial[name]) for name in compared)
    torch.testing.assert_close(  # frozen by default
        trained["embeddings.word_embeddings.weight"], initial["embeddings.word_embeddings.weight"]
    )
