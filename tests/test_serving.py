"""The search service on a real uvicorn server on a loopback port, and the model card."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from embeddistill.evaluation.model_card import write_model_card  # noqa: E402
from embeddistill.pipeline.summary import RunSummary  # noqa: E402
from embeddistill.serving.http import ServiceLimits, create_app, parse_size  # noqa: E402

LIMITS = ServiceLimits(
    max_batch=16, batch_wait_ms=20, max_request_bytes=20_000, max_queries=8, max_k=50, max_query_chars=300
)


@contextlib.contextmanager
def running(app):
    """Serve ``app`` with uvicorn in a thread on a free loopback port; yield the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def searcher(tiny_teacher_path, scifact_slice, tmp_path_factory):
    from embeddistill.cli import main
    from embeddistill.models.students import build_student
    from embeddistill.models.teachers import load_sentence_transformer
    from embeddistill.serving.search import Searcher

    folder = tmp_path_factory.mktemp("serve")
    index_args = ["index", "--model", tiny_teacher_path, "--dataset", str(scifact_slice)]
    assert main([*index_args, "--out", str(folder / "index"), "--cache-dir", str(folder / "cache")]) == 0
    student = build_student("teacher:2", load_sentence_transformer(tiny_teacher_path), asymmetric=True)
    student.save(str(folder / "student"))
    return Searcher(folder / "index", str(folder / "student"))


@pytest.fixture(scope="module")
def service(searcher):
    app = create_app(searcher, LIMITS)
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client, app


QUERIES = ["vitamin D and bone density", "coral reef bleaching", "tumour suppressor genes in mice"]


@pytest.mark.slow
def test_health_and_openapi(service, searcher):
    client, _ = service
    health = client.get("/health")
    assert health.status_code == 200
    body = health.json()
    assert body["status"] == "ok" and body["documents"] == 300 and body["dimension"] == 32
    assert body["limits"]["max_queries"] == 8
    # Local models by folder name only: any client may ask, where the files lie on the server is not its business.
    assert body["query_model"] == "student" and body["index_model"] == "tiny-teacher"
    spec = client.get("/openapi.json").json()
    assert "/search" in spec["paths"] and "/health" in spec["paths"]
    request_schema = json.dumps(spec["components"]["schemas"])
    assert '"maxItems": 8' in request_schema and '"maximum": 50' in request_schema


@pytest.mark.slow
def test_search_matches_searcher(service, searcher):
    client, _ = service
    response = client.post("/search", json={"queries": QUERIES, "k": 5})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["k"] == 5 and [r["query"] for r in body["results"]] == QUERIES
    expected = searcher.search(QUERIES, k=5)
    for result, hits in zip(body["results"], expected, strict=True):
        assert [h["id"] for h in result["hits"]] == [h.id for h in hits]
        assert [h["score"] for h in result["hits"]] == pytest.approx([h.score for h in hits], abs=1e-5)
    default_k = client.post("/search", json={"queries": QUERIES[:1]}).json()
    assert len(default_k["results"][0]["hits"]) == 10


@pytest.mark.slow
def test_concurrent_requests_are_micro_batched(service, searcher):
    client, app = service
    batcher = app.app.state.batcher
    before_batches, before_queries = batcher.batches, batcher.batched_queries
    texts = [f"{QUERIES[i % 3]} {i}" for i in range(24)]
    expected = searcher.search(texts, k=3)

    def ask(i):
        return client.post("/search", json={"queries": [texts[i]], "k": 3}).json()["results"][0]["hits"]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(24)))
    for hits, reference in zip(answers, expected, strict=True):
        assert [h["id"] for h in hits] == [h.id for h in reference]
    assert batcher.batched_queries - before_queries == 24
    assert batcher.batches - before_batches < 24  # several requests shared an encoding


@pytest.mark.slow
@pytest.mark.parametrize(
    ("payload", "status", "message"),
    [
        (b'{"queries": ["a", ', 422, "JSON"),
        (b'["not", "an", "object"]', 422, ""),
        (json.dumps({"queries": []}).encode(), 422, "at least 1"),
        (json.dumps({"queries": ["q"] * 9}).encode(), 422, "at most 8"),
        (json.dumps({"queries": ["q"], "k": 51}).encode(), 422, "less than or equal to 50"),
        (json.dumps({"queries": ["q"], "k": 0}).encode(), 422, "greater than or equal to 1"),
        (json.dumps({"queries": ["x" * 301]}).encode(), 422, "at most 300 characters"),
        (json.dumps({"queries": [""]}).encode(), 422, "at least 1 character"),
        (json.dumps({"queries": ["q", " \t\n "]}).encode(), 422, "the query is blank"),
        (json.dumps({"queries": ["\u200b\u00a0"]}).encode(), 422, "the query is blank"),  # invisible only
        (b'{"queries": ["\\ud800"]}', 422, "valid string"),  # a lone surrogate: a 422, not a 500
        (json.dumps({"queries": ["q"], "k": True}).encode(), 422, "valid integer"),
        (json.dumps({"queries": ["q"], "k": "3"}).encode(), 422, "valid integer"),
        (json.dumps({"queries": [3]}).encode(), 422, "valid string"),
        (json.dumps({"queries": ["q"], "extra": 1}).encode(), 422, "Extra inputs"),
    ],
)
def test_bad_requests(service, payload, status, message):
    client, _ = service
    response = client.post("/search", content=payload, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert message in response.text


@pytest.mark.slow
def test_a_422_echoes_only_the_start_of_a_huge_input_and_says_its_length(service):
    client, _ = service
    response = client.post("/search", json={"queries": ["x" * 15_000]})  # under the 20 kB body limit
    assert response.status_code == 422 and "at most 300 characters" in response.text
    assert len(response.content) < 1000
    echoed = response.json()["detail"][0]["input"]
    assert echoed.startswith("x" * 200) and "15000 characters" in echoed
    too_many = client.post("/search", json={"queries": ["y" * 250] * 60})  # 60 queries, the limit is 8
    assert too_many.status_code == 422 and "at most 8" in too_many.text and len(too_many.content) < 1000


@pytest.mark.slow
def test_oversize_body_is_413(service):
    client, _ = service
    big = json.dumps({"queries": ["x" * 200] * 150}).encode()  # 30 kB > 20 kB
    response = client.post("/search", content=big, headers={"content-type": "application/json"})
    assert response.status_code == 413 and "20000 bytes" in response.json()["detail"]
    # chunked (no Content-Length): the limit holds on the bytes received
    chunked = client.post(
        "/search",
        content=iter([big[:10_000], big[10_000:20_000], big[20_000:]]),
        headers={"content-type": "application/json"},
    )
    assert chunked.status_code == 413
    assert client.get("/health").status_code == 200  # the service is still up


def test_parse_size():
    assert parse_size("1MB") == 1_000_000 and parse_size("512KiB") == 524_288 and parse_size("2000") == 2000
    with pytest.raises(ValueError):
        parse_size("lots")
    with pytest.raises(ValueError):
        ServiceLimits(max_batch=0)


@pytest.mark.slow
def test_serve_command(searcher, tmp_path):
    """`embeddistill serve` in a subprocess: binds loopback, answers /health and /search, stops on SIGTERM."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    index_dir = os.fspath(tmp_path / "index")
    searcher.index.save(index_dir)
    command = [
        sys.executable,
        "-m",
        "embeddistill.cli",
        "serve",
        index_dir,
        "--model",
        searcher.model_name,
        "--port",
        str(port),
        "--max-request-bytes",
        "10KB",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 45
        while True:
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, "embeddistill serve did not come up"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        hits = httpx.post(f"{url}/search", json={"queries": ["vitamin D"], "k": 2}, timeout=10).json()
        assert [h["id"] for h in hits["results"][0]["hits"]] == [h.id for h in searcher.search(["vitamin D"], 2)[0]]
        assert httpx.post(f"{url}/search", content=b"x" * 10_001, timeout=10).status_code == 413
    finally:
        process.terminate()
        process.wait(15)


METRICS_JSON = {
    "dataset": "/data/scifact",
    "eval_split": "test",
    "eval_queries": 300,
    "teacher": {
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "nDCG@10": 0.645,
        "R@100": 0.925,
        "latency": {"batch1_ms": 16.1, "batch32_ms": 591.1},
        "query_encoder_parameters": 22713216,
    },
    "student": {
        "model": "teacher:2",
        "asymmetric": True,
        "nDCG@10": 0.443,
        "R@100": 0.852,
        "latency": {"batch1_ms": 10.2, "batch32_ms": 169.7},
        "query_encoder_parameters": 15615360,
    },
    "retention": {"nDCG@10": 0.6863, "R@100": 0.9211},
    "speedup": {"batch1": 1.589, "batch32": 3.483},
    "training_queries": {"labelled": 809, "extra": 0, "generated": 11834},
    "training": {"steps": 198, "resumed_from_step": 0, "train_seconds": 207.5, "temperatures": [0.05, 0.05]},
    "timings": {
        "teacher_cache_seconds": 0.4,
        "train_seconds": 207.5,
        "evaluation_seconds": 11.7,
        "total_seconds": 222.7,
    },
    "environment": {"embeddistill": "0.1.0", "torch": "2.13.0", "threads": 1},
}
SUMMARY = RunSummary.from_dict(METRICS_JSON)


def test_model_card(tmp_path):
    student_dir = tmp_path / "run" / "student"
    student_dir.mkdir(parents=True)
    config = {
        "model": {"teacher": "sentence-transformers/all-MiniLM-L6-v2", "student": "teacher:2"},
        "loss": {
            "score_weight": 1.0,
            "query_em_weight": 1.0,
            "document_em_weight": 1.0,
            "label_weight": 0.0,
            "hard_negatives": 8,
            "hard_negative_depth": 50,
            "em_distance": "l2",
        },
    }
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(config))
    path = write_model_card(student_dir, SUMMARY)
    text = path.read_text()
    assert path == student_dir / "README.md" and text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["library_name"] == "sentence-transformers" and meta["pipeline_tag"] == "sentence-similarity"
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert meta["tags"] == ["sentence-transformers", "embeddistill", "distillation", "feature-extraction"]
    assert "| nDCG@10 | 0.6450 | 0.4430 | 68.6% |" in text and "| 32 | 591.10 | 169.70 | 3.48x |" in text
    assert "query embedding matching: weight 1.0" in text and "label loss" not in text
    assert "document embedding matching" not in text  # asymmetric: the document tower is the teacher's
    assert "809 labelled" in text and "asymmetric" in text and "hard_negative_depth: 50" in text
    with pytest.raises(FileNotFoundError):
        write_model_card(tmp_path / "missing", SUMMARY)
    local = RunSummary.from_dict(
        {**METRICS_JSON, "teacher": {**METRICS_JSON["teacher"], "model": "/hf/models--org--teacher-x/snapshots/abc"}}
    )
    assert "base_model: org/teacher-x" in write_model_card(student_dir, local).read_text()
    assert "base_model: mine/t" in write_model_card(student_dir, local, base_model="mine/t").read_text()
