"""Generated queries in the pipeline: query files with sources, the mix ratio and the round-trip filter."""

from __future__ import annotations

import json

import numpy as np

from embeddistill.config import DistillConfig
from embeddistill.data import RetrievalDataset
from embeddistill.pipeline.dual_encoder import prepare
from embeddistill.pipeline.stages import QuerySet, collect_training_queries, roundtrip_keep
from embeddistill.querygen import crops_per_document
from embeddistill.serving.indexing import FlatIndex


def _write_generated(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _config(scifact_slice, **options) -> DistillConfig:
    return DistillConfig.from_dict({"dataset": str(scifact_slice), "teacher": "unused", **options})


def test_query_file_with_sources_counts_as_generated_and_anchors_on_its_document(tmp_path, scifact_slice):
    dataset = RetrievalDataset.load(scifact_slice)
    doc_a, doc_b = list(dataset.corpus)[:2]
    lm_file = _write_generated(
        tmp_path / "lm.jsonl",
        [
            {"_id": "q1", "text": "what does the first document say", "source_id": doc_a, "generator": "lm"},
            {"_id": "q2", "text": "a query about the second one", "source_id": doc_b, "generator": "lm"},
        ],
    )
    real_file = tmp_path / "real.tsv"
    real_file.write_text("r1\tan unlabeled real query\n", encoding="utf-8")
    config = _config(
        scifact_slice,
        extra_queries=[str(lm_file), str(real_file)],
        crops_per_document=0,
        perturbations_per_query=0,
    )
    query_set = collect_training_queries(config, dataset, set(dataset.qrels("test")))
    labelled = len([q for q in dataset.qrels("train") if q not in dataset.qrels("test")])
    assert query_set.counts == {"labelled": labelled, "extra": 1, "generated": 2}
    row = query_set.ids.index("extra:q1")
    assert query_set.generated[row] and query_set.sources[row] == doc_a
    real = query_set.ids.index("extra:r1")
    assert not query_set.generated[real] and query_set.sources[real] is None


def test_generated_per_real_caps_the_mix(scifact_slice):
    dataset = RetrievalDataset.load(scifact_slice)
    eval_ids = set(dataset.qrels("test"))
    uncapped = collect_training_queries(_config(scifact_slice, crops_per_document=2), dataset, eval_ids)
    capped = collect_training_queries(
        _config(scifact_slice, crops_per_document=2, generated_per_real=0.5), dataset, eval_ids
    )
    real = capped.counts["labelled"] + capped.counts["extra"]
    assert uncapped.counts["generated"] > real  # the cap must bite for the test to mean anything
    assert capped.counts["generated"] == round(0.5 * real)
    assert set(capped.texts) <= set(uncapped.texts)


def test_a_small_corpus_gets_every_crop_and_a_large_one_shares_the_budget():
    # (documents, most, budget) -> crops each: round(budget / documents), between 1 and most.
    assert crops_per_document(5_183, 24, 150_000) == 24  # SciFact: 150000 / 5183 = 28.9, capped at 24
    assert crops_per_document(30_005, 24, 150_000) == 5  # the MS MARCO pool: 4.9992 rounds to 5
    assert crops_per_document(5_183, 8, 60_000) == 8  # the earlier defaults: 11.6, capped at 8
    assert crops_per_document(30_005, 8, 60_000) == 2  # 1.9997 rounds to 2
    assert crops_per_document(1_000_000, 24, 150_000) == 1  # never none
    assert crops_per_document(1_000_000, 24, 0) == 24  # no budget
    assert crops_per_document(10, 0, 150_000) == 0  # crops off stay off


def test_the_crop_budget_sets_how_many_crops_the_run_makes(scifact_slice):
    dataset = RetrievalDataset.load(scifact_slice)
    eval_ids = set(dataset.qrels("test"))
    documents = len(dataset.corpus)
    options = {"crops_per_document": 4, "perturbations_per_query": 0}
    full = collect_training_queries(_config(scifact_slice, crop_budget=0, **options), dataset, eval_ids)
    shared = collect_training_queries(_config(scifact_slice, crop_budget=2 * documents, **options), dataset, eval_ids)
    assert full.counts["generated"] == 4 * documents
    assert shared.counts["generated"] == 2 * documents


def test_roundtrip_keeps_generated_queries_whose_source_the_teacher_ranks_high():
    # Three documents on the axes; queries near one axis rank that document first and the others after.
    index = FlatIndex(np.eye(3, dtype=np.float32), ["d0", "d1", "d2"])
    queries = np.array([[1.0, 0.1, 0.0], [1.0, 0.5, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]], dtype=np.float32)
    query_set = QuerySet(
        ids=["g0", "g1", "real", "g-no-source"],
        texts=["a", "b", "c", "d"],
        positives=[[], [], ["d0"], []],
        sources=["d0", "d1", None, None],
        generated=[True, True, False, True],
        counts={},
    )
    # g0 ranks its source d0 first: kept. g1 ranks d1 second: dropped at k=1, kept at k=2.
    # The real query and the source-less generated one are never checked.
    assert roundtrip_keep(query_set, queries, index, 1).tolist() == [True, False, True, True]
    assert roundtrip_keep(query_set, queries, index, 2).tolist() == [True, True, True, True]


def test_roundtrip_filter_in_prepare_drops_rows_and_their_teacher_embeddings(
    tmp_path, scifact_slice, tiny_teacher_path, cache_dir
):
    # No held-out validation slice: its seeded sample would differ between the two query sets.
    options = {"teacher": tiny_teacher_path, "cache_dir": str(cache_dir), "crops_per_document": 1}
    options["validation_queries"] = 0
    plain = prepare(_config(scifact_slice, **options), tmp_path / "plain")
    filtered = prepare(_config(scifact_slice, **options, roundtrip_top_k=1), tmp_path / "filtered")

    dropped = filtered.query_set.counts["roundtrip_dropped"]
    assert 0 < dropped < plain.query_set.counts["generated"]
    assert filtered.query_set.counts["generated"] == plain.query_set.counts["generated"] - dropped
    assert len(filtered.query_set.texts) == len(filtered.teacher_train) == len(plain.query_set.texts) - dropped
    # Every kept generated query ranks its source first, and the rows still line up with their embeddings.
    _, top = filtered.teacher_index.search(filtered.teacher_train, 1)
    kept = filtered.query_set
    for i, (is_generated, source) in enumerate(zip(kept.generated, kept.sources, strict=True)):
        if is_generated and source:
            assert filtered.teacher_index.ids[top[i, 0]] == source
    row_of = {text: i for i, text in enumerate(plain.query_set.texts)}
    for i, text in enumerate(filtered.query_set.texts):
        np.testing.assert_array_equal(filtered.teacher_train[i], plain.teacher_train[row_of[text]])
    written = [json.loads(line) for line in (tmp_path / "filtered" / "training_queries.jsonl").open()]
    assert [row["text"] for row in written] == filtered.query_set.texts


def test_generate_queries_from_a_seeded_sample_of_documents(tmp_path, scifact_slice):
    from embeddistill.cli import main

    def sources(out):
        rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
        return [row["source_id"] for row in rows]

    argv = ["generate-queries", "--dataset", str(scifact_slice), "--generator", "crop", "--max-documents", "10"]
    assert main([*argv, "--out", str(tmp_path / "a.jsonl")]) == 0
    assert main([*argv, "--out", str(tmp_path / "b.jsonl")]) == 0
    chosen = sources(tmp_path / "a.jsonl")
    assert len(set(chosen)) == len(chosen) == 10
    assert set(chosen) <= set(RetrievalDataset.load(scifact_slice).corpus)
    assert chosen == sources(tmp_path / "b.jsonl")  # the same seed samples the same documents
