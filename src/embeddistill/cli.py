"""The ``embeddistill`` command line: ``distill``, ``evaluate``, ``generate-queries``, ``train-teacher``, ..."""

from __future__ import annotations

import argparse
import logging
import random
import sys
from pathlib import Path

from embeddistill.config import DistillConfig, add_config_arguments, config_from_args
from embeddistill.data import DataError
from embeddistill.querygen import GENERATORS

logger = logging.getLogger("embeddistill")


def _setup_logging(log_file: Path | None = None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=handlers, force=True
    )
    for noisy in ("httpx", "urllib3", "sentence_transformers", "transformers", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_distill(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    missing = [
        name
        for name, value in (
            ("--teacher (or --cross-encoder)", config.model.teacher or config.ce.cross_encoder),
            ("--dataset", config.data.dataset),
            ("--out", config.out),
        )
        if not value
    ]
    if missing:
        raise SystemExit(f"embeddistill distill: {', '.join(missing)} required (as flags or in --config)")
    from embeddistill.training import distributed

    distributed.init_from_env(config.training.device)  # under torchrun: join the process group (else a no-op)
    main_rank = distributed.is_main()
    _setup_logging(Path(config.out) / "distill.log" if main_rank else None)
    if not main_rank:
        logging.getLogger().setLevel(logging.WARNING)  # rank 0 tells the story; the other ranks only warn
    from embeddistill.evaluation.report import report_table
    from embeddistill.pipeline import distill

    summary = distill(config)
    distributed.shutdown()
    if not main_rank:
        return 0
    print(report_table(summary))
    files = ", ".join(["student/", "report.md", "metrics.json", *summary.trec_runs])
    print(f"\nwritten to {config.out}/ ({files})")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    _setup_logging()
    from embeddistill.data import RetrievalDataset
    from embeddistill.evaluation.metrics import evaluate_model

    summary = evaluate_model(
        args.model,
        RetrievalDataset.load(args.dataset),
        args.split,
        Path(args.out),
        args.metrics,
        k=args.top_k,
        trust_remote_code=args.trust_remote_code,
        reranker=args.reranker,
        rerank_depth=args.rerank_depth,
        cache_dir=args.cache_dir,
    )
    for name, value in summary["metrics"].items():
        print(f"{name}\t{value:.4f}")
    if args.reranker:
        print(f"reranked by {args.reranker} (top {args.rerank_depth}):")
        for name, value in summary["reranker"]["metrics"].items():
            print(f"{name}\t{value:.4f}")
    return 0


def cmd_train_teacher(args: argparse.Namespace) -> int:
    from embeddistill.config import TeacherTrainingConfig, apply_arguments
    from embeddistill.training.teacher_finetuning import train_dual_pooling

    config = apply_arguments(TeacherTrainingConfig(), args)
    _setup_logging(Path(config.out).parent / f"{Path(config.out).name}.log")
    _, info = train_dual_pooling(config)
    print(f"dual-pooling cross-encoder written to {config.out}/ ({info['steps']} steps, {info['train_seconds']:.0f} s)")
    return 0


def _add_train_teacher_command(commands) -> None:
    """Its flags come from :class:`TeacherTrainingConfig`'s fields, like ``distill``'s from :class:`DistillConfig`."""
    from embeddistill.config import TeacherTrainingConfig

    train = commands.add_parser(
        "train-teacher", help="fine-tune a dual-pooling cross-encoder teacher on labelled data (qrels + hard negatives)"
    )
    add_config_arguments(train, TeacherTrainingConfig())
    train.set_defaults(handler=cmd_train_teacher)


def cmd_generate_queries(args: argparse.Namespace) -> int:
    _setup_logging()
    from embeddistill.data import RetrievalDataset, write_queries_jsonl
    from embeddistill.querygen import generate_queries, make_generators

    dataset = RetrievalDataset.load(args.dataset)
    if args.split and not dataset.has_labels:  # a corpus-only folder: nothing to perturb, generate from documents
        logger.info("%s has no qrels/: no real queries to perturb (--split %s ignored)", dataset.path, args.split)
    train = dataset.split_queries(args.split) if args.split and dataset.has_labels else {}
    documents = dataset.corpus
    if 0 < args.max_documents < len(documents):  # a seeded sample: LM generation costs about a second a query
        chosen = set(random.Random(args.seed).sample(sorted(documents), args.max_documents))
        documents = {doc_id: text for doc_id, text in documents.items() if doc_id in chosen}
    lm_options = {
        "batch_size": args.lm_batch_size,
        "dtype": args.lm_dtype or None,
        "temperature": args.lm_temperature,
        "max_document_words": args.lm_max_document_words,
        "max_seconds": args.lm_max_seconds,
    }
    cache_path = Path(args.out).with_suffix(".cache.jsonl")
    generators = make_generators(args.generator, args.n, args.lm_model, cache_path, lm_options)
    made = generate_queries(generators, documents, train, args.seed)
    if "lm" in args.generator:
        from embeddistill.querygen.lm import filter_generated

        # Only LM outputs can echo the prompt or copy their document; crops are copies by design.
        lm_made = filter_generated([q for q in made if q.generator == "lm"], dataset.corpus)
        made = [q for q in made if q.generator != "lm"] + lm_made
    write_queries_jsonl(args.out, [q.to_json() for q in made])
    print(f"{len(made)} queries written to {args.out}")
    return 0


def _setup_quiet_logging() -> None:
    _setup_logging()
    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader logs every instruction set it tries


def cmd_index(args: argparse.Namespace) -> int:
    _setup_quiet_logging()
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
    _setup_quiet_logging()
    from embeddistill.data import load_queries, write_trec_run
    from embeddistill.serving.search import Searcher

    if bool(args.queries_file) == bool(args.query):
        raise SystemExit("embeddistill search: give query texts or --queries FILE (one of the two)")
    searcher = Searcher(args.index, args.model, trust_remote_code=args.trust_remote_code)
    if args.queries_file:
        run = searcher.retrieve(load_queries(args.queries_file), args.k)
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
    _setup_quiet_logging()
    import json

    from embeddistill.serving.onnx import compare_with_pytorch, export_onnx

    info = export_onnx(args.model, args.onnx, opset=args.opset)
    print(
        f"exported the query encoder of {args.model} to {args.onnx}/ ({info['exporter']} exporter, opset "
        f"{info['opset']}, {info['dimension']}-d); max abs diff on sample texts "
        f"{info['parity_max_abs_diff_sample']:.2e}"
    )
    if args.check_dataset:
        from embeddistill.data import RetrievalDataset
        from embeddistill.serving.indexing import SearchIndex

        dataset = RetrievalDataset.load(args.check_dataset)
        queries = dataset.split_queries(args.check_split) if args.check_split else dataset.queries
        index = SearchIndex.load(args.check_index) if args.check_index else None
        result = compare_with_pytorch(
            args.model, args.onnx, list(queries.values()), index=index, k=args.check_k, repeats=args.repeats
        )
        from embeddistill.runtime import environment_record

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
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    _setup_quiet_logging()
    from embeddistill.serving.http import ServiceLimits, parse_size, serve, warm_up
    from embeddistill.serving.search import Searcher

    limits = ServiceLimits(
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
        max_request_bytes=parse_size(args.max_request_bytes),
        max_queries=args.max_queries,
        max_k=args.max_k,
        max_query_chars=args.max_query_chars,
    )
    searcher = Searcher(args.index, args.model, trust_remote_code=args.trust_remote_code)
    warm_up(searcher)
    serve(searcher, args.host, args.port, limits)
    return 0


class _IntermixedArgumentParser(argparse.ArgumentParser):
    """A subcommand parser that lets options sit between positionals (``search INDEX --model M QUERY ...``)."""

    _parsing = False

    def parse_known_args(self, args=None, namespace=None):
        if self._parsing:  # parse_known_intermixed_args calls back into parse_known_args
            return super().parse_known_args(args, namespace)
        self._parsing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._parsing = False


def _add_serving_commands(commands) -> None:
    index = commands.add_parser("index", help="encode a corpus's documents and save a FAISS index folder")
    index.add_argument("--model", required=True, help="teacher or student (documents go through encode_document)")
    index.add_argument("--dataset", required=True)
    index.add_argument("--out", required=True, help="index folder (index.faiss, ids.json, info.json)")
    index.add_argument("--type", default="flat", choices=["flat", "hnsw", "ivfpq"])
    index.add_argument("--hnsw-m", type=int, default=32, help="hnsw: links per node")
    index.add_argument("--ef-construction", type=int, default=200, help="hnsw: build beam width")
    index.add_argument("--ef-search", type=int, default=128, help="hnsw: search beam width")
    index.add_argument("--nlist", type=int, default=None, help="ivfpq: coarse cells (default ~sqrt(documents))")
    index.add_argument("--pq-m", type=int, default=None, help="ivfpq: sub-quantizers (default dimension/8)")
    index.add_argument("--pq-nbits", type=int, default=None, help="ivfpq: bits per sub-quantizer code (default 8)")
    index.add_argument("--nprobe", type=int, default=None, help="ivfpq: cells searched per query (default 16)")
    index.add_argument("--seed", type=int, default=0)
    index.add_argument("--batch-size", type=int, default=32)
    index.add_argument("--cache-dir", default="", help="teacher embedding cache (default ~/.cache/embeddistill)")
    index.add_argument("--trust-remote-code", action="store_true")
    index.set_defaults(handler=cmd_index)

    search = commands.add_parser("search", help="search an index folder with a query encoder")
    search.__class__ = _IntermixedArgumentParser  # `search INDEX --model M "q one" "q two"`
    search.add_argument("index", help="index folder from `embeddistill index`")
    search.add_argument("query", nargs="*", help="query texts")
    search.add_argument("--model", required=True, help="query encoder: student, teacher or ONNX export folder")
    search.add_argument("--queries", dest="queries_file", help="query file (.jsonl _id/text or .tsv id<TAB>text)")
    search.add_argument("--k", "--top-k", type=int, default=10)
    search.add_argument("--out", help="write a TREC run file")
    search.add_argument("--tag", default="embeddistill")
    search.add_argument("--trust-remote-code", action="store_true")
    search.set_defaults(handler=cmd_search)

    export = commands.add_parser("export", help="export a model's query encoder to ONNX")
    export.add_argument("model", help="student (or any sentence-transformers model) folder or name")
    export.add_argument("--onnx", required=True, help="output folder (model.onnx, tokenizer, export_info.json)")
    export.add_argument("--opset", type=int, default=17)
    export.add_argument("--check-dataset", help="compare ONNX and PyTorch on this dataset's queries")
    export.add_argument("--check-split", default="test", help="queries of this qrels split ('' for all)")
    export.add_argument("--check-index", help="index folder: also compare the top-k documents")
    export.add_argument("--check-k", type=int, default=10)
    export.add_argument("--repeats", type=int, default=30, help="latency repeats per batch size")
    export.add_argument("--report", help="write the comparison as JSON")
    export.set_defaults(handler=cmd_export)

    serve = commands.add_parser("serve", help="serve an index over HTTP (POST /search, GET /health)")
    serve.add_argument("index", help="index folder from `embeddistill index`")
    serve.add_argument("--model", required=True, help="query encoder: student, teacher or ONNX export folder")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-batch", type=int, default=64, help="queries encoded together by the micro-batcher")
    serve.add_argument("--batch-wait-ms", type=float, default=2.0, help="how long a batch waits for more requests")
    serve.add_argument("--max-request-bytes", default="1MB", help="request body limit (413 above it)")
    serve.add_argument("--max-queries", type=int, default=256, help="queries per request")
    serve.add_argument("--max-k", type=int, default=1000)
    serve.add_argument("--max-query-chars", type=int, default=2048)
    serve.add_argument("--trust-remote-code", action="store_true")
    serve.set_defaults(handler=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="embeddistill", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    distill = commands.add_parser("distill", help="distil a teacher into a small student and evaluate both")
    distill.add_argument("--config", help="YAML config file; flags override its values")
    add_config_arguments(distill, DistillConfig())
    distill.set_defaults(handler=cmd_distill)

    evaluate = commands.add_parser("evaluate", help="evaluate any sentence-transformers model on a dataset split")
    evaluate.add_argument("model", help="model name or path (an asymmetric student uses encode_query/encode_document)")
    evaluate.add_argument("--dataset", required=True)
    evaluate.add_argument("--split", default="test")
    evaluate.add_argument("--out", default="runs/evaluate")
    evaluate.add_argument("--metrics", nargs="*", default=["nDCG@10", "RR@10", "R@100"])
    evaluate.add_argument("--top-k", type=int, default=100)
    evaluate.add_argument("--trust-remote-code", action="store_true")
    evaluate.add_argument("--reranker", default="", help="cross-encoder that reranks the model's top documents")
    evaluate.add_argument("--rerank-depth", type=int, default=100, help="documents per query the reranker rescores")
    evaluate.add_argument(
        "--cache-dir",
        default="",
        help="embedding and score caches (default: a run's own for its student/, else ~/.cache/embeddistill)",
    )
    evaluate.set_defaults(handler=cmd_evaluate)

    generate = commands.add_parser("generate-queries", help="write unlabeled training queries generated from a corpus")
    generate.add_argument("--dataset", required=True)
    generate.add_argument("--generator", nargs="+", default=["crop"], choices=list(GENERATORS))
    generate.add_argument("--n", type=int, default=1, help="queries per document (crop, lm) or per query (perturb)")
    generate.add_argument("--split", default="train", help="real queries to perturb ('' for none)")
    generate.add_argument("--lm-model", default="", help="causal LM / doc2query model name, path or .gguf file (lm)")
    generate.add_argument("--max-documents", type=int, default=0, help="generate from a seeded sample of N documents")
    generate.add_argument("--lm-batch-size", type=int, default=8, help="documents per LM generation batch")
    generate.add_argument("--lm-dtype", default="", help="LM weights dtype, e.g. bfloat16 (default: fp32 on CPU)")
    generate.add_argument("--lm-temperature", type=float, default=0.7, help="LM sampling temperature")
    generate.add_argument("--lm-max-document-words", type=int, default=200, help="document words in the LM prompt")
    generate.add_argument(
        "--lm-max-seconds", type=float, default=0, help="stop LM generation after this long (0 = no limit; resumable)"
    )
    generate.add_argument("--seed", type=int, default=42)
    generate.add_argument("--out", required=True, help="output .jsonl")
    generate.set_defaults(handler=cmd_generate_queries)
    _add_serving_commands(commands)
    _add_train_teacher_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (DataError, FileNotFoundError, ValueError) as error:
        logger.error("%s", error)
        print(f"embeddistill: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
