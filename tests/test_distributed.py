"""torch.distributed on CPU (gloo): two ranks under torchrun behave like one process with the same global batch.

One ``torchrun --nproc_per_node 2`` run of this file (the ``__main__`` block is the worker) does everything that
needs two processes, so the interpreter start-up is paid once: sharded teacher encoding into a shared cache,
asymmetric and symmetric training on the tiny teacher, and the ``distill`` command with a batch size that does not
divide by the world size. Meanwhile the test process trains the single-process references. The global batch (8
queries, 21 queries in all, so each epoch ends with an uneven 3 + 2 batch) and every loss part (score, query and
document EM, label, Margin-MSE) are exercised; losses of every step and the final query towers must match.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from embeddistill.config import TrainingConfig
from embeddistill.losses import EmbedDistillLoss, LossWeights
from embeddistill.models.students import build_student, query_modules
from embeddistill.models.teachers import DualEncoderTeacher, load_sentence_transformer
from embeddistill.training import distributed
from embeddistill.training.batching import Documents, TrainingQueries
from embeddistill.training.distillation import DistillationTrainer

WORDS = [
    *("protein", "cell", "mice", "gene", "tumor", "vitamin", "bone", "density", "coral", "reef", "water", "warm"),
    *("blood", "patient", "treatment", "study", "brain", "expression", "risk", "dose", "trial", "insulin", "heart"),
    *("lung", "virus", "immune", "response", "receptor", "signal", "pathway", "growth"),
]
DOCUMENTS = [
    " ".join(WORDS[(7 * i + 3 * j) % len(WORDS)] for j in range(4 + (5 * i) % 23)) + f" ({i})" for i in range(40)
]
DOCUMENTS[7] = DOCUMENTS[3]  # a duplicate text is encoded and stored once
QUERIES = [" ".join(WORDS[(5 * i + 2 * j) % len(WORDS)] for j in range(2 + i % 6)) + f" q{i}" for i in range(21)]
WORLD = 2
BATCH = 8
VARIANTS = {"asymmetric": True, "symmetric": False}


def training_inputs(teacher_path: str) -> dict[str, np.ndarray]:
    """Teacher embeddings, anchors, positives and hard-negative pools of the synthetic training set."""
    teacher = load_sentence_transformer(teacher_path)
    documents = teacher.encode_document(DOCUMENTS, batch_size=64, convert_to_numpy=True)
    queries = teacher.encode_query(QUERIES, batch_size=64, convert_to_numpy=True)
    anchors = np.array([(3 * i) % len(DOCUMENTS) for i in range(len(QUERIES))], dtype=np.int64)
    second = np.array([(3 * i + 1) % len(DOCUMENTS) if i % 4 == 0 else -1 for i in range(len(QUERIES))])
    order = np.argsort(-(queries @ documents.T), axis=1)
    pools = np.full((len(QUERIES), 8), -1, dtype=np.int64)
    for i, ranked in enumerate(order):
        kept = [int(d) for d in ranked if d not in (anchors[i], second[i])][:8]
        pools[i, : len(kept)] = kept
    generated = np.array([i % 3 == 2 for i in range(len(QUERIES))])
    return {
        "documents": documents,
        "queries": queries,
        "anchors": anchors,
        "second": second,
        "pools": pools,
        "generated": generated,
    }


def train(teacher_path: str, inputs: dict[str, np.ndarray], asymmetric: bool, out: Path):
    """Train a ``teacher:2`` student; return the global losses of every step and the final query tower."""
    out.mkdir(parents=True, exist_ok=True)
    teacher = load_sentence_transformer(teacher_path)
    student = build_student("teacher:2", teacher, asymmetric, "cpu")
    positives = [
        [int(a)] + ([int(s)] if s >= 0 else []) for a, s in zip(inputs["anchors"], inputs["second"], strict=True)
    ]
    queries = TrainingQueries(
        QUERIES, inputs["queries"], inputs["anchors"], positives, inputs["pools"], inputs["generated"]
    )
    criterion = EmbedDistillLoss(LossWeights(1.0, 1.0, 1.0, 0.5, 0.1), teacher_temperature=0.05)
    config = TrainingConfig(
        epochs=2, max_steps=0, batch_size=BATCH, learning_rate=2e-3, checkpoint_every=2, device="cpu", precision="fp32"
    )
    trainer = DistillationTrainer(
        student, queries, Documents(DOCUMENTS, inputs["documents"]), criterion, config, hard_negatives=3, out=out
    )
    steps: list[dict[str, float]] = []
    step = trainer.step

    def recording(number: int) -> dict[str, float]:
        parts = step(number)
        steps.append(distributed.mean_over_ranks(parts))  # a collective: every rank records every step
        return parts

    trainer.step = recording
    info = trainer.train()
    weights = {k: v.detach().clone().contiguous() for k, v in query_modules(student).state_dict().items()}
    return steps, weights, info


def worker(teacher_path: str, work: Path) -> None:
    torch.set_num_threads(1)
    distributed.init_from_env("cpu")
    main = distributed.is_main()
    inputs = dict(np.load(work / "inputs.npz"))

    # Sharded teacher encoding: each rank encodes its share into its own shards, then all ranks load all shards.
    teacher = DualEncoderTeacher.load(teacher_path, cache_dir=work / "cache", batch_size=4)
    documents = teacher.embed_documents(DOCUMENTS)
    queries = teacher.embed_queries(QUERIES)
    cached = teacher.embed_documents(DOCUMENTS[:5])  # all cached: no encoding, still consistent across ranks
    if main:
        np.savez(work / "sharded.npz", documents=documents, queries=queries, cached=cached)

    for name, asymmetric in VARIANTS.items():
        steps, weights, info = train(teacher_path, inputs, asymmetric, work / "distributed" / name)
        if main:
            save_file(weights, str(work / f"{name}-weights.safetensors"))
            (work / f"{name}-steps.json").write_text(json.dumps({"steps": steps, "info": info}))

    from embeddistill.cli import main as cli_main

    stderr = io.StringIO()
    argv = ["distill", "--teacher", teacher_path, "--dataset", str(work / "no-dataset"), "--out", str(work / "bad")]
    with contextlib.redirect_stderr(stderr):
        code = cli_main([*argv, "--batch-size", "7", "--device", "cpu"])
    (work / f"bad-batch-rank{distributed.rank()}.json").write_text(json.dumps({"code": code, "err": stderr.getvalue()}))
    distributed.shutdown()


@pytest.fixture(scope="module")
def two_ranks(tiny_teacher_path, tmp_path_factory):
    """Launch the 2-rank torchrun job, train the single-process references meanwhile, then wait for the job."""
    work = tmp_path_factory.mktemp("distributed")
    inputs = training_inputs(tiny_teacher_path)
    np.savez(work / "inputs.npz", **inputs)
    # A cache a single process started (as if killed after one shard): the ranks encode only what it lacks.
    DualEncoderTeacher.load(tiny_teacher_path, cache_dir=work / "cache").embed_documents(DOCUMENTS[:6])
    env = {**os.environ, "EMBEDDISTILL_CACHE_SHARD_SIZE": "4", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD)]
    command = [*torchrun, __file__, tiny_teacher_path, str(work)]
    job = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        references = {name: train(tiny_teacher_path, inputs, a, work / "single" / name) for name, a in VARIANTS.items()}
    finally:
        torch.set_num_threads(threads)
        try:
            output, _ = job.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            job.kill()
            output, _ = job.communicate()
    assert job.returncode == 0, f"torchrun failed (exit {job.returncode}):\n{output[-6000:]}"
    return work, inputs, references


@pytest.mark.slow
@pytest.mark.parametrize("name", list(VARIANTS))
def test_two_ranks_train_like_one_process(two_ranks, name):
    work, _, references = two_ranks
    steps, weights, info = references[name]
    distributed_run = json.loads((work / f"{name}-steps.json").read_text())
    assert info["world_size"] == 1 and distributed_run["info"]["world_size"] == WORLD
    assert len(distributed_run["steps"]) == len(steps) == 6  # 2 epochs of ceil(21 / 8) batches
    for number, (single, double) in enumerate(zip(steps, distributed_run["steps"], strict=True)):
        assert single.keys() == double.keys()
        expected_parts = {"loss", "score", "query_em", "label", "margin_mse"} | (
            set() if name == "asymmetric" else {"document_em"}
        )
        assert set(single) == expected_parts
        for part in single:
            assert double[part] == pytest.approx(single[part], rel=1e-5, abs=1e-6), (number, part)
    # Rank 0 alone wrote the log (once per logged step) and checkpoints; its records are the global batch's.
    single_log = (work / "single" / name / "train_log.jsonl").read_text().splitlines()
    double_log = (work / "distributed" / name / "train_log.jsonl").read_text().splitlines()
    assert len(single_log) == len(double_log) == 2  # steps 0 and 5
    for single, double in zip(map(json.loads, single_log), map(json.loads, double_log), strict=True):
        assert single.keys() == double.keys() and single["step"] == double["step"]
        for key in single:
            assert double[key] == pytest.approx(single[key], rel=1e-5, abs=1e-6), key
    assert json.loads((work / "distributed" / name / "checkpoint" / "state.json").read_text())["step"] == 6
    loaded = load_file(str(work / f"{name}-weights.safetensors"))
    assert loaded.keys() == weights.keys()
    for key, value in weights.items():
        torch.testing.assert_close(loaded[key], value, atol=1e-5, rtol=0, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.slow
def test_sharded_teacher_encoding(two_ranks, tiny_teacher_path):
    work, inputs, _ = two_ranks
    sharded = np.load(work / "sharded.npz")
    np.testing.assert_allclose(sharded["documents"], inputs["documents"], atol=1e-5)
    np.testing.assert_allclose(sharded["queries"], inputs["queries"], atol=1e-5)
    np.testing.assert_array_equal(sharded["cached"], sharded["documents"][:5])
    (cache,) = (work / "cache").iterdir()
    metas = sorted((cache / "shards").glob("*.json"))
    assert metas[0].name == "00001.json"  # the single-process shard from before the launch, reused
    assert {m.stem.split("-")[1] for m in metas[1:]} == {"r0", "r1"}  # each rank wrote its own shards
    keys = [key for m in metas for key in json.loads(m.read_text())["keys"]]
    assert len(keys) == len(set(keys)) == len(set(DOCUMENTS)) + len(QUERIES)  # every text encoded once
    # The cache the two ranks wrote is an ordinary cache: one process reads it without encoding anything.
    teacher = DualEncoderTeacher.load(tiny_teacher_path, cache_dir=work / "cache")
    assert teacher.cache.missing(DOCUMENTS, "document") == [] and teacher.cache.missing(QUERIES, "query") == []
    np.testing.assert_array_equal(teacher.embed_documents(DOCUMENTS), sharded["documents"])


@pytest.mark.slow
def test_batch_size_not_divisible_by_world_size_fails_clearly(two_ranks):
    work, _, _ = two_ranks
    for rank in range(WORLD):
        result = json.loads((work / f"bad-batch-rank{rank}.json").read_text())
        assert result["code"] == 2
        assert "batch_size 7 is not divisible by the world size 2" in result["err"]
        assert "use a batch size of 6 or 8" in result["err"]
    assert not (work / "bad" / "config.yaml").exists()


def test_batch_size_check_in_process(monkeypatch):
    distributed.check_batch_size(7)  # one process: anything goes
    monkeypatch.setattr(distributed, "world_size", lambda: 4)
    distributed.check_batch_size(64)
    with pytest.raises(distributed.DistributedError, match="batch_size 66 is not divisible by the world size 4"):
        distributed.check_batch_size(66)


def test_inconsistent_launches_fail_clearly(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init_from_env("cpu") == torch.device("cpu") and distributed.world_size() == 1
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(distributed.DistributedError, match=r"\$MASTER_ADDR, \$MASTER_PORT unset.*torchrun"):
        distributed.init_from_env("cpu")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29512")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(distributed.DistributedError, match="2 processes per node but only 1 GPU"):
        distributed.init_from_env("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(distributed.DistributedError, match="asks for CUDA but no GPU is visible"):
        distributed.init_from_env("cuda")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(distributed.DistributedError, match="inconsistent launch: RANK=5"):
        distributed.init_from_env("cpu")
    assert not distributed.is_initialized()


def test_shard_helpers():
    assert [distributed.shard_bounds(5, r, 2) for r in range(2)] == [(0, 2), (2, 5)]
    assert [distributed.shard_bounds(8, r, 4) for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert list(distributed.shard_of([1, 2, 3])) == [1, 2, 3]  # one process owns everything
    owners = [distributed.owner(f"key{i}", 3) for i in range(300)]
    assert set(owners) == {0, 1, 2} and owners == [distributed.owner(f"key{i}", 3) for i in range(300)]
    tensor = torch.ones(2, 3, requires_grad=True)
    assert distributed.gather_with_grad(tensor) is tensor


if __name__ == "__main__":  # the torchrun worker
    worker(sys.argv[1], Path(sys.argv[2]))
