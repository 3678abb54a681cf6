"""Query-encoding latency on the CPU: the speed half of a student's report (quality is in ``metrics``).

A result holds, per encoder, the median milliseconds of each batch size (``batch1_ms``: what the speed-ups are
computed from) and the spread of the repeats around it (``batch1_p10_ms``, ``batch1_p90_ms``): on a shared machine a
median alone hides whether the repeats agreed. This module imports nothing heavy, so the report and the run summary
can use :func:`medians` without loading torch.
"""

from __future__ import annotations

import logging
import re
import time
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from embeddistill.models.students import QueryEncoder

logger = logging.getLogger(__name__)

SPREAD_PERCENTILES = (10, 90)
_MEDIAN_KEY = re.compile(r"^batch\d+_ms$")


def medians(latency: dict[str, float]) -> dict[str, float]:
    """The median of each batch size (``batchN_ms``) of one encoder's result, without its spread keys."""
    return {key: value for key, value in latency.items() if _MEDIAN_KEY.match(key)}


def summarise(key: str, values: list[float]) -> dict[str, float]:
    """``key`` (``batchN_ms``): the median of ``values``, and their 10th and 90th percentiles beside it."""
    stem = key.removesuffix("_ms")
    summary = {key: float(np.median(values))}
    for percentile in SPREAD_PERCENTILES:
        summary[f"{stem}_p{percentile}_ms"] = float(np.percentile(values, percentile))
    return summary


def measure_latency(
    encoders: dict[str, QueryEncoder], queries: list[str], batch_sizes: list[int], repeats: int, warmup: int = 3
) -> dict[str, dict[str, float]]:
    """Wall-clock milliseconds per encoder to embed a batch of queries (tokenisation included): the median of
    ``repeats`` timings per batch size and their spread (:func:`summarise`).

    Every encoder is timed through the same path (tokenizer + modules on the CPU, no autograd), and the encoders
    take turns on the same batches, so a burst of load on a shared machine hits all of them alike and the ratio
    reflects the models, not the moment. A progress bar counts the timed batches (a teacher at batch 32 takes
    minutes on a small CPU).
    """
    import torch
    from tqdm.auto import tqdm

    encoders = {name: encoder.to("cpu").eval() for name, encoder in encoders.items()}
    timings: dict[str, dict[str, list[float]]] = {name: {} for name in encoders}
    total = len(batch_sizes) * (repeats + warmup) * len(encoders)
    logger.info(
        "CPU latency: %s, batch sizes %s, %d repeats (+%d warm-up) each",
        ", ".join(encoders),
        batch_sizes,
        repeats,
        warmup,
    )
    with torch.inference_mode(), tqdm(total=total, desc="CPU latency", unit="batch", mininterval=2) as bar:
        for batch_size in batch_sizes:
            key = f"batch{batch_size}_ms"
            bar.set_postfix_str(f"batch size {batch_size}")
            for i in range(repeats + warmup):
                batch = [queries[(i * batch_size + j) % len(queries)] for j in range(batch_size)]
                for name, encoder in encoders.items():
                    start = time.perf_counter()
                    encoder(encoder.tokenize(batch))
                    if i >= warmup:
                        timings[name].setdefault(key, []).append((time.perf_counter() - start) * 1000)
                    bar.update()
    return {
        name: {k: v for key, values in per.items() for k, v in summarise(key, values).items()}
        for name, per in timings.items()
    }
