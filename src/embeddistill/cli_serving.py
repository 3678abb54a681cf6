"""The serving commands of the command line: ``index``, ``search``, ``export`` and ``serve``."""

from __future__ import annotations

import argparse
import sys

from embeddistill.console import IntermixedArgumentParser, add_command, at_least, setup_logging


def cmd_index(args: argparse.Namespace) -> int:
    setup_logging()
    from embeddistill.data import RetrievalDataset
    from embeddistill.serving.indexing import SearchIndex
    from embeddistill.serving.search import encode_corpus

    dataset = RetrievalDataset.load(args.dataset)
    ids, embeddings = encode_corpus(
        args.model, dataset.corpus, args.cache_dir or None, args.batch_size, trust_remote_code=args.trust_remote_code
    )
    params = {
        "flat": {},
        "hnsw": {"m": args.hnsw_m, "ef_construction": args.ef_construction, "ef_search": args.ef_search},
        "ivfpq": {"nlist": args.nlist, "pq_m": args.pq_m, "pq_nbits": args.pq_nbits, "nprobe": args.nprobe},
    }[args.type]
    index = SearchIndex.build(embeddings, ids, args.type, model=args.model, seed=args.seed, **params)
    index.info["dataset"] = str(dataset.path)
    index.save(args.out)
    info = index.info
    print(
        f"{info['type']} index of {info['count']} documents ({info['dimension']}-d, {info['metric']}) built in "
        f"{info['build_seconds']:.1f} s, saved to {args.out}/"
    )
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    setup_logging()
    from embeddistill.data import load_queries, write_trec_run
    from embeddistill.serving.search import Searcher

    if bool(args.queries_file) == bool(args.query):
        raise SystemExit("embeddistill search: give query texts or --queries FILE (one of the two)")
    searcher = Searcher(args.index, args.model, trust_remote_code=args.trust_remote_code)
    if args.queries_file:
        run = searcher.retrieve(
            load_queries(args.queries_file), args.k, ignore_identical_ids=not args.keep_identical_ids
        )
        if args.out:
            write_trec_run(args.out, run, tag=args.tag)
            print(f"{len(run)} queries searched; run written to {args.out}")
        else:
            for query_id, hits in run.items():
                for rank, (doc_id, score) in enumerate(hits.items(), 1):
                    print(f"{query_id}\t{rank}\t{doc_id}\t{score:.4f}")
        return 0
    results = searcher.search(args.query, args.k)
    if args.out:
        run = {str(i): dict(hits) for i, hits in enumerate(results, 1)}
        write_trec_run(args.out, run, tag=args.tag)
    for number, (text, hits) in enumerate(zip(args.query, results, strict=True), 1):
        print(f"query {number}: {text}")
        for rank, hit in enumerate(hits, 1):
            print(f"  {rank:>3}  {hit.score:.4f}  {hit.id}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    setup_logging()
    from embeddistill.extras import require

    require("serve", "onnx", "onnxruntime", purpose="embeddistill export")  # before the model is loaded
    from embeddistill.serving.onnx import ParityCheck, export_onnx

    parity = None
    if args.check_dataset and args.check_split:
        parity = ParityCheck(args.check_dataset, args.check_split, args.cache_dir or None, args.min_ndcg_ratio)
    info = export_onnx(
        args.model,
        args.onnx,
        opset=args.opset,
        int8=args.int8,
        per_channel=args.per_channel,
        reduce_range=args.reduce_range,
        parity=parity,
    )
    print(
        f"exported the query encoder of {args.model} to {args.onnx}/ ({info['exporter']} exporter, opset "
        f"{info['opset']}, {info['dimension']}-d); max abs diff on sample texts "
        f"{info['parity_max_abs_diff_sample']:.2e}"
    )
    for name, entry in info["precisions"].items():
        ratio = entry.get("nDCG@10_ratio_vs_fp32")
        state = {True: "offered", False: "NOT offered", None: "unchecked"}[entry["offered"]]
        print(f"  {name}: {entry['file']}, {state}" + (f", nDCG@10 {ratio:.4f} of PyTorch fp32" if ratio else ""))
    print(f"  default precision: {info['default_precision']}")
    if args.check_dataset:
        _export_comparison(args, info)
    return 0


def _export_comparison(args: argparse.Namespace, info: dict) -> None:
    """``export --check-dataset``: embeddings, top-k and latency of the export's default precision against PyTorch."""
    import json

    from embeddistill.data import RetrievalDataset
    from embeddistill.runtime import environment_record
    from embeddistill.serving.indexing import SearchIndex
    from embeddistill.serving.onnx import compare_with_pytorch

    dataset = RetrievalDataset.load(args.check_dataset)
    queries = dataset.split_queries(args.check_split) if args.check_split else dataset.queries
    index = SearchIndex.load(args.check_index) if args.check_index else None
    result = compare_with_pytorch(
        args.model, args.onnx, list(queries.values()), index=index, k=args.check_k, repeats=args.repeats
    )
    result = {
        "command": "embeddistill " + " ".join(sys.argv[1:]),
        "machine": environment_record(())["machine"],
        "model": args.model,
        "dataset": str(dataset.path),
        "split": args.check_split,
        "export": info,
        **result,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "export"}, indent=2))
    if args.report:
        from embeddistill.storage import atomic_write_json

        atomic_write_json(args.report, result)


def cmd_serve(args: argparse.Namespace) -> int:
    setup_logging()
    from embeddistill.extras import require

    require("serve", "fastapi", "uvicorn", "pydantic", purpose="embeddistill serve")  # before the model is loaded
    from embeddistill.serving.http import ServiceLimits, parse_size, serve, warm_up
    from embeddistill.serving.search import Searcher

    limits = ServiceLimits(
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
        max_request_bytes=parse_size(args.max_request_bytes),
        max_queries=args.max_queries,
        max_k=args.max_k,
        max_query_chars=args.max_query_chars,
        max_document_chars=args.max_document_chars,
    )
    searcher = Searcher(args.index or None, args.model, trust_remote_code=args.trust_remote_code)
    warm_up(searcher)
    serve(searcher, args.host, args.port, limits)
    return 0


def add_serving_commands(commands) -> None:
    _add_index(commands)
    _add_search(commands)
    _add_export(commands)
    _add_serve(commands)


def _add_index(commands) -> None:
    index = add_command(
        commands,
        "index",
        "encode a corpus's documents and save a FAISS index folder",
        "Encode every document of a BEIR corpus with a model's document encoder (a student's is its teacher's) "
        "and save a FAISS index folder for 'search' and 'serve'. Teacher embeddings are cached.",
    )
    index.add_argument("--model", required=True, help="teacher or student (documents go through encode_document)")
    index.add_argument("--dataset", required=True, help="BEIR folder whose corpus is indexed")
    index.add_argument("--out", required=True, help="index folder (index.faiss, ids.json, info.json)")
    index.add_argument(
        "--type", default="flat", choices=["flat", "hnsw", "ivfpq"], help="exact (flat) or approximate index"
    )
    index.add_argument("--hnsw-m", type=at_least(2), default=32, help="hnsw: links per node")
    index.add_argument("--ef-construction", type=at_least(1), default=200, help="hnsw: build beam width")
    index.add_argument("--ef-search", type=at_least(1), default=128, help="hnsw: search beam width")
    index.add_argument("--nlist", type=at_least(1), default=None, help="ivfpq: coarse cells (default ~sqrt(documents))")
    index.add_argument("--pq-m", type=at_least(1), default=None, help="ivfpq: sub-quantizers (default dimension/8)")
    index.add_argument(
        "--pq-nbits", type=at_least(1), default=None, help="ivfpq: bits per sub-quantizer code (default 8)"
    )
    index.add_argument("--nprobe", type=at_least(1), default=None, help="ivfpq: cells searched per query (default 16)")
    index.add_argument("--seed", type=int, default=0, help="seed of the ivfpq training sample")
    index.add_argument("--batch-size", type=at_least(1), default=32, help="documents encoded together")
    index.add_argument(
        "--cache-dir",
        default="",
        help="teacher embedding cache (default: a run's own for its student/, else ~/.cache/embeddistill)",
    )
    index.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow models that execute code from their repository (off unless asked)",
    )
    index.set_defaults(handler=cmd_index)


def _add_search(commands) -> None:
    search = add_command(
        commands,
        "search",
        "search an index folder with a query encoder",
        "Search an index folder with query texts given on the command line or a query file (--queries); print the "
        "hits or write a TREC run (--out).",
    )
    search.__class__ = IntermixedArgumentParser  # `search INDEX --model M "q one" "q two"`
    search.add_argument("index", help="index folder from 'embeddistill index'")
    search.add_argument("query", nargs="*", help="query texts")
    search.add_argument("--model", required=True, help="query encoder: student, teacher or ONNX export folder")
    search.add_argument("--queries", dest="queries_file", help="query file (.jsonl _id/text or .tsv id<TAB>text)")
    search.add_argument("--k", "--top-k", type=at_least(1), default=10, help="hits per query")
    search.add_argument("--out", help="write a TREC run file")
    search.add_argument("--tag", default="embeddistill", help="run tag in the TREC file")
    search.add_argument(
        "--keep-identical-ids",
        action="store_true",
        help="--queries: count a document whose id is the query's own id as a hit (default: dropped, as in BEIR)",
    )
    search.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow models that execute code from their repository (off unless asked)",
    )
    search.set_defaults(handler=cmd_search)


def _add_export(commands) -> None:
    export = add_command(
        commands,
        "export",
        "export a model's query encoder to ONNX",
        "Export a model's query encoder (tokenizer included) to an ONNX folder that 'search' and 'serve' accept as "
        "--model, and optionally compare it with PyTorch on a dataset's queries. Needs embeddistill[serve].",
    )
    export.add_argument("model", help="student (or any sentence-transformers model) folder or name")
    export.add_argument("--onnx", required=True, help="output folder (model.onnx, tokenizer, export_info.json)")
    export.add_argument("--opset", type=at_least(7), default=17, help="ONNX opset version")
    export.add_argument(
        "--int8", action="store_true", help="also export an int8 model (dynamic quantisation), offered if it passes"
    )
    export.add_argument(
        "--per-channel",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="int8: one weight scale per output channel (else one per tensor)",
    )
    export.add_argument(
        "--reduce-range",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="int8: 7-bit weights (x86 CPUs without VNNI saturate 8-bit products)",
    )
    export.add_argument(
        "--check-dataset",
        help="check retrieval parity (nDCG@10 vs PyTorch fp32) on this dataset before offering each precision, and "
        "compare ONNX and PyTorch on its queries",
    )
    export.add_argument(
        "--min-ndcg-ratio", type=at_least(0.0, float), default=0.995, help="parity: least nDCG@10 ratio offered"
    )
    export.add_argument("--cache-dir", default="", help="teacher-embedding cache for the check's documents")
    export.add_argument("--check-split", default="test", help="queries of this qrels split ('' for all)")
    export.add_argument("--check-index", help="index folder: also compare the top-k documents")
    export.add_argument("--check-k", type=at_least(1), default=10, help="top-k documents compared with --check-index")
    export.add_argument("--repeats", type=at_least(1), default=30, help="latency repeats per batch size")
    export.add_argument("--report", help="write the comparison as JSON")
    export.set_defaults(handler=cmd_export)


def _add_serve(commands) -> None:
    serve = add_command(
        commands,
        "serve",
        "serve an index over HTTP (POST /search, POST /v1/embeddings, GET /health)",
        "Serve an index folder over HTTP: POST /search with query texts, GET /health. Queries from concurrent "
        "requests are encoded together (micro-batching). POST /v1/embeddings answers OpenAI-compatible embedding "
        'requests (query side; "input_type": "document" for the document side). Without an index folder the '
        "model is served for /v1/embeddings alone. Needs embeddistill[serve].",
    )
    serve.add_argument(
        "index", nargs="?", default="", help="index folder from 'embeddistill index' (none: embeddings only)"
    )
    serve.add_argument("--model", required=True, help="query encoder: student, teacher or ONNX export folder")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    serve.add_argument("--port", type=at_least(0), default=8000, help="TCP port")
    serve.add_argument(
        "--max-batch", type=at_least(1), default=64, help="queries encoded together by the micro-batcher"
    )
    serve.add_argument(
        "--batch-wait-ms", type=at_least(0.0, float), default=2.0, help="how long a batch waits for more requests"
    )
    serve.add_argument("--max-request-bytes", default="1MB", help="request body limit (413 above it)")
    serve.add_argument("--max-queries", type=at_least(1), default=256, help="queries per request")
    serve.add_argument("--max-k", type=at_least(1), default=1000, help="largest k a request may ask for")
    serve.add_argument("--max-query-chars", type=at_least(1), default=2048, help="longest query text accepted")
    serve.add_argument(
        "--max-document-chars", type=at_least(1), default=100_000, help="/v1/embeddings: longest document accepted"
    )
    serve.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow models that execute code from their repository (off unless asked)",
    )
    serve.set_defaults(handler=cmd_serve)
