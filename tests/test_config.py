"""Configuration: defaults, YAML (nested and flat), command-line overrides, errors, round trips."""

from __future__ import annotations

import argparse
import dataclasses
import textwrap

import pytest

from embeddistill.cli import build_parser
from embeddistill.config import (
    CrossEncoderConfig,
    DataConfig,
    DistillConfig,
    EvaluationConfig,
    LossConfig,
    ModelConfig,
    TeacherApiConfig,
    TeacherTrainingConfig,
    TrainingConfig,
    add_config_arguments,
    apply_arguments,
    config_from_args,
    leaf_fields,
    option,
)


def write(tmp_path, text: str, name: str = "config.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_defaults():
    config = DistillConfig()
    assert config.out == ""
    assert config.data.train_split == "train" and config.data.eval_split == "test"
    assert config.data.extra_queries == []
    assert config.model.student == "teacher:0,-1"
    assert config.model.asymmetric == "auto"  # resolved by the student's recipe: tests/test_recipe.py
    assert config.model.trust_remote_code is False
    assert config.loss.score_weight == 1.0 and config.loss.query_em_weight == 1.0
    assert config.loss.label_weight == 0.0 and config.loss.margin_mse_weight == 0.0
    assert config.loss.em_distance == "l2"
    assert config.training.learning_rate == "auto" and config.training.learning_rate_candidates == [1e-3, 1e-4, 2e-5]
    assert config.training.epochs == "auto" and config.training.batch_size == 64
    assert config.data.crops_per_document == "auto" and config.data.crop_budget == 150_000
    assert config.evaluation.metrics == ["nDCG@10", "RR@10", "R@100"]
    assert config.evaluation.latency_batch_sizes == [1, 32]


def test_list_defaults_are_not_shared_between_instances():
    first, second = DistillConfig(), DistillConfig()
    first.evaluation.metrics.append("P@5")
    first.data.extra_queries.append("x.jsonl")
    assert second.evaluation.metrics == ["nDCG@10", "RR@10", "R@100"]
    assert second.data.extra_queries == []


def test_field_names_unique_across_sections():
    leaves = leaf_fields(DistillConfig())  # raises AssertionError on a duplicate
    sections = [DataConfig, ModelConfig, LossConfig, TrainingConfig, EvaluationConfig, CrossEncoderConfig]
    sections.append(TeacherApiConfig)
    all_names = ["out"] + [f.name for section in sections for f in dataclasses.fields(section)]
    assert len(all_names) == len(set(all_names))
    assert set(leaves) == set(all_names)
    assert leaves["learning_rate"][0].__class__ is TrainingConfig
    assert leaves["out"][0].__class__ is DistillConfig


def test_yaml_nested(tmp_path):
    path = write(
        tmp_path,
        """
        out: runs/x
        data:
          dataset: scifact
          extra_queries: [a.jsonl, b.tsv]
        model:
          teacher: some/model
          asymmetric: false
        loss:
          em_distance: cosine
          label_weight: 0.5
        training:
          learning_rate: 1.0e-3
          epochs: 3
        evaluation:
          metrics: [nDCG@10]
          latency_batch_sizes: [4]
        """,
    )
    config = DistillConfig.from_yaml(path)
    assert config.out == "runs/x"
    assert config.data.dataset == "scifact"
    assert config.data.extra_queries == ["a.jsonl", "b.tsv"]
    assert config.model.teacher == "some/model"
    assert config.model.asymmetric is False
    assert config.loss.em_distance == "cosine"
    assert config.loss.label_weight == 0.5
    assert config.training.learning_rate == pytest.approx(1e-3)
    assert config.training.epochs == 3
    assert config.evaluation.metrics == ["nDCG@10"]
    assert config.evaluation.latency_batch_sizes == [4]
    # untouched fields keep their defaults
    assert config.training.batch_size == 64
    assert config.data.train_split == "train"


def test_yaml_flat_and_hyphenated(tmp_path):
    path = write(
        tmp_path,
        """
        dataset: nfcorpus
        learning-rate: 5e-5
        batch_size: 8
        em_distance: squared_l2
        """,
    )
    config = DistillConfig.from_yaml(path)
    assert config.data.dataset == "nfcorpus"
    assert config.training.learning_rate == pytest.approx(5e-5)  # YAML reads "5e-5" as a string: coerced
    assert isinstance(config.training.learning_rate, float)
    assert config.training.batch_size == 8
    assert config.loss.em_distance == "squared_l2"


def test_empty_yaml_gives_defaults(tmp_path):
    assert DistillConfig.from_yaml(write(tmp_path, "")) == DistillConfig()


def test_unknown_key_names_key_and_file(tmp_path):
    path = write(tmp_path, "training:\n  learning_rat: 0.1\n", name="typo.yaml")
    with pytest.raises(ValueError) as error:
        DistillConfig.from_yaml(path)
    message = str(error.value)
    assert "'learning_rat'" in message
    assert str(path) in message
    assert "learning_rate" in message  # the known options are listed


def test_non_string_key_is_a_clear_error(tmp_path):
    path = write(tmp_path, "training:\n  1: 2\n", name="intkey.yaml")
    with pytest.raises(ValueError) as error:
        DistillConfig.from_yaml(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize(
    "text, name",
    [
        ("epochs: many\n", "epochs"),
        ("learning_rate: fast\n", "learning_rate"),
        ("latency_batch_sizes: [1, big]\n", "latency_batch_sizes"),
        ("em_distance: manhattan\n", "em_distance"),
        ("projection_init: zeros\n", "projection_init"),
        ("asymmetric: maybe\n", "asymmetric"),
        ("asymmetric: 2\n", "asymmetric"),
    ],
)
def test_bad_type_or_choice(tmp_path, text, name):
    path = write(tmp_path, text, name="bad.yaml")
    with pytest.raises(ValueError) as error:
        DistillConfig.from_yaml(path)
    assert f"'{name}'" in str(error.value)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("text", ["epochs: 2.5\n", "batch_size: true\n", "dataset: [a, b]\n", "seed: 1.9\n"])
def test_lossy_coercion_is_rejected(tmp_path, text):
    """A value that only fits by silently changing it (2.5 -> 2 epochs, true -> batch size 1, a list -> its
    repr as a dataset name) must be rejected, not truncated."""
    with pytest.raises(ValueError):
        DistillConfig.from_yaml(write(tmp_path, text, name="lossy.yaml"))


def test_invalid_yaml_and_non_mapping(tmp_path):
    with pytest.raises(ValueError, match="not valid YAML"):
        DistillConfig.from_yaml(write(tmp_path, "training: [unclosed\n", name="broken.yaml"))
    with pytest.raises(ValueError, match="mapping"):
        DistillConfig.from_yaml(write(tmp_path, "- a\n- b\n", name="list.yaml"))


@pytest.mark.parametrize(
    "value, expected",
    [
        ("true", True),
        ("True", True),
        ("yes", True),
        ("on", True),
        ("1", True),
        ("false", False),
        ("FALSE", False),
        ("no", False),
        ("off", False),
        ("0", False),
    ],
)
def test_bool_parsing(value, expected):
    config = DistillConfig.from_dict({"model": {"asymmetric": value, "freeze_word_embeddings": value}})
    assert config.model.asymmetric is expected
    assert config.model.freeze_word_embeddings is expected


def test_yaml_booleans(tmp_path):
    config = DistillConfig.from_yaml(write(tmp_path, "asymmetric: no\nresume: yes\ntrust_remote_code: false\n"))
    assert config.model.asymmetric is False
    assert config.training.resume is True
    assert config.model.trust_remote_code is False


def test_cli_flags_override_yaml(tmp_path):
    path = write(
        tmp_path,
        """
        out: runs/from-yaml
        model:
          teacher: yaml/teacher
          asymmetric: true
        training:
          learning_rate: 0.5
          epochs: 3
        """,
    )
    args = build_parser().parse_args(["distill", "--config", str(path), "--learning-rate", "0.001", "--no-asymmetric"])
    config = config_from_args(args)
    assert config.training.learning_rate == pytest.approx(0.001)
    assert isinstance(config.training.learning_rate, float)
    assert config.model.asymmetric is False
    # values only in YAML survive, values in neither keep their defaults
    assert config.training.epochs == 3
    assert config.model.teacher == "yaml/teacher"
    assert config.out == "runs/from-yaml"
    assert config.training.batch_size == 64


def test_cli_without_yaml_and_list_flags():
    args = build_parser().parse_args(
        ["distill", "--epochs", "2", "--asymmetric", "--metrics", "nDCG@10", "R@100", "--latency-batch-sizes", "1", "8"]
    )
    config = config_from_args(args)
    assert config.training.epochs == 2 and isinstance(config.training.epochs, int)
    assert config.model.asymmetric is True
    assert config.evaluation.metrics == ["nDCG@10", "R@100"]
    assert config.evaluation.latency_batch_sizes == [1, 8]
    assert config.training.learning_rate == "auto" and config.training.learning_rate_candidates == [1e-3, 1e-4, 2e-5]


def test_cli_bad_values():
    args = build_parser().parse_args(["distill", "--epochs", "many"])
    with pytest.raises(ValueError, match="'epochs'"):
        config_from_args(args)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["distill", "--em-distance", "manhattan"])


def test_yaml_round_trip(tmp_path):
    config = DistillConfig()
    config.out = "runs/rt"
    config.data.dataset = "scifact"
    config.data.extra_queries = ["gen.jsonl"]
    config.model.asymmetric = False
    config.loss.em_distance = "cosine"
    config.loss.teacher_temperature = 0.02
    config.training.learning_rate = 3e-5
    config.evaluation.latency_batch_sizes = [1, 4, 16]
    path = tmp_path / "rt.yaml"
    path.write_text(config.to_yaml(), encoding="utf-8")
    loaded = DistillConfig.from_yaml(path)
    assert loaded == config
    assert DistillConfig.from_yaml(write(tmp_path, DistillConfig().to_yaml(), name="d.yaml")) == DistillConfig()
    assert DistillConfig.from_dict(config.to_dict()) == config


def test_cross_encoder_fields_live_in_their_own_section(tmp_path):
    """The CE-only fields moved into ``ce``; flat keys, the new section and the old sections all still load."""
    expected = {"cross_encoder": "ce/path", "first_stage": "fs", "ce_query_target": "mean", "rerank_depth": 7}
    flat = DistillConfig.from_yaml(write(tmp_path, "".join(f"{k}: {v}\n" for k, v in expected.items())))
    nested_new = DistillConfig.from_dict({"ce": expected})
    nested_old = DistillConfig.from_yaml(
        write(
            tmp_path,
            """
            model:
              cross_encoder: ce/path
              first_stage: fs
            loss:
              ce_query_target: mean
            evaluation:
              rerank_depth: 7
            """,
            name="old.yaml",
        )
    )
    for config in (flat, nested_new, nested_old):
        assert config.ce.cross_encoder == "ce/path" and config.ce.first_stage == "fs"
        assert config.ce.ce_query_target == "mean" and config.ce.rerank_depth == 7
        assert flat == config
    assert not any(hasattr(section, "cross_encoder") for section in (flat.model, flat.loss, flat.evaluation))
    args = build_parser().parse_args(["distill", "--cross-encoder", "x", "--ce-random-negatives", "2"])
    config = config_from_args(args)
    assert config.ce.cross_encoder == "x" and config.ce.ce_random_negatives == 2


def test_train_teacher_flags_come_from_the_config_fields():
    """``train-teacher`` uses the same builder as ``distill``: every field is a flag with the field's default."""
    parser = build_parser()
    args = parser.parse_args(["train-teacher", "--base", "b", "--dataset", "d1", "d2", "--out", "o"])
    config = apply_arguments(TeacherTrainingConfig(), args)
    assert config == TeacherTrainingConfig(base="b", datasets=["d1", "d2"], out="o")
    args = parser.parse_args(
        [
            "train-teacher",
            "--base",
            "b",
            "--dataset",
            "d",
            "--out",
            "o",
            "--learning-rate",
            "1e-4",
            "--resume",
            "--no-normalize",
            "--group-size",
            "4",
            "--trust-remote-code",
        ]
    )
    config = apply_arguments(TeacherTrainingConfig(), args)
    assert config.learning_rate == pytest.approx(1e-4) and isinstance(config.learning_rate, float)
    assert config.resume is True and config.normalize is False and config.group_size == 4
    assert config.trust_remote_code is True
    for missing in (["--dataset", "d", "--out", "o"], ["--base", "b", "--out", "o"], ["--base", "b", "--dataset", "d"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["train-teacher", *missing])
    with pytest.raises(ValueError, match="'epochs'"):
        apply_arguments(
            TeacherTrainingConfig(),
            parser.parse_args(["train-teacher", "--base", "b", "--dataset", "d", "--out", "o", "--epochs", "2.5"]),
        )


def test_a_percent_sign_in_an_option_help_prints_as_is_in_help():
    @dataclasses.dataclass
    class Sampling:
        keep: float = option(0.5, "keep 50% of the queries", minimum=0.0)

    @dataclasses.dataclass
    class Config:
        sampling: Sampling = dataclasses.field(default_factory=Sampling)

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, Config())
    assert "keep 50% of the queries (default: 0.5)" in " ".join(parser.format_help().split())
