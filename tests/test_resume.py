"""``kill -9`` in real processes, then a rerun: nothing is lost and the result equals an uninterrupted run's.

Three long phases are interrupted with SIGKILL at a moment chosen by polling the files the child writes:

* teacher caching (``embeddistill distill``): killed once the first cache shard exists, rerun as is;
* training (``embeddistill distill --checkpoint-every 5``): killed once a checkpoint exists, rerun with ``--resume``;
* LM query generation (``embeddistill generate-queries --generator lm``): killed once rows are cached, rerun.

Every run is compared with one uninterrupted run of the same settings in a fresh folder (and a fresh cache). The
children run single-threaded and training is deterministic on a CPU, so metrics, training log and final weights
must be identical, not merely close. The teacher cache uses 8-text shards (``$EMBEDDISTILL_CACHE_SHARD_SIZE``) so
that there are many to be interrupted between.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from functools import cached_property
from pathlib import Path

import pytest

from embeddistill import cli
from embeddistill.models.teachers import SHARD_SIZE_ENV

SHARD_SIZE = 8
TIMEOUT = 300  # seconds per child process; a run takes a few

DISTILL_SETTINGS = [
    "--student", "teacher:2", "--epochs", "2", "--batch-size", "8", "--checkpoint-every", "5",
    "--crops-per-document", "1", "--perturbations-per-query", "1", "--max-generated", "100", "--hard-negatives", "2",
    "--hard-negative-depth", "10", "--latency-repeats", "1", "--latency-batch-sizes", "1",
    "--device", "cpu", "--threads", "1", "--seed", "13",
]  # fmt: skip


def _flat(record: dict) -> dict:
    """A train_log.jsonl record with a label-free check's scores lifted to the top level (pytest.approx is flat)."""
    record = dict(record)
    scores = record.pop("validation", {})
    return {**record, **scores}


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    env[SHARD_SIZE_ENV] = str(SHARD_SIZE)
    return env


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "embeddistill.cli", *args]


def tail(log: Path, chars: int = 4000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else "(no output)"


class Child:
    """A CLI run in the background (the uninterrupted baselines run beside the interrupted runs: 2 cores)."""

    def __init__(self, args: list[str], log: Path):
        self.log = log
        with open(log, "ab") as handle:
            self.process = subprocess.Popen(command(*args), env=child_env(), stdout=handle, stderr=subprocess.STDOUT)

    def wait(self) -> None:
        try:
            status = self.process.wait(timeout=TIMEOUT)
        finally:
            self.stop()
        assert status == 0, tail(self.log)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def run_to_end(args: list[str], log: Path) -> None:
    Child(args, log).wait()


def run_and_kill(args: list[str], log: Path, moment: Callable[[], bool]) -> None:
    """Run the CLI and SIGKILL it as soon as ``moment()`` holds; fail if it ends on its own first."""
    with open(log, "ab") as handle:
        process = subprocess.Popen(command(*args), env=child_env(), stdout=handle, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + TIMEOUT
            while not moment():
                if process.poll() is not None:
                    ended = f"the child ended (status {process.returncode}) before the moment to kill it:\n"
                    pytest.fail(ended + tail(log))
                if time.monotonic() > deadline:
                    pytest.fail("the moment to kill never came:\n" + tail(log))
                time.sleep(0.005)
            os.kill(process.pid, signal.SIGKILL)
            assert process.wait(timeout=60) == -signal.SIGKILL
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


def flat(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in flat(item, f"{prefix}{key}.").items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in flat(item, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): value}


def deterministic_metrics(out: Path) -> dict:
    """metrics.json without what a rerun may change: timings, latency, the resume point."""
    summary = json.loads((out / "metrics.json").read_text())
    volatile = ("latency", "speedup", "timings", "environment", "train_seconds", "resumed_from_step")
    return {k: v for k, v in flat(summary).items() if not any(part in volatile for part in k.split("."))}


def assert_same_metrics(out: Path, baseline: Path) -> None:
    got, expected = deterministic_metrics(out), deterministic_metrics(baseline)
    assert got.keys() == expected.keys()
    assert "student.nDCG@10" in got and "teacher.nDCG@10" in got and "training.steps" in got
    numbers = {k for k, v in expected.items() if isinstance(v, float)}
    assert {k: got[k] for k in numbers} == pytest.approx({k: expected[k] for k in numbers}, abs=1e-6, nan_ok=True)
    assert {k: v for k, v in got.items() if k not in numbers} == {k: v for k, v in expected.items() if k not in numbers}


def checkpoint_state(out: Path) -> dict:
    return json.loads((out / "checkpoint" / "state.json").read_text())


def final_weights_checksum(out: Path) -> str:
    state = checkpoint_state(out)
    return state["sha256"][state["files"][0]]


def train_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def shard_metas(cache: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in cache.glob("*/shards/*.json")}


class DistillRuns:
    """Distillation runs on the SciFact slice with the tiny teacher; the uninterrupted baseline runs once."""

    def __init__(self, root: Path, teacher: str, dataset: Path):
        self.root, self.teacher, self.dataset = root, teacher, dataset
        baseline_args = self.args(root / "baseline", root / "baseline-cache")
        self.baseline_run = Child(baseline_args, root / "baseline.log")  # runs beside the first interrupted run

    def args(self, out: Path, cache: Path, *extra: str) -> list[str]:
        paths = ["--teacher", self.teacher, "--dataset", str(self.dataset), "--out", str(out)]
        return ["distill", *paths, "--cache-dir", str(cache), *DISTILL_SETTINGS, *extra]

    @cached_property
    def baseline(self) -> Path:
        self.baseline_run.wait()
        return self.root / "baseline"

    @cached_property
    def killed_in_training(self) -> tuple[Path, Path]:
        """An output folder and cache left by a kill -9 during training, after at least one checkpoint."""
        out, cache = self.root / "killed-in-training", self.root / "killed-in-training-cache"

        def checkpointed() -> bool:
            try:
                return checkpoint_state(out)["step"] > 0
            except (OSError, ValueError, KeyError):
                return False

        run_and_kill(self.args(out, cache), self.root / "killed-in-training.log", checkpointed)
        return out, cache


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_teacher_path, scifact_slice):
    runs = DistillRuns(tmp_path_factory.mktemp("resume"), tiny_teacher_path, scifact_slice)  # starts the baseline
    yield runs
    runs.baseline_run.stop()


def test_cache_shard_size_env_var(monkeypatch, tiny_teacher_path, cache_dir):
    from embeddistill.models.teachers import DualEncoderTeacher, cache_shard_size

    monkeypatch.delenv(SHARD_SIZE_ENV, raising=False)
    assert cache_shard_size() == 2048
    for bad in ("0", "-3", "2.5", "many"):
        monkeypatch.setenv(SHARD_SIZE_ENV, bad)
        with pytest.raises(ValueError, match=SHARD_SIZE_ENV):
            cache_shard_size()
    monkeypatch.setenv(SHARD_SIZE_ENV, "3")
    teacher = DualEncoderTeacher.load(tiny_teacher_path, cache_dir=cache_dir)
    teacher.embed_documents([f"document number {i}" for i in range(7)])
    assert len(list((teacher.cache.dir / "shards").glob("*.json"))) == 3


@pytest.mark.slow
def test_kill_during_teacher_caching_then_rerun(runs, tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    run_and_kill(runs.args(out, cache), tmp_path / "run.log", lambda: bool(shard_metas(cache)))
    assert not (out / "metrics.json").exists() and not (out / "checkpoint").exists()
    at_kill = shard_metas(cache)

    run_to_end(runs.args(out, cache), tmp_path / "run.log")
    assert_same_metrics(out, runs.baseline)
    assert final_weights_checksum(out) == final_weights_checksum(runs.baseline)
    after = shard_metas(cache)
    assert {name: after.get(name) for name in at_kill} == at_kill  # finished shards were reused, not redone
    assert len(at_kill) < len(after) == len(shard_metas(runs.root / "baseline-cache"))  # killed mid-way


@pytest.mark.slow
def test_kill_during_training_then_resume(runs, tmp_path):
    killed, cache = runs.killed_in_training
    out = tmp_path / "out"
    shutil.copytree(killed, out)
    assert not (out / "metrics.json").exists()
    step = checkpoint_state(out)["step"]
    total = json.loads((runs.baseline / "metrics.json").read_text())["training"]["steps"]
    assert 0 < step < total
    # What a kill in the middle of writing the next checkpoint leaves (the real kill may have left some too),
    # and a half-written last line of the training log.
    checkpoint = out / "checkpoint"
    (checkpoint / f"weights-{step + 5:08d}.safetensors").write_bytes(b"half a checkpoint")
    (checkpoint / f".optimizer-{step + 5:08d}.safetensors.tmp").write_bytes(b"\0" * 100)
    with open(out / "train_log.jsonl", "a") as handle:
        handle.write('{"step": 99, "loss": 0.')

    run_to_end(runs.args(out, cache, "--resume"), tmp_path / "resume.log")
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["training"]["resumed_from_step"] == step
    assert_same_metrics(out, runs.baseline)
    assert final_weights_checksum(out) == final_weights_checksum(runs.baseline)
    got, expected = train_log(out), train_log(runs.baseline)  # the torn line is gone, the steps are the same
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    for mine, theirs in zip(got, expected, strict=True):
        # Loss records, and the label-free check's records (restored from the checkpoint, not re-run).
        mine, theirs = _flat(mine), _flat(theirs)
        assert mine == pytest.approx(theirs, abs=1e-6), mine["step"]
    state = checkpoint_state(out)
    extra = [state["extra"]["file"]] if "extra" in state else []  # the label-free check's state
    assert sorted(p.name for p in checkpoint.iterdir()) == sorted([*state["files"], *extra, "state.json"])


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["flip weight bytes", "delete optimizer", "garble state.json"])
def test_damaged_checkpoint_fails_resume_clearly(runs, tmp_path, capsys, monkeypatch, damage):
    """A damaged checkpoint must stop ``--resume`` with the file named (exit 2), never resume from wrong state."""
    import torch

    killed, cache = runs.killed_in_training
    out = tmp_path / "out"
    shutil.copytree(killed, out)
    state = checkpoint_state(out)
    weights, optimizer = (out / "checkpoint" / name for name in state["files"][:2])
    if damage == "flip weight bytes":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2 : len(data) // 2 + 8] = bytes(b ^ 0xFF for b in data[len(data) // 2 : len(data) // 2 + 8])
        weights.write_bytes(bytes(data))
        culprit, problem = weights, "checksum mismatch"
    elif damage == "delete optimizer":
        optimizer.unlink()
        culprit, problem = optimizer, "missing"
    else:
        (out / "checkpoint" / "state.json").write_text('{"step": 5, "files": ')
        culprit, problem = out / "checkpoint" / "state.json", "unreadable checkpoint state"

    monkeypatch.setattr(cli, "_setup_logging", lambda *args, **kwargs: None)
    threads = torch.get_num_threads()
    try:
        status = cli.main(runs.args(out, cache, "--resume"))
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert status == 2, err
    assert f"embeddistill: error: {culprit}: {problem}" in err
    assert not (out / "metrics.json").exists()


class _Killed(BaseException):
    """Stands for a SIGKILL at one precise moment: nothing in the code under test handles it."""


def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(tiny_teacher_path, tmp_path, monkeypatch):
    """A kill after a new checkpoint's weights are written but before its state.json must leave the previous
    checkpoint usable (files of a checkpoint are never overwritten in place), and resuming from it must give the
    uninterrupted run's weights."""
    import numpy as np

    from embeddistill.config import TrainingConfig
    from embeddistill.losses import EmbedDistillLoss, LossWeights
    from embeddistill.models.students import build_student
    from embeddistill.models.teachers import load_sentence_transformer
    from embeddistill.training import batching, loop
    from embeddistill.training.distillation import DistillationTrainer

    rng = np.random.default_rng(0)

    def unit(rows: int) -> np.ndarray:
        x = rng.standard_normal((rows, 32)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    texts = [f"query {i} about coral reefs and vitamin d" for i in range(16)]
    queries = batching.TrainingQueries(
        texts=texts,
        teacher_embeddings=unit(16),
        anchors=np.arange(16) % 8,
        positives=[[] for _ in texts],
        negative_pool=np.array([[d for d in range(8) if d != i % 8][:4] for i in range(16)]),
        generated=np.zeros(16, dtype=bool),
    )
    documents = batching.Documents([f"document {i} on reefs and bones" for i in range(8)], unit(8))

    def trainer(out: Path, resume: bool) -> DistillationTrainer:
        out.mkdir(exist_ok=True)
        config = TrainingConfig(
            epochs=1,
            max_steps=0,
            batch_size=4,
            learning_rate=1e-3,
            checkpoint_every=1,
            device="cpu",
            resume=resume,
            seed=0,
        )
        teacher = load_sentence_transformer(tiny_teacher_path)  # fresh: an asymmetric student freezes its teacher
        student = build_student("teacher:2", teacher, asymmetric=True)
        criterion = EmbedDistillLoss(LossWeights())
        return DistillationTrainer(student, queries, documents, criterion, config, 2, out)

    write_json = loop.atomic_write_json

    def killed_before_second_state(path, obj):
        if Path(path).name == "state.json" and obj["step"] == 2:
            raise _Killed
        write_json(path, obj)

    out = tmp_path / "interrupted"
    with monkeypatch.context() as patch:
        patch.setattr(loop, "atomic_write_json", killed_before_second_state)
        with pytest.raises(_Killed):
            trainer(out, resume=False).train()
    assert checkpoint_state(out)["step"] == 1  # step 2's files are on disk, but its state.json is not

    assert trainer(out, resume=True).train()["resumed_from_step"] == 1
    trainer(tmp_path / "uninterrupted", resume=False).train()
    assert final_weights_checksum(out) == final_weights_checksum(tmp_path / "uninterrupted")
    assert len(list((out / "checkpoint").iterdir())) == 4  # the final checkpoint's 3 files and state.json


# --- LM query generation -----------------------------------------------------------------------------------------

# fmt: off
WORDS = [
    "the", "a", "of", "and", "in", "is", "what", "why", "how", "does", "cell", "cells", "protein", "gene", "genes",
    "cancer", "tumor", "blood", "brain", "mouse", "mice", "human", "study", "effect", "treatment", "risk", "disease",
    "patients", "increase", "decrease", "expression", "water", "reef", "coral", "vitamin", "bone",
]
# fmt: on


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> str:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[EOS]", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]"
    )
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(vocab), n_positions=512, n_layer=1, n_head=2, n_embd=32, bos_token_id=2, eos_token_id=2,
        pad_token_id=0,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("tiny-lm")
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def lm_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lm-data")
    rows = [
        {"_id": f"d{i}", "text": " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(8 + i % 9))} for i in range(96)
    ]
    (root / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "coral"}) + "\n")
    return root


@pytest.mark.slow
def test_kill_during_lm_query_generation_then_rerun(tiny_lm, lm_dataset, tmp_path):
    def args(out: Path) -> list[str]:
        return [
            "generate-queries", "--dataset", str(lm_dataset), "--generator", "lm", "--n", "2", "--lm-model", tiny_lm,
            "--split", "", "--seed", "5", "--out", str(out),
        ]  # fmt: skip

    baseline = tmp_path / "baseline" / "queries.jsonl"
    baseline_run = Child(args(baseline), tmp_path / "baseline.log")
    out = tmp_path / "resumed" / "queries.jsonl"
    cache = out.with_suffix(".cache.jsonl")

    def some_rows() -> bool:
        return cache.exists() and cache.read_bytes().count(b"\n") >= 1

    try:
        run_and_kill(args(out), tmp_path / "run.log", some_rows)
    finally:
        baseline_run.wait()
    expected = [json.loads(line) for line in baseline.read_text().splitlines()]
    total = len(baseline.with_suffix(".cache.jsonl").read_text().splitlines())
    assert total == 2 * 96
    assert not out.exists()
    cached_at_kill = cache.read_bytes().count(b"\n")
    assert 0 < cached_at_kill < total

    run_to_end(args(out), tmp_path / "run.log")
    assert [json.loads(line) for line in out.read_text().splitlines()] == expected
    assert len(cache.read_text().splitlines()) == total  # nothing generated twice
    assert "cached queries reused" in tail(tmp_path / "run.log", 100_000)
