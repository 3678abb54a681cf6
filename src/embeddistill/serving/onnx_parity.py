"""Whether an ONNX export may stand in for the PyTorch query encoder: retrieval parity and CPU latency.

:func:`retrieval_parity` is the check an export passes before a precision is offered: nDCG@10 of the dataset's
queries (one qrels split) encoded by each ONNX model, against the documents embedded once by the model's document
side (through the teacher-embedding cache), over nDCG@10 of the PyTorch fp32 query encoder on the same documents;
a ratio below ``min_ratio`` (0.995: within 0.5%) and the precision is not offered.
:func:`compare_with_pytorch` reports embedding differences, top-k agreement and latency on a set of texts.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass

import numpy as np

from embeddistill.serving.onnx_runtime import OnnxQueryEncoder


def load_query_encoder(model):
    """The PyTorch fp32 query encoder of ``model`` (a folder, hub name or SentenceTransformer), on the CPU."""
    from embeddistill.models.students import QueryEncoder
    from embeddistill.models.teachers import load_sentence_transformer

    if isinstance(model, str | os.PathLike):
        model = load_sentence_transformer(str(model))
    return QueryEncoder.of(model).to("cpu").float().eval()


@dataclass
class ParityCheck:
    """Where and how strictly to check retrieval parity: a BEIR dataset (name or folder), its qrels split, the
    teacher-embedding cache folder for the documents (default: the run's, else the default cache)."""

    dataset: str
    split: str = "test"
    cache_dir: str | None = None
    min_ratio: float = 0.995
    metric: str = "nDCG@10"
    k: int = 100


def retrieval_parity(model, encoders: dict[str, callable], check: ParityCheck) -> dict:
    """``{"pytorch_fp32": {metric}, name: {metric, ratio_vs_fp32, passed}}`` for each ``encoders[name]`` (a function
    ``texts -> embeddings``), all searched against the same document embeddings."""
    from embeddistill.data import RetrievalDataset
    from embeddistill.evaluation.metrics import evaluate_embeddings
    from embeddistill.serving.indexing import FlatIndex
    from embeddistill.serving.search import encode_corpus

    dataset = RetrievalDataset.load(check.dataset)
    qrels = dataset.qrels(check.split)
    query_ids = [q for q in qrels if q in dataset.queries]
    texts = [dataset.queries[q] for q in query_ids]
    source = str(model) if isinstance(model, str | os.PathLike) else model
    doc_ids, documents = encode_corpus(source, dataset.corpus, check.cache_dir)
    index = FlatIndex(documents, doc_ids)
    encoders = {"pytorch_fp32": load_query_encoder(model).encode, **encoders}
    scores = {
        name: evaluate_embeddings(name, query_ids, encode(texts), index, qrels, [check.metric], check.k).metrics[
            check.metric
        ]
        for name, encode in encoders.items()
    }
    reference = scores["pytorch_fp32"]
    result = {"dataset": dataset.path.name, "split": check.split, "queries": len(texts), "metric": check.metric}
    result["pytorch_fp32"] = {check.metric: reference}
    for name, score in scores.items():
        if name != "pytorch_fp32":
            ratio = score / reference if reference > 0 else 1.0  # nothing found by either: no loss
            passed = bool(ratio >= check.min_ratio)
            result[name] = {check.metric: score, f"{check.metric}_ratio_vs_fp32": ratio, "passed": passed}
    result["min_ratio"] = check.min_ratio
    return result


def _timed_ms(name: str, function, batches: list[list[str]], warmup: int) -> dict[str, float]:
    """``{name}_ms``: the median milliseconds of ``function`` over the batches after ``warmup``; ``{name}_p10_ms``
    and ``{name}_p90_ms``: the spread of those repeats."""
    timings = []
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        function(batch)
        if i >= warmup:
            timings.append((time.perf_counter() - start) * 1000)
    low, high = np.percentile(timings, [10, 90])
    return {f"{name}_ms": statistics.median(timings), f"{name}_p10_ms": float(low), f"{name}_p90_ms": float(high)}


def compare_with_pytorch(
    model,
    onnx_dir: str | os.PathLike,
    texts: list[str],
    index=None,
    k: int = 10,
    batch_sizes: tuple[int, ...] = (1, 32),
    repeats: int = 30,
    warmup: int = 3,
    precision: str | None = None,
) -> dict:
    """Parity and CPU latency of the ONNX export against the PyTorch query encoder on ``texts``.

    Parity: max abs difference of the embeddings and, given a :class:`~embeddistill.serving.indexing.SearchIndex`,
    how many queries get the identical top-``k`` list (same ids, same order). Latency: median milliseconds per
    batch and the p10/p90 of the repeats, tokenisation included for both, ONNX Runtime with as many threads as torch.
    """
    import torch

    encoder = load_query_encoder(model)
    threads = torch.get_num_threads()
    runtime = OnnxQueryEncoder(onnx_dir, threads=threads, precision=precision)
    reference = encoder.encode(texts, batch_size=32)
    exported = runtime.encode(texts, batch_size=32)
    difference = np.abs(reference - exported)
    result: dict = {
        "queries": len(texts),
        "max_abs_diff": float(difference.max()),
        "mean_abs_diff": float(difference.mean()),
        "min_cosine": float(
            np.min(
                (reference * exported).sum(1)
                / (np.linalg.norm(reference, axis=1) * np.linalg.norm(exported, axis=1) + 1e-12)
            )
        ),
    }
    if index is not None:
        torch_top = [[d for d, _ in hits] for hits in index.ranked(reference, k)]
        onnx_top = [[d for d, _ in hits] for hits in index.ranked(exported, k)]
        identical = sum(a == b for a, b in zip(torch_top, onnx_top, strict=True))
        result[f"identical_top{k}"] = identical
        result[f"identical_top{k}_fraction"] = identical / len(texts)
        result[f"top{k}_set_overlap"] = float(
            np.mean([len(set(a) & set(b)) / max(1, len(a)) for a, b in zip(torch_top, onnx_top, strict=True)])
        )
    latency = {}
    with torch.inference_mode():
        for size in batch_sizes:
            batches = [[texts[(i * size + j) % len(texts)] for j in range(size)] for i in range(repeats + warmup)]
            timed = _timed_ms("pytorch", lambda b: encoder(encoder.tokenize(b)), batches, warmup)
            timed |= _timed_ms("onnxruntime", lambda b: runtime.run(runtime.tokenize(b)), batches, warmup)
            latency[f"batch{size}"] = {**timed, "speedup": timed["pytorch_ms"] / timed["onnxruntime_ms"]}
    result["latency"] = latency
    result["threads"] = threads
    result["precision"] = runtime.precision
    result["repeats"] = repeats
    return result
