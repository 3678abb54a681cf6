"""``benchmarks/_speed_onnx.py``: encoders timed interleaved, in blocks of calls, on the same batches."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from _speed_onnx import interleaved  # noqa: E402


def _recording(calls: list, name: str):
    return lambda batch: calls.append((name, batch[0]))


def test_blocks_of_calls_alternate_between_encoders_on_the_same_batches():
    calls: list = []
    functions = {"a": _recording(calls, "a"), "b": _recording(calls, "b")}
    timings = interleaved(functions, ["q0", "q1", "q2", "q3", "q4"], size=1, repeats=3, block=2, warmup=1)
    # 4 calls each (1 untimed + 3 timed), two in a row per encoder, the same queries for both.
    assert calls == [
        ("a", "q0"), ("a", "q1"), ("b", "q0"), ("b", "q1"),
        ("a", "q2"), ("a", "q3"), ("b", "q2"), ("b", "q3"),
    ]  # fmt: skip
    assert set(timings) == {"a", "b"} and all(t["ms"] >= 0 for t in timings.values())


def test_a_block_of_one_is_per_call_interleaving():
    calls: list = []
    functions = {"a": _recording(calls, "a"), "b": _recording(calls, "b")}
    interleaved(functions, ["q0", "q1"], size=1, repeats=2, block=1, warmup=0)
    assert calls == [("a", "q0"), ("b", "q0"), ("a", "q1"), ("b", "q1")]
