"""Loading and validating BEIR-layout data, query files and TREC runs (``embeddistill.data``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embeddistill.data import (
    DATA_ENV,
    DataError,
    RetrievalDataset,
    dataset_search_paths,
    load_corpus,
    load_qrels,
    load_queries,
    read_trec_run,
    resolve_dataset,
    write_trec_run,
)

CORPUS = [
    {"_id": "d1", "title": "Coral reefs", "text": "Reefs bleach in warm water."},
    {"_id": "d2", "title": "", "text": "Vitamin D and bone density."},
    {"_id": "d3", "text": "Sorting in Python is stable."},
    {"_id": 4, "title": "  Padded title ", "text": "  padded text  "},
]
QUERIES = [
    {"_id": "q1", "text": "why do reefs bleach"},
    {"_id": "q2", "text": "is python sort stable"},
    {"_id": "q3", "text": "vitamin d bones"},
]


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_beir(
    root: Path,
    corpus: str | bytes | None = None,
    queries: str | bytes | None = None,
    qrels: dict[str, str | bytes] | None = None,
) -> Path:
    """A BEIR folder under ``root``; each file's content defaults to the small valid example above."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "qrels").mkdir(exist_ok=True)
    files = {
        root / "corpus.jsonl": jsonl(CORPUS) if corpus is None else corpus,
        root / "queries.jsonl": jsonl(QUERIES) if queries is None else queries,
    }
    if qrels is None:
        qrels = {
            "train": "query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td3\t2\n",
            "test": "q3\td2\t1\nq3\t4\t0\n",  # no header
        }
    for split, content in qrels.items():
        files[root / "qrels" / f"{split}.tsv"] = content
    for path, content in files.items():
        if isinstance(content, str):
            path.write_text(content, encoding="utf-8", newline="")
        else:
            path.write_bytes(content)
    return root


# --- a valid dataset -----------------------------------------------------------------------------------------


def test_valid_dataset_loads(tmp_path):
    dataset = RetrievalDataset.load(str(write_beir(tmp_path / "toy")))
    assert dataset.name == "toy"
    assert dataset.corpus == {
        "d1": "Coral reefs Reefs bleach in warm water.",
        "d2": "Vitamin D and bone density.",
        "d3": "Sorting in Python is stable.",
        "4": "Padded title padded text",
    }
    assert dataset.queries == {q["_id"]: q["text"] for q in QUERIES}
    assert dataset.splits() == ["test", "train"]
    assert dataset.qrels("train") == {"q1": {"d1": 1}, "q2": {"d3": 2}}
    assert dataset.qrels("test") == {"q3": {"d2": 1, "4": 0}}
    assert dataset.split_queries("train") == {"q1": "why do reefs bleach", "q2": "is python sort stable"}
    assert dataset.split_queries("test") == {"q3": "vitamin d bones"}


def test_qrels_with_and_without_header_and_trec_format(tmp_path):
    with_header = tmp_path / "a.tsv"
    with_header.write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t0\n")
    without_header = tmp_path / "b.tsv"
    without_header.write_text("q1\td1\t1\nq1\td2\t0\n")
    trec = tmp_path / "c.txt"
    trec.write_text("q1 0 d1 1\nq1 0 d2 0\n")
    expected = {"q1": {"d1": 1, "d2": 0}}
    assert load_qrels(with_header) == expected
    assert load_qrels(without_header) == expected
    assert load_qrels(trec) == expected


# --- errors name the file and the line -----------------------------------------------------------------------


def test_malformed_json_line_names_file_and_line(tmp_path):
    corpus = jsonl(CORPUS[:2]) + '{"_id": "d9", "text": "unterminated\n' + jsonl(CORPUS[2:])
    root = write_beir(tmp_path / "bad", corpus=corpus)
    with pytest.raises(DataError) as error:
        load_corpus(root / "corpus.jsonl")
    message = str(error.value)
    assert "corpus.jsonl" in message
    assert ":3:" in message
    assert "malformed JSON" in message
    assert error.value.line == 3


def test_json_line_that_is_not_an_object(tmp_path):
    root = write_beir(tmp_path / "bad", corpus=jsonl(CORPUS[:1]) + "[1, 2]\n")
    with pytest.raises(DataError, match=r"corpus\.jsonl:2: expected a JSON object"):
        load_corpus(root / "corpus.jsonl")


@pytest.mark.parametrize(
    "record, problem",
    [
        ({"title": "t", "text": "no id"}, "missing field '_id'"),
        ({"_id": "d9", "title": "no text"}, "missing field 'text'"),
        ({"_id": "d9", "text": 5}, "field 'text' must be a string, got int"),
        ({"_id": "d9", "text": ["a", "b"]}, "field 'text' must be a string, got list"),
        ({"_id": "d9", "title": 3.5, "text": "x"}, "field 'title' must be a string, got float"),
        ({"_id": True, "text": "x"}, "field '_id' must be a string, got bool"),
        ({"_id": "   ", "text": "x"}, "empty '_id'"),
    ],
)
def test_bad_corpus_record(tmp_path, record, problem):
    root = write_beir(tmp_path / "bad", corpus=jsonl(CORPUS[:2] + [record]))
    with pytest.raises(DataError) as error:
        load_corpus(root / "corpus.jsonl")
    assert str(error.value) == f"{root / 'corpus.jsonl'}:3: {problem}"


def test_duplicate_document_id_names_first_line(tmp_path):
    rows = CORPUS[:3] + [{"_id": "d2", "text": "again"}]
    root = write_beir(tmp_path / "dup", corpus=jsonl(rows))
    with pytest.raises(DataError, match=r"corpus\.jsonl:4: duplicate document id 'd2' \(first on line 2\)"):
        load_corpus(root / "corpus.jsonl")


def test_duplicate_query_id(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(jsonl([{"_id": "q1", "text": "a"}, {"_id": "q2", "text": "b"}, {"_id": "q1", "text": "c"}]))
    with pytest.raises(DataError, match=r"q\.jsonl:3: duplicate query id 'q1' \(first on line 1\)"):
        load_queries(path)


def test_empty_document_skipped_with_warning(tmp_path, caplog):
    rows = CORPUS[:2] + [{"_id": "blank", "title": " ", "text": "  "}] + CORPUS[2:]
    root = write_beir(tmp_path / "empty", corpus=jsonl(rows))
    with caplog.at_level(logging.WARNING, logger="embeddistill.data"):
        corpus = load_corpus(root / "corpus.jsonl")
    assert "blank" not in corpus
    assert len(corpus) == len(CORPUS)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "skipped 1 record(s)" in warnings[0]
    assert "empty document" in warnings[0]
    assert "line 3" in warnings[0] and "'blank'" in warnings[0]


def test_corpus_of_only_empty_documents_is_an_error(tmp_path):
    root = write_beir(tmp_path / "void", corpus=jsonl([{"_id": "a", "text": ""}, {"_id": "b", "text": " "}]))
    with pytest.raises(DataError, match="no documents"):
        load_corpus(root / "corpus.jsonl")


def test_qrels_for_unknown_ids_dropped_and_counted(tmp_path, caplog):
    qrels = {"train": "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\tnope1\t1\nq2\tnope2\t1\nghost\td1\t1\n"}
    dataset = RetrievalDataset.load(str(write_beir(tmp_path / "toy", qrels=qrels)))
    with caplog.at_level(logging.WARNING, logger="embeddistill.data"):
        kept = dataset.qrels("train")
    assert kept == {"q1": {"d1": 1}}
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    unknown_doc = [m for m in messages if "unknown document id" in m]
    unknown_query = [m for m in messages if "unknown query id" in m]
    assert len(unknown_doc) == 1 and "skipped 2 record(s)" in unknown_doc[0]
    assert len(unknown_query) == 1 and "skipped 1 record(s)" in unknown_query[0] and "ghost" in unknown_query[0]
    assert all("train.tsv" in m for m in messages)


def test_qrels_with_no_usable_judgement_is_an_error(tmp_path):
    dataset = RetrievalDataset.load(str(write_beir(tmp_path / "toy", qrels={"train": "x\ty\t1\n"})))
    with pytest.raises(DataError, match="no usable judgements"):
        dataset.qrels("train")


@pytest.mark.parametrize(
    "content, line", [("q1\td1\t1\nq1\td2\thigh\n", 2), ("query-id\tcorpus-id\tscore\nq1\td1\t\n", 2)]
)
def test_bad_qrels_score(tmp_path, content, line):
    path = tmp_path / "qrels.tsv"
    path.write_text(content)
    with pytest.raises(DataError) as error:
        load_qrels(path)
    assert f"qrels.tsv:{line}:" in str(error.value)


def test_qrels_wrong_column_count(tmp_path):
    path = tmp_path / "qrels.tsv"
    path.write_text("q1\td1\t1\nq1\td2\n")
    with pytest.raises(DataError, match=r"qrels\.tsv:2: expected 3 columns"):
        load_qrels(path)


def test_missing_split_lists_available(tmp_path):
    dataset = RetrievalDataset.load(str(write_beir(tmp_path / "toy")))
    with pytest.raises(DataError) as error:
        dataset.qrels("dev")
    message = str(error.value)
    assert "dev.tsv" in message
    assert "'dev'" in message
    assert "['test', 'train']" in message


def test_missing_queries_file(tmp_path):
    root = write_beir(tmp_path / "toy")
    (root / "queries.jsonl").unlink()
    with pytest.raises(DataError, match=r"queries\.jsonl: file not found"):
        RetrievalDataset.load(str(root))


# --- encodings ---------------------------------------------------------------------------------------------


def test_utf8_bom_and_crlf_accepted(tmp_path):
    bom = b"\xef\xbb\xbf"
    corpus = bom + jsonl(CORPUS).replace("\n", "\r\n").encode("utf-8")
    queries = bom + jsonl(QUERIES).replace("\n", "\r\n").encode("utf-8")
    qrels = {"train": bom + b"query-id\tcorpus-id\tscore\r\nq1\td1\t1\r\nq2\td3\t2\r\n"}
    dataset = RetrievalDataset.load(str(write_beir(tmp_path / "win", corpus=corpus, queries=queries, qrels=qrels)))
    assert dataset.corpus["d1"] == "Coral reefs Reefs bleach in warm water."
    assert dataset.corpus["4"] == "Padded title padded text"
    assert dataset.queries["q1"] == "why do reefs bleach"
    assert dataset.qrels("train") == {"q1": {"d1": 1}, "q2": {"d3": 2}}


def test_non_ascii_text_kept(tmp_path):
    rows = [{"_id": "é1", "title": "Ça va", "text": "日本語のテキスト 🙂"}]
    root = write_beir(tmp_path / "u", corpus=jsonl(rows))
    assert load_corpus(root / "corpus.jsonl") == {"é1": "Ça va 日本語のテキスト 🙂"}


def test_undecodable_bytes_name_the_line(tmp_path):
    corpus = jsonl(CORPUS[:1]).encode() + b'{"_id": "d2", "text": "caf\xe9"}\n' + jsonl(CORPUS[2:]).encode()
    root = write_beir(tmp_path / "latin1", corpus=corpus)
    with pytest.raises(DataError) as error:
        load_corpus(root / "corpus.jsonl")
    assert "corpus.jsonl:2:" in str(error.value)
    assert "UTF-8" in str(error.value)


def test_lone_surrogate_escape_rejected_at_load(tmp_path):
    """JSON may spell an unpaired surrogate (``\\ud800``); such a text cannot be encoded as UTF-8 later
    (``storage.text_key``, tokenizers), so loading should reject it with the file and line."""
    corpus = jsonl(CORPUS[:1]) + '{"_id": "d2", "text": "bad \\ud800 text"}\n'
    root = write_beir(tmp_path / "surrogate", corpus=corpus)
    with pytest.raises(DataError) as error:
        load_corpus(root / "corpus.jsonl")
    assert "corpus.jsonl:2:" in str(error.value)


def test_huge_integer_id_is_a_data_error(tmp_path):
    """``json.loads`` raises a plain ValueError (not JSONDecodeError) past Python's int-digit limit."""
    corpus = jsonl(CORPUS[:1]) + '{"_id": ' + "7" * 5000 + ', "text": "x"}\n'
    root = write_beir(tmp_path / "bigint", corpus=corpus)
    with pytest.raises(DataError) as error:
        load_corpus(root / "corpus.jsonl")
    assert "corpus.jsonl:2:" in str(error.value)


# --- query files -------------------------------------------------------------------------------------------


def test_tsv_query_files(tmp_path):
    plain = tmp_path / "extra.tsv"
    plain.write_text("g1\twhat is coral\ng2\ttabs\tinside text\n\ng3\t   \n", encoding="utf-8")
    assert load_queries(plain) == {"g1": "what is coral", "g2": "tabs\tinside text"}
    with_header = tmp_path / "header.tsv"
    with_header.write_text("id\ttext\ng1\twhat is coral\n", encoding="utf-8")
    assert load_queries(with_header) == {"g1": "what is coral"}
    broken = tmp_path / "broken.tsv"
    broken.write_text("g1\tok\nno-tab-here\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"broken\.tsv:2:"):
        load_queries(broken)


@pytest.mark.parametrize("suffix", [".txt", ".csv", ""])
def test_unknown_query_file_suffix(tmp_path, suffix):
    path = tmp_path / f"queries{suffix}"
    path.write_text("q1\thello\n")
    with pytest.raises(DataError, match="unknown query file format"):
        load_queries(path)


def test_empty_query_skipped_with_warning(tmp_path, caplog):
    path = tmp_path / "q.jsonl"
    path.write_text(jsonl([{"_id": "q1", "text": "a"}, {"_id": "q2", "text": "  "}]))
    with caplog.at_level(logging.WARNING, logger="embeddistill.data"):
        assert load_queries(path) == {"q1": "a"}
    assert any("empty query text" in r.getMessage() for r in caplog.records)


# --- finding datasets --------------------------------------------------------------------------------------


def test_resolve_dataset_from_env(tmp_path, monkeypatch):
    store = tmp_path / "store"
    write_beir(store / "toyset")
    elsewhere = tmp_path / "work" / "cwd"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv(DATA_ENV, str(store))
    assert resolve_dataset("toyset") == (store / "toyset").resolve()
    assert RetrievalDataset.load("toyset").corpus["d1"].startswith("Coral reefs")


def test_resolve_dataset_explicit_path_wins(tmp_path, monkeypatch):
    direct = write_beir(tmp_path / "direct")
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "nothing-here"))
    assert resolve_dataset(str(direct)) == direct.resolve()


def test_resolve_dataset_not_found_lists_places(tmp_path, monkeypatch):
    elsewhere = tmp_path / "work" / "cwd"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "store"))
    name = "no-such-dataset-7f3a"
    with pytest.raises(FileNotFoundError) as error:
        resolve_dataset(name)
    message = str(error.value)
    assert repr(name) in message
    assert DATA_ENV in message
    places = dataset_search_paths(name)
    assert str(tmp_path / "store" / name) in [str(p) for p in places]
    for place in places:
        assert str(place) in message


# --- TREC runs ---------------------------------------------------------------------------------------------


def test_trec_run_round_trip_ranked_by_score(tmp_path):
    run = {
        "q1": {"d1": 0.25, "d2": 0.75, "d3": -1.5, "d4": 0.5},
        "q2": {"d9": 3.0},
    }
    path = tmp_path / "runs" / "sys.trec"
    write_trec_run(path, run, tag="sys")
    lines = path.read_text().splitlines()
    assert lines[0] == "q1 Q0 d2 1 0.750000 sys"
    q1 = [line.split() for line in lines if line.startswith("q1 ")]
    assert [row[2] for row in q1] == ["d2", "d4", "d1", "d3"]
    assert [int(row[3]) for row in q1] == [1, 2, 3, 4]
    assert all(len(row) == 6 and row[1] == "Q0" and row[5] == "sys" for row in q1)
    assert read_trec_run(path) == run
    assert not [p.name for p in path.parent.iterdir() if p.name != "sys.trec"]  # no temp files left


def test_trec_run_round_trip_empty_run(tmp_path):
    path = tmp_path / "empty.trec"
    write_trec_run(path, {}, tag="sys")
    assert read_trec_run(path) == {}


def test_read_trec_run_bad_row(tmp_path):
    path = tmp_path / "bad.trec"
    path.write_text("q1 Q0 d1 1 0.5 sys\nq1 Q0 d2 2\n")
    with pytest.raises(DataError, match=r"bad\.trec:2:"):
        read_trec_run(path)


_trec_ids = st.text(
    alphabet=st.characters(min_codepoint=33, max_codepoint=0x2FFF, exclude_categories=["Zs", "Zl", "Zp", "Cc"]),
    min_size=1,
    max_size=6,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    run=st.dictionaries(
        _trec_ids,
        st.dictionaries(_trec_ids, st.floats(min_value=-1e6, max_value=1e6, allow_nan=False), min_size=1, max_size=4),
        min_size=1,
        max_size=3,
    )
)
def test_property_trec_run_round_trips_any_visible_ids(tmp_path, run):
    """Ids without whitespace (quotes included: ``"`` is legal in a TREC id) survive a write and a read."""
    path = tmp_path / "prop.trec"
    write_trec_run(path, run, tag="t")
    expected = {q: {d: float(f"{s:.6f}") for d, s in docs.items()} for q, docs in run.items()}
    assert read_trec_run(path) == expected


# --- property: arbitrary unicode round-trips or fails cleanly -----------------------------------------------

_texts = st.text(max_size=30)
_records = st.lists(
    st.fixed_dictionaries({"_id": st.text(max_size=8), "text": _texts}, optional={"title": _texts}), max_size=6
)


def _expected_corpus(records: list[dict]) -> dict[str, str] | None:
    """What load_corpus should return, or None where it should raise DataError."""
    corpus: dict[str, str] = {}
    for record in records:
        doc_id = record["_id"]
        if not doc_id.strip() or doc_id in corpus:
            return None
        full = f"{record.get('title', '').strip()} {record['text'].strip()}".strip()
        if full:
            corpus[doc_id] = full
    return corpus or None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=_records, ascii_only=st.booleans())
def test_property_unicode_corpus_round_trips(tmp_path, records, ascii_only):
    path = tmp_path / "corpus.jsonl"
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=ascii_only) + "\n" for r in records), encoding="utf-8", newline=""
    )
    expected = _expected_corpus(records)
    try:
        loaded = load_corpus(path)
    except DataError:
        assert expected is None, records
    else:
        assert loaded == expected
        # Texts without surrounding whitespace load back exactly as written.
        for record in records:
            if "title" not in record and record["text"] == record["text"].strip() and record["text"]:
                assert loaded[record["_id"]] == record["text"]


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8,
)
_any_lines = st.lists(
    st.one_of(
        st.dictionaries(st.sampled_from(["_id", "title", "text", "other"]), _json_values, max_size=4).map(json.dumps),
        _json_values.map(json.dumps),
        st.text(max_size=20),
    ),
    max_size=5,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=_any_lines)
def test_property_arbitrary_lines_load_or_raise_data_error(tmp_path, lines):
    path = tmp_path / "corpus.jsonl"
    path.write_bytes("\n".join(lines).encode("utf-8"))
    try:
        corpus = load_corpus(path)
    except DataError:
        return
    assert corpus
    assert all(isinstance(k, str) and isinstance(v, str) and v for k, v in corpus.items())


# --- the shared SciFact slice fixture -------------------------------------------------------------------------


def test_scifact_slice_fixture_is_a_clean_dataset(scifact_slice, caplog):
    with caplog.at_level(logging.WARNING, logger="embeddistill.data"):
        dataset = RetrievalDataset.load(str(scifact_slice))
        train, test = dataset.qrels("train"), dataset.qrels("test")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # nothing dropped
    assert len(dataset.corpus) == 300
    assert dataset.splits() == ["test", "train"]
    assert len(train) >= 20 and len(test) >= 10
    assert set(dataset.queries) == set(train) | set(test)
    assert all(doc in dataset.corpus for judged in [*train.values(), *test.values()] for doc in judged)
