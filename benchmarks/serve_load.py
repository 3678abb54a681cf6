"""A bounded load test of `embeddistill serve` on loopback: the student vs the teacher as query encoder.

    python benchmarks/serve_load.py                       # writes benchmarks/results/serve.json
    python benchmarks/serve_load.py --requests 2000 --concurrency 16 --rounds 3 --student-onnx runs/student-onnx
    python benchmarks/serve_load.py --student-onnx runs/student-onnx --student-onnx-int8 runs/student-onnx-int8 \
        --teacher-onnx runs/teacher-onnx          # teacher and student in the same backend (ONNX Runtime fp32)

Both services search the same index (the teacher's SciFact document embeddings, exact inner product); only the
query encoder differs. For each, a fresh `embeddistill serve` process is started on a free loopback port, warmed
up, and sent a fixed number of single-query requests from a fixed number of concurrent clients (SciFact test
queries, cycled); it then stops by itself. Reported: throughput, p50/p99/mean latency and the micro-batcher's mean
batch size. The load generator runs on the same machine as the server, so they share the CPU cores.

``vs_teacher`` compares every service with the PyTorch teacher; ``same_backend`` compares each student with the
teacher in the same backend and precision (PyTorch with PyTorch, ONNX Runtime fp32 with the teacher's ONNX fp32
export; the int8 student against the teacher's fp32 export, marked as such).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import git_commit

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TEACHER = Path.home() / ".cache" / "embeddistill-models" / "all-MiniLM-L6-v2"
WORK = REPO / "runs" / "serve-bench"


def machine() -> dict:
    """The machine part of :func:`embeddistill.runtime.environment_record`, with the Python version."""
    from embeddistill.runtime import environment_record

    record = environment_record(())
    return {**record["machine"], "python": record["versions"]["python"]}


def ensure_index(teacher: str, dataset_name: str, folder: Path) -> Path:
    """The teacher's flat index of the dataset (document embeddings from the teacher cache)."""
    if (folder / "info.json").exists():
        return folder
    from embeddistill.data import RetrievalDataset
    from embeddistill.models.teachers import DualEncoderTeacher
    from embeddistill.serving.indexing import SearchIndex

    dataset = RetrievalDataset.load(dataset_name)
    embeddings = DualEncoderTeacher.load(teacher).embed_documents(list(dataset.corpus.values()), desc="corpus")
    index = SearchIndex.build(embeddings, list(dataset.corpus), "flat", model=teacher)
    index.info["dataset"] = str(dataset.path)
    index.save(folder)
    return folder


def ensure_student(teacher: str, given: str) -> tuple[str, str]:
    """(student folder, how it was obtained)."""
    if given:
        return given, "given"
    trained = REPO / "runs" / "quickstart" / "student"
    if (trained / "modules.json").exists():
        return str(trained), "distilled (runs/quickstart/student)"
    folder = WORK / "student-teacher2-untrained"
    if not (folder / "modules.json").exists():
        from embeddistill.models.students import build_student
        from embeddistill.models.teachers import load_sentence_transformer

        build_student("teacher:2", load_sentence_transformer(teacher), asymmetric=True).save(str(folder))
    return str(folder), "built with build_student('teacher:2') and not trained (same cost as a trained one)"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def load(url: str, texts: list[str], requests: int, concurrency: int, k: int) -> tuple[list[float], float]:
    import httpx

    latencies: list[float] = []
    counter = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def worker():
            for i in counter:
                start = time.perf_counter()
                response = await client.post("/search", json={"queries": [texts[i % len(texts)]], "k": k})
                response.raise_for_status()
                latencies.append((time.perf_counter() - start) * 1000)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return latencies, wall


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def bench_one(name: str, model: str, index: Path, texts: list[str], args) -> dict:
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        sys.executable,
        "-m",
        "embeddistill.cli",
        "serve",
        str(index),
        "--model",
        model,
        "--port",
        str(port),
        "--max-batch",
        str(args.max_batch),
        "--batch-wait-ms",
        str(args.batch_wait_ms),
    ]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"{name} server exited: {server.stderr.read()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} server did not start in 180 s")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        asyncio.run(load(url, texts, args.warmup, args.concurrency, args.k))
        before = httpx.get(f"{url}/health").json()
        latencies, wall = asyncio.run(load(url, texts, args.requests, args.concurrency, args.k))
        after = httpx.get(f"{url}/health").json()
    finally:
        server.terminate()
        server.wait(30)
    batches = after["batches"] - before["batches"]
    result = {
        "query_model": model,
        "requests": len(latencies),
        "wall_seconds": wall,
        "throughput_rps": len(latencies) / wall,
        "latency_ms": {
            "p50": percentile(latencies, 50),
            "p99": percentile(latencies, 99),
            "mean": statistics.fmean(latencies),
            "max": max(latencies),
        },
        "mean_batch_size": (after["batched_queries"] - before["batched_queries"]) / batches if batches else None,
    }
    print(
        f"{name}: {result['throughput_rps']:.1f} req/s, p50 {result['latency_ms']['p50']:.1f} ms, "
        f"p99 {result['latency_ms']['p99']:.1f} ms, mean batch {result['mean_batch_size']:.1f}",
        flush=True,
    )
    return result


def summarise(runs: list[dict]) -> dict:
    """Median over rounds of every number, plus the rounds themselves."""
    summary = {
        "query_model": runs[0]["query_model"],
        "throughput_rps": statistics.median(r["throughput_rps"] for r in runs),
        "latency_ms": {q: statistics.median(r["latency_ms"][q] for r in runs) for q in runs[0]["latency_ms"]},
        "mean_batch_size": statistics.median(r["mean_batch_size"] or 0 for r in runs),
        "rounds": runs,
    }
    return summary


def _ratios(student: dict, teacher: dict) -> dict:
    return {
        "throughput_ratio": student["throughput_rps"] / teacher["throughput_rps"],
        "p50_speedup": teacher["latency_ms"]["p50"] / student["latency_ms"]["p50"],
        "p99_speedup": teacher["latency_ms"]["p99"] / student["latency_ms"]["p99"],
    }


def same_backend(results: dict) -> dict:
    """Each student against the teacher served by the same backend (see the module docstring)."""
    pairs = {
        "pytorch_fp32": ("student", "teacher"),
        "onnx_fp32": ("student_onnx", "teacher_onnx"),
        "onnx_int8_vs_teacher_onnx_fp32": ("student_onnx_int8", "teacher_onnx"),
    }
    return {name: _ratios(results[s], results[t]) for name, (s, t) in pairs.items() if s in results and t in results}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default=str(DEFAULT_TEACHER))
    parser.add_argument("--student", default="", help="student folder (default runs/quickstart/student, else built)")
    parser.add_argument("--student-onnx", default="", help="also serve this ONNX export of the student")
    parser.add_argument("--student-onnx-int8", default="", help="also serve this int8 ONNX export of the student")
    parser.add_argument("--teacher-onnx", default="", help="also serve this ONNX (fp32) export of the teacher")
    parser.add_argument("--dataset", default="scifact")
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--warmup", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the report gives medians")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--batch-wait-ms", type=float, default=2.0)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "serve.json"))
    args = parser.parse_args()

    from embeddistill.data import RetrievalDataset
    from embeddistill.runtime import environment_record

    dataset = RetrievalDataset.load(args.dataset)
    texts = list(dataset.split_queries("test").values())
    index = ensure_index(args.teacher, args.dataset, WORK / f"index-{Path(args.dataset).name}")
    student, student_origin = ensure_student(args.teacher, args.student)
    services = {"student": student, "teacher": args.teacher}
    extra = {"student_onnx": args.student_onnx, "student_onnx_int8": args.student_onnx_int8}
    services |= {name: folder for name, folder in {**extra, "teacher_onnx": args.teacher_onnx}.items() if folder}
    # Rounds interleave the services, so that a change in the machine's load (shared cores) hits all of them.
    rounds: dict[str, list[dict]] = {name: [] for name in services}
    for round_number in range(args.rounds):
        for name, model in services.items():
            rounds[name].append(bench_one(f"round {round_number + 1} {name}", model, index, texts, args))
    results = {name: summarise(runs) for name, runs in rounds.items()}
    results["student"]["origin"] = student_origin
    report = {
        "command": "python benchmarks/serve_load.py " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "setup": {
            "index": str(index),
            "documents": json.loads((index / "info.json").read_text())["count"],
            "index_type": "flat",
            "requests": args.requests,
            "rounds": args.rounds,
            "warmup_requests": args.warmup,
            "concurrency": args.concurrency,
            "queries_per_request": 1,
            "k": args.k,
            "max_batch": args.max_batch,
            "batch_wait_ms": args.batch_wait_ms,
            "note": "load generator and server share the machine's cores (loopback)",
        },
        "results": results,
        "vs_teacher": {
            name: {
                "throughput_ratio": results[name]["throughput_rps"] / results["teacher"]["throughput_rps"],
                "p50_speedup": results["teacher"]["latency_ms"]["p50"] / results[name]["latency_ms"]["p50"],
                "p99_speedup": results["teacher"]["latency_ms"]["p99"] / results[name]["latency_ms"]["p99"],
            }
            for name in results
            if name != "teacher"
        },
        "same_backend": same_backend(results),
        "git_commit": git_commit(),
        "versions": environment_record(
            (
                "embeddistill",
                "torch",
                "sentence-transformers",
                "transformers",
                "faiss-cpu",
                "fastapi",
                "uvicorn",
                "httpx",
            )
        )["versions"],
        "machine": machine(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
