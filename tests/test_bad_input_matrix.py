"""The bad-input matrix of docs/RELIABILITY.md: the cases not already covered in test_data.py, test_config.py and
test_teacher_cache.py. Each one ends in a clear error (file, line where there is one, problem), a counted warning,
or - for a huge document - a normal result; CLI cases exit with status 2 and ``embeddistill: error: ...``.
The last tests check that nothing loaded can execute code: no pickle, ``trust_remote_code`` off unless asked.
"""

from __future__ import annotations

import ast
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest

import embeddistill
from embeddistill import cli
from embeddistill.config import DistillConfig
from embeddistill.data import DataError, RetrievalDataset, load_corpus, load_qrels, load_queries
from embeddistill.storage import atomic_save_npy, text_key

SRC = Path(embeddistill.__file__).resolve().parent

CORPUS = [
    {"_id": "d1", "title": "Coral reefs", "text": "Reefs bleach when the water stays warm for weeks."},
    {"_id": "d2", "title": "", "text": "Vitamin D supplements and the bone density of older adults."},
    {"_id": "d3", "text": "Sorting in Python is stable: equal items keep their order."},
    {"_id": "d4", "text": "Mice that lack the gene develop tumors in the brain."},
]
QUERIES = [
    {"_id": "q1", "text": "why do reefs bleach"},
    {"_id": "q2", "text": "is python sort stable"},
    {"_id": "q3", "text": "vitamin d bones"},
]


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_beir(root: Path, corpus=None, queries=None, qrels: dict | None = None) -> Path:
    """A small valid BEIR folder; any file's content (str or bytes) may be replaced."""
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    files = {
        root / "corpus.jsonl": jsonl(CORPUS) if corpus is None else corpus,
        root / "queries.jsonl": jsonl(QUERIES) if queries is None else queries,
    }
    qrels = {"train": "query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td3\t1\n", "test": "q3\td2\t1\n"} | (qrels or {})
    files.update({root / "qrels" / f"{split}.tsv": content for split, content in qrels.items()})
    for path, content in files.items():
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8", newline="")
    return root


@pytest.fixture(autouse=True)
def _quiet_cli(monkeypatch):
    """``cmd_distill`` reconfigures the root logger (a log file, stderr): keep pytest's capture intact."""
    monkeypatch.setattr(cli, "_setup_logging", lambda *args, **kwargs: None)


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    status = cli.main(list(argv))
    return status, capsys.readouterr().err


def distill_args(dataset: Path, out: Path, teacher: str = "/nonexistent/teacher", *extra: str) -> list[str]:
    return ["distill", "--teacher", teacher, "--dataset", str(dataset), "--out", str(out), "--device", "cpu", *extra]


# --- queries.jsonl: the corpus cases of test_data.py, for queries ---------------------------------------------


@pytest.mark.parametrize(
    "record, problem",
    [
        ({"text": "no id"}, "missing field '_id'"),
        ({"_id": "q9"}, "missing field 'text'"),
        ({"_id": "q9", "text": None}, "missing field 'text'"),
        ({"_id": "q9", "text": 42}, "field 'text' must be a string, got int"),
        ({"_id": "q9", "text": {"en": "x"}}, "field 'text' must be a string, got dict"),
        ({"_id": ["q9"], "text": "x"}, "field '_id' must be a string, got list"),
    ],
)
def test_bad_query_record_names_file_and_line(tmp_path, record, problem):
    path = tmp_path / "queries.jsonl"
    path.write_text(jsonl(QUERIES[:2] + [record]), encoding="utf-8")
    with pytest.raises(DataError) as error:
        load_queries(path)
    assert str(error.value) == f"{path}:3: {problem}"


def test_malformed_json_in_queries_via_cli(tmp_path, capsys):
    queries = jsonl(QUERIES[:1]) + '{"_id": "q2", "text": "unterminated}\n' + jsonl(QUERIES[2:])
    root = write_beir(tmp_path / "bad", queries=queries)
    status, err = run_cli(capsys, *distill_args(root, tmp_path / "out"))
    assert status == 2
    assert f"embeddistill: error: {root / 'queries.jsonl'}:2: malformed JSON" in err


# --- empty files ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content", ["", "\n\n  \n", "\ufeff"])
def test_empty_corpus_file(tmp_path, content):
    root = write_beir(tmp_path / "empty", corpus=content)
    with pytest.raises(DataError, match=r"corpus\.jsonl: the corpus holds no documents"):
        RetrievalDataset.load(str(root))


@pytest.mark.parametrize("content", ["", "\r\n\r\n", jsonl([{"_id": "q1", "text": "  "}])])
def test_empty_queries_file(tmp_path, content):
    root = write_beir(tmp_path / "empty", queries=content)
    with pytest.raises(DataError, match=r"queries\.jsonl: the file holds no queries"):
        RetrievalDataset.load(str(root))


@pytest.mark.parametrize("content", ["", "query-id\tcorpus-id\tscore\n"])
def test_empty_qrels_file(tmp_path, content):
    dataset = RetrievalDataset.load(str(write_beir(tmp_path / "empty", qrels={"test": content})))
    with pytest.raises(DataError, match=r"test\.tsv: no usable judgements"):
        dataset.qrels("test")


# --- qrels scores and splits ---------------------------------------------------------------------------------


@pytest.mark.parametrize("score", ["inf", "-inf", "1e999", "nan", "1,5", "0x1"])
def test_non_finite_or_odd_qrels_score(tmp_path, score):
    """``int(float("inf"))`` raises OverflowError, not ValueError: it must still be a DataError with the line."""
    path = tmp_path / "qrels.tsv"
    path.write_text(f"query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t{score}\n", encoding="utf-8")
    with pytest.raises(DataError) as error:
        load_qrels(path)
    assert str(error.value) == f"{path}:3: relevance score {score!r} is not a number"


@pytest.mark.parametrize("flag, split", [("--eval-split", "dev"), ("--train-split", "training")])
def test_missing_qrels_split_via_cli(tmp_path, capsys, flag, split):
    root = write_beir(tmp_path / "toy")
    status, err = run_cli(capsys, *distill_args(root, tmp_path / "out"), flag, split)
    assert status == 2
    assert f"{root / 'qrels' / (split + '.tsv')}: no qrels for split {split!r}" in err
    assert "['test', 'train']" in err


# --- encodings -----------------------------------------------------------------------------------------------


def test_utf16_file_is_rejected_at_line_1(tmp_path):
    """A file saved as "Unicode" by Windows tools is UTF-16: it must fail on line 1, not load as garbage."""
    root = write_beir(tmp_path / "utf16", corpus=jsonl(CORPUS).encode("utf-16"))
    with pytest.raises(DataError) as error:
        load_corpus(root / "corpus.jsonl")
    assert str(error.value).startswith(f"{root / 'corpus.jsonl'}:1: not valid UTF-8")


@pytest.mark.parametrize("name", ["queries.jsonl", "qrels/test.tsv"])
def test_undecodable_bytes_in_queries_and_qrels(tmp_path, name):
    root = write_beir(tmp_path / "latin1")
    path = root / name
    bad_line = b"q\xe9\td1\t1\n" if name.endswith(".tsv") else b'{"_id": "q\xe9", "text": "caf\xe9"}\n'
    path.write_bytes(path.read_bytes() + bad_line)
    with pytest.raises(DataError) as error:
        RetrievalDataset.load(str(root)).qrels("test")
    lines = len(path.read_bytes().splitlines())
    assert str(error.value).startswith(f"{path}:{lines}: not valid UTF-8")


# --- a huge document -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_5mb_document_loads_and_is_truncated_by_the_tokenizer(tmp_path, tiny_teacher_path, cache_dir):
    words = ["coral", "reefs", "bleach", "in", "warm", "water", "and", "vitamin", "d", "helps", "bone", "density"]
    huge = " ".join(words[i % len(words)] for i in range(5_000_000 // 5))
    assert len(huge) > 5_000_000
    root = write_beir(tmp_path / "huge", corpus=jsonl(CORPUS + [{"_id": "huge", "text": huge}]))
    corpus = RetrievalDataset.load(str(root)).corpus
    assert corpus["huge"] == huge  # loaded whole: truncation is the tokenizer's job

    from embeddistill.models.teachers import DualEncoderTeacher

    teacher = DualEncoderTeacher.load(tiny_teacher_path, cache_dir=cache_dir)
    assert teacher.model.max_seq_length == 64
    prefix = " ".join(huge.split(" ", 300)[:300])  # far more than 64 tokens: the same first 64 as the whole
    embeddings = teacher.embed_documents([corpus["huge"], prefix])
    assert embeddings.shape == (2, 32) and np.isfinite(embeddings).all()
    np.testing.assert_allclose(embeddings[0], embeddings[1], atol=1e-5)


# --- query files in the wrong format --------------------------------------------------------------------------


def test_tsv_rows_in_a_jsonl_query_file(tmp_path):
    path = tmp_path / "extra.jsonl"
    path.write_text("g1\twhat is coral\ng2\twhy reefs bleach\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{path}:1: malformed JSON"):
        load_queries(path)


def test_pretty_printed_json_query_file(tmp_path):
    """A ``.json`` file is read as JSON lines: a pretty-printed array fails on its first line, not later."""
    path = tmp_path / "extra.json"
    path.write_text(json.dumps(QUERIES, indent=2), encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{path}:1: malformed JSON"):
        load_queries(path)


def test_id_to_text_mapping_query_file(tmp_path):
    path = tmp_path / "extra.json"
    path.write_text(json.dumps({"q1": "why do reefs bleach", "q2": "vitamin d"}), encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{path}:1: missing field '_id'"):
        load_queries(path)


@pytest.mark.parametrize(
    "name, content, problem",
    [
        ("extra.tsv", jsonl(QUERIES), r"extra\.tsv:1: expected 'id<TAB>text'"),
        ("extra.csv", "q1,why do reefs bleach\n", r"extra\.csv: unknown query file format '\.csv'"),
        ("missing.jsonl", None, r"missing\.jsonl: file not found"),
    ],
)
def test_wrong_extra_query_file_via_cli(tmp_path, capsys, name, content, problem):
    path = tmp_path / name
    if content is not None:
        path.write_text(content, encoding="utf-8")
    root = write_beir(tmp_path / "toy")
    status, err = run_cli(capsys, *distill_args(root, tmp_path / "out"), "--extra-queries", str(path))
    assert status == 2
    assert "embeddistill: error: " in err
    assert re.search(problem, err), err


# --- models and caches that are not there or do not match ----------------------------------------------------


def test_nonexistent_teacher_path_via_cli(tmp_path, capsys):
    root = write_beir(tmp_path / "toy")
    status, err = run_cli(capsys, *distill_args(root, tmp_path / "out", "/nonexistent/teacher-model"))
    assert status == 2
    assert "embeddistill: error: model path '/nonexistent/teacher-model' does not exist" in err


def test_nonexistent_model_for_evaluate_via_cli(tmp_path, capsys):
    root = write_beir(tmp_path / "toy")
    status, err = run_cli(capsys, "evaluate", "./no/such/model", "--dataset", str(root), "--out", str(tmp_path))
    assert status == 2
    assert "model path './no/such/model' does not exist" in err


def test_nonexistent_dataset_via_cli(tmp_path, capsys):
    status, err = run_cli(capsys, *distill_args(tmp_path / "no-such-dataset", tmp_path / "out"))
    assert status == 2
    assert f"dataset '{tmp_path / 'no-such-dataset'}' not found" in err


def _cache_folder(tiny_teacher_path: str, cache_dir: Path) -> Path:
    from embeddistill.models.teachers import DualEncoderTeacher

    teacher = DualEncoderTeacher.load(tiny_teacher_path, cache_dir=cache_dir)
    teacher.embed_documents([CORPUS[0]["text"]])
    return teacher.cache.dir


def test_cache_manifest_of_other_settings_via_cli(tmp_path, capsys, tiny_teacher_path, cache_dir):
    folder = _cache_folder(tiny_teacher_path, cache_dir)
    manifest = folder / "manifest.json"
    stored = json.loads(manifest.read_text())
    stored["teacher"]["max_seq_length"] = 512
    stored["teacher"]["dimension"] = 768
    manifest.write_text(json.dumps(stored))
    root = write_beir(tmp_path / "toy")
    args = distill_args(root, tmp_path / "out", tiny_teacher_path, "--cache-dir", str(cache_dir))
    status, err = run_cli(capsys, *args)
    assert status == 2
    assert f"embeddistill: error: {manifest}: teacher identity does not match" in err
    assert "(dimension, max_seq_length differ)" in err


@pytest.mark.parametrize("content", ['{"teacher": {"name": "x", "weig', "[]", '{"format": 1}', ""])
def test_unreadable_cache_manifest_names_the_file(tiny_teacher_path, cache_dir, content):
    from embeddistill.models.teachers import DualEncoderTeacher

    manifest = _cache_folder(tiny_teacher_path, cache_dir) / "manifest.json"
    manifest.write_text(content)
    with pytest.raises(ValueError, match="unreadable cache manifest") as error:
        DualEncoderTeacher.load(tiny_teacher_path, cache_dir=cache_dir)
    assert str(error.value).startswith(f"{manifest}: ")


def test_cache_shard_of_another_dimension_is_dropped_and_reencoded(tiny_teacher_path, cache_dir, caplog):
    """A shard copied in from another teacher (right keys and checksum, wrong width) must not be served."""
    from embeddistill.models.teachers import DOCUMENT, DualEncoderTeacher

    folder = _cache_folder(tiny_teacher_path, cache_dir)
    texts = [record["text"] for record in CORPUS[1:]]
    checksum = atomic_save_npy(folder / "shards" / "00099.npy", np.ones((len(texts), 16), dtype=np.float32))
    keys = [text_key(f"{DOCUMENT}\0{text}") for text in texts]
    (folder / "shards" / "00099.json").write_text(json.dumps({"keys": keys, "sha256": checksum}))

    with caplog.at_level(logging.WARNING, logger="embeddistill.models.teachers"):
        teacher = DualEncoderTeacher.load(tiny_teacher_path, cache_dir=cache_dir)
    assert len(teacher.cache) == 1  # only the genuine shard
    assert [r.getMessage() for r in caplog.records if "00099" in r.getMessage() and "shape" in r.getMessage()]
    embeddings = teacher.embed_documents(texts)
    assert embeddings.shape == (len(texts), 32)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)


# --- nothing loaded executes code ------------------------------------------------------------------------------


class _Refused(OSError):
    pass


@pytest.fixture
def captured_sentence_transformer(monkeypatch) -> list[dict]:
    """Replace ``SentenceTransformer`` in teachers.py by a stub that records its arguments, then refuses."""
    calls: list[dict] = []

    def stub(name_or_path, **kwargs):
        calls.append({"name": name_or_path, **kwargs})
        raise _Refused("offline test stub")

    monkeypatch.setattr("embeddistill.models.teachers.SentenceTransformer", stub)
    return calls


def test_trust_remote_code_is_off_by_default_for_the_teacher(tmp_path, capsys, captured_sentence_transformer):
    assert DistillConfig().model.trust_remote_code is False
    root = write_beir(tmp_path / "toy")
    status, err = run_cli(capsys, *distill_args(root, tmp_path / "out", "some-org/some-teacher"))
    assert status == 2 and "could not load model 'some-org/some-teacher'" in err
    expected = {"name": "some-org/some-teacher", "device": "cpu", "trust_remote_code": False}
    assert captured_sentence_transformer == [expected]

    status, _ = run_cli(capsys, *distill_args(root, tmp_path / "out2", "some-org/some-teacher"), "--trust-remote-code")
    assert status == 2
    assert captured_sentence_transformer[-1]["trust_remote_code"] is True  # only when asked


def test_trust_remote_code_is_off_by_default_for_evaluate_and_students(tmp_path, capsys, captured_sentence_transformer):
    root = write_beir(tmp_path / "toy")
    status, _ = run_cli(capsys, "evaluate", "some-org/model", "--dataset", str(root), "--out", str(tmp_path / "e"))
    assert status == 2
    from embeddistill.models.students import build_student

    class NoModules:
        _modules: dict = {}

    with pytest.raises(FileNotFoundError):
        build_student("some-org/student", NoModules(), asymmetric=True)  # the default, as the pipeline's config
    assert [call["trust_remote_code"] for call in captured_sentence_transformer] == [False, False]


def test_trust_remote_code_is_off_by_default_for_the_query_lm(monkeypatch):
    transformers = pytest.importorskip("transformers")
    from embeddistill.querygen.lm import LMQueryGenerator

    calls: list[dict] = []

    class RecordingAutoConfig:
        @staticmethod
        def from_pretrained(source, **kwargs):
            calls.append({"source": source, **kwargs})
            raise _Refused("offline test stub")

    monkeypatch.setattr(transformers, "AutoConfig", RecordingAutoConfig)
    with pytest.raises(_Refused):
        LMQueryGenerator("some-org/some-lm")._load()
    assert calls == [{"source": "some-org/some-lm", "trust_remote_code": False}]


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}


def unsafe_loads(source: str, filename: str = "<src>") -> list[str]:
    """Imports of pickle-like modules and calls that can run code while loading a file, in ``source``."""
    problems = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            problems += [f"{where}: imports {m}" for m in modules if m.split(".")[0] in PICKLE_MODULES]
        if not isinstance(node, ast.Call):
            continue
        name, keywords = _dotted(node.func), {k.arg: k.value for k in node.keywords}

        def is_true(key: str, keywords=keywords) -> bool:
            value = keywords.get(key)
            return isinstance(value, ast.Constant) and value.value is True

        if name.split(".")[-1] == "load" and name.split(".")[0] == "torch" and not is_true("weights_only"):
            problems.append(f"{where}: {name}( without weights_only=True")
        if (
            name in ("np.load", "numpy.load")
            and "allow_pickle" in keywords
            and not (isinstance(keywords["allow_pickle"], ast.Constant) and keywords["allow_pickle"].value is False)
        ):
            problems.append(f"{where}: {name}( with allow_pickle")
        if name in ("yaml.load", "yaml.load_all", "yaml.unsafe_load", "yaml.full_load"):
            problems.append(f"{where}: {name}( (use yaml.safe_load)")
        if name in ("eval", "exec"):
            problems.append(f"{where}: {name}(")
        if is_true("trust_remote_code"):
            problems.append(f"{where}: trust_remote_code=True hard-coded")
    return problems


def test_unsafe_load_checker_catches_what_it_should():
    bad = (
        "import pickle\nfrom dill import loads\nimport torch\nimport numpy as np\nimport yaml\n"
        "torch.load(f)\ntorch.load(f, weights_only=False)\ntorch.serialization.load(f)\n"
        "np.load(f, allow_pickle=True)\nyaml.load(s)\neval(s)\nAutoModel.from_pretrained(p, trust_remote_code=True)\n"
    )
    assert len(unsafe_loads(bad)) == 9
    good = "import torch\nimport numpy as np\ntorch.load(f, weights_only=True)\nnp.load(f, allow_pickle=False)\n"
    assert unsafe_loads(good + "yaml.safe_load(s)\nf(trust_remote_code=trust)\n") == []


def test_no_pickle_and_no_unsafe_loads_in_src():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) >= 10, SRC
    problems = [p for path in files for p in unsafe_loads(path.read_text(encoding="utf-8"), str(path))]
    assert problems == []
    # The plain-text form the issue asks for, too: every ``torch.load(`` names weights_only=True on its line.
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            assert "torch.load(" not in line or "weights_only=True" in line, f"{path}:{number}"
            assert not line.lstrip().startswith(("import pickle", "from pickle")), f"{path}:{number}"
