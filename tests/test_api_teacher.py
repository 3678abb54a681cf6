"""Black-box teachers: an OpenAI-compatible endpoint (the tool's own `serve`, on loopback, or a tiny fake server
that fails on purpose) and a teacher given as vectors; and `POST /v1/embeddings` of the service."""

from __future__ import annotations

import base64
import contextlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from test_serving import running as serving_at  # noqa: E402

from embeddistill.checks import OptionError, check_distill  # noqa: E402
from embeddistill.cli import main  # noqa: E402
from embeddistill.config import DistillConfig  # noqa: E402
from embeddistill.data import RetrievalDataset  # noqa: E402
from embeddistill.models import api_teacher  # noqa: E402
from embeddistill.models.api_teacher import ApiTeacher, BudgetExhausted, Endpoint, TeacherApiError  # noqa: E402
from embeddistill.models.teachers import DualEncoderTeacher, load_sentence_transformer  # noqa: E402
from embeddistill.serving.http import ServiceLimits, create_app  # noqa: E402
from embeddistill.serving.search import Searcher  # noqa: E402

LIMITS = ServiceLimits(max_queries=64, max_query_chars=4000, max_document_chars=20_000, max_request_bytes=2_000_000)
FAST = [
    "--epochs", "1", "--batch-size", "16", "--crops-per-document", "1", "--perturbations-per-query", "1",
    "--latency-repeats", "2", "--checkpoint-every", "0", "--threads", "2", "--learning-rate", "1e-4",
    "--max-steps", "3", "--validation-queries", "0",
]  # fmt: skip


@contextlib.contextmanager
def running(app):
    """Serve ``app`` on loopback (``test_serving.running``); yield its ``/v1`` base URL."""
    with serving_at(app) as url:
        yield f"{url}/v1"


@pytest.fixture(scope="module")
def teacher_endpoint(tiny_teacher_path):
    """The tiny teacher served without an index, as `embeddistill serve --model TEACHER` serves it."""
    with running(create_app(Searcher(None, tiny_teacher_path), LIMITS)) as url:
        yield url


def test_the_service_embeds_queries_by_default_and_documents_when_asked(teacher_endpoint, tiny_teacher_path):
    model = load_sentence_transformer(tiny_teacher_path)
    texts = ["vitamin D and bone density", "coral reef bleaching"]
    query = httpx.post(f"{teacher_endpoint}/embeddings", json={"input": texts, "model": "x"}, timeout=30).json()
    assert query["object"] == "list" and query["usage"]["prompt_tokens"] > 0
    assert [item["index"] for item in query["data"]] == [0, 1] and query["data"][0]["object"] == "embedding"
    vectors = np.array([item["embedding"] for item in query["data"]])
    np.testing.assert_allclose(vectors, model.encode_query(texts), atol=1e-5)
    body = {"input": texts[0], "input_type": "document", "encoding_format": "base64"}
    document = httpx.post(f"{teacher_endpoint}/embeddings", json=body, timeout=30).json()
    row = np.frombuffer(base64.b64decode(document["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(row, model.encode_document(texts[:1])[0], atol=1e-5)


@pytest.mark.parametrize(
    "body, message",
    [
        ({"input": "   "}, "blank"),
        ({"input": []}, "at least 1"),
        ({"input": ["q"] * 65}, "at most 64"),
        ({"input": "x" * 4001}, "a query may have at most 4000"),
        ({"input": "x" * 20_001, "input_type": "document"}, "at most 20000 characters"),
        ({"input": "q", "input_type": "passage"}, "'query' or 'document'"),
        ({"input": "q", "dimensions": 7}, "dimensions 7"),
        ({"input": [1, 2, 3]}, "string"),
    ],
)
def test_the_embeddings_endpoint_refuses_what_search_refuses(teacher_endpoint, body, message):
    answer = httpx.post(f"{teacher_endpoint}/embeddings", json=body, timeout=30)
    assert answer.status_code == 422 and message in answer.text


def test_an_index_free_service_has_no_search(teacher_endpoint):
    assert httpx.post(teacher_endpoint.replace("/v1", "/search"), json={"queries": ["q"]}).status_code == 404


def _distill(tmp_path, name, argv):
    out = tmp_path / name
    assert main(["distill", "--out", str(out), *FAST, *argv]) == 0
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
def test_a_run_through_the_served_teacher_distils_from_the_local_teachers_embeddings_and_a_rerun_sends_nothing(
    teacher_endpoint, tiny_teacher_path, tiny_student_path, scifact_slice, tmp_path
):
    cache = tmp_path / "cache"
    common = ["--dataset", str(scifact_slice), "--cache-dir", str(cache), "--student", tiny_student_path]
    api = [*common, "--teacher", teacher_endpoint, "--teacher-api-input-type", "--teacher-batch-size", "16"]
    first = _distill(tmp_path, "http", api)
    local = _distill(tmp_path, "local", [*common, "--teacher", tiny_teacher_path])
    assert first["teacher"]["nDCG@10"] == pytest.approx(local["teacher"]["nDCG@10"], abs=1e-6)
    baseline = tiny_student_path  # the student's own model as it comes, scored by both lanes alike
    assert first["baselines"][baseline]["nDCG@10"] == pytest.approx(local["baselines"][baseline]["nDCG@10"])
    counts = first["teacher_api"]
    assert counts["requests"] >= counts["texts_sent"] / 16 and counts["texts_sent"] > 300 and counts["retries"] == 0
    assert "Teacher endpoint:" in (tmp_path / "http" / "report.md").read_text()
    assert "query encoder" in (tmp_path / "http" / "student" / "README.md").read_text()
    logged = [json.loads(line) for line in (tmp_path / "http" / "train_log.jsonl").read_text().splitlines()]
    assert not any("document_em" in row for row in logged)  # trained against the teacher's documents, not its own
    served = ApiTeacher(Endpoint(api_teacher.endpoint_url(teacher_endpoint), input_type=True), cache)
    reference = DualEncoderTeacher.load(tiny_teacher_path, cache_dir=tmp_path / "local-cache")
    texts = list(RetrievalDataset.load(str(scifact_slice)).corpus.values())[:50]
    np.testing.assert_allclose(served.embed_documents(texts), reference.embed_documents(texts), atol=1e-5)
    assert served.stats.texts_sent == 0 and served.stats.cache_hits == 50
    again = _distill(tmp_path, "rerun", api)["teacher_api"]
    assert (again["requests"], again["texts_sent"]) == (0, 0) and again["cache_hits"] >= counts["texts_sent"]


class Flaky(BaseHTTPRequestHandler):
    """An embeddings endpoint that answers ``script``'s statuses in turn (then 200): vectors from the text length."""

    script: list[int] = []
    seen: list[int] = []
    in_flight = most_in_flight = 0
    lock = threading.Lock()

    def do_POST(self):  # noqa: N802 - the http.server name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with Flaky.lock:
            Flaky.in_flight += 1
            Flaky.most_in_flight = max(Flaky.most_in_flight, Flaky.in_flight)
        time.sleep(0.02)
        with Flaky.lock:
            Flaky.in_flight -= 1
        Flaky.seen.append(len(body["input"]))
        status = Flaky.script.pop(0) if Flaky.script else 200
        if self.headers.get("Authorization") == "Bearer wrong":
            status = 401
        payload = {"error": "no"} if status != 200 else {
            "data": [{"index": i, "embedding": [float(len(t)), 1.0, 0.0]} for i, t in enumerate(body["input"])]
        }  # fmt: skip
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 429:
            self.send_header("Retry-After", "0")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def flaky(monkeypatch):
    monkeypatch.setattr(api_teacher, "BACKOFF_BASE", 0.01)
    Flaky.script, Flaky.seen, Flaky.most_in_flight = [], [], 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


TEXTS = [f"text number {'x' * i}" for i in range(20)]


def test_429_and_500_are_retried_until_the_batch_comes_back(flaky, tmp_path):
    Flaky.script = [429, 500, 503]
    teacher = ApiTeacher(Endpoint(api_teacher.endpoint_url(flaky), batch_size=8, concurrency=1), tmp_path)
    vectors = teacher.embed_queries(TEXTS)
    np.testing.assert_array_equal(vectors[:, 0], [len(t) for t in TEXTS])
    assert teacher.stats.retries == 3 and teacher.stats.requests == 3 + 4  # 3 refused, the probe, 3 batches of 19
    assert teacher.stats.texts_sent == 20


def test_a_request_budget_stops_the_run_and_keeps_what_came_back(flaky, tmp_path):
    endpoint = Endpoint(api_teacher.endpoint_url(flaky), batch_size=4, concurrency=1, max_requests=3)
    with pytest.raises(BudgetExhausted, match="--teacher-max-requests 3 reached"):
        ApiTeacher(endpoint, tmp_path).embed_documents(TEXTS)
    again = ApiTeacher(Endpoint(endpoint.url, batch_size=4, concurrency=2), tmp_path)
    again.embed_documents(TEXTS)
    assert again.stats.texts_sent == 20 - 1 - 2 * 4 and again.stats.cache_hits == 9


def test_a_refused_key_and_an_unreachable_url_name_their_options(flaky, tmp_path, monkeypatch):
    monkeypatch.setenv("KEY", "wrong")
    with pytest.raises(TeacherApiError, match="--teacher-api-key-env KEY"):
        ApiTeacher(Endpoint(api_teacher.endpoint_url(flaky), api_key_env="KEY"), tmp_path).embed_queries(["q"])
    with pytest.raises(TeacherApiError, match="--teacher-api-key-env NOT_SET"):
        ApiTeacher(Endpoint("http://127.0.0.1:9/v1/embeddings", api_key_env="NOT_SET"), tmp_path)
    closed = Endpoint("http://127.0.0.1:9/v1/embeddings", retries=1)
    with pytest.raises(TeacherApiError, match="--teacher http://127.0.0.1:9/v1/embeddings: no answer after 2"):
        ApiTeacher(closed, tmp_path).embed_queries(["q"])


@pytest.mark.parametrize(
    "options, message",
    [
        ({"teacher": "http://h/v1", "student": "teacher:2"}, "lends no layers"),
        ({"teacher": "http://h/v1", "student": "s", "asymmetric": False}, "no document tower"),
        ({"teacher": "http://h/v1", "student": "s", "teacher_api_key_env": "EMBEDDISTILL_NO_SUCH"}, "is not set"),
        ({"teacher_documents": "/no/such.npy", "student": "s"}, "needs query embeddings"),
        ({"teacher_queries": "q.npy"}, "--teacher-queries needs --teacher-documents"),
        ({"teacher_documents": "d.npy", "teacher": "http://h/v1", "document_prompt": "passage: "}, "vectors are given"),
    ],
)
def test_black_box_options_that_cannot_work_are_refused_before_anything_loads(options, message):
    with pytest.raises(OptionError, match=message):
        check_distill(DistillConfig.from_dict(options))


def _write_vectors(folder, name, ids, vectors):
    np.save(folder / f"{name}.npy", vectors)
    (folder / f"{name}.ids.txt").write_text("\n".join(ids) + "\n")
    return str(folder / f"{name}.npy")


@pytest.mark.slow
def test_a_teacher_given_as_vectors_distils_like_the_local_teacher(
    tiny_teacher_path, tiny_student_path, scifact_slice, tmp_path, capsys
):
    dataset = RetrievalDataset.load(str(scifact_slice))
    model = load_sentence_transformer(tiny_teacher_path)
    doc_ids, query_ids = list(dataset.corpus), list(dataset.queries)
    docs = model.encode_document([dataset.corpus[d] for d in doc_ids])
    queries = model.encode_query([dataset.queries[q] for q in query_ids])
    argv = [
        "--dataset", str(scifact_slice), "--student", tiny_student_path, "--cache-dir", str(tmp_path / "cache"),
        "--teacher-documents", _write_vectors(tmp_path, "docs", doc_ids, docs),
        "--teacher-queries", _write_vectors(tmp_path, "queries", query_ids, queries),
    ]  # fmt: skip
    given = _distill(tmp_path, "vectors", [*argv, "--crops-per-document", "0", "--perturbations-per-query", "0"])
    local = _distill(tmp_path, "local", [*argv[:6], "--teacher", tiny_teacher_path])
    assert given["teacher"]["nDCG@10"] == pytest.approx(local["teacher"]["nDCG@10"], abs=1e-6)
    assert given["student"]["asymmetric"] and "teacher_api" not in given
    assert main(["distill", "--out", str(tmp_path / "generated"), *FAST, *argv]) == 2
    assert "generated queries need an endpoint (--teacher URL)" in capsys.readouterr().err


def test_requests_carry_the_batch_size_and_no_more_are_in_flight_than_the_concurrency(flaky, tmp_path):
    teacher = ApiTeacher(Endpoint(api_teacher.endpoint_url(flaky), batch_size=3, concurrency=2), tmp_path)
    teacher.embed_queries(TEXTS)
    assert Flaky.seen[0] == 1 and sorted(Flaky.seen[1:]) == [1, 3, 3, 3, 3, 3, 3]  # the probe, then 19 texts
    assert Flaky.most_in_flight == 2


def test_document_vectors_load_from_parquet_and_from_an_index_folder(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from embeddistill.models.vector_teacher import load_vectors
    from embeddistill.serving.indexing import SearchIndex

    ids, vectors = ["d1", "d2", "d3"], np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    pq.write_table(pa.table({"id": ids, "embedding": vectors.tolist()}), tmp_path / "docs.parquet")
    SearchIndex.build(vectors, ids, model="m").save(tmp_path / "index")
    for source in (tmp_path / "docs.parquet", tmp_path / "index"):
        loaded_ids, loaded = load_vectors(source)
        assert loaded_ids == ids
        np.testing.assert_allclose(loaded, vectors, rtol=1e-6)
    (tmp_path / "bare.npy").write_bytes(b"")
    with pytest.raises(ValueError, match="no ids file beside it"):
        load_vectors(tmp_path / "bare.npy")


def test_an_endpoint_teacher_puts_the_prompts_before_what_it_sends(tmp_path):
    sent: list[tuple[str, str]] = []

    def embed(texts, kind):
        sent.extend((kind, text) for text in texts)
        return np.full((len(texts), 4), 0.5, dtype=np.float32)

    config = DistillConfig.from_dict({"teacher": "http://h/v1", "query_prompt": "query: ", "document_prompt": "none"})
    teacher = ApiTeacher(Endpoint.of(config), tmp_path)
    teacher.client.embed = embed
    teacher.embed_queries(["coral reefs", "bone density"])
    teacher.embed_documents(["A paragraph."])
    assert [text for _, text in sent] == ["query: coral reefs", "query: bone density", "A paragraph."]
    teacher.embed_queries(["coral reefs"])  # cached under what was sent, prompt included: nothing sent again
    assert len(sent) == 3
