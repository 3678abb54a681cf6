"""Holding the tool wrong gives a clear answer and loses nothing: options, run folders, ``--resume``, extras, console.

Each behaviour of the command line is checked through a real ``embeddistill`` process (``run_cli``); the options
are refused before any data or model is loaded, which the tests show by pointing ``--dataset`` at a folder that
does not exist (loading it first would fail with *that* error instead).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from embeddistill.config import DistillConfig, TeacherTrainingConfig, leaf_fields

SRC = Path(__file__).resolve().parents[1] / "src"
NO_DATASET = "/nonexistent/dataset"


def run_cli(*args: str, blocked: tuple[str, ...] = (), timeout: int = 120) -> subprocess.CompletedProcess:
    """``embeddistill ARGS`` in a fresh process (with the modules in ``blocked`` made unimportable)."""
    code = "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in blocked)
    code += "from embeddistill.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=timeout, check=False
    )


def refused(result: subprocess.CompletedProcess) -> str:
    """The error of a command that must have stopped cleanly: exit 2, one error line, no traceback."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.count("embeddistill: error:") == 1, result.stderr
    return result.stderr


def distill_args(out: Path, *extra: str, teacher: str = "some/teacher") -> list[str]:
    return ["distill", "--teacher", teacher, "--dataset", NO_DATASET, "--out", str(out), *extra]


# -- options: one place, before anything is loaded -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "says"),
    [
        (["--epochs", "0"], "--epochs must be at least 1; got 0"),
        (["--epochs", "-1"], "--epochs must be at least 1; got -1"),
        (["--batch-size", "0"], "--batch-size must be at least 2 (in-batch negatives"),
        (["--batch-size", "1"], "--batch-size must be at least 2 (in-batch negatives"),
        (["--learning-rate=-1e-4"], "--learning-rate must be above 0; got -0.0001"),
        (["--learning-rate", "0"], "--learning-rate must be above 0"),
        (["--learning-rate-candidates", "1e-3", "-1"], "--learning-rate-candidates must be above 0; got -1.0"),
        (["--warmup-ratio", "1.5"], "--warmup-ratio must be at most 1"),
        (["--start-weight", "1.5"], "--start-weight must be at most 1"),
        (["--hard-negatives", "60"], "--hard-negatives 60 cannot be drawn from the teacher's top"),
        (["--latency-batch-sizes", "1", "0"], "--latency-batch-sizes must be at least 1; got 0"),
        (["--student", "teacher:0"], "--student teacher:0: N counts the first N layers"),
        (["--score-weight", "0", "--query-em-weight", "0", "--document-em-weight", "0"], "every loss weight is 0"),
        (["--baselines", "./no/such/model"], "--baselines ./no/such/model: no such folder"),
    ],
)
def test_impossible_options_are_refused_before_anything_is_loaded(tmp_path, options, says):
    err = refused(run_cli(*distill_args(tmp_path / "out", *options)))
    assert says in err
    assert not (tmp_path / "out").exists()  # not even the output folder was made


def test_a_max_seq_length_past_the_teachers_position_embeddings_is_refused_from_its_config_alone(
    tmp_path, tiny_teacher_path
):
    err = refused(run_cli(*distill_args(tmp_path / "out", "--max-seq-length", "256", teacher=tiny_teacher_path)))
    assert f"--max-seq-length 256: {tiny_teacher_path} embeds positions up to 128; give at most 128" in err
    assert not (tmp_path / "out").exists()


def test_more_student_layers_than_the_teacher_has_are_refused_from_its_config_alone(tmp_path, tiny_teacher_path):
    err = refused(run_cli(*distill_args(tmp_path / "out", "--student", "teacher:99", teacher=tiny_teacher_path)))
    assert f"--student teacher:99: {tiny_teacher_path} has 4 layers; use teacher:1 to teacher:4" in err


@pytest.mark.parametrize(
    ("student", "says"),
    [
        ("teacher:0,4", "has layers 0 to 3"),
        ("teacher:3,1", "name the layers to keep once each, increasing (e.g. teacher:0,11, or teacher:0,-1"),
        ("teacher:1,1", "name the layers to keep once each"),
        ("teacher:0,-5", "name the layers to keep once each"),  # a 4-layer teacher has no fifth layer from the top
        ("teacher:3,-1", "name the layers to keep once each"),  # -1 is layer 3: twice
    ],
)
def test_named_teacher_layers_it_lacks_or_out_of_order_are_refused(tmp_path, tiny_teacher_path, student, says):
    err = refused(run_cli(*distill_args(tmp_path / "out", "--student", student, teacher=tiny_teacher_path)))
    assert f"--student {student}: " in err and says in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("layers", "says"),
    [
        (["5"], "has 4 layers; use 1 to 4"),
        (["0", "4"], "has layers 0 to 3"),
        (["2", "1"], "name the layers to keep once each, increasing (e.g. 0 11, or 0 -1"),
        (["0"], "N counts the first N layers"),
    ],
)
def test_named_student_layers_it_lacks_are_refused_from_its_config_alone(
    tmp_path, tiny_teacher_path, tiny_student_path, layers, says
):
    options = ["--student", tiny_student_path, "--student-layers", *layers]
    err = refused(run_cli(*distill_args(tmp_path / "out", *options, teacher=tiny_teacher_path)))
    assert f"--student-layers {' '.join(layers)}: " in err and says in err
    assert not (tmp_path / "out").exists()


def test_train_teacher_refuses_impossible_options_before_loading(tmp_path):
    args = ["train-teacher", "--base", "some/model", "--dataset", NO_DATASET, "--out", str(tmp_path / "ce")]
    err = refused(run_cli(*args, "--epochs", "0", "--group-size", "1", "--learning-rate", "-1"))
    for says in ("--epochs must be at least 1", "--group-size must be at least 2", "--learning-rate must be above 0"):
        assert says in err  # every problem at once


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["search", "ix", "--model", "m", "q", "--k", "0"], "argument --k/--top-k: must be at least 1, got 0"),
        (["index", "--model", "m", "--dataset", "d", "--out", "o", "--batch-size", "0"], "argument --batch-size"),
        (["evaluate", "m", "--dataset", "d", "--top-k", "-5"], "argument --top-k: must be at least 1, got -5"),
        (["generate-queries", "--dataset", "d", "--out", "o", "--n", "0"], "argument --n: must be at least 1"),
        (["serve", "ix", "--model", "m", "--max-batch", "0"], "argument --max-batch: must be at least 1"),
        (["export", "m", "--onnx", "o", "--repeats", "0"], "argument --repeats: must be at least 1"),
    ],
)
def test_the_other_commands_refuse_impossible_numbers_by_their_flag(args, says):
    result = run_cli(*args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"embeddistill {args[0]}: error: {says}" in result.stderr


def test_every_numeric_option_declares_its_limits():
    """A sibling guard: a new numeric option must say what values it accepts (only a seed takes any integer)."""
    unlimited = []
    for config in (DistillConfig(), TeacherTrainingConfig()):
        for name, (section, f) in leaf_fields(config).items():
            value = getattr(section, name)
            numeric = isinstance(value, int | float) and not isinstance(value, bool) or name == "learning_rate"
            if numeric and name != "seed" and not {"minimum", "above"} & set(f.metadata):
                unlimited.append(name)
    assert not unlimited


def test_a_small_batch_size_trains_with_a_warning_that_says_why():
    from embeddistill.checks import check_distill

    config = DistillConfig()
    config.training.batch_size = 4
    (warning,) = check_distill(config)
    assert "--batch-size 4" in warning and "in-batch negatives" in warning
    config.training.batch_size = 8
    assert check_distill(config) == []


# -- the output folder: --overwrite and --resume --------------------------------------------------------------------


def folder_with_checkpoint(out: Path, *options: str) -> Path:
    """An output folder as an interrupted run leaves it: config.yaml (of ``options``) and a checkpoint at step 5."""
    from embeddistill.cli import build_parser
    from embeddistill.config import config_from_args, resolve_student_recipe

    config = resolve_student_recipe(config_from_args(build_parser().parse_args(distill_args(out, *options))))
    out.mkdir(parents=True)
    (out / "config.yaml").write_text(config.to_yaml())
    (out / "checkpoint").mkdir()
    (out / "checkpoint" / "state.json").write_text(json.dumps({"step": 5, "files": [], "sha256": {}}))
    return out


def test_a_folder_with_a_checkpoint_is_not_started_again_without_overwrite(tmp_path):
    out = folder_with_checkpoint(tmp_path / "run")
    err = refused(run_cli(*distill_args(out)))
    assert f"{out} holds a checkpoint of an earlier run (step 5): add --resume to continue it, or --overwrite" in err
    assert (out / "checkpoint" / "state.json").exists()

    err = refused(run_cli(*distill_args(out, "--resume", "--overwrite")))
    assert "--resume and --overwrite contradict each other" in err

    err = refused(run_cli(*distill_args(out, "--overwrite")))  # goes on, to the missing dataset
    assert "embeddistill: error: dataset" in err and "deleting the checkpoint of an earlier run" in err
    assert not (out / "checkpoint").exists()


def test_train_teacher_does_not_start_again_over_its_checkpoint_without_overwrite(tmp_path):
    (tmp_path / "ce.checkpoint").mkdir()
    (tmp_path / "ce.checkpoint" / "state.json").write_text('{"step": 3}')
    args = ["train-teacher", "--base", "some/model", "--dataset", NO_DATASET, "--out", str(tmp_path / "ce")]
    assert "--resume to continue it, or --overwrite" in refused(run_cli(*args))


def test_resume_with_other_settings_is_refused_with_the_differences(tmp_path):
    out = folder_with_checkpoint(tmp_path / "run", "--learning-rate", "1e-3", "--student", "teacher:2")
    err = refused(run_cli(*distill_args(out, "--resume", "--learning-rate", "1e-4", "--student", "teacher:3")))
    assert f"--resume: {out / 'checkpoint'} was made with other settings; resuming would mix two runs:" in err
    assert "--learning-rate: checkpoint 0.001, now 0.0001" in err
    assert "--student: checkpoint 'teacher:2', now 'teacher:3'" in err  # another architecture: refused here
    assert "start again with --overwrite" in err
    assert (out / "checkpoint" / "state.json").exists()


def test_resume_may_change_settings_that_cannot_change_the_result(tmp_path):
    out = folder_with_checkpoint(tmp_path / "run", "--threads", "1", "--latency-repeats", "50")
    changed = ["--threads", "4", "--latency-repeats", "3", "--cache-dir", str(tmp_path / "c"), "--device", "cpu"]
    err = refused(run_cli(*distill_args(out, "--resume", *changed, "--top-k", "10", "--checkpoint-every", "7")))
    assert (
        "other settings" not in err and "embeddistill: error: dataset" in err
    )  # past the check, stopped by the missing dataset


def test_a_checkpoint_of_another_architecture_is_a_clear_error_not_a_state_dict_traceback(tmp_path):
    import torch

    from embeddistill.data import DataError
    from embeddistill.training.loop import restore_checkpoint, write_checkpoint

    small = torch.nn.Linear(4, 2)
    write_checkpoint(tmp_path, 5, small, torch.optim.AdamW(small.parameters()))
    other = torch.nn.Linear(8, 2)
    with pytest.raises(DataError, match="the checkpoint's weights do not fit this model .*--overwrite"):
        restore_checkpoint(tmp_path, other, torch.optim.AdamW(other.parameters()), torch.device("cpu"))


# -- optional extras ------------------------------------------------------------------------------------------------


def test_export_without_the_serve_extra_names_it(tmp_path):
    err = refused(run_cli("export", "some/model", "--onnx", str(tmp_path / "onnx"), blocked=("onnx",)))
    assert "embeddistill export needs onnx, which is not installed: pip install 'embeddistill[serve]'" in err


def test_serve_without_the_serve_extra_names_it(tmp_path):
    err = refused(run_cli("serve", str(tmp_path), "--model", "m", blocked=("fastapi", "uvicorn")))
    assert (
        "embeddistill serve needs fastapi, uvicorn, which are not installed: pip install 'embeddistill[serve]'" in err
    )


def test_search_with_an_onnx_export_without_onnxruntime_names_the_extra(tmp_path):
    import numpy as np

    from embeddistill.serving.indexing import SearchIndex

    SearchIndex.build(np.eye(3, 4, dtype=np.float32), ["a", "b", "c"], "flat").save(tmp_path / "index")
    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx" / "export_info.json").write_text("{}")
    args = ["search", str(tmp_path / "index"), "--model", str(tmp_path / "onnx"), "a query"]
    err = refused(run_cli(*args, blocked=("onnxruntime",)))
    assert f"the ONNX query encoder in {tmp_path / 'onnx'} needs onnxruntime" in err
    assert "pip install 'embeddistill[serve]'" in err


# -- console --------------------------------------------------------------------------------------------------------

COMMANDS = ["distill", "evaluate", "generate-queries", "index", "search", "export", "serve", "train-teacher"]


def test_help_is_fast_and_loads_neither_torch_nor_transformers():
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "embeddistill.cli", "--help"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(SRC)}, check=True,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time")}
    assert not {"torch", "transformers", "sentence_transformers", "faiss"} & imported
    assert seconds < 1.5
    assert "`" not in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_help_has_a_description_and_its_defaults_and_no_backticks(command):
    result = run_cli(command, "--help")
    assert result.returncode == 0
    text = result.stdout
    usage, description = text.split("\n\n")[:2]
    assert len(description.split()) >= 12, text  # a sentence or two, not just the usage line
    assert "`" not in text
    assert "(default: " in text and "-q, --quiet" in text and "-v, --verbose" in text


def test_version_is_printed():
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("embeddistill ")


def test_an_error_after_logging_started_is_printed_once(tmp_path):
    err = refused(run_cli("evaluate", "some/model", "--dataset", NO_DATASET, "--out", str(tmp_path)))
    assert err.count("not found: no corpus.jsonl") == 1


def test_quiet_by_default_with_v_and_q(tmp_path, tiny_teacher_path, scifact_slice):
    def index(*flags: str) -> str:
        args = ["index", "--model", tiny_teacher_path, "--dataset", str(scifact_slice), "--out", str(tmp_path / "ix")]
        result = run_cli(*args, "--cache-dir", str(tmp_path / "cache"), *flags)
        assert result.returncode == 0, result.stderr
        return result.stderr

    default, quiet, verbose = index(), index("-q"), index("-v")
    for err in (default, quiet, verbose):
        assert "faiss.loader" not in err and "FutureWarning" not in err
    assert "loading dataset" in default and "embeddistill.data" not in default  # our own lines, short
    assert quiet == ""  # no INFO lines, no progress bars
    assert "INFO embeddistill.data: loading dataset" in verbose
