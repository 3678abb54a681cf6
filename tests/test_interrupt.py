"""Ctrl-C during training, and the files a run leaves: real ``embeddistill`` processes on the SciFact slice.

An uninterrupted run (the baseline) and a run stopped by SIGINT mid-training and then continued with the command
it printed must end with the same student, tensor for tensor. All runs are made under umask 022, and every file
they (and ``index`` / ``export``) write must then be 0644 and every folder 0755, as plain ``open`` and ``mkdir``
would make them: results are read by other users and by containers running as another user.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
TIMEOUT = 300
SETTINGS = [
    "--student", "teacher:2", "--epochs", "30", "--batch-size", "8", "--checkpoint-every", "50",
    "--learning-rate", "1e-4", "--crops-per-document", "1", "--perturbations-per-query", "1", "--max-generated", "100",
    "--hard-negatives", "2", "--hard-negative-depth", "10", "--latency-repeats", "1", "--latency-batch-sizes", "1",
    "--device", "cpu", "--threads", "1", "--seed", "13",
]  # fmt: skip


def child_env() -> dict[str, str]:
    return {
        **os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
    }  # fmt: skip


def start(args: list[str], log: Path) -> subprocess.Popen:
    """``embeddistill ARGS`` in the background under umask 022, stdout and stderr into ``log``."""
    with open(log, "ab") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "embeddistill.cli", *args],
            stdout=handle, stderr=subprocess.STDOUT, env=child_env(), preexec_fn=lambda: os.umask(0o022),
        )  # fmt: skip


def finish(process: subprocess.Popen, log: Path) -> int:
    try:
        return process.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail("the child never ended:\n" + log.read_text(errors="replace")[-3000:])


def trained_steps(out: Path) -> int:
    try:
        return max(json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines())
    except (OSError, ValueError, KeyError):
        return -1


class Runs:
    def __init__(self, root: Path, teacher: str, dataset: Path):
        self.root, self.teacher, self.dataset = root, teacher, dataset
        self.baseline = root / "baseline"
        self.baseline_log = root / "baseline.log"
        self.baseline_run = start(self.args(self.baseline, root / "baseline-cache"), self.baseline_log)

    def args(self, out: Path, cache: Path) -> list[str]:
        paths = [
            "--teacher",
            self.teacher,
            "--dataset",
            str(self.dataset),
            "--out",
            str(out),
            "--cache-dir",
            str(cache),
        ]
        return ["distill", *paths, *SETTINGS]

    def wait_for_baseline(self) -> Path:
        assert finish(self.baseline_run, self.baseline_log) == 0, self.baseline_log.read_text()[-3000:]
        return self.baseline


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_teacher_path, scifact_slice):
    runs = Runs(tmp_path_factory.mktemp("interrupt"), tiny_teacher_path, scifact_slice)
    yield runs
    if runs.baseline_run.poll() is None:
        runs.baseline_run.kill()
        runs.baseline_run.wait()


def student_tensors(out: Path) -> dict[str, tuple[str, dict]]:
    """Every safetensors file of the saved student: its sha256 and its tensors."""
    from safetensors.numpy import load_file

    files = sorted((out / "student").rglob("*.safetensors"))
    assert files
    return {str(p.relative_to(out)): (hashlib.sha256(p.read_bytes()).hexdigest(), load_file(str(p))) for p in files}


@pytest.mark.slow
def test_ctrl_c_mid_training_writes_a_checkpoint_and_its_resume_command_ends_bit_identical(runs, tmp_path):
    out, log = tmp_path / "out", tmp_path / "run.log"
    process = start(runs.args(out, tmp_path / "cache"), log)
    deadline = time.monotonic() + TIMEOUT
    while trained_steps(out) < 60:  # past the first scheduled checkpoint (step 50), between two of them
        assert process.poll() is None, "the run ended before it could be interrupted:\n" + log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    assert finish(process, log) == 130
    said = log.read_text(errors="replace")
    assert "Traceback" not in said and "KeyboardInterrupt" not in said
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert f"stopped by SIGINT after step {state['step']} of 540; checkpoint written to" in said
    assert state["step"] % 50 != 0  # the step it stopped at, not the last scheduled checkpoint
    assert not (out / "metrics.json").exists()

    resume = said.split("Continue with:\n", 1)[1].splitlines()[0].strip()
    program, *args = shlex.split(resume)
    assert program == "embeddistill" and args[-1] == "--resume"
    assert finish(start(args, log), log) == 0, log.read_text()[-3000:]

    baseline = runs.wait_for_baseline()
    assert json.loads((out / "metrics.json").read_text())["training"]["resumed_from_step"] == state["step"]
    got, expected = student_tensors(out), student_tensors(baseline)
    assert got.keys() == expected.keys()
    for name, (digest, tensors) in expected.items():
        assert got[name][1].keys() == tensors.keys()
        for key, value in tensors.items():
            assert (got[name][1][key] == value).all(), f"{name}: {key}"
        assert got[name][0] == digest, name
    assert [r["step"] for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines())] == [
        r["step"] for r in map(json.loads, (baseline / "train_log.jsonl").read_text().splitlines())
    ]


def test_atomic_writes_get_the_mode_of_an_ordinary_file(tmp_path):
    from embeddistill.storage import atomic_write_json

    previous = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "a.json", {})
        os.umask(0o027)
        atomic_write_json(tmp_path / "b.json", {})
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o640


def modes(*folders: Path) -> dict[str, str]:
    """Each path under ``folders`` whose mode is not 0644 (files) or 0755 (folders), with its mode."""
    odd = {}
    for folder in folders:
        for path in [folder, *folder.rglob("*")]:
            mode = stat.S_IMODE(path.stat().st_mode)
            if mode != (0o755 if path.is_dir() else 0o644):
                odd[str(path.relative_to(folder.parent))] = oct(mode)
    return odd


@pytest.mark.slow
def test_files_are_created_0644_under_umask_022(runs, tmp_path):
    baseline = runs.wait_for_baseline()
    expected = ["metrics.json", "report.md", "config.yaml", "teacher.trec", "student.trec", "student/README.md"]
    assert all((baseline / name).is_file() for name in expected)
    index, onnx, log = tmp_path / "index", tmp_path / "onnx", tmp_path / "serving.log"
    student = str(baseline / "student")
    dataset = ["--dataset", str(runs.dataset), "--cache-dir", str(runs.root / "baseline-cache")]
    assert finish(start(["index", "--model", student, *dataset, "--out", str(index)], log), log) == 0
    assert finish(start(["export", student, "--onnx", str(onnx)], log), log) == 0, log.read_text()[-3000:]
    assert modes(baseline, runs.root / "baseline-cache", index, onnx) == {}


@pytest.mark.slow
def test_a_run_prints_no_library_noise_and_no_warning_of_our_own(runs, tmp_path):
    said = runs.baseline_log.read_text(errors="replace") if runs.wait_for_baseline() else ""
    log = tmp_path / "export.log"
    assert finish(start(["export", str(runs.baseline / "student"), "--onnx", str(tmp_path / "onnx")], log), log) == 0
    said += log.read_text(errors="replace")
    for noise in ("faiss.loader", "FutureWarning", "TracerWarning", "Traceback", "UserWarning"):
        assert noise not in said
