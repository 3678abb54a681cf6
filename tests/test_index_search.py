"""Saved FAISS indexes (flat, HNSW, IVF-PQ), `embeddistill index` / `search`, and the Searcher API."""

from __future__ import annotations

import json

import numpy as np
import pytest

from embeddistill.cli import main
from embeddistill.data import RetrievalDataset, read_trec_run
from embeddistill.serving.indexing import FlatIndex, SearchIndex
from embeddistill.serving.search import Searcher


def _unit_vectors(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def vectors():
    return _unit_vectors(600, 32, 0), [f"doc{i}" for i in range(600)], _unit_vectors(40, 32, 1)


def _exact_top(docs: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(queries @ docs.T), axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("index_type", ["flat", "hnsw", "ivfpq"])
def test_build_save_load_search(tmp_path, vectors, index_type):
    docs, ids, queries = vectors
    params = {"nlist": 8, "pq_m": 8, "nprobe": 8} if index_type == "ivfpq" else {}
    index = SearchIndex.build(docs, ids, index_type, model="tiny", **params)
    folder = index.save(tmp_path / "index")
    assert sorted(p.name for p in folder.iterdir()) == ["ids.json", "index.faiss", "info.json"]  # no temp files
    info = json.loads((folder / "info.json").read_text())
    assert info["metric"] == "inner_product" and info["dimension"] == 32 and info["count"] == 600
    assert info["type"] == index_type and info["normalized"] is True and info["model"] == "tiny"
    assert info["build_seconds"] >= 0 and isinstance(info["params"], dict)

    loaded = SearchIndex.load(folder)
    assert loaded.ids == ids and loaded.index.metric_type == index.index.metric_type
    scores, rows = loaded.search(queries, 10)
    assert scores.shape == rows.shape == (40, 10)
    assert np.all(np.diff(scores, axis=1) <= 1e-5)  # best first
    exact = _exact_top(docs, queries, 10)
    recall = np.mean([len(set(r) & set(e)) / 10 for r, e in zip(rows, exact, strict=True)])
    assert recall == 1.0 if index_type == "flat" else recall > (0.9 if index_type == "hnsw" else 0.2)
    if index_type != "ivfpq":  # exact scores are inner products
        np.testing.assert_allclose(scores[:, 0], (queries * docs[rows[:, 0]]).sum(1), rtol=1e-4, atol=1e-5)
    if index_type == "hnsw":
        assert loaded.index.hnsw.efSearch == 128
    if index_type == "ivfpq":
        assert loaded.index.nprobe == 8


@pytest.mark.parametrize("index_type", ["flat", "hnsw", "ivfpq"])
def test_add_grows_without_rebuild(tmp_path, vectors, index_type):
    docs, ids, _ = vectors
    params = {"nlist": 4, "pq_m": 8, "nprobe": 4} if index_type == "ivfpq" else {}
    index = SearchIndex.build(docs[:500], ids[:500], index_type, **params)
    index.add(ids[500:], docs[500:])
    assert len(index) == 600 and index.info["count"] == 600
    hits = index.ranked(docs[550:552], 5)
    if index_type != "ivfpq":  # a document is its own nearest neighbour
        assert [h[0][0] for h in hits] == ["doc550", "doc551"]
    else:
        assert all(len(h) == 5 for h in hits)
    index.save(tmp_path / "grown")
    assert len(SearchIndex.load(tmp_path / "grown")) == 600
    with pytest.raises(ValueError, match="already in the index"):
        index.add(["doc1"], docs[:1])
    with pytest.raises(ValueError, match="dimension"):
        index.add(["new"], np.ones((1, 8), dtype=np.float32))


def test_flat_matches_flatindex_and_small_k(vectors):
    docs, ids, queries = vectors
    index = SearchIndex.build(docs[:5], ids[:5])
    assert index.retrieve(["q"], queries[:1], 50) == FlatIndex(docs[:5], ids[:5]).retrieve(["q"], queries[:1], 50)
    assert len(index.ranked(queries[:1], 50)[0]) == 5
    with pytest.raises(ValueError, match="dimension 32"):
        index.search(np.ones((1, 3), dtype=np.float32), 1)


def test_bad_parameters_and_inconsistent_folder(tmp_path, vectors):
    docs, ids, _ = vectors
    with pytest.raises(ValueError, match="must divide"):
        SearchIndex.build(docs, ids, "ivfpq", pq_m=5)
    with pytest.raises(ValueError, match="takes no parameter"):
        SearchIndex.build(docs, ids, "flat", nlist=3)
    with pytest.raises(ValueError, match="unknown index type"):
        SearchIndex.build(docs, ids, "lsh")
    with pytest.raises(FileNotFoundError, match="is not an index folder"):
        SearchIndex.load(tmp_path)
    folder = SearchIndex.build(docs[:10], ids[:10]).save(tmp_path / "x")
    (folder / "ids.json").write_text(json.dumps(ids[:9]))
    with pytest.raises(ValueError, match="interrupted save"):
        SearchIndex.load(folder)


@pytest.fixture(scope="module")
def tiny_index(tiny_teacher_path, scifact_slice, tmp_path_factory):
    folder = tmp_path_factory.mktemp("index") / "flat"
    cache = tmp_path_factory.mktemp("cache")
    args = ["index", "--model", tiny_teacher_path, "--dataset", str(scifact_slice), "--out", str(folder)]
    assert main([*args, "--cache-dir", str(cache)]) == 0
    return folder, cache


def test_index_command_uses_teacher_cache(tiny_index, tiny_teacher_path, scifact_slice, monkeypatch):
    folder, cache = tiny_index
    info = json.loads((folder / "info.json").read_text())
    assert info["count"] == 300 and info["dimension"] == 32 and info["model"] == tiny_teacher_path
    assert info["type"] == "flat" and info["metric"] == "inner_product" and info["normalized"] is True
    from embeddistill.models.teachers import DualEncoderTeacher

    teacher = DualEncoderTeacher.load(tiny_teacher_path, cache_dir=cache)
    dataset = RetrievalDataset.load(str(scifact_slice))
    assert not teacher.cache.missing(list(dataset.corpus.values()), "document")  # the index filled the cache


def test_searcher_matches_exact_search(tiny_index, tiny_teacher_path, scifact_slice):
    from embeddistill.models.teachers import load_sentence_transformer

    folder, _ = tiny_index
    dataset = RetrievalDataset.load(str(scifact_slice))
    model = load_sentence_transformer(tiny_teacher_path)
    searcher = Searcher(folder, model)
    texts = list(dataset.queries.values())[:5]
    hits = searcher.search(texts, k=10)
    docs = model.encode_document(list(dataset.corpus.values()), convert_to_numpy=True)
    expected = FlatIndex(docs, list(dataset.corpus)).search(model.encode_query(texts, convert_to_numpy=True), 10)
    for row, query_hits in enumerate(hits):
        assert [h.id for h in query_hits][:3] == [list(dataset.corpus)[r] for r in expected[1][row]][:3]
        np.testing.assert_allclose([h.score for h in query_hits], expected[0][row], atol=1e-4)
    assert searcher.search("one query", k=3)[0][0].id == searcher.search(["one query"], k=3)[0][0].id


def test_asymmetric_student_searches_the_teacher_index(tiny_index, tiny_teacher_path, tmp_path, capsys):
    from embeddistill.models.students import build_student
    from embeddistill.models.teachers import load_sentence_transformer
    from embeddistill.serving.search import Searcher

    folder, _ = tiny_index
    student = build_student("teacher:2", load_sentence_transformer(tiny_teacher_path), asymmetric=True)
    student.save(str(tmp_path / "student"))
    searcher = Searcher(folder, str(tmp_path / "student"))
    hits = searcher.search(["vitamin D and bone density"], k=4)[0]
    assert len(hits) == 4 and hits[0].score >= hits[-1].score

    assert main(["search", str(folder), "--model", str(tmp_path / "student"), "--k", "3", "q one", "q two"]) == 0
    out = capsys.readouterr().out
    assert "query 1: q one" in out and "query 2: q two" in out and out.count("\n") == 8

    queries = tmp_path / "queries.tsv"
    queries.write_text("a\tvitamin D\nb\tcoral reefs\n")
    run_path = tmp_path / "run.trec"
    assert (
        main(
            [
                "search",
                str(folder),
                "--model",
                str(tmp_path / "student"),
                "--queries",
                str(queries),
                "--k",
                "5",
                "--out",
                str(run_path),
            ]
        )
        == 0
    )
    run = read_trec_run(run_path)
    assert sorted(run) == ["a", "b"] and all(len(v) == 5 for v in run.values())
    expected = dict(searcher.search(["vitamin D"], k=5)[0])
    assert run["a"].keys() == expected.keys()
    assert list(run["a"].values()) == pytest.approx(list(expected.values()), abs=1e-5)  # 6 decimals in the file


def test_search_errors(tiny_index, tiny_teacher_path, tmp_path):
    folder, _ = tiny_index
    with pytest.raises(SystemExit):
        main(["search", str(folder), "--model", tiny_teacher_path])
    assert main(["search", str(tmp_path), "--model", tiny_teacher_path, "q"]) == 2  # not an index folder


def test_a_blank_query_is_refused_not_searched(tiny_index, tiny_teacher_path, capsys):
    folder, _ = tiny_index
    searcher = Searcher(folder, tiny_teacher_path)
    with pytest.raises(ValueError, match="query 2 of 3 is blank"):
        searcher.search(["vitamin D", "  \t", "coral reefs"], 5)
    assert main(["search", str(folder), "--model", tiny_teacher_path, " "]) == 2
    assert "blank" in capsys.readouterr().err
