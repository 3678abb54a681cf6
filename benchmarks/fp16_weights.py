"""How much storing the teacher's weights in fp16 changes its embeddings (the GPU runs carried them that way).

    python benchmarks/fp16_weights.py --out benchmarks/results/fp16_weights.json

Encodes the first 128 SciFact documents (title + text, 256 tokens) with the teacher as it is and with every weight
rounded to fp16 and back to fp32, on the CPU in fp32, and records the cosine and largest absolute difference.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import logging

import torch
from _common import git_commit, local_model
from sentence_transformers import SentenceTransformer

from embeddistill.data import resolve_dataset
from embeddistill.runtime import environment_record
from embeddistill.storage import atomic_write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="")
    parser.add_argument("--documents", type=int, default=128)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    teacher = args.teacher or local_model("mpnet", "sentence-transformers/all-mpnet-base-v2")
    with open(resolve_dataset("scifact") / "corpus.jsonl", encoding="utf-8") as corpus:
        rows = [json.loads(line) for line in itertools.islice(corpus, args.documents)]
    texts = [f"{row['title']} {row['text']}" for row in rows]
    model = SentenceTransformer(teacher, device="cpu")
    model.max_seq_length = 256
    original = model.encode(texts, batch_size=32, convert_to_tensor=True, normalize_embeddings=True)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.half().float())
    rounded = model.encode(texts, batch_size=32, convert_to_tensor=True, normalize_embeddings=True)
    cosine = (original * rounded).sum(dim=1)
    atomic_write_json(
        args.out,
        {
            "command": f"python benchmarks/fp16_weights.py --out {args.out}",
            "date": datetime.date.today().isoformat(),
            "git_commit": git_commit(),
            "teacher": teacher.rstrip("/").split("/")[-1],
            "documents": len(texts),
            "min_cosine": float(cosine.min()),
            "mean_cosine": float(cosine.mean()),
            "max_abs_difference": float((original - rounded).abs().max()),
            **environment_record(),
        },
    )


if __name__ == "__main__":
    main()
