"""Approximate indexes against exact search: build time, search time and recall@10 of HNSW and IVF-PQ.

    python benchmarks/ann_recall.py --dataset scifact                 # writes benchmarks/results/ann_scifact.json
    python benchmarks/ann_recall.py --dataset msmarco-dl-pool         # the 30k-passage pool (slow to encode on CPU)

Document and query embeddings come from the teacher-embedding cache (encoded once, then read back), so the
numbers measure the indexes only. Recall@k is the fraction of the exact top-k that the index returns; nDCG@10 of
the approximate runs against the dataset's qrels is reported next to the exact run's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np
from _common import git_commit

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TEACHER = Path.home() / ".cache" / "embeddistill-models" / "all-MiniLM-L6-v2"


def machine() -> dict:
    """The machine part of :func:`embeddistill.runtime.environment_record`, with the Python version."""
    from embeddistill.runtime import environment_record

    record = environment_record(())
    return {**record["machine"], "python": record["versions"]["python"]}


def recall(rows: np.ndarray, exact: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(r[:k]) & set(e[:k])) / k for r, e in zip(rows, exact, strict=True)]))


def timed_search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    _, rows = index.search(queries, k)
    return rows, (time.perf_counter() - start) * 1000 / len(queries)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="scifact")
    parser.add_argument("--teacher", default=str(DEFAULT_TEACHER))
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--split", default="test", help="qrels split for nDCG@10 ('' to skip)")
    parser.add_argument("--ef-search", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--ef-construction", type=int, default=200)
    parser.add_argument("--pq-m", type=int, nargs="+", default=[48, 96])
    parser.add_argument("--nprobe", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--out", default="")
    args = parser.parse_args()

    import faiss

    from embeddistill.data import RetrievalDataset
    from embeddistill.evaluation.metrics import score_run
    from embeddistill.models.teachers import DualEncoderTeacher
    from embeddistill.serving.indexing import SearchIndex

    dataset = RetrievalDataset.load(args.dataset)
    teacher = DualEncoderTeacher.load(args.teacher)
    doc_ids = list(dataset.corpus)
    started = time.perf_counter()
    documents = teacher.embed_documents([dataset.corpus[d] for d in doc_ids], desc="corpus")
    query_ids = list(dataset.queries)
    queries = teacher.embed_queries([dataset.queries[q] for q in query_ids], desc="queries")
    embed_seconds = time.perf_counter() - started
    qrels = dataset.qrels(args.split) if args.split else {}
    judged = [i for i, q in enumerate(query_ids) if q in qrels]

    def ndcg(rows: np.ndarray) -> float | None:
        if not judged:
            return None
        # BEIR's ignore_identical_ids: a query's own id is no hit (it matters where queries are also documents).
        run = {
            query_ids[i]: {
                doc_ids[r]: float(-rank) for rank, r in enumerate(rows[i]) if r >= 0 and doc_ids[r] != query_ids[i]
            }
            for i in judged
        }
        return score_run(run, qrels, ["nDCG@10"])[0]["nDCG@10"]

    k = args.k
    results = []
    flat = SearchIndex.build(documents, doc_ids, "flat")
    exact, ms = timed_search(flat, queries, k)
    results.append(
        {
            "type": "flat",
            "params": {},
            "build_seconds": flat.info["build_seconds"],
            "search_ms_per_query": ms,
            f"recall@{k}": 1.0,
            "nDCG@10": ndcg(exact),
        }
    )
    print(f"flat: build {flat.info['build_seconds']:.2f}s, {ms:.3f} ms/query", flush=True)

    def result_row(index: SearchIndex, search_params: dict, rows: np.ndarray, ms: float) -> dict:
        return {
            "type": index.info["type"],
            "params": {**index.info["params"], **search_params},
            "build_seconds": index.info["build_seconds"],
            "search_ms_per_query": ms,
            f"recall@{k}": recall(rows, exact, k),
            "nDCG@10": ndcg(rows),
        }

    hnsw = SearchIndex.build(
        documents, doc_ids, "hnsw", m=args.hnsw_m, ef_construction=args.ef_construction, ef_search=args.ef_search[0]
    )
    for ef in args.ef_search:
        hnsw.index.hnsw.efSearch = ef
        rows, ms = timed_search(hnsw, queries, k)
        results.append(result_row(hnsw, {"ef_search": ef}, rows, ms))
        print(f"hnsw ef_search={ef}: recall@{k} {results[-1][f'recall@{k}']:.4f}, {ms:.3f} ms/query", flush=True)

    for pq_m in args.pq_m:
        if documents.shape[1] % pq_m:
            print(f"skipping pq_m={pq_m}: does not divide {documents.shape[1]}", file=sys.stderr)
            continue
        ivfpq = SearchIndex.build(documents, doc_ids, "ivfpq", pq_m=pq_m)
        for nprobe in args.nprobe:
            if nprobe > ivfpq.info["params"]["nlist"]:
                continue
            ivfpq.index.nprobe = nprobe
            rows, ms = timed_search(ivfpq, queries, k)
            results.append(
                {
                    **result_row(ivfpq, {"nprobe": nprobe}, rows, ms),
                    "bytes_per_vector": pq_m * ivfpq.info["params"]["pq_nbits"] / 8,
                }
            )
            print(
                f"ivfpq pq_m={pq_m} nlist={ivfpq.info['params']['nlist']} nprobe={nprobe}: "
                f"recall@{k} {results[-1][f'recall@{k}']:.4f}, {ms:.3f} ms/query",
                flush=True,
            )

    from embeddistill.runtime import environment_record

    report = {
        "command": "python benchmarks/ann_recall.py " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "dataset": str(dataset.path),
        "documents": len(doc_ids),
        "queries": len(query_ids),
        "dimension": int(documents.shape[1]),
        "teacher": args.teacher,
        "embedding_seconds_from_cache_or_encoding": embed_seconds,
        "k": k,
        "nDCG_split": args.split,
        "faiss_threads": faiss.omp_get_max_threads(),
        "versions": environment_record(("faiss-cpu", "numpy", "embeddistill"))["versions"],
        "machine": machine(),
        "results": results,
    }
    out = Path(args.out or REPO / "benchmarks" / "results" / f"ann_{Path(args.dataset).name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
