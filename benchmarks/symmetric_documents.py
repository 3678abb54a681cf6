"""The document side of one symmetric training step: tokenized every step into one padded batch (as before) against
token ids cached once and embedded in sorted chunks of similar length (``training.batching.DocumentTokens``,
``training.batching.embed_by_length``).

    python benchmarks/symmetric_documents.py --out benchmarks/results/symmetric_documents.json

Samples ``--documents`` passages of a dataset's corpus (default the MS MARCO DL pool, whose lengths vary most), and
times the student's forward and backward pass over their embeddings ``--repeats`` times each way, on the CPU with
all-MiniLM-L6-v2. Records median seconds (tokenization apart), the tokens each way runs with padding, and the largest
difference between the two ways' embeddings.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import random
import statistics
import time

import numpy as np
import torch
from _common import git_commit, local_model
from sentence_transformers import SentenceTransformer

from embeddistill.data import load_corpus, resolve_dataset
from embeddistill.runtime import environment_record
from embeddistill.storage import atomic_write_json
from embeddistill.training.batching import CHUNK_TOKENS, DocumentTokens, embed_by_length, length_chunks


def read_passages(dataset: str, count: int, seed: int) -> list[str]:
    texts = list(load_corpus(resolve_dataset(dataset) / "corpus.jsonl").values())
    return random.Random(seed).sample(texts, count)


def timed(step) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    embeddings = step()
    embeddings.sum().backward()
    return time.perf_counter() - start, embeddings.detach()


def timed_tokenize(tokenizer, texts: list[str], max_length: int) -> float:
    start = time.perf_counter()
    tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default="")
    parser.add_argument("--dataset", default="msmarco-dl-pool")
    parser.add_argument("--documents", type=int, default=576, help="a 64-query batch's candidates: 64 x (1 + 8)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    student = args.student or local_model("minilm", "sentence-transformers/all-MiniLM-L6-v2")
    model = SentenceTransformer(student, device="cpu")
    tokenizer, max_length, device = model.tokenizer, model.max_seq_length, torch.device("cpu")
    texts = read_passages(args.dataset, args.documents, seed=0)
    cached = DocumentTokens(texts, tokenizer, max_length).of(range(len(texts)))
    lengths = sorted(len(ids) for ids in cached)

    features = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")

    def padded_batch() -> torch.Tensor:  # tokenization is timed apart (timed_tokenize)
        return model(dict(features))["sentence_embedding"].float()

    def sorted_chunks() -> torch.Tensor:
        return embed_by_length(model, cached, tokenizer, device)

    tokenize = [timed_tokenize(tokenizer, texts, max_length) for _ in range(args.repeats)]
    before, after, difference = [], [], 0.0
    for _ in range(args.repeats):
        model.zero_grad(set_to_none=True)
        seconds, reference = timed(padded_batch)
        before.append(seconds)
        model.zero_grad(set_to_none=True)
        seconds, embeddings = timed(sorted_chunks)
        after.append(seconds)
        difference = max(difference, float((embeddings - reference).abs().max()))
    chunk_tokens = sum((c.stop - c.start) * lengths[c.stop - 1] for c in length_chunks(lengths, CHUNK_TOKENS))
    result = {
        "command": f"python benchmarks/symmetric_documents.py --dataset {args.dataset} --documents {args.documents} "
        f"--repeats {args.repeats} --out {args.out}",
        "date": datetime.date.today().isoformat(),
        "git_commit": git_commit(),
        "student": student.rstrip("/").split("/")[-1],
        "dataset": args.dataset,
        "documents": len(texts),
        "token_lengths": {"mean": float(np.mean(lengths)), "max": lengths[-1]},
        "padded_batch": {
            "tokenize_seconds": statistics.median(tokenize),
            "forward_backward_seconds": statistics.median(before),
            "tokens_run": len(lengths) * lengths[-1],
        },
        "sorted_chunks_cached_tokens": {
            "tokenize_seconds": 0.0,  # each document is tokenized once, the first time it is a candidate
            "forward_backward_seconds": statistics.median(after),
            "tokens_run": chunk_tokens,
        },
        "speedup": (statistics.median(tokenize) + statistics.median(before)) / statistics.median(after),
        "max_abs_embedding_difference": difference,
        **environment_record(),
    }
    atomic_write_json(args.out, result)


if __name__ == "__main__":
    main()
