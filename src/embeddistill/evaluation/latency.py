"""Query-encoding latency on the CPU: the speed half of a student's report (quality is in ``metrics``)."""

from __future__ import annotations

import statistics
import time

import torch

from embeddistill.models.students import QueryEncoder


def measure_latency(
    encoders: dict[str, QueryEncoder], queries: list[str], batch_sizes: list[int], repeats: int, warmup: int = 3
) -> dict[str, dict[str, float]]:
    """Median wall-clock milliseconds per encoder to embed a batch of queries (tokenisation included).

    Every encoder is timed through the same path (tokenizer + modules on the CPU, no autograd), and the encoders
    take turns on the same batches, so a burst of load on a shared machine hits all of them alike and the ratio
    reflects the models, not the moment.
    """
    encoders = {name: encoder.to("cpu").eval() for name, encoder in encoders.items()}
    timings: dict[str, dict[str, list[float]]] = {name: {} for name in encoders}
    with torch.inference_mode():
        for batch_size in batch_sizes:
            key = f"batch{batch_size}_ms"
            for i in range(repeats + warmup):
                batch = [queries[(i * batch_size + j) % len(queries)] for j in range(batch_size)]
                for name, encoder in encoders.items():
                    start = time.perf_counter()
                    encoder(encoder.tokenize(batch))
                    if i >= warmup:
                        timings[name].setdefault(key, []).append((time.perf_counter() - start) * 1000)
    return {name: {key: statistics.median(values) for key, values in per.items()} for name, per in timings.items()}
