"""Atomic storage helpers, metric computation against hand-computed values, the paired test, and exact search."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from embeddistill import storage
from embeddistill.evaluation.metrics import score_run
from embeddistill.evaluation.significance import paired_permutation_test
from embeddistill.serving import indexing
from embeddistill.serving.indexing import FlatIndex, SearchIndex
from embeddistill.storage import atomic_save_npy, atomic_write_bytes, atomic_write_json, sha256_file


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp") or p.name.startswith("."))


# --- storage ---------------------------------------------------------------------------------------------------


def test_atomic_write_json_replaces_content_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "sub" / "state.json"
    atomic_write_json(path, {"step": 1, "name": "é"})
    assert json.loads(path.read_text(encoding="utf-8")) == {"step": 1, "name": "é"}
    atomic_write_json(path, {"step": 2})
    assert json.loads(path.read_text(encoding="utf-8")) == {"step": 2}
    assert path.read_text(encoding="utf-8").endswith("\n")
    assert leftovers(path.parent) == []
    assert [p.name for p in path.parent.iterdir()] == ["state.json"]


def test_atomic_write_failure_keeps_old_content_and_removes_temp(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    atomic_write_json(path, {"step": 1})

    def broken_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(storage.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk gone"):
        atomic_write_bytes(path, b"partial")
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"step": 1}
    assert leftovers(tmp_path) == []


def test_atomic_write_json_unserialisable_keeps_old_content(tmp_path):
    path = tmp_path / "state.json"
    atomic_write_json(path, {"ok": True})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"ok": True}
    assert leftovers(tmp_path) == []


def test_atomic_save_npy_checksum(tmp_path):
    array = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    path = tmp_path / "shard.npy"
    checksum = atomic_save_npy(path, array)
    assert checksum == sha256_file(path)
    assert len(checksum) == 64
    np.testing.assert_array_equal(np.load(path), array)
    other = atomic_save_npy(path, array + 1)
    assert other != checksum and other == sha256_file(path)
    assert leftovers(tmp_path) == []


def test_atomic_save_npy_refuses_object_arrays(tmp_path):
    with pytest.raises(ValueError):
        atomic_save_npy(tmp_path / "x.npy", np.array([{"a": 1}], dtype=object))
    assert not (tmp_path / "x.npy").exists()


def test_text_key_and_fingerprint_are_stable():
    assert storage.text_key("hello") == storage.text_key("hello")
    assert storage.text_key("hello") != storage.text_key("hello ")
    assert len(storage.text_key("x")) == 24
    assert storage.fingerprint({"a": 1, "b": [1, 2]}) == storage.fingerprint({"b": [1, 2], "a": 1})
    assert storage.fingerprint({"a": 1}) != storage.fingerprint({"a": 2})


def test_sha256_file_of_known_content(tmp_path):
    path = tmp_path / "abc.bin"
    path.write_bytes(b"abc")
    assert sha256_file(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


# --- metrics ---------------------------------------------------------------------------------------------------

METRICS = ["nDCG@10", "RR@10", "R@100"]


def test_score_run_against_hand_computed_values():
    qrels = {
        "q1": {"d1": 1, "d9": 0},
        "q2": {"d5": 2, "d6": 1},
        "q3": {"d7": 1},  # judged, never retrieved
    }
    run = {
        "q1": {"d2": 0.9, "d1": 0.8, "d3": 0.7},  # the relevant d1 at rank 2
        "q2": {"d4": 0.9, "d5": 0.5, "d8": 0.1},  # d5 (gain 2) at rank 2, d6 (gain 1) not retrieved
        "q4": {"d1": 1.0},  # unjudged query: ignored
    }
    aggregate, per_query = score_run(run, qrels, METRICS)

    # q1: DCG = 1 / log2(3); ideal DCG = 1 / log2(2) = 1.
    ndcg_q1 = (1 / math.log2(3)) / 1
    # q2 (trec_eval gains = relevance grades): DCG = 2 / log2(3); ideal = 2 / log2(2) + 1 / log2(3).
    ndcg_q2 = (2 / math.log2(3)) / (2 / 1 + 1 / math.log2(3))
    expected = {
        "nDCG@10": {"q1": ndcg_q1, "q2": ndcg_q2, "q3": 0.0},
        "RR@10": {"q1": 0.5, "q2": 0.5, "q3": 0.0},
        "R@100": {"q1": 1.0, "q2": 0.5, "q3": 0.0},
    }
    assert set(per_query) == set(METRICS)
    for name in METRICS:
        assert set(per_query[name]) == {"q1", "q2", "q3"}, name
        for query_id, value in expected[name].items():
            assert per_query[name][query_id] == pytest.approx(value, abs=1e-6), (name, query_id)
        assert aggregate[name] == pytest.approx(sum(expected[name].values()) / 3, abs=1e-6), name


def test_score_run_perfect_and_empty():
    qrels = {"a": {"x": 1}, "b": {"y": 1}}
    aggregate, _ = score_run({"a": {"x": 2.0, "z": 1.0}, "b": {"y": 5.0}}, qrels, METRICS)
    assert aggregate == pytest.approx({"nDCG@10": 1.0, "RR@10": 1.0, "R@100": 1.0})
    aggregate, per_query = score_run({}, qrels, METRICS)
    assert aggregate == {"nDCG@10": 0.0, "RR@10": 0.0, "R@100": 0.0}
    assert per_query["RR@10"] == {"a": 0.0, "b": 0.0}


def test_score_run_rr_cutoff():
    qrels = {"q": {"rel": 1}}
    run = {"q": {f"n{i}": 100.0 - i for i in range(10)} | {"rel": 50.0}}  # rel ranked 11th
    aggregate, _ = score_run(run, qrels, ["RR@10", "RR@100"])
    assert aggregate["RR@10"] == 0.0
    assert aggregate["RR@100"] == pytest.approx(1 / 11)


def test_paired_permutation_test_separates_real_differences_from_noise():
    queries = [f"q{i}" for i in range(200)]
    same = {q: 0.5 for q in queries}
    better = {q: 0.6 for q in queries}
    assert paired_permutation_test(better, same, rounds=500) < 0.01
    assert paired_permutation_test(same, dict(same), rounds=500) == 1.0
    with pytest.raises(ValueError, match="same queries"):
        paired_permutation_test(same, {"other": 1.0})


# --- exact search ------------------------------------------------------------------------------------------------


@pytest.fixture(params=["faiss", "torch fallback"])
def search_backend(request, monkeypatch):
    """Both exact-search backends: faiss, and the torch fallback used where faiss is not installed."""
    if request.param == "torch fallback":
        monkeypatch.setattr(indexing, "faiss", None)
    return request.param


def test_flat_index_exact_top_k_by_inner_product(search_backend):
    rng = np.random.default_rng(0)
    documents = rng.standard_normal((200, 16)).astype(np.float32)
    queries = rng.standard_normal((7, 16)).astype(np.float32)
    ids = [f"doc{i}" for i in range(200)]
    index = FlatIndex(documents, ids)
    assert len(index) == 200
    scores, rows = index.search(queries, k=10)
    assert scores.shape == rows.shape == (7, 10)
    exact = queries @ documents.T
    expected_rows = np.argsort(-exact, axis=1)[:, :10]
    np.testing.assert_array_equal(rows, expected_rows)
    np.testing.assert_allclose(scores, np.take_along_axis(exact, expected_rows, axis=1), rtol=1e-5, atol=1e-5)

    run = index.retrieve([f"q{i}" for i in range(7)], queries, k=10)
    for i in range(7):
        assert list(run[f"q{i}"]) == [ids[r] for r in expected_rows[i]]
        assert list(run[f"q{i}"].values()) == pytest.approx(exact[i, expected_rows[i]].tolist(), abs=1e-5)


def test_flat_index_small_batches_and_k_above_size(search_backend):
    rng = np.random.default_rng(1)
    documents = rng.standard_normal((5, 4))  # float64 in: converted
    queries = rng.standard_normal((9, 4))
    index = FlatIndex(documents, list("abcde"))
    scores, rows = index.search(queries, k=50, batch_size=2)
    assert rows.shape == (9, 5)
    np.testing.assert_array_equal(rows, np.argsort(-(queries @ documents.T), axis=1))
    assert all(len(docs) == 5 for docs in index.retrieve([str(i) for i in range(9)], queries, k=50).values())


def test_a_query_s_own_id_is_no_hit_unless_kept_and_the_scores_follow_by_hand(search_backend):
    # Duplicate-question data: query "a" is also document "a". Scores of q·d: a 1.0, b 0.8, c 0.6, d 0.4.
    documents = np.array([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.4, 0.9]], dtype=np.float32)
    index = FlatIndex(documents, ["a", "b", "c", "d"])
    query = np.array([[1.0, 0.0]], dtype=np.float32)
    qrels = {"a": {"c": 1}}
    dropped = index.retrieve(["a"], query, k=2)
    assert list(dropped["a"]) == ["b", "c"]  # k hits remain after the drop: the search went one deeper
    kept = index.retrieve(["a"], query, k=2, ignore_identical_ids=False)
    assert list(kept["a"]) == ["a", "b"]
    # Relevant c: rank 2 without the self hit (nDCG@10 = 1/log2(3), RR 1/2), rank 3 with it (1/log2(4) = 0.5, RR 1/3).
    aggregate, _ = score_run(index.retrieve(["a"], query, k=10), qrels, ["nDCG@10", "RR@10"])
    assert aggregate == pytest.approx({"nDCG@10": 1 / math.log2(3), "RR@10": 0.5})
    aggregate, _ = score_run(
        index.retrieve(["a"], query, k=10, ignore_identical_ids=False), qrels, ["nDCG@10", "RR@10"]
    )
    assert aggregate == pytest.approx({"nDCG@10": 0.5, "RR@10": 1 / 3})
    if search_backend == "faiss":  # a saved SearchIndex is FAISS's alone (faiss-cpu is a core dependency)
        saved = SearchIndex.build(documents, ["a", "b", "c", "d"], "flat")
        assert saved.retrieve(["a"], query, k=2) == dropped
        assert list(saved.retrieve(["a"], query, k=2, ignore_identical_ids=False)["a"]) == ["a", "b"]


def test_flat_index_rejects_mismatched_ids():
    with pytest.raises(ValueError):
        FlatIndex(np.zeros((3, 4), dtype=np.float32), ["a", "b"])
