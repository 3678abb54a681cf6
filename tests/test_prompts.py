"""Prompts end to end: which strings the teacher, the trained and saved student, its ONNX export, ``search`` and the
service tokenise, byte for byte; prompts and Matryoshka truncation in the teacher-cache key."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer
from transformers import PreTrainedTokenizerBase

from embeddistill.cli import main
from embeddistill.models.students import QueryEncoder, build_student, student_query_prompt
from embeddistill.models.teachers import DualEncoderTeacher, load_sentence_transformer, set_prompts

QUERY_PROMPT, DOCUMENT_PROMPT = "query: ", "passage: "
PROMPTS_ALONE = {QUERY_PROMPT, DOCUMENT_PROMPT, "Represent: ", "search: "}


@contextlib.contextmanager
def recorded_tokenizer_inputs():
    """Every string any Hugging Face tokenizer (or the ONNX encoder's lean call of its Rust core) is called on while
    the context lasts (in call order), but a prompt alone: sentence-transformers tokenises each prompt once by itself
    to know its length (for pooling that leaves the prompt out), which is no input of the model."""
    from embeddistill.serving.onnx_runtime import LeanTokenizer

    seen: list[str] = []
    originals = {cls: cls.__call__ for cls in (PreTrainedTokenizerBase, LeanTokenizer)}

    def recorder(original):
        def recording(self, text=None, *args, **kwargs):
            texts = [text] if isinstance(text, str) else list(text or [])
            seen.extend(t for t in texts if isinstance(t, str) and t not in PROMPTS_ALONE)
            return original(self, text, *args, **kwargs)

        return recording

    for cls, original in originals.items():
        cls.__call__ = recorder(original)
    try:
        yield seen
    finally:
        for cls, original in originals.items():
            cls.__call__ = original


@pytest.fixture(scope="module")
def prompted_teacher(tiny_teacher_path, tmp_path_factory) -> str:
    """The tiny teacher with an E5-style prompt pair in its sentence-transformers config (as a hub model has it)."""
    model = load_sentence_transformer(tiny_teacher_path)
    model.prompts = {"query": QUERY_PROMPT, "document": DOCUMENT_PROMPT, "classification": "classify: "}
    folder = tmp_path_factory.mktemp("prompted") / "prompted-teacher"
    model.save(str(folder))
    assert json.loads((folder / "config_sentence_transformers.json").read_text())["prompts"]["query"] == QUERY_PROMPT
    return str(folder)


def test_the_teacher_tokenises_its_config_prompts_and_an_override_replaces_them(prompted_teacher, cache_dir):
    teacher = DualEncoderTeacher.load(prompted_teacher, cache_dir=cache_dir)
    with recorded_tokenizer_inputs() as seen:
        teacher.embed_queries(["vitamin d"])
        teacher.embed_documents(["Bones need vitamin D."])
    assert seen == ["query: vitamin d", "passage: Bones need vitamin D."]
    assert teacher.cache.identity.prompts == {"query": QUERY_PROMPT, "document": DOCUMENT_PROMPT}

    instructed = DualEncoderTeacher.load(prompted_teacher, cache_dir=cache_dir, query_prompt="Represent: ")
    plain = DualEncoderTeacher.load(prompted_teacher, cache_dir=cache_dir, query_prompt="none", document_prompt="none")
    with recorded_tokenizer_inputs() as seen:
        instructed.embed_queries(["vitamin d"])
        plain.embed_queries(["vitamin d"])
        plain.embed_documents(["Bones need vitamin D."])
    assert seen[0] == "Represent: vitamin d"
    # without prompts the teacher takes the fast path, whose checks tokenise probe texts too: the inputs are bare
    assert {"vitamin d", "Bones need vitamin D."} <= set(seen[1:])
    assert not [text for text in seen[1:] if text.startswith((QUERY_PROMPT, DOCUMENT_PROMPT, "Represent: "))]
    # a changed prompt is another cache: nothing encoded under one prompt is reused for another
    assert len({teacher.cache.dir, instructed.cache.dir, plain.cache.dir}) == 3
    assert not np.allclose(teacher.embed_queries(["vitamin d"]), instructed.embed_queries(["vitamin d"]))


def test_matryoshka_truncation_keeps_the_first_dimensions_renormalised_and_keys_the_cache(tiny_teacher_path, cache_dir):
    full = DualEncoderTeacher.load(tiny_teacher_path, cache_dir=cache_dir)
    short = DualEncoderTeacher.load(tiny_teacher_path, cache_dir=cache_dir, truncate_dim=8)
    texts = ["vitamin d", "coral reefs"]
    whole, cut = full.embed_queries(texts), short.embed_queries(texts)
    expected = whole[:, :8] / np.linalg.norm(whole[:, :8], axis=1, keepdims=True)
    np.testing.assert_allclose(cut, expected, atol=1e-6)
    assert short.dimension == 8 and short.cache.dir != full.cache.dir
    student = build_student("teacher:2", short.model, asymmetric=True)
    assert student.encode_query(texts).shape == (2, 8) and student.encode_document(texts).shape == (2, 8)
    with pytest.raises(ValueError, match="32 dimensions"):
        DualEncoderTeacher.load(tiny_teacher_path, cache_dir=cache_dir, truncate_dim=32)


def test_auto_gives_a_teacher_n_student_the_teacher_s_query_prompt_and_another_model_none(prompted_teacher):
    teacher = load_sentence_transformer(prompted_teacher)
    set_prompts(teacher)
    assert student_query_prompt("auto", "teacher:2", teacher) == QUERY_PROMPT
    assert student_query_prompt("auto", "some/other-model", teacher) == ""
    assert student_query_prompt("none", "teacher:2", teacher) == ""
    assert student_query_prompt("search: ", "teacher:2", teacher) == "search: "
    symmetric = build_student("teacher:2", teacher, asymmetric=False, query_prompt="search: ")
    with recorded_tokenizer_inputs() as seen:
        symmetric.encode_query(["q"])
        symmetric.encode_document(["d"])  # a symmetric student was trained on plain documents
        QueryEncoder.of(symmetric).encode(["q"])
    assert seen == ["search: q", "d", "search: q"]


@pytest.fixture(scope="module")
def prompted_run(prompted_teacher, scifact_slice, tmp_path_factory):
    """``distill`` from the prompted teacher (student prompt: auto), every tokenised string recorded."""
    out = tmp_path_factory.mktemp("prompted-run") / "run"
    argv = ["distill", "--teacher", prompted_teacher, "--student", "teacher:2", "--dataset", str(scifact_slice)]
    argv += ["--out", str(out), "--cache-dir", str(out.parent / "cache"), "--max-steps", "3", "--batch-size", "16"]
    argv += ["--learning-rate", "1e-4", "--validation-queries", "20", "--latency-repeats", "1", "--threads", "2"]
    argv += ["--crops-per-document", "1", "--perturbations-per-query", "0", "--checkpoint-every", "0"]
    with recorded_tokenizer_inputs() as seen:
        assert main(argv) == 0
    return out, seen


def test_distill_tokenises_every_query_and_document_with_its_prompt_and_never_bare(prompted_run, scifact_slice):
    out, seen = prompted_run
    queries = [json.loads(line)["text"] for line in (out / "training_queries.jsonl").read_text().splitlines()]
    recorded = set(seen)
    assert {QUERY_PROMPT + q for q in queries} <= recorded  # the teacher's and the student's training inputs
    assert not recorded & set(queries)  # no query is ever tokenised without its prompt
    corpus = [json.loads(line) for line in (scifact_slice / "corpus.jsonl").read_text().splitlines()]
    documents = [f"{d['title'].strip()} {d['text'].strip()}".strip() for d in corpus]
    assert {DOCUMENT_PROMPT + d for d in documents} <= recorded and not recorded & set(documents)
    saved = json.loads((out / "student" / "config_sentence_transformers.json").read_text())
    assert saved["prompts"] == {"query": QUERY_PROMPT, "document": DOCUMENT_PROMPT}


def test_the_saved_student_its_onnx_export_search_and_the_service_tokenise_the_trained_string(
    prompted_run, scifact_slice, tmp_path
):
    pytest.importorskip("onnxruntime")
    fastapi_testclient = pytest.importorskip("fastapi.testclient")
    from embeddistill.serving.http import create_app
    from embeddistill.serving.onnx import OnnxQueryEncoder, export_onnx
    from embeddistill.serving.search import Searcher

    out, _ = prompted_run
    student_dir = str(out / "student")
    student = SentenceTransformer(student_dir)
    export_onnx(student_dir, tmp_path / "onnx")
    onnx = OnnxQueryEncoder(tmp_path / "onnx")
    with recorded_tokenizer_inputs() as seen:
        via_st = student.encode_query(["bone density"])
        via_plain_encode = student.encode(["bone density"])
        student.encode_document(["Bones need vitamin D."])
        via_onnx = onnx.encode(["bone density"])
    assert seen == ["query: bone density", "query: bone density", "passage: Bones need vitamin D.", seen[-1]]
    assert seen[-1] == "query: bone density"
    np.testing.assert_allclose(via_onnx, via_st, atol=1e-5)
    np.testing.assert_allclose(via_plain_encode, via_st, atol=1e-6)

    index_argv = ["index", "--model", student_dir, "--dataset", str(scifact_slice), "--out", str(tmp_path / "index")]
    assert main(index_argv) == 0
    with recorded_tokenizer_inputs() as seen:
        assert main(["search", str(tmp_path / "index"), "--model", student_dir, "bone density"]) == 0
        searcher = Searcher(tmp_path / "index", student_dir, check=False)
        with fastapi_testclient.TestClient(create_app(searcher)) as client:
            response = client.post("/search", json={"queries": ["bone density"], "k": 3})
    assert response.status_code == 200
    assert [s for s in seen if s != "query: dimension check"] == ["query: bone density"] * 2


def test_evaluate_sees_a_teacher_with_the_prompts_and_truncation_distill_gave_it(
    tmp_path, tiny_teacher_path, scifact_slice
):
    from embeddistill.data import RetrievalDataset
    from embeddistill.evaluation.metrics import evaluate_model

    dataset = RetrievalDataset.load(str(scifact_slice))
    options = {"metrics": ["nDCG@10"], "cache_dir": str(tmp_path / "cache")}
    plain = evaluate_model(tiny_teacher_path, dataset, "test", tmp_path / "plain", **options)
    shaped = evaluate_model(
        tiny_teacher_path, dataset, "test", tmp_path / "shaped", prompts=("query: ", ""), truncate_dim=16, **options
    )
    assert (plain["prompts"], plain["dimension"]) == ({}, 32)
    assert (shaped["prompts"], shaped["dimension"]) == ({"query": "query: "}, 16)
